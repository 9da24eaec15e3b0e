"""
The schedules of the training stages: the learning-rate multiplier of each step, Muon's momentum and weight
decay, and the one function that writes them into the optimizer's groups. Pure functions of the step; the
scripts pick theirs. Owns nothing else: the step itself is train_step's, the batch size arithmetic too.
"""

import math


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
