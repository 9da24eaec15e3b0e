"""
What the training stages share, so they cannot drift: schedules, the run's counters (RunState), the step
line, the step's one host sync with its NaN guard, MFU, evaluation mode, exact-resume checkpoints and
strict-JSON metas. The scripts keep their own data, loss and loop.
"""

import contextlib
import math
import os
import random
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from nanochat import checkpoint_manager as ckpt
from nanochat.common import (print0, format_eta, get_datasheet_peak_flops, measure_matmul_peak, compute_cleanup,
                             get_wandb)

def start_run(args, wandb_project, device, dtype, use_compile=None, rank=0):
    """(user_config: the flags plus the settings resolved for this machine, wandb run or a no-op)."""
    user_config = vars(args).copy()
    user_config.update(device_type=device.type, dtype=str(dtype).removeprefix("torch."))
    if use_compile is not None:
        user_config["compile"] = use_compile
    return user_config, get_wandb(args.run, wandb_project, user_config, rank == 0)

# -----------------------------------------------------------------------------
# Schedules

def lr_multiplier_base(it, num_iterations, warmup_iters, warmdown_iters, final_lr_frac):
    """Linear warm-up, flat, then a linear warm-down to final_lr_frac (trapezoidal schedule)."""
    if it < warmup_iters:
        return (it + 1) / warmup_iters
    if it <= num_iterations - warmdown_iters:
        return 1.0
    progress = (num_iterations - it) / max(warmdown_iters, 1)
    return progress + (1 - progress) * final_lr_frac


WARMUP_STEPS = 10  # default warm-up of the stages that continue a trained model (mid, SFT, RL); see below


def warmup_multiplier(it, warmup_iters):
    """(it + 1) / warmup_iters for the first warmup_iters steps, then 1. Every stage that continues a trained
    model (mid, SFT, RL) starts a new optimizer, and a fresh Adam step is lr * sign(grad) for every weight,
    however small its gradient: at full LR that kicks the residual scalars (x0/smear/backout, LR 0.2-0.5) far
    from where pretraining left them, and the loss spikes (mid from a bf16 base: 6.8 -> 12.6 at step 1)."""
    return min(1.0, (it + 1) / warmup_iters) if warmup_iters > 0 else 1.0


def muon_momentum_base(it, num_iterations, warmdown_iters):
    """Muon momentum: 0.85 -> 0.97 over 400 steps, flat, then -> 0.90 during the LR warm-down. Where the
    two overlap the warm-up wins: short runs keep the low early momentum that stabilises the first steps."""
    warmdown_start = num_iterations - warmdown_iters
    if it < 400:
        return 0.85 + (0.97 - 0.85) * it / 400
    if warmdown_iters > 0 and it >= warmdown_start:
        p = (it - warmdown_start) / warmdown_iters
        return 0.97 + (0.90 - 0.97) * p
    return 0.97


def muon_momentum_mid(it):
    """Midtraining's Muon momentum: 0.85 -> 0.95 over the first 300 steps."""
    return 0.85 + (0.95 - 0.85) * min(it / 300, 1.0)


def muon_weight_decay_cosine(it, num_iterations, wd):
    """Cosine decay of the Muon weight decay to 0 over the run."""
    return wd * 0.5 * (1 + math.cos(math.pi * it / max(num_iterations, 1)))


def set_schedule(optimizer, lrm, momentum=None, muon_wd=None):
    """Apply this step's LR multiplier (all groups), Muon momentum and Muon weight decay."""
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * lrm
        if group.get("kind") == "muon":
            if momentum is not None:
                group["momentum"] = momentum
            if muon_wd is not None:
                group["weight_decay"] = muon_wd


def scale_lrs(optimizer, frac):
    """Multiply every group's LR by `frac`, and make that the new initial_lr schedules start from."""
    for group in optimizer.param_groups:
        group["lr"] = group["lr"] * frac
        group["initial_lr"] = group["lr"]


def grad_accum_steps(total_batch_size, device_batch_size, seq_len, world_size):
    """Micro-steps per optimizer step so that each step sees exactly total_batch_size tokens."""
    world_tokens = device_batch_size * seq_len * world_size
    if total_batch_size % world_tokens != 0:
        raise SystemExit(f"--total-batch-size={total_batch_size} must be a multiple of device_batch_size*max_seq_len*"
                         f"world_size = {device_batch_size}*{seq_len}*{world_size} = {world_tokens}; "
                         f"try --total-batch-size={max(1, total_batch_size // world_tokens) * world_tokens}")
    return total_batch_size // world_tokens

# -----------------------------------------------------------------------------
# The step: gradients without host syncs, then one sync that carries the NaN guard

class NonFiniteLossError(RuntimeError):
    pass


class Prefetcher:
    """A loader that runs one batch ahead: prefetch() packs the next batch while the device still computes.
    state_dict(), epoch and progress describe the batches handed out, never the one held back, so a
    checkpoint resumes exactly where the loop was."""

    def __init__(self, loader):
        self.loader, self._held = loader, None
        self._snapshot()

    def _snapshot(self):
        self._state = self.loader.state_dict()
        self.epoch = self.loader.epoch
        self.progress = getattr(self.loader, "progress", None)  # mid_train's packer counts these two
        self.truncated = getattr(self.loader, "truncated", None)

    def prefetch(self):
        if self._held is None:
            self._held = next(self.loader)

    def __iter__(self):
        return self

    def __next__(self):
        self.prefetch()  # no-op when a batch is already held
        batch, self._held = self._held, None
        self._snapshot()
        return batch

    def state_dict(self):
        return self._state

    def close(self):
        if hasattr(self.loader, "close"):
            self.loader.close()


def accumulate_gradients(model, batches, steps):
    """Forward/backward over `steps` micro-batches, each loss scaled by 1/steps; then prefetch the next
    step's first batch. Returns the summed loss as a device tensor (no host sync)."""
    loss_sum = None
    for _ in range(steps):
        x, y = next(batches)
        loss = model(x, y) / steps
        loss.backward()
        loss_sum = loss.detach().float() if loss_sum is None else loss_sum + loss.detach().float()
    batches.prefetch()
    return loss_sum


def guarded_step(step, optimizer, model, loss, extras=()):
    """The one host sync of an optimizer step: the loss (device tensor), a NaN/inf flag for loss and gradients,
    and `extras` (device scalars) are summed over ranks in one all-reduce and copied to the host at once.
    Anything non-finite on any rank stops the run before the update, so no poisoned state reaches a
    checkpoint. Returns (mean loss over ranks, list of the extras summed over ranks) as floats."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    grad_norm = torch.nn.utils.get_total_norm(grads) if grads else loss.new_zeros(())
    dtype = torch.float32 if loss.device.type == "mps" else torch.float64  # MPS has no float64
    bad = ~torch.isfinite(loss) | ~torch.isfinite(grad_norm)
    stats = all_reduce_sum(torch.stack([loss.to(dtype), bad.to(dtype), *[e.to(dtype) for e in extras]]))
    loss_sum, bad, *extras = stats.tolist()  # the sync
    loss_value = loss_sum / (dist.get_world_size() if _distributed() else 1)
    if bad > 0:
        raise NonFiniteLossError(
            f"non-finite loss or gradient at step {step} (loss={loss_value}); stopping without saving this state. "
            f"The last good checkpoint is untouched: lower the learning rate or check the data, then resume "
            f"with --resume-from-step=<last saved step>.")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_value, extras


def check_finite_params(model, step, device):
    """Refuse to save non-finite weights: an update itself can overflow (a huge LR), and the loop saves
    step S before computing step S's loss, so the guard above would not catch it in time."""
    norms = [p.detach().float().norm() for p in model.parameters()]
    if any_rank(bool(norms) and not math.isfinite(torch.stack(norms).norm().item()), device):
        raise NonFiniteLossError(
            f"non-finite weights at step {step} (the update of step {step - 1} overflowed); not saving step {step}. "
            f"The last good checkpoint is untouched: lower the learning rate, then resume with "
            f"--resume-from-step=<last saved step>.")


@contextlib.contextmanager
def stop_on_nonfinite():
    """Around the loop: a NaN/inf stop prints one line naming the step and exits with status 2."""
    try:
        yield
    except NonFiniteLossError as e:
        print0(f"ERROR: {e}")
        compute_cleanup()
        raise SystemExit(2)


@contextlib.contextmanager
def evaluating(model):
    """Eval mode and no grad for an evaluation, then back to training mode."""
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train()

# -----------------------------------------------------------------------------
# Reproducibility

def get_rng_state():
    """RNG states as tensors/ints only, so they load with torch.load(weights_only=True)."""
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
             "python_pos": random.getstate()[2]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state):
    if not state:
        return
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), state["python_pos"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])

# -----------------------------------------------------------------------------
# Throughput: peak FLOP/s, step timing, the step line

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


@dataclass
class RunState:
    """The counters of a training run: what the step log shows and a resumed run restores. `val_name`
    ("val_bpb" or "val_loss") names the validation figure in the meta and the curves."""
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


def mean_mfu(run, speed):
    """MFU over the timed steps against the final (highest) peak: the figure for the report."""
    mean = run.timer.mean()
    return None if mean is None else speed.mfu(mean)

# -----------------------------------------------------------------------------
# Distributed helpers (identities on one process)

def _distributed():
    return dist.is_available() and dist.is_initialized()


def all_reduce_mean(value, device):
    """Mean of a python float over ranks."""
    if not _distributed():
        return value
    return all_reduce_sum(torch.tensor([value], dtype=torch.float64, device=device)).item() / dist.get_world_size()


def all_reduce_sum(tensor):
    if _distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def any_rank(flag, device):
    """True if `flag` is True on any rank (e.g. 'this rank ran out of data')."""
    if not _distributed():
        return bool(flag)
    t = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())

# -----------------------------------------------------------------------------
# Losses of the chat stages

def supervised_loss(model, x, y, num_tokens_step, world_size, dft_alpha=0.0):
    """Loss of one micro-batch such that summing backward() over the step's micro-batches (gradients averaged
    over ranks by the optimizer) gives the gradient of sum(w_t * CE_t) / (number of supervised tokens of the
    step): every supervised token weighs the same however rows are batched. w_t = alpha * sg(p_t) + 1 - alpha,
    p_t the model's probability of the target (Dynamic Fine-Tuning, https://arxiv.org/abs/2508.05629; alpha 0
    is plain cross-entropy). `num_tokens_step` may be a device tensor (no host sync).
    Returns (loss tensor, sum of p_t over this micro-batch's supervised tokens as a device scalar)."""
    nll = model(x, y, loss_reduction="none").view(-1)  # (B*T,), 0 where y == -1
    valid = (y.view(-1) >= 0)
    nll = nll * valid  # keep ignored positions out even if a model returned something there
    p = torch.exp(-nll.detach()) * valid
    weighted = nll.sum() if dft_alpha == 0.0 else ((dft_alpha * p + (1.0 - dft_alpha)) * nll).sum()
    denom = num_tokens_step.clamp(min=1) if torch.is_tensor(num_tokens_step) else max(num_tokens_step, 1)
    # ranks' gradients are averaged by the optimizer, so scale by world_size to get a plain sum
    loss = weighted * world_size / denom
    return loss, p.sum()

# -----------------------------------------------------------------------------
# Checkpoints of a training run: what every training script saves and restores

def strict_json(obj):
    """A copy with every NaN/inf float replaced by None: metas stay strict JSON (json.loads of any tool)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    return obj


def stage_meta(run, config, user_config, tokenizer, world_size, **extra):
    """The meta every stage writes: the step, its validation figure (None unless measured at this very
    step), the full model config, the flags, the loop state for resume and the tokenizer's identity."""
    meta = {"step": run.step, run.val_name: run.val_now(), "model_config": ckpt.config_to_dict(config),
            "user_config": user_config, "world_size": world_size, **extra, "loop_state": run.loop_state(),
            "tokenizer": ckpt.tokenizer_info(tokenizer)}
    return strict_json(meta)


@dataclass
class Checkpoints:
    """Where and how a run saves: model + this rank's optimizer shard + loader position + RNG, so a resumed
    run continues exactly; non-finite weights are refused. Every rank calls save() (it has a barrier).
    `write=False` (a dry run) saves nothing."""
    directory: str
    model: torch.nn.Module
    optimizer: object
    rank: int
    device: torch.device
    save_every: int = -1  # also at these steps (-1: only at the end)
    write: bool = True
    resumed_from: int = -1

    def evaluate_and_save(self, step, last_step, evaluate, make_meta, batches):
        """The top of each loop iteration: the evaluations due now, then a save when due (so the meta holds
        them). The last step is saved before its final evaluation (slow, may be killed), whose results then
        join the step's meta. Returns last_step."""
        if last_step:
            self.save(step, make_meta(), batches.state_dict())
        evaluate(step, last_step)
        if last_step:
            self.rewrite_meta(step, make_meta())
        elif step > 0 and step != self.resumed_from and self.save_every > 0 and step % self.save_every == 0:
            self.save(step, make_meta(), batches.state_dict())
        return last_step

    def save(self, step, meta, loader_state):
        if not self.write:
            return
        check_finite_params(self.model, step, self.device)
        state = {"optimizer": self.optimizer.state_dict(), "loader": loader_state, "rng": get_rng_state()}
        ckpt.save_checkpoint(self.directory, step, self.model.state_dict(), state, strict_json(meta), rank=self.rank)

    def rewrite_meta(self, step, meta):
        if self.write:
            ckpt.update_meta(self.directory, step, strict_json(meta), rank=self.rank)

    def resume(self, step, run):
        """Restore a saved step into the model, the optimizer (this rank's shard), the RNG and `run`; returns
        the loader state. Call it last before the loop: drawing random numbers after it shifts the RNG."""
        model_state, state, meta = ckpt.load_checkpoint(self.directory, step, self.device, load_optimizer=True,
                                                        rank=self.rank)
        ckpt.restore_training_state(self.model, self.optimizer, model_state, state, self.directory, step, self.rank)
        set_rng_state(state.get("rng"))
        run.restore(meta)
        self.resumed_from = step  # that step is on disk already
        print0(f"resumed from step {meta['step']} of {self.directory}")
        return state["loader"]

# -----------------------------------------------------------------------------
# Evaluations that fit the model

class FittingProblems:
    """The first `max_problems` problems of a task whose prompt fits the context (`max_len` tokens); longer
    ones are skipped and counted in `skipped`. Quacks like the task (len, [i], evaluate) for task_eval."""

    def __init__(self, task, tokenizer, max_len, max_problems=None):
        self.task = task
        n = len(task) if max_problems is None else min(len(task), max_problems)
        self.indices = [i for i in range(n) if len(tokenizer.render_for_completion(task[i])) <= max_len]
        self.skipped = n - len(self.indices)

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        return self.task[self.indices[i]]

    def evaluate(self, conversation, answer):
        return self.task.evaluate(conversation, answer)
