"""
Pretrain the base GPT on the pretraining shards (REFERENCE 7.2-7.5).

One CPU process (toy scale):
    python -m scripts.base_train --depth=4 --head-dim=64 --window-pattern=L --max-seq-len=512 \
        --device-batch-size=32 --total-batch-size=16384 --num-iterations=200 --eval-every=50
One GPU:
    python -m scripts.base_train --depth=20
8 GPUs:
    torchrun --standalone --nproc_per_node=8 -m scripts.base_train -- --depth=20
Two nodes (run on each node, NODE_RANK=0 on the master):
    torchrun --nnodes=2 --nproc_per_node=8 --node_rank=$NODE_RANK --rdzv-backend=c10d \
        --rdzv-endpoint=$MASTER_ADDR:29500 -m scripts.base_train -- --depth=20
Resume a killed run from its last saved step S (same world size):
    python -m scripts.base_train <same flags> --resume-from-step=S
"""

import os
os.environ.setdefault("PYTORCH_ALLOC_CONF", "expandable_segments:True")
import argparse
import math

import torch

from nanochat.common import (compute_init, compute_cleanup, print0, get_base_dir, resolve_precision,
                             get_wandb, get_max_memory, parse_bool)
from nanochat.tokenizer import get_tokenizer, get_token_bytes
from nanochat.dataloader import PretrainLoader
from nanochat.dataset import get_split_files
from nanochat.gpt import GPT, config_from_depth
from nanochat.loss_eval import evaluate_bpb
from nanochat import checkpoint_manager as ckpt
from nanochat.report import get_report
from nanochat.training import (lr_multiplier_base, muon_momentum_base, muon_weight_decay_cosine, set_schedule,
                               check_finite, NonFiniteLossError, get_peak_flops, StepTimer, format_step,
                               all_reduce_mean, save_training_checkpoint, resume_training)

parser = argparse.ArgumentParser(description="Pretrain the base model")
# logging and runtime
parser.add_argument("--run", type=str, default="dummy", help="wandb run name ('dummy' disables wandb)")
parser.add_argument("--device-type", type=str, default="", help="cuda|cpu|mps (empty = autodetect)")
parser.add_argument("--dtype", type=str, default="", help="compute dtype override: bfloat16|float16|float32")
parser.add_argument("--compile", type=parse_bool, default=None, help="torch.compile the model (default: the precision policy)")
# model
parser.add_argument("--depth", type=int, default=20, help="number of layers; width, heads and LRs follow from it")
parser.add_argument("--aspect-ratio", type=int, default=64, help="model width = depth * aspect ratio (rounded to head dim)")
parser.add_argument("--head-dim", type=int, default=128, help="attention head dimension")
parser.add_argument("--max-seq-len", type=int, default=2048, help="context length")
parser.add_argument("--window-pattern", type=str, default="SSSL", help="sliding-window pattern (S=short, L=long); 'L' is faster without FA3")
# horizon (first positive one wins)
parser.add_argument("--num-iterations", type=int, default=-1, help="explicit number of optimizer steps")
parser.add_argument("--target-flops", type=float, default=-1, help="train for this many FLOPs")
parser.add_argument("--target-param-data-ratio", type=float, default=12, help="tokens : scaling params ratio")
# batch
parser.add_argument("--device-batch-size", type=int, default=32, help="sequences per forward pass per device")
parser.add_argument("--total-batch-size", type=int, default=-1, help="tokens per optimizer step (-1 = auto)")
# optimizer
parser.add_argument("--embedding-lr", type=float, default=0.3, help="AdamW LR of the token embedding")
parser.add_argument("--unembedding-lr", type=float, default=0.008, help="AdamW LR of lm_head")
parser.add_argument("--matrix-lr", type=float, default=0.02, help="Muon LR of the block matrices")
parser.add_argument("--scalar-lr", type=float, default=0.5, help="AdamW LR of the residual scalars")
parser.add_argument("--weight-decay", type=float, default=0.28, help="Muon weight decay (before transfer scaling)")
parser.add_argument("--warmup-steps", type=int, default=40, help="LR warm-up steps")
parser.add_argument("--warmup-ratio", type=float, default=0.0, help="LR warm-up as a fraction of the run (max with --warmup-steps)")
parser.add_argument("--warmdown-ratio", type=float, default=0.65, help="fraction of the run spent decaying the LR")
parser.add_argument("--final-lr-frac", type=float, default=0.05, help="final LR as a fraction of the initial LR")
# evaluation and checkpoints
parser.add_argument("--eval-every", type=int, default=250, help="val bpb every N steps (-1 = off)")
parser.add_argument("--eval-tokens", type=int, default=80 * 524288, help="tokens of validation data per evaluation")
parser.add_argument("--core-metric-every", type=int, default=2000, help="CORE every N steps (-1 = off)")
parser.add_argument("--core-metric-max-per-task", type=int, default=500, help="examples per CORE task during training")
parser.add_argument("--sample-every", type=int, default=2000, help="greedy samples every N steps (-1 = off)")
parser.add_argument("--save-every", type=int, default=-1, help="checkpoint every N steps (-1 = only at the end)")
parser.add_argument("--resume-from-step", type=int, default=-1, help="resume from this saved step")
parser.add_argument("--model-tag", type=str, default=None, help="checkpoint directory name (default d<depth>)")
args = parser.parse_args()
user_config = vars(args).copy()

# -----------------------------------------------------------------------------
# Init

is_dist, rank, local_rank, world_size, device = compute_init(args.device_type)
master = rank == 0
dtype, use_compile, _ = resolve_precision(device.type, args.dtype or None, args.compile)
user_config.update(device_type=device.type, dtype=str(dtype).removeprefix("torch."), compile=use_compile)  # as resolved
wandb_run = get_wandb(args.run, "nanochat", user_config, master)

tokenizer = get_tokenizer()
get_split_files("train"), get_split_files("val")  # fail fast (clear message) before building the model
token_bytes = get_token_bytes(device)
vocab_size = tokenizer.get_vocab_size()
print0(f"vocab size: {vocab_size:,}")

# Model, sized by the depth dial
config = config_from_depth(args.depth, aspect_ratio=args.aspect_ratio, head_dim=args.head_dim,
                           max_seq_len=args.max_seq_len, vocab_size=vocab_size, window_pattern=args.window_pattern)
with torch.device("meta"):
    model = GPT(config)
model.to_empty(device=device)
model.init_weights()
orig_model = model
if use_compile:
    model = torch.compile(model, dynamic=False)
param_counts = orig_model.num_scaling_params()
scaling_params = param_counts["transformer_matrices"] + param_counts["lm_head"]
flops_per_token = orig_model.estimate_flops()
print0(f"config: {config}")
print0(f"parameters: {param_counts['total']:,} (scaling: {scaling_params:,}) | FLOPs/token: {flops_per_token:e}")
if "S" in config.window_pattern.upper() and device.type != "cuda":
    print0("note: sliding windows need explicit masks without FA3; --window-pattern=L is faster here")

# Batch size and horizon (REFERENCE 6.7, 7.3)
B_REF = 2 ** 19
with torch.device("meta"):
    d12 = GPT(config_from_depth(12, aspect_ratio=args.aspect_ratio, head_dim=args.head_dim,
                                max_seq_len=args.max_seq_len, vocab_size=vocab_size, window_pattern=args.window_pattern))
d12_counts = d12.num_scaling_params()
d12_scaling = d12_counts["transformer_matrices"] + d12_counts["lm_head"]
ratio = args.target_param_data_ratio if args.target_param_data_ratio > 0 else 12
target_tokens, ref_tokens = ratio * scaling_params, ratio * d12_scaling
total_batch_size = args.total_batch_size
if total_batch_size == -1:
    total_batch_size = 2 ** round(math.log2(B_REF * (target_tokens / ref_tokens) ** 0.383))
tokens_per_fwdbwd = args.device_batch_size * args.max_seq_len
world_tokens = tokens_per_fwdbwd * world_size
if total_batch_size % world_tokens != 0:
    raise SystemExit(f"--total-batch-size={total_batch_size} must be a multiple of device_batch_size*max_seq_len*world_size "
                     f"= {args.device_batch_size}*{args.max_seq_len}*{world_size} = {world_tokens}; "
                     f"try --total-batch-size={max(1, total_batch_size // world_tokens) * world_tokens}")
grad_accum_steps = total_batch_size // world_tokens
if args.num_iterations > 0:
    num_iterations = args.num_iterations
elif args.target_flops > 0:
    num_iterations = round(args.target_flops / (flops_per_token * total_batch_size))
elif args.target_param_data_ratio > 0:
    num_iterations = int(args.target_param_data_ratio * scaling_params) // total_batch_size
else:
    raise SystemExit("no training horizon: set --num-iterations, --target-flops or --target-param-data-ratio")
num_iterations = max(num_iterations, 1)
print0(f"total batch: {total_batch_size:,} tokens | grad accum: {grad_accum_steps} | iterations: {num_iterations:,} | "
       f"tokens: {total_batch_size * num_iterations:,} (ratio {total_batch_size * num_iterations / scaling_params:.2f})")

# Optimizer with the transfer rules: LRs scale with sqrt(batch), Muon WD keeps B/(lr*wd*D) fixed
batch_lr_scale = (total_batch_size / B_REF) ** 0.5
weight_decay = args.weight_decay * batch_lr_scale * (ref_tokens / target_tokens)
optimizer = orig_model.setup_optimizers(unembedding_lr=args.unembedding_lr * batch_lr_scale,
                                        embedding_lr=args.embedding_lr * batch_lr_scale,
                                        matrix_lr=args.matrix_lr * batch_lr_scale,
                                        weight_decay=weight_decay, scalar_lr=args.scalar_lr * batch_lr_scale)
warmup_iters = max(args.warmup_steps, round(args.warmup_ratio * num_iterations))
warmdown_iters = round(args.warmdown_ratio * num_iterations)

# measured before the resume below: on CPU this runs randn, which must not shift the restored RNG
peak_flops = get_peak_flops(device, dtype)

# Checkpoint directory and resume
model_tag = args.model_tag or f"d{args.depth}"
checkpoint_dir = os.path.join(get_base_dir(), "base_checkpoints", model_tag)
step, val_bpb, min_val_bpb, smooth_loss = 0, None, float("inf"), 0.0
timer = StepTimer(device, skip=10 if use_compile else 0)
loader_state = None
report_curves = {"step": [], "loss": [], "val_step": [], "val_bpb": []}
if args.resume_from_step >= 0:
    ckpt.check_resume_config(ckpt.load_meta(checkpoint_dir, args.resume_from_step), config, tokenizer, checkpoint_dir)
    loader_state, meta = resume_training(checkpoint_dir, args.resume_from_step, orig_model, optimizer, device, rank)
    loop = meta["loop_state"]
    step, val_bpb = meta["step"], meta.get("val_bpb")
    min_val_bpb, smooth_loss = loop["min_val_bpb"], loop["smooth_train_loss"]
    min_val_bpb = float("inf") if min_val_bpb is None else min_val_bpb
    timer = StepTimer(device, skip=10 if use_compile else 0, total_time=loop["total_training_time"],
                      timed_steps=loop["timed_steps"])
    report_curves = loop.get("curves", report_curves)

train_loader = PretrainLoader(tokenizer, args.device_batch_size, args.max_seq_len, "train", device=device,
                              state=loader_state)
eval_steps = max(1, args.eval_tokens // (args.device_batch_size * args.max_seq_len * world_size))


def run_val_bpb():
    val_loader = PretrainLoader(tokenizer, args.device_batch_size, args.max_seq_len, "val", device=device)
    orig_model.eval()
    with torch.no_grad():
        bpb = evaluate_bpb(orig_model, val_loader, eval_steps, token_bytes)
    orig_model.train()
    val_loader.close()
    return bpb


def run_core():
    from nanochat.core_eval import evaluate_core
    orig_model.eval()
    with torch.no_grad():
        out = evaluate_core(orig_model, tokenizer, device, max_per_task=args.core_metric_max_per_task)
    orig_model.train()
    return out


PROMPTS = ["The capital of France is", "The chemical symbol of gold is", "If yesterday was Friday, then tomorrow will be",
           "The opposite of hot is", "The planets of the solar system are:", "My favorite color is",
           "If 5*x + 3 = 13, then x is"]


def run_samples():
    orig_model.eval()
    bos = tokenizer.get_bos_token_id()
    for prompt in PROMPTS:
        tokens = tokenizer.encode(prompt, prepend=bos)
        with torch.no_grad():
            out = list(orig_model.generate(tokens, max_tokens=16, temperature=0))
        print0(f"  {tokenizer.decode(tokens[1:] + out)!r}")
    orig_model.train()


def save(step):
    meta = {
        "step": step, "val_bpb": val_bpb, "model_config": ckpt.config_to_dict(config), "user_config": user_config,
        "device_batch_size": args.device_batch_size, "max_seq_len": args.max_seq_len,
        "total_batch_size": total_batch_size, "world_size": world_size,
        "dataloader_state_dict": train_loader.state_dict(),
        # min_val_bpb is inf before the first eval: stored as null to keep the meta strict JSON
        "loop_state": {"min_val_bpb": min_val_bpb if math.isfinite(min_val_bpb) else None, "smooth_train_loss": smooth_loss,
                       "total_training_time": timer.total_time, "timed_steps": timer.timed_steps,
                       "curves": report_curves},
        "tokenizer": ckpt.tokenizer_info(tokenizer),
    }
    save_training_checkpoint(checkpoint_dir, step, orig_model, optimizer, train_loader, meta, rank, device)


def evaluate_and_log(step, last_step):
    global val_bpb, min_val_bpb, core_result
    if args.eval_every > 0 and (last_step or step % args.eval_every == 0):
        val_bpb = run_val_bpb()
        min_val_bpb = min(min_val_bpb, val_bpb)
        print0(f"step {step:05d} | val bpb {val_bpb:.6f}")
        report_curves["val_step"].append(step)
        report_curves["val_bpb"].append(val_bpb)
        wandb_run.log({"step": step, "val/bpb": val_bpb})
    if args.core_metric_every > 0 and (last_step or (step > 0 and step % args.core_metric_every == 0)):
        core_result = run_core()
        print0(f"step {step:05d} | CORE {core_result['core']:.4f}")
        wandb_run.log({"step": step, "core_metric": core_result["core"]})
    if master and args.sample_every > 0 and (last_step or (step > 0 and step % args.sample_every == 0)):
        run_samples()


# -----------------------------------------------------------------------------
# Training loop

core_result = None
last_tok_per_sec, last_mfu = 0.0, 0.0
try:
    while True:
        last_step = step == num_iterations
        if last_step:
            # the finished model is saved before the final evaluations, which may be slow or interrupted
            save(step)
            evaluate_and_log(step, last_step)
            break
        evaluate_and_log(step, last_step)
        if step > 0 and step != args.resume_from_step and args.save_every > 0 and step % args.save_every == 0:
            save(step)

        timer.start()
        lrm = lr_multiplier_base(step, num_iterations, warmup_iters, warmdown_iters, args.final_lr_frac)
        set_schedule(optimizer, lrm, momentum=muon_momentum_base(step, num_iterations, warmdown_iters),
                     muon_wd=muon_weight_decay_cosine(step, num_iterations, weight_decay))
        loss_sum = 0.0
        for micro_step in range(grad_accum_steps):
            x, y = next(train_loader)
            loss = model(x, y) / grad_accum_steps
            loss.backward()
            loss_sum += loss.item()
        loss_value = all_reduce_mean(loss_sum, device)
        check_finite(loss_value, step, device, orig_model)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        dt = timer.stop(step)

        smooth_loss = 0.9 * smooth_loss + 0.1 * loss_value
        debiased = smooth_loss / (1 - 0.9 ** (step + 1))
        line, last_tok_per_sec, last_mfu = format_step(step, num_iterations, debiased, lrm, dt, total_batch_size,
                                                       flops_per_token, peak_flops, world_size, timer,
                                                       extra=f"epoch {train_loader.epoch} | raw loss {loss_value:.17g}")
        print0(line)
        report_curves["step"].append(step)
        report_curves["loss"].append(loss_value)
        if step % 100 == 0:
            wandb_run.log({"step": step, "train/loss": debiased, "train/lrm": lrm, "train/tok_per_sec": last_tok_per_sec,
                           "train/mfu": last_mfu})
        step += 1
except NonFiniteLossError as e:
    print0(f"ERROR: {e}")
    compute_cleanup()
    raise SystemExit(2)

# -----------------------------------------------------------------------------
# Wrap up

min_val_str = f"{min_val_bpb:.4f}" if math.isfinite(min_val_bpb) else "n/a (no eval)"
print0(f"peak memory: {get_max_memory(device) / 2**20:.0f} MiB | training time: {timer.total_time / 60:.2f} min | "
       f"min val bpb: {min_val_str}")
get_report().log("Base model training", [
    user_config,
    {"Number of parameters": param_counts["total"], "Scaling parameters": scaling_params,
     "FLOPs per token": f"{flops_per_token:e}", "Calculated number of iterations": num_iterations,
     "Number of training tokens": total_batch_size * num_iterations,
     "Tokens : Scaling params ratio": total_batch_size * num_iterations / scaling_params,
     "Total batch size": total_batch_size, "DDP world size": world_size, "Warmup iterations": warmup_iters,
     "Warmdown iterations": warmdown_iters, "Final LR fraction": args.final_lr_frac},
    {"Minimum validation bpb": min_val_bpb if min_val_bpb < float("inf") else None, "Final validation bpb": val_bpb,
     "CORE metric estimate": core_result["core"] if core_result else None,
     "Tokens per second": last_tok_per_sec, "MFU": f"{last_mfu:.2f}%",
     "Total training FLOPs": f"{flops_per_token * total_batch_size * num_iterations:e}",
     "Total training time": f"{timer.total_time / 60:.2f}m",
     "Peak memory usage": f"{get_max_memory(device) / 2**20:.0f} MiB"},
])
get_report().log_curves("Base model training", report_curves)
wandb_run.finish()
train_loader.close()
compute_cleanup()
