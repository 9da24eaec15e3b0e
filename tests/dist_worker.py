"""
Worker for tests/test_distributed.py: a tiny GPT trained with MuonAdamW, either on one process
(imported by the test) or as one rank of `torchrun --nproc_per_node=2 tests/dist_worker.py OUT_DIR`
on gloo. Each rank trains on its half of the same global batch; the optimizer averages gradients.

The config is chosen to exercise every distributed path of the optimizer: Muon groups whose K is not
divisible by 2 (3 layers -> 3 c_fc, 3 mlp c_proj), AdamW params with numel >= 1024 (sharded: wte,
lm_head, value embeddings) and < 1024 (replicated: the lambdas, the smear gate).
"""

import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from conftest import tiny_gpt  # noqa: E402  (tests/ is this script's own directory)

STEPS, SAVE_AT, B, T, VOCAB = 6, 3, 8, 16, 64


def build_model(seed=0):
    model = tiny_gpt(seed, sequence_len=T, vocab_size=VOCAB, n_layer=3, n_head=2, n_kv_head=1, n_embd=32,
                     window_pattern="SL")
    # The reference init zeroes every c_proj, so at step 0 the lambdas' gradients are pure rounding noise
    # (~1e-10) and AdamW with eps=1e-10 turns noise into +-lr steps whose sign depends on summation
    # order. Small random c_proj weights make every gradient real, so the comparison is meaningful.
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.c_proj.weight.normal_(0, 0.02)
            block.mlp.c_proj.weight.normal_(0, 0.02)
    return model


def build_optimizer(model):
    # large LRs and weight decay so every path moves the weights visibly in a few steps
    return model.setup_optimizers(unembedding_lr=0.05, embedding_lr=0.3, matrix_lr=0.05, weight_decay=0.2)


def global_batch(step):
    g = torch.Generator().manual_seed(1000 + step)
    start = torch.randint(0, VOCAB, (B, 1), generator=g)
    seq = (start + 3 * torch.arange(T + 1)) % VOCAB  # learnable: +3 each position
    return seq[:, :-1], seq[:, 1:]


def train(model, opt, start, stop, rank=0, world=1):
    for step in range(start, stop):
        x, y = global_batch(step)
        rows = slice(rank * B // world, (rank + 1) * B // world)
        # mean loss over equal halves; the optimizer's average of the two grads = the full-batch grad
        model(x[rows], y[rows]).backward()
        for g in opt.param_groups:
            g["lr"] = g["initial_lr"] * (1 - step / (2 * STEPS))
            if g["kind"] == "muon":
                g["momentum"] = 0.85 + 0.02 * step
                g["weight_decay"] = 0.2 * (1 - step / STEPS)
        opt.step()
        opt.zero_grad(set_to_none=True)


def main(out_dir):
    dist.init_process_group(backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = build_model()
    opt = build_optimizer(model)
    train(model, opt, 0, SAVE_AT, rank, world)
    torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, os.path.join(out_dir, f"mid_rank{rank}.pt"))
    train(model, opt, SAVE_AT, STEPS, rank, world)
    torch.save(model.state_dict(), os.path.join(out_dir, f"final_rank{rank}.pt"))
    # resume: a fresh model and optimizer from this rank's checkpoint, then the remaining steps
    ckpt = torch.load(os.path.join(out_dir, f"mid_rank{rank}.pt"), weights_only=True)
    model2 = build_model(seed=123)
    model2.load_state_dict(ckpt["model"])
    opt2 = build_optimizer(model2)
    opt2.load_state_dict(ckpt["optim"])
    train(model2, opt2, SAVE_AT, STEPS, rank, world)
    torch.save(model2.state_dict(), os.path.join(out_dir, f"resumed_rank{rank}.pt"))
    # both ranks finish all communication before either tears gloo down: a rank destroying its process
    # group while its peer is still mid-collective can abort the process at exit
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
