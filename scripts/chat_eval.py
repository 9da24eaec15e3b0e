"""
Evaluate a chat model on ARC-Easy, ARC-Challenge, MMLU (letter logits), GSM8K, HumanEval and
SpellingBee (generation), and compute ChatCORE.

    python -m scripts.chat_eval -i sft
    python -m scripts.chat_eval -i mid -a "ARC-Easy|GSM8K" -x 100
    torchrun --standalone --nproc_per_node=8 -m scripts.chat_eval -- -i sft
"""

import argparse
import time

from nanochat.common import compute_init, compute_cleanup, print0, resolve_precision
from nanochat.files import install_error_handler
from nanochat.model_loader import load_model
from nanochat.engine import Engine
from nanochat.task_eval import run_categorical_eval, run_generative_eval, chatcore, CHAT_BASELINES
from nanochat.report import get_report
from tasks.arc import ARC
from tasks.mmlu import MMLU
from tasks.gsm8k import GSM8K
from tasks.humaneval import HumanEval
from tasks.spellingbee import SpellingBee

# name -> builder; built lazily so an unused task needs no data (baselines: nanochat.task_eval.CHAT_BASELINES)
TASKS = {
    "ARC-Easy": lambda: ARC("ARC-Easy", "test"),
    "ARC-Challenge": lambda: ARC("ARC-Challenge", "test"),
    "MMLU": lambda: MMLU("all", "test"),
    "GSM8K": lambda: GSM8K("main", "test"),
    "HumanEval": lambda: HumanEval(),
    "SpellingBee": lambda: SpellingBee(size=256, split="test"),
}
assert set(TASKS) == set(CHAT_BASELINES)

parser = argparse.ArgumentParser(description="Evaluate a chat model")
parser.add_argument("-i", "--source", type=str, required=True, choices=["mid", "sft", "rl", "base"], help="checkpoint family")
parser.add_argument("-a", "--task-name", type=str, default=None, help=f"'|'-separated subset of {list(TASKS)} (default all)")
parser.add_argument("-d", "--dtype", type=str, default="", help="compute dtype override")
parser.add_argument("-t", "--temperature", type=float, default=0.0, help="sampling temperature (generative tasks)")
parser.add_argument("-m", "--max-new-tokens", type=int, default=512, help="max tokens per completion")
parser.add_argument("-n", "--num-samples", type=int, default=1, help="samples per problem (pass@n)")
parser.add_argument("-k", "--top-k", type=int, default=50, help="top-k sampling")
parser.add_argument("-b", "--batch-size", type=int, default=8, help="batch size for categorical tasks")
parser.add_argument("-g", "--model-tag", type=str, default=None, help="checkpoint tag")
parser.add_argument("-s", "--step", type=int, default=None, help="checkpoint step")
parser.add_argument("-x", "--max-problems", type=int, default=None, help="max problems per task")
parser.add_argument("--device-type", type=str, default="", help="cuda|cpu|mps (empty = autodetect)")
args = parser.parse_args()
install_error_handler()
names = args.task_name.split("|") if args.task_name else list(TASKS)
unknown = [n for n in names if n not in TASKS]
if unknown:
    parser.error(f"unknown task(s) {unknown}; choose from {list(TASKS)}")
if args.temperature < 0:
    parser.error("--temperature must be >= 0")
for flag, value in [("--num-samples", args.num_samples), ("--batch-size", args.batch_size),
                    ("--max-new-tokens", args.max_new_tokens), ("--max-problems", args.max_problems)]:
    if value is not None and value < 1:
        parser.error(f"{flag} must be >= 1, got {value}")

is_dist, rank, local_rank, world_size, device = compute_init(args.device_type)
dtype, _, _ = resolve_precision(device.type, args.dtype or None, training=False)
model, tokenizer, meta = load_model(args.source, device, phase="eval", model_tag=args.model_tag, step=args.step,
                                    dtype=dtype)
engine = Engine(model, tokenizer)

results = {}
for name in names:
    task = TASKS[name]()
    t0 = time.time()
    if task.eval_type == "categorical":
        acc = run_categorical_eval(task, tokenizer, model, batch_size=args.batch_size, max_problems=args.max_problems,
                                   device=device)
    else:
        acc = run_generative_eval(task, tokenizer, engine, num_samples=args.num_samples,
                                  max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                                  max_problems=args.max_problems, device=device)
    results[name] = acc
    print0(f"{name}: {100 * acc:.2f}% ({time.time() - t0:.1f}s)")

chatcore_metric = chatcore(results)  # None unless all six tasks ran
if chatcore_metric is not None:
    print0(f"ChatCORE metric: {chatcore_metric:.4f}")

get_report().log(f"Chat evaluation {args.source}", [
    vars(args), {name: acc for name, acc in results.items()},
    {"ChatCORE metric": chatcore_metric} if chatcore_metric is not None else None])
compute_cleanup()
