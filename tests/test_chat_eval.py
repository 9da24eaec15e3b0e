"""
scripts/chat_eval.py run as users run it, on a tiny random checkpoint and the fixture data: every task,
the ChatCORE line (checked against nanochat.task_eval.chatcore of the printed accuracies), the report
section, flag errors, and (slow) the same numbers from two ranks under torchrun.
"""

import os
import re
import subprocess
import sys

import pytest

from conftest import REPO, run_module, script_env
from nanochat.task_eval import chatcore, CHAT_BASELINES

LINE = re.compile(r"^([A-Za-z0-9-]+): ([0-9.]+)% \(", re.M)


def accuracies(stdout):
    return {name: float(pct) / 100 for name, pct in LINE.findall(stdout)}


def test_all_tasks_chatcore_and_report(chat_base_dir, tiny_data_dir):
    out = run_module("scripts.chat_eval", ["-i", "sft", "-x", "4", "-m", "16", "--device-type", "cpu"],
                     chat_base_dir, tiny_data_dir).stdout
    accs = accuracies(out)
    assert sorted(accs) == sorted(CHAT_BASELINES), out
    for name, acc in accs.items():  # 4 problems each
        assert round(acc * 4, 6) == int(round(acc * 4)), (name, acc)
    m = re.search(r"ChatCORE metric: (-?[0-9.]+)", out)
    assert m, out
    assert float(m.group(1)) == pytest.approx(chatcore(accs), abs=1e-4)

    report = open(os.path.join(chat_base_dir, "report", "chat-evaluation-sft.md")).read()
    assert report.startswith("## Chat evaluation sft\n")
    assert "- max_problems: 4" in report
    for name, acc in accs.items():
        assert f"- {name}: {acc:.4f}" in report
    assert f"- ChatCORE metric: {float(m.group(1)):.4f}" in report


def test_task_subset_has_no_chatcore(chat_base_dir, tiny_data_dir):
    out = run_module("scripts.chat_eval", ["-i", "mid", "-a", "ARC-Easy|GSM8K", "-x", "3", "-m", "8", "-b", "2"],
                     chat_base_dir, tiny_data_dir).stdout
    assert sorted(accuracies(out)) == ["ARC-Easy", "GSM8K"]
    assert "ChatCORE" not in out
    report = open(os.path.join(chat_base_dir, "report", "chat-evaluation-mid.md")).read()
    assert "- ARC-Easy: " in report and "ChatCORE" not in report


@pytest.mark.parametrize("args,message", [
    (["-i", "sft", "-a", "ARC-Easy|Trivia"], "unknown task(s) ['Trivia']"),
    (["-i", "sft", "-x", "0"], "--max-problems must be >= 1"),
])
def test_bad_flags(chat_base_dir, tiny_data_dir, args, message):
    proc = run_module("scripts.chat_eval", args, chat_base_dir, tiny_data_dir, check=False)
    assert proc.returncode != 0 and message in proc.stdout, proc.stdout


@pytest.mark.slow
def test_two_ranks_match_one(chat_base_dir, tiny_data_dir):
    """Problems split across 2 ranks, counts all-reduced: the same accuracies as one process (temperature 0)."""
    args = ["-i", "sft", "-x", "5", "-m", "8", "-b", "2", "--device-type", "cpu"]
    one = accuracies(run_module("scripts.chat_eval", args, chat_base_dir, tiny_data_dir).stdout)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "scripts.chat_eval", "--", *args], cwd=REPO,
                          env=script_env(chat_base_dir, tiny_data_dir), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[:3000] + "\n...\n" + proc.stdout[-6000:]  # rank errors come first
    two = accuracies(proc.stdout)
    assert two == one and len(one) == len(CHAT_BASELINES), (one, two, proc.stdout[-6000:])
