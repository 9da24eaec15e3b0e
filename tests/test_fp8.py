"""FP8 tensorwise scaling: the quantize math against a plain computation, the fp8 linear against an
emulation from dequantized operands (CPU _scaled_mm) and against bf16 (GPU)."""

import pytest
import torch

from nanochat.fp8 import (E4M3, E5M2, quantize, dequantize, fp8_linear, convert_to_fp8, bf16_linears, FP8Linear,
                          check_fp8_supported)
from nanochat.gpt import GPT, GPTConfig, Linear, cpu_kernels


def test_quantize_by_hand():
    x = torch.tensor([[1.0, -2.0], [0.5, 4.0]])
    xq, inv = quantize(x, E4M3)
    # amax 4 -> scale 448 / 4 = 112: the values become 112, -224, 56, 448 (all exact in e4m3)
    assert inv.item() == pytest.approx(4 / 448)
    assert xq.dtype == E4M3
    torch.testing.assert_close(xq.float(), torch.tensor([[112.0, -224.0], [56.0, 448.0]]))
    torch.testing.assert_close(dequantize(xq, inv), x)


@pytest.mark.parametrize("fmt,rel", [(E4M3, 2 ** -4), (E5M2, 2 ** -3)])
def test_round_trip_error_is_one_rounding(fmt, rel):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 64, generator=g) * 3
    xq, inv = quantize(x, fmt)
    # plain computation: float64 scale, clamp, cast, back
    fmax = torch.finfo(fmt).max
    scale = fmax / x.abs().max().double()
    expected = (x.double() * scale).clamp(-fmax, fmax).float().to(fmt).double() / scale
    torch.testing.assert_close(dequantize(xq, inv).double(), expected, rtol=1e-6, atol=1e-9)
    big = x.abs() > x.abs().max() / 8  # well inside the normal range: one rounding of a 3/2-bit mantissa
    assert ((dequantize(xq, inv) - x).abs()[big] <= rel * x.abs()[big]).all()


def test_zero_tensor_does_not_divide_by_zero():
    xq, inv = quantize(torch.zeros(4, 4), E4M3)
    assert torch.isfinite(inv) and (xq.float() == 0).all()


def test_fp8_linear_forward_backward_matches_dequantized_emulation():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 16, 128, generator=g).bfloat16().requires_grad_(True)
    w = (torch.randn(256, 128, generator=g) * 0.05).requires_grad_(True)
    dy = torch.randn(2, 16, 256, generator=g).bfloat16()
    y = fp8_linear(x, w)
    y.backward(dy)
    # emulation: the same quantized operands, multiplied in fp32
    xq, xi = quantize(x.detach().reshape(-1, 128), E4M3)
    wq, wi = quantize(w.detach(), E4M3)
    gq, gi = quantize(dy.reshape(-1, 256), E5M2)
    xd, wd, gd = dequantize(xq, xi), dequantize(wq, wi), dequantize(gq, gi)
    torch.testing.assert_close(y.float().reshape(-1, 256), xd @ wd.t(), rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(x.grad.float().reshape(-1, 128), gd @ wd, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(w.grad, gd.t() @ xd, rtol=1e-2, atol=1e-2)
    assert w.grad.dtype == torch.float32 and x.grad.dtype == torch.bfloat16


def test_forward_uses_fast_accumulation_and_gradients_do_not(monkeypatch):
    calls = []
    real = torch._scaled_mm

    def spy(*args, **kwargs):
        calls.append(kwargs.get("use_fast_accum", False))
        return real(*args, **kwargs)
    monkeypatch.setattr(torch, "_scaled_mm", spy)
    x = torch.randn(32, 128).bfloat16().requires_grad_(True)
    w = (torch.randn(256, 128) * 0.05).requires_grad_(True)
    y = fp8_linear(x, w)
    assert calls == [True]
    y.float().sum().backward()
    assert calls == [True, False, False]  # input grad, weight grad: full-precision accumulation


def test_converted_count_is_the_layers_that_run_in_fp8(monkeypatch):
    # counted independently: the FP8 matmuls a forward + backward really runs (3 per converted layer)
    cfg = GPTConfig(sequence_len=8, vocab_size=256, n_layer=2, n_head=2, n_kv_head=2, n_embd=128)
    model = GPT(cfg)
    model.init_weights(torch.bfloat16)
    n = convert_to_fp8(model)
    calls = []
    real = torch._scaled_mm
    monkeypatch.setattr(torch, "_scaled_mm", lambda *a, **k: calls.append(1) or real(*a, **k))
    with cpu_kernels(False):  # the CUDA code path (CPU _scaled_mm is a slow reference: a few rows only)
        model(torch.randint(0, 256, (1, 8)), torch.randint(0, 256, (1, 8))).backward()
    assert n == len(calls) // 3 == 6 * cfg.n_layer  # q, k, v, proj, fc, mlp proj; never the head
    assert type(model.lm_head) is Linear


def test_convert_only_eligible_linears_and_swap_back():
    cfg = GPTConfig(sequence_len=32, vocab_size=256, n_layer=2, n_head=2, n_kv_head=2, n_embd=128)
    model = GPT(cfg)
    n = convert_to_fp8(model)
    eligible = [m for m in model.transformer.h.modules()
                if isinstance(m, Linear) and min(m.in_features, m.out_features) >= 128]
    assert n == len(eligible) > 0
    assert type(model.transformer.h[0].mlp.c_fc) is FP8Linear
    assert type(model.smear_gate) is Linear  # 24 -> 1: too small
    with bf16_linears(model):
        assert not any(type(m) is FP8Linear for m in model.modules())
    assert type(model.transformer.h[0].mlp.c_fc) is FP8Linear


def test_fp8_flag_is_an_error_without_fp8_hardware():
    if torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9):
        pytest.skip("this GPU supports fp8")
    with pytest.raises(SystemExit, match="--fp8"):
        check_fp8_supported("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.gpu
def test_fp8_linear_close_to_bf16(device):
    # d20's MLP shape on CUDA (fp8 tensor cores from compute capability 8.9); a CPU runs the same function through
    # torch's CPU _scaled_mm, a slow reference (~2 MFLOP/s), at a small shape
    if device == "cuda" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("this GPU has no fp8 tensor cores (_scaled_mm needs compute capability >= 8.9)")
    g = torch.Generator(device=device).manual_seed(0)
    M, K, N = (4096, 1280, 5120) if device == "cuda" else (64, 256, 256)
    x = torch.randn(M, K, device=device, generator=g).bfloat16()
    w = torch.randn(N, K, device=device, generator=g) / K ** 0.5
    ref = (x @ w.bfloat16().t()).float()
    y = fp8_linear(x, w).float()
    # e4m3 keeps 3 mantissa bits: each operand is off by <= 1/16 relative, errors average over K
    rel = (y - ref).norm() / ref.norm()
    assert rel < 0.05, rel.item()
