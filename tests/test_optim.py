"""
MuonAdamW on one CPU process: the AdamW path against torch.optim.AdamW, the Muon path against a
naive per-matrix implementation of the Muon step (orthogonalize, NorMuon, cautious decay), orthogonality of the update, Polar Express
against the SVD polar factor, learning on a synthetic task, and a bitwise-exact resume.
"""

import io
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat.optim import MuonAdamW, polar_express, POLAR_EXPRESS_COEFFS


@pytest.fixture(autouse=True)
def _fp32_muon(monkeypatch):
    monkeypatch.delenv("NANOCHAT_MUON_DTYPE", raising=False)
    torch.manual_seed(0)


def test_adamw_matches_torch():
    shapes = [(7, 5), (16,), (3, 4, 2), (1,)]
    ours_p = [torch.randn(s) for s in shapes]
    ref_p = [p.clone() for p in ours_p]
    cfg = [dict(lr=0.01, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.05),
           dict(lr=0.003, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0)]
    ours = MuonAdamW([dict(kind="adamw", params=ours_p[:2], **cfg[0]), dict(kind="adamw", params=ours_p[2:], **cfg[1])])
    ref = torch.optim.AdamW([dict(params=ref_p[:2], **cfg[0]), dict(params=ref_p[2:], **cfg[1])], foreach=False)
    for step in range(10):
        grads = [torch.randn(s) for s in shapes]
        for p, q, g in zip(ours_p, ref_p, grads):
            p.grad, q.grad = g.clone(), g.clone()
        if step == 5:  # a schedule change mid-run
            ours.param_groups[0]["lr"] = ref.param_groups[0]["lr"] = 0.02
        ours.step()
        ref.step()
    for p, q in zip(ours_p, ref_p):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    assert all(g["initial_lr"] == c["lr"] for g, c in zip(ours.param_groups, cfg))


def naive_muon(P, G, buf, var, lr, wd, mu, beta2):
    """The Muon step for a single matrix, written out directly (fp32)."""
    rows, cols = P.shape
    buf = mu * buf + (1 - mu) * G
    U = (1 - mu) * G + mu * buf
    fro = torch.sqrt((U * U).sum())
    U = torch.stack([U[r] * (fro / math.sqrt(rows)) / max(U[r].norm(), 1e-6) for r in range(rows)])
    X = U / (torch.sqrt((U * U).sum()) * 1.01 + 1e-6)
    for a, b, c in POLAR_EXPRESS_COEFFS:
        if rows > cols:
            A = X.T @ X
            X = a * X + X @ (b * A + c * A @ A)
        else:
            A = X @ X.T
            X = a * X + (b * A + c * A @ A) @ X
    O = X * math.sqrt(min(rows, cols)) / max(X.norm(), 1e-6)
    if rows >= cols:
        v_mean, n = (O ** 2).mean(dim=1, keepdim=True), cols
    else:
        v_mean, n = (O ** 2).mean(dim=0, keepdim=True), rows
    norm = torch.sqrt((v_mean * n).sum())
    var = beta2 * var + (1 - beta2) * v_mean
    scale = 1 / torch.sqrt(var.clamp_min(1e-10))
    norm2 = torch.sqrt((v_mean * n * scale ** 2).sum())
    O = O * scale * norm / max(norm2, 1e-10)
    lr_eff = lr * math.sqrt(max(1, rows / cols))
    mask = (O * P >= 0).float()
    return P - lr_eff * O - lr_eff * wd * P * mask, buf, var


@pytest.mark.parametrize("shape", [(24, 8), (8, 24), (12, 12)])
def test_muon_matches_naive(shape):
    K = 3
    ps = [torch.randn(shape) * 0.1 for _ in range(K)]
    opt = MuonAdamW([dict(kind="muon", params=ps, lr=0.02, momentum=0.9, weight_decay=0.1)])
    ref = [p.clone() for p in ps]
    bufs = [torch.zeros(shape) for _ in range(K)]
    vshape = (shape[0], 1) if shape[0] >= shape[1] else (1, shape[1])
    vars_ = [torch.zeros(vshape) for _ in range(K)]
    for step in range(4):
        mu = 0.85 + 0.03 * step  # scheduled momentum and wd
        wd = 0.1 * (1 - step / 4)
        opt.param_groups[0]["momentum"], opt.param_groups[0]["weight_decay"] = mu, wd
        grads = [torch.randn(shape) for _ in range(K)]
        for p, g in zip(ps, grads):
            p.grad = g
        opt.step()
        for i in range(K):
            ref[i], bufs[i], vars_[i] = naive_muon(ref[i], grads[i], bufs[i], vars_[i], 0.02, wd, mu, 0.9)
    for p, q in zip(ps, ref):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape", [(64, 32), (32, 64), (48, 48)])
def test_muon_first_update_is_orthogonal(shape):
    P = torch.randn(shape)
    G = torch.randn(shape) * torch.logspace(-1, 1, shape[1])  # ill-conditioned gradient
    p = P.clone()
    p.grad = G.clone()
    lr = 0.01
    opt = MuonAdamW([dict(kind="muon", params=[p], lr=lr, weight_decay=0.0)])
    opt.step()
    update = (P - p) / (lr * math.sqrt(max(1, shape[0] / shape[1])))
    s = torch.linalg.svdvals(update)
    s_g = torch.linalg.svdvals(G)
    assert (s.max() / s.min()) < 4, f"singular values spread {s.min():.3f}..{s.max():.3f}"
    assert (s_g.max() / s_g.min()) > 3 * (s.max() / s.min())  # the raw gradient was far less uniform
    cos = F.cosine_similarity(update.flatten(), G.flatten(), dim=0)
    assert 0.2 < cos < 0.99  # a descent direction, but not the gradient itself
    # Muon+ / NorMuon keep the Frobenius norm of an orthogonal matrix: sqrt(min(rows, cols))
    assert abs(update.norm() / math.sqrt(min(shape)) - 1) < 0.01


def test_polar_express_approximates_polar_factor():
    G = torch.randn(4, 96, 40)
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    polar = U @ Vh
    X = polar_express(G / (G.norm(dim=(-2, -1), keepdim=True) * 1.01), ns_steps=5)
    cos = F.cosine_similarity(X.flatten(1), polar.flatten(1), dim=1)
    assert (cos > 0.98).all(), cos
    s = torch.linalg.svdvals(X)
    assert s.min() > 0.5 and s.max() < 1.3, (s.min(), s.max())
    # wide input handled through the other Gram matrix, same answer as transposing
    Xw = polar_express(G.mT / (G.norm(dim=(-2, -1), keepdim=True) * 1.01), ns_steps=5)
    torch.testing.assert_close(Xw, X.mT, rtol=1e-4, atol=1e-4)


class TinyLM(nn.Module):
    """Embedding + 2-layer ReLU^2 MLP + head: matrices under Muon, the rest under AdamW."""
    def __init__(self, vocab=16, d=32):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.fc = nn.Linear(d, 4 * d, bias=False)
        self.proj = nn.Linear(4 * d, d, bias=False)
        self.fc2 = nn.Linear(d, 4 * d, bias=False)
        self.proj2 = nn.Linear(4 * d, d, bias=False)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lam = nn.Parameter(torch.ones(2))

    def forward(self, idx, targets):
        x = self.wte(idx)
        x = x + self.lam[0] * self.proj(F.relu(self.fc(F.rms_norm(x, (x.size(-1),)))).square())
        x = x + self.lam[1] * self.proj2(F.relu(self.fc2(F.rms_norm(x, (x.size(-1),)))).square())
        logits = self.lm_head(F.rms_norm(x, (x.size(-1),)))
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())

    def optimizer(self):
        return MuonAdamW([
            dict(kind="adamw", params=[self.wte.weight], lr=0.05, betas=(0.8, 0.995), eps=1e-10, weight_decay=0.001),
            dict(kind="adamw", params=[self.lm_head.weight], lr=0.01, betas=(0.8, 0.96), eps=1e-10, weight_decay=0.01),
            dict(kind="adamw", params=[self.lam], lr=0.01, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.0),
            dict(kind="muon", params=[self.fc.weight, self.fc2.weight], lr=0.02, momentum=0.95, weight_decay=0.01),
            dict(kind="muon", params=[self.proj.weight, self.proj2.weight], lr=0.02, momentum=0.95, weight_decay=0.01),
        ])


def _batch(gen, vocab=16, B=16, T=12):
    # learnable: each next token is a fixed permutation of the current one
    perm = torch.arange(vocab).roll(5)
    x = torch.empty(B, T + 1, dtype=torch.long)
    x[:, 0] = torch.randint(0, vocab, (B,), generator=gen)
    for t in range(T):
        x[:, t + 1] = perm[x[:, t]]
    return x[:, :-1], x[:, 1:]


def test_tiny_model_learns():
    model = TinyLM()
    opt = model.optimizer()
    gen = torch.Generator().manual_seed(1)
    losses = []
    for step in range(60):
        x, y = _batch(gen)
        loss = model(x, y)
        loss.backward()
        for g in opt.param_groups:  # a schedule the way scripts apply it
            g["lr"] = g["initial_lr"] * (1 - step / 80)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[0] > 2.0  # ~ln(16) = 2.77 at init
    assert sum(losses[-5:]) / 5 < 0.1 * losses[0], losses[::10]


def _run(model, opt, steps, gen, start=0):
    for step in range(start, start + steps):
        x, y = _batch(gen)
        model(x, y).backward()
        for g in opt.param_groups:
            g["lr"] = g["initial_lr"] * (1 - step / 20)
            if g["kind"] == "muon":
                g["momentum"] = 0.85 + 0.01 * step
                g["weight_decay"] = 0.01 * (1 - step / 20)
        opt.step()
        opt.zero_grad(set_to_none=True)


def test_state_dict_resume_is_bitwise():
    torch.manual_seed(3)
    model = TinyLM()
    init = {k: v.clone() for k, v in model.state_dict().items()}
    opt = model.optimizer()
    _run(model, opt, 8, torch.Generator().manual_seed(7))
    # interrupted run: 4 steps, save everything through bytes, rebuild from scratch, 4 more steps
    model2 = TinyLM()
    model2.load_state_dict(init)
    opt2 = model2.optimizer()
    gen = torch.Generator().manual_seed(7)
    _run(model2, opt2, 4, gen)
    buf = io.BytesIO()
    torch.save({"model": model2.state_dict(), "optim": opt2.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    model3 = TinyLM()
    model3.load_state_dict(ckpt["model"])
    opt3 = model3.optimizer()
    opt3.load_state_dict(ckpt["optim"])
    _run(model3, opt3, 4, gen, start=4)
    for (k, a), b in zip(model.state_dict().items(), model3.state_dict().values()):
        assert torch.equal(a, b), k


def test_bad_groups_are_rejected():
    with pytest.raises(ValueError, match="one shape"):
        MuonAdamW([dict(kind="muon", params=[torch.zeros(2, 3), torch.zeros(3, 2)], lr=0.1)])
    with pytest.raises(ValueError, match="kind"):
        MuonAdamW([dict(params=[torch.zeros(2)], lr=0.1)])
    opt = MuonAdamW([dict(kind="adamw", params=[torch.zeros(2)], lr=0.1)])
    sd = opt.state_dict()
    sd["world_size"] = 2
    with pytest.raises(ValueError, match="same number of processes"):
        opt.load_state_dict(sd)


def test_bf16_orthogonalization_override(monkeypatch):
    monkeypatch.setenv("NANOCHAT_MUON_DTYPE", "bfloat16")
    P = torch.randn(32, 16)
    p = P.clone()
    p.grad = torch.randn(32, 16) * torch.logspace(-1, 1, 16)
    opt = MuonAdamW([dict(kind="muon", params=[p], lr=0.01)])
    assert opt.muon_dtype == torch.bfloat16
    opt.step()
    s = torch.linalg.svdvals((P - p) / (0.01 * math.sqrt(2)))
    assert s.max() / s.min() < 4
    monkeypatch.setenv("NANOCHAT_MUON_DTYPE", "float16")
    with pytest.raises(ValueError, match="NANOCHAT_MUON_DTYPE"):
        MuonAdamW([dict(kind="muon", params=[p], lr=0.01)])


def test_tiny_gpt_learns_with_setup_optimizers():
    from nanochat.gpt import GPT, GPTConfig
    V, T = 32, 16
    cfg = GPTConfig(sequence_len=T, vocab_size=V, n_layer=2, n_head=2, n_kv_head=2, n_embd=32, window_pattern="L")
    with torch.device("meta"):
        model = GPT(cfg)
    model.to_empty(device="cpu")
    model.init_weights()
    opt = model.setup_optimizers(matrix_lr=0.04, weight_decay=0.01)
    assert {g["kind"] for g in opt.param_groups} == {"adamw", "muon"}
    gen = torch.Generator().manual_seed(0)
    losses = []
    for step in range(40):
        start = torch.randint(0, V, (16, 1), generator=gen)
        seq = (start + 3 * torch.arange(T + 1)) % V  # learnable: +3 every position
        loss = model(seq[:, :-1], seq[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[0] > 3.0  # ~ln(32) = 3.47
    chunks = [sum(losses[i:i + 5]) / 5 for i in range(0, 40, 5)]
    assert all(a > b for a, b in zip(chunks, chunks[1:])), chunks  # falls steadily
    assert chunks[-1] < 0.1 * losses[0], chunks
