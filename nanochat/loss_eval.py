"""
The losses computed outside the model's own mean cross-entropy:
- bits per byte, the evaluation loss: the model's loss normalised by the raw UTF-8 bytes of the target tokens,
  so it compares across tokenizers and vocab sizes. Special tokens (0 bytes) and ignored targets (< 0) count
  neither nats nor bytes;
- the chat stages' supervised loss: every supervised token of a step weighs the same, optionally weighted by
  the model's own probability of it (DFT).
The RL stage's policy-gradient loss stays in scripts/chat_rl.py, the one place it is used.
"""

import math

import torch

from nanochat.common import all_reduce_sum


@torch.no_grad()
def evaluate_bpb(model, batches, steps, token_bytes):
    """
    model(x, y, loss_reduction='none') -> per-token NLL in nats; batches yields (x, y) int64 (B, T);
    token_bytes: (V,) int tensor on the model's device. Sums over `steps` batches and over all ranks.
    Returns bits per byte (inf if no target had any bytes).
    """
    device = token_bytes.device
    total_nats = torch.zeros((), dtype=torch.float32, device=device)
    total_bytes = torch.zeros((), dtype=torch.int64, device=device)
    batch_iter = iter(batches)
    for _ in range(steps):
        x, y = next(batch_iter)
        nll = model(x, y, loss_reduction="none").reshape(-1).float()  # (B*T,)
        y = y.reshape(-1)
        valid = y >= 0
        # never index with a negative id: ignored targets are looked up as id 0 and then zeroed
        num_bytes = torch.where(valid, token_bytes[torch.where(valid, y, torch.zeros_like(y))],
                                torch.zeros_like(y, dtype=token_bytes.dtype)).to(torch.int64)  # (B*T,)
        counted = num_bytes > 0
        total_nats += torch.where(counted, nll, torch.zeros_like(nll)).sum()
        total_bytes += num_bytes.sum()
    all_reduce_sum(total_nats)
    all_reduce_sum(total_bytes)
    total_nats, total_bytes = total_nats.item(), total_bytes.item()
    if total_bytes == 0:
        return float("inf")
    return total_nats / (math.log(2) * total_bytes)


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
