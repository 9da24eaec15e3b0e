"""
Bits per byte: the model's loss normalised by the raw UTF-8 bytes of the target
tokens, so it compares across tokenizers and vocab sizes. Special tokens (0 bytes) and ignored
targets (< 0) count neither nats nor bytes.
"""

import math

import torch
import torch.distributed as dist


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
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(total_nats, op=dist.ReduceOp.SUM)
        dist.all_reduce(total_bytes, op=dist.ReduceOp.SUM)
    total_nats, total_bytes = total_nats.item(), total_bytes.item()
    if total_bytes == 0:
        return float("inf")
    return total_nats / (math.log(2) * total_bytes)
