"""
The SFT objective (nanochat.loss_eval.supervised_loss):
the loss of a step is the mean over all its supervised tokens across micro-batches (and ranks),
a micro-batch without supervised tokens adds 0 (never NaN), and DFT weights each token's CE by
its own stop-gradient probability (alpha 0 = plain CE). Checked against F.cross_entropy on the
model's logits and against a hand example.
"""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import nanochat.attention as attn
from nanochat.gpt import GPT, GPTConfig
from nanochat.loss_eval import supervised_loss

V, T = 50, 12


@pytest.fixture(autouse=True)
def sdpa_backend():
    attn.set_backend("sdpa")
    yield
    attn.set_backend(None)  # back to the automatic choice


def tiny_gpt(seed=0):
    with torch.device("meta"):
        model = GPT(GPTConfig(sequence_len=16, vocab_size=V, n_layer=2, n_head=2, n_kv_head=2, n_embd=32,
                              window_pattern="L"))
    model.to_empty(device="cpu")
    model.init_weights()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # the init zeroes output projections: make every path (and the loss) non-trivial
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.size(1)))
    return model


def micro_batches(seed=0):
    """Three micro-batches of 2 rows: the second has no supervised token at all."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for k in range(3):
        x = torch.randint(0, V, (2, T), generator=g)
        y = torch.randint(0, V, (2, T), generator=g)
        keep = torch.rand((2, T), generator=g) < 0.4
        if k == 1:
            keep[:] = False
        y[~keep] = -1
        batches.append((x, y))
    assert all((y >= 0).any() for i, (_, y) in enumerate(batches) if i != 1)
    return batches


def grads(model):
    return [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]


def step_with_supervised_loss(model, batches, alpha=0.0, world_size=1, num_tokens=None):
    """What chat_sft does in one optimizer step on one rank: count the step's tokens, then backward each part."""
    n = num_tokens if num_tokens is not None else sum(int((y >= 0).sum()) for _, y in batches)
    total, p_sum, parts = 0.0, 0.0, []
    for x, y in batches:
        loss, p = supervised_loss(model, x, y, n, world_size, alpha)
        loss.backward()
        parts.append(loss.item())
        total += loss.item() / world_size
        p_sum += p.item()
    return total, p_sum, parts


def test_empty_micro_batch_adds_zero_and_step_loss_is_token_mean():
    model = tiny_gpt()
    batches = micro_batches()
    model.zero_grad(set_to_none=True)
    total, _, parts = step_with_supervised_loss(model, batches)
    assert all(math.isfinite(p) for p in parts) and parts[1] == 0.0
    got = grads(model)
    # independent: one big batch, F.cross_entropy over the supervised tokens only, from the model's logits
    model.zero_grad(set_to_none=True)
    x_all = torch.cat([x for x, _ in batches])
    y_all = torch.cat([y for _, y in batches])
    logits = model(x_all)  # (6, T, V) softcapped fp32 logits
    valid = y_all >= 0
    ref = F.cross_entropy(logits[valid], y_all[valid])
    ref.backward()
    assert total == pytest.approx(ref.item(), rel=1e-5)
    for a, b in zip(got, grads(model)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # the reference's per-micro-batch mean / accumulation count would differ (it weighs micro-batches, not tokens)
    per_mb = [F.cross_entropy(model(x)[y >= 0], y[y >= 0]).item() for x, y in batches if (y >= 0).any()]
    assert abs(sum(per_mb) / len(per_mb) - ref.item()) > 1e-4


def test_step_with_no_supervised_token_is_zero_not_nan():
    model = tiny_gpt()
    x = torch.randint(0, V, (2, T))
    y = torch.full((2, T), -1)
    loss, p = supervised_loss(model, x, y, 0, 1, 0.0)
    loss.backward()
    assert loss.item() == 0.0 and p == 0.0
    assert all(torch.isfinite(g).all() and (g == 0).all() for g in grads(model))


def test_ranks_sum_to_the_single_big_batch():
    """Each rank scales by world_size / (step tokens of all ranks); the optimizer averages grads over ranks."""
    model = tiny_gpt(1)
    batches = micro_batches(1)
    n_all = sum(int((y >= 0).sum()) for _, y in batches)
    rank_grads, rank_losses = [], []
    for rank_batches in (batches[:1], batches[1:]):  # rank 0: one micro-batch, rank 1: the empty one and one more
        model.zero_grad(set_to_none=True)
        total, _, _ = step_with_supervised_loss(model, rank_batches, world_size=2, num_tokens=n_all)
        rank_grads.append(grads(model))
        rank_losses.append(total)
    model.zero_grad(set_to_none=True)
    x_all = torch.cat([x for x, _ in batches])
    y_all = torch.cat([y for _, y in batches])
    ref = F.cross_entropy(model(x_all).view(-1, V), y_all.view(-1), ignore_index=-1)
    ref.backward()
    assert sum(rank_losses) == pytest.approx(ref.item(), rel=1e-5)  # chat_sft all-reduces the sum
    for g0, g1, g in zip(*rank_grads, grads(model)):
        torch.testing.assert_close((g0 + g1) / 2, g, rtol=1e-4, atol=1e-6)


def first_step(seed, alpha):
    """A fresh tiny GPT and micro-batches from `seed`, after one SFT step: (model, batches, loss, p_sum, grads)."""
    model, batches = tiny_gpt(seed), micro_batches(seed)
    loss, p_sum, _ = step_with_supervised_loss(model, batches, alpha=alpha)
    return model, batches, loss, p_sum, grads(model)


def test_dft_alpha_zero_is_cross_entropy_exactly():
    model, batches, ce, p_ce, g_ce = first_step(2, alpha=0.0)
    # --loss=dft --dft-alpha=0 takes the CE path; an alpha too small to move w = alpha*p + (1-alpha) off 1.0
    # goes through the weighted path and must give bit-identical losses and gradients too
    for alpha in (0.0, 1e-30):
        model.zero_grad(set_to_none=True)
        dft0, p_dft0, _ = step_with_supervised_loss(model, batches, alpha=alpha)
        assert ce == dft0 and p_ce == p_dft0
        for a, b in zip(g_ce, grads(model)):
            assert torch.equal(a, b)
    # and the CE really is F.cross_entropy's token mean
    x_all = torch.cat([x for x, _ in batches])
    y_all = torch.cat([y for _, y in batches])
    with torch.no_grad():
        logits = model(x_all)
    valid = y_all >= 0
    assert ce == pytest.approx(F.cross_entropy(logits[valid], y_all[valid]).item(), rel=1e-6)
    # p(correct) is the mean probability of the supervised targets
    probs = logits[valid].softmax(-1).gather(1, y_all[valid].unsqueeze(1)).squeeze(1)
    assert p_ce / int(valid.sum()) == pytest.approx(probs.mean().item(), rel=1e-5)


class FixedLogits(nn.Module):
    """A 'model' whose logits are a parameter, returning per-token CE like GPT(..., loss_reduction='none')."""

    def __init__(self, logits):
        super().__init__()
        self.logits = nn.Parameter(logits.clone())  # (B, T, V)

    def forward(self, x, targets, loss_reduction="mean"):
        assert loss_reduction == "none"
        B, T_, V_ = self.logits.shape
        return F.cross_entropy(self.logits.view(-1, V_), targets.view(-1), ignore_index=-1,
                               reduction="none").view(B, T_)


def test_dft_alpha_one_hand_example():
    # two supervised tokens and one ignored; logits of 3 classes
    logits = torch.tensor([[[2.0, 1.0, 0.0], [0.0, 0.0, 0.0], [5.0, -5.0, 0.0]]])
    targets = torch.tensor([[0, 2, -1]])
    # by hand: p1 = e^2 / (e^2 + e + 1), p2 = 1/3
    z = math.exp(2) + math.exp(1) + 1
    p1, p2 = math.exp(2) / z, 1 / 3
    expected = (-p1 * math.log(p1) - p2 * math.log(p2)) / 2
    model = FixedLogits(logits)
    loss, p_sum = supervised_loss(model, torch.zeros(1, 3, dtype=torch.long), targets, 2, 1, dft_alpha=1.0)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert p_sum.item() == pytest.approx(p1 + p2, rel=1e-6)
    loss.backward()
    # d/dlogits of -sg(p) log p = -p * (onehot - softmax), averaged over the 2 tokens; 0 on the ignored one
    s1 = [math.exp(2) / z, math.exp(1) / z, 1 / z]
    s2 = [1 / 3, 1 / 3, 1 / 3]
    g1 = [-p1 * ((k == 0) - s1[k]) / 2 for k in range(3)]
    g2 = [-p2 * ((k == 2) - s2[k]) / 2 for k in range(3)]
    expected_grad = torch.tensor([[g1, g2, [0.0, 0.0, 0.0]]])
    torch.testing.assert_close(model.logits.grad, expected_grad, rtol=1e-6, atol=1e-8)
    # alpha 0.5 mixes the two: w = 0.5 p + 0.5
    model.logits.grad = None
    loss, _ = supervised_loss(model, torch.zeros(1, 3, dtype=torch.long), targets, 2, 1, dft_alpha=0.5)
    w1, w2 = 0.5 * p1 + 0.5, 0.5 * p2 + 0.5
    assert loss.item() == pytest.approx((-w1 * math.log(p1) - w2 * math.log(p2)) / 2, rel=1e-6)


def test_dft_alpha_one_on_the_model_matches_sg_p_log_p():
    model, batches, dft, _, got = first_step(3, alpha=1.0)
    model.zero_grad(set_to_none=True)
    x_all = torch.cat([x for x, _ in batches])
    y_all = torch.cat([y for _, y in batches])
    valid = y_all >= 0
    logp = F.log_softmax(model(x_all)[valid], dim=-1).gather(1, y_all[valid].unsqueeze(1)).squeeze(1)
    ref = -(logp.exp().detach() * logp).mean()
    ref.backward()
    assert dft == pytest.approx(ref.item(), rel=1e-5)
    for a, b in zip(got, grads(model)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


class StubModel:
    """Returns fixed per-token NLLs (0 where the target is -1), like GPT(..., loss_reduction='none')."""

    def __init__(self, nll):
        self.nll = nll

    def __call__(self, x, y, loss_reduction="mean"):
        assert loss_reduction == "none"
        return self.nll


def test_supervised_loss_plain_and_dft():
    y = torch.tensor([[1, 2, -1, 3]])
    nll = torch.tensor([[1.0, 2.0, 0.0, 0.5]], requires_grad=True)
    loss, psum = supervised_loss(StubModel(nll), None, y, num_tokens_step=3, world_size=1)
    assert loss.item() == pytest.approx(3.5 / 3)
    assert psum.item() == pytest.approx(math.exp(-1) + math.exp(-2) + math.exp(-0.5))
    loss.backward()
    assert torch.allclose(nll.grad, torch.tensor([[1 / 3, 1 / 3, 0.0, 1 / 3]]))

    # DFT alpha=1: weights are the (stop-gradient) target probabilities
    nll.grad = None
    # the step's token count as a device tensor (how chat_sft passes it, without a host sync)
    loss, _ = supervised_loss(StubModel(nll), None, y, num_tokens_step=torch.tensor(3), world_size=2, dft_alpha=1.0)
    p = [math.exp(-1), math.exp(-2), math.exp(-0.5)]
    assert loss.item() == pytest.approx(2 * (p[0] * 1 + p[1] * 2 + p[2] * 0.5) / 3)
    loss.backward()
    assert torch.allclose(nll.grad, torch.tensor([[2 * p[0] / 3, 2 * p[1] / 3, 0.0, 2 * p[2] / 3]]))
