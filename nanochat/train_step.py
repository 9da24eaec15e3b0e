"""
One optimizer step of any training stage: the batches it reads (one ahead of the device), the gradient
accumulation over micro-batches, the step's one host sync with its NaN/inf guard, and the stop that guard
triggers. Also the switch out of training mode for an evaluation. Owns no schedule (schedules), no loss
(the model's, loss_eval's or the script's own), no checkpoint (resume).
"""

import contextlib
import math

import torch
import torch.distributed as dist

from nanochat.common import print0, compute_cleanup, is_distributed, all_reduce_sum, any_rank


def grad_accum_steps(total_batch_size, device_batch_size, seq_len, world_size):
    """Micro-steps per optimizer step so that each step sees exactly total_batch_size tokens."""
    world_tokens = device_batch_size * seq_len * world_size
    if total_batch_size % world_tokens != 0:
        raise SystemExit(f"--total-batch-size={total_batch_size} must be a multiple of device_batch_size*max_seq_len*"
                         f"world_size = {device_batch_size}*{seq_len}*{world_size} = {world_tokens}; "
                         f"try --total-batch-size={max(1, total_batch_size // world_tokens) * world_tokens}")
    return total_batch_size // world_tokens


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
    loss_value = loss_sum / (dist.get_world_size() if is_distributed() else 1)
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
