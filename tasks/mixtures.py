"""
Training/validation mixtures from a small spec language; the defaults are the published nanochat recipe
(github.com/karpathy/nanochat, scripts/mid_train.py and scripts/chat_sft.py).

A spec is a list of entries `SOURCE[@ROWS][:REPEAT]`:
  SOURCE   a known source (table below) or a path to a .jsonl conversation file (CustomJSON format)
  @ROWS    dataset sources: the first ROWS rows (of the seed-42 shuffle); spelling sources: ROWS examples (default 1000)
  :REPEAT  list the source REPEAT times (oversampling; REPEAT passes per epoch of the mixture)

  source          split=train                          split=test (validation mixtures)
  smoltalk        SmolTalk train (*)                   SmolTalk test (*)
  mmlu_aux        MMLU all/auxiliary_train             MMLU all/test
  gsm8k           GSM8K main/train                     GSM8K main/test
  arc_easy        ARC-Easy train                       ARC-Easy validation
  arc_challenge   ARC-Challenge train                  ARC-Challenge validation
  identity        identity_conversations.jsonl         the same file
  simplespelling  SimpleSpelling (train seeds)         SimpleSpelling (test seeds)
  spellingbee     SpellingBee (train seeds)            SpellingBee (test seeds)
  FILE.jsonl      the file                             the file
  (*) with NANOCHAT_DATA_DIR set and no hub copy of smol-smoltalk, the mirror's chat/{train,test}.jsonl.

Flags (add_mixture_args; mid_train and chat_sft take them), applied in the order mix, add-data, drop, cap:
  --mix A,B,...          replace the whole training mixture, e.g. --mix smoltalk@5000,gsm8k,my.jsonl:2
  --add-data ENTRY       add an entry (repeatable), e.g. --add-data my_chats.jsonl:3 (3 copies)
  --drop NAME            remove every entry of a source from the training mixture (repeatable)
  --cap NAME=ROWS        set @ROWS of a training source (repeatable), e.g. --cap smoltalk=10000
  --val-mix A,B,...      replace the validation mixture (built with split=test)
A source that cannot be loaded stops the script before training, saying how to provide it or drop it.
Mid training on an offline mirror without MMLU auxiliary_train (the usual one has none) needs `--drop mmlu_aux`.
"""

import os
import re

from tasks.common import TaskMixture
from tasks.arc import ARC
from tasks.mmlu import MMLU
from tasks.gsm8k import GSM8K
from tasks.smoltalk import SmolTalk
from tasks.customjson import CustomJSON, identity_conversations_path
from tasks.spellingbee import SpellingBee, SimpleSpelling

ENTRY_RE = re.compile(r"^(?P<source>.+?)(?:@(?P<rows>\d+))?(?::(?P<repeat>\d+))?$")

# name -> build(split, rows) -> Task. Every loader's own error already says how to provide the data.
SOURCES = {
    "smoltalk": lambda split, rows: SmolTalk(split=split, stop=rows),
    "mmlu_aux": lambda split, rows: MMLU("all", "auxiliary_train" if split == "train" else "test", stop=rows),
    "gsm8k": lambda split, rows: GSM8K("main", split, stop=rows),
    "arc_easy": lambda split, rows: ARC("ARC-Easy", "train" if split == "train" else "validation", stop=rows),
    "arc_challenge": lambda split, rows: ARC("ARC-Challenge", "train" if split == "train" else "validation", stop=rows),
    "identity": lambda split, rows: CustomJSON(identity_conversations_path(), stop=rows),
    "simplespelling": lambda split, rows: SimpleSpelling(size=rows or 1000, split=split),
    "spellingbee": lambda split, rows: SpellingBee(size=rows or 1000, split=split),
}


def default_mid_sources():
    """SmolTalk + MMLU aux + GSM8K + 2x identity + 200K SimpleSpelling + 80K SpellingBee."""
    return ["smoltalk", "mmlu_aux", "gsm8k", "identity:2", "simplespelling@200000", "spellingbee@80000"]


def default_mid_val_sources():
    """Mid validation: SmolTalk test + MMLU test[:5200] + GSM8K test[:420] (build with split='test')."""
    return ["smoltalk", "mmlu_aux@5200", "gsm8k@420"]


def default_sft_sources():
    """ARC-Easy + ARC-Challenge + GSM8K + SmolTalk[:10K] + identity + 300 + 300 spelling."""
    return ["arc_easy", "arc_challenge", "gsm8k", "smoltalk@10000", "identity", "simplespelling@300", "spellingbee@300"]


def default_sft_val_sources():
    return ["smoltalk"]


class SourceUnavailable(RuntimeError):
    pass


def parse_entry(entry):
    """'name@rows:repeat' -> (name, rows or None, repeat)."""
    m = ENTRY_RE.match(entry.strip())
    if not m:
        raise ValueError(f"bad mixture entry {entry!r}: expected SOURCE[@ROWS][:REPEAT]")
    name, rows, repeat = m["source"], m["rows"], m["repeat"]
    if name not in SOURCES and not name.endswith(".jsonl"):
        raise ValueError(f"unknown mixture source {name!r}: use one of {sorted(SOURCES)} or a path ending in .jsonl")
    if repeat is not None and int(repeat) < 1:
        raise ValueError(f"bad mixture entry {entry!r}: REPEAT must be >= 1")
    return name, (int(rows) if rows is not None else None), (int(repeat) if repeat is not None else 1)


def format_entry(name, rows, repeat):
    return name + (f"@{rows}" if rows is not None else "") + (f":{repeat}" if repeat != 1 else "")


def build_mixture(spec, split="train"):
    """Build every source of `spec` now (so a missing one fails before training) and mix them (seed 42)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be train or test, got {split!r}")
    if not spec:
        raise ValueError("the mixture is empty: give at least one source (--mix / --add-data)")
    tasks = []
    for entry in spec:
        name, rows, repeat = parse_entry(entry)
        build = SOURCES.get(name) or (lambda split, rows: CustomJSON(os.path.expanduser(name), stop=rows))
        role = "training" if split == "train" else "validation"
        fix = f"--drop {name}" if split == "train" else "--val-mix without it"
        try:
            task = build(split, rows)
        except (OSError, RuntimeError, ValueError, ImportError) as e:
            raise SourceUnavailable(f"{role} mixture source {name!r} could not be loaded: {e} "
                                    f"(to leave it out: {fix})") from e
        if len(task) == 0:  # caught here, before any model is loaded, not as an empty epoch later
            raise SourceUnavailable(f"{role} mixture source {name!r} has no conversations (an empty file, or "
                                    f"@0 rows); give it rows or leave it out ({fix})")
        tasks.extend([task] * repeat)  # the same object listed again = oversampling
    return TaskMixture(tasks)


def add_mixture_args(parser, default, default_val):
    """Add --mix/--add-data/--drop/--cap/--val-mix (see the module docstring) with these default specs."""
    g = parser.add_argument_group("data mixture (entries SOURCE[@ROWS][:REPEAT], see tasks/mixtures.py)")
    g.add_argument("--mix", type=str, default=",".join(default), help="training mixture, comma-separated entries")
    g.add_argument("--add-data", type=str, action="append", default=[], help="add an entry, e.g. my.jsonl:2")
    g.add_argument("--drop", type=str, action="append", default=[], help="remove a source from the training mixture")
    g.add_argument("--cap", type=str, action="append", default=[], help="NAME=ROWS: limit a training source's rows")
    g.add_argument("--val-mix", type=str, default=",".join(default_val), help="validation mixture (split=test)")


def _split_list(s):
    return [x.strip() for x in s.split(",") if x.strip()]


def specs_from_args(args):
    """(training spec, validation spec) from the parsed flags of add_mixture_args."""
    train = [format_entry(*parse_entry(e)) for e in _split_list(args.mix) + args.add_data]
    names = lambda spec: [parse_entry(e)[0] for e in spec]
    for name in [d for arg in args.drop for d in _split_list(arg)]:
        if name not in names(train):
            raise ValueError(f"--drop {name}: not in the training mixture {train}")
        train = [e for e in train if parse_entry(e)[0] != name]
    for cap in [c for arg in args.cap for c in _split_list(arg)]:
        name, eq, rows = cap.rpartition("=")
        if not eq or not rows.isdigit():
            raise ValueError(f"--cap {cap}: expected NAME=ROWS, e.g. --cap smoltalk=10000")
        if name not in names(train):
            raise ValueError(f"--cap {cap}: {name!r} is not in the training mixture {train}")
        train = [format_entry(n, int(rows), rep) if n == name else format_entry(n, r, rep)
                 for n, r, rep in map(parse_entry, train)]
    val = [format_entry(*parse_entry(e)) for e in _split_list(args.val_mix)]
    return train, val


def mixtures_from_args(args):
    """(train mixture, val mixture) from the parsed flags, printed as resolved. A bad flag or an unloadable
    source exits with a message (not a traceback) before any model is loaded."""
    from nanochat.common import print0
    try:
        train_spec, val_spec = specs_from_args(args)
        print0(f"train mixture: {train_spec}\nval mixture: {val_spec}")
        train_ds, val_ds = build_mixture(train_spec, "train"), build_mixture(val_spec, "test")
    except (ValueError, SourceUnavailable) as e:
        raise SystemExit(f"error: {e}")
    print0(f"train conversations: {len(train_ds):,} | val conversations: {len(val_ds):,}")
    return train_ds, val_ds
