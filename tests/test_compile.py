"""
torch.compile coverage without a GPU: the model's forward + backward and the Muon step, traced on a CPU
along the CUDA code path (bf16, no CPU-only fused ops). One graph each, no recompiles while the
scheduled lr / momentum / weight decay change, results equal to eager. The CPU runs use the aot_eager
backend (Dynamo + AOT autograd, the stages where graph breaks and recompiles come from) to stay fast;
the `gpu` test compiles with Inductor on CUDA.
"""

import dataclasses

import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounterWithBackend

import nanochat.attention as attn
import nanochat.optim as optim
from conftest import tiny_gpt
from nanochat.gpt import GPTConfig, cpu_kernels

CFG = GPTConfig(sequence_len=64, vocab_size=256, n_layer=3, n_head=2, n_kv_head=1, n_embd=64, window_pattern="SSL",
                short_window=16)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    attn.set_backend(None)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
    attn._backend = None
    optim._compiled_muon_math = None
    optim._compile_backend = "inductor"


def make_model(device="cpu", cfg=CFG):
    return tiny_gpt(device=device, dtype=torch.bfloat16, **dataclasses.asdict(cfg))  # the GPU's compute dtype


def test_model_forward_backward_one_graph_equal_to_eager():
    model = make_model()
    idx = torch.randint(0, CFG.vocab_size, (2, CFG.sequence_len), generator=torch.Generator().manual_seed(0))
    with cpu_kernels(False):
        eager_loss = model(idx, idx)
        eager_loss.backward()
        eager_grads = [p.grad.clone() for p in model.parameters()]
        model.zero_grad(set_to_none=True)
        counter = CompileCounterWithBackend("aot_eager")
        compiled = torch.compile(model, backend=counter, dynamic=False)
        for _ in range(2):  # the second call must reuse the graph
            model.zero_grad(set_to_none=True)
            loss = compiled(idx, idx)
            loss.backward()
    assert counter.frame_count == 1, f"{counter.frame_count} graphs: a graph break or a recompile"
    torch.testing.assert_close(loss, eager_loss, rtol=1e-3, atol=1e-3)
    for p, g in zip(model.parameters(), eager_grads):
        torch.testing.assert_close(p.grad.float(), g.float(), rtol=2e-2, atol=2e-3)


def test_model_has_no_graph_breaks():
    model = make_model()
    idx = torch.randint(0, CFG.vocab_size, (2, CFG.sequence_len))
    with cpu_kernels(False):
        explanation = torch._dynamo.explain(model)(idx, idx)
    assert explanation.graph_break_count == 0, explanation.break_reasons


def test_muon_step_compiles_once_while_schedules_change(monkeypatch):
    monkeypatch.setenv("NANOCHAT_OPTIM_COMPILE", "1")
    counter = CompileCounterWithBackend("aot_eager")
    optim._compile_backend = counter
    optim._compiled_muon_math = None
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(32, 16)) for _ in range(3)]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    group = dict(kind="muon", lr=0.02, momentum=0.95, weight_decay=0.1)
    opt = optim.MuonAdamW([dict(group, params=params)])
    monkeypatch.setenv("NANOCHAT_OPTIM_COMPILE", "1")
    ref = optim.MuonAdamW([dict(group, params=twins)])
    frames = []
    for step in range(4):
        g = torch.Generator().manual_seed(step)
        for p, t in zip(params, twins):
            p.grad = torch.randn(p.shape, generator=g)
            t.grad = p.grad.clone()
        for o in (opt, ref):  # schedules move every step: must not recompile
            o.param_groups[0].update(lr=0.02 * (1 - step / 8), momentum=0.85 + 0.03 * step, weight_decay=0.1 / (step + 1))
        opt.step()
        with monkeypatch.context() as m:
            m.setenv("NANOCHAT_OPTIM_COMPILE", "0")
            ref.step()
        frames.append(counter.frame_count)
    assert frames == [1, 1, 1, 1], f"compiled Muon graphs per step: {frames}"
    for p, t in zip(params, twins):
        torch.testing.assert_close(p, t, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
def test_model_and_muon_compile_without_recompiles(device, monkeypatch):
    # head dim 64 (FA3 kernels take 64 and up), windows that span several FlexAttention tiles (CUDA; a CPU traces the
    # same code at a quarter of the length). CUDA compiles with Inductor; a CPU with aot_eager: the same tracing,
    # everything but Inductor's Triton code generation
    T = 512 if device == "cuda" else 128
    cfg = GPTConfig(sequence_len=T, vocab_size=256, n_layer=3, n_head=2, n_kv_head=1, n_embd=128,
                    window_pattern="SSL", short_window=T // 4)
    monkeypatch.setenv("NANOCHAT_OPTIM_COMPILE", "1")
    backend = "inductor" if device == "cuda" else "aot_eager"
    optim._compile_backend = CompileCounterWithBackend(backend)
    model = make_model(device, cfg)
    opt = model.setup_optimizers()
    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(model, backend=counter, dynamic=False)
    idx = torch.randint(0, cfg.vocab_size, (2, cfg.sequence_len), device=device)
    eager = model(idx, idx).item()
    losses = []
    for step in range(3 if device == "cuda" else 2):  # the schedules change at every step
        for g in opt.param_groups:
            g["lr"] = g["initial_lr"] * (1 - step / 4)
            if g["kind"] == "muon":
                g["momentum"], g["weight_decay"] = 0.85 + 0.03 * step, 0.1 / (step + 1)
        loss = compiled(idx, idx)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert counter.frame_count == 1
    assert abs(losses[0] - eager) < 1e-2 * abs(eager)
    assert losses[-1] < losses[0]  # the compiled steps train
    # the compiled Muon step: one graph per matrix shape, none added by the changing schedules
    shapes = {tuple(p.shape) for g in opt.param_groups if g["kind"] == "muon" for p in g["params"]}
    assert optim._compile_backend.frame_count == len(shapes)


def test_flex_window_traces_in_one_graph():
    # the GPU fallback for sliding windows builds its block mask inside the compiled graph: no break there
    q, k, v = torch.randn(1, 256, 2, 16), torch.randn(1, 256, 1, 16), torch.randn(1, 256, 1, 16)
    with torch.no_grad():  # FlexAttention has no CPU backward; the trace is what is checked here
        explanation = torch._dynamo.explain(lambda q, k, v: attn._flex_window(q, k, v, 48, compiled=False))(q, k, v)
        y = torch.compile(lambda q, k, v: attn._flex_window(q, k, v, 48, compiled=False), backend="aot_eager")(q, k, v)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    ref = attn.reference_attention(q, k, v, torch.arange(256), window_left=48)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
