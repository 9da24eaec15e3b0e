"""
Tests for tasks/: rendering of every task from fixture rows, evaluate(), slicing, mixtures, the mixture
spec flags, and loading errors. Fixture rows are written to tmp_path and NANOCHAT_DATA_DIR points there.
"""

import os
import json
import random
import argparse
import importlib.util

import numpy as np
import pytest

from nanochat.files import InputFileError
from tasks.common import Task, TaskMixture, TaskSequence, render_mc
from tasks.arc import ARC
from tasks.mmlu import MMLU
from tasks.gsm8k import GSM8K, extract_answer
from tasks.smoltalk import SmolTalk
from tasks.humaneval import HumanEval, extract_imports, extract_program
from tasks.customjson import CustomJSON, identity_conversations_path
from tasks.spellingbee import SpellingBee, SimpleSpelling, TEMPLATES
from tasks import mixtures

from conftest import REPO, write_jsonl

# the real offline mirror: NANOCHAT_DATA_DIR when set, else shared/data beside the repository
SHARED = os.environ.get("NANOCHAT_DATA_DIR") or os.path.join(os.path.dirname(REPO), "shared", "data")


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    d = tmp_path / "data"
    d.mkdir()
    monkeypatch.setenv("NANOCHAT_DATA_DIR", str(d))
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    return d


def hub(d, repo, config, split, rows):
    return write_jsonl(d / "hub" / repo / config / f"{split}.jsonl", rows)


def perm(n):
    # datasets.Dataset.shuffle(seed=42) order, computed independently of tasks.common
    return [int(i) for i in np.random.default_rng(42).permutation(n)]

# -----------------------------------------------------------------------------
# Task views

class Range(Task):
    """Toy task: example i is the int i."""

    def __init__(self, n, **kwargs):
        super().__init__(**kwargs)
        self.n = n

    def num_examples(self):
        return self.n

    def get_example(self, index):
        return index


def test_slicing():
    t = Range(10, start=2, stop=9, step=3)
    assert len(t) == 3  # ceil((9-2)/3)
    assert [t[i] for i in range(len(t))] == [2, 5, 8]
    assert list(t) == [2, 5, 8]  # iteration stops at IndexError
    assert len(Range(10, step=4)) == 3 and [x for x in Range(10, step=4)] == [0, 4, 8]
    assert len(Range(10, start=3)) == 7
    assert len(Range(5, stop=100)) == 5  # a stop past the end is clamped
    with pytest.raises(IndexError):
        t[3]
    with pytest.raises(TypeError):
        t[0:2]
    for bad in (dict(start=-1), dict(start=5, stop=4), dict(step=0)):
        with pytest.raises(ValueError):
            Range(10, **bad)


class Tagged(Range):
    """Toy task: example i is (tag, i)."""

    def __init__(self, n, tag, **kwargs):
        super().__init__(n, **kwargs)
        self.tag = tag

    def get_example(self, index):
        return (self.tag, index)


def test_mixture_order_coverage_oversampling():
    a, b = Range(5), Range(3)
    mix = TaskMixture([a, b, a])
    assert len(mix) == 13
    # naive reference: all (task, local) pairs in task order, shuffled with random.Random(42)
    pairs = [(ti, li) for ti, n in enumerate([5, 3, 5]) for li in range(n)]
    random.Random(42).shuffle(pairs)
    assert [mix[i] for i in range(13)] == [li for _, li in pairs]
    # which task each example came from, seen through the examples themselves: b's are tagged
    tagged = TaskMixture([a, Tagged(3, "b"), a])
    assert [tagged[i] for i in range(13)] == [("b", li) if ti == 1 else li for ti, li in pairs]
    # coverage: every example of b once, every example of a twice (listed twice)
    examples = [tagged[i] for i in range(13)]
    assert all(examples.count(i) == 2 for i in range(5)) and all(examples.count(("b", i)) == 1 for i in range(3))
    # determinism across constructions
    assert [TaskMixture([a, b, a])[i] for i in range(13)] == [mix[i] for i in range(13)]


def test_sequence_order():
    seq = TaskSequence([Range(3), Range(2, start=0), Range(4, start=1, step=2)])
    assert len(seq) == 7
    assert list(seq) == [0, 1, 2, 0, 1, 1, 3]

# -----------------------------------------------------------------------------
# Multiple choice: ARC and MMLU

def test_render_mc_exact():
    got = render_mc("What is 2+2?", ["A", "B"], ["3", "4"])
    assert got == ("Multiple Choice question: What is 2+2?\n- 3=A\n- 4=B\n\n"
                   "Respond only with the letter of the correct answer.")


def arc_row(i, labels=("A", "B", "C", "D"), key="B"):
    return {"id": f"q{i}", "question": f"Question {i}?", "answerKey": key,
            "choices": {"text": [f"choice{i}{l}" for l in labels], "label": list(labels)}}


def test_arc(data_dir):
    rows = [arc_row(i) for i in range(6)] + [arc_row(6, labels=("1", "2", "3"), key="3")]
    hub(data_dir, "allenai/ai2_arc", "ARC-Easy", "train", rows)
    task = ARC("ARC-Easy", "train")
    assert len(task) == 7 and task.eval_type == "categorical"
    order = perm(7)
    for i in range(7):
        row = rows[order[i]]
        conv = task[i]
        user, asst = conv["messages"]
        assert user["role"] == "user" and asst == {"role": "assistant", "content": row["answerKey"]}
        assert conv["letters"] == row["choices"]["label"]
        for text, label in zip(row["choices"]["text"], row["choices"]["label"]):
            assert f"\n- {text}={label}\n" in user["content"]  # letter after the choice, no space
        assert task.evaluate(conv, row["answerKey"]) == 1
        wrong = [l for l in conv["letters"] if l != row["answerKey"]][0]
        assert task.evaluate(conv, wrong) == 0
        assert task.reward(conv, wrong) == 0.0
    with pytest.raises(ValueError):
        task.evaluate(task[0], "Z")
    with pytest.raises(ValueError):
        ARC("ARC-Medium", "train")


def test_arc_bad_row_names_file_and_line(data_dir):
    path = hub(data_dir, "allenai/ai2_arc", "ARC-Easy", "train", [arc_row(0), arc_row(1, key="E")])
    with pytest.raises(ValueError, match=f"{path}:2"):
        ARC("ARC-Easy", "train")


def test_mmlu(data_dir):
    rows = [{"question": f"Q{i}", "subject": "anatomy", "choices": ["w", "x", "y", "z"], "answer": i % 4}
            for i in range(5)]
    hub(data_dir, "cais/mmlu", "all", "dev", rows)
    task = MMLU("all", "dev")
    order = perm(5)
    for i in range(5):
        conv, row = task[i], rows[order[i]]
        assert conv["messages"][0]["content"] == (f"Multiple Choice question: {row['question']}\n"
                                                  "- w=A\n- x=B\n- y=C\n- z=D\n\n"
                                                  "Respond only with the letter of the correct answer.")
        assert conv["messages"][1]["content"] == "ABCD"[row["answer"]]
        assert conv["subject"] == "anatomy" and conv["letters"] == ["A", "B", "C", "D"]
        assert task.evaluate(conv, "ABCD"[row["answer"]]) == 1
        assert task.evaluate(conv, "ABCD"[(row["answer"] + 1) % 4]) == 0
    with pytest.raises(ValueError):
        MMLU("all", "train")
    # the old nested auxiliary_train layout and the MID naming both load
    hub(data_dir, "cais/mmlu", "all", "auxiliary_train", [{"train": rows[0]}])
    assert MMLU("auxiliary_train", "train")[0]["messages"][1]["content"] == "A"
    path = hub(data_dir, "cais/mmlu", "all", "test", rows[:2] + [{"question": "q", "choices": ["a", "b", "c"], "answer": 0}])
    with pytest.raises(ValueError, match=f"{path}:3"):
        MMLU("all", "test")


def test_missing_hub_split_error(data_dir):
    with pytest.raises(FileNotFoundError, match="hub/cais/mmlu/all/auxiliary_train.jsonl.*unset NANOCHAT_DATA_DIR"):
        MMLU("all", "auxiliary_train")

# -----------------------------------------------------------------------------
# GSM8K

EXAMPLE_ANSWER = "She buys 3*4 = <<3*4=12>>12 eggs.\nShe has 12-2 = <<12-2=10>>10 left.\n#### 10"


def test_gsm8k_parts_worked_example(data_dir):
    hub(data_dir, "openai/gsm8k", "main", "train", [{"question": "How many eggs?", "answer": EXAMPLE_ANSWER}])
    task = GSM8K("main", "train")
    assert len(task) == 1 and task.eval_type == "generative"
    conv = task[0]
    assert conv["messages"][0] == {"role": "user", "content": "How many eggs?"}
    assert conv["messages"][1]["content"] == [  # the dataset's <<3*4=12>> annotation as a tool call
        {"type": "text", "text": "She buys 3*4 = "},
        {"type": "python", "text": "3*4"},
        {"type": "python_output", "text": "12"},
        {"type": "text", "text": "12 eggs.\nShe has 12-2 = "},
        {"type": "python", "text": "12-2"},
        {"type": "python_output", "text": "10"},
        {"type": "text", "text": "10 left.\n#### 10"},
    ]
    assert task.evaluate(conv, "blah\n#### 10") == 1
    assert task.evaluate(conv, "#### 11") == 0
    assert task.evaluate(conv, "ten") == 0
    assert task.reward(conv, "#### 10") == 1.0


def test_gsm8k_edge_annotations(data_dir):
    # annotation at the start (empty leading text part), one without '=', comma-formatted answer
    hub(data_dir, "openai/gsm8k", "main", "test", [{"question": "q", "answer": "<<2+2>>4 then <<a=b=5>>5\n#### 1,234"}])
    parts = GSM8K("main", "test")[0]["messages"][1]["content"]
    assert parts == [
        {"type": "text", "text": ""},
        {"type": "python", "text": "2+2"}, {"type": "python_output", "text": ""},
        {"type": "text", "text": "4 then "},
        {"type": "python", "text": "a=b"}, {"type": "python_output", "text": "5"},
        {"type": "text", "text": "5\n#### 1,234"},
    ]
    assert extract_answer("#### 1,234") == "1234"
    assert extract_answer("x #### -3.5 y") == "-3.5"
    assert extract_answer("no answer") is None
    conv = GSM8K("main", "test")[0]
    assert GSM8K("main", "test").evaluate(conv, "#### 1234") == 1

# -----------------------------------------------------------------------------
# SmolTalk and CustomJSON

def chat(n, system=False):
    msgs = [{"role": "system", "content": "Be nice."}] if system else []
    for i in range(n):
        msgs.append({"role": "user" if i % 2 == 0 else "assistant", "content": f"m{i}"})
    return msgs


def test_smoltalk_hub_and_standin(data_dir, capsys):
    rows = [{"messages": chat(2), "source": "x"}, {"messages": chat(4, system=True), "source": "y"}]
    write_jsonl(data_dir / "chat" / "train.jsonl", rows)
    task = SmolTalk("train")
    assert "chat stand-in" in capsys.readouterr().out
    order = perm(2)
    assert [task[i] for i in range(2)] == [{"messages": rows[j]["messages"]} for j in order]
    # a hub copy wins over the stand-in
    hub(data_dir, "HuggingFaceTB/smol-smoltalk", "default", "train", rows[:1])
    assert len(SmolTalk("train")) == 1
    path = write_jsonl(data_dir / "chat" / "test.jsonl", [{"messages": chat(2)}, {"messages": chat(1)}])
    with pytest.raises(ValueError, match=f"{path}:2"):
        SmolTalk("test")


def test_customjson_formats_and_errors(tmp_path):
    a, b = chat(2), chat(4, system=True)
    path = write_jsonl(tmp_path / "c.jsonl", [a, "", {"messages": b}])
    task = CustomJSON(path)
    assert len(task) == 2 and task[0] == {"messages": a} and task[1] == {"messages": b}
    for bad_line in ('[{"role": "user", "content": "hi"', json.dumps([{"role": "assistant", "content": "x"}] * 2),
                     json.dumps({"conversation": a}), json.dumps([{"role": "user", "content": 3}, a[1]])):
        bad = write_jsonl(tmp_path / "bad.jsonl", [a, bad_line])
        with pytest.raises(ValueError, match=f"{bad}:2"):
            CustomJSON(bad)
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        CustomJSON(str(tmp_path / "nope.jsonl"))
    # assistant tool-call parts are accepted
    parts = [{"role": "user", "content": "2+2?"},
             {"role": "assistant", "content": [{"type": "python", "text": "2+2"}, {"type": "python_output", "text": "4"}]}]
    assert CustomJSON(write_jsonl(tmp_path / "p.jsonl", [parts]))[0]["messages"] == parts


def test_jsonl_invalid_utf8_names_the_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    good = json.dumps(chat(2)).encode()
    path.write_bytes(good + b"\n" + good + b"\n" + json.dumps(chat(2)).replace("m0", "caf\u00e9").encode("latin-1") + b"\n")
    with pytest.raises(ValueError, match=f"{path}:3: invalid UTF-8"):
        CustomJSON(str(path))


def test_jsonl_empty_file_is_a_warning_naming_it(tmp_path, caplog):
    path = write_jsonl(tmp_path / "empty.jsonl", ["", "  "])
    with caplog.at_level("WARNING", logger="nanochat"):
        assert len(CustomJSON(path)) == 0
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == \
        [f"warning: {path} is empty (no rows): it adds nothing"]


def test_jsonl_nested_100k_deep_names_the_line(tmp_path):
    path = tmp_path / "deep.jsonl"
    path.write_text(json.dumps(chat(2)) + "\n" + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(InputFileError, match=f"^{path}:2: malformed row: nested too deeply"):
        CustomJSON(str(path))


@pytest.mark.parametrize("kind", ["fifo", "dir", "/dev/zero"])
def test_jsonl_that_is_not_a_regular_file_is_refused_at_once(tmp_path, kind):
    path = tmp_path / "rows.jsonl"
    {"fifo": lambda: os.mkfifo(path), "dir": path.mkdir, "/dev/zero": lambda: path.symlink_to("/dev/zero")}[kind]()
    with pytest.raises(InputFileError, match=f"^{path} is a .*, not a regular file"):
        CustomJSON(str(path))


def test_empty_source_fails_before_anything_is_built(tmp_path):
    """An empty JSONL, even as the only source of a mixture, stops the build (before a script loads its model)."""
    empty = write_jsonl(tmp_path / "empty.jsonl", [])
    for spec in ([empty], [f"{empty}:3"], [write_jsonl(tmp_path / "one.jsonl", [chat(2)]), empty]):
        with pytest.raises(mixtures.SourceUnavailable, match=f"source '{empty}' has no conversations .*--drop"):
            mixtures.build_mixture(spec)
    with pytest.raises(mixtures.SourceUnavailable, match="has no conversations .*--val-mix without it"):
        mixtures.build_mixture([empty], split="test")


@pytest.mark.parametrize("row, match", [
    ([{"role": "user", "content": ""}, {"role": "assistant", "content": "hi"}], r"message 0 \(user\): empty content"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": [{"type": "text", "text": "a"}, {"type": "x"}]}],
     "message 1 \\(assistant\\): part 1 has unknown type"),
    ([{"role": "user", "content": "hi"}], "a training conversation needs at least one assistant reply"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a"}, {"role": "system", "content": "s"}],
     "message 2: a system message is only allowed as the first"),
])
def test_conversation_that_would_fail_later_is_rejected_at_load(tmp_path, row, match):
    path = write_jsonl(tmp_path / "rows.jsonl", [chat(2), row])
    with pytest.raises(ValueError, match=f"{path}:2: malformed row: {match}"):
        CustomJSON(path)


def test_identity_path(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    monkeypatch.delenv("NANOCHAT_DATA_DIR", raising=False)
    assert identity_conversations_path() == str(tmp_path / "base" / "identity_conversations.jsonl")
    with pytest.raises(FileNotFoundError, match="curl -L -o"):
        CustomJSON(identity_conversations_path())
    (tmp_path / "data").mkdir()
    monkeypatch.setenv("NANOCHAT_DATA_DIR", str(tmp_path / "data"))
    assert identity_conversations_path() == str(tmp_path / "data" / "identity_conversations.jsonl")

# -----------------------------------------------------------------------------
# Spelling

def test_spellingbee_banana(data_dir):
    (data_dir / "words_alpha.txt").write_text("banana\n")
    task = SpellingBee(size=200, split="train")
    assert len(task) == 200 and task.eval_type == "generative"
    seen = set()
    for i in range(200):
        conv = task[i]
        parts = conv["messages"][1]["content"]
        assert [p["type"] for p in parts] == ["text", "text", "python", "python_output", "text"]
        letter = parts[2]["text"][len("'banana'.count('"):-2]
        assert parts[2]["text"] == f"'banana'.count('{letter}')"
        n = "banana".count(letter)
        assert parts[3]["text"] == str(n)
        assert parts[4]["text"].endswith(f"\n\nPython gives us {n}.\n\nMy final answer is:\n\n#### {n}")
        assert parts[1]["text"] == "\n\nLet me double check this using Python:\n\n"
        assert task.evaluate(conv, f"#### {n}") == 1 and task.evaluate(conv, f"#### {n + 1}") == 0
        if letter == "a" and "a" not in seen:  # hand-written manual spelling for one case
            assert parts[0]["text"] == (
                "We are asked to find the number 'a' in the word 'banana'. Let me try a manual approach first.\n\n"
                "First spell the word out:\nbanana:b,a,n,a,n,a\n\nThen count the occurrences of 'a':\n"
                "1:b\n2:a hit! count=1\n3:n\n4:a hit! count=2\n5:n\n6:a hit! count=3\n\nThis gives us 3.")
        seen.add(letter)
    assert {"a", "b", "n"} <= seen and len(seen) > 3  # 10% of letters are drawn from the alphabet


def replay_spellingbee_user(words, seed):
    # the draw order (word, letter, template, ...), written out step by step
    rng = random.Random(seed)
    word = rng.choice(words)
    letter = rng.choice(word) if rng.random() < 0.9 else rng.choice("abcdefghijklmnopqrstuvwxyz")
    template = rng.choice(TEMPLATES)
    if rng.random() < 0.3:
        template = template.lower()
    lq, wq = rng.choice(["", "'", '"']), rng.choice(["", "'", '"'])
    user = template.format(letter=lq + letter + lq, word=wq + word + wq)
    return user + "?" if rng.random() < 0.5 else user


def test_spellingbee_seeds_and_templates(data_dir):
    words = ["apple", "cherry", "kiwi", "mississippi", "zebra"]
    (data_dir / "words_alpha.txt").write_text("\n".join(words) + "\n")
    assert len(TEMPLATES) == 51
    assert TEMPLATES[0] == "How many {letter} are in the word {word}" and TEMPLATES[-1] == "{word}に{letter}が何回出てくる"
    train, test = SpellingBee(50, "train"), SpellingBee(50, "test")
    for i in range(50):
        assert train[i]["messages"][0]["content"] == replay_spellingbee_user(words, i)
        assert test[i]["messages"][0]["content"] == replay_spellingbee_user(words, 10_000_000 + i)
    assert [train[i] for i in range(5)] != [test[i] for i in range(5)]


def test_simplespelling(data_dir):
    words = ["apple", "cherry", "kiwi"]
    (data_dir / "words_alpha.txt").write_text("\n".join(words) + "\n")
    task = SimpleSpelling(size=20, split="train")
    shuffled = list(words)
    random.Random(42).shuffle(shuffled)
    for i in range(20):
        w = random.Random(i).choice(shuffled)
        assert task[i]["messages"] == [{"role": "user", "content": f"Spell the word: {w}"},
                                       {"role": "assistant", "content": f"{w}:{','.join(w)}"}]
    assert SimpleSpelling(1)[0]["messages"][1]["content"] in ("apple:a,p,p,l,e", "cherry:c,h,e,r,r,y", "kiwi:k,i,w,i")


def test_words_from_base_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("NANOCHAT_DATA_DIR", raising=False)
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    (tmp_path / "words_alpha.txt").write_text("abc\n")  # present: no download is attempted
    assert SimpleSpelling(1)[0]["messages"][1]["content"] == "abc:a,b,c"

# -----------------------------------------------------------------------------
# HumanEval

HE_ROW = {
    "task_id": "HumanEval/0",
    "prompt": "from typing import List\nimport math\n\n\ndef add(xs: List[int]) -> int:\n    \"\"\"Sum.\"\"\"\n",
    "canonical_solution": "    return sum(xs)\n",
    "test": "def check(candidate):\n    assert candidate([1, 2]) == 3\n    assert candidate([]) == 0\n",
    "entry_point": "add",
}


def test_humaneval_rendering(data_dir):
    hub(data_dir, "openai/openai_humaneval", "openai_humaneval", "test", [HE_ROW])
    conv = HumanEval()[0]
    assert conv["messages"][0]["content"] == HE_ROW["prompt"]
    assert conv["messages"][1]["content"] == HE_ROW["prompt"] + "\n" + HE_ROW["canonical_solution"]
    assert conv["entry_point"] == "add" and conv["test"] == HE_ROW["test"]
    assert extract_imports(HE_ROW["prompt"]) == "from typing import List\nimport math"
    assert extract_program("Here:\n```python\ndef f():\n    return 1\n```\nok") == "def f():\n    return 1"
    assert extract_program("  def f(): pass  ") == "def f(): pass"


@pytest.mark.skipif(importlib.util.find_spec("nanochat.execution") is None, reason="nanochat/execution.py not written yet")
def test_humaneval_evaluate(data_dir):
    hub(data_dir, "openai/openai_humaneval", "openai_humaneval", "test", [HE_ROW])
    task = HumanEval()
    conv = task[0]
    good = "```python\ndef add(xs: List[int]) -> int:\n    return sum(xs)\n```"
    bad = "def add(xs):\n    return 0"
    assert task.evaluate(conv, good) == 1
    assert task.evaluate(conv, bad) == 0

# -----------------------------------------------------------------------------
# Mixture specs

def parse(argv, default=("gsm8k", "identity:2", "spellingbee@30"), default_val=("gsm8k@2",)):
    p = argparse.ArgumentParser()
    mixtures.add_mixture_args(p, list(default), list(default_val))
    return mixtures.specs_from_args(p.parse_args(argv))


def test_parse_entry():
    assert mixtures.parse_entry("smoltalk") == ("smoltalk", None, 1)
    assert mixtures.parse_entry("identity:2") == ("identity", None, 2)
    assert mixtures.parse_entry("smoltalk@10000") == ("smoltalk", 10000, 1)
    assert mixtures.parse_entry("data/my@home.jsonl@50:3") == ("data/my@home.jsonl", 50, 3)
    for bad in ("nosuchsource", "identity:0", "my.txt:2"):
        with pytest.raises(ValueError):
            mixtures.parse_entry(bad)


def test_spec_flags():
    assert parse([]) == (["gsm8k", "identity:2", "spellingbee@30"], ["gsm8k@2"])
    train, _ = parse(["--add-data", "mine.jsonl:3", "--drop", "identity", "--cap", "spellingbee=5",
                      "--cap", "gsm8k=7"])
    assert train == ["gsm8k@7", "spellingbee@5", "mine.jsonl:3"]
    train, val = parse(["--mix", "smoltalk@100,arc_easy", "--val-mix", "smoltalk"])
    assert train == ["smoltalk@100", "arc_easy"] and val == ["smoltalk"]
    for argv in (["--drop", "smoltalk"], ["--cap", "smoltalk=3"], ["--cap", "gsm8k"], ["--mix", "bogus"]):
        with pytest.raises(ValueError):
            parse(argv)


def test_default_mixtures_are_the_documented_recipe():
    """The published nanochat recipe (github.com/karpathy/nanochat, scripts/mid_train.py and chat_sft.py),
    stated as source -> (rows, copies), rows None = all; compared through parse_entry, so order and
    spelling of the spec do not matter but every source, row count and copy count does."""
    def meaning(spec):
        parsed = [mixtures.parse_entry(e) for e in spec]
        return {name: (rows, copies) for name, rows, copies in parsed}, len(parsed)
    mid = {"smoltalk": (None, 1), "mmlu_aux": (None, 1), "gsm8k": (None, 1), "identity": (None, 2),
           "simplespelling": (200_000, 1), "spellingbee": (80_000, 1)}  # 460K + 100K + 8K + 2x1K + 280K rows
    sft = {"arc_easy": (None, 1), "arc_challenge": (None, 1), "gsm8k": (None, 1), "smoltalk": (10_000, 1),
           "identity": (None, 1), "simplespelling": (300, 1), "spellingbee": (300, 1)}  # about 23K rows
    assert meaning(mixtures.default_mid_sources()) == (mid, len(mid))
    assert meaning(mixtures.default_sft_sources()) == (sft, len(sft))


def test_build_mixture(data_dir, tmp_path):
    hub(data_dir, "openai/gsm8k", "main", "train", [{"question": f"q{i}", "answer": f"#### {i}"} for i in range(10)])
    hub(data_dir, "openai/gsm8k", "main", "test", [{"question": f"t{i}", "answer": f"#### {i}"} for i in range(4)])
    write_jsonl(data_dir / "identity_conversations.jsonl", [chat(2), chat(4)])
    (data_dir / "words_alpha.txt").write_text("cat\ndog\n")
    own = write_jsonl(tmp_path / "own.jsonl", [{"messages": chat(2)}])
    mix = mixtures.build_mixture(["gsm8k@6", "identity:2", "spellingbee@5", f"{own}:3"], split="train")
    assert len(mix) == 6 + 2 * 2 + 5 + 3
    users = [mix[i]["messages"][0]["content"] for i in range(len(mix))]
    assert sorted(u for u in users if u.startswith("q")) == sorted(f"q{j}" for j in perm(10)[:6])
    assert users.count("m0") == 2 * 2 + 3  # identity twice (2 convs) + own file 3 times
    val = mixtures.build_mixture(["gsm8k@2"], split="test")
    assert len(val) == 2 and all(val[i]["messages"][0]["content"].startswith("t") for i in range(2))


def test_unloadable_source_error(data_dir):
    with pytest.raises(mixtures.SourceUnavailable, match="(?s)'mmlu_aux'.*auxiliary_train.jsonl.*--drop mmlu_aux"):
        mixtures.build_mixture(["mmlu_aux"])
    with pytest.raises(mixtures.SourceUnavailable, match="(?s)missing.jsonl.*--drop"):
        mixtures.build_mixture(["missing.jsonl"])

# -----------------------------------------------------------------------------
# The real offline mirror

@pytest.mark.skipif(not os.path.isdir(os.path.join(SHARED, "hub")), reason="shared data mirror not present")
def test_real_mirror(monkeypatch, tmp_path):
    monkeypatch.setenv("NANOCHAT_DATA_DIR", SHARED)
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    assert len(ARC("ARC-Easy", "train")) == 2251
    gsm = GSM8K("main", "train")
    assert len(gsm) == 7473
    conv = gsm[0]
    assert gsm.evaluate(conv, conv["messages"][1]["content"][-1]["text"]) == 1
    assert len(MMLU("all", "dev")) == 285
