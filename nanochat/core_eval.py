"""
The CORE benchmark (DCLM, https://arxiv.org/abs/2406.11794): in-context evaluation without generation.
multiple_choice: one prompt per choice, lowest mean loss over the answer tokens wins; schema: one prompt per
context, same continuation, lowest mean continuation loss wins; language_modeling: greedy exact match.
Accuracies are centered on each task's random baseline; CORE is their mean (tasks whose data file is missing are
named and left out). Bundle: `bundle_dir`, else $NANOCHAT_DATA_DIR/eval_bundle, else $NANOCHAT_BASE_DIR/eval_bundle
(downloaded once from EVAL_BUNDLE_URL under a file lock).
"""

import io
import os
import csv
import time
import random
import shutil
import zipfile

import torch
import torch.nn.functional as F
import torch.distributed as dist

from nanochat.common import get_base_dir, get_data_dir, download_file_with_lock, print0
from nanochat.files import InputFileError, MissingFileError, open_regular, read_jsonl

EVAL_BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"
TASK_TYPES = ("multiple_choice", "schema", "language_modeling")

# -----------------------------------------------------------------------------
# Prompt construction, as in the DCLM evaluation harness. Few-shot blocks are each followed by a blank line.


def render_prompts_mc(item, delimiter, fewshot):
    prefix = "".join(f"{ex['query']}{delimiter}{ex['choices'][ex['gold']]}\n\n" for ex in fewshot)
    return [f"{prefix}{item['query']}{delimiter}{choice}" for choice in item["choices"]]


def render_prompts_schema(item, delimiter, fewshot):
    prefix = "".join(f"{ex['context_options'][ex['gold']]}{delimiter}{ex['continuation']}\n\n" for ex in fewshot)
    return [f"{prefix}{ctx}{delimiter}{item['continuation']}" for ctx in item["context_options"]]


def render_prompts_lm(item, delimiter, fewshot):
    """[without continuation (stripped), with continuation]."""
    prefix = "".join(f"{ex['context'].strip()}{delimiter}{ex['continuation']}\n\n" for ex in fewshot)
    without = f"{prefix}{item['context'].strip()}{delimiter}"
    return [without.strip(), without + item["continuation"]]


def prepare_item(idx, data, tokenizer, task_meta, max_seq_len=None):
    """(rows, spans, gold) of item idx: rows[i] a list of ids (BOS first), spans[i] = (start, end) its answer."""
    item = data[idx]
    task_type, delim = task_meta["task_type"], task_meta["continuation_delimiter"]
    k = min(task_meta["num_fewshot"], len(data) - 1)
    fewshot = []
    if k > 0:
        # same draw as the reference: sample k of all other indices with a per-item seed
        population = list(range(idx)) + list(range(idx + 1, len(data)))
        fewshot = [data[i] for i in random.Random(1234 + idx).sample(population, k)]
    bos = tokenizer.get_bos_token_id()
    if task_type == "multiple_choice":
        rows = tokenizer.encode(render_prompts_mc(item, delim, fewshot), prepend=bos)
        start = len(os.path.commonprefix(rows))  # element-wise on lists of ids
        spans = [(start, len(r)) for r in rows]
        gold = item["gold"]
    elif task_type == "schema":
        rows = tokenizer.encode(render_prompts_schema(item, delim, fewshot), prepend=bos)
        s = len(os.path.commonprefix([r[::-1] for r in rows]))
        spans = [(len(r) - s, len(r)) for r in rows]
        gold = item["gold"]
    elif task_type == "language_modeling":
        without, with_ = tokenizer.encode(render_prompts_lm(item, delim, fewshot), prepend=bos)
        # the reference asserts `without` is a prefix of `with`; on a rare tokenizer merge across the
        # boundary we score from the first differing token instead of crashing a long evaluation
        start = len(os.path.commonprefix([without, with_]))
        rows, spans, gold = [with_], [(start, len(with_))], None
    else:
        raise ValueError(f"unknown icl_task_type {task_type!r}; expected one of {TASK_TYPES}")
    if max_seq_len is not None:
        # keep the last max_seq_len tokens of long prompts and shift the spans with them
        cuts = [max(0, len(r) - max_seq_len) for r in rows]
        rows = [r[c:] for r, c in zip(rows, cuts)]
        spans = [(s - c, e - c) for (s, e), c in zip(spans, cuts)]
    # position 0 (BOS) has no prediction; a span can only reach it in degenerate cases
    spans = [(max(s, 1), max(e, 1)) for s, e in spans]
    return rows, spans, gold


def _model_max_seq_len(model):
    """Longest input the model takes: an explicit max_seq_len, else the rotary table's length."""
    n = getattr(model, "max_seq_len", None)
    if n:
        return int(n)
    cos = getattr(model, "cos", None)
    if isinstance(cos, torch.Tensor) and cos.dim() >= 2:
        return int(cos.size(1))
    return None


@torch.no_grad()
def _forward_and_score(model, items, bos, device):
    """items: [(idx, rows, spans, gold, task_type)] -> {idx: correct}. One right-padded (BOS) batch: the model is
    causal, so padding never changes a scored position. Only answer positions are scored, one host copy per batch."""
    all_rows = [r for it in items for r in it[1]]
    all_spans = [sp for it in items for sp in it[2]]
    T = max(len(r) for r in all_rows)
    inputs = torch.full((len(all_rows), T), bos, dtype=torch.long)
    for i, r in enumerate(all_rows):
        inputs[i, :len(r)] = torch.tensor(r, dtype=torch.long)
    # logits at position t predict token t+1: answer tokens [s, e) are scored at positions [s-1, e-1)
    row_idx, pos_idx = [], []
    for i, (s, e) in enumerate(all_spans):
        row_idx += [i] * (e - s)
        pos_idx += range(s - 1, e - 1)
    inputs = inputs.to(device)
    rows_t = torch.tensor(row_idx, dtype=torch.long, device=device)
    pos_t = torch.tensor(pos_idx, dtype=torch.long, device=device)
    picked = model(inputs, positions=(rows_t, pos_t)).float()  # (P, V): the head only where answers are scored
    targets = inputs[rows_t, pos_t + 1]  # (P,)
    n = len(all_rows)
    loss_sum = torch.zeros(n, device=device).index_add_(0, rows_t, F.cross_entropy(picked, targets, reduction="none"))
    misses = torch.zeros(n, device=device).index_add_(0, rows_t, (picked.argmax(dim=-1) != targets).float())
    counts = torch.bincount(rows_t, minlength=n).float()
    # an empty answer span (a choice wholly inside the common prefix) can never win: loss +inf
    mean_loss = torch.where(counts > 0, loss_sum / counts.clamp(min=1), torch.full_like(loss_sum, float("inf")))
    mean_loss, misses = mean_loss.tolist(), misses.tolist()
    out, row = {}, 0
    for idx, rows, spans, gold, task_type in items:
        if task_type == "language_modeling":
            out[idx] = misses[row] == 0  # greedy exact match of every answer token
        else:
            losses = mean_loss[row:row + len(rows)]
            out[idx] = min(range(len(losses)), key=losses.__getitem__) == gold
        row += len(rows)
    return out


def evaluate_task(model, tokenizer, data, device, task_meta, batch_tokens=8192):
    """Accuracy on one task. data: the (shuffled/cropped) items; task_meta: {task_type, num_fewshot,
    continuation_delimiter}. Ranks take items rank, rank+W, ...; items share a forward up to `batch_tokens`."""
    is_dist = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if is_dist else (0, 1)
    max_seq_len = _model_max_seq_len(model)
    bos = tokenizer.get_bos_token_id()
    correct = torch.zeros(len(data), dtype=torch.float32, device=device)
    pending, n_rows, max_len = [], 0, 0

    def flush():
        for idx, ok in _forward_and_score(model, pending, bos, device).items():
            correct[idx] = float(ok)
        pending.clear()

    for idx in range(rank, len(data), world):
        rows, spans, gold = prepare_item(idx, data, tokenizer, task_meta, max_seq_len)
        longest = max(len(r) for r in rows)
        if pending and (n_rows + len(rows)) * max(max_len, longest) > batch_tokens:
            flush()
            n_rows, max_len = 0, 0
        pending.append((idx, rows, spans, gold, task_meta["task_type"]))
        n_rows, max_len = n_rows + len(rows), max(max_len, longest)
    if pending:
        flush()
    if is_dist and world > 1:
        dist.barrier()
        dist.all_reduce(correct, op=dist.ReduceOp.SUM)
    return correct.sum().item() / len(data) if len(data) else float("nan")

# -----------------------------------------------------------------------------
# The bundle


def unzip_bundle(zip_path):
    """Unzip eval_bundle.zip next to it as eval_bundle/ (via a temp dir, so a crash leaves no half bundle)."""
    base = os.path.dirname(zip_path)
    target = os.path.join(base, "eval_bundle")
    tmp = os.path.join(base, "eval_bundle.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with zipfile.ZipFile(zip_path) as zf:
        zf.extractall(tmp)
    inner = os.path.join(tmp, "eval_bundle")
    src = inner if os.path.isdir(inner) else tmp
    shutil.rmtree(target, ignore_errors=True)
    os.replace(src, target)
    shutil.rmtree(tmp, ignore_errors=True)
    print0(f"unzipped the eval bundle to {target}")


def get_bundle_dir(bundle_dir=None):
    """Where core.yaml lives: argument, $NANOCHAT_DATA_DIR/eval_bundle, or $BASE/eval_bundle (downloaded)."""
    if bundle_dir is not None:
        return bundle_dir
    data_dir = get_data_dir()
    if data_dir is not None:
        d = os.path.join(data_dir, "eval_bundle")
        if not os.path.exists(os.path.join(d, "core.yaml")):
            raise MissingFileError(f"{d}/core.yaml not found: NANOCHAT_DATA_DIR={data_dir} has no eval bundle; "
                                    f"unset NANOCHAT_DATA_DIR to download it or add eval_bundle/ to the mirror")
        return d
    base = get_base_dir()
    d = os.path.join(base, "eval_bundle")
    if not os.path.exists(os.path.join(d, "core.yaml")):
        zip_path = os.path.join(base, "eval_bundle.zip")
        if os.path.exists(zip_path):  # downloaded earlier but the unzip did not finish
            from filelock import FileLock
            with FileLock(zip_path + ".lock"):
                if not os.path.exists(os.path.join(d, "core.yaml")):
                    unzip_bundle(zip_path)
        else:
            download_file_with_lock(EVAL_BUNDLE_URL, zip_path, postprocess=unzip_bundle)
    return d


MAX_BUNDLE_TABLE_BYTES = 16 << 20  # core.yaml and eval_meta_data.csv are a few KB

# the 22 tasks of the standard CORE bundle, in core.yaml order
CORE_TASKS = ["hellaswag_zeroshot", "jeopardy", "bigbench_qa_wikidata", "arc_easy", "arc_challenge", "copa",
              "commonsense_qa", "piqa", "openbook_qa", "lambada_openai", "hellaswag", "winograd", "winogrande",
              "bigbench_dyck_languages", "agi_eval_lsat_ar", "bigbench_cs_algorithms", "bigbench_operators",
              "bigbench_repeat_copy_logic", "squad", "coqa", "boolq", "bigbench_language_identification"]


def load_bundle(bundle_dir):
    """[(label, task_meta, data_path, random_baseline_percent)] in core.yaml order; a damaged core.yaml or
    eval_meta_data.csv raises InputFileError naming it."""
    import yaml
    fix = ("restore the eval bundle: delete it to download it again, or fix eval_bundle/ in the mirror "
           "(NANOCHAT_DATA_DIR)")
    yaml_path, csv_path = os.path.join(bundle_dir, "core.yaml"), os.path.join(bundle_dir, "eval_meta_data.csv")
    with io.TextIOWrapper(open_regular(yaml_path, fix, MAX_BUNDLE_TABLE_BYTES, "bundle table"), encoding="utf-8") as f:
        try:
            config = yaml.safe_load(f)
        except (yaml.YAMLError, UnicodeDecodeError, RecursionError) as e:
            raise InputFileError(f"{yaml_path} is not valid YAML ({type(e).__name__}); {fix}") from None
    with io.TextIOWrapper(open_regular(csv_path, fix, MAX_BUNDLE_TABLE_BYTES, "bundle table"), encoding="utf-8",
                          newline="") as f:
        try:
            baselines = {row["Eval Task"].strip(): float(row["Random baseline"]) for row in csv.DictReader(f)}
        except (KeyError, ValueError, TypeError, AttributeError, csv.Error) as e:  # UnicodeDecodeError included
            raise InputFileError(f"{csv_path}: not a table of 'Eval Task' and 'Random baseline' columns "
                                 f"({type(e).__name__}: {str(e)[:80]}); {fix}") from None
    tasks = []
    try:
        for t in config["icl_tasks"]:
            label = t["label"]
            if t["icl_task_type"] not in TASK_TYPES:
                raise ValueError(f"task {label}: unknown icl_task_type {t['icl_task_type']!r}")
            if label not in baselines:
                raise ValueError(f"task {label} has no 'Random baseline' row in eval_meta_data.csv")
            meta = {"task_type": t["icl_task_type"], "num_fewshot": int(t["num_fewshot"][0]),
                    "continuation_delimiter": str(t.get("continuation_delimiter", " "))}
            tasks.append((label, meta, os.path.join(bundle_dir, "eval_data", str(t["dataset_uri"])), baselines[label]))
    except ValueError as e:
        raise InputFileError(f"{yaml_path}: {str(e)[:120]}; {fix}") from None
    except (KeyError, TypeError, IndexError) as e:
        raise InputFileError(f"{yaml_path}: a task entry lacks a field or has the wrong type "
                             f"({type(e).__name__}: {str(e)[:80]}); {fix}") from None
    return tasks


def _item_checker(task_type):
    """read_jsonl's parse for a task's rows: the fields its prompts use, with the right types."""
    text_fields, options_field = {"multiple_choice": (("query",), "choices"),
                                  "schema": (("continuation",), "context_options"),
                                  "language_modeling": (("context", "continuation"), None)}[task_type]

    def check(row):
        if not isinstance(row, dict) or not all(isinstance(row.get(k), str) for k in text_fields):
            raise ValueError(f"a {task_type} row is an object with string fields {', '.join(text_fields)}")
        if options_field is not None:
            options, gold = row.get(options_field), row.get("gold")
            if not isinstance(options, list) or not options or not all(isinstance(o, str) for o in options):
                raise ValueError(f"'{options_field}' must be a non-empty list of strings")
            if type(gold) is not int or not 0 <= gold < len(options):
                raise ValueError(f"'gold' must index the {len(options)} {options_field}, got {str(gold)[:20]}")
        return row
    return check


def load_task_data(path, task_type=None):
    """The rows of a task's JSONL file, each checked for its task type's fields (errors name the file:line)."""
    return read_jsonl(path, _item_checker(task_type) if task_type else None,
                      fix="restore the eval bundle (delete it to download it again)")


def evaluate_core(model, tokenizer, device, max_per_task=-1, bundle_dir=None, batch_tokens=8192):
    """Every CORE task of the bundle -> {"results": {label: accuracy}, "centered": {label: c}, "core": mean of
    centered over the tasks present, "missing": [labels whose data file is absent]}."""
    tasks = load_bundle(get_bundle_dir(bundle_dir))
    results, centered, missing = {}, {}, []
    labels = {label for label, *_ in tasks}
    if labels & set(CORE_TASKS):  # a (partial) standard bundle: name the standard tasks it lacks
        for label in CORE_TASKS:
            if label not in labels:
                missing.append(label)
                print0(f"CORE: task {label} is not in this bundle's core.yaml (left out of the mean)")
    for label, task_meta, path, baseline in tasks:
        if not os.path.exists(path):
            missing.append(label)
            print0(f"CORE: task {label} skipped, its data file {path} is missing (left out of the mean)")
            continue
        t0 = time.time()
        data = load_task_data(path, task_meta["task_type"])
        # the files are often ordered; shuffle so --max-per-task takes a fair subset
        random.Random(1337).shuffle(data)
        if max_per_task > 0:
            data = data[:max_per_task]
        acc = evaluate_task(model, tokenizer, data, device, task_meta, batch_tokens=batch_tokens)
        results[label] = acc
        centered[label] = (acc - 0.01 * baseline) / (1.0 - 0.01 * baseline)
        print0(f"{label:<35} ({len(data):>5} items, {task_meta['num_fewshot']:>2}-shot) "
               f"accuracy {acc:.4f} | centered {centered[label]:+.4f} | {time.time() - t0:.1f}s")
    if missing:
        print0(f"CORE: {len(missing)} task(s) missing and excluded from the mean: {', '.join(missing)}")
    core = sum(centered.values()) / len(centered) if centered else float("nan")
    return {"results": results, "centered": centered, "core": core, "missing": missing}
