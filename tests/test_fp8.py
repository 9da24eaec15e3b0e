"""FP8 tensorwise scaling: the quantize math against a plain computation, the fp8 linear against an
emulation from dequantized operands (CPU _scaled_mm) and against bf16 (GPU)."""

import pytest
import torch

from nanochat.fp8 import (E4M3, E5M2, quantize, dequantize, fp8_linear, convert_to_fp8, bf16_linears, FP8Linear,
                          check_fp8_supported)
from nanochat.gpt import GPT, GPTConfig, Linear


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


def test_convert_only_eligible_linears_and_swap_back():
    cfg = GPTConfig(sequence_len=32, vocab_size=256, n_layer=2, n_head=2, n_kv_head=2, n_embd=128)
    model = GPT(cfg)
    n = convert_to_fp8(model)
    eligible = [m for m in model.modules() if isinstance(m, Linear) and min(m.in_features, m.out_features) >= 128]
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
def test_fp8_linear_close_to_bf16_on_gpu():
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("no fp8 tensor cores")
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(4096, 1280, device="cuda", generator=g).bfloat16()
    w = torch.randn(5120, 1280, device="cuda", generator=g) / 1280 ** 0.5
    ref = (x @ w.bfloat16().t()).float()
    y = fp8_linear(x, w).float()
    # e4m3 keeps 3 mantissa bits: each operand is off by <= 1/16 relative, errors average over K = 1280
    rel = (y - ref).norm() / ref.norm()
    assert rel < 0.05, rel.item()
