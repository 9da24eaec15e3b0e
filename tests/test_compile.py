"""
torch.compile coverage without a GPU: the model's forward + backward and the optimizer step, traced on a CPU
along the CUDA code path (bf16, no CPU-only fused ops) and along the CPU one (its compiled loss). One graph
each, no recompiles while the scheduled lr / momentum / weight decay change, results equal to eager. The CPU
runs use the aot_eager backend (Dynamo + AOT autograd, the stages where graph breaks and recompiles come
from) to stay fast; one CPU test and the GPU test compile with Inductor.
"""

import dataclasses
import io

import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounterWithBackend

import nanochat.attention as attn
import nanochat.optim as optim
from conftest import tiny_gpt
import nanochat.gpt as gpt
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
    optim._compiled_step_math = None
    optim._compile_backend = "inductor"


def make_model(device="cpu", cfg=CFG):
    return tiny_gpt(device=device, dtype=torch.bfloat16, **dataclasses.asdict(cfg))  # the GPU's compute dtype


def compiles_once_equal_to_eager(model, idx, tgt, eager_loss, loss_tol):
    """Compile `model` (aot_eager), run forward + backward twice: one graph, loss and grads equal to eager's."""
    eager_grads = [p.grad.clone() for p in model.parameters()]
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, dynamic=False)
    for _ in range(2):  # the second call must reuse the graph
        model.zero_grad(set_to_none=True)
        loss = compiled(idx, tgt)
        loss.backward()
    assert counter.frame_count == 1, f"{counter.frame_count} graphs: a graph break or a recompile"
    torch.testing.assert_close(loss, eager_loss, rtol=loss_tol, atol=loss_tol)
    for p, g in zip(model.parameters(), eager_grads):
        torch.testing.assert_close(p.grad.float(), g.float(), rtol=2e-2, atol=2e-3)


def test_model_forward_backward_one_graph_equal_to_eager():
    model = make_model()
    idx = torch.randint(0, CFG.vocab_size, (2, CFG.sequence_len), generator=torch.Generator().manual_seed(0))
    with cpu_kernels(False):
        eager_loss = model(idx, idx)
        eager_loss.backward()
        compiles_once_equal_to_eager(model, idx, idx, eager_loss, 1e-3)


def test_compiled_cpu_embedding_gradient_is_reproducible():
    # inductor's own embedding backward sums a repeated token's rows with atomic adds in a thread order that
    # changes from call to call; nanochat's embed() keeps the eager kernel: bit-equal to eager, every call
    gen = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 4, (8, 4096), generator=gen)  # few distinct tokens: long runs of repeated rows
    weight = torch.randn(16, 64, generator=gen, requires_grad=True)
    upstream = torch.randn(8, 4096, 64, generator=gen)

    def weight_grad(fn):
        weight.grad = None
        (fn(idx, weight) * upstream).sum().backward()
        return weight.grad.clone()
    want = weight_grad(torch.nn.functional.embedding)
    compiled = torch.compile(gpt.embed, dynamic=False)
    for _ in range(3):
        assert torch.equal(weight_grad(compiled), want)


def test_model_has_no_graph_breaks():
    model = make_model()
    idx = torch.randint(0, CFG.vocab_size, (2, CFG.sequence_len))
    with cpu_kernels(False):
        explanation = torch._dynamo.explain(model)(idx, idx)
    assert explanation.graph_break_count == 0, explanation.break_reasons


def test_cpu_model_compiles_in_one_graph_equal_to_eager():
    # the CPU path under torch.compile: SoftcapCE instead of the stock soft-cap + cross-entropy chain
    model = make_model()
    idx = torch.randint(0, CFG.vocab_size, (2, CFG.sequence_len), generator=torch.Generator().manual_seed(0))
    tgt = idx.roll(-1, 1)
    tgt[1, :7] = -1
    with cpu_kernels(False):  # eager reference: the stock ops
        eager_loss = model(idx, tgt)
        eager_loss.backward()
    compiles_once_equal_to_eager(model, idx, tgt, eager_loss, 1e-4)


def schedule(opt, step):
    """Move every scheduled hyper-parameter, as the training loops do."""
    for g in opt.param_groups:
        g["lr"] = g["initial_lr"] * (1 - step / 8)
        if g["kind"] == "muon":
            g["momentum"], g["weight_decay"] = 0.85 + 0.03 * step, 0.1 / (step + 1)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_whole_optimizer_step_compiles_once_equal_to_eager(monkeypatch, backend):
    # every group (AdamW on bf16 embeddings, fp32 head and scalars; Muon per shape) in one graph
    monkeypatch.delenv("NANOCHAT_OPTIM_COMPILE", raising=False)
    monkeypatch.setenv("NANOCHAT_MUON_DTYPE", "float32")  # bf16 rounding would blur the comparison
    counter = CompileCounterWithBackend(backend)
    optim._compile_backend = counter
    model, twin = make_model(), make_model()
    opt, ref = model.setup_optimizers(weight_decay=0.1, compile=True), twin.setup_optimizers(weight_decay=0.1)
    frames = []
    for step in range(4):
        g = torch.Generator().manual_seed(step)
        for p, t in zip(model.parameters(), twin.parameters()):
            p.grad = torch.randn(p.shape, generator=g).to(p.dtype)
            t.grad = p.grad.clone()
        for o in (opt, ref):
            schedule(o, step)
        opt.step()
        ref.step()
        frames.append(counter.frame_count)
    assert frames == [1, 1, 1, 1], f"compiled optimizer graphs per step: {frames}"
    for p, t in zip(model.parameters(), twin.parameters()):
        # bf16 embeddings: one rounding of the same fp32 update apart at most
        tol = dict(rtol=1e-2, atol=1e-2) if p.dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(p.float(), t.float(), **tol)
    for p in model.parameters():  # the same state layout as the eager path: checkpoints stay interchangeable
        s, r = opt.state[p], ref.state[dict(zip(model.parameters(), twin.parameters()))[p]]
        assert s.keys() == r.keys() and all(not torch.is_tensor(s[k]) or s[k].shape == r[k].shape for k in s)
        assert s.get("step") == r.get("step")


def test_compiled_optimizer_resumes_exactly(monkeypatch):
    # state_dict -> a fresh optimizer -> load_state_dict continues bit for bit (what a killed run's resume does)
    monkeypatch.delenv("NANOCHAT_OPTIM_COMPILE", raising=False)
    optim._compile_backend = "aot_eager"
    grads = []
    for step in range(4):
        g = torch.Generator().manual_seed(step)
        grads.append([torch.randn(p.shape, generator=g) for p in make_model().parameters()])

    def run(model, opt, steps):
        for step in steps:
            for p, g in zip(model.parameters(), grads[step]):
                p.grad = g.to(p.dtype)
            schedule(opt, step)
            opt.step()

    straight = make_model()
    run(straight, straight.setup_optimizers(weight_decay=0.1, compile=True), range(4))
    first = make_model()
    opt = first.setup_optimizers(weight_decay=0.1, compile=True)
    run(first, opt, range(2))
    buf = io.BytesIO()
    torch.save({"model": first.state_dict(), "optim": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    resumed = make_model()
    resumed.load_state_dict(saved["model"])
    opt = resumed.setup_optimizers(weight_decay=0.1, compile=True)
    opt.load_state_dict(saved["optim"])
    run(resumed, opt, range(2, 4))
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


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
    # the compiled optimizer step (one process): every group in one graph, none added by the changing schedules
    assert optim._compile_backend.frame_count == 1


def test_flex_window_traces_in_one_graph():
    # the GPU fallback for sliding windows builds its block mask inside the compiled graph: no break there
    q, k, v = torch.randn(1, 256, 2, 16), torch.randn(1, 256, 1, 16), torch.randn(1, 256, 1, 16)
    with torch.no_grad():  # FlexAttention has no CPU backward; the trace is what is checked here
        explanation = torch._dynamo.explain(lambda q, k, v: attn._flex_window(q, k, v, 48, compiled=False))(q, k, v)
        y = torch.compile(lambda q, k, v: attn._flex_window(q, k, v, 48, compiled=False), backend="aot_eager")(q, k, v)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    ref = attn.reference_attention(q, k, v, torch.arange(256), window_left=48)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
