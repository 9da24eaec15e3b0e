"""
nanochat/schedules.py against hand-computed values: the LR multipliers, Muon momentum and weight decay, and
which optimizer groups set_schedule touches.
"""

import math
from types import SimpleNamespace

import pytest

from nanochat.schedules import (lr_multiplier_base, warmup_multiplier, muon_momentum_base, muon_momentum_mid,
                                muon_weight_decay_cosine, set_schedule, scale_lrs)


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


def test_warmup_multiplier_hand_values():
    assert [warmup_multiplier(i, 4) for i in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert warmup_multiplier(0, 0) == 1.0  # no warm-up


def test_scale_lrs_moves_the_schedules_base():
    opt = SimpleNamespace(param_groups=[{"lr": 0.2, "initial_lr": 0.2}, {"lr": 0.02, "initial_lr": 0.02}])
    scale_lrs(opt, 0.5)
    set_schedule(opt, 1.0)  # the schedule starts from the scaled LR, not the original one
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.1, 0.01])
