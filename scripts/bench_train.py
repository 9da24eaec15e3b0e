"""
Training-step throughput benchmark: tok/s, achieved FLOP/s and MFU of forward + backward + MuonAdamW
step on tokens of a random Markov chain, for the precision policy's configuration (or --dtype/--compile)
and, interleaved step by step in the same run, for fp32 eager (the baseline every speed-up is quoted against). MFU is
against the matmul peak measured in the same run in the compute dtype (and the datasheet peak on known
GPUs). Each configuration runs --warmup-steps untimed steps (compilation happens there), then --steps timed
ones, the configurations alternating step by step so both see the same machine load. Reported: the mean
tok/s over the timed steps (by default steps 4-15 of 16, the figure training logs compare) and the median
step, which a busy moment on a shared machine moves less.
Both configurations start from the same weights and see the same batches (a fresh one each step, from a fixed
random Markov chain), so the loss gap printed at step 14 (the last-but-one) is what the compute dtype costs.

CPU (the issue's target configuration: d4, 512-token rows, 16,384-token steps, vocab 8,192):
    python -m scripts.bench_train --depth=4 --head-dim=64 --max-seq-len=512 --device-batch-size=32 \
        --vocab-size=8192 --window-pattern=L
one GPU (bf16, compiled by the policy; no fp32 baseline; then the same with --fp8 on Hopper):
    python -m scripts.bench_train --depth=20 --max-seq-len=2048 --window-pattern=SSSL --device-batch-size=auto --baseline=0
Profile where the time goes (writes a table of the top ops):
    python -m scripts.bench_train --depth=4 --profile=1
"""

import argparse
import time

import torch

from nanochat.common import (init_script, autodetect_device_type, resolve_precision, measure_matmul_peak,
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
parser.add_argument("--steps", type=int, default=12, help="timed steps per configuration (after the warm-up)")
parser.add_argument("--warmup-steps", type=int, default=4, help="untimed steps first (compilation happens here)")
parser.add_argument("--device-type", type=str, default="", help="cuda|cpu|mps (empty = autodetect)")
parser.add_argument("--dtype", type=str, default="", help="compute dtype bfloat16|float16|float32 (empty = policy)")
parser.add_argument("--compile", type=parse_bool, default=None, help="torch.compile the model (default: policy)")
parser.add_argument("--baseline", type=parse_bool, default=True, help="also time fp32 eager, interleaved")
parser.add_argument("--profile", type=parse_bool, default=False, help="profile two steps and print the top ops")
parser.add_argument("--attn", type=str, default="auto", choices=["auto", "fa3", "flex", "sdpa"], help="attention backend")
parser.add_argument("--fp8", action="store_true", help="fp8 matmuls in the linear layers (Hopper GPUs)")
args = parser.parse_args()
init_script()
if args.warmup_steps < 1:
    parser.error(f"--warmup-steps must be >= 1 (the first step compiles and is timed apart), got {args.warmup_steps}")

device_type = args.device_type or autodetect_device_type()
device = torch.device(device_type)
dtype, use_compile, _ = resolve_precision(device_type, args.dtype or None, args.compile)
if args.profile and device_type == "cpu":  # name each compiled C++ kernel in the profile (set before compiling)
    import torch._inductor.config
    torch._inductor.config.cpp.enable_kernel_profile = True
torch.manual_seed(0)
attn_backend = set_backend_from_flag(args.attn)
print0(f"attention backend: {attn_backend} ({backend_reason()})")
if args.fp8:
    from nanochat.fp8 import check_fp8_supported, convert_to_fp8
    check_fp8_supported(device)

# Peaks first, while nothing else of ours is resident
peak = measure_matmul_peak(device, dtype)
peak32 = measure_matmul_peak(device, torch.float32) if dtype != torch.float32 else peak
datasheet = get_datasheet_peak_flops(device)
print0(f"device: {device_type} | threads: {torch.get_num_threads()}")
print0(f"measured matmul peak: {str(dtype).removeprefix('torch.')} {peak / 1e12:.3f} TFLOP/s, "
       f"fp32 {peak32 / 1e12:.3f}" + (f" | datasheet: {datasheet / 1e12:.0f}" if datasheet != float("inf") else ""))

config = config_from_depth(args.depth, aspect_ratio=args.aspect_ratio, head_dim=args.head_dim,
                           max_seq_len=args.max_seq_len, vocab_size=args.vocab_size, window_pattern=args.window_pattern)
B = args.device_batch_size = resolve_device_batch_size(args.device_batch_size, config, device, dtype, fp8=args.fp8,
                                                       compile=use_compile, log=print0)
T = args.max_seq_len


def make_batches(n, seed=0, branching=4):
    """n (x, y) batches of a fixed random Markov chain, each token followed by one of `branching` successors:
    learnable (the loss falls towards ln(branching)) and fresh every step, so the loss gap between two
    configurations measures the compute dtype, not how chaotically each memorises one repeated batch."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    successors = torch.randint(0, args.vocab_size, (args.vocab_size, branching), generator=gen)
    batches = []
    for _ in range(n):
        tok = torch.randint(0, args.vocab_size, (B,), generator=gen)
        choice = torch.randint(0, branching, (B, T), generator=gen)
        seq = [tok]
        for t in range(T):
            seq.append(successors[seq[-1], choice[:, t]])
        seq = torch.stack(seq, dim=1)  # (B, T + 1)
        batches.append((seq[:, :-1].to(device), seq[:, 1:].to(device)))
    return batches


batches = make_batches(args.warmup_steps + args.steps)


def build(dt, compiled):
    """A freshly initialised model in compute dtype `dt` and a train_step closure over it."""
    torch.manual_seed(0)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights(dtype=dt)
    if args.fp8 and dt != torch.float32:
        print0(f"fp8: {convert_to_fp8(model)} linear layers")
    optimizer = model.setup_optimizers(compile=compiled)
    fwd = torch.compile(model, dynamic=False) if compiled else model

    def train_step(i):
        x, y = batches[i % len(batches)]
        loss = fwd(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss
    return model, train_step


name = f"{str(dtype).removeprefix('torch.')} {'compiled' if use_compile else 'eager'}"
runs = {name: build(dtype, use_compile)}
if args.baseline and (dtype, use_compile) != (torch.float32, False):
    runs["float32 eager"] = build(torch.float32, False)
model = runs[name][0]
flops_per_token = model.estimate_flops()
print0(f"model: depth {config.n_layer}, width {config.n_embd}, heads {config.n_head}, "
       f"params {sum(p.numel() for p in model.parameters()):,}, FLOPs/token {flops_per_token:.3e} | "
       f"batch {B}x{T} = {B * T:,} tokens/step")

losses = {label: [] for label in runs}  # per step: equal flags, so the precisions' gap is the dtype's alone
for label, (_, step) in runs.items():
    t0 = time.perf_counter()
    for i in range(args.warmup_steps):
        losses[label].append(step(i).item())
        if i == 0:  # the first step compiles: its time is reported apart from the step times
            t_first = time.perf_counter() - t0
    print0(f"{label}: compile + first step {t_first:.1f} s, {args.warmup_steps - 1} more warm-up steps in "
           f"{time.perf_counter() - t0 - t_first:.1f} s")
if device_type == "cuda":
    torch.cuda.reset_peak_memory_stats()

times = {label: [] for label in runs}
for i in range(args.warmup_steps, args.warmup_steps + args.steps):  # interleaved: the same machine load
    for label, (_, step) in runs.items():
        t0 = time.perf_counter()
        loss = step(i)
        synchronize(device)
        times[label].append(time.perf_counter() - t0)
        losses[label].append(loss.item())
peak_after = measure_matmul_peak(device, dtype)  # a second look: how much did the machine's load move?
best_peak = max(peak, peak_after)

tok_s, mean_tok_s = {}, {}
first, last = args.warmup_steps, args.warmup_steps + args.steps - 1
for label, ts in times.items():
    mean_tok_s[label] = sum(B * T / t for t in ts) / len(ts)  # the mean of the per-step tok/s a training log shows
    ts = sorted(ts)
    median = ts[len(ts) // 2]
    tok_s[label] = B * T / median
    achieved = flops_per_token * tok_s[label]
    print0(f"{label:>16}: {mean_tok_s[label]:,.0f} tok/s mean over steps {first}-{last} | {tok_s[label]:,.0f} tok/s "
           f"median (step {median * 1e3:.0f} ms, min {ts[0] * 1e3:.0f}, max {ts[-1] * 1e3:.0f})")
    print0(f"{'':>16}  median: {achieved / 1e12:.4f} TFLOP/s = {100 * achieved / best_peak:.1f}% of the "
           f"{str(dtype).removeprefix('torch.')} matmul peak, {100 * achieved / max(peak32, 1):.1f}% of fp32's; "
           # on a shared machine the fastest step is the least load-distorted figure
           f"best step {B * T / ts[0]:,.0f} tok/s = {100 * flops_per_token * B * T / ts[0] / best_peak:.1f}% of the peak")
print0(f"throughput: {mean_tok_s[name]:,.0f} tok/s ({name}, mean over steps {first}-{last} of {last + 1})")
if len(tok_s) == 2:
    base = min(times["float32 eager"])
    print0(f"speed-up of {name} over float32 eager: {mean_tok_s[name] / mean_tok_s['float32 eager']:.2f}x "
           f"(means over steps {first}-{last}), {tok_s[name] / tok_s['float32 eager']:.2f}x (medians), "
           f"{base / min(times[name]):.2f}x (best steps)")
if len(tok_s) == 2:  # the same init, batch and optimizer: how far the compute dtype moves the loss
    a, b = losses[name][last - 1], losses["float32 eager"][last - 1]
    print0(f"loss at step {last - 1}: {a:.4f} ({name}) vs {b:.4f} (float32 eager), gap {a - b:+.4f}")
print0(f"matmul peak before {peak / 1e12:.3f}, after {peak_after / 1e12:.3f} TFLOP/s (the higher one is used)")
if datasheet != float("inf"):
    print0(f"MFU vs datasheet peak: {100 * flops_per_token * tok_s[name] / datasheet:.1f}%")
print0(f"peak memory (all configurations): {get_max_memory(device) / 2**20:,.0f} MiB")
if device_type == "cuda":  # the estimate that sized the batch, next to the real peak
    est = estimate_memory(config, B, dtype, fp8=args.fp8, compile=use_compile, backend=attn_backend)
    print0(f"peak memory vs estimate: {get_max_memory(device) / 2**30:.2f} GiB measured | {format_estimate(est)}")

if args.profile:
    from torch.profiler import profile, ProfilerActivity
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device_type == "cuda" else [])
    step = runs[name][1]
    with profile(activities=activities) as prof:
        for i in range(2):
            step(i)
        synchronize(device)
    sort_key = "cuda_time_total" if device_type == "cuda" else "self_cpu_time_total"
    print0(prof.key_averages().table(sort_by=sort_key, row_limit=25))
    if device_type == "cuda":  # GPU busy time (kernels, one stream) against the two steps' wall time
        median = B * T / tok_s[name]
        busy = sum(e.self_device_time_total for e in prof.key_averages()) / 1e6
        print0(f"step time outside GPU kernels: {100 * max(0.0, 1 - busy / (2 * median)):.1f}% "
               f"(kernels {busy * 1e3 / 2:.1f} ms of {median * 1e3:.1f} ms per step)")
