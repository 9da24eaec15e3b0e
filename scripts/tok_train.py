"""
Train the BPE tokenizer on the pretraining train split and save it (plus the token_bytes table) to
$NANOCHAT_BASE_DIR/tokenizer.

    python -m scripts.tok_train                                   # speedrun: 2B chars, vocab 32768
    NANOCHAT_DATA_DIR=../shared/data python -m scripts.tok_train --vocab-size=8192 --max-chars=50000000

Single process, CPU only; rustbpe uses every core (set RAYON_NUM_THREADS to limit it).
"""

import os
import time
import argparse

import torch

from nanochat.common import get_base_dir
from nanochat.files import install_error_handler
from nanochat.dataset import parquets_iter_batched
from nanochat.tokenizer import RustBPETokenizer, compute_token_bytes

parser = argparse.ArgumentParser(description="Train a BPE tokenizer")
parser.add_argument("--max-chars", type=int, default=2_000_000_000, help="total characters fed to BPE training")
parser.add_argument("--doc-cap", type=int, default=10_000, help="crop each document to this many characters")
parser.add_argument("--vocab-size", type=int, default=32768, help="final vocab size incl. the 9 special tokens")
args = parser.parse_args()
install_error_handler()
print(f"max_chars: {args.max_chars:,} | doc_cap: {args.doc_cap:,} | vocab_size: {args.vocab_size:,}")

# -----------------------------------------------------------------------------
# Text: train documents, cropped, until the character budget is spent (stop after the doc that crosses it)

num_chars = 0


def text_iterator():
    global num_chars
    for batch in parquets_iter_batched(split="train"):
        for doc in batch:
            doc = doc[:args.doc_cap]
            num_chars += len(doc)
            yield doc
            if num_chars > args.max_chars:
                return

# -----------------------------------------------------------------------------
# Train

t0 = time.time()
tokenizer = RustBPETokenizer.train_from_iterator(text_iterator(), args.vocab_size)
train_time = time.time() - t0
print(f"Trained on {num_chars:,} chars in {train_time:.2f}s ({num_chars / train_time / 1e6:.2f}M chars/s)")

tokenizer_dir = os.path.join(get_base_dir(), "tokenizer")
tokenizer.save(tokenizer_dir)

# Sanity check: a lossless round trip on text with unusual characters
test_text = """Hello world! This is a test.
Numbers: 123, 4567, 89.01, 1e-5
Contractions: I'm, you're, it's, we'll, they've
Special chars: @#$%^&*()_+-=[]{}|;:'",.<>?/\\`~
Unicode: 你好世界 🌍 안녕하세요 Привет мир ñandú
Literal special: <|bos|> <|assistant_end|>"""
assert tokenizer.decode(tokenizer.encode(test_text)) == test_text, "round trip failed"
assert tokenizer.encode("<|bos|>") != [tokenizer.get_bos_token_id()]

# token_bytes: raw byte length per token id (0 for specials), to turn nats into bits per byte
token_bytes = compute_token_bytes(tokenizer)
token_bytes_path = os.path.join(tokenizer_dir, "token_bytes.pt")
with open(token_bytes_path, "wb") as f:
    torch.save(token_bytes, f)
print(f"Saved token_bytes to {token_bytes_path}")

nonzero = token_bytes[token_bytes > 0].float()
stats = {
    "train_time": train_time,
    "chars": num_chars,
    "chars_per_sec": num_chars / train_time,
    "num_special_tokens": len(tokenizer.get_special_tokens()),
    "token_bytes_min": int(nonzero.min().item()),
    "token_bytes_max": int(nonzero.max().item()),
    "token_bytes_mean": nonzero.mean().item(),
    "token_bytes_std": nonzero.std().item(),
}
print(" | ".join(f"{k}: {v:.4g}" if isinstance(v, float) else f"{k}: {v}" for k, v in stats.items()))

try:
    from nanochat.report import get_report
except ImportError:
    get_report = None
if get_report is not None:
    get_report().log(section="Tokenizer training", data=[vars(args), stats])
