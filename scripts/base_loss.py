"""
Bits per byte of a base checkpoint on train and val text, plus greedy and unconditional samples

    python -m scripts.base_loss --device-batch-size=1 --split-tokens=16384
    torchrun --standalone --nproc_per_node=8 -m scripts.base_loss
"""

import argparse

import torch

from nanochat.common import compute_init, compute_cleanup, print0, resolve_precision
from nanochat.common import init_script
from nanochat.model_loader import load_model
from nanochat.engine import Engine
from nanochat.batch_engine import generate_many
from nanochat.dataloader import PretrainLoader
from nanochat.tokenizer import get_token_bytes
from nanochat.loss_eval import evaluate_bpb
from nanochat.report import get_report

parser = argparse.ArgumentParser(description="Train/val bpb and samples of a base model")
parser.add_argument("--device-batch-size", type=int, default=32, help="sequences per forward pass")
parser.add_argument("--split-tokens", type=int, default=40 * 524288, help="tokens evaluated per split")
parser.add_argument("--model-tag", type=str, default=None, help="base_checkpoints/<tag> (default: largest d<N>)")
parser.add_argument("--model-step", type=int, default=None, help="checkpoint step (default: last)")
parser.add_argument("--device-type", type=str, default="", help="cuda|cpu|mps (empty = autodetect)")
parser.add_argument("--num-samples", type=int, default=8, help="unconditional samples to print")
args = parser.parse_args()
init_script()

is_dist, rank, local_rank, world_size, device = compute_init(args.device_type)
dtype, _, _ = resolve_precision(device.type, training=False)
model, tokenizer, meta = load_model("base", device, phase="eval", model_tag=args.model_tag, step=args.model_step,
                                    dtype=dtype)
T = model.config.sequence_len
tokens_per_step = args.device_batch_size * T * world_size
if args.split_tokens % tokens_per_step != 0:
    raise SystemExit(f"--split-tokens={args.split_tokens} must be a multiple of device_batch_size*seq_len*world_size "
                     f"= {tokens_per_step}")
steps = args.split_tokens // tokens_per_step
token_bytes = get_token_bytes(device)

bpb = {}
for split in ("train", "val"):
    loader = PretrainLoader(tokenizer, args.device_batch_size, T, split, device=device)
    with torch.no_grad():
        bpb[split] = evaluate_bpb(model, loader, steps, token_bytes)
    loader.close()
    print0(f"{split} bpb: {bpb[split]:.4f}")

samples = []
if rank == 0:
    bos = tokenizer.get_bos_token_id()
    prompts = ["The capital of France is", "The chemical symbol of gold is",
               "If yesterday was Friday, then tomorrow will be", "The opposite of hot is",
               "The planets of the solar system are:", "My favorite color is", "If 5*x + 3 = 13, then x is"]
    engine = Engine(model, tokenizer)
    # greedy continuations, then unconditional samples (each ends at the model's next <|bos|>, a new document)
    prompt_ids = [tokenizer.encode(prompt, prepend=bos) for prompt in prompts]
    greedy = generate_many(engine, prompt_ids, seeds=[0] * len(prompts), max_tokens=16, temperature=0.0)
    for tokens, out in zip(prompt_ids, greedy):
        samples.append(tokenizer.decode(tokens[1:] + out))
        print0(repr(samples[-1]))
    unconditional = generate_many(engine, [[bos]] * args.num_samples, seeds=list(range(args.num_samples)),
                                  max_tokens=128, temperature=1.0)
    for i, out in enumerate(unconditional):
        samples.append(tokenizer.decode(out))
        print0(f"unconditional {i}: {samples[-1]!r}")

get_report().log("Base model loss", [
    {"Model": f"base step {meta['step']}", "train bpb": bpb["train"], "val bpb": bpb["val"]},
    "Samples:\n\n" + "\n".join(f"- {s!r}" for s in samples),
])
compute_cleanup()
