"""
nanochat/speed.py: the MFU peak (pinned, measured and only ever raised, RNG-neutral) and the step timer.
"""

import pytest
import torch

from nanochat.common import format_eta
from nanochat.speed import PeakFlops, StepTimer, Speed

CPU = torch.device("cpu")


def test_peak_flops_env_override(monkeypatch):
    monkeypatch.setenv("NANOCHAT_PEAK_FLOPS", "2.5e12")
    peak = PeakFlops.for_device(CPU, torch.float32, measure=lambda *a: pytest.fail("pinned peak must not probe"))
    assert peak.flops == 2.5e12 and "NANOCHAT_PEAK_FLOPS" in peak.describe()
    peak.reprobe("step 5")
    assert peak.flops == 2.5e12


def test_measured_peak_keeps_the_highest_and_says_when(monkeypatch):
    monkeypatch.delenv("NANOCHAT_PEAK_FLOPS", raising=False)
    probes = iter([100e9, 80e9, 190e9, 150e9])  # a noisy machine: the first probe reads low
    peak = PeakFlops.for_device(CPU, torch.float32, measure=lambda device, dtype: next(probes))
    assert (peak.flops, peak.measured_at) == (100e9, "start")
    peak.reprobe("step 50")  # lower: ignored
    assert (peak.flops, peak.measured_at) == (100e9, "start")
    peak.reprobe("step 100")
    assert (peak.flops, peak.measured_at) == (190e9, "step 100")
    peak.reprobe("step 150")
    assert peak.flops == 190e9 and "190.0 GFLOP/s" in peak.describe() and "step 100" in peak.describe()
    # MFU follows the highest peak: 1e6 FLOPs/token * 1000 tokens in 0.5 s on 1 rank = 2e9 FLOP/s
    assert Speed(1000, 1e6, 1, peak).mfu(0.5) == pytest.approx(100 * 2e9 / 190e9)


def test_reprobe_leaves_the_rng_alone(monkeypatch):
    monkeypatch.delenv("NANOCHAT_PEAK_FLOPS", raising=False)
    peak = PeakFlops.for_device(CPU, torch.float32, measure=lambda device, dtype: float(torch.rand(()).item() + 1))
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    peak.reprobe("step 1")  # draws random numbers inside
    assert torch.equal(torch.rand(3), expected)


class FakeClock:
    """Each step takes durations[i] seconds."""

    def __init__(self, durations):
        self.times = [0.0]
        for d in durations:
            self.times += [self.times[-1], self.times[-1] + d]  # start() then stop() of each step
        self.times = iter(self.times[1:])

    def __call__(self):
        return next(self.times)


def test_step_timer_skips_warmup_steps():
    durations = [30.0, 20.0, 1.0, 3.0, 2.0]  # steps 0-2: compilation warm-up, much slower
    t = StepTimer(skip=2, clock=FakeClock(durations))
    assert t.eta(10) == "?"
    dts = []
    for step in range(5):
        t.start()
        dts.append(t.stop(step))
    assert dts == durations
    assert t.timed_steps == 2 and t.total_time == 5.0  # steps 3 and 4 only: (3 + 2) s
    assert t.eta(10) == format_eta(25.0)  # 2.5 s per step
    t2 = StepTimer(skip=0, total_time=10.0, timed_steps=5)  # resumed: 2 s per step
    assert t2.eta(30) == format_eta(60.0)
