"""
Bookkeeping shared by the training scripts (base_train, mid_train, chat_sft, chat_rl):
LR/momentum schedules, the NaN guard, RNG state capture, MFU, the per-step log line,
and the save/resume glue around checkpoint_manager. The scripts keep their own data, loss
and loop; everything here is what would otherwise be copied between them.
"""

import math
import os
import random
import time

import torch
import torch.distributed as dist

from nanochat.common import (print0, format_eta, get_datasheet_peak_flops, measure_matmul_peak,
                             synchronize)

# -----------------------------------------------------------------------------
# Schedules

def lr_multiplier_base(it, num_iterations, warmup_iters, warmdown_iters, final_lr_frac):
    """REFERENCE 7.4: linear warm-up, flat, linear warm-down to final_lr_frac."""
    if it < warmup_iters:
        return (it + 1) / warmup_iters
    if it <= num_iterations - warmdown_iters:
        return 1.0
    progress = (num_iterations - it) / max(warmdown_iters, 1)
    return progress + (1 - progress) * final_lr_frac


def muon_momentum_base(it, num_iterations, warmdown_iters):
    """
    REFERENCE 6.8 (NEW): 0.85 -> 0.97 over the first 400 steps, flat 0.97, then 0.97 -> 0.90 during the
    LR warm-down. Where the two overlap (runs shorter than ~400 + warm-down steps) the warm-up wins, as in
    the NEW source, so short runs keep the reference's momentum trace.
    """
    warmdown_start = num_iterations - warmdown_iters
    if it < 400:
        return 0.85 + (0.97 - 0.85) * it / 400
    if warmdown_iters > 0 and it >= warmdown_start:
        p = (it - warmdown_start) / warmdown_iters
        return 0.97 + (0.90 - 0.97) * p
    return 0.97


def muon_momentum_mid(it):
    """REFERENCE 6.8 (MID, used by mid_train): 0.85 -> 0.95 over the first 300 steps."""
    return 0.85 + (0.95 - 0.85) * min(it / 300, 1.0)


def muon_weight_decay_cosine(it, num_iterations, wd):
    """REFERENCE 7.4 (NEW): cosine decay of the Muon weight decay to 0 over the run."""
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

# -----------------------------------------------------------------------------
# Guards and reproducibility

class NonFiniteLossError(RuntimeError):
    pass


def check_finite(loss_value, step, device, model=None):
    """
    Stop the run on a NaN/inf loss (or gradient, when `model` is given) before the optimizer
    applies it, so no poisoned state can reach a checkpoint (D7). All ranks stop together.
    """
    bad = not math.isfinite(loss_value)
    if not bad and model is not None:
        norms = [p.grad.detach().float().norm() for p in model.parameters() if p.grad is not None]
        bad = bool(norms) and not math.isfinite(torch.stack(norms).norm().item())
    bad = any_rank(bad, device)
    if bad:
        raise NonFiniteLossError(
            f"non-finite loss or gradient at step {step} (loss={loss_value}); stopping without saving this state. "
            f"The last good checkpoint is untouched: lower the learning rate or check the data, then resume "
            f"with --resume-from-step=<last saved step>.")


def check_finite_params(model, step, device):
    """
    Before a save: refuse to checkpoint non-finite weights. The loss/gradient guard runs before each
    update, but an update itself can overflow (a huge LR), and the loop saves step S before computing
    step S's loss, so without this the poisoned weights of step S would reach disk.
    """
    norms = [p.detach().float().norm() for p in model.parameters()]
    bad = any_rank(bool(norms) and not math.isfinite(torch.stack(norms).norm().item()), device)
    if bad:
        raise NonFiniteLossError(
            f"non-finite weights at step {step} (the update of step {step - 1} overflowed); not saving step {step}. "
            f"The last good checkpoint is untouched: lower the learning rate, then resume with "
            f"--resume-from-step=<last saved step>.")


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
# Throughput

def get_peak_flops(device, dtype):
    """
    Denominator for MFU: $NANOCHAT_PEAK_FLOPS if set, else the datasheet bf16 peak on known GPUs, otherwise
    the matmul peak measured right now in the compute dtype (CPUs and unknown GPUs have no useful datasheet).
    """
    if os.environ.get("NANOCHAT_PEAK_FLOPS"):  # pin the denominator (comparable MFU across runs; no 1 s probe)
        peak = float(os.environ["NANOCHAT_PEAK_FLOPS"])
        print0(f"peak FLOP/s from NANOCHAT_PEAK_FLOPS: {peak:e} (used for MFU)")
        return peak
    peak = get_datasheet_peak_flops(device)
    if math.isinf(peak):
        peak = measure_matmul_peak(device, dtype)
        print0(f"measured matmul peak ({str(dtype).replace('torch.', '')}): {peak / 1e9:.1f} GFLOP/s (used for MFU)")
    else:
        print0(f"datasheet peak: {peak / 1e12:.0f} TFLOP/s (used for MFU)")
    return peak


class StepTimer:
    """Per-step wall clock; steps <= `skip` (compilation warm-up) do not count towards the mean."""

    def __init__(self, device, skip=10, total_time=0.0, timed_steps=0):
        self.device, self.skip = device, skip
        self.total_time, self.timed_steps = total_time, timed_steps

    def start(self):
        synchronize(self.device)
        self.t0 = time.perf_counter()

    def stop(self, step):
        synchronize(self.device)
        dt = time.perf_counter() - self.t0
        if step > self.skip:
            self.total_time += dt
            self.timed_steps += 1
        return dt

    def eta(self, steps_left):
        if self.timed_steps == 0:
            return "?"
        return format_eta(self.total_time / self.timed_steps * steps_left)


def format_step(step, total, loss, lrm, dt, tokens_per_step, flops_per_token, peak_flops, world_size,
                timer, extra=""):
    """One compact log line: step/total, loss, lr multiplier, dt, tok/s, MFU, ETA."""
    tok_per_sec = tokens_per_step / dt
    mfu = 100 * flops_per_token * tokens_per_step / dt / (peak_flops * world_size)
    pct = 100 * step / max(total, 1)
    line = (f"step {step:05d}/{total:05d} ({pct:5.1f}%) | loss {loss:.6f} | lrm {lrm:.3f} | dt {dt * 1000:.0f}ms | "
            f"tok/s {tok_per_sec:,.0f} | mfu {mfu:.1f}% | eta {timer.eta(total - step)}")
    return line + (f" | {extra}" if extra else ""), tok_per_sec, mfu

# -----------------------------------------------------------------------------
# Distributed helpers

def all_reduce_mean(value, device):
    """Mean of a python float over ranks (identity on one process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.item() / dist.get_world_size()


def all_reduce_sum(tensor):
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def any_rank(flag, device):
    """True if `flag` is True on any rank (e.g. 'this rank ran out of data')."""
    if not (dist.is_available() and dist.is_initialized()):
        return bool(flag)
    t = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())

# -----------------------------------------------------------------------------
# Losses of the chat stages

def supervised_loss(model, x, y, num_tokens_step, world_size, dft_alpha=0.0):
    """
    Loss of one micro-batch such that summing backward() over the step's micro-batches (and
    averaging gradients over ranks, as the optimizer does) gives the gradient of
        sum over all supervised tokens of the step of w_t * CE_t, divided by their number (D8)
    with w_t = alpha * sg(p_t) + (1 - alpha), p_t = the model's probability of the target (DFT,
    REFERENCE 7.9; alpha 0 is plain cross-entropy). A micro-batch with no supervised token adds 0.
    Returns (loss tensor, sum of p_t over this micro-batch's supervised tokens).
    """
    nll = model(x, y, loss_reduction="none").view(-1)  # (B*T,), 0 where y == -1
    valid = (y.view(-1) >= 0)
    nll = nll * valid  # keep ignored positions out even if a model returned something there
    p = torch.exp(-nll.detach()) * valid
    if dft_alpha != 0.0:
        weights = dft_alpha * p + (1.0 - dft_alpha)
        weighted = (weights * nll).sum()
    else:
        weighted = nll.sum()
    # ranks' gradients are averaged by the optimizer, so scale by world_size to get a plain sum
    loss = weighted * world_size / max(num_tokens_step, 1)
    return loss, p.sum().item()

# -----------------------------------------------------------------------------
# Checkpoints of a training run: what every training script saves and restores

def scale_lrs(optimizer, frac):
    """Multiply every group's LR by `frac`, and make that the new initial_lr schedules start from."""
    for group in optimizer.param_groups:
        group["lr"] = group["lr"] * frac
        group["initial_lr"] = group["lr"]


def save_training_checkpoint(checkpoint_dir, step, model, optimizer, loader, meta, rank, device):
    """
    Save model + this rank's optimizer shard + loader position + RNG (exact resume, D5), refusing to
    write non-finite weights (D7). Every rank must call it (save_checkpoint has a barrier).
    """
    from nanochat import checkpoint_manager as ckpt
    check_finite_params(model, step, device)
    state = {"optimizer": optimizer.state_dict(), "loader": loader.state_dict(), "rng": get_rng_state()}
    ckpt.save_checkpoint(checkpoint_dir, step, model.state_dict(), state, meta, rank=rank)


def resume_training(checkpoint_dir, step, model, optimizer, device, rank):
    """
    Restore a saved step into `model` and `optimizer` (this rank's shard) and restore the RNG.
    Returns (loader_state, meta). Call it last before the loop: anything drawing random numbers
    afterwards (e.g. measuring the matmul peak) would shift the restored RNG.
    """
    from nanochat import checkpoint_manager as ckpt
    model_state, state, meta = ckpt.load_checkpoint(checkpoint_dir, step, device, load_optimizer=True, rank=rank)
    ckpt.restore_training_state(model, optimizer, model_state, state, checkpoint_dir, step, rank)
    set_rng_state(state.get("rng"))
    print0(f"resumed from step {meta['step']} of {checkpoint_dir}")
    return state["loader"], meta
