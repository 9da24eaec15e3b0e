"""
The whole pipeline at toy scale, run as a user runs it (`python -m ...`, the runcpu recipe in miniature):
report reset, tokenizer train/eval, base train/loss/eval, mid train + chat eval, SFT + chat eval, the
report card and one chat reply. Everything reads the generated offline workspace of conftest
(`tiny_data_dir`) and writes into a fresh NANOCHAT_BASE_DIR; each stage is kept tiny (d2, seq 64, a few
steps) so the whole test takes about a minute or two on 2 cores.
"""

import os
import re
import sys
import time
import subprocess

import pytest

from conftest import run_module, script_env

pytestmark = pytest.mark.slow

SECTION_FILES = ["tokenizer-training.md", "tokenizer-evaluation.md", "base-model-training.md", "base-model-loss.md",
                 "base-model-evaluation.md", "midtraining.md", "chat-evaluation-mid.md", "chat-sft.md",
                 "chat-evaluation-sft.md"]
SPECIAL = ["<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>",
           "<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PROMPT = "What is 2 plus 3?"
REPLY_MAX_TOKENS = 24

# The chat mixtures of the tiny workspace: every default source, each capped small, except the chat
# stand-in (200 "What is a plus b?" conversations): 30 mid steps on it teach the d2 model the chat format,
# so the final reply really ends its turn with <|assistant_end|>.
MID_MIX = "smoltalk,identity:2,mmlu_aux@16,gsm8k@16,simplespelling@16,spellingbee@16"
SFT_MIX = "arc_easy@16,arc_challenge@16,gsm8k@16,smoltalk@100,identity,simplespelling@16,spellingbee@16"

# (stage name, module, args); run in this order. Every model stage is pinned to the CPU, so the run
# (and the greedy reply checked at the end) is the same on a machine with a GPU.
CPU = "--device-type=cpu"
STAGES = [
    ("report-reset", "nanochat.report", ["reset"]),
    ("tok_train", "scripts.tok_train", ["--vocab-size=384", "--max-chars=200000"]),
    ("tok_eval", "scripts.tok_eval", ["--fetch-timeout=2"]),
    ("base_train", "scripts.base_train", [
        "--depth=2", "--head-dim=32", "--aspect-ratio=32", "--max-seq-len=64", "--window-pattern=L",
        "--device-batch-size=4", "--total-batch-size=512", "--num-iterations=20", "--warmup-steps=2",
        "--eval-every=10", "--eval-tokens=1024", "--core-metric-every=20", "--core-metric-max-per-task=4",
        "--sample-every=-1", CPU]),
    ("base_loss", "scripts.base_loss", ["--device-batch-size=4", "--split-tokens=1024", "--num-samples=1", CPU]),
    ("base_eval", "scripts.base_eval", ["--max-per-task=4", CPU]),
    ("mid_train", "scripts.mid_train", [
        "--max-seq-len=64", "--device-batch-size=8", "--total-batch-size=1024", "--num-iterations=30",
        "--eval-every=10", "--eval-tokens=1024", f"--mix={MID_MIX}", "--val-mix=smoltalk,gsm8k@8", CPU]),
    ("chat_eval-mid", "scripts.chat_eval", ["-i", "mid", "-x", "4", "-m", "16", CPU]),
    ("chat_sft", "scripts.chat_sft", [
        "--max-seq-len=64", "--device-batch-size=4", "--target-examples-per-step=8", "--num-iterations=10",
        "--eval-every=5", "--eval-steps=2", "--eval-metrics-every=10", "--eval-metrics-max-problems=4",
        f"--mix={SFT_MIX}", "--val-mix=smoltalk", CPU]),
    ("chat_eval-sft", "scripts.chat_eval", ["-i", "sft", "-x", "4", "-m", "16", CPU]),
]


def summary_rows(report_md):
    """{metric: [BASE, MID, SFT, RL]} from the summary table of report.md."""
    summary = report_md.split("## Summary", 1)[1]
    rows = {}
    for line in summary.split("\n"):
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) == 5 and cells[0] not in ("Metric", "") and not set(cells[0]) <= {"-"}:
            rows[cells[0]] = cells[1:]
    return rows


def is_number(s):
    return re.fullmatch(r"-?\d+(\.\d+)?", s) is not None


def test_whole_pipeline(tmp_path, tiny_data_dir, monkeypatch):
    base = str(tmp_path / "base")
    os.makedirs(base)
    timings = {}
    for name, module, args in STAGES:
        t0 = time.time()
        run_module(module, args, base, tiny_data_dir, timeout=240)
        timings[name] = time.time() - t0
    print("stage seconds:", {k: round(v, 1) for k, v in timings.items()})

    # --- checkpoints of every training stage: model + meta (+ optimizer) at the last step
    for family, last_step in [("base_checkpoints", 20), ("mid_checkpoints", 30), ("chatsft_checkpoints", 10)]:
        d = os.path.join(base, family, "d2")
        assert os.path.isdir(d), f"{family}/d2 missing; the base dir holds {os.listdir(base)}"
        files = os.listdir(d)
        assert f"model_{last_step:06d}.pt" in files, (family, files)
        assert f"meta_{last_step:06d}.json" in files, (family, files)

    # --- report card: generated from a directory outside the repo (it copies report.md into the CWD)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    proc = subprocess.run([sys.executable, "-m", "nanochat.report", "generate"], cwd=str(cwd),
                          env=script_env(base, tiny_data_dir), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout
    report_dir = os.path.join(base, "report")
    for f in SECTION_FILES:
        assert os.path.exists(os.path.join(report_dir, f)), f"report section {f} missing: {os.listdir(report_dir)}"
    md = open(os.path.join(report_dir, "report.md"), encoding="utf-8").read()
    assert (cwd / "report.md").exists()
    for f in SECTION_FILES:  # every section made it into report.md, in pipeline order
        title = open(os.path.join(report_dir, f), encoding="utf-8").readline().strip()
        assert title.startswith("## ") and title in md, title
    positions = [md.index(open(os.path.join(report_dir, f), encoding="utf-8").readline().strip())
                 for f in SECTION_FILES]
    assert positions == sorted(positions)
    sections = {f: open(os.path.join(report_dir, f), encoding="utf-8").read() for f in SECTION_FILES}
    for f, key in [("base-model-training.md", "Minimum validation bpb"), ("base-model-training.md", "CORE metric"),
                   ("base-model-loss.md", "val bpb"), ("midtraining.md", "Minimum validation bpb"),
                   ("chat-sft.md", "Validation loss")]:  # each stage logged its headline metric as a number
        m = re.search(r"^- " + re.escape(key) + r"[^:]*: (\S+)$", sections[f], re.MULTILINE)
        assert m and is_number(m.group(1)), (f, key, sections[f])
    rows = summary_rows(md)
    assert is_number(rows["CORE"][0]) and rows["CORE"][1:] == ["-", "-", "-"], rows["CORE"]
    assert rows["ChatCORE"][0] == "-" and is_number(rows["ChatCORE"][1]) and is_number(rows["ChatCORE"][2]), rows
    assert rows["ChatCORE"][3] == "-"
    for task in ["ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval"]:
        assert rows[task][0] == "-" and is_number(rows[task][1]) and is_number(rows[task][2]), (task, rows[task])
    assert re.search(r"Total wall clock time: \d+h\d+m", md)
    lines = md.split("\n")
    for i, line in enumerate(lines[:-1]):  # a markdown table ends with a blank line, else text joins it
        if line.startswith("|"):
            assert lines[i + 1].startswith("|") or not lines[i + 1].strip(), (line, lines[i + 1])
    # plots: linked, present and real PNGs
    links = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", md)
    for stem in ["base-model-training", "midtraining", "chat-sft"]:
        assert any(os.path.basename(l).startswith(stem + "_") for l in links), (stem, links)
    import matplotlib.image
    for link in links:
        with open(os.path.join(report_dir, link), "rb") as f:
            assert f.read(8) == PNG_MAGIC, link
        image = matplotlib.image.imread(os.path.join(report_dir, link))  # decodes: a whole, non-empty image
        assert image.shape[0] > 100 and image.shape[1] > 100 and image.std() > 0, (link, image.shape)
    cwd_md = (cwd / "report.md").read_text(encoding="utf-8")
    for link in re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", cwd_md):  # links still resolve from the copy
        assert os.path.exists(os.path.join(str(cwd), link)), link

    # --- a chat reply: greedy, so it can be checked against the engine run in this process
    out = run_module("scripts.chat_cli", ["-i", "sft", "-p", PROMPT, "-t", "0", "-m", str(REPLY_MAX_TOKENS), CPU],
                     base, tiny_data_dir, timeout=120).stdout
    print(out)
    assert out.endswith("\n")
    monkeypatch.setenv("NANOCHAT_BASE_DIR", base)
    check_reply(out)


def check_reply(out):
    """chat_cli's printed reply == the engine's greedy tokens up to <|assistant_end|> (or the token limit),
    decoded, with tool tokens shown as text: so the reply is decoded text that ended its turn."""
    import torch
    from nanochat.model_loader import load_model
    from nanochat.engine import Engine
    model, tok, _ = load_model("sft", torch.device("cpu"), phase="eval")
    prompt = [tok.get_bos_token_id(), tok.encode_special("<|user_start|>"), *tok.encode(PROMPT),
              tok.encode_special("<|user_end|>"), tok.encode_special("<|assistant_start|>")]
    stop = {tok.encode_special("<|assistant_end|>"), tok.get_bos_token_id()}
    reply, ended = [], False  # ended: the model closed its turn itself (else the token limit cut it)
    for column, _ in Engine(model, tok).generate(prompt, num_samples=1, max_tokens=REPLY_MAX_TOKENS, temperature=0.0):
        if column[0] in stop:
            ended = True
            break
        reply.append(column[0])
    assert len(reply) <= REPLY_MAX_TOKENS
    tool = {tok.encode_special(s): t for s, t in [("<|python_start|>", "[calc: "), ("<|python_end|>", "]"),
                                                  ("<|output_start|>", " = "), ("<|output_end|>", "")]}
    text, run = "", []
    for t in reply + [None]:
        if t is None or t in tool:
            text += tok.decode(run)
            run = []
            text += tool.get(t, "")
        else:
            run.append(t)
    assert text.strip(), f"empty reply ({reply})"
    for s in SPECIAL:
        assert s not in text
    assert out.endswith(text + "\n"), f"chat_cli printed {out[-300:]!r}, the engine's reply decodes to {text!r}"
    # 30 mid steps on "What is a plus b?" chats are enough for the toy model to close its turn by itself
    assert ended, f"the reply ran into the {REPLY_MAX_TOKENS}-token limit without <|assistant_end|>: {text!r}"
