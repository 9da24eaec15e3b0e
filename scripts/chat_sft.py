"""
Supervised fine-tuning: a small curated mixture, one conversation per row, only the assistant's
tokens are trained. The loss of a step is the mean over all supervised tokens of that step, across
micro-batches and ranks. `--loss=dft` weights each token's cross-entropy by the model's own
(stop-gradient) probability of it (Dynamic Fine-Tuning, https://arxiv.org/abs/2508.05629).
MMLU and ARC-Easy accuracy run every --eval-metrics-every steps and at the end (-1: never), on the
problems that fit the model's context; the others are skipped and counted.

One CPU process, offline mirror:
    NANOCHAT_DATA_DIR=../shared/data python -m scripts.chat_sft --device-batch-size=4 --num-iterations=100
With DFT:
    python -m scripts.chat_sft --loss=dft --dft-alpha=1.0
8 GPUs:
    torchrun --standalone --nproc_per_node=8 -m scripts.chat_sft -- --run=sft
Resume from saved step S: the same flags plus --resume-from-step=S.
"""

import os
import argparse
import dataclasses

import torch

from nanochat.common import (compute_init, compute_cleanup, print0, get_base_dir, resolve_precision,
                             get_max_memory, all_reduce_sum, parse_bool)
from nanochat.common import init_script
from nanochat.model_loader import load_model
from nanochat.attention import set_backend_from_flag as set_attn_backend
from nanochat.memory import resolve_device_batch_size
from nanochat.chat_loader import SFTBatcher, pad_multiple_for
from nanochat.task_eval import run_categorical_eval, FittingProblems
from nanochat.loss_eval import supervised_loss
from nanochat.report import get_report
from nanochat.schedules import WARMUP_STEPS, warmup_multiplier, set_schedule, scale_lrs
from nanochat.train_step import Prefetcher, guarded_step, stop_on_nonfinite, evaluating
from nanochat.speed import PeakFlops, StepTimer, Speed
from nanochat.run_state import RunState, format_step, start_run
from nanochat.resume import Checkpoints, stage_meta
from tasks.mixtures import (add_mixture_args, mixtures_from_args, default_sft_sources,
                            default_sft_val_sources)
from tasks.arc import ARC
from tasks.mmlu import MMLU

parser = argparse.ArgumentParser(description="Supervised fine-tuning on a curated conversation mixture")
parser.add_argument("--run", type=str, default="dummy", help="wandb run name ('dummy' disables wandb)")
parser.add_argument("--device-type", type=str, default="", help="cuda|cpu|mps (empty = autodetect)")
parser.add_argument("--dtype", type=str, default="", help="compute dtype override: bfloat16|float16|float32")
parser.add_argument("--compile", type=parse_bool, default=None, help="torch.compile the training forward with dynamic shapes, one graph for every row length (default: the precision policy on a CPU; off on CUDA, not measured there)")
parser.add_argument("--source", type=str, default="mid", choices=["mid", "base"], help="which checkpoint to start from")
parser.add_argument("--model-tag", type=str, default=None, help="source checkpoint tag")
parser.add_argument("--model-step", type=int, default=None, help="source checkpoint step")
parser.add_argument("--num-epochs", type=int, default=1, help="epochs over the mixture")
parser.add_argument("--num-iterations", type=int, default=-1, help="optimizer steps (-1 = from --num-epochs)")
parser.add_argument("--device-batch-size", type=str, default="4", help="conversations per forward pass, or 'auto' (largest that fits GPU memory)")
parser.add_argument("--attn", type=str, default="auto", choices=["auto", "fa3", "flex", "sdpa"], help="attention backend (auto = FA3 on Hopper, else FlexAttention on CUDA, else SDPA)")
parser.add_argument("--target-examples-per-step", type=int, default=32, help="conversations per optimizer step")
parser.add_argument("--max-seq-len", type=int, default=2048, help="conversations are truncated to this many tokens")
parser.add_argument("--pad-multiple", type=int, default=-1, help="pad each batch's rows up to a multiple of this many tokens (0 = to the longest row; -1 = auto: on CUDA 256, or more so at most 8 lengths, since compiled attention compiles once per length; elsewhere 0)")
parser.add_argument("--embedding-lr", type=float, default=0.2, help="AdamW LR of the token embedding")
parser.add_argument("--unembedding-lr", type=float, default=0.004, help="AdamW LR of lm_head")
parser.add_argument("--matrix-lr", type=float, default=0.02, help="Muon LR of the block matrices")
parser.add_argument("--weight-decay", type=float, default=0.0, help="Muon weight decay")
parser.add_argument("--init-lr-frac", type=float, default=0.02, help="initial LR as a fraction of the above")
parser.add_argument("--warmup-steps", type=int, default=WARMUP_STEPS, help="linear LR warm-up steps (a new optimizer on a trained model)")
parser.add_argument("--loss", type=str, default="ce", choices=["ce", "dft"], help="objective: cross-entropy or DFT")
parser.add_argument("--dft-alpha", type=float, default=1.0, help="DFT weight: w = alpha*p + (1-alpha); 0 equals CE")
parser.add_argument("--eval-every", type=int, default=100, help="val loss every N steps (-1 = only at the end)")
parser.add_argument("--eval-steps", type=int, default=100, help="val batches per evaluation")
parser.add_argument("--eval-metrics-every", type=int, default=200, help="MMLU/ARC-Easy accuracy every N steps and at the end (-1 = off)")
parser.add_argument("--eval-metrics-max-problems", type=int, default=1024, help="problems per accuracy evaluation")
parser.add_argument("--save-every", type=int, default=-1, help="checkpoint every N steps (-1 = only at the end)")
parser.add_argument("--resume-from-step", type=int, default=-1, help="resume this SFT run from a saved step")
parser.add_argument("--output-tag", type=str, default=None, help="chatsft_checkpoints/<tag> (default d<n_layer>)")
add_mixture_args(parser, default_sft_sources(), default_sft_val_sources())
args = parser.parse_args()
init_script()
if args.pad_multiple < -1:
    parser.error(f"--pad-multiple must be -1 (auto), 0 (longest row) or a positive number of tokens, got {args.pad_multiple}")
if not 0.0 <= args.dft_alpha <= 1.0:
    parser.error(f"--dft-alpha must be in [0, 1], got {args.dft_alpha}")
alpha = args.dft_alpha if args.loss == "dft" else 0.0

is_dist, rank, local_rank, world_size, device = compute_init(args.device_type)
set_attn_backend(args.attn)
# rows vary in length: compiled, the training forward is traced once with a dynamic length (on a CPU ~2x an eager
# step, for one compilation of ~30-50 s on 2 cores); CUDA stays eager by default until that is measured there
dtype, use_compile, reason = resolve_precision(device.type, args.dtype or None, args.compile, verbose=False)
if args.compile is None and device.type != "cpu" and use_compile:
    use_compile, reason = False, reason + "; chat_sft compiles only on a CPU unless --compile=1"
print0(f"precision: {str(dtype).removeprefix('torch.')}, compile={int(use_compile)} ({reason})")
user_config, wandb_run = start_run(args, "nanochat-sft", device, dtype, use_compile, rank)

train_ds, val_ds = mixtures_from_args(args)

model, tokenizer, src_meta = load_model(args.source, device, phase="train", model_tag=args.model_tag,
                                        step=args.model_step, dtype=dtype)
config = model.config
args.device_batch_size = resolve_device_batch_size(  # rows padded up to --max-seq-len at worst
    args.device_batch_size, dataclasses.replace(config, sequence_len=args.max_seq_len), device, dtype, compile=use_compile,
    world_size=world_size, total_batch_size=args.target_examples_per_step * args.max_seq_len, log=print0)

examples_per_step = args.device_batch_size * world_size
pad_multiple = args.pad_multiple if args.pad_multiple >= 0 else \
    (pad_multiple_for(args.max_seq_len) if device.type == "cuda" else 0)
print0(f"batch rows padded to " + (f"multiples of {pad_multiple} tokens" if pad_multiple else "the longest row"))
if args.target_examples_per_step % examples_per_step != 0:
    raise SystemExit(f"--target-examples-per-step={args.target_examples_per_step} must be a multiple of "
                     f"device_batch_size*world_size = {examples_per_step}")
grad_accum = args.target_examples_per_step // examples_per_step
num_iterations = args.num_iterations if args.num_iterations > 0 else \
    (len(train_ds) // args.target_examples_per_step) * args.num_epochs
if num_iterations < 1:
    raise SystemExit(f"the mixture has {len(train_ds)} conversations, fewer than one step of "
                     f"{args.target_examples_per_step}; lower --target-examples-per-step")
print0(f"grad accum: {grad_accum} | iterations: {num_iterations} | loss: {args.loss} (alpha {alpha})")

optimizer = model.setup_optimizers(unembedding_lr=args.unembedding_lr, embedding_lr=args.embedding_lr,
                                   matrix_lr=args.matrix_lr, weight_decay=args.weight_decay)
scale_lrs(optimizer, args.init_lr_frac)

peak = PeakFlops.for_device(device, dtype)
speed = Speed(0, model.estimate_flops(), world_size, peak)  # rows vary in length: tokens set per step
checkpoints = Checkpoints(os.path.join(get_base_dir(), "chatsft_checkpoints", args.output_tag or f"d{config.n_layer}"),
                          model, optimizer, rank, device, save_every=args.save_every)
train_model = torch.compile(model, dynamic=True) if use_compile else model  # evals run `model`, eagerly
run = RunState("val_loss", timer=StepTimer(skip=10 if use_compile else 0))
loader_state = checkpoints.resume(args.resume_from_step, run) if args.resume_from_step >= 0 else None

train_batches = Prefetcher(SFTBatcher(train_ds, tokenizer, args.device_batch_size, device=device,
                                      max_tokens=args.max_seq_len, state=loader_state, pad_multiple=pad_multiple))
METRIC_TASKS = {"mmlu_acc": lambda: MMLU("all", "test"), "arc_easy_acc": lambda: ARC("ARC-Easy", "test")}
skipped_problems = {}  # metric -> problems too long for the model's context at the last evaluation


def val_loss():
    loader = SFTBatcher(val_ds, tokenizer, args.device_batch_size, device=device, max_tokens=args.max_seq_len,
                        pad_multiple=pad_multiple)
    total_nll = torch.zeros((), dtype=torch.float64, device=device)
    total_tokens = torch.zeros((), dtype=torch.float64, device=device)
    with evaluating(model):
        for _ in range(args.eval_steps):
            x, y = next(loader)
            nll = model(x, y, loss_reduction="none")
            total_nll += nll.sum().double()  # ignored positions come back as 0
            total_tokens += (y >= 0).sum().double()
    all_reduce_sum(total_nll)
    all_reduce_sum(total_tokens)
    return (total_nll / total_tokens.clamp(min=1)).item()


def accuracies():
    out = {}
    with evaluating(model):
        for name, make_task in METRIC_TASKS.items():
            # the longest input the model takes (its rotary table), not its training length: a short-context
            # model is still scored on every problem it can read
            problems = FittingProblems(make_task(), tokenizer, model.rotary_len, args.eval_metrics_max_problems)
            skipped_problems[name] = problems.skipped
            out[name] = run_categorical_eval(problems, tokenizer, model, batch_size=2 * args.device_batch_size,
                                             device=device) if len(problems) else None
    return out


def meta():
    metrics = {name: run.metrics_now().get(name) for name in METRIC_TASKS}  # every key, None when not run
    return stage_meta(run, config, user_config, tokenizer, world_size, source=args.source, **metrics,
                      skipped_problems=dict(skipped_problems))


# The loop: the evaluations due at this step, the save when due, the stop, then the step.
train_loss = None
with stop_on_nonfinite():
    while True:
        step, last_step = run.step, run.step == num_iterations
        if last_step or (args.eval_every > 0 and step % args.eval_every == 0):
            run.record_val(val_loss())
            print0(f"step {step:05d} | val loss {run.val:.6f}")
            wandb_run.log({"step": step, "val/loss": run.val})
            peak.reprobe(f"step {step}")
        if args.eval_metrics_every > 0 and (last_step or (step > 0 and step % args.eval_metrics_every == 0)):
            run.record_metrics(accuracies())
            print0(f"step {step:05d} | " + " | ".join(f"{k} {'n/a' if v is None else f'{v:.4f}'}"
                                                    for k, v in run.metrics.items()) +
                   f" | skipped (longer than {model.rotary_len} tokens): " +
                   ", ".join(f"{k} {n}" for k, n in skipped_problems.items()))
            wandb_run.log({"step": step, **{k: v for k, v in run.metrics.items() if v is not None}})
        if last_step or checkpoints.due(step):
            checkpoints.save(step, meta(), train_batches.state_dict())
        if last_step:
            break

        run.timer.start()
        lrm = warmup_multiplier(step, args.warmup_steps) * (1.0 - step / num_iterations)
        set_schedule(optimizer, lrm)
        # all micro-batches of the step first, so every token is weighted by 1/(supervised tokens of the step);
        # the count stays on the device (no host sync), summed over ranks
        batches = [next(train_batches) for _ in range(grad_accum)]
        num_tokens = all_reduce_sum(sum((y >= 0).sum() for _, y in batches))
        loss_sum, p_sum = 0.0, 0.0
        for x, y in batches:
            loss, p_correct_sum = supervised_loss(train_model, x, y, num_tokens, world_size, alpha)
            loss.backward()
            loss_sum, p_sum = loss_sum + loss.detach(), p_sum + p_correct_sum
        train_batches.prefetch()
        # extras are summed over ranks: num_tokens already is, so each rank sends its 1/world_size share
        train_loss, (p_sum, tokens) = guarded_step(step, optimizer, model, loss_sum,
                                                   extras=[p_sum, num_tokens / world_size])
        mean_p = p_sum / max(tokens, 1)
        dt = run.timer.stop(step)

        speed.tokens_per_step = sum(x.numel() for x, _ in batches) * world_size
        run.record_loss(train_loss)
        print0(format_step(run, num_iterations, train_loss, lrm, dt, speed,
                           extra=f"sup tokens {int(tokens):,} | p(correct) {mean_p:.4f}"))
        wandb_run.log({"step": step, "train/loss": train_loss, "train/p_correct": mean_p, "train/lrm": lrm,
                       "train/num_tokens": int(tokens)})
        run.step += 1

skipped_str = ", ".join(f"{k} {n}" for k, n in skipped_problems.items()) or "n/a (not run)"
print0(f"peak memory: {get_max_memory(device) / 2**20:.0f} MiB | training time: {run.timer.total_time / 60:.2f} min | "
       f"problems skipped as longer than the context: {skipped_str}")
get_report().log("Chat SFT", [user_config, {
    "Training rows": len(train_ds), "Number of iterations": num_iterations, "DDP world size": world_size,
    "Loss": args.loss, "DFT alpha": alpha, "Training loss": train_loss, "Validation loss": run.val_now(),
    "MMLU accuracy": run.metrics_now().get("mmlu_acc"), "ARC-Easy accuracy": run.metrics_now().get("arc_easy_acc"),
    "MMLU problems skipped (too long)": skipped_problems.get("mmlu_acc"),
    "ARC-Easy problems skipped (too long)": skipped_problems.get("arc_easy_acc"),
    "Peak FLOP/s used for MFU": peak.describe()}])
get_report().log_curves("Chat SFT", run.curves)
wandb_run.finish()
compute_cleanup()
