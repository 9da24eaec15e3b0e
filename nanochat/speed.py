"""
How fast a training run goes: the peak FLOP/s that MFU is measured against, the step timer, and tokens/s and
MFU of a step. Owns no counters of the run (run_state) and prints nothing but the peak it settles on.
"""

import math
import os
import time
from dataclasses import dataclass

import torch

from nanochat.common import print0, format_eta, get_datasheet_peak_flops, measure_matmul_peak


@dataclass
class PeakFlops:
    """MFU's denominator: $NANOCHAT_PEAK_FLOPS, else a known GPU's datasheet bf16 peak, else the matmul peak
    measured here in the compute dtype. A measured peak is re-probed at evaluations and only ever raised:
    a probe under contention reads low and would inflate every MFU computed against it."""
    flops: float
    source: str  # "NANOCHAT_PEAK_FLOPS" | "datasheet" | "measured"
    measured_at: str = "start"
    device: torch.device = None
    dtype: torch.dtype = torch.float32
    measure: object = measure_matmul_peak

    @classmethod
    def for_device(cls, device, dtype, measure=measure_matmul_peak):
        if os.environ.get("NANOCHAT_PEAK_FLOPS"):  # pinned: MFU comparable across runs, no probe
            peak = cls(float(os.environ["NANOCHAT_PEAK_FLOPS"]), "NANOCHAT_PEAK_FLOPS")
        elif math.isfinite(get_datasheet_peak_flops(device)):
            peak = cls(get_datasheet_peak_flops(device), "datasheet")
        else:
            peak = cls(0.0, "measured", device=device, dtype=dtype, measure=measure)
            peak.reprobe("start")
        print0(f"peak FLOP/s for MFU: {peak.describe()}")
        return peak

    def reprobe(self, when):
        """Measure again (a measured peak only); keep the higher figure. RNG-neutral, so resume stays exact."""
        if self.source != "measured":
            return
        devices = [self.device] if self.device is not None and self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            flops = self.measure(self.device, self.dtype)
        if flops > self.flops:
            if self.flops > 0:
                print0(f"peak FLOP/s raised to {flops / 1e9:.1f} GFLOP/s (measured at {when}); MFU uses it from now on")
            self.flops, self.measured_at = flops, str(when)

    def describe(self):
        if self.source == "measured":
            return (f"{self.flops / 1e9:.1f} GFLOP/s, highest measured {str(self.dtype).removeprefix('torch.')} "
                    f"matmul peak (measured at {self.measured_at})")
        return f"{self.flops / 1e12:.3g} TFLOP/s ({self.source})"


@dataclass
class StepTimer:
    """Wall clock per step; steps <= `skip` (compile warm-up) are not counted. No device sync of its own:
    stop() is called after the step's one host sync."""
    skip: int = 0
    total_time: float = 0.0
    timed_steps: int = 0
    clock: object = time.perf_counter

    def start(self):
        self.t0 = self.clock()

    def stop(self, step):
        dt = self.clock() - self.t0
        if step > self.skip:
            self.total_time += dt
            self.timed_steps += 1
        return dt

    def mean(self):
        return self.total_time / self.timed_steps if self.timed_steps else None

    def eta(self, steps_left):
        return "?" if self.timed_steps == 0 else format_eta(self.mean() * steps_left)


@dataclass
class Speed:
    """Tokens/s and MFU of a step from its duration."""
    tokens_per_step: int
    flops_per_token: float
    world_size: int
    peak: PeakFlops

    def tok_per_sec(self, dt):
        return self.tokens_per_step / dt

    def mfu(self, dt):
        """Percent of the peak (the highest seen so far) summed over ranks."""
        return 100 * self.flops_per_token * self.tokens_per_step / dt / (self.peak.flops * self.world_size)


def mean_mfu(run, speed):
    """MFU over the run's timed steps against the final (highest) peak: the figure for the report."""
    mean = run.timer.mean()
    return None if mean is None else speed.mfu(mean)
