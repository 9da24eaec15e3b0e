"""Bits per byte against hand-computed values."""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat.loss_eval import evaluate_bpb


class FixedNLL(nn.Module):
    """Returns a preset per-token NLL for each batch (in order), shaped like the targets."""
    def __init__(self, nlls):
        super().__init__()
        self.nlls = list(nlls)
        self.calls = 0

    def forward(self, x, y, loss_reduction="mean"):
        assert loss_reduction == "none"
        out = self.nlls[self.calls]
        self.calls += 1
        return out.reshape(-1)


def test_bpb_by_hand():
    # vocab of 5: token 0 is a special (0 bytes), the others 1..4 bytes
    token_bytes = torch.tensor([0, 1, 2, 3, 4], dtype=torch.int32)
    x = torch.zeros(2, 3, dtype=torch.long)
    y1 = torch.tensor([[1, 2, 0], [4, -1, 3]])
    n1 = torch.tensor([[1.0, 2.0, 100.0], [0.5, 7.0, 1.5]])  # the special (0) and the ignored (-1) don't count
    y2 = torch.tensor([[-1, -1, -1], [2, 2, 0]])
    n2 = torch.tensor([[9.0, 9.0, 9.0], [0.25, 0.75, 50.0]])
    model = FixedNLL([n1, n2, torch.full((2, 3), float("nan"))])  # the third batch is never asked for
    batches = iter([(x, y1), (x, y2), (x, y2)])
    bpb = evaluate_bpb(model, batches, 2, token_bytes)
    nats = (1.0 + 2.0 + 0.5 + 1.5) + (0.25 + 0.75)
    num_bytes = (1 + 2 + 4 + 3) + (2 + 2)
    assert math.isclose(bpb, nats / (math.log(2) * num_bytes), rel_tol=1e-6)
    assert model.calls == 2


def test_bpb_no_bytes_is_inf_and_matches_cross_entropy_on_real_logits():
    token_bytes = torch.tensor([0, 1, 1, 1], dtype=torch.int32)
    model = FixedNLL([torch.ones(1, 2)])
    assert evaluate_bpb(model, iter([(torch.zeros(1, 2, dtype=torch.long), torch.tensor([[0, -1]]))]), 1, token_bytes) == float("inf")

    # a real "model": with every token 1 byte (specials excluded), bpb = mean CE / ln 2
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 4)
    targets = torch.randint(1, 4, (3, 5))

    class Logits(nn.Module):
        def forward(self, x, y, loss_reduction="mean"):
            return F.cross_entropy(logits.view(-1, 4), y.view(-1), ignore_index=-1, reduction=loss_reduction)

    bpb = evaluate_bpb(Logits(), iter([(targets, targets)]), 1, token_bytes)
    expected = F.cross_entropy(logits.view(-1, 4), targets.view(-1)).item() / math.log(2)
    assert math.isclose(bpb, expected, rel_tol=1e-5)
