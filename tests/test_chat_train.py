"""
The chat training stages end to end on the tiny offline workspace (scripts.mid_train, scripts.chat_sft):
loss goes down, resume after a save reproduces the uninterrupted run exactly, DFT runs and logs
p(correct), an unloadable mixture source stops the run before training, two gloo ranks that run out
of data at different times stop on the same step, and the categorical accuracy used by chat_sft's
metrics matches a one-problem-at-a-time evaluation on the fixture's MMLU / ARC rows.
"""

import json
import math
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import REPO, run_module, script_env, write_jsonl

MID_ARGS = ["--max-seq-len=64", "--device-batch-size=4", "--total-batch-size=256", "--eval-tokens=512"]
SFT_ARGS = ["--max-seq-len=64", "--device-batch-size=4", "--target-examples-per-step=8", "--eval-steps=2",
            "--eval-metrics-every=-1", "--eval-metrics-max-problems=8"]
VOLATILE = ("dt ", "tok/s ", "mfu ", "eta ")  # timing fields of the step line


@pytest.fixture(autouse=True)
def pinned_peak_flops(monkeypatch):
    """The scripts inherit it: no 1 s matmul probe at start and at each evaluation."""
    monkeypatch.setenv("NANOCHAT_PEAK_FLOPS", "1e11")


def step_lines(out):
    """{step: the step line without its timing fields} for every training step logged."""
    lines = {}
    for line in out.splitlines():
        m = re.match(r"step (\d+)/\d+ ", line)
        if m:
            lines[int(m.group(1))] = [f for f in line.split(" | ") if not f.startswith(VOLATILE)]
    return lines


def val_values(out, what):
    """{step: value} of the 'step N | val bpb X' / 'step N | val loss X' lines."""
    return {int(m.group(1)): float(m.group(2)) for m in re.finditer(rf"^step (\d+) \| {what} ([0-9.]+)", out, re.M)}


def load_weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_mid_train_lowers_loss_and_resumes_exactly(fresh_model_base_dir, tiny_data_dir):
    base = fresh_model_base_dir
    # one epoch of the mixture (num-iterations -1): the loader's progress drives the LR and the stop
    args = MID_ARGS + ["--mix", "smoltalk@100,gsm8k@8,identity:2", "--val-mix", "smoltalk@16", "--eval-every=4",
                       "--save-every=4"]
    full = run_module("scripts.mid_train", args, base, tiny_data_dir).stdout
    steps = step_lines(full)
    last = max(steps) + 1
    assert sorted(steps) == list(range(last)) and last >= 8, full[-2000:]
    assert any(f.startswith("progress") for f in steps[0])
    assert f"saved checkpoint step {last} to" in full
    bpb = val_values(full, "val bpb")
    assert bpb[last] < bpb[0] - 0.3, bpb
    ckpt_dir = os.path.join(base, "mid_checkpoints", "d2")
    final_weights = load_weights(os.path.join(ckpt_dir, f"model_{last:06d}.pt"))
    meta = json.load(open(os.path.join(ckpt_dir, f"meta_{last:06d}.json")))
    assert meta["step"] == last and meta["model_config"]["window_pattern"] == "L"
    assert meta["val_bpb"] == pytest.approx(bpb[last], abs=1e-6)  # the final evaluation, not the one before

    # resume from the step-4 save (as after a kill): the same steps, losses, val bpb and final weights
    resumed = run_module("scripts.mid_train", args + ["--resume-from-step=4"], base, tiny_data_dir).stdout
    assert "resumed from step 4" in resumed
    rsteps = step_lines(resumed)
    assert sorted(rsteps) == list(range(4, last))
    for s in range(4, last):
        assert rsteps[s] == steps[s], (s, rsteps[s], steps[s])
    assert val_values(resumed, "val bpb") == {s: v for s, v in bpb.items() if s >= 4}
    assert_same_weights(load_weights(os.path.join(ckpt_dir, f"model_{last:06d}.pt")), final_weights)


def test_mid_train_meta_is_strict_json_before_any_evaluation(fresh_model_base_dir, tiny_data_dir):
    """A save before the first evaluation has no minimum val bpb yet: null, never `Infinity`."""
    base = fresh_model_base_dir
    out = run_module("scripts.mid_train", MID_ARGS + ["--mix", "smoltalk@40", "--val-mix", "smoltalk@8",
                                                      "--num-iterations=3", "--eval-every=-1", "--save-every=2"],
                     base, tiny_data_dir).stdout
    ckpt_dir = os.path.join(base, "mid_checkpoints", "d2")
    meta = strict_json_load(os.path.join(ckpt_dir, "meta_000002.json"))
    assert meta["val_bpb"] is None and meta["loop_state"]["min_val_bpb"] is None
    final = strict_json_load(os.path.join(ckpt_dir, "meta_000003.json"))  # --eval-every=-1: only the end-of-run one
    assert val_values(out, "val bpb") == {3: pytest.approx(final["val_bpb"], abs=1e-6)}
    assert final["loop_state"]["min_val_bpb"] == final["val_bpb"]


def test_chat_sft_lowers_loss_and_resumes_exactly(chat_base_dir, tiny_data_dir):
    base = chat_base_dir  # holds a tiny mid checkpoint (d2, step 3): the default --source=mid
    args = SFT_ARGS + ["--num-iterations=8", "--eval-every=4", "--save-every=4", "--init-lr-frac=0.5",
                       "--eval-metrics-every=8",
                       "--mix", "smoltalk@64,identity", "--val-mix", "smoltalk@16"]
    full = run_module("scripts.chat_sft", args, base, tiny_data_dir).stdout
    assert "loading mid model d2 step 3" in full
    steps = step_lines(full)
    assert sorted(steps) == list(range(8))
    assert all(any(f.startswith("sup tokens") for f in fields) for fields in steps.values())
    val = val_values(full, "val loss")
    assert sorted(val) == [0, 4, 8] and val[8] < val[0] - 0.3, val
    ckpt_dir = os.path.join(base, "chatsft_checkpoints", "d2")
    final_weights = load_weights(os.path.join(ckpt_dir, "model_000008.pt"))
    meta = json.load(open(os.path.join(ckpt_dir, "meta_000008.json")))
    assert meta["val_loss"] == pytest.approx(val[8], abs=1e-6)  # the final evaluation, not the one before
    assert 0.0 <= meta["mmlu_acc"] <= 1.0 and 0.0 <= meta["arc_easy_acc"] <= 1.0  # metrics at the last step
    assert re.search(r"step 00008 \| mmlu_acc [0-9.]+ \| arc_easy_acc [0-9.]+", full)

    resumed = run_module("scripts.chat_sft", args + ["--resume-from-step=4"], base, tiny_data_dir).stdout
    assert "resumed from step 4" in resumed
    rsteps = step_lines(resumed)
    assert sorted(rsteps) == [4, 5, 6, 7]
    for s in rsteps:
        assert rsteps[s] == steps[s], (s, rsteps[s], steps[s])
    assert val_values(resumed, "val loss") == {4: val[4], 8: val[8]}
    assert_same_weights(load_weights(os.path.join(ckpt_dir, "model_000008.pt")), final_weights)


def test_chat_sft_dft_runs_and_logs_p_correct(chat_base_dir, tiny_data_dir):
    out = run_module("scripts.chat_sft", SFT_ARGS + ["--num-iterations=3", "--eval-every=-1", "--loss=dft",
                                                     "--dft-alpha=0.7", "--mix", "smoltalk@40,identity",
                                                     "--val-mix", "smoltalk@8", "--pad-multiple=32"],
                     chat_base_dir, tiny_data_dir).stdout
    assert "loss: dft (alpha 0.7)" in out
    assert "batch rows padded to multiples of 32 tokens" in out
    steps = step_lines(out)
    assert sorted(steps) == [0, 1, 2]
    for fields in steps.values():
        p = float(next(f for f in fields if f.startswith("p(correct)")).split()[-1])
        loss = float(next(f for f in fields if f.startswith("loss")).split()[-1])
        tokens = int(next(f for f in fields if f.startswith("sup tokens")).split()[-1].replace(",", ""))
        assert 0.0 < p < 1.0 and tokens > 0
        # w = 0.7 p + 0.3 <= 1 and CE of a fresh model is about ln(V): the weighted loss is below CE
        assert 0.0 < loss < 0.98 * math.log(384)
    assert os.path.exists(os.path.join(chat_base_dir, "chatsft_checkpoints", "d2", "model_000003.pt"))
    # --eval-metrics-every=-1: no MMLU/ARC at all, not even at the end; the meta still names every figure
    assert "mmlu_acc" not in out and "arc_easy_acc" not in out
    meta = strict_json_load(os.path.join(chat_base_dir, "chatsft_checkpoints", "d2", "meta_000003.json"))
    assert meta["mmlu_acc"] is None and meta["arc_easy_acc"] is None
    assert meta["val_loss"] == pytest.approx(val_values(out, "val loss")[3], abs=1e-6)  # the end-of-run val loss


def test_chat_sft_compiled_traces_once_for_every_row_length(chat_base_dir, tiny_data_dir):
    # --compile=1: batches of different lengths go through one dynamic-shape graph (no recompilation), and the
    # steps' losses equal the eager run's (fp32 both: only the kernels differ)
    args = SFT_ARGS + ["--num-iterations=4", "--eval-every=-1", "--mix", "smoltalk@40", "--val-mix", "smoltalk@8",
                       "--output-tag=compiled"]
    logs = {flag: run_module("scripts.chat_sft", args + [f"--compile={flag}"], chat_base_dir, tiny_data_dir,
                             TORCH_LOGS="recompiles").stdout for flag in (0, 1)}
    assert "compile=1" in logs[1] and "compile=0" in logs[0]
    assert "Recompiling" not in logs[1], logs[1][-3000:]
    losses = {flag: [float(next(f for f in fields if f.startswith("loss")).split()[-1])
                     for _, fields in sorted(step_lines(out).items())] for flag, out in logs.items()}
    assert len(losses[1]) == 4
    assert losses[1] == pytest.approx(losses[0], abs=2e-4)


def strict_json_load(path):
    with open(path) as f:
        return json.loads(f.read(), parse_constant=lambda c: pytest.fail(f"{path} is not strict JSON: {c}"))


def test_chat_sft_metrics_skip_problems_longer_than_the_model_takes(tmp_path, chat_base_dir, tiny_data_dir):
    """The tiny model takes 640 tokens (10 x its context of 64): three MMLU problems far longer are
    skipped and counted instead of crashing the end-of-run evaluation."""
    data = str(tmp_path / "data")
    shutil.copytree(tiny_data_dir, data, ignore=shutil.ignore_patterns("pretrain", "eval_bundle"))
    mmlu = os.path.join(data, "hub", "cais", "mmlu", "all", "test.jsonl")
    with open(mmlu, "a") as f:
        for i in range(3):
            f.write(json.dumps({"question": "What is " + " ".join(["apple river"] * 500) + f" {i}?",
                                "subject": "math", "choices": ["1", "2", "3", "4"], "answer": 1}) + "\n")
    out = run_module("scripts.chat_sft", SFT_ARGS + ["--num-iterations=2", "--eval-every=-1", "--eval-metrics-every=2",
                                                     "--eval-metrics-max-problems=100", "--mix", "smoltalk@16",
                                                     "--val-mix", "smoltalk@8"], chat_base_dir, data).stdout
    assert re.search(r"step 00002 \| mmlu_acc [0-9.]+ \| arc_easy_acc [0-9.]+ \| skipped \(longer than 640 tokens\): "
                     r"mmlu_acc 3, arc_easy_acc 0", out), out[-3000:]
    meta = strict_json_load(os.path.join(chat_base_dir, "chatsft_checkpoints", "d2", "meta_000002.json"))
    assert 0.0 <= meta["mmlu_acc"] <= 1.0 and 0.0 <= meta["arc_easy_acc"] <= 1.0
    assert meta["skipped_problems"] == {"mmlu_acc": 3, "arc_easy_acc": 0}
    with open(os.path.join(chat_base_dir, "report", "chat-sft.md")) as f:
        report = f.read()
    assert re.search(r"MMLU problems skipped \(too long\)\W+3", report), report


def test_unloadable_source_stops_before_training(tmp_path, fresh_model_base_dir, tiny_data_dir):
    # a mirror without MMLU auxiliary_train: the default mid mixture cannot be built
    data = str(tmp_path / "data")
    shutil.copytree(tiny_data_dir, data,
                    ignore=shutil.ignore_patterns("pretrain", "eval_bundle", "auxiliary_train.jsonl"))
    proc = run_module("scripts.mid_train", MID_ARGS, fresh_model_base_dir, data, check=False)
    assert proc.returncode != 0
    assert "'mmlu_aux'" in proc.stdout and "--drop mmlu_aux" in proc.stdout, proc.stdout[-2000:]
    assert "Traceback" not in proc.stdout and "loading base model" not in proc.stdout
    # a user's file that does not exist, added to the SFT mixture
    missing = str(tmp_path / "mine.jsonl")
    proc = run_module("scripts.chat_sft", SFT_ARGS + ["--source=base", f"--add-data={missing}:2"],
                      fresh_model_base_dir, tiny_data_dir, check=False)
    assert proc.returncode != 0
    assert missing in proc.stdout and f"--drop {missing}" in proc.stdout, proc.stdout[-2000:]
    assert "Traceback" not in proc.stdout and "loading base model" not in proc.stdout


def conversation(words):
    return [{"role": "user", "content": "Who are you?"},
            {"role": "assistant", "content": " ".join(["I am nanochat"] * words)}]


def write_rank_skewed_mixture(path, n=24):
    """
    A JSONL whose seed-42 mixture order puts short conversations at even positions (rank 0's share)
    and long ones at odd positions (rank 1's): rank 0 packs several per row, rank 1 one per row, so
    rank 0 finishes its half of the epoch steps before rank 1 does.
    """
    from tasks.mixtures import build_mixture
    write_jsonl(path, [conversation(k + 1) for k in range(n)])  # row k is recognisable by its length
    position_of = {len(build_mixture([path], "train")[i]["messages"][1]["content"].split()) // 3 - 1: i
                   for i in range(n)}
    write_jsonl(path, [conversation(1 if position_of[k] % 2 == 0 else 12) for k in range(n)])
    return build_mixture([path], "train")


@pytest.mark.slow
def test_two_rank_mid_run_ends_on_the_same_step(tmp_path, fresh_model_base_dir, tiny_data_dir):
    from nanochat.chat_loader import MidPacker
    from nanochat.tokenizer import RustBPETokenizer
    jsonl = str(tmp_path / "skewed.jsonl")
    ds = write_rank_skewed_mixture(jsonl)
    # when would each rank alone run out of its share of the epoch? (the real packer, simulated here)
    tok = RustBPETokenizer.from_directory(os.path.join(fresh_model_base_dir, "tokenizer"))
    finish = []
    for rank in range(2):
        packer = MidPacker(ds, tok, 4, 64, rank=rank, world_size=2)
        n = 0
        while packer.progress < 1.0:
            next(packer)
            n += 1
        finish.append(n)
    assert finish[0] < finish[1], finish
    expected_last = finish[0]  # the rank that finished its share stops everybody
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "scripts.mid_train", "--", *MID_ARGS, "--total-batch-size=512", "--eval-every=-1",
           "--mix", jsonl, "--val-mix", jsonl]
    proc = subprocess.run(cmd, cwd=REPO, env=script_env(fresh_model_base_dir, tiny_data_dir), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert "world size: 2" in proc.stdout
    assert sorted(step_lines(proc.stdout)) == list(range(expected_last))
    ckpt_dir = os.path.join(fresh_model_base_dir, "mid_checkpoints", "d2")
    # both ranks reached the final save on the same step (each writes its own optimizer/loader state)
    assert sorted(os.listdir(ckpt_dir)) == sorted([f"meta_{expected_last:06d}.json", f"model_{expected_last:06d}.pt",
                                                   f"optim_{expected_last:06d}_rank0.pt",
                                                   f"optim_{expected_last:06d}_rank1.pt"])
    progress = []
    for rank in range(2):
        state = torch.load(os.path.join(ckpt_dir, f"optim_{expected_last:06d}_rank{rank}.pt"), weights_only=True)
        progress.append(state["loader"]["consumed"] / len(ds))
    assert progress[0] >= 1.0 > progress[1], progress  # rank 0 ran out first, rank 1 stopped with it


def test_categorical_eval_on_fixture_rows(monkeypatch, tiny_base_checkpoint_dir, tiny_data_dir):
    """run_categorical_eval (chat_sft's MMLU / ARC-Easy metrics) against per-problem argmax and constant answers."""
    from nanochat.model_loader import load_model
    from nanochat.task_eval import run_categorical_eval
    from tasks.arc import ARC
    from tasks.mmlu import MMLU
    monkeypatch.setenv("NANOCHAT_BASE_DIR", tiny_base_checkpoint_dir)
    monkeypatch.setenv("NANOCHAT_DATA_DIR", tiny_data_dir)
    model, tok, _ = load_model("base", torch.device("cpu"), phase="eval")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a fresh model's head is ~0: random weights give it opinions
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * 3 / math.sqrt(p.size(1)))
    prefix_model = PrefixHash(tok.get_vocab_size())  # its answer surely changes from problem to problem
    for task in (MMLU("all", "test"), ARC("ARC-Easy", "test")):
        for m in (model, prefix_model):
            # one problem at a time, no padding: the letter with the largest logit after <|assistant_start|>
            picks = [_argmax_letter(m, tok, task[i]) for i in range(len(task))]
            expected = sum(task.evaluate(task[i], picks[i]) for i in range(len(task))) / len(task)
            acc = run_categorical_eval(task, tok, m, batch_size=5, device=torch.device("cpu"))
            assert acc == pytest.approx(expected)
            expected7 = sum(task.evaluate(task[i], picks[i]) for i in range(7)) / 7
            assert run_categorical_eval(task, tok, m, batch_size=3, max_problems=7) == pytest.approx(expected7)
            if m is prefix_model:
                assert len(set(picks)) > 1

    # a model that always answers one letter scores the fraction of problems whose key is that letter:
    # the fixture's MMLU answers are all index 1 ("B"), its ARC keys cycle A, B, C, D
    for letter, task, expected in (("B", MMLU("all", "test"), 1.0), ("A", MMLU("all", "test"), 0.0),
                                   ("A", ARC("ARC-Easy", "test"), 0.25), ("D", ARC("ARC-Easy", "test"), 0.25)):
        assert run_categorical_eval(task, tok, ConstantLetter(tok.encode(letter)[0], tok.get_vocab_size()),
                                    batch_size=4) == pytest.approx(expected)


def _argmax_letter(model, tok, conv):
    with torch.no_grad():
        logits = model(torch.tensor([tok.render_for_completion(conv)]))[0, -1]
    return conv["letters"][int(logits[[tok.encode(c)[0] for c in conv["letters"]]].argmax())]


class ConstantLetter(torch.nn.Module):
    def __init__(self, token, vocab_size):
        super().__init__()
        self.token, self.vocab_size = token, vocab_size
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, idx):
        logits = torch.zeros(*idx.shape, self.vocab_size)
        logits[..., self.token] = 1.0
        return logits


class PrefixHash(torch.nn.Module):
    """Causal toy model: the logits at position t are a fixed function of the tokens up to t."""

    def __init__(self, vocab_size):
        super().__init__()
        self.vocab_size = vocab_size
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, idx):
        h = (idx.double() * 0.7549).cumsum(dim=1)  # (B, T)
        return torch.sin(h.unsqueeze(-1) * torch.arange(1, self.vocab_size + 1, dtype=torch.float64)).float()
