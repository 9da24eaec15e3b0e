"""
Midtraining: teach the base model the chat format, tool calls and multiple choice on a large
conversation mixture. Every token is trained except row padding.

One CPU process, offline mirror (no MMLU auxiliary_train there):
    NANOCHAT_DATA_DIR=../shared/data python -m scripts.mid_train --drop mmlu_aux \
        --max-seq-len=512 --device-batch-size=32 --total-batch-size=16384 --num-iterations=200
8 GPUs:
    torchrun --standalone --nproc_per_node=8 -m scripts.mid_train -- --run=mid
Add your own conversations (JSONL, 2 copies) and cap SmolTalk:
    python -m scripts.mid_train --add-data=my_chats.jsonl:2 --cap smoltalk=100000
Resume from saved step S: the same flags plus --resume-from-step=S.
"""

import os
os.environ.setdefault("PYTORCH_ALLOC_CONF", "expandable_segments:True")
import argparse

import torch

from nanochat.common import (compute_init, compute_cleanup, print0, get_base_dir, resolve_precision,
                             get_max_memory, parse_bool, any_rank)
from nanochat.files import install_error_handler
from nanochat.model_loader import load_model
from nanochat.attention import set_backend_from_flag as set_attn_backend
from nanochat.memory import resolve_device_batch_size
from nanochat.tokenizer import get_token_bytes
from nanochat.chat_loader import MidPacker
from nanochat.loss_eval import evaluate_bpb
from nanochat.report import get_report
from nanochat.schedules import WARMUP_STEPS, warmup_multiplier, muon_momentum_mid, set_schedule, scale_lrs
from nanochat.train_step import (grad_accum_steps, Prefetcher, accumulate_gradients, guarded_step, stop_on_nonfinite,
                                 evaluating)
from nanochat.speed import PeakFlops, StepTimer, Speed, mean_mfu
from nanochat.run_state import RunState, format_step, start_run
from nanochat.resume import Checkpoints, stage_meta
from tasks.mixtures import (add_mixture_args, mixtures_from_args, default_mid_sources,
                            default_mid_val_sources)

parser = argparse.ArgumentParser(description="Midtrain a base model on a conversation mixture")
parser.add_argument("--run", type=str, default="dummy", help="wandb run name ('dummy' disables wandb)")
parser.add_argument("--device-type", type=str, default="", help="cuda|cpu|mps (empty = autodetect)")
parser.add_argument("--dtype", type=str, default="", help="compute dtype override: bfloat16|float16|float32")
parser.add_argument("--compile", type=parse_bool, default=None, help="torch.compile the model (default: the precision policy)")
parser.add_argument("--attn", type=str, default="auto", choices=["auto", "fa3", "flex", "sdpa"], help="attention backend (auto = FA3 on Hopper, else FlexAttention on CUDA, else SDPA)")
parser.add_argument("--model-tag", type=str, default=None, help="base checkpoint tag (default: largest d<N>)")
parser.add_argument("--model-step", type=int, default=None, help="base checkpoint step (default: last)")
parser.add_argument("--num-iterations", type=int, default=-1, help="optimizer steps (-1 = one epoch of the mixture)")
parser.add_argument("--max-seq-len", type=int, default=2048, help="row length in tokens")
parser.add_argument("--device-batch-size", type=str, default="32", help="rows per forward pass per device, or 'auto' (largest that fits GPU memory)")
parser.add_argument("--total-batch-size", type=int, default=524288, help="tokens per optimizer step")
parser.add_argument("--embedding-lr", type=float, default=0.2, help="AdamW LR of the token embedding")
parser.add_argument("--unembedding-lr", type=float, default=0.004, help="AdamW LR of lm_head")
parser.add_argument("--matrix-lr", type=float, default=0.02, help="Muon LR of the block matrices")
parser.add_argument("--weight-decay", type=float, default=0.0, help="Muon weight decay (not scheduled)")
parser.add_argument("--init-lr-frac", type=float, default=1.0, help="initial LR as a fraction of the above")
parser.add_argument("--warmup-steps", type=int, default=WARMUP_STEPS, help="linear LR warm-up steps (a new optimizer on a trained model)")
parser.add_argument("--eval-every", type=int, default=150, help="val bpb every N steps (-1 = only at the end)")
parser.add_argument("--eval-tokens", type=int, default=20 * 524288, help="validation tokens per evaluation")
parser.add_argument("--save-every", type=int, default=-1, help="checkpoint every N steps (-1 = only at the end)")
parser.add_argument("--resume-from-step", type=int, default=-1, help="resume this mid run from a saved step")
parser.add_argument("--output-tag", type=str, default=None, help="mid_checkpoints/<tag> (default d<n_layer>)")
parser.add_argument("--dry-run", action="store_true", help="train but write no checkpoint or report")
add_mixture_args(parser, default_mid_sources(), default_mid_val_sources())
args = parser.parse_args()
install_error_handler()

is_dist, rank, local_rank, world_size, device = compute_init(args.device_type)
set_attn_backend(args.attn)
dtype, use_compile, _ = resolve_precision(device.type, args.dtype or None, args.compile)
user_config, wandb_run = start_run(args, "nanochat-mid", device, dtype, use_compile, rank)

train_ds, val_ds = mixtures_from_args(args)

model, tokenizer, base_meta = load_model("base", device, phase="train", model_tag=args.model_tag, step=args.model_step,
                                         dtype=dtype)
config = model.config
args.device_batch_size = resolve_device_batch_size(args.device_batch_size, config, device, dtype, compile=use_compile,
                                                   world_size=world_size, total_batch_size=args.total_batch_size, log=print0)
if args.max_seq_len > config.sequence_len:
    raise SystemExit(f"--max-seq-len={args.max_seq_len} exceeds the base model's context {config.sequence_len}")
base_batch = base_meta.get("device_batch_size")
if base_batch is not None and args.device_batch_size > base_batch:
    print0(f"WARNING: --device-batch-size={args.device_batch_size} is larger than the base run's {base_batch}: "
           f"it may not fit in memory (lower it; gradient accumulation keeps --total-batch-size)")
orig_model = model  # uncompiled: optimizer and checkpoints
if use_compile:
    model = torch.compile(model, dynamic=False)  # training and val bpb: fixed (B, T) shapes
token_bytes = get_token_bytes(device)

grad_accum = grad_accum_steps(args.total_batch_size, args.device_batch_size, args.max_seq_len, world_size)
print0(f"total batch: {args.total_batch_size:,} tokens | grad accum: {grad_accum}")

optimizer = orig_model.setup_optimizers(unembedding_lr=args.unembedding_lr, embedding_lr=args.embedding_lr,
                                        matrix_lr=args.matrix_lr, weight_decay=args.weight_decay)
scale_lrs(optimizer, args.init_lr_frac)

peak = PeakFlops.for_device(device, dtype)
speed = Speed(args.total_batch_size, orig_model.estimate_flops(), world_size, peak)
checkpoints = Checkpoints(os.path.join(get_base_dir(), "mid_checkpoints", args.output_tag or f"d{config.n_layer}"),
                          orig_model, optimizer, rank, device, save_every=args.save_every, write=not args.dry_run)
run = RunState("val_bpb", timer=StepTimer(skip=10 if use_compile else 0))
loader_state = checkpoints.resume(args.resume_from_step, run) if args.resume_from_step >= 0 else None

train_batches = Prefetcher(MidPacker(train_ds, tokenizer, args.device_batch_size, args.max_seq_len, device=device,
                                     state=loader_state))
eval_steps = max(1, args.eval_tokens // (args.device_batch_size * args.max_seq_len * world_size))


def val_bpb():
    loader = MidPacker(val_ds, tokenizer, args.device_batch_size, args.max_seq_len, device=device)
    with evaluating(orig_model):
        bpb = evaluate_bpb(model, loader, eval_steps, token_bytes)  # the compiled model when compiling
    loader.close()
    return bpb


def meta():
    return stage_meta(run, config, user_config, tokenizer, world_size, device_batch_size=args.device_batch_size,
                      max_seq_len=args.max_seq_len, dataloader_state_dict=train_batches.state_dict())


def finished(next_step):
    return next_step >= args.num_iterations if args.num_iterations > 0 else train_batches.progress >= 1.0


# The loop: the evaluation due at this step, the save when due, the stop, then the step. Every rank agrees on
# the last step: whichever finishes its share first stops everybody. After the first check the flag rides on
# each step's one all-reduce.
stop_now = any_rank(finished(run.step), device)
with stop_on_nonfinite():
    while True:
        step, last_step = run.step, stop_now
        if last_step or (args.eval_every > 0 and step % args.eval_every == 0):
            run.record_val(val_bpb())
            print0(f"step {step:05d} | val bpb {run.val:.6f}")
            wandb_run.log({"step": step, "val/bpb": run.val})
            peak.reprobe(f"step {step}")
        if last_step or checkpoints.due(step):
            checkpoints.save(step, meta(), train_batches.state_dict())
        if last_step:
            break

        run.timer.start()
        lrm = warmup_multiplier(step, args.warmup_steps) * \
            (1.0 if run.progress < 0.8 else max(0.0, 1 - (run.progress - 0.8) / 0.2))
        set_schedule(optimizer, lrm, momentum=muon_momentum_mid(step))
        loss_sum = accumulate_gradients(model, train_batches, grad_accum)
        approx = step / args.num_iterations if args.num_iterations > 0 else train_batches.progress
        run.progress = max(run.progress, approx)
        loss, (ranks_finished,) = guarded_step(step, optimizer, orig_model, loss_sum,
                                               extras=[loss_sum.new_full((), float(finished(step + 1)))])
        stop_now = ranks_finished > 0
        dt = run.timer.stop(step)

        smooth = run.record_loss(loss)
        # progress already counts this step's batches: steps so far / progress estimates the epoch's length
        total_est = args.num_iterations if args.num_iterations > 0 else \
            max(step + 1, round((step + 1) / max(run.progress, 1e-9)))
        print0(format_step(run, total_est, smooth, lrm, dt, speed,
                           extra=f"progress {100 * run.progress:.1f}% | epoch {train_batches.epoch} | "
                                 f"raw loss {loss:.17g}"))
        if step % 10 == 0:
            wandb_run.log({"step": step, "train/loss": smooth, "train/lrm": lrm, "train/mfu": speed.mfu(dt)})
        run.step += 1

run_mfu = mean_mfu(run, speed)
truncated = train_batches.truncated
min_val_str = "n/a" if run.min_val is None else f"{run.min_val:.4f}"
print0(f"peak memory: {get_max_memory(device) / 2**20:.0f} MiB | training time: {run.timer.total_time / 60:.2f} min | "
       f"min val bpb: {min_val_str} | truncated conversations: {truncated} | "
       f"mean MFU {'n/a' if run_mfu is None else f'{run_mfu:.2f}%'} against {peak.describe()}")
if not args.dry_run:
    get_report().log("Midtraining", [user_config, {
        "Number of iterations": run.step, "DDP world size": world_size, "Training conversations": len(train_ds),
        "Minimum validation bpb": run.min_val, "Final validation bpb": run.val_now(),
        "Truncated conversations": truncated,
        "MFU": None if run_mfu is None else f"{run_mfu:.2f}%", "Peak FLOP/s used for MFU": peak.describe()}])
    get_report().log_curves("Midtraining", run.curves)
wandb_run.finish()
train_batches.close()
compute_cleanup()
