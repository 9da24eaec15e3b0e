"""
nanochat/run_state.py: the step line and the run's counters (EMA, validation figures, restore) by hand.
"""

import json

import pytest

from nanochat.common import format_eta
from nanochat.resume import strict_json
from nanochat.run_state import RunState, format_step
from nanochat.speed import PeakFlops, StepTimer, Speed, mean_mfu


def test_format_step_hand_values():
    run = RunState("val_bpb", step=5, timer=StepTimer(skip=0, total_time=4.0, timed_steps=2))
    speed = Speed(1000, 1e6, 2, PeakFlops(1e10, "datasheet"))
    line = format_step(run, 10, 3.14159, 0.5, 0.5, speed, extra="epoch 1")
    assert speed.tok_per_sec(0.5) == 2000.0
    assert speed.mfu(0.5) == pytest.approx(100 * 1e6 * 1000 / 0.5 / (1e10 * 2))  # 10 %
    assert line == ("step 00005/00010 ( 50.0%) | loss 3.141590 | lrm 0.500 | dt 500ms | tok/s 2,000 | mfu 10.0% | "
                    f"eta {format_eta(10.0)} | epoch 1")
    assert mean_mfu(run, speed) == pytest.approx(100 * 1e6 * 1000 / 2.0 / (1e10 * 2))  # 2 s per step: 2.5 %


def test_run_state_counters_and_strict_meta():
    run = RunState("val_bpb")
    assert run.record_loss(2.0) == pytest.approx(2.0)  # debiased EMA of one value is the value
    run.step = 1
    assert run.record_loss(1.0) == pytest.approx((0.9 * 0.2 + 0.1) / (1 - 0.81))
    run.record_val(float("inf"))  # e.g. no byte counted: never the minimum, never written as Infinity
    assert run.min_val is None and run.val_now() == float("inf")
    run.step = 2
    run.record_val(1.5)
    assert run.val_now() == 1.5 and run.min_val == 1.5
    run.step = 3
    assert run.val_now() is None  # no evaluation at this step: no stale figure
    text = json.dumps(strict_json({"loop_state": run.loop_state(), "x": [float("nan"), (1.0, float("-inf"))]}))
    loaded = json.loads(text, parse_constant=lambda c: pytest.fail(f"not strict JSON: {c}"))
    assert loaded["x"] == [None, [1.0, None]]
    assert loaded["loop_state"]["curves"]["val_bpb"] == [None, 1.5]
    resumed = RunState("val_bpb")
    resumed.restore({"step": 3, "loop_state": loaded["loop_state"]})
    assert (resumed.step, resumed.val, resumed.val_step, resumed.min_val) == (3, 1.5, 2, 1.5)
    assert resumed.smooth_loss == run.smooth_loss and resumed.curves["loss"] == [2.0, 1.0]
