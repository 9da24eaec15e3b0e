"""Report card: reset/log/generate, the summary table, wall-clock time and the curve plots."""

import os
import re
import json

from nanochat import report as report_mod
from nanochat.report import Report, DummyReport, get_report, extract_metrics


def _set_time(path, prefix, value):
    with open(path) as f:
        text = f.read()
    text = re.sub(re.escape(prefix) + r" \S+ \S+", f"{prefix} {value}", text)
    with open(path, "w") as f:
        f.write(text)


def test_report_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    monkeypatch.delenv("RANK", raising=False)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    rep = get_report()
    assert isinstance(rep, Report)
    report_dir = tmp_path / "base" / "report"
    (report_dir / "chat-sft.md").write_text("stale section of an earlier run\n")
    rep.reset()
    assert not (report_dir / "chat-sft.md").exists()
    header = (report_dir / "header.md").read_text()
    for needle in ["# nanochat training report", "### Git Information", "### Hardware", "- PyTorch:",
                   "### Bloat", "Run started:"]:
        assert needle in header

    rep.log("Base model training", [{"depth": 4, "tokens": 1234567, "lr": 0.02, "flag": True}, "", None,
                                    "free text line", {"Minimum validation bpb": 1.95, "Final validation bpb": 1.9611}])
    rep.log("Midtraining", [{"Minimum validation bpb": 1.9, "Final validation bpb": 1.91381}])
    rep.log_curves("Base model training", {"step": [0, 1, 2, 3], "loss": [5.0, 4.0, 3.5, 3.2],
                                           "val_step": [0, 2], "val_bpb": [2.5, 2.1]})
    rep.log_curve("Chat SFT", "loss", [0, 1], [2.0, 1.5])
    rep.log("Chat SFT", [{"steps": 2, "Training loss": 5.1, "Validation loss": 5.47712}])
    rep.log("Base model evaluation", [{"Model": "base_model (step 100)", "CORE metric": 0.22191,
                                       "Missing tasks (excluded from CORE)": "squad, coqa"},
                                      {"hellaswag": 0.25, "arc_easy": 0.5}])
    rep.log("Chat evaluation mid", [{"source": "mid", "task_name": "GSM8K"},
                                    {"ARC-Easy": 0.3561, "ARC-Challenge": 0.2875, "MMLU": 0.3111, "GSM8K": 0.025,
                                     "HumanEval": 0.0671, "SpellingBee": 0.9, "ChatCORE metric": 0.073}])
    rep.log("Chat evaluation sft", [{"ARC-Easy": 0.3876, "MMLU": 0.3151, "ChatCORE metric": 0.0884}])
    rep.log("Chat evaluation rl", [{"GSM8K": 0.0758}])

    section = (report_dir / "base-model-training.md").read_text()
    assert section.startswith("## Base model training\ntimestamp: ")
    assert "- depth: 4\n- tokens: 1,234,567\n- lr: 0.0200\n- flag: True\n\nfree text line\n" in section
    # the quality line reads the stages logged so far: RL and its eval have not run yet here
    assert rep.quality() == ("quality: base val bpb 1.9611 | mid val bpb 1.9138 | SFT val loss 5.4771 | "
                             "ChatCORE 0.0884")

    # fix the clock: run started 10:00, last non-RL section at 13:25 (RL later, not counted)
    _set_time(report_dir / "header.md", "Run started:", "2025-01-01 10:00:00")
    for name in ["base-model-training.md", "base-model-evaluation.md", "chat-evaluation-mid.md"]:
        _set_time(report_dir / name, "timestamp:", "2025-01-01 11:00:00")
    _set_time(report_dir / "chat-evaluation-sft.md", "timestamp:", "2025-01-01 13:25:00")
    _set_time(report_dir / "chat-evaluation-rl.md", "timestamp:", "2025-01-01 19:00:00")
    header = (report_dir / "header.md").read_text().replace("- Hourly Rate: n/a (no GPU)", "- Hourly Rate: $24.00/hour")
    (report_dir / "header.md").write_text(header)

    rep.generate()
    md = (report_dir / "report.md").read_text()
    assert md.index("## Base model training") < md.index("## Base model evaluation") < md.index("## Chat evaluation mid")
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:6]]
            for line in md.split("## Summary")[1].split("\n") if line.startswith("| ") and "Metric" not in line}
    assert rows["CORE"] == ["0.2219", "-", "-", "-"]
    assert rows["ARC-Easy"] == ["-", "0.3561", "0.3876", "-"]
    assert rows["GSM8K"] == ["-", "0.0250", "-", "0.0758"]
    assert rows["SpellingBee"] == ["-", "0.9000", "-", "-"]
    assert rows["ChatCORE"] == ["-", "0.0730", "0.0884", "-"]
    # the final validation figure of each training stage (not the minimum), a quality guard
    assert rows["Val bpb"] == ["1.9611", "1.9138", "-", "-"]
    assert rows["Val loss"] == ["-", "-", "5.4771", "-"]
    order = list(rows)
    assert order[:3] == ["Val bpb", "Val loss", "CORE"] and order[-1] == "ChatCORE"
    assert order[3:-1] == sorted(order[3:-1])
    assert "Total wall clock time: 3h25m" in md
    assert "Estimated cost: $82.00" in md  # 24 $/h * 3.4167 h
    # plots exist, are PNGs and are linked
    curves = json.loads((report_dir / "base-model-training_curves.json").read_text())
    assert curves["val_bpb"] == {"steps": [0.0, 2.0], "values": [2.5, 2.1]}
    for name in ["base-model-training_loss.png", "base-model-training_val_bpb.png", "chat-sft_loss.png"]:
        assert (report_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({name})" in md
    # the CWD copy links to the same PNG files
    copy = (cwd / "report.md").read_text()
    for link in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", copy):
        assert os.path.exists(cwd / link)

    # a new run's reset removes sections, curves and plots
    rep.reset()
    assert sorted(os.listdir(report_dir)) == ["header.md"]


def test_other_ranks_get_a_noop(monkeypatch, tmp_path):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    for k, v in {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(k, v)
    rep = get_report()
    assert isinstance(rep, DummyReport)
    rep.log("Base model training", [{"a": 1}])
    rep.log_curve("Base model training", "loss", [0], [1.0])
    rep.log_curves("Base model training", {"step": [0], "loss": [1.0]})
    rep.generate()
    assert not (tmp_path / "report").exists()


def test_extract_metrics_is_not_fooled_by_substrings():
    text = "- task_name: GSM8K\n- GSM8K: 0.05\n- ChatCORE metric: 0.1\n- Missing tasks (excluded from CORE): x\n"
    assert extract_metrics(text, ["GSM8K", "CORE", "ChatCORE"]) == {"GSM8K": "0.05", "ChatCORE": "0.1"}
    assert report_mod.slugify("Chat evaluation mid") == "chat-evaluation-mid"


def test_value_formatting_reads_well(tmp_path):
    values = [0.02, 2216187.1735, 4e-05, 0.0, 12345, 999, True, float("nan")]
    path = Report(str(tmp_path)).log("Formats", [{f"v{i}": v for i, v in enumerate(values)}])
    with open(path, encoding="utf-8") as f:
        written = [line.strip().split(": ", 1)[1] for line in f if line.startswith("- v")]
    assert written == ["0.0200", "2,216,187", "4e-05", "0.0000", "12,345", "999", "True", "nan"]


def test_git_facts_come_from_the_repo_not_the_cwd(tmp_path, monkeypatch):
    if not os.path.exists(os.path.join(report_mod.REPO_ROOT, ".git")):
        import pytest
        pytest.skip("not running from a git checkout")
    monkeypatch.chdir(tmp_path)  # not a git checkout
    assert report_mod.git_info()["commit"] != "unknown"
    assert report_mod.bloat_info()["Files"] > 0
