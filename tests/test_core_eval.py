"""CORE scoring of each task type on a tiny handmade bundle, with a bigram model the test controls."""

import os
import json
import math
import random

import pytest
import torch
import torch.nn as nn

from nanochat import core_eval
from nanochat.core_eval import evaluate_core, evaluate_task, prepare_item, render_prompts_lm, render_prompts_mc

BOS = 128


class CharTokenizer:
    """One token per ASCII character, BOS = 128: token spans are easy to reason about by hand."""
    def get_bos_token_id(self):
        return BOS

    def encode(self, text, prepend=None):
        head = [] if prepend is None else [prepend]
        if isinstance(text, list):
            return [head + [ord(c) for c in t] for t in text]
        return head + [ord(c) for c in text]


class Bigram(nn.Module):
    """logits[b, t] = table[idx[b, t]]: the next-token preference depends only on the current token."""
    def __init__(self, favoured=(), default=None):
        super().__init__()
        self.table = torch.zeros(129, 129)
        if default is not None:
            self.table[:, ord(default)] = 5.0
        for prev, nxt in favoured:
            self.table[ord(prev), ord(nxt)] = 5.0

    def forward(self, idx, positions=None):  # positions: GPT.forward's (rows, cols), logits only there
        logits = self.table[idx]  # (B, T, V)
        return logits if positions is None else logits[positions]


def write_bundle(root, tasks, baselines, data):
    """tasks: [(label, uri, type, shots)]; data: {uri: rows} (a uri absent from data has no file)."""
    os.makedirs(root / "eval_data", exist_ok=True)
    lines = ["icl_tasks:"]
    for label, uri, kind, shots in tasks:
        lines += ["-", f"  label: {label}", f"  dataset_uri: {uri}", f"  num_fewshot: [{shots}]",
                  f"  icl_task_type: {kind}", '  continuation_delimiter: " "']
    (root / "core.yaml").write_text("\n".join(lines) + "\n")
    csv = ["Eval Task,Task Category,Task Type,#shots,#datapoints,Random baseline,Centered Metric?,Description"]
    csv += [f'{label},cat,type,0,1,{baselines[label]},,"desc, with comma"' for label, *_ in tasks]
    (root / "eval_meta_data.csv").write_text("\n".join(csv) + "\n")
    for uri, rows in data.items():
        path = root / "eval_data" / uri
        os.makedirs(path.parent, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))


MC_ROWS = [  # the model favours "a" after anything: the choice with more a's wins
    {"query": "q1", "choices": ["aaa", "bbb"], "gold": 0},     # correct
    {"query": "q2", "choices": ["bab", "aaa", "bbb"], "gold": 1},  # correct
    {"query": "q3", "choices": ["aa", "bb"], "gold": 1},       # wrong
    {"query": "q4", "choices": ["ba", "bb"], "gold": 0},       # correct (common prefix "b" not scored)
]
SCHEMA_ROWS = [  # the model favours " " only after "x": the context ending in x wins
    {"context_options": ["it was x", "it was y"], "continuation": "ok", "gold": 0},  # correct
    {"context_options": ["ay", "bx"], "continuation": "ok", "gold": 0},              # wrong
    {"context_options": ["y", "zz", "x"], "continuation": "ok", "gold": 2},          # correct
]
LM_ROWS = [  # greedy chain: q -> " " -> a -> b
    {"context": "  q ", "continuation": "ab"},  # correct (the context is stripped)
    {"context": "q", "continuation": "ac"},     # wrong (the model says b after a)
    {"context": "zq", "continuation": "a"},     # correct
    {"context": "q", "continuation": "ba"},     # wrong
    {"context": "r", "continuation": "ab"},     # wrong (no preference after r: argmax is token 0)
]
BIGRAM = Bigram(favoured=[("x", " "), ("q", " "), (" ", "a"), ("a", "b")], default=None)
MC_MODEL = Bigram(default="a")


def test_prompt_rendering_matches_reference_layout():
    shots = [{"query": "Q1", "choices": ["x", "y"], "gold": 1}, {"query": "Q2", "choices": ["z"], "gold": 0}]
    assert render_prompts_mc({"query": "Q", "choices": ["c1", "c2"]}, "\nA: ", shots) == [
        "Q1\nA: y\n\nQ2\nA: z\n\nQ\nA: c1", "Q1\nA: y\n\nQ2\nA: z\n\nQ\nA: c2"]
    lm_shot = [{"context": " ctx1 ", "continuation": "cont1"}]
    assert render_prompts_lm({"context": " c ", "continuation": "d"}, " ", lm_shot) == [
        "ctx1 cont1\n\nc", "ctx1 cont1\n\nc d"]


def test_fewshot_sampling_and_spans():
    data = [{"query": f"q{i}", "choices": ["aa", "ab"], "gold": i % 2} for i in range(6)]
    meta = {"task_type": "multiple_choice", "num_fewshot": 2, "continuation_delimiter": " "}
    rows, spans, gold = prepare_item(3, data, CharTokenizer(), meta)
    picks = random.Random(1234 + 3).sample([0, 1, 2, 4, 5], 2)  # the reference draw
    text = "".join(f"q{i} {data[i]['choices'][data[i]['gold']]}\n\n" for i in picks) + "q3 a"
    assert rows[0] == [BOS] + [ord(c) for c in text + "a"]
    assert spans == [(len(rows[0]) - 1, len(rows[0]))] * 2 and gold == 1  # only the last char differs
    # max_seq_len crops from the left and shifts the spans
    rows_c, spans_c, _ = prepare_item(3, data, CharTokenizer(), meta, max_seq_len=5)
    assert rows_c[0] == rows[0][-5:] and spans_c == [(4, 5)] * 2


@pytest.mark.parametrize("batch_tokens", [1, 8192])  # one item per forward vs all items in one batch
def test_each_task_type_scored_by_hand(batch_tokens):
    tok = CharTokenizer()
    mc = {"task_type": "multiple_choice", "num_fewshot": 0, "continuation_delimiter": " "}
    assert evaluate_task(MC_MODEL, tok, MC_ROWS, "cpu", mc, batch_tokens=batch_tokens) == 0.75
    schema = {"task_type": "schema", "num_fewshot": 0, "continuation_delimiter": " "}
    assert math.isclose(evaluate_task(BIGRAM, tok, SCHEMA_ROWS, "cpu", schema, batch_tokens=batch_tokens), 2 / 3)
    lm = {"task_type": "language_modeling", "num_fewshot": 0, "continuation_delimiter": " "}
    assert evaluate_task(BIGRAM, tok, LM_ROWS, "cpu", lm, batch_tokens=batch_tokens) == 0.4
    # few-shot context does not change a bigram model's answers at the scored positions
    lm3 = dict(lm, num_fewshot=3)
    assert evaluate_task(BIGRAM, tok, LM_ROWS, "cpu", lm3, batch_tokens=batch_tokens) == 0.4


def test_mc_loss_is_mean_over_answer_tokens():
    """'aa' has the lower mean loss per token but the higher total than 'c': the mean must decide."""
    model = Bigram()
    model.table[:, ord("a")] = 2.0  # loss(a) = lse - 2 = 2.93, loss(c) = lse - 1.5 = 3.43 < 2 * loss(a)
    model.table[:, ord("c")] = 1.5
    rows = [{"query": "q", "choices": ["c", "aa"], "gold": 1}, {"query": "q", "choices": ["aa", "c"], "gold": 0}]
    mc = {"task_type": "multiple_choice", "num_fewshot": 0, "continuation_delimiter": " "}
    assert evaluate_task(model, CharTokenizer(), rows, "cpu", mc) == 1.0


def test_evaluate_core_centering_mean_and_missing(tmp_path, capsys):
    tasks = [("mc_task", "a/mc.jsonl", "multiple_choice", 0), ("schema_task", "b/schema.jsonl", "schema", 0),
             ("lm_task", "c/lm.jsonl", "language_modeling", 0), ("gone_task", "c/gone.jsonl", "language_modeling", 10)]
    baselines = {"mc_task": 25, "schema_task": 50, "lm_task": 0, "gone_task": 0}
    write_bundle(tmp_path, tasks, baselines, {"a/mc.jsonl": MC_ROWS, "b/schema.jsonl": SCHEMA_ROWS,
                                              "c/lm.jsonl": LM_ROWS})

    class Both(nn.Module):  # MC rows start with "q": use the MC model there, the bigram elsewhere
        def forward(self, idx, positions=None):
            is_mc = (idx[:, 1] == ord("q")) & (idx[:, 2] != ord(" "))
            logits = torch.where(is_mc[:, None, None], MC_MODEL(idx), BIGRAM(idx))
            return logits if positions is None else logits[positions]

    out = evaluate_core(Both(), CharTokenizer(), "cpu", bundle_dir=str(tmp_path))
    assert out["missing"] == ["gone_task"]
    assert "gone_task" in capsys.readouterr().out  # reported by name, not silently
    assert out["results"] == pytest.approx({"mc_task": 0.75, "schema_task": 2 / 3, "lm_task": 0.4})
    expected = {"mc_task": (0.75 - 0.25) / 0.75, "schema_task": (2 / 3 - 0.5) / 0.5, "lm_task": 0.4}
    assert out["centered"] == pytest.approx(expected)
    assert out["core"] == pytest.approx(sum(expected.values()) / 3)

    # max_per_task keeps the first k items after the Random(1337) shuffle
    out2 = evaluate_core(Both(), CharTokenizer(), "cpu", max_per_task=2, bundle_dir=str(tmp_path))
    lm = list(LM_ROWS)
    random.Random(1337).shuffle(lm)
    lm_correct = {"ab": {"  q "}, "a": {"zq"}}
    expected_lm = sum(r["context"] in lm_correct.get(r["continuation"], ()) for r in lm[:2]) / 2
    assert out2["results"]["lm_task"] == expected_lm


def test_bundle_location(tmp_path, monkeypatch):
    data_dir = tmp_path / "data"
    write_bundle(data_dir / "eval_bundle", [("t", "t.jsonl", "schema", 0)], {"t": 50}, {"t.jsonl": SCHEMA_ROWS})
    monkeypatch.setenv("NANOCHAT_DATA_DIR", str(data_dir))
    assert core_eval.get_bundle_dir() == str(data_dir / "eval_bundle")
    # without a mirror: the zip is fetched once (here a fake download) and unzipped into $BASE/eval_bundle
    monkeypatch.delenv("NANOCHAT_DATA_DIR")
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    import shutil
    zip_src = shutil.make_archive(str(tmp_path / "src"), "zip", root_dir=str(data_dir), base_dir="eval_bundle")
    calls = []

    def fake_download(url, path, postprocess=None):
        calls.append(url)
        shutil.copy(zip_src, path)
        postprocess(path)
        return path

    monkeypatch.setattr(core_eval, "download_file_with_lock", fake_download)
    d = core_eval.get_bundle_dir()
    assert d == str(tmp_path / "base" / "eval_bundle") and os.path.exists(os.path.join(d, "core.yaml"))
    assert core_eval.get_bundle_dir() == d and calls == [core_eval.EVAL_BUNDLE_URL]
    assert [t[0] for t in core_eval.load_bundle(d)] == ["t"]


@pytest.mark.parametrize("name,damage,expect", [
    ("core.yaml", lambda p: p.write_text("icl_tasks: [\n  - {label: x"), "is not valid YAML"),
    ("core.yaml", lambda p: p.write_text("- just\n- a list\n"), "a task entry lacks a field"),
    ("core.yaml", lambda p: p.write_text(p.read_text().replace("multiple_choice", "essay")), "unknown icl_task_type"),
    ("core.yaml", lambda p: (p.unlink(), os.mkfifo(p)), "is a named pipe"),
    ("eval_meta_data.csv", lambda p: p.write_text("Task,Baseline\nmc,25\n"), "'Eval Task' and 'Random baseline'"),
    ("eval_meta_data.csv", lambda p: p.write_bytes(b"\xff\xfe" * 100), "'Eval Task' and 'Random baseline'"),
    ("eval_data/mc.jsonl", lambda p: p.write_text(json.dumps(MC_ROWS[0]) + "\n" + "[" * 100_000 + "\n"),
     "mc.jsonl:2: malformed row: nested too deeply"),
    ("eval_data/mc.jsonl", lambda p: p.write_text(json.dumps({**MC_ROWS[0], "gold": 2}) + "\n"),
     "mc.jsonl:1: malformed row: 'gold' must index the 2 choices, got 2"),
    ("eval_data/mc.jsonl", lambda p: p.write_text(json.dumps({"choices": ["a"], "gold": 0}) + "\n"),
     "mc.jsonl:1: malformed row: a multiple_choice row is an object with string fields query"),
])
def test_damaged_bundle_file_is_one_line_naming_it(tmp_path, name, damage, expect):
    from nanochat.files import InputFileError
    write_bundle(tmp_path, [("mc", "mc.jsonl", "multiple_choice", 0)], {"mc": 25.0}, {"mc.jsonl": MC_ROWS})
    damage(tmp_path / name)
    with pytest.raises(InputFileError, match=expect) as e:
        [core_eval.load_task_data(path, meta["task_type"]) for _, meta, path, _ in core_eval.load_bundle(str(tmp_path))]
    assert str(e.value).startswith(str(tmp_path / name)) and "\n" not in str(e.value)


@pytest.mark.skipif(not os.path.isdir(os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "eval_bundle")),
                    reason="shared offline bundle not present")
def test_shared_bundle_parses():
    d = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "eval_bundle")
    tasks = core_eval.load_bundle(d)
    assert len(tasks) == 20 and tasks[0][0] == "hellaswag_zeroshot"
    assert all(os.path.exists(t[2]) for t in tasks)
    jeopardy = dict((t[0], t[1]) for t in tasks)["jeopardy"]
    assert jeopardy["continuation_delimiter"] == "\nAnswer: " and jeopardy["num_fewshot"] == 10


def _dist_worker(rank, world, store, out_dir):
    import torch.distributed as dist
    from nanochat.loss_eval import evaluate_bpb
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    lm = {"task_type": "language_modeling", "num_fewshot": 0, "continuation_delimiter": " "}
    acc = evaluate_task(BIGRAM, CharTokenizer(), LM_ROWS, "cpu", lm)
    # bpb: each rank sees different targets; the result must be the global ratio
    token_bytes = torch.tensor([0, 1, 2, 3], dtype=torch.int32)
    y = torch.tensor([[1, 2]]) if rank == 0 else torch.tensor([[3, 0]])

    class NLL(nn.Module):
        def forward(self, x, y, loss_reduction="mean"):
            return torch.full(y.shape, float(rank + 1)).reshape(-1)

    bpb = evaluate_bpb(NLL(), iter([(y, y)]), 1, token_bytes)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"acc": acc, "bpb": bpb}, f)
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_gloo(tmp_path):
    import torch.multiprocessing as mp
    mp.spawn(_dist_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    expected_bpb = (1 + 1 + 2) / (math.log(2) * (1 + 2 + 3))  # rank 1's special token counts nothing
    for rank in range(2):
        res = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert res["acc"] == 0.4  # items split by rank, all-reduced: same as one process
        assert res["bpb"] == pytest.approx(expected_bpb)
