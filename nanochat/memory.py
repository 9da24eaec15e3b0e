"""
Training memory, estimated before anything is allocated, so a run fits by construction.

estimate_memory(config, device_batch_size, dtype, ...) counts the bytes one training step holds at its peak
(end of the forward / start of the backward of the last micro-batch):
  weights        fp32 masters, every parameter (GPT.init_weights)
  grads          one per parameter, in its dtype (they persist across micro-batches)
  optimizer      AdamW moments (2 x fp32) for embeddings, head, scalars; Muon momentum (fp32) + factored 2nd moment
  weight_copies  the compute-dtype copy of every linear weight that the forward casts and autograd keeps
  activations    saved for backward, per layer, for the dtype / fp8 / compile / window / attention backend
  logits         the fp32 (N, V) head tensors kept for backward, plus the fp32 gradient created next to them
  transient      the largest short-lived buffer outside those (the optimizer's stacked fp32 group)
auto_device_batch_size() picks the largest batch whose estimate fits the free GPU memory with a margin.
The activation count follows nanochat.gpt's GPU code path; tests/test_memory.py checks it against the bytes
autograd actually saves, on a CPU.
"""

import torch

from nanochat.gpt import GPT

# compiled training keeps fewer activations: Inductor's min-cut partitioner recomputes cheap pointwise
# results (norm upcasts, residual mixes, relu) in the backward. Measured with saved-tensor hooks around the
# compiled model on a CPU (GPU code path, bf16): 0.83 of the eager bytes per layer, and one fp32 (N, V) head
# tensor saved instead of two. runs/gpu_check.sh prints the estimate next to torch.cuda.max_memory_allocated.
COMPILE_ACTIVATION_FACTOR = 0.83
MARGIN = 0.90  # use at most this fraction of the free memory (allocator fragmentation, CUDA workspaces)


def _param_counts(config):
    with torch.device("meta"):
        model = GPT(config)
    counts = model.num_scaling_params()
    counts["head_used"] = config.vocab_size * config.n_embd  # forward uses lm_head[:V], never the padded rows
    shapes = {}
    for p in model.transformer.h.parameters():
        shapes[tuple(p.shape)] = shapes.get(tuple(p.shape), 0) + p.numel()
    counts["largest_muon_group"] = max(shapes.values()) if shapes else 0
    counts["window_sizes"] = model.window_sizes
    return counts


def _layer_activation_bytes(config, N, dtype, fp8, backend, layer_idx, window_left):
    """Bytes one block saves for backward for N = B*T tokens (eager autograd, GPU code path)."""
    from nanochat.gpt import has_value_embed
    e = torch.finfo(dtype).bits // 8
    d, H, Hkv = config.n_embd, config.n_head, config.n_kv_head
    kv = Hkv * (d // H)
    lin = 1 if fp8 else e  # inputs of the linear layers are kept quantized under fp8
    T = config.sequence_len
    # RMS norm keeps its input upcast to fp32 plus fp32 1/rms per row (stock rms_norm decomposition)
    def rms(n_el, rows):
        return n_el * 4 + rows * 4
    b = N * d * 4                            # block input, the fp32 residual stream (the scalar multiply keeps it)
    b += rms(N * d, N) + N * d * lin         # norm, normalized input of q/k/v
    b += rms(N * d, N * H) + rms(N * kv, N * Hkv)  # QK-norm of q and k (rotary needs nothing saved)
    # attention (flash / FA3 / FlexAttention): q, k, v, the output (which is also c_proj's input), lse
    b += N * d * e + N * d * max(e, lin) + N * H * 4
    if 0 <= window_left < T - 1 and backend == "sdpa":
        # banded SDPA: keys and values gathered (P+1)x per query chunk, and its additive band mask
        C = max(1, -(-window_left // 2))
        P = -(-window_left // C)
        b += 2 * (P + 1) * N * kv * e + N * (P + 1) * C * e
    else:
        b += 2 * N * kv * e
    if has_value_embed(layer_idx, config.n_layer):
        b += N * kv * e + 2 * N * Hkv * e    # value embedding and its gate (sigmoid output, broadcast)
        if fp8:
            b += N * d * e  # the (bf16, too small for fp8) gate reads a slice of the normalized input: kept whole
    # MLP: norm, normalized input, relu output, relu^2 as c_proj's input
    b += rms(N * d, N) + N * d * lin + N * 4 * d * e + N * 4 * d * lin
    return b


def estimate_memory(config, device_batch_size, dtype=torch.bfloat16, fp8=False, compile=True, backend="fa3",
                    world_size=1):
    """Peak training memory per device, in bytes, as a dict (see the module docstring) with a "total".
    backend: the attention backend ("fa3" | "flex" | "sdpa"); only "sdpa" with sliding windows saves more.
    world_size: optimizer state is sharded over ranks (ZeRO-2 style), weights and grads are not."""
    if device_batch_size < 1:
        raise ValueError(f"device_batch_size must be >= 1, got {device_batch_size}")
    c = _param_counts(config)
    e = torch.finfo(dtype).bits // 8
    N = device_batch_size * config.sequence_len
    V, d = config.vocab_size, config.n_embd
    emb = c["wte"] + c["value_embeds"]
    weights = c["total"] * 4
    adamw = c["lm_head"] + emb + c["scalars"]
    optimizer = (adamw * 8 + c["transformer_matrices"] * 4) / world_size
    # fp8 linears keep their fp8 weight; the head stays in the compute dtype
    weight_copies = c["transformer_matrices"] * (1 if fp8 else e) + c["head_used"] * e
    acts = sum(_layer_activation_bytes(config, N, dtype, fp8, backend, i, left)
               for i, (left, _) in enumerate(c["window_sizes"]))
    # outside the blocks: embedding norm, smear, x0, final norm and the head's input
    acts += N * d * (3 * e + 8) + N * 8
    if compile:
        acts *= COMPILE_ACTIVATION_FACTOR
    # head: eager saves the fp32 tanh output and log-softmax, compiled one fp32 (N, V) tensor; the backward
    # then creates one fp32 gradient of the same size next to them
    logits = (1 if compile else 2) * N * V * 4 + N * V * 4
    transient = 3 * c["largest_muon_group"] * 4
    out = {k: int(v) for k, v in dict(weights=weights, grads=weights, optimizer=optimizer, weight_copies=weight_copies,
                                      activations=acts, logits=logits, transient=transient).items()}
    out["total"] = sum(out.values())
    return out


def format_estimate(est):
    gib = 2 ** 30
    parts = " | ".join(f"{k} {v / gib:.2f}" for k, v in est.items() if k != "total")
    return f"memory estimate: {est['total'] / gib:.2f} GiB ({parts} GiB)"


def auto_device_batch_size(config, device, dtype=torch.bfloat16, fp8=False, compile=True, backend="fa3",
                           world_size=1, total_batch_size=None, max_batch=1024, free_bytes=None, margin=MARGIN):
    """Largest power-of-two device batch whose estimate fits `free_bytes` (default: the device's free memory
    now) times `margin`. With total_batch_size (tokens per optimizer step) the batch must also divide it
    exactly: total_batch_size % (batch * seq_len * world_size) == 0, so gradient accumulation is exact.
    Returns (batch, estimate dict). Raises when not even one sequence fits."""
    device = torch.device(device)
    if free_bytes is None:
        if device.type != "cuda":
            raise ValueError(f"--device-batch-size=auto needs a CUDA device to measure free memory (got {device.type}); "
                             "pass an integer batch size")
        free_bytes, _ = torch.cuda.mem_get_info(device)
        free_bytes += torch.cuda.memory_allocated(device)  # the model's weights, already resident, are in the estimate
    budget = free_bytes * margin
    T = config.sequence_len
    best = None
    for b in (2 ** i for i in range(max_batch.bit_length())):  # powers of two up to max_batch
        if total_batch_size is None or total_batch_size % (b * T * world_size) == 0:
            est = estimate_memory(config, b, dtype, fp8=fp8, compile=compile, backend=backend, world_size=world_size)
            if est["total"] > budget:
                break
            best = (b, est)
    if best is None:
        est = estimate_memory(config, 1, dtype, fp8=fp8, compile=compile, backend=backend, world_size=world_size)
        raise RuntimeError(f"not even one sequence of {T} tokens fits: {format_estimate(est)} vs "
                           f"{budget / 2**30:.1f} GiB usable; use a smaller --depth or --max-seq-len")
    return best


def resolve_device_batch_size(value, config, device, dtype, fp8=False, compile=True, world_size=1,
                              total_batch_size=None, log=print):
    """The training scripts' --device-batch-size: an int, or "auto" (picked from the estimate and logged)."""
    if str(value) != "auto":
        try:
            b = int(value)
        except ValueError:
            raise SystemExit(f"--device-batch-size must be a positive integer or 'auto', got {value!r}")
        if b < 1:
            raise SystemExit(f"--device-batch-size must be a positive integer or 'auto', got {value!r}")
        return b
    from nanochat.attention import get_backend
    if torch.device(device).type != "cuda":
        raise SystemExit("--device-batch-size=auto needs a CUDA GPU (it sizes the batch to free GPU memory); "
                         "pass an integer, e.g. --device-batch-size=32")
    tb = total_batch_size if total_batch_size and total_batch_size > 0 else None
    b, est = auto_device_batch_size(config, device, dtype, fp8=fp8, compile=compile, backend=get_backend(),
                                    world_size=world_size, total_batch_size=tb)
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        # free memory differs a little between GPUs: every rank must use the same batch (the smallest)
        t = torch.tensor([b], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        if int(t.item()) != b:
            b = int(t.item())
            est = estimate_memory(config, b, dtype, fp8=fp8, compile=compile, backend=get_backend(), world_size=world_size)
    log(f"device batch size: auto -> {b} | {format_estimate(est)}")
    return b
