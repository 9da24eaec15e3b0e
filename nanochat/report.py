"""
The report card: every stage logs a markdown section into $NANOCHAT_BASE_DIR/report/, and `generate`
stitches them into report.md with a summary table, the wall-clock time, an estimated cost and PNG plots.

    python -m nanochat.report reset      # start of a run: header.md (date, git, hardware, versions, code size)
    python -m nanochat.report generate   # end of a run: report/report.md, copied to ./report.md
    python -m nanochat.report quality    # one line: base/mid val bpb, SFT val loss, ChatCORE (a quality guard)

In a stage (only rank 0 writes; other ranks get a no-op object):

    report = get_report()
    report.log(section="Base model training", data=[user_config, {"Minimum validation bpb": 0.81}, "markdown"])
    report.log_curve("Base model training", "loss", steps, train_losses)  # plotted by generate()
    report.log_curves("Base model training", {"step": steps, "loss": losses, "val_step": vsteps, "val_bpb": vals})

log_curve replaces a curve of the same name, so a resumed stage should log the whole curve.
"""

import os
import re
import sys
import json
import datetime
import platform
import subprocess

# (section title, file) in the order generate() writes them
SECTIONS = [
    ("Tokenizer training", "tokenizer-training.md"),
    ("Tokenizer evaluation", "tokenizer-evaluation.md"),
    ("Base model training", "base-model-training.md"),
    ("Base model loss", "base-model-loss.md"),
    ("Base model evaluation", "base-model-evaluation.md"),
    ("Midtraining", "midtraining.md"),
    ("Chat evaluation mid", "chat-evaluation-mid.md"),
    ("Chat SFT", "chat-sft.md"),
    ("Chat evaluation sft", "chat-evaluation-sft.md"),
    ("Chat RL", "chat-rl.md"),
    ("Chat evaluation rl", "chat-evaluation-rl.md"),
]
RL_FILES = {"chat-rl.md", "chat-evaluation-rl.md"}  # RL is optional: left out of the wall-clock time
# file -> (summary column, label in that section, summary row): the figure each training stage ends with
VAL_FIGURES = {"base-model-training.md": ("BASE", "Final validation bpb", "Val bpb"),
               "midtraining.md": ("MID", "Final validation bpb", "Val bpb"),
               "chat-sft.md": ("SFT", "Validation loss", "Val loss")}
CHAT_METRICS = ["ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "SpellingBee", "ChatCORE"]
GPU_PRICES = [("H100", 3.00), ("A100", 1.79), ("V100", 0.55)]  # $/GPU/hour by name substring; else 2.00
BLOAT_EXTENSIONS = {"py", "md", "rs", "html", "toml", "sh"}
TIME_FORMAT = "%Y-%m-%d %H:%M:%S"
# git facts and code size are about this checkout, wherever the command is run from
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def slugify(section):
    return section.lower().replace(" ", "-")


def _now():
    return datetime.datetime.now().strftime(TIME_FORMAT)


def _read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def _write(path, text):
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def _format_value(value):
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            return str(value)
        if abs(value) >= 10000:  # throughputs, token counts: 2,216,187 rather than 2216187.1735
            return f"{value:,.0f}"
        if 0 < abs(value) < 0.001:  # small learning rates would print as 0.0000
            return f"{value:.4g}"
        return f"{value:.4f}"
    if isinstance(value, int) and value >= 10000:
        return f"{value:,}"
    return str(value)

# -----------------------------------------------------------------------------
# Header: environment facts


def _run(cmd, cwd=REPO_ROOT):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10, cwd=cwd).stdout.strip()
    except Exception:
        return ""


def git_info():
    return {
        "branch": _run(["git", "rev-parse", "--abbrev-ref", "HEAD"]) or "unknown",
        "commit": _run(["git", "rev-parse", "--short", "HEAD"]) or "unknown",
        "dirty": bool(_run(["git", "status", "--porcelain"])),
        "message": (_run(["git", "log", "-1", "--pretty=%B"]).split("\n") or [""])[0][:80],
    }


def gpu_info():
    import torch
    if not torch.cuda.is_available():
        return {"count": 0}
    n = torch.cuda.device_count()
    props = [torch.cuda.get_device_properties(i) for i in range(n)]
    return {"count": n, "names": [p.name for p in props],
            "memory_gb": sum(p.total_memory for p in props) / 1024 ** 3, "cuda": torch.version.cuda}


def hourly_rate(gpu):
    """$/hour of the whole node (typical on-demand cloud prices per GPU), None without GPUs."""
    if gpu["count"] == 0:
        return None
    return next((p for key, p in GPU_PRICES if key in gpu["names"][0]), 2.00) * gpu["count"]


def bloat_info(root=REPO_ROOT):
    """Size of the git-tracked code: characters, lines, files, ~tokens, uv.lock lines."""
    files = [f for f in _run(["git", "-C", root, "ls-files"]).split("\n")
             if f and f.rsplit(".", 1)[-1] in BLOAT_EXTENSIONS]
    chars = lines = 0
    for f in files:
        try:
            with open(os.path.join(root, f), encoding="utf-8", errors="replace") as fh:
                text = fh.read()
        except OSError:
            continue
        chars += len(text)
        lines += text.count("\n")
    uv_lines = "n/a (no uv.lock)"
    uv_path = os.path.join(root, "uv.lock")
    if os.path.exists(uv_path):
        with open(uv_path, encoding="utf-8", errors="replace") as fh:
            uv_lines = sum(1 for _ in fh)
    return {"Characters": chars, "Lines": lines, "Files": len(files), "Tokens (approx)": chars // 4,
            "Dependencies (uv.lock lines)": uv_lines}


def generate_header():
    import torch
    import psutil
    now = _now()
    git, gpu = git_info(), gpu_info()
    rate = hourly_rate(gpu)
    out = ["# nanochat training report", "", f"Generated: {now}", "", "## Environment", "",
           "### Git Information", f"- Branch: {git['branch']}",
           f"- Commit: {git['commit']} {'(dirty)' if git['dirty'] else '(clean)'}",
           f"- Message: {git['message']}", "", "### Hardware",
           f"- Platform: {platform.system()}",
           f"- CPUs: {psutil.cpu_count(logical=False)} cores ({psutil.cpu_count(logical=True)} logical)",
           f"- Memory: {psutil.virtual_memory().total / 1024 ** 3:.1f} GB"]
    if gpu["count"]:
        names = ", ".join(sorted(set(gpu["names"])))
        out += [f"- GPUs: {gpu['count']}x {names}", f"- GPU Memory: {gpu['memory_gb']:.1f} GB total",
                f"- CUDA Version: {gpu['cuda']}", f"- Hourly Rate: ${rate:.2f}/hour"]
    else:
        out += ["- GPUs: None available", "- Hourly Rate: n/a (no GPU)"]
    out += ["", "### Software", f"- Python: {sys.version.split()[0]}", f"- PyTorch: {torch.__version__}", "",
            "### Bloat"]
    out += [f"- {k}: {_format_value(v)}" for k, v in bloat_info().items()]
    out += ["", f"Run started: {now}", "", "---", ""]
    return "\n".join(out)

# -----------------------------------------------------------------------------
# Summary helpers


def extract_metrics(text, keys):
    """{key: value-string} from lines like "- MMLU: 0.3111" or "CORE metric: 0.22". A line matches a key
    when the label before the first ':' (minus a leading '- ') is the key or starts with "key "."""
    out = {}
    for line in text.split("\n"):
        if ":" not in line:
            continue
        label, value = line.split(":", 1)
        label = label.strip().removeprefix("- ").strip()
        for key in keys:
            if label == key or label.startswith(key + " "):
                out[key] = value.strip()
    return out


def add_section_metrics(metrics, file, text):
    """Fold the summary figures of one section file into metrics {stage: {row: value-string}}."""
    if file in VAL_FIGURES:  # the validation figure each training stage ended with
        stage, label, name = VAL_FIGURES[file]
        value = extract_metrics(text, [label]).get(label)
        if value not in (None, "", "None"):
            metrics.setdefault(stage, {})[name] = value
    if file == "base-model-evaluation.md":
        metrics.setdefault("BASE", {}).update(extract_metrics(text, ["CORE"]))
    elif file in ("chat-evaluation-mid.md", "chat-evaluation-sft.md"):
        metrics.setdefault(file[len("chat-evaluation-"):-3].upper(), {}).update(extract_metrics(text, CHAT_METRICS))
    elif file == "chat-evaluation-rl.md":
        metrics.setdefault("RL", {}).update(extract_metrics(text, ["GSM8K"]))


def quality_line(metrics):
    """One line with the figures a change that costs quality moves first: base and mid val bpb, SFT val loss
    and ChatCORE (of the last chat stage evaluated), '-' where a stage did not report it."""
    chat = next((metrics[s] for s in ("SFT", "MID") if "ChatCORE" in metrics.get(s, {})), {})
    return (f"quality: base val bpb {metrics.get('BASE', {}).get('Val bpb', '-')} | "
            f"mid val bpb {metrics.get('MID', {}).get('Val bpb', '-')} | "
            f"SFT val loss {metrics.get('SFT', {}).get('Val loss', '-')} | ChatCORE {chat.get('ChatCORE', '-')}")


def _parse_time(text, prefix):
    """First 'prefix<timestamp>' in text as a datetime, or None."""
    m = re.search(re.escape(prefix) + r"\s*(\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2})", text)
    return datetime.datetime.strptime(m.group(1), TIME_FORMAT) if m else None


def plot_curves(curves, path_prefix, title=None):
    """One PNG per curve: <path_prefix>_<name>.png, titled '<title>: <name>'. Returns [(name, path)]."""
    import matplotlib
    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    title = title or os.path.basename(path_prefix)
    out = []
    for name, curve in curves.items():
        steps, values = curve["steps"], curve["values"]
        if not values:
            continue
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
        path = f"{path_prefix}_{safe}.png"
        fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
        ax.plot(steps, values, marker="o" if len(values) < 30 else None, markersize=3)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers (no "2.5")
        ax.set_ylabel(name)
        ax.set_title(f"{title}: {name}")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
        out.append((name, path))
    return out

# -----------------------------------------------------------------------------


class Report:
    def __init__(self, report_dir):
        os.makedirs(report_dir, exist_ok=True)
        self.report_dir = report_dir

    def log(self, section, data):
        """Write report/<slug>.md: '## section', a timestamp, then each truthy item of `data`: dicts as
        "- key: value" lines, strings verbatim."""
        path = os.path.join(self.report_dir, f"{slugify(section)}.md")
        with open(path, "w", encoding="utf-8") as f:
            f.write(f"## {section}\ntimestamp: {_now()}\n\n")
            after_list = False
            for item in data:
                if not item:
                    continue
                if isinstance(item, str):
                    if after_list and not item.startswith("\n"):
                        f.write("\n")  # else markdown joins the text to the last "- key: value" item
                    f.write(item if item.endswith("\n") else item + "\n")
                    after_list = False
                else:
                    for k, v in item.items():
                        f.write(f"- {k}: {_format_value(v)}\n")
                    after_list = True
            f.write("\n")
        return path

    def log_curve(self, section, name, steps, values):
        """Store one curve of a stage in report/<slug>_curves.json (plotted by generate)."""
        steps, values = [float(s) for s in steps], [float(v) for v in values]
        if len(steps) != len(values):
            raise ValueError(f"curve {name!r}: {len(steps)} steps but {len(values)} values")
        path = os.path.join(self.report_dir, f"{slugify(section)}_curves.json")
        curves = json.loads(_read(path)) if os.path.exists(path) else {}
        curves[name] = {"steps": steps, "values": values}
        tmp = path + ".tmp"
        _write(tmp, json.dumps(curves))
        os.replace(tmp, path)
        return path

    def log_curves(self, section, curves):
        """Several curves at once, as the training scripts keep them: {"step": [...], "loss": [...],
        "val_step": [...], "val_bpb": [...]}. A name starting with "val" is plotted against "val_step",
        any other against "step"; a value of the form (steps, values) carries its own x-axis."""
        for name, values in curves.items():
            if name in ("step", "val_step"):
                continue
            if isinstance(values, (tuple, list)) and len(values) == 2 and all(isinstance(v, (list, tuple)) for v in values):
                steps, values = values
            else:
                steps = curves.get("val_step" if name.startswith("val") else "step")
                if steps is None:
                    raise ValueError(f"curve {name!r} of {section!r} has no step list to plot against")
            self.log_curve(section, name, steps, values)

    def reset(self):
        """Forget the previous run's sections, curves and plots; write a fresh header.md."""
        for _, file in SECTIONS:
            slug = file[:-3]
            for name in os.listdir(self.report_dir):
                if name == file or name.startswith(slug + "_"):  # section, its curves json and PNGs
                    os.remove(os.path.join(self.report_dir, name))
        report_md = os.path.join(self.report_dir, "report.md")
        if os.path.exists(report_md):
            os.remove(report_md)
        _write(os.path.join(self.report_dir, "header.md"), generate_header())
        print(f"Reset report and wrote header to {self.report_dir}/header.md")

    def generate(self, copy_to_cwd=True):
        """report/report.md = header + sections (+ plots) + summary; copied to ./report.md."""
        header_path = os.path.join(self.report_dir, "header.md")
        if os.path.exists(header_path):
            header = _read(header_path)
        else:
            print(f"Warning: {header_path} missing (run `python -m nanochat.report reset` at the start)")
            header = "# nanochat training report\n\n"
        # header.md was written at reset; the report itself is generated now
        header = re.sub(r"^Generated: .*$", f"Generated: {_now()}", header, count=1, flags=re.MULTILINE)
        start_time = _parse_time(header, "Run started:")
        rate_match = re.search(r"Hourly Rate: \$([\d.]+)/hour", header)
        bloat = re.search(r"### Bloat\n(.*?)\n\n", header, re.DOTALL)

        parts, metrics, end_time = [header], {}, None
        for section, file in SECTIONS:
            path = os.path.join(self.report_dir, file)
            if not os.path.exists(path):
                print(f"Warning: {path} does not exist, skipping")
                continue
            text = _read(path)
            parts.append(text)
            # plots of this stage's curves, linked relative to report.md (same directory)
            curves_path = os.path.join(self.report_dir, f"{file[:-3]}_curves.json")
            if os.path.exists(curves_path):
                curves = json.loads(_read(curves_path))
                for name, png in plot_curves(curves, os.path.join(self.report_dir, file[:-3]), title=section):
                    parts.append(f"![{section}: {name}]({os.path.basename(png)})\n\n")
            add_section_metrics(metrics, file, text)
            if file not in RL_FILES:
                end_time = _parse_time(text, "timestamp:") or end_time

        # summary: bloat, metric table, wall clock and cost
        # validation figures first, then CORE, ChatCORE last, the rest alphabetical
        names = sorted({k for m in metrics.values() for k in m},
                       key=lambda n: (not n.startswith("Val "), n != "CORE", n == "ChatCORE", n))
        stages = ["BASE", "MID", "SFT", "RL"]
        summary = ["## Summary", ""]
        if bloat:
            summary += [bloat.group(1), ""]
        summary.append(f"| {'Metric':<15} | " + " | ".join(f"{s:<8}" for s in stages) + " |")
        summary.append(f"|{'-' * 17}|" + "|".join("-" * 10 for _ in stages) + "|")
        for n in names:
            summary.append(f"| {n:<15} | " + " | ".join(f"{metrics.get(s, {}).get(n, '-'):<8}" for s in stages) + " |")
        summary.append("")
        if start_time and end_time:
            seconds = (end_time - start_time).total_seconds()
            summary.append(f"Total wall clock time: {int(seconds // 3600)}h{int(seconds % 3600 // 60)}m")
            if rate_match:
                rate = float(rate_match.group(1))
                summary.append(f"Estimated cost: ${rate * seconds / 3600:.2f} (${rate:.2f}/hour)")
        else:
            summary.append("Total wall clock time: unknown")
        summary.append("")
        parts.append("\n".join(summary))

        report_md = os.path.join(self.report_dir, "report.md")
        _write(report_md, "".join(p if p.endswith("\n") else p + "\n" for p in parts))
        print(f"Generated report at {report_md}")
        print(quality_line(metrics))
        if copy_to_cwd:
            self._copy_to_cwd(report_md)
        return report_md

    def quality(self):
        """Print the one-line quality summary of the stages logged so far (runs/runcpu.sh ends with it)."""
        metrics = {}
        for _, file in SECTIONS:
            path = os.path.join(self.report_dir, file)
            if os.path.exists(path):
                add_section_metrics(metrics, file, _read(path))
        line = quality_line(metrics)
        print(line)
        return line

    def _copy_to_cwd(self, report_md):
        """./report.md with image links rewritten relative to the CWD, so the plots still show."""
        text = _read(report_md)
        try:
            rel = os.path.relpath(self.report_dir, os.getcwd())
        except ValueError:  # different drive on Windows
            rel = self.report_dir
        text = re.sub(r"!\[([^\]]*)\]\(([^)/]+\.png)\)", lambda m: f"![{m.group(1)}]({rel}/{m.group(2)})", text)
        dest = os.path.join(os.getcwd(), "report.md")
        if os.path.abspath(dest) != os.path.abspath(report_md):
            _write(dest, text)
            print(f"Copied report to {dest}")


class DummyReport:
    """What non-zero ranks get: every call is a no-op."""
    def log(self, *args, **kwargs):
        pass

    log_curve = log_curves = reset = generate = quality = log


def get_report():
    from nanochat.common import get_base_dir, get_dist_info
    _, rank, _, _ = get_dist_info()
    if rank != 0:
        return DummyReport()
    return Report(os.path.join(get_base_dir(), "report"))


if __name__ == "__main__":
    import argparse
    parser = argparse.ArgumentParser(description="Reset or generate the nanochat report card, or print its quality line")
    parser.add_argument("command", nargs="?", default="generate", choices=["generate", "reset", "quality"])
    args = parser.parse_args()
    getattr(get_report(), args.command)()
