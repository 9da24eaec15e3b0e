"""Precision policy (dtype + compile per device), the CPU-only autograd kernels against stock ops, and
compiled vs eager training loss in fp32 and bf16."""

import math
import os

import pytest
import torch
import torch.nn.functional as F

import nanochat.attention as attn
import nanochat.cpu_ops as cpu_ops
import nanochat.common as common
import nanochat.gpt as gpt
from nanochat.common import resolve_precision
from nanochat.gpt import GPT, GPTConfig


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    monkeypatch.delenv("NANOCHAT_DTYPE", raising=False)  # the user's override: each test sets it where it means to
    attn.set_backend("sdpa")
    yield
    attn.set_backend(None)


def with_probe(monkeypatch, ratio):
    """A CPU without AMX / AVX512-BF16 flags whose probe measures `ratio` (None: the real probe runs)."""
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    if ratio is not None:
        monkeypatch.setattr(common, "probe_cpu_bf16_speedup", lambda: ratio)


def no_probe(monkeypatch):
    monkeypatch.setattr(common, "probe_cpu_bf16_speedup", lambda: pytest.fail("the CPU probe ran"))

# -----------------------------------------------------------------------------
# policy


@pytest.mark.parametrize("ratio, want", [(4.5, (torch.bfloat16, True)), (1.2, (torch.float32, False)),
                                         (0.3, (torch.float32, False))])
def test_cpu_follows_the_probe(monkeypatch, ratio, want):
    with_probe(monkeypatch, ratio)
    dtype, compiled, reason = resolve_precision("cpu", verbose=False)
    assert (dtype, compiled) == want
    assert f"{ratio:.1f}x" in reason  # the measured figure is logged with the choice


def test_flags_override_the_probe(monkeypatch):
    with_probe(monkeypatch, 4.5)
    assert resolve_precision("cpu", "float32", False, verbose=False)[:2] == (torch.float32, False)
    assert resolve_precision("cpu", "float32", True, verbose=False)[:2] == (torch.float32, True)
    assert resolve_precision("cpu", "float32", None, verbose=False)[:2] == (torch.float32, False)  # fp32: eager
    with_probe(monkeypatch, 0.5)
    assert resolve_precision("cpu", "bfloat16", None, verbose=False)[:2] == (torch.bfloat16, True)  # bf16: compiled
    assert resolve_precision("cpu", None, True, verbose=False)[:2] == (torch.float32, True)


def test_explicit_dtype_needs_no_probe(monkeypatch):
    no_probe(monkeypatch)
    assert resolve_precision("cpu", "float32", verbose=False)[:2] == (torch.float32, False)


def test_env_dtype_is_the_users_choice_and_is_never_written(monkeypatch):
    with_probe(monkeypatch, 4.5)
    monkeypatch.setenv("NANOCHAT_DTYPE", "float32")
    dtype, compiled, reason = resolve_precision("cpu", verbose=False)
    assert (dtype, compiled) == (torch.float32, False) and "$NANOCHAT_DTYPE" in reason
    assert resolve_precision("cpu", "bfloat16", verbose=False)[0] == torch.bfloat16  # --dtype wins over it
    assert os.environ["NANOCHAT_DTYPE"] == "float32"
    monkeypatch.delenv("NANOCHAT_DTYPE")
    resolve_precision("cpu", "float32", verbose=False)  # an explicit choice binds no later call
    assert "NANOCHAT_DTYPE" not in os.environ
    assert resolve_precision("cpu", verbose=False)[0] == torch.bfloat16


def test_bad_dtype_names_the_flag(monkeypatch):
    with pytest.raises(ValueError, match="--dtype"):
        resolve_precision("cpu", "fp8", verbose=False)
    monkeypatch.setenv("NANOCHAT_DTYPE", "fp16")
    with pytest.raises(ValueError, match="NANOCHAT_DTYPE"):
        resolve_precision("cpu", verbose=False)


@pytest.mark.parametrize("cap, want", [((9, 0), (torch.bfloat16, True)), ((8, 0), (torch.bfloat16, True)),
                                       ((7, 5), (torch.float32, True))])
def test_cuda_defaults(monkeypatch, cap, want):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: cap)
    assert resolve_precision("cuda", verbose=False)[:2] == want
    assert resolve_precision("cuda", training=False, verbose=False)[:2] == (want[0], False)  # inference: eager


def test_mps_default_is_fp32_eager(monkeypatch):
    no_probe(monkeypatch)  # no CPU probe for another device
    assert resolve_precision("mps", verbose=False)[:2] == (torch.float32, False)


def test_cpu_inference_is_fp32_eager_whatever_the_cpu(monkeypatch):
    with_probe(monkeypatch, 4.5)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    no_probe(monkeypatch)
    assert resolve_precision("cpu", training=False, verbose=False)[:2] == (torch.float32, False)
    assert resolve_precision("cpu", "bfloat16", training=False, verbose=False)[:2] == (torch.bfloat16, False)


@pytest.mark.parametrize("flag", ["_is_amx_tile_supported", "_is_avx512_bf16_supported"])
def test_native_bf16_flags_decide_without_timing(monkeypatch, flag):
    with_probe(monkeypatch, None)
    monkeypatch.setattr(torch.cpu, flag, lambda: True, raising=False)
    no_probe(monkeypatch)
    dtype, compiled, reason = resolve_precision("cpu", verbose=False)
    assert (dtype, compiled) == (torch.bfloat16, True)
    assert ("AMX" if "amx" in flag else "AVX512-BF16") in reason


def test_policy_draws_no_random_numbers(monkeypatch):
    # the scripts seed, resolve the precision, then initialise the model: a probe drawing from the global RNG
    # made a policy run initialise another model than an explicit --dtype run of the same choice
    with_probe(monkeypatch, None)
    common.probe_cpu_bf16_speedup.cache_clear()  # the timing probe really runs
    torch.manual_seed(42)
    resolve_precision("cpu", verbose=False)
    after_policy = torch.rand(4)
    torch.manual_seed(42)
    assert torch.equal(torch.rand(4), after_policy)


def test_probe_is_measured_once(monkeypatch):
    common.probe_cpu_bf16_speedup.cache_clear()
    r = common.probe_cpu_bf16_speedup()
    assert math.isfinite(r) and r > 0
    monkeypatch.setattr(torch, "randn", None)  # a second measurement would crash
    assert common.probe_cpu_bf16_speedup() == r


def test_the_model_computes_in_the_dtype_it_is_given(monkeypatch):
    monkeypatch.setenv("NANOCHAT_DTYPE", "bfloat16")  # the policy's input, never the model's
    assert build(None).compute_dtype == torch.float32
    model = build(torch.bfloat16)
    # bf16 compute, fp32 master weights: every parameter stays fp32 so small updates are kept
    assert model.compute_dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in model.parameters())
    seen = []
    for linear in (model.transformer.h[0].attn.c_q, model.transformer.h[-1].mlp.c_proj):  # first and last matmul
        linear.register_forward_hook(lambda m, i, o: seen.append((i[0].dtype, o.dtype)))
    with torch.no_grad():
        model(torch.randint(0, 96, (1, 8)))
    assert seen == [(torch.bfloat16, torch.bfloat16)] * 2  # the layers really run in bf16


def test_bf16_compute_keeps_the_residual_scalars_gradients_at_zero_at_init():
    # At init every block's output projection is zero, so the residual scalars only rescale the stream, which
    # the final norm undoes: their gradient is exactly 0. From a bf16 residual stream it came out as rounding
    # noise (~1e-7) that Adam (eps 1e-8) turned into full-size steps of random sign, and the bf16 run drifted
    # from the fp32 one. The stream is fp32 (only the matmuls' inputs are bf16): noise at fp32's level.
    cfg = GPTConfig(sequence_len=64, vocab_size=96, n_layer=3, n_head=2, n_kv_head=1, n_embd=64)
    with torch.device("meta"):
        model = GPT(cfg)
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights(dtype=torch.bfloat16)  # the real init (build() randomises the zeroed projections)
    idx = torch.randint(0, 96, (8, 64), generator=torch.Generator().manual_seed(0))
    model(idx, idx).backward()
    for name in ("resid_lambdas", "x0_lambdas", "backout_lambda"):
        grad = getattr(model, name).grad
        assert grad.abs().max().item() < 1e-9, (name, grad)
    assert model.smear_lambda.grad.abs().item() > 1e-6  # a scalar that does matter at init still learns

# -----------------------------------------------------------------------------
# CPU-only kernels against stock ops


def test_rms_norm_kernel_matches_stock_op():
    x = torch.randn(3, 5, 16, dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, 5, 16, dtype=torch.float64)
    y = gpt.RMSNormCPU.apply(x)
    (gx,) = torch.autograd.grad(y, x, g)
    x2 = x.detach().clone().requires_grad_()
    y2 = F.rms_norm(x2, (16,), eps=torch.finfo(torch.float64).eps)
    (gx2,) = torch.autograd.grad(y2, x2, g)
    torch.testing.assert_close(y, y2)
    torch.testing.assert_close(gx, gx2)


def test_relu_square_kernel_matches_stock_op():
    x = torch.randn(4, 33, dtype=torch.float64, requires_grad=True)
    g = torch.randn(4, 33, dtype=torch.float64)
    y = gpt.ReluSquareCPU.apply(x)
    (gx,) = torch.autograd.grad(y, x, g)
    x2 = x.detach().clone().requires_grad_()
    y2 = torch.where(x2 > 0, x2 * x2, torch.zeros_like(x2))
    (gx2,) = torch.autograd.grad(y2, x2, g)
    torch.testing.assert_close(y, y2)
    torch.testing.assert_close(gx, gx2)
    torch.testing.assert_close(gx, torch.where(x > 0, 2 * x * g, torch.zeros_like(g)))


def build(dtype, seed=0):
    cfg = GPTConfig(sequence_len=32, vocab_size=96, n_layer=3, n_head=2, n_kv_head=1, n_embd=32, window_pattern="SL",
                    short_window=8)
    with torch.device("meta"):
        model = GPT(cfg)
    model.to_empty(device="cpu")
    torch.manual_seed(seed)
    model.init_weights(dtype=dtype)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # the init zeroes output projections: make every path matter
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.size(1)))
    return model


def loss_and_grads(model, fwd=None):
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 96, (2, 32), generator=g)
    y = torch.randint(0, 96, (2, 32), generator=g)
    y[0, :5] = -1
    model.zero_grad(set_to_none=True)
    loss = (model if fwd is None else fwd)(x, y)
    loss.backward()
    return loss.detach().float(), {n: p.grad.float().clone() for n, p in model.named_parameters()}


def test_cpu_kernels_switch_matches_stock_path():
    model = build(torch.float32)
    assert cpu_ops._CPU_KERNELS
    l1, g1 = loss_and_grads(model)  # RMSNormCPU, ReluSquareCPU, HeadSoftcapCE
    with gpt.cpu_kernels(False):
        assert not cpu_ops._CPU_KERNELS
        l2, g2 = loss_and_grads(model)  # F.rms_norm, relu().square(), linear + tanh + F.cross_entropy
    assert cpu_ops._CPU_KERNELS  # restored
    torch.testing.assert_close(l1, l2, atol=1e-5, rtol=1e-5)
    for n in g1:
        torch.testing.assert_close(g1[n], g2[n], atol=1e-5 * (1 + g2[n].abs().max().item()), rtol=1e-4, msg=n)

# -----------------------------------------------------------------------------
# compiled == eager (slow: inductor compiles C++ for each graph)

# fp32: the same math in a different order, so a few ulps apart. bf16: inductor keeps fused intermediates
# in fp32 where eager rounds every op's output (2^-8 relative), so the two differ by bf16 noise; compiled
# bf16 must be no farther from the fp32 result than eager bf16 is (with a margin), loss and each gradient.


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_loss_matches_eager(dtype):
    torch._dynamo.reset()
    model = build(dtype)
    le, ge = loss_and_grads(model)
    lc, gc = loss_and_grads(model, torch.compile(model, dynamic=False))

    def err(a, b):
        return ((a - b).norm() / b.norm().clamp_min(1e-6)).item()  # some grads are exactly 0 at init
    if dtype == torch.float32:
        torch.testing.assert_close(lc, le, atol=0, rtol=1e-5)
        for n in ge:
            assert err(gc[n], ge[n]) < 1e-4, n
        return
    l32, g32 = loss_and_grads(build(torch.float32))
    assert abs(lc - l32) <= 2 * abs(le - l32) + 1e-3 * l32
    for n in ge:
        assert err(gc[n], g32[n]) <= 2 * err(ge[n], g32[n]) + 1e-2, (n, err(gc[n], g32[n]), err(ge[n], g32[n]))


def test_tf32_through_the_fp32_precision_api(monkeypatch):
    from nanochat.common import enable_tf32
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    if not hasattr(matmul, "fp32_precision"):
        pytest.skip(f"torch {torch.__version__} predates the fp32_precision settings")
    before = matmul.fp32_precision, conv.fp32_precision
    names = []
    real_setattr = type(matmul).__setattr__

    def spy(self, name, value):
        names.append(name)
        return real_setattr(self, name, value)
    monkeypatch.setattr(type(matmul), "__setattr__", spy)
    monkeypatch.setattr(type(torch.backends.cudnn), "allow_tf32", property(
        lambda self: True, lambda self, v: pytest.fail("the deprecated cudnn.allow_tf32 flag was set")))
    try:
        matmul.fp32_precision, conv.fp32_precision = "ieee", "ieee"
        enable_tf32()
        assert (matmul.fp32_precision, conv.fp32_precision) == ("tf32", "tf32")
        assert "allow_tf32" not in names  # the deprecated flag is never touched
    finally:
        monkeypatch.undo()
        matmul.fp32_precision, conv.fp32_precision = before
