"""
Training-step throughput benchmark: tok/s, achieved FLOP/s and MFU of forward + backward + MuonAdamW
step on random tokens, against the matmul peak measured in the same run (and the datasheet peak on
known GPUs), plus peak memory. Numbers are per process.

CPU (the issue's target configuration):
    OMP_NUM_THREADS=2 python -m scripts.bench_train --depth=4 --head-dim=64 --max-seq-len=256 \
        --device-batch-size=32 --vocab-size=8192 --window-pattern=L
one GPU (bf16; then the same with --fp8 on Hopper):
    python -m scripts.bench_train --depth=20 --max-seq-len=2048 --window-pattern=SSSL --device-batch-size=auto --compile=1
Profile where the time goes (writes a table of the top ops):
    python -m scripts.bench_train --depth=4 --profile=1
"""

import argparse
import time

import torch

from nanochat.common import (autodetect_device_type, get_compute_dtype, measure_matmul_peak,
                             get_datasheet_peak_flops, get_max_memory, synchronize, parse_bool, print0)
from nanochat.gpt import GPT, config_from_depth
from nanochat.attention import set_backend_from_flag, backend_reason
from nanochat.memory import resolve_device_batch_size, estimate_memory, format_estimate

parser = argparse.ArgumentParser(description="measure training-step throughput and MFU")
parser.add_argument("--depth", type=int, default=4, help="model depth (the width follows, see config_from_depth)")
parser.add_argument("--aspect-ratio", type=int, default=64, help="width = depth * aspect ratio")
parser.add_argument("--head-dim", type=int, default=128, help="attention head dimension")
parser.add_argument("--max-seq-len", type=int, default=256, help="sequence length T")
parser.add_argument("--device-batch-size", type=str, default="32", help="sequences per step B, or 'auto' (largest that fits GPU memory)")
parser.add_argument("--vocab-size", type=int, default=32768, help="vocabulary size")
parser.add_argument("--window-pattern", type=str, default="L", help="sliding-window pattern, e.g. SSSL or L")
parser.add_argument("--steps", type=int, default=10, help="timed steps (after the warm-up)")
parser.add_argument("--warmup-steps", type=int, default=3, help="untimed steps first")
parser.add_argument("--device-type", type=str, default="", help="cuda|cpu|mps (empty = autodetect)")
parser.add_argument("--dtype", type=str, default="", help="compute dtype bfloat16|float16|float32 (empty = policy)")
parser.add_argument("--compile", type=parse_bool, default=False, help="torch.compile the model")
parser.add_argument("--profile", type=parse_bool, default=False, help="profile two steps and print the top ops")
parser.add_argument("--attn", type=str, default="auto", choices=["auto", "fa3", "flex", "sdpa"], help="attention backend")
parser.add_argument("--fp8", action="store_true", help="fp8 matmuls in the linear layers (Hopper GPUs)")
args = parser.parse_args()

device_type = args.device_type or autodetect_device_type()
device = torch.device(device_type)
dtype = get_compute_dtype(device_type, args.dtype or None)
if args.dtype:  # the model reads the dtype policy from the environment
    import os
    os.environ["NANOCHAT_DTYPE"] = args.dtype
torch.manual_seed(0)
attn_backend = set_backend_from_flag(args.attn)
print0(f"attention backend: {attn_backend} ({backend_reason()})")
if args.fp8:
    from nanochat.fp8 import check_fp8_supported, convert_to_fp8
    check_fp8_supported(device)

# Peak first, while nothing else of ours is resident
peak = measure_matmul_peak(device, dtype)
datasheet = get_datasheet_peak_flops(device)
print0(f"device: {device_type} | threads: {torch.get_num_threads()} | dtype: {str(dtype).replace('torch.', '')}")
print0(f"measured matmul peak: {peak / 1e12:.3f} TFLOP/s" + (f" | datasheet: {datasheet / 1e12:.0f} TFLOP/s"
                                                             if datasheet != float("inf") else ""))

config = config_from_depth(args.depth, aspect_ratio=args.aspect_ratio, head_dim=args.head_dim,
                           max_seq_len=args.max_seq_len, vocab_size=args.vocab_size, window_pattern=args.window_pattern)
with torch.device("meta"):
    model = GPT(config)
model.to_empty(device=device)
model.init_weights()
if args.fp8:
    print0(f"fp8: {convert_to_fp8(model)} linear layers")
args.device_batch_size = resolve_device_batch_size(args.device_batch_size, config, device, dtype, fp8=args.fp8,
                                                   compile=args.compile, log=print0)
optimizer = model.setup_optimizers()
train_model = torch.compile(model, dynamic=False) if args.compile else model
flops_per_token = model.estimate_flops()
n_params = sum(p.numel() for p in model.parameters())
B, T = args.device_batch_size, args.max_seq_len
print0(f"model: depth {config.n_layer}, width {config.n_embd}, heads {config.n_head}, params {n_params:,}, "
       f"FLOPs/token {flops_per_token:.3e} | batch {B}x{T} = {B * T:,} tokens/step")

gen = torch.Generator(device="cpu").manual_seed(0)
x = torch.randint(0, args.vocab_size, (B, T), generator=gen).to(device)
y = torch.randint(0, args.vocab_size, (B, T), generator=gen).to(device)


def train_step():
    loss = train_model(x, y)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def timed_phases():
    """One step split into forward / backward / optimizer (synchronized between phases)."""
    t0 = time.perf_counter()
    loss = train_model(x, y)
    synchronize(device)
    t1 = time.perf_counter()
    loss.backward()
    synchronize(device)
    t2 = time.perf_counter()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    synchronize(device)
    t3 = time.perf_counter()
    return t1 - t0, t2 - t1, t3 - t2


for _ in range(args.warmup_steps):
    train_step()
synchronize(device)
if device_type == "cuda":
    torch.cuda.reset_peak_memory_stats()

step_times = []
for _ in range(args.steps):
    t0 = time.perf_counter()
    train_step()
    synchronize(device)
    step_times.append(time.perf_counter() - t0)
phases = [timed_phases() for _ in range(2)]
peak_after = measure_matmul_peak(device, dtype)  # a second look: how much did the machine's load move?

step_times.sort()
median = step_times[len(step_times) // 2]
tok_per_s = B * T / median
achieved = flops_per_token * tok_per_s
fwd, bwd, opt = (min(p[i] for p in phases) for i in range(3))
print0(f"step time: median {median * 1e3:.1f} ms, min {step_times[0] * 1e3:.1f}, max {step_times[-1] * 1e3:.1f} "
       f"(spread {100 * (step_times[-1] - step_times[0]) / median:.0f}%)")
print0(f"phases: forward {fwd * 1e3:.1f} ms | backward {bwd * 1e3:.1f} ms | optimizer {opt * 1e3:.1f} ms")
print0(f"throughput: {tok_per_s:,.0f} tok/s | achieved {achieved / 1e12:.4f} TFLOP/s")
print0(f"MFU vs measured peak: {100 * achieved / peak:.1f}% (peak before {peak / 1e12:.3f}, after "
       f"{peak_after / 1e12:.3f} TFLOP/s; vs the better of the two: {100 * achieved / max(peak, peak_after):.1f}%)")
# on a shared machine the fastest step against the higher peak is the least load-distorted pairing
best = flops_per_token * B * T / step_times[0]
print0(f"best step: {B * T / step_times[0]:,.0f} tok/s, MFU {100 * best / max(peak, peak_after):.1f}% of the higher peak")
if datasheet != float("inf"):
    print0(f"MFU vs datasheet peak: {100 * achieved / datasheet:.1f}%")
print0(f"peak memory: {get_max_memory(device) / 2**20:,.0f} MiB")
est = estimate_memory(config, B, dtype, fp8=args.fp8, compile=args.compile, backend=attn_backend)
if device_type == "cuda":
        print0(f"peak memory vs estimate: {get_max_memory(device) / 2**30:.2f} GiB measured | {format_estimate(est)}")

if args.profile:
    from torch.profiler import profile, ProfilerActivity
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device_type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(2):
            train_step()
        synchronize(device)
    sort_key = "cuda_time_total" if device_type == "cuda" else "self_cpu_time_total"
    print0(prof.key_averages().table(sort_by=sort_key, row_limit=25))
    if device_type == "cuda":  # GPU busy time (kernels, one stream) against the two steps' wall time
        busy = sum(e.self_device_time_total for e in prof.key_averages()) / 1e6
        wall = 2 * median
        print0(f"step time outside GPU kernels: {100 * max(0.0, 1 - busy / wall):.1f}% "
               f"(kernels {busy * 1e3 / 2:.1f} ms of {median * 1e3:.1f} ms per step)")
