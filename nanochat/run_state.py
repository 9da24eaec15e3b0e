"""
The state and metrics of a training run: the counters a resumed run restores (RunState), the one log line
of a step, and the run's configuration record with its wandb run. Owns no file (resume writes the meta that
RunState fills) and no timing logic (speed).
"""

import math
from dataclasses import dataclass, field

from nanochat.common import get_wandb
from nanochat.speed import StepTimer


def start_run(args, wandb_project, device, dtype, use_compile=None, rank=0):
    """(user_config: the flags plus the settings resolved for this machine, wandb run or a no-op)."""
    user_config = vars(args).copy()
    user_config.update(device_type=device.type, dtype=str(dtype).removeprefix("torch."))
    if use_compile is not None:
        user_config["compile"] = use_compile
    return user_config, get_wandb(args.run, wandb_project, user_config, rank == 0)


@dataclass
class RunState:
    """The counters of a training run: what the step log shows and a resumed run restores. `val_name`
    ("val_bpb", "val_loss"...) names the validation figure in the meta and the curves."""
    val_name: str
    step: int = 0
    smooth_loss: float = 0.0  # EMA of the train loss (bias-corrected when read)
    progress: float = 0.0  # mid_train: fraction of the mixture's epoch consumed
    val: float = None  # latest validation figure and the step it was measured at
    val_step: int = None
    min_val: float = None
    timer: StepTimer = field(default_factory=StepTimer)
    curves: dict = None
    metrics: dict = field(default_factory=dict)  # latest other evaluations (CORE, MMLU...) and their step
    metrics_step: int = None

    def __post_init__(self):
        if self.curves is None:
            self.curves = {"step": [], "loss": [], "val_step": [], self.val_name: []}

    def record_loss(self, loss):
        """Log this step's loss; returns the smoothed, bias-corrected loss for the step line."""
        self.smooth_loss = 0.9 * self.smooth_loss + 0.1 * loss
        self.curves["step"].append(self.step)
        self.curves["loss"].append(loss)
        return self.smooth_loss / (1 - 0.9 ** (self.step + 1))

    def record_val(self, value):
        self.val, self.val_step = value, self.step
        if math.isfinite(value):
            self.min_val = value if self.min_val is None else min(self.min_val, value)
        self.curves["val_step"].append(self.step)
        self.curves[self.val_name].append(value)

    def record_metrics(self, metrics):
        self.metrics, self.metrics_step = dict(metrics), self.step

    def metrics_now(self):
        """The other evaluations of this very step ({} if none ran at it)."""
        return self.metrics if self.metrics_step == self.step else {}

    def val_now(self):
        """The validation figure of this very step, None if none was measured at it (never a stale one)."""
        return self.val if self.val_step == self.step else None

    def loop_state(self):
        return {"smooth_train_loss": self.smooth_loss, "progress": self.progress, f"min_{self.val_name}": self.min_val,
                "last_val": [self.val_step, self.val], "total_training_time": self.timer.total_time,
                "timed_steps": self.timer.timed_steps, "curves": self.curves}

    def restore(self, meta):
        """Continue from a checkpoint's meta (older metas lack some keys: those keep their defaults)."""
        loop = meta["loop_state"]
        self.step = meta["step"]
        self.smooth_loss = loop.get("smooth_train_loss", 0.0)
        self.progress = loop.get("progress", 0.0)
        self.min_val = loop.get(f"min_{self.val_name}")
        self.val_step, self.val = loop.get("last_val", [self.step, meta.get(self.val_name)])
        self.timer.total_time, self.timer.timed_steps = loop["total_training_time"], loop["timed_steps"]
        self.curves = loop.get("curves", self.curves)


def format_step(run, total, loss, lrm, dt, speed, extra=""):
    """One compact log line: step/total, loss, lr multiplier, dt, tok/s, MFU, ETA (and the stage's extras)."""
    pct = 100 * run.step / max(total, 1)
    line = (f"step {run.step:05d}/{total:05d} ({pct:5.1f}%) | loss {loss:.6f} | lrm {lrm:.3f} | dt {dt * 1000:.0f}ms | "
            f"tok/s {speed.tok_per_sec(dt):,.0f} | mfu {speed.mfu(dt):.1f}% | eta {run.timer.eta(total - run.step)}")
    return line + (f" | {extra}" if extra else "")
