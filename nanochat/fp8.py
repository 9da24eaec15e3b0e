"""
FP8 training for the linear layers (`--fp8` in base_train): tensorwise dynamic scaling.

Every matmul of a converted linear (forward, input grad, weight grad) quantizes both operands with one scale
per tensor, fresh on each call: scale = FP8_MAX / max(|x|) (float64, amax floored at 1e-12), then runs
torch._scaled_mm with the inverse scales, producing bf16. Inputs and weights use float8_e4m3fn, output
gradients float8_e5m2 (more range); see Micikevicius et al. 2022, arXiv 2209.05433.
The forward matmul uses Hopper's fast accumulation (use_fast_accum: partial sums in the tensor cores' reduced
precision, promoted less often), worth most of fp8's speed there; the two gradient matmuls keep full-precision
accumulation, as in torchao's float8 training recipe, since gradient errors add up across the K dimension.
Only the block linears with in and out features divisible by 16 (cuBLAS fp8) and >= 128 (smaller gain nothing)
are converted; the head stays bf16 (the model applies it as a plain matmul on a slice of its weight, and its
logits feed the soft-cap and the loss). The fp32 master weights are shared: evaluation runs them as plain bf16
linears in `bf16_linears(model)`.
"""

import contextlib

import torch

from nanochat.gpt import Linear

E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2
AMAX_FLOOR = 1e-12


def check_fp8_supported(device):
    """--fp8 needs a CUDA GPU with fp8 tensor cores (compute capability >= 8.9: Ada, Hopper and newer)."""
    device = torch.device(device)
    if device.type != "cuda":
        raise SystemExit(f"--fp8 needs a CUDA GPU with fp8 tensor cores (Hopper, e.g. H100); this run is on "
                         f"{device.type}. Drop --fp8.")
    cap = torch.cuda.get_device_capability(device)
    if cap < (8, 9):
        raise SystemExit(f"--fp8 needs compute capability >= 8.9 (Hopper, e.g. H100), this GPU "
                         f"({torch.cuda.get_device_name(device)}) is {cap[0]}.{cap[1]}. Drop --fp8.")


def quantize(x, fp8_dtype):
    """x -> (x_fp8, inverse scale as a 0-D fp32 tensor), tensorwise: x ~= x_fp8.float() * inv_scale."""
    fp8_max = torch.finfo(fp8_dtype).max
    amax = x.detach().abs().max().double().clamp_min(AMAX_FLOOR)
    scale = (fp8_max / amax).float()
    xq = (x.float() * scale).clamp(-fp8_max, fp8_max).to(fp8_dtype)
    return xq, scale.reciprocal()


def dequantize(xq, inv_scale, dtype=torch.float32):
    return (xq.float() * inv_scale).to(dtype)


def _mm(a, b, a_inv, b_inv, fast_accum=False):
    """a (M, K) row-major @ b (K, N) column-major, fp8 in, bf16 out (what cuBLAS fp8 GEMMs take)."""
    return torch._scaled_mm(a, b, scale_a=a_inv, scale_b=b_inv, out_dtype=torch.bfloat16, use_fast_accum=fast_accum)


class FP8Matmul(torch.autograd.Function):
    """y = x @ w.T with all three matmuls in fp8. x (M, K), w (N, K) -> y (M, N) bf16."""

    @staticmethod
    def forward(ctx, x, w):
        xq, x_inv = quantize(x, E4M3)
        wq, w_inv = quantize(w, E4M3)
        ctx.save_for_backward(xq, x_inv, wq, w_inv)  # kept in fp8: half the bytes of bf16
        ctx.x_dtype, ctx.w_dtype = x.dtype, w.dtype
        return _mm(xq, wq.t(), x_inv, w_inv, fast_accum=True)  # wq.t() of a row-major weight is column-major

    @staticmethod
    def backward(ctx, g):
        xq, x_inv, wq, w_inv = ctx.saved_tensors
        gq, g_inv = quantize(g, E5M2)
        grad_x = _mm(gq, wq.t().contiguous().t(), g_inv, w_inv)  # (M, N) @ (N, K) column-major
        grad_w = _mm(gq.t().contiguous(), xq.t().contiguous().t(), g_inv, x_inv)  # (N, M) @ (M, K)
        return grad_x.to(ctx.x_dtype), grad_w.to(ctx.w_dtype)


def fp8_linear(x, weight):
    """F.linear(x, weight) through FP8Matmul; x (..., K) any leading shape. Returns bf16."""
    y = FP8Matmul.apply(x.reshape(-1, x.size(-1)), weight)
    return y.view(*x.shape[:-1], weight.size(0))


def _eligible(m):
    return m.in_features % 16 == 0 and m.out_features % 16 == 0 and min(m.in_features, m.out_features) >= 128


def convert_to_fp8(model):
    """Switch every eligible block linear of the model to fp8 matmuls (in place; weights untouched). Returns the
    count: the layers whose matmuls now run in fp8 (never the head, whose forward does not go through the module)."""
    converted = [m for m in model.transformer.h.modules() if type(m) is Linear and _eligible(m)]
    for m in converted:
        m.__class__ = FP8Linear
    return len(converted)


@contextlib.contextmanager
def bf16_linears(model):
    """Evaluation (val bpb, CORE, samples) on the plain bf16 path, with the same weights."""
    converted = [m for m in model.modules() if type(m) is FP8Linear]
    for m in converted:
        m.__class__ = Linear
    try:
        yield model
    finally:
        for m in converted:
            m.__class__ = FP8Linear


class FP8Linear(Linear):
    """A nanochat Linear whose forward runs in fp8 (see the module docstring)."""

    def forward(self, x):
        return fp8_linear(x, self.weight).to(x.dtype)
