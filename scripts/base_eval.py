"""
CORE evaluation of a base model checkpoint: prints a per-task table, writes
$NANOCHAT_BASE_DIR/base_eval/base_model_<step>.csv and the "Base model evaluation" report section.

    python -m scripts.base_eval                                   # one process (CPU/MPS/one GPU)
    python -m scripts.base_eval --max-per-task=100                # quick estimate
    torchrun --standalone --nproc_per_node=8 -m scripts.base_eval # items split across 8 GPUs

The eval bundle comes from $NANOCHAT_DATA_DIR/eval_bundle when set, else it is downloaded once to
$NANOCHAT_BASE_DIR/eval_bundle. Tasks whose data file is missing are listed and left out of the mean.
"""

import os
import csv
import time
import argparse

from nanochat.common import compute_init, compute_cleanup, print0, get_base_dir, autodetect_device_type, resolve_precision
from nanochat.files import install_error_handler
from nanochat.model_loader import load_model
from nanochat.core_eval import evaluate_core
from nanochat.report import get_report

parser = argparse.ArgumentParser(description="CORE metric of a base model checkpoint")
parser.add_argument("--max-per-task", type=int, default=-1, help="items per task after the seeded shuffle (-1 = all)")
parser.add_argument("-g", "--model-tag", type=str, default=None, help="base_checkpoints/<tag> (default: largest d<N>)")
parser.add_argument("-s", "--step", type=int, default=None, help="checkpoint step (default: last complete)")
parser.add_argument("--device-type", type=str, default="", help="cuda|cpu|mps (default: autodetect)")
parser.add_argument("--batch-tokens", type=int, default=8192, help="padded tokens per forward pass (memory vs speed)")
parser.add_argument("--bundle-dir", type=str, default=None, help="eval bundle directory (default: see above)")
args = parser.parse_args()
install_error_handler()

device_type = args.device_type or autodetect_device_type()
is_dist, rank, local_rank, world_size, device = compute_init(device_type)

dtype, _, _ = resolve_precision(device.type, training=False)
model, tokenizer, meta = load_model("base", device, phase="eval", model_tag=args.model_tag, step=args.step, dtype=dtype)
step = meta["step"]
model_name = f"base_model (step {step})"
print0(f"Evaluating {model_name} on CORE, max {args.max_per_task} items per task, {world_size} rank(s)")

t0 = time.time()
out = evaluate_core(model, tokenizer, device, max_per_task=args.max_per_task, bundle_dir=args.bundle_dir,
                    batch_tokens=args.batch_tokens)
elapsed = time.time() - t0

if rank == 0:
    rows = [(label, f"{acc:.6f}", f"{out['centered'][label]:.6f}") for label, acc in out["results"].items()]
    rows += [(label, "missing", "missing") for label in out["missing"]]
    print0(f"\n{'Task':<35} {'Accuracy':>10} {'Centered':>10}")
    for label, acc, cen in rows:
        print0(f"{label:<35} {acc:>10} {cen:>10}")
    print0(f"{'CORE':<35} {'':>10} {out['core']:>10.6f}   ({len(out['centered'])} tasks, {elapsed:.0f}s)")
    out_dir = os.path.join(get_base_dir(), "base_eval")
    os.makedirs(out_dir, exist_ok=True)
    csv_path = os.path.join(out_dir, f"base_model_{step:06d}.csv")
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["Task", "Accuracy", "Centered"])
        w.writerows(rows)
        w.writerow(["CORE", "", f"{out['core']:.6f}"])
    print0(f"wrote {csv_path}")

get_report().log(section="Base model evaluation", data=[
    {"Model": model_name, "CORE metric": out["core"], "Tasks evaluated": len(out["centered"]),
     "Max per task": args.max_per_task,
     "Missing tasks (excluded from CORE)": ", ".join(out["missing"]) or "none"},
    out["centered"],
])
compute_cleanup()
