"""
Hand-written autograd paths for CPU training. In eager fp32 the stock ops' backward makes several extra
passes over the activations (the head's soft-cap + cross-entropy chain ~15 over the (N, V) logits); these
keep what the backward needs and do it in fewer passes. Under torch.compile, SoftcapCE gives inductor the
soft-capped cross-entropy as one row-wise pass each way. Same math as the stock ops (tests compare them).
nanochat.gpt picks them through use_cpu_kernels(x) and use_compiled_cpu_ops(x).
"""

import contextlib

import torch

CE_CHUNK_ELEMS = 1 << 20  # fused loss: logits per chunk (4 MB fp32)

# Under torch.compile these step aside: inductor fuses the stock ops' forward and backward itself, and
# tracing HeadSoftcapCE's in-place chunk loop made it copy the whole (N, V) logits once per chunk (out of
# memory). cpu_kernels(False) turns them off, e.g. to trace or measure the CUDA code path on a CPU.
_CPU_KERNELS = True


@contextlib.contextmanager
def cpu_kernels(enabled: bool):
    """Switch the CPU-only custom autograd paths on or off inside the block (restored on exit)."""
    global _CPU_KERNELS
    before, _CPU_KERNELS = _CPU_KERNELS, bool(enabled)
    try:
        yield
    finally:
        _CPU_KERNELS = before


def use_cpu_kernels(x):
    return _CPU_KERNELS and x.device.type == "cpu" and not torch.compiler.is_compiling()


def use_compiled_cpu_ops(x):  # the compiled loss (SoftcapCE) and embedding (EmbeddingCPU)
    return _CPU_KERNELS and x.device.type == "cpu" and torch.compiler.is_compiling()


@torch.library.custom_op("nanochat::embedding_grad", mutates_args=())
def embedding_grad(grad: torch.Tensor, idx: torch.Tensor, num_rows: int) -> torch.Tensor:
    """An embedding's weight gradient by the eager kernel, opaque to inductor: inductor's own lowering sums the
    rows of a repeated token with atomic adds across threads, in an order that changes from run to run, and so
    do the last bits of the weights (compiled CPU training was not reproducible)."""
    return torch.ops.aten.embedding_dense_backward(grad, idx, num_rows, -1, False)


@embedding_grad.register_fake
def _(grad, idx, num_rows):
    return grad.new_empty((num_rows, grad.size(-1)))


class EmbeddingCPU(torch.autograd.Function):
    """F.embedding whose backward is embedding_grad (bit-reproducible under torch.compile on a CPU)."""

    @staticmethod
    def forward(ctx, idx, weight):
        ctx.save_for_backward(idx)
        ctx.num_rows = weight.size(0)
        return torch.nn.functional.embedding(idx, weight)

    @staticmethod
    def backward(ctx, g):
        idx, = ctx.saved_tensors
        return None, embedding_grad(g.contiguous(), idx, ctx.num_rows)


def embed(idx, weight):
    """F.embedding; in compiled CPU training EmbeddingCPU (see embedding_grad)."""
    if weight.requires_grad and use_compiled_cpu_ops(weight):
        return EmbeddingCPU.apply(idx, weight)
    return torch.nn.functional.embedding(idx, weight)


class RMSNormCPU(torch.autograd.Function):
    """Parameter-free RMS norm keeping y and 1/rms; backward in three passes: dx = rstd * (g - y * mean(g * y))."""

    @staticmethod
    def forward(ctx, x):
        rstd = torch.rsqrt(x.square().mean(-1, keepdim=True) + torch.finfo(x.dtype).eps)
        y = x * rstd
        ctx.save_for_backward(y, rstd)
        return y

    @staticmethod
    def backward(ctx, g):
        y, rstd = ctx.saved_tensors
        dot = (g * y).mean(-1, keepdim=True)
        return torch.addcmul(g, y, dot, value=-1).mul_(rstd)


class ReluSquareCPU(torch.autograd.Function):
    """relu(x)^2 whose backward is one multiply: d/dx = 2*relu(x), kept from the forward."""

    @staticmethod
    def forward(ctx, x):
        r = torch.relu(x)
        y = r * r
        ctx.save_for_backward(r.mul_(2))
        return y

    @staticmethod
    def backward(ctx, g):
        (two_r,) = ctx.saved_tensors
        return g * two_r


class HeadSoftcapCE(torch.autograd.Function):
    """lm_head matmul + soft-cap + cross-entropy in one op (CPU training): the elementwise work runs on
    cache-sized row chunks, in place in the single (N, V) buffer that later becomes the gradient.
    Same math as `cap * tanh(x @ w.T / cap)` -> F.cross_entropy(ignore_index=-1); single backward only."""

    @staticmethod
    def forward(ctx, x, w, targets, cap, reduction):
        # x (N, d), w (V, d), targets (N,) with -1 = ignored
        z = x @ w.t()  # (N, V) raw logits
        N, V = z.shape
        step = max(1, CE_CHUNK_ELEMS // V)  # rows per chunk: elementwise work stays in L2/L3
        lse = torch.empty(N, dtype=z.dtype, device=z.device)
        for i in range(0, N, step):
            zc = z[i:i + step]
            zc.div_(cap).tanh_()  # z holds tanh(l / cap) from here on
            torch.logsumexp(zc * cap, dim=1, out=lse[i:i + step])
        valid = targets != -1
        tgt = targets.clamp(min=0)
        nll = (lse - cap * z.gather(1, tgt.unsqueeze(1)).squeeze(1)) * valid
        n_valid = valid.sum()
        ctx.save_for_backward(x, w, z, lse, tgt, valid, n_valid)
        ctx.cap, ctx.reduction, ctx.step = cap, reduction, step
        if reduction == "none":
            return nll
        return nll.sum() if reduction == "sum" else nll.sum() / n_valid

    @staticmethod
    def backward(ctx, grad):
        x, w, z, lse, tgt, valid, n_valid = ctx.saved_tensors
        cap, step = ctx.cap, ctx.step
        if ctx.reduction == "mean":
            grad = grad / n_valid
        scale = grad * valid  # (N,): 0 on ignored rows
        rows = torch.arange(step, device=z.device)
        for i in range(0, z.size(0), step):
            zc = z[i:i + step]  # (n, V) tanh values -> overwritten by d loss / d raw logits
            n = zc.size(0)
            dcap = 1 - zc.square()  # d(cap * tanh(l / cap)) / dl
            zc.mul_(cap).sub_(lse[i:i + step, None]).exp_()  # softmax of the capped logits
            zc[rows[:n], tgt[i:i + step]] -= 1
            zc.mul_(dcap).mul_(scale[i:i + step, None])
        gx = z @ w if ctx.needs_input_grad[0] else None
        gw = z.t() @ x if ctx.needs_input_grad[1] else None
        return gx, gw, None, None, None


def _tanh(u):
    """tanh(u) = 1 - 2 / (exp(2u) + 1): inductor's vectorized exp is ~3x cheaper than its tanh on a CPU
    (absolute error ~1e-7, all that logits and their gradients need; exp(2u) = inf gives exactly 1)."""
    return 1 - 2 / (torch.exp(2 * u) + 1)


class SoftcapCE(torch.autograd.Function):
    """Per-row cross-entropy of soft-capped logits, cap * tanh(z / cap), with -1 = ignored (loss 0), written
    for inductor: the forward reads z once (no max pass: capped logits are within +-cap, so exp cannot
    overflow for cap <= 80) and gathers the target from z itself, the backward is one elementwise pass from z.
    The stock chain made inductor write the capped logits out in fp32 and read them back several times
    (an (N, V) fp32 tensor per pass). z (N, V) in the compute dtype; returns fp32 (N,)."""

    @staticmethod
    def forward(ctx, z, targets, cap):
        valid = targets != -1
        tgt = targets.clamp(min=0)
        lse = torch.exp(cap * _tanh(z.float() / cap)).sum(-1).log()
        z_tgt = z.gather(1, tgt[:, None])[:, 0].float()
        ctx.save_for_backward(z, lse, tgt, valid)
        ctx.cap = cap
        return (lse - cap * _tanh(z_tgt / cap)) * valid

    @staticmethod
    def backward(ctx, grad):
        z, lse, tgt, valid = ctx.saved_tensors
        cap = ctx.cap
        scale = grad * valid  # (N,)
        t = _tanh(z.float() / cap)
        p = torch.exp(cap * t - lse[:, None])  # softmax of the capped logits
        dz = (p * (1 - t * t) * scale[:, None]).to(z.dtype)
        # the target's entry, (p - 1) * (1 - t^2) * scale, written over it: a compare against the target per
        # element made the pass above ~1.4x slower (it is memory-bound otherwise)
        t_tgt = _tanh(z.gather(1, tgt[:, None])[:, 0].float() / cap)
        at_tgt = (torch.exp(cap * t_tgt - lse) - 1) * (1 - t_tgt * t_tgt) * scale
        return torch.index_put(dz, (torch.arange(z.size(0), device=z.device), tgt), at_tgt.to(z.dtype)), None, None


def softcap_cross_entropy(z, targets, cap, reduction="mean"):
    """F.cross_entropy(cap * tanh(z.float() / cap), targets, ignore_index=-1, reduction=reduction) through
    SoftcapCE; z (N, V), targets (N,)."""
    if not 0 < cap <= 80:
        raise ValueError(f"softcap_cross_entropy needs 0 < cap <= 80 (exp of the capped logits in fp32), got {cap}")
    nll = SoftcapCE.apply(z, targets, cap)
    if reduction == "none":
        return nll
    return nll.sum() if reduction == "sum" else nll.sum() / (targets != -1).sum()
