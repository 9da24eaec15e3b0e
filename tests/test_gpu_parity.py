"""The GPU code path against the fp32 CPU reference (same weights): forward and backward, and KV-cache decode
against the full forward. `gpu` tests: on CUDA with the backend the GPU really picks (FA3 on Hopper with the
kernel, else FlexAttention); on a CPU the same bodies through the CUDA code path (bf16, stock ops)."""

import dataclasses

import pytest
import torch

import nanochat.attention as attn
from nanochat.attention import KVCache
from conftest import tiny_gpt
from nanochat.gpt import GPTConfig

pytestmark = pytest.mark.gpu

CFG = GPTConfig(sequence_len=256, vocab_size=512, n_layer=4, n_head=4, n_kv_head=2, n_embd=256, window_pattern="SSL",
                short_window=64)


@pytest.fixture(autouse=True)
def auto_backend():
    attn.set_backend(None)  # whatever the device runs for real
    yield
    attn._backend = None


def model_on(device, dtype):
    return tiny_gpt(device=device, dtype=dtype, **dataclasses.asdict(CFG))


def test_device_forward_backward_matches_fp32_cpu(device):
    ref = model_on("cpu", torch.float32)
    # init_weights leaves c_proj at zero: perturb them so every layer's attention really contributes
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())).to(p.dtype) * 0.02)
    model = model_on(device, torch.bfloat16)
    model.load_state_dict({k: v.to(device) for k, v in ref.state_dict().items()})
    assert model.compute_dtype == torch.bfloat16
    idx = torch.randint(0, CFG.vocab_size, (2, CFG.sequence_len), generator=torch.Generator().manual_seed(1))
    loss_ref = ref(idx, idx)
    loss_ref.backward()
    loss = model(idx.to(device), idx.to(device))
    loss.backward()
    # bf16 activations against fp32: agreement to bf16 precision
    assert abs(loss.item() - loss_ref.item()) < 2e-2 * abs(loss_ref.item())
    for (name, pr), p in zip(ref.named_parameters(), model.parameters()):
        a, b = pr.grad.float(), p.grad.float().cpu()
        rel = (a - b).norm() / a.norm().clamp_min(1e-12)
        assert rel < 0.1, f"{name}: relative grad difference {rel:.3f}"


def test_device_kv_cache_decode_matches_full_forward(device):
    model = model_on(device, torch.bfloat16)
    with torch.no_grad():  # nonzero output projections, so the cache really matters
        for name, p in model.named_parameters():
            if name.endswith("c_proj.weight"):
                p.normal_(0, 0.02, generator=torch.Generator(device=device).manual_seed(len(name)))
    model.eval()
    T, B = 200, 2
    idx = torch.randint(0, CFG.vocab_size, (B, T), device=device)
    with torch.inference_mode():
        full = model(idx)  # (B, T, V), no cache
        cache = KVCache(B, CFG.n_kv_head, T, model.head_dim, CFG.n_layer, device, dtype=torch.bfloat16)
        outs = [model.forward_cached(idx[:, :150], cache)]  # prefill
        for t in range(150, T):  # decode, one token per step
            outs.append(model.forward_cached(idx[:, t:t + 1], cache))
    cached = torch.cat(outs, dim=1)
    assert cache.get_pos() == T
    torch.testing.assert_close(cached.float(), full.float(), atol=5e-2, rtol=5e-2)
    assert (cached.argmax(-1) == full.argmax(-1)).float().mean() > 0.98
