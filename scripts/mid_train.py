"""
Midtraining (REFERENCE 7.7): teach the base model the chat format, tool calls and multiple choice
on a large conversation mixture. Every token is trained except row padding.

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

from nanochat.common import (compute_init, compute_cleanup, print0, get_base_dir, resolve_precision, get_wandb,
                             get_max_memory, parse_bool)
from nanochat.checkpoint_manager import load_model
from nanochat import checkpoint_manager as ckpt
from nanochat.tokenizer import get_token_bytes
from nanochat.chat_loader import MidPacker
from nanochat.loss_eval import evaluate_bpb
from nanochat.report import get_report
from nanochat.training import (muon_momentum_mid, set_schedule, check_finite, NonFiniteLossError, get_peak_flops,
                               StepTimer, format_step, all_reduce_mean, any_rank, scale_lrs, save_training_checkpoint,
                               resume_training)
from tasks.mixtures import (add_mixture_args, mixtures_from_args, default_mid_sources,
                            default_mid_val_sources)

parser = argparse.ArgumentParser(description="Midtrain a base model on a conversation mixture")
parser.add_argument("--run", type=str, default="dummy", help="wandb run name ('dummy' disables wandb)")
parser.add_argument("--device-type", type=str, default="", help="cuda|cpu|mps (empty = autodetect)")
parser.add_argument("--dtype", type=str, default="", help="compute dtype override: bfloat16|float16|float32")
parser.add_argument("--compile", type=parse_bool, default=None, help="torch.compile the model (default: the precision policy)")
parser.add_argument("--model-tag", type=str, default=None, help="base checkpoint tag (default: largest d<N>)")
parser.add_argument("--model-step", type=int, default=None, help="base checkpoint step (default: last)")
parser.add_argument("--num-iterations", type=int, default=-1, help="optimizer steps (-1 = one epoch of the mixture)")
parser.add_argument("--max-seq-len", type=int, default=2048, help="row length in tokens")
parser.add_argument("--device-batch-size", type=int, default=32, help="rows per forward pass per device")
parser.add_argument("--total-batch-size", type=int, default=524288, help="tokens per optimizer step")
parser.add_argument("--embedding-lr", type=float, default=0.2, help="AdamW LR of the token embedding")
parser.add_argument("--unembedding-lr", type=float, default=0.004, help="AdamW LR of lm_head")
parser.add_argument("--matrix-lr", type=float, default=0.02, help="Muon LR of the block matrices")
parser.add_argument("--weight-decay", type=float, default=0.0, help="Muon weight decay (not scheduled)")
parser.add_argument("--init-lr-frac", type=float, default=1.0, help="initial LR as a fraction of the above")
parser.add_argument("--eval-every", type=int, default=150, help="val bpb every N steps (-1 = only at the end)")
parser.add_argument("--eval-tokens", type=int, default=20 * 524288, help="validation tokens per evaluation")
parser.add_argument("--save-every", type=int, default=-1, help="checkpoint every N steps (-1 = only at the end)")
parser.add_argument("--resume-from-step", type=int, default=-1, help="resume this mid run from a saved step")
parser.add_argument("--output-tag", type=str, default=None, help="mid_checkpoints/<tag> (default d<n_layer>)")
parser.add_argument("--dry-run", action="store_true", help="train but write no checkpoint or report")
add_mixture_args(parser, default_mid_sources(), default_mid_val_sources())
args = parser.parse_args()
user_config = vars(args).copy()

is_dist, rank, local_rank, world_size, device = compute_init(args.device_type)
master = rank == 0
dtype, use_compile, _ = resolve_precision(device.type, args.dtype or None, args.compile)
user_config.update(device_type=device.type, dtype=str(dtype).removeprefix("torch."), compile=use_compile)  # as resolved
wandb_run = get_wandb(args.run, "nanochat-mid", user_config, master)

train_ds, val_ds = mixtures_from_args(args)

model, tokenizer, base_meta = load_model("base", device, phase="train", model_tag=args.model_tag, step=args.model_step)
config = model.config
if args.max_seq_len > config.sequence_len:
    raise SystemExit(f"--max-seq-len={args.max_seq_len} exceeds the base model's context {config.sequence_len}")
base_batch = base_meta.get("device_batch_size")
if base_batch is not None and args.device_batch_size > base_batch:
    print0(f"WARNING: --device-batch-size={args.device_batch_size} is larger than the base run's {base_batch}: "
           f"it may not fit in memory (lower it; gradient accumulation keeps --total-batch-size)")
orig_model = model
if use_compile:
    model = torch.compile(model, dynamic=False)
token_bytes = get_token_bytes(device)
flops_per_token = orig_model.estimate_flops()

tokens_per_fwdbwd = args.device_batch_size * args.max_seq_len
world_tokens = tokens_per_fwdbwd * world_size
if args.total_batch_size % world_tokens != 0:
    raise SystemExit(f"--total-batch-size={args.total_batch_size} must be a multiple of device_batch_size*max_seq_len*"
                     f"world_size = {world_tokens}")
grad_accum_steps = args.total_batch_size // world_tokens
print0(f"total batch: {args.total_batch_size:,} tokens | grad accum: {grad_accum_steps}")

optimizer = orig_model.setup_optimizers(unembedding_lr=args.unembedding_lr, embedding_lr=args.embedding_lr,
                                        matrix_lr=args.matrix_lr, weight_decay=args.weight_decay)
scale_lrs(optimizer, args.init_lr_frac)

output_dir = os.path.join(get_base_dir(), "mid_checkpoints", args.output_tag or f"d{config.n_layer}")
step, progress, min_val_bpb, val_bpb, smooth_loss = 0, 0.0, float("inf"), None, 0.0
timer = StepTimer(device, skip=10 if use_compile else 0)
loader_state = None
curves = {"step": [], "loss": [], "val_step": [], "val_bpb": []}
peak_flops = get_peak_flops(device, dtype)  # before resuming: measuring it draws random numbers
if args.resume_from_step >= 0:
    loader_state, meta = resume_training(output_dir, args.resume_from_step, orig_model, optimizer, device, rank)
    loop = meta["loop_state"]
    step, progress, min_val_bpb = meta["step"], loop["progress"], loop["min_val_bpb"]
    smooth_loss, val_bpb, curves = loop["smooth_train_loss"], meta.get("val_bpb"), loop.get("curves", curves)
    timer = StepTimer(device, skip=10 if use_compile else 0, total_time=loop["total_training_time"],
                      timed_steps=loop["timed_steps"])

train_loader = MidPacker(train_ds, tokenizer, args.device_batch_size, args.max_seq_len, device=device,
                         state=loader_state)
eval_steps = max(1, args.eval_tokens // (args.device_batch_size * args.max_seq_len * world_size))


def run_val_bpb():
    loader = MidPacker(val_ds, tokenizer, args.device_batch_size, args.max_seq_len, device=device)
    orig_model.eval()
    with torch.no_grad():
        bpb = evaluate_bpb(orig_model, loader, eval_steps, token_bytes)
    orig_model.train()
    return bpb


def make_meta(step):
    return {"step": step, "val_bpb": val_bpb, "model_config": ckpt.config_to_dict(config), "user_config": user_config,
            "device_batch_size": args.device_batch_size, "max_seq_len": args.max_seq_len, "world_size": world_size,
            "dataloader_state_dict": train_loader.state_dict(),
            "loop_state": {"progress": progress, "min_val_bpb": min_val_bpb, "smooth_train_loss": smooth_loss,
                           "total_training_time": timer.total_time, "timed_steps": timer.timed_steps, "curves": curves},
            "tokenizer": ckpt.tokenizer_info(tokenizer)}


def save(step):
    if args.dry_run:
        return
    save_training_checkpoint(output_dir, step, orig_model, optimizer, train_loader, make_meta(step), rank, device)


def record_final_eval(step):
    """The last step is saved before its evaluation; put that evaluation's result into the step's meta."""
    if not args.dry_run and master:
        ckpt.update_meta(output_dir, step, make_meta(step))


def evaluate(step):
    global val_bpb, min_val_bpb
    val_bpb = run_val_bpb()
    min_val_bpb = min(min_val_bpb, val_bpb)
    curves["val_step"].append(step)
    curves["val_bpb"].append(val_bpb)
    print0(f"step {step:05d} | val bpb {val_bpb:.6f}")
    wandb_run.log({"step": step, "val/bpb": val_bpb})


try:
    while True:
        # every rank agrees on the last step: whichever finishes its share first stops everybody
        done = (step >= args.num_iterations) if args.num_iterations > 0 else (train_loader.progress >= 1.0)
        last_step = any_rank(done, device)
        if last_step:
            save(step)  # the finished model is on disk before the (interruptible) final evaluation
            evaluate(step)
            record_final_eval(step)
            break
        if args.eval_every > 0 and step % args.eval_every == 0:
            evaluate(step)
        if step > 0 and step != args.resume_from_step and args.save_every > 0 and step % args.save_every == 0:
            save(step)

        timer.start()
        lrm = 1.0 if progress < 0.8 else max(0.0, 1 - (progress - 0.8) / 0.2)
        set_schedule(optimizer, lrm, momentum=muon_momentum_mid(step))
        loss_sum = 0.0
        for _ in range(grad_accum_steps):
            x, y = next(train_loader)
            loss = model(x, y) / grad_accum_steps
            loss.backward()
            loss_sum += loss.item()
            approx = step / args.num_iterations if args.num_iterations > 0 else train_loader.progress
            progress = max(progress, approx)
        loss_value = all_reduce_mean(loss_sum, device)
        check_finite(loss_value, step, device, orig_model)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        dt = timer.stop(step)

        smooth_loss = 0.9 * smooth_loss + 0.1 * loss_value
        debiased = smooth_loss / (1 - 0.9 ** (step + 1))
        # progress already counts this step's batches: steps so far / progress estimates the epoch's length
        total_est = args.num_iterations if args.num_iterations > 0 else \
            max(step + 1, round((step + 1) / max(progress, 1e-9)))
        line, tok_per_sec, mfu = format_step(step, total_est, debiased, lrm, dt, args.total_batch_size, flops_per_token,
                                             peak_flops, world_size, timer,
                                             extra=f"progress {100 * progress:.1f}% | epoch {train_loader.epoch}")
        print0(line)
        curves["step"].append(step)
        curves["loss"].append(loss_value)
        if step % 10 == 0:
            wandb_run.log({"step": step, "train/loss": debiased, "train/lrm": lrm, "train/mfu": mfu})
        step += 1
except NonFiniteLossError as e:
    print0(f"ERROR: {e}")
    compute_cleanup()
    raise SystemExit(2)

print0(f"peak memory: {get_max_memory(device) / 2**20:.0f} MiB | training time: {timer.total_time / 60:.2f} min | "
       f"min val bpb: {min_val_bpb:.4f} | truncated conversations: {train_loader.truncated}")
if not args.dry_run:
    get_report().log("Midtraining", [user_config, {
        "Number of iterations": step, "DDP world size": world_size, "Training conversations": len(train_ds),
        "Minimum validation bpb": min_val_bpb, "Truncated conversations": train_loader.truncated}])
    get_report().log_curves("Midtraining", curves)
wandb_run.finish()
compute_cleanup()
