"""The CUDA path against the CPU path (same weights): forward and backward, and KV-cache decode.
All `gpu`-marked: they run in runs/gpu_check.sh and are skipped on machines without CUDA."""

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
    attn.set_backend(None)  # whatever the GPU runs for real (fa3 on Hopper with the kernel, else flex)
    yield
    attn._backend = None


def model_on(device, dtype, monkeypatch):
    monkeypatch.setenv("NANOCHAT_DTYPE", dtype)
    return tiny_gpt(device=device, **dataclasses.asdict(CFG))


def test_cuda_forward_backward_matches_cpu(monkeypatch):
    cpu = model_on("cpu", "float32", monkeypatch)
    # init_weights leaves c_proj at zero: perturb them so every layer's attention really contributes
    with torch.no_grad():
        for p in cpu.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())).to(p.dtype) * 0.02)
    gpu = model_on("cuda", "bfloat16", monkeypatch)
    gpu.load_state_dict({k: v.to("cuda") for k, v in cpu.state_dict().items()})
    idx = torch.randint(0, CFG.vocab_size, (2, CFG.sequence_len), generator=torch.Generator().manual_seed(1))
    loss_cpu = cpu(idx, idx)
    loss_cpu.backward()
    loss_gpu = gpu(idx.cuda(), idx.cuda())
    loss_gpu.backward()
    # bf16 activations against fp32: agreement to bf16 precision
    assert abs(loss_gpu.item() - loss_cpu.item()) < 2e-2 * abs(loss_cpu.item())
    for (name, pc), pg in zip(cpu.named_parameters(), gpu.parameters()):
        a, b = pc.grad.float(), pg.grad.float().cpu()
        rel = (a - b).norm() / a.norm().clamp_min(1e-12)
        assert rel < 0.1, f"{name}: relative grad difference {rel:.3f}"


def test_cuda_kv_cache_decode_matches_full_forward(monkeypatch):
    model = model_on("cuda", "bfloat16", monkeypatch)
    model.eval()
    T, B = 200, 2
    idx = torch.randint(0, CFG.vocab_size, (B, T), device="cuda")
    with torch.inference_mode():
        full = model(idx)  # (B, T, V), no cache
        cache = KVCache(B, CFG.n_kv_head, T, model.head_dim, CFG.n_layer, "cuda", dtype=torch.bfloat16)
        outs = [model(idx[:, :150], kv_cache=cache)]
        for t in range(150, T):
            outs.append(model(idx[:, t:t + 1], kv_cache=cache))
    cached = torch.cat(outs, dim=1)
    torch.testing.assert_close(cached.float(), full.float(), atol=5e-2, rtol=5e-2)
    assert (cached.argmax(-1) == full.argmax(-1)).float().mean() > 0.98
