"""
Data pipeline throughput: tokenizer training chars/s (only when it has to train one), encoding
tokens/s, and PretrainLoader tokens/s (background tokenization + best-fit packing) on real shards.

    NANOCHAT_DATA_DIR=../shared/data python -m scripts.bench_data
    NANOCHAT_DATA_DIR=../shared/data python -m scripts.bench_data --device-batch-size=32 --seq-len=2048 --num-batches=40

Uses the tokenizer in $NANOCHAT_BASE_DIR/tokenizer; if there is none, trains a small one
(--vocab-size on --train-chars characters) into a temporary directory and times that too.
"""

import os
import time
import argparse
import tempfile

import torch

from nanochat.common import get_base_dir, autodetect_device_type, synchronize
from nanochat.files import install_error_handler
from nanochat.dataset import parquets_iter_batched
from nanochat.dataloader import PretrainLoader
from nanochat.tokenizer import RustBPETokenizer, get_tokenizer, get_tokenizer_dir

parser = argparse.ArgumentParser(description="Benchmark tokenizer training, encoding and the pretraining loader")
parser.add_argument("--vocab-size", type=int, default=8192, help="vocab of the tokenizer trained when none exists")
parser.add_argument("--train-chars", type=int, default=10_000_000, help="characters to train that tokenizer on")
parser.add_argument("--encode-row-groups", type=int, default=4, help="train row groups to time encoding on")
parser.add_argument("--device-batch-size", type=int, default=32, help="loader B")
parser.add_argument("--seq-len", type=int, default=2048, help="loader T")
parser.add_argument("--num-batches", type=int, default=100, help="timed loader batches (after one warm-up batch)")
parser.add_argument("--device-type", type=str, default="", help="cuda|cpu|mps (empty = autodetect)")
args = parser.parse_args()
install_error_handler()

device_type = args.device_type or autodetect_device_type()
device = torch.device(device_type)
print(f"base dir: {get_base_dir()} | data dir: {os.environ.get('NANOCHAT_DATA_DIR') or '(downloaded shards)'} | "
      f"device: {device_type} | cpus: {os.cpu_count()}")

# -----------------------------------------------------------------------------
# Tokenizer: the trained one, else train a small one and time it

try:
    tokenizer = get_tokenizer()
    print(f"tokenizer: {get_tokenizer_dir()} (vocab {tokenizer.get_vocab_size():,})")
except FileNotFoundError:
    num_chars = 0

    def text_iterator():
        global num_chars
        for texts in parquets_iter_batched("train"):
            for t in texts:
                t = t[:10_000]
                num_chars += len(t)
                yield t
                if num_chars >= args.train_chars:
                    return

    t0 = time.perf_counter()
    tokenizer = RustBPETokenizer.train_from_iterator(text_iterator(), args.vocab_size)
    dt = time.perf_counter() - t0
    tokenizer.save(os.path.join(tempfile.mkdtemp(prefix="bench_tok_"), "tokenizer"))
    print(f"tokenizer train: vocab {args.vocab_size:,} on {num_chars:,} chars in {dt:.2f}s "
          f"= {num_chars / dt / 1e6:.2f}M chars/s")

# -----------------------------------------------------------------------------
# Encoding: batch encode whole row groups with BOS prepended, as the loader does

texts = [t for i, rg in zip(range(args.encode_row_groups), parquets_iter_batched("train")) for t in rg]
bos = tokenizer.get_bos_token_id()
tokenizer.encode(texts[:64], prepend=bos)  # warm-up
t0 = time.perf_counter()
ids = tokenizer.encode(texts, prepend=bos)
dt = time.perf_counter() - t0
num_tokens = sum(len(x) for x in ids)
num_chars = sum(len(t) for t in texts)
print(f"encode: {len(texts):,} docs, {num_tokens:,} tokens in {dt:.3f}s = {num_tokens / dt / 1e6:.2f}M tokens/s "
      f"({num_chars / num_tokens:.2f} chars/token)")

# -----------------------------------------------------------------------------
# Loader: steady-state tokens/s of (B, T) batches delivered to the device

B, T = args.device_batch_size, args.seq_len
t0 = time.perf_counter()
loader = PretrainLoader(tokenizer, B, T, "train", device=device_type, rank=0, world_size=1)
next(loader)
synchronize(device)
print(f"loader: first batch after {time.perf_counter() - t0:.2f}s (start-up + filling the 1000-doc buffer)")
t0, c0 = time.perf_counter(), time.thread_time()
for _ in range(args.num_batches):
    x, y = next(loader)
synchronize(device)
dt, cpu = time.perf_counter() - t0, time.thread_time() - c0
print(f"loader: {args.num_batches} batches of {B}x{T} in {dt:.2f}s = {args.num_batches * B * T / dt / 1e6:.2f}M tokens/s "
      f"({dt / args.num_batches * 1e3:.1f} ms/batch) | crop fraction {loader.crop_fraction:.3f} | epoch {loader.epoch}")
# the training thread only packs and copies; tokenization runs on the producer thread
print(f"loader: training-thread CPU {cpu / args.num_batches * 1e3:.1f} ms/batch "
      f"(packing alone could deliver {args.num_batches * B * T / max(cpu, 1e-9) / 1e6:.1f}M tokens/s)")
loader.close()
