"""
Pretrain the base GPT on the pretraining shards: next-token prediction on packed documents, with the
batch size, horizon and learning rates derived from the depth.

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
                             get_max_memory, parse_bool)
from nanochat.files import install_error_handler
from nanochat.tokenizer import get_tokenizer, get_token_bytes
from nanochat.dataloader import PretrainLoader
from nanochat.dataset import get_split_files
from nanochat.gpt import GPT, config_from_depth
from nanochat.loss_eval import evaluate_bpb
from nanochat import checkpoint_manager as ckpt
from nanochat.report import get_report
from nanochat.attention import set_backend_from_flag as set_attn_backend, backend_reason as attn_backend_reason
from nanochat.memory import resolve_device_batch_size, estimate_memory, format_estimate
from nanochat.fp8 import check_fp8_supported, convert_to_fp8, bf16_linears
from nanochat.schedules import lr_multiplier_base, muon_momentum_base, muon_weight_decay_cosine, set_schedule
from nanochat.train_step import (grad_accum_steps, Prefetcher, accumulate_gradients, guarded_step, stop_on_nonfinite,
                                 evaluating)
from nanochat.speed import PeakFlops, StepTimer, Speed, mean_mfu
from nanochat.run_state import RunState, format_step, start_run
from nanochat.resume import Checkpoints, stage_meta

parser = argparse.ArgumentParser(description="Pretrain the base model")
# logging and runtime
parser.add_argument("--run", type=str, default="dummy", help="wandb run name ('dummy' disables wandb)")
parser.add_argument("--device-type", type=str, default="", help="cuda|cpu|mps (empty = autodetect)")
parser.add_argument("--dtype", type=str, default="", help="compute dtype override: bfloat16|float16|float32")
parser.add_argument("--compile", type=parse_bool, default=None, help="torch.compile the model (default: the precision policy)")
parser.add_argument("--attn", type=str, default="auto", choices=["auto", "fa3", "flex", "sdpa"], help="attention backend (auto = FA3 on Hopper, else FlexAttention on CUDA, else SDPA)")
parser.add_argument("--fp8", action="store_true", help="fp8 matmuls in the linear layers (tensorwise scaling; Hopper GPUs); evals stay bf16")
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
parser.add_argument("--device-batch-size", type=str, default="32", help="sequences per forward pass per device, or 'auto' (largest that fits GPU memory)")
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
install_error_handler()

# -----------------------------------------------------------------------------
# Init

is_dist, rank, local_rank, world_size, device = compute_init(args.device_type)
attn_backend = set_attn_backend(args.attn)
print0(f"attention backend: {attn_backend} ({attn_backend_reason()})")
if args.fp8:
    check_fp8_supported(device)
dtype, use_compile, _ = resolve_precision(device.type, args.dtype or None, args.compile)
user_config, wandb_run = start_run(args, "nanochat", device, dtype, use_compile, rank)

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
model.init_weights(dtype)
if args.fp8:
    print0(f"fp8: {convert_to_fp8(model)} linear layers run their matmuls in fp8")
orig_model = model  # uncompiled: optimizer, checkpoints, generation
if use_compile:
    model = torch.compile(model, dynamic=False)  # training and val bpb: fixed (B, T) shapes
param_counts = orig_model.num_scaling_params()
scaling_params = param_counts["transformer_matrices"] + param_counts["lm_head"]
flops_per_token = orig_model.estimate_flops()
print0(f"config: {config}")
print0(f"parameters: {param_counts['total']:,} (scaling: {scaling_params:,}) | FLOPs/token: {flops_per_token:e}")

# Batch size and horizon. The reference point is d12 at 2^19 tokens per step; the batch grows with the
# token budget as D^0.383 (the optimal-batch fit of https://arxiv.org/abs/2505.13738), rounded to 2^k.
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
args.device_batch_size = resolve_device_batch_size(args.device_batch_size, config, device, dtype, fp8=args.fp8,
                                                   compile=use_compile, world_size=world_size,
                                                   total_batch_size=total_batch_size, log=print0)
grad_accum = grad_accum_steps(total_batch_size, args.device_batch_size, args.max_seq_len, world_size)
if args.num_iterations > 0:
    num_iterations = args.num_iterations
elif args.target_flops > 0:
    num_iterations = round(args.target_flops / (flops_per_token * total_batch_size))
elif args.target_param_data_ratio > 0:
    num_iterations = int(args.target_param_data_ratio * scaling_params) // total_batch_size
else:
    raise SystemExit("no training horizon: set --num-iterations, --target-flops or --target-param-data-ratio")
num_iterations = max(num_iterations, 1)
print0(f"total batch: {total_batch_size:,} tokens | grad accum: {grad_accum} | iterations: {num_iterations:,} | "
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

peak = PeakFlops.for_device(device, dtype)
speed = Speed(total_batch_size, flops_per_token, world_size, peak)

# Checkpoint directory and resume
model_tag = args.model_tag or f"d{args.depth}"
checkpoints = Checkpoints(os.path.join(get_base_dir(), "base_checkpoints", model_tag), orig_model, optimizer, rank,
                          device, save_every=args.save_every)
run = RunState("val_bpb", timer=StepTimer(skip=10 if use_compile else 0))
loader_state = None
if args.resume_from_step >= 0:
    ckpt.check_resume_config(ckpt.load_meta(checkpoints.directory, args.resume_from_step), config, tokenizer,
                             checkpoints.directory)
    loader_state = checkpoints.resume(args.resume_from_step, run)

train_batches = Prefetcher(PretrainLoader(tokenizer, args.device_batch_size, args.max_seq_len, "train",
                                          device=device, state=loader_state))
eval_steps = max(1, args.eval_tokens // (args.device_batch_size * args.max_seq_len * world_size))
# CORE's batch shapes vary: its own compiled handle may go dynamic instead of recompiling per shape
core_model = torch.compile(orig_model) if use_compile else orig_model


def val_bpb():
    val_loader = PretrainLoader(tokenizer, args.device_batch_size, args.max_seq_len, "val", device=device)
    with evaluating(orig_model), bf16_linears(orig_model):
        bpb = evaluate_bpb(model, val_loader, eval_steps, token_bytes)  # the compiled model when compiling
    val_loader.close()
    return bpb


def core_metric():
    from nanochat.core_eval import evaluate_core
    with evaluating(orig_model), bf16_linears(orig_model):
        return evaluate_core(core_model, tokenizer, device, max_per_task=args.core_metric_max_per_task)["core"]


PROMPTS = ["The capital of France is", "The chemical symbol of gold is", "If yesterday was Friday, then tomorrow will be",
           "The opposite of hot is", "The planets of the solar system are:", "My favorite color is",
           "If 5*x + 3 = 13, then x is"]


def print_samples():
    bos = tokenizer.get_bos_token_id()
    with evaluating(orig_model), bf16_linears(orig_model):
        for prompt in PROMPTS:
            tokens = tokenizer.encode(prompt, prepend=bos)
            out = list(orig_model.generate(tokens, max_tokens=16, temperature=0))
            print0(f"  {tokenizer.decode(tokens[1:] + out)!r}")


def meta():
    return stage_meta(run, config, user_config, tokenizer, world_size, device_batch_size=args.device_batch_size,
                      max_seq_len=args.max_seq_len, total_batch_size=total_batch_size, attn_backend=attn_backend,
                      **run.metrics_now(), dataloader_state_dict=train_batches.state_dict())


# -----------------------------------------------------------------------------
# Training loop: the evaluations due at this step, the save when due, the stop, then the step.
# The last step (step == num_iterations, after the final update) runs every evaluation, then saves.

with stop_on_nonfinite():
    while True:
        step, last_step = run.step, run.step == num_iterations
        if args.eval_every > 0 and (last_step or step % args.eval_every == 0):
            run.record_val(val_bpb())
            print0(f"step {step:05d} | val bpb {run.val:.6f}")
            wandb_run.log({"step": step, "val/bpb": run.val})
            peak.reprobe(f"step {step}")
        if args.core_metric_every > 0 and (last_step or (step > 0 and step % args.core_metric_every == 0)):
            run.record_metrics({"core_metric": core_metric()})
            print0(f"step {step:05d} | CORE {run.metrics['core_metric']:.4f}")
            wandb_run.log({"step": step, **run.metrics})
        if rank == 0 and args.sample_every > 0 and (last_step or (step > 0 and step % args.sample_every == 0)):
            print_samples()
        if last_step or checkpoints.due(step):
            checkpoints.save(step, meta(), train_batches.state_dict())
        if last_step:
            break

        run.timer.start()
        lrm = lr_multiplier_base(step, num_iterations, warmup_iters, warmdown_iters, args.final_lr_frac)
        set_schedule(optimizer, lrm, momentum=muon_momentum_base(step, num_iterations, warmdown_iters),
                     muon_wd=muon_weight_decay_cosine(step, num_iterations, weight_decay))
        loss_sum = accumulate_gradients(model, train_batches, grad_accum)
        loss, _ = guarded_step(step, optimizer, orig_model, loss_sum)  # the step's one host sync
        dt = run.timer.stop(step)
        if step == 0 and device.type == "cuda":  # the estimate that sized the batch, next to the real peak
            est = estimate_memory(config, args.device_batch_size, dtype, fp8=args.fp8, compile=use_compile,
                                  backend=attn_backend, world_size=world_size)
            print0(f"memory after step 0: peak allocated {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB | "
                   f"{format_estimate(est)}")

        smooth = run.record_loss(loss)
        print0(format_step(run, num_iterations, smooth, lrm, dt, speed,
                           extra=f"epoch {train_batches.epoch} | raw loss {loss:.17g}"))
        if step % 100 == 0:
            wandb_run.log({"step": step, "train/loss": smooth, "train/lrm": lrm,
                           "train/tok_per_sec": speed.tok_per_sec(dt), "train/mfu": speed.mfu(dt)})
        run.step += 1

# -----------------------------------------------------------------------------
# Wrap up

run_mfu = mean_mfu(run, speed)
min_val_str = "n/a (no eval)" if run.min_val is None else f"{run.min_val:.4f}"
print0(f"peak memory: {get_max_memory(device) / 2**20:.0f} MiB | training time: {run.timer.total_time / 60:.2f} min | "
       f"min val bpb: {min_val_str} | mean MFU {'n/a' if run_mfu is None else f'{run_mfu:.2f}%'} "
       f"against {peak.describe()}")
get_report().log("Base model training", [
    user_config,
    {"Number of parameters": param_counts["total"], "Scaling parameters": scaling_params,
     "FLOPs per token": f"{flops_per_token:e}", "Calculated number of iterations": num_iterations,
     "Number of training tokens": total_batch_size * num_iterations,
     "Tokens : Scaling params ratio": total_batch_size * num_iterations / scaling_params,
     "Total batch size": total_batch_size, "DDP world size": world_size, "Attention backend": attn_backend, "Warmup iterations": warmup_iters,
     "Warmdown iterations": warmdown_iters, "Final LR fraction": args.final_lr_frac},
    {"Minimum validation bpb": run.min_val, "Final validation bpb": run.val_now(),
     "CORE metric estimate": run.metrics.get("core_metric"),
     "Tokens per second": None if run_mfu is None else total_batch_size / run.timer.mean(),
     "MFU": None if run_mfu is None else f"{run_mfu:.2f}%", "Peak FLOP/s used for MFU": peak.describe(),
     "Total training FLOPs": f"{flops_per_token * total_batch_size * num_iterations:e}",
     "Total training time": f"{run.timer.total_time / 60:.2f}m",
     "Peak memory usage": f"{get_max_memory(device) / 2**20:.0f} MiB"},
])
get_report().log_curves("Base model training", run.curves)
wandb_run.finish()
train_batches.close()
compute_cleanup()
