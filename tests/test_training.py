"""
Unit tests of nanochat/training.py against hand-computed values (REFERENCE 6.8, 7.4, 7.5, D7).
"""

import io
import math
import random
from types import SimpleNamespace

import pytest
import torch

from nanochat.common import format_eta
from nanochat.training import (lr_multiplier_base, muon_momentum_base, muon_momentum_mid, muon_weight_decay_cosine,
                               set_schedule, check_finite, check_finite_params, NonFiniteLossError, get_rng_state,
                               set_rng_state, get_peak_flops, StepTimer, format_step, all_reduce_mean, any_rank,
                               supervised_loss)

CPU = torch.device("cpu")


@pytest.mark.parametrize("it, expected", [
    (0, 0.1), (4, 0.5), (9, 1.0), (10, 1.0), (80, 1.0),   # warm-up (it+1)/10, then flat up to N - warmdown
    (81, 0.95 + 0.05 * 0.05), (90, 0.5 + 0.5 * 0.05), (100, 0.05),  # p = (N - it)/20; p + (1 - p) * 0.05
])
def test_lr_multiplier_hand_values(it, expected):
    assert lr_multiplier_base(it, 100, 10, 20, 0.05) == pytest.approx(expected, abs=1e-12)


def test_lr_multiplier_without_warmup_or_warmdown():
    assert [lr_multiplier_base(i, 10, 0, 0, 0.0) for i in range(11)] == [1.0] * 11
    # a warm-up longer than the run (tiny test runs with the default 40 steps): still linear in it
    assert lr_multiplier_base(4, 10, 40, 0, 0.0) == pytest.approx(5 / 40)


@pytest.mark.parametrize("it, expected", [
    (0, 0.85), (200, 0.91), (399, 0.85 + 0.12 * 399 / 400), (400, 0.97), (499, 0.97), (500, 0.97),
    (750, 0.935), (1000, 0.90),
])
def test_muon_momentum_base_hand_values(it, expected):
    # N = 1000, warm-down = 500 steps starting at 500
    assert muon_momentum_base(it, 1000, 500) == pytest.approx(expected, abs=1e-12)


def test_muon_momentum_base_short_run_warmup_wins():
    # N = 200, warm-down 130 (starts at 70): inside the first 400 steps the warm-up ramp applies (NEW source)
    assert muon_momentum_base(100, 200, 130) == pytest.approx(0.85 + 0.12 * 100 / 400)
    assert muon_momentum_base(199, 200, 130) == pytest.approx(0.85 + 0.12 * 199 / 400)
    # no warm-down: flat after the ramp
    assert muon_momentum_base(5000, 10000, 0) == 0.97


@pytest.mark.parametrize("it, expected", [(0, 0.85), (150, 0.90), (300, 0.95), (1000, 0.95)])
def test_muon_momentum_mid_hand_values(it, expected):
    assert muon_momentum_mid(it) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("it, expected", [(0, 0.2), (25, 0.1 * (1 + math.sqrt(0.5))), (50, 0.1), (100, 0.0)])
def test_muon_weight_decay_cosine(it, expected):
    assert muon_weight_decay_cosine(it, 100, 0.2) == pytest.approx(expected, abs=1e-12)


def test_set_schedule_touches_the_right_groups():
    opt = SimpleNamespace(param_groups=[
        {"kind": "adamw", "initial_lr": 0.1, "lr": 0.1, "weight_decay": 0.0, "betas": (0.8, 0.95)},
        {"kind": "muon", "initial_lr": 0.02, "lr": 0.02, "weight_decay": 0.3, "momentum": 0.95},
    ])
    set_schedule(opt, 0.5, momentum=0.9, muon_wd=0.1)
    adam, muon = opt.param_groups
    assert adam["lr"] == pytest.approx(0.05) and adam["weight_decay"] == 0.0 and "momentum" not in adam
    assert muon["lr"] == pytest.approx(0.01) and muon["momentum"] == 0.9 and muon["weight_decay"] == 0.1
    set_schedule(opt, 1.0)  # LR only: momentum / wd stay
    assert muon["lr"] == pytest.approx(0.02) and muon["momentum"] == 0.9 and muon["weight_decay"] == 0.1


def test_check_finite_loss_and_grad():
    model = torch.nn.Linear(3, 2)
    check_finite(1.25, 0, CPU)
    with pytest.raises(NonFiniteLossError, match=r"step 7\b.*resume-from-step"):
        check_finite(float("nan"), 7, CPU)
    with pytest.raises(NonFiniteLossError, match=r"step 3\b"):
        check_finite(float("inf"), 3, CPU)
    model(torch.ones(1, 3)).sum().backward()
    check_finite(0.5, 1, CPU, model)
    model.weight.grad[0, 0] = float("inf")
    with pytest.raises(NonFiniteLossError, match=r"step 2\b"):
        check_finite(0.5, 2, CPU, model)


def test_check_finite_params():
    model = torch.nn.Linear(3, 2)
    check_finite_params(model, 4, CPU)
    with torch.no_grad():
        model.bias[1] = float("nan")
    with pytest.raises(NonFiniteLossError, match=r"weights at step 4 .*step 3"):
        check_finite_params(model, 4, CPU)


def test_rng_state_round_trip_through_weights_only_load():
    random.seed(3)
    torch.manual_seed(3)
    buf = io.BytesIO()
    torch.save(get_rng_state(), buf)
    expected = (random.random(), torch.rand(4))
    random.random(), torch.rand(10)  # move on
    buf.seek(0)
    set_rng_state(torch.load(buf, weights_only=True))
    got = (random.random(), torch.rand(4))
    assert got[0] == expected[0] and torch.equal(got[1], expected[1])
    set_rng_state(None)  # older checkpoints without RNG state: no-op


def test_peak_flops_env_override(monkeypatch):
    monkeypatch.setenv("NANOCHAT_PEAK_FLOPS", "2.5e12")
    assert get_peak_flops(CPU, torch.float32) == 2.5e12


def test_step_timer_skips_warmup_steps():
    t = StepTimer(CPU, skip=2)
    assert t.eta(10) == "?"
    for step in range(5):
        t.start()
        dt = t.stop(step)
        assert dt >= 0
    assert t.timed_steps == 2  # steps 3 and 4
    t2 = StepTimer(CPU, skip=0, total_time=10.0, timed_steps=5)  # resumed: 2 s per step
    assert t2.eta(30) == format_eta(60.0)


def test_format_step_hand_values():
    t = StepTimer(CPU, skip=0, total_time=4.0, timed_steps=2)
    line, tok_per_sec, mfu = format_step(5, 10, 3.14159, 0.5, 0.5, 1000, 1e6, 1e10, 2, t, extra="epoch 1")
    assert tok_per_sec == 2000.0
    assert mfu == pytest.approx(100 * 1e6 * 1000 / 0.5 / (1e10 * 2))  # 10 %
    assert line.startswith("step 00005/00010 ( 50.0%) | loss 3.141590 | lrm 0.500 | dt 500ms | tok/s 2,000 | mfu 10.0%")
    assert line.endswith(" | epoch 1") and "eta" in line


def test_single_process_reductions_are_identity():
    assert all_reduce_mean(1.5, CPU) == 1.5
    assert any_rank(True, CPU) is True and any_rank(False, CPU) is False


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
    assert psum == pytest.approx(math.exp(-1) + math.exp(-2) + math.exp(-0.5))
    loss.backward()
    assert torch.allclose(nll.grad, torch.tensor([[1 / 3, 1 / 3, 0.0, 1 / 3]]))

    # DFT alpha=1: weights are the (stop-gradient) target probabilities
    nll.grad = None
    loss, _ = supervised_loss(StubModel(nll), None, y, num_tokens_step=3, world_size=2, dft_alpha=1.0)
    p = [math.exp(-1), math.exp(-2), math.exp(-0.5)]
    assert loss.item() == pytest.approx(2 * (p[0] * 1 + p[1] * 2 + p[2] * 0.5) / 3)
    loss.backward()
    assert torch.allclose(nll.grad, torch.tensor([[2 * p[0] / 3, 2 * p[1] / 3, 0.0, 2 * p[2] / 3]]))
