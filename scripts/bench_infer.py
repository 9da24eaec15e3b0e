"""
Inference benchmark: prefill tok/s; KV-cache decode tok/s at batch 1 and batch N through the Engine (sampling
and the tool state machine included), each beside the weight-read bound measured in the same run (the model's
matrix-vector products alone, same dtype: what batch-1 decode could reach with no other work); naive
generate() tok/s (full recompute per token), the KV-cache speed-up over naive, and peak memory.
Random-init model (the default) or a trained checkpoint (--source). Stop tokens are disabled, so every run
decodes exactly --gen-tokens steps.

CPU (depth 4, head dim 64, seq 512, vocab 8192; greedy, 64-token prompt, 127 decode steps per row):
    OMP_NUM_THREADS=2 python -m scripts.bench_infer --prompt-len=64 --gen-tokens=128 --temperature=0 --naive-tokens=0
    add --dtype=bfloat16 for bf16 weights and activations; --compile=0 / 1 for the eager / compiled decode step
    (default: whichever measured faster for the device and batch size)
On a shared, oversubscribed CPU add OMP_WAIT_POLICY=PASSIVE (or use OMP_NUM_THREADS=1): spinning OpenMP
threads that lose their core to other processes made decode ~10x slower in our runs.
One GPU:
    python -m scripts.bench_infer --depth=20 --batch=32 --prompt-len=512 --gen-tokens=256
A checkpoint:
    python -m scripts.bench_infer --source=sft
"""

import argparse
import time

import torch
import torch.nn.functional as F

from nanochat.common import autodetect_device_type, resolve_precision, get_max_memory, synchronize, print0
from nanochat.common import init_script
from nanochat.engine import Engine, compiled_decode_faster, new_kv_cache
from nanochat.gpt import GPT, config_from_depth, matmul_t, matvec

parser = argparse.ArgumentParser(description="benchmark KV-cache inference against naive generation")
parser.add_argument("--depth", type=int, default=4, help="model depth (random init)")
parser.add_argument("--head-dim", type=int, default=64, help="attention head dimension (random init)")
parser.add_argument("--aspect-ratio", type=int, default=64, help="width = depth * aspect ratio (random init)")
parser.add_argument("--max-seq-len", type=int, default=512, help="model sequence length (random init)")
parser.add_argument("--vocab-size", type=int, default=8192, help="vocabulary size (random init)")
parser.add_argument("--window-pattern", type=str, default="L", help="sliding window pattern (random init)")
parser.add_argument("--source", type=str, default="", help="base|mid|sft|rl: load a checkpoint instead")
parser.add_argument("--model-tag", type=str, default=None, help="checkpoint model tag (with --source)")
parser.add_argument("--step", type=int, default=None, help="checkpoint step (with --source)")
parser.add_argument("--device-type", type=str, default="", help="cpu|cuda|mps (empty = autodetect)")
parser.add_argument("--prompt-len", type=int, default=128, help="prompt tokens")
parser.add_argument("--gen-tokens", type=int, default=128, help="tokens generated per row")
parser.add_argument("--batch", type=int, default=8, help="rows for the batched decode measurement")
parser.add_argument("--naive-tokens", type=int, default=64, help="tokens for the naive generate() measurement")
parser.add_argument("--repeats", type=int, default=3, help="timed repeats (the best is reported)")
parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
parser.add_argument("--top-k", type=int, default=50, help="top-k for sampling (0 = off)")
parser.add_argument("--seed", type=int, default=42, help="seed for weights, prompt and sampling")
parser.add_argument("--dtype", type=str, default="", help="float32|bfloat16 compute dtype (empty = device default)")
parser.add_argument("--compile", type=int, default=-1,
                    help="1 = torch.compile the decode step, 0 = eager, -1 = whichever measured faster for the device "
                         "and batch size (nanochat.engine.COMPILED_DECODE_FASTER)")
args = parser.parse_args()
init_script()

# -----------------------------------------------------------------------------
device_type = args.device_type or autodetect_device_type()
device = torch.device(device_type)
torch.manual_seed(args.seed)
dtype, _, _ = resolve_precision(device_type, args.dtype or None, training=False, verbose=False)
if args.source:
    from nanochat.model_loader import load_model
    model, tokenizer, meta = load_model(args.source, device, phase="eval", model_tag=args.model_tag, step=args.step,
                                        dtype=dtype)
else:
    cfg = config_from_depth(args.depth, aspect_ratio=args.aspect_ratio, head_dim=args.head_dim,
                            max_seq_len=args.max_seq_len, vocab_size=args.vocab_size,
                            window_pattern=args.window_pattern)
    with torch.device("meta"):
        model = GPT(cfg)
    model.to_empty(device=device)
    model.init_weights(dtype)
    model.eval()
cfg = model.config
V = cfg.vocab_size
if args.prompt_len + max(args.gen_tokens, args.naive_tokens) > 10 * cfg.sequence_len:
    raise SystemExit(f"--prompt-len + --gen-tokens must fit the rotary table ({10 * cfg.sequence_len} positions)")
n_params = sum(p.numel() for p in model.parameters())


def decode_compiled(batch):
    return compiled_decode_faster(device_type, batch) if args.compile == -1 else bool(args.compile)


print0(f"model: depth {cfg.n_layer}, d {cfg.n_embd}, heads {cfg.n_head}/{cfg.n_kv_head}, seq {cfg.sequence_len}, "
       f"vocab {V}, window {cfg.window_pattern}, {n_params / 1e6:.1f}M params, {str(dtype).replace('torch.', '')}, "
       f"device {device}, torch threads {torch.get_num_threads()}, decode at batch 1 / {args.batch}: "
       + " / ".join("compiled" if decode_compiled(b) else "eager" for b in (1, args.batch)))


class NoStopTokenizer:
    """Special ids no model emits: the Engine never stops a row or calls the tool during the benchmark."""
    def encode_special(self, name):
        return -1 - ["<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>",
                     "<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>"].index(name)

    def get_bos_token_id(self):
        return -1


engine = Engine(model, NoStopTokenizer())
g = torch.Generator().manual_seed(args.seed)
prompt = torch.randint(0, V, (args.prompt_len,), generator=g).tolist()
sampling = dict(temperature=args.temperature, top_k=args.top_k or None, seed=args.seed)


def timed(fn):
    """Best wall time of --repeats runs of fn (after one warm-up)."""
    fn()
    best = float("inf")
    for _ in range(args.repeats):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return best


# prefill: one batch-1 forward of the prompt into a cache
def run_prefill():
    cache = new_kv_cache(model, 1, args.prompt_len)
    model.forward_cached(torch.tensor([prompt], device=device), cache, last_only=True)


t_prefill = timed(run_prefill)


# decode through the Engine: time from the first column (prefill + first sample) to the last
def run_decode(batch):
    engine.compile = decode_compiled(batch)
    stream = engine.generate(prompt, num_samples=batch, max_tokens=args.gen_tokens, **sampling)
    next(stream)
    synchronize(device)
    t0 = time.perf_counter()
    n = 1 + sum(1 for _ in stream)
    synchronize(device)
    assert n == args.gen_tokens
    return time.perf_counter() - t0


# the weight-read bound: the decode step's matrix-vector products alone, same weights and dtype, done two
# ways (the BLAS call the eager step makes, and the fused loop a compiled step uses); the faster one is the bound
def matvecs(linear, w, x, h):
    out = []  # returned, so that no compiler can drop the work
    for lw in w["layers"]:
        out += [linear(x, lw["qkv"][0]), linear(x, lw["proj"]), linear(x, lw["fc"]), linear(h, lw["mlp_proj"])]
    return out + [linear(x, w["head"])]


compiled_matvecs = torch.compile(matvecs, dynamic=False)


@torch.inference_mode()
def matvec_rate(iters=200):
    ws = model._inference_weights()
    x = torch.randn(1, cfg.n_embd, device=device, dtype=dtype)
    h = torch.randn(1, 4 * cfg.n_embd, device=device, dtype=dtype)
    rates = []
    blas = (ws["cols"], matmul_t) if ws["cols"] is not None else (ws["rows"], F.linear)  # as GPT._layout
    for fn, (w, linear) in ((matvecs, blas), (compiled_matvecs, (ws["rows"], matvec))):
        def loop():
            for _ in range(iters):
                fn(linear, w, x, h)
        rates.append(iters / timed(loop))
    return rates


def decode_rate(batch):
    run_decode(batch)  # warm-up
    return batch * (args.gen_tokens - 1) / min(run_decode(batch) for _ in range(args.repeats))


bound1 = matvec_rate()
dec1 = decode_rate(1)
decB = decode_rate(args.batch)
# measured before and after the decode runs, so a noisy moment does not flatter the ratio
blas, fused = (max(a, b) for a, b in zip(bound1, matvec_rate()))
bound = max(blas, fused)

if args.naive_tokens > 0:
    # naive: the model's generate() recomputes the whole sequence for every token; against it, the engine
    # doing the same job (same prompt, same number of tokens, batch 1), end to end
    t_naive = timed(lambda: sum(1 for _ in model.generate(prompt, max_tokens=args.naive_tokens, **sampling)))
    naive_rate = args.naive_tokens / t_naive
    engine.compile = decode_compiled(1)
    t_engine_same = timed(lambda: sum(1 for _ in engine.generate(prompt, max_tokens=args.naive_tokens, **sampling)))
kv_bytes = 2 * cfg.n_layer * args.batch * (args.prompt_len + args.gen_tokens) * cfg.n_kv_head * \
    (cfg.n_embd // cfg.n_head) * torch.tensor([], dtype=dtype).element_size()

print0(f"prompt {args.prompt_len} tokens, {args.gen_tokens} generated per row, best of {args.repeats}")
print0(f"prefill (batch 1):          {args.prompt_len / t_prefill:10.0f} tok/s  ({t_prefill * 1e3:.1f} ms)")
print0(f"weight-read bound (batch 1): {bound:9.0f} tok/s  (the matrix-vector products alone: {blas:.0f} as "
       f"BLAS calls, {fused:.0f} as a compiled fused loop)")
print0(f"decode batch 1:             {dec1:10.0f} tok/s  ({1e3 / dec1:.2f} ms/token; {dec1 / bound:.0%} of the bound, "
       f"{dec1 / blas:.0%} of the BLAS loop)")
print0(f"decode batch {args.batch:<3d}:           {decB:10.0f} tok/s  ({1e3 * args.batch / decB:.2f} ms/step, "
       f"{decB / bound:.2f}x the batch-1 bound)")
if args.naive_tokens > 0:
    print0(f"naive generate (batch 1):   {naive_rate:10.0f} tok/s  ({args.naive_tokens} tokens)")
    print0(f"KV-cache speed-up, same {args.naive_tokens}-token job end to end: {t_naive / t_engine_same:.1f}x; "
           f"decode tok/s over naive tok/s: {dec1 / naive_rate:.1f}x")
print0(f"KV cache at batch {args.batch}: {kv_bytes / 2**20:.1f} MiB; "
       f"peak memory: {get_max_memory(device) / 2**20:.0f} MiB "
       f"({'max allocated' if device.type == 'cuda' else 'process peak RSS'})")
