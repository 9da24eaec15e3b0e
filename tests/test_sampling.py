"""
nanochat/engine.py's sampling: sample_next_token and the nucleus against hand-computed probabilities and draw
frequencies, and its safety at extreme temperatures, top_k and top_p (tiny temperatures are exactly greedy).
"""

import pytest
import torch

from nanochat.engine import GREEDY_TEMPERATURE, sample_next_token, top_p_truncate


def test_sample_next_token():
    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0], [5.0, 0.0, 0.0, 0.0]])
    assert sample_next_token(logits, g, temperature=0.0).tolist() == [[1], [0]]
    assert sample_next_token(logits, g, temperature=1.0, top_k=1).tolist() == [[1], [0]]
    draws = torch.cat([sample_next_token(logits, g, 1.0, top_k=2) for _ in range(300)], dim=1)
    assert set(draws[0].tolist()) == {1, 3}  # only the top 2 of row 0
    # full softmax sampling frequencies follow the probabilities (row 0: softmax([0, 3, 1, 2]))
    draws = torch.cat([sample_next_token(logits, g, 1.0) for _ in range(4000)], dim=1)
    freq = torch.bincount(draws[0], minlength=4).float() / draws.size(1)
    torch.testing.assert_close(freq, torch.softmax(logits[0], -1), atol=0.03, rtol=0)
    # top-k frequencies follow the softmax of the kept logits
    draws = torch.cat([sample_next_token(logits[:1], g, 0.5, top_k=3) for _ in range(4000)], dim=1)
    freq = torch.bincount(draws[0], minlength=4).float() / draws.size(1)
    want = torch.softmax(torch.tensor([-float("inf"), 3.0, 1.0, 2.0]) / 0.5, -1)
    torch.testing.assert_close(freq, want, atol=0.03, rtol=0)
    # an impossible token (probability exactly 0) is never drawn
    masked = torch.tensor([[0.0, -float("inf"), 0.0, -float("inf")]])
    draws = torch.cat([sample_next_token(masked, g, 1.0) for _ in range(500)], dim=1)
    assert set(draws[0].tolist()) == {0, 2}
    # top_k larger than V is clamped
    assert sample_next_token(logits, g, 1.0, top_k=100).shape == (2, 1)
    with pytest.raises(ValueError):
        sample_next_token(logits, g, temperature=-0.5)

def test_top_p_truncate_by_hand():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])  # sorted, descending
    kept = lambda top_p: (top_p_truncate(probs, top_p) > 0).sum().item()  # noqa: E731
    assert [kept(0.79), kept(0.81), kept(0.1), kept(0.96), kept(1.0)] == [2, 3, 1, 4, 4]
    torch.testing.assert_close(top_p_truncate(probs, 0.79), torch.tensor([[0.5, 0.3, 0.0, 0.0]]))


def test_top_p_sampling_frequencies():
    # unsorted logits whose softmax is [0.15, 0.5, 0.05, 0.3]; nucleus 0.9 keeps {1, 3, 0} (mass 0.95)
    p = torch.tensor([0.15, 0.5, 0.05, 0.3])
    logits = p.log()[None]
    g = torch.Generator().manual_seed(0)
    draws = torch.cat([sample_next_token(logits, g, 1.0, top_p=0.9) for _ in range(4000)], dim=1)
    freq = torch.bincount(draws[0], minlength=4).float() / draws.size(1)
    want = torch.tensor([0.15, 0.5, 0.0, 0.3]) / 0.95
    torch.testing.assert_close(freq, want, atol=0.03, rtol=0)
    assert freq[2] == 0
    # with top_k=2 first, the nucleus is taken inside the top 2: 0.5 / 0.8 = 0.625 < 0.7, so both stay
    draws = torch.cat([sample_next_token(logits, g, 1.0, top_k=2, top_p=0.7) for _ in range(2000)], dim=1)
    assert set(draws[0].tolist()) == {1, 3}
    draws = torch.cat([sample_next_token(logits, g, 1.0, top_k=2, top_p=0.6) for _ in range(200)], dim=1)
    assert set(draws[0].tolist()) == {1}
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="top_p"):
            sample_next_token(logits, g, 1.0, top_p=bad)


def test_sampling_is_safe_at_extreme_temperatures():
    """Temperatures from 1e-300 to 1e3 with extreme top_k/top_p: always a valid token; exactly greedy below
    GREEDY_TEMPERATURE; equal to greedy in the limit above it (logits 0.1 apart); seeded draws reproducible."""
    V = 50
    gen = torch.Generator().manual_seed(0)
    spaced = torch.stack([torch.randperm(V, generator=gen).float() * 0.1 for _ in range(3)])  # gaps of 0.1
    logits = torch.cat([spaced, spaced * 1e4 - 5e4, torch.randn(2, V, generator=gen) * 30])
    logits[-1, 7] = logits[-1, 3] = logits[-1].max() + 1  # a tie: argmax takes the first
    greedy = logits.argmax(dim=-1, keepdim=True)
    assert greedy[-1].item() == 3
    below = [5e-324, 1e-300, 1e-39, 1e-30, 1e-10, GREEDY_TEMPERATURE * 0.99]
    near = [GREEDY_TEMPERATURE, 2e-5, 1e-4, 1e-3]
    above = [1e-2, 0.1, 1.0, 10.0, 1e3]
    for temperature in below + near + above:
        for top_k in (None, 1, 5, 10**9):
            for top_p in (None, 1e-300, 0.5, 1 - 1e-9):
                draws = [sample_next_token(logits, torch.Generator().manual_seed(s), temperature, top_k, top_p)
                         for s in range(3)]
                again = [sample_next_token(logits, torch.Generator().manual_seed(s), temperature, top_k, top_p)
                         for s in range(3)]
                assert all(torch.equal(a, b) for a, b in zip(draws, again)), (temperature, top_k, top_p)
                for d in draws:
                    assert d.shape == (len(logits), 1) and d.dtype == torch.long
                    assert ((0 <= d) & (d < V)).all(), (temperature, top_k, top_p)
                    if top_k:  # inside the k most likely (no ties among the kept ones except the last row)
                        kth = logits.topk(min(top_k, V), dim=-1).values[:, -1:]
                        assert (logits.gather(1, d) >= kth).all()
                    top = logits.gather(1, d) == logits.max(dim=-1, keepdim=True).values
                    if temperature in below:
                        assert torch.equal(d, greedy), (temperature, top_k, top_p)
                    elif top_k == 1 or top_p == 1e-300 or temperature in near:  # a top token (either of a tie)
                        assert top.all() and torch.equal(d[:-1], greedy[:-1]), (temperature, top_k, top_p)
    # at 1e3 the distribution is the (nearly flat) softmax of logits / 1e3, computed here in float64
    g = torch.Generator().manual_seed(1)
    row = logits[2:3]
    draws = torch.cat([sample_next_token(row, g, 1e3) for _ in range(4000)], dim=1)
    freq = torch.bincount(draws[0], minlength=V).double() / draws.size(1)
    torch.testing.assert_close(freq, torch.softmax(row[0].double() / 1e3, -1), atol=0.015, rtol=0)
    # scaling must not overflow where logits are huge: two logits 0.5 apart near 1e4, T = 0.5 -> p = 1/(1 + e^-1)
    pair = torch.tensor([[1e4, 1e4 - 0.5]])
    draws = torch.cat([sample_next_token(pair, g, 0.5) for _ in range(4000)], dim=1)
    assert abs((draws == 0).float().mean().item() - 1 / (1 + torch.e ** -1)) < 0.03
    for bad in (float("inf"), float("nan"), -1e-300, None):
        with pytest.raises(ValueError, match="temperature"):
            sample_next_token(logits, g, bad)
