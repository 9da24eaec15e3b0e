"""
Pretraining data: the FineWeb-Edu shuffled parquet shards (karpathy/fineweb-edu-100b-shuffle), or an offline mirror.

Download shards (the pinned validation shard shard_01822 is always fetched as well):
    python -m nanochat.dataset -n 8            # 8 train shards + val, into $NANOCHAT_BASE_DIR/base_data
    python -m nanochat.dataset -n 370 -w 8     # d20 speedrun amount, 8 parallel downloads

Offline: with NANOCHAT_DATA_DIR set, $NANOCHAT_DATA_DIR/pretrain/*.parquet is used instead and its
last file (by name) is the validation shard. NANOCHAT_DATASET_URL overrides the download base URL.
"""

import os
import time
import argparse
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed

import pyarrow as pa
import pyarrow.parquet as pq

from nanochat.common import get_base_dir, get_data_dir
from nanochat.files import InputFileError, open_regular

BASE_URL = "https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main"
MAX_SHARD = 1822  # shards 0..1822 exist (1,823 in all)
VAL_SHARD = MAX_SHARD  # pinned validation shard: val_bpb stays comparable however many shards are present


def shard_name(index):
    return f"shard_{index:05d}.parquet"


def get_download_dir():
    return os.path.join(get_base_dir(), "base_data")


def list_parquet_files():
    """All local shard paths sorted by name (offline mirror if NANOCHAT_DATA_DIR is set)."""
    data_dir = get_data_dir()
    d = os.path.join(data_dir, "pretrain") if data_dir else get_download_dir()
    if not os.path.isdir(d):
        return []
    # partial downloads end in .tmp, so this pattern never lists them
    return sorted(os.path.join(d, f) for f in os.listdir(d) if f.endswith(".parquet"))


def _missing_data_error(what):
    where = f"{get_data_dir()}/pretrain" if get_data_dir() else get_download_dir()
    return FileNotFoundError(
        f"{what} (looked in {where}). Either download shards with `python -m nanochat.dataset -n 8` "
        f"(it always fetches the validation shard too), or set NANOCHAT_DATA_DIR to an offline mirror "
        f"that has pretrain/*.parquet (e.g. NANOCHAT_DATA_DIR=../shared/data).")


def get_split_files(split):
    """Shard paths of "train" or "val". Offline: val = the last file. FineWeb: val = shard_01822 (pinned)."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    files = list_parquet_files()
    if get_data_dir():
        if len(files) < 2:
            raise _missing_data_error(f"need at least 2 parquet shards (train + val), found {len(files)}")
        return files[-1:] if split == "val" else files[:-1]
    chosen = [f for f in files if (os.path.basename(f) == shard_name(VAL_SHARD)) == (split == "val")]
    if not chosen:
        raise _missing_data_error(f"no {split} shard found" + (f" ({shard_name(VAL_SHARD)})" if split == "val" else ""))
    return chosen


SHARD_FIX = "delete it and download it again (python -m nanochat.dataset), or replace it in the mirror"


def open_shard(path):
    """pq.ParquetFile of a shard that is a regular file with a parquet footer, else InputFileError naming it."""
    open_regular(path, SHARD_FIX).close()  # a FIFO or a device in its place is refused before pyarrow opens it
    try:
        return pq.ParquetFile(path)
    except Exception as e:  # ArrowInvalid (no footer: truncated, zeroed), OSError...
        raise InputFileError(f"{path} is not a readable parquet shard ({type(e).__name__}: {str(e)[:100]}); "
                             f"{SHARD_FIX}") from None


def read_texts(pf, rg, path):
    """The "text" column of row group `rg` of an open shard; a damaged row group raises InputFileError."""
    try:
        column = pf.read_row_group(rg, columns=["text"]).column("text")
    except Exception as e:
        raise InputFileError(f"{path}: row group {rg} cannot be read ({type(e).__name__}: {str(e)[:100]}); "
                             f"{SHARD_FIX}") from None
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)) or column.null_count:
        raise InputFileError(f"{path}: row group {rg}: the 'text' column must hold strings, not {column.type} "
                             f"({column.null_count} nulls); {SHARD_FIX}")
    return column.to_pylist()


def parquets_iter_batched(split, start=0, step=1):
    """Yield the list of texts of each row group start, start+step, ... of every file of the split."""
    for path in get_split_files(split):
        pf = open_shard(path)
        for rg in range(start, pf.num_row_groups, step):
            yield read_texts(pf, rg, path)

# -----------------------------------------------------------------------------
# Downloading

def download_shard(index, out_dir=None, base_url=None, attempts=5, backoff=1.0, timeout=30):
    """Fetch one shard; True on success. A shard gets its final name only by a rename once the whole body arrived
    and parses as parquet, so an existing file is complete and skipped."""
    out_dir = out_dir or get_download_dir()
    base_url = (base_url or os.environ.get("NANOCHAT_DATASET_URL") or BASE_URL).rstrip("/")
    name = shard_name(index)
    path = os.path.join(out_dir, name)
    if os.path.exists(path):
        return True
    os.makedirs(out_dir, exist_ok=True)
    url, tmp = f"{base_url}/{name}", path + ".tmp"
    for attempt in range(1, attempts + 1):
        try:
            with urllib.request.urlopen(url, timeout=timeout) as r, open(tmp, "wb") as f:
                expected = r.headers.get("Content-Length")
                written = 0
                while chunk := r.read(1 << 20):
                    f.write(chunk)
                    written += len(chunk)
            if expected is not None and written != int(expected):
                raise IOError(f"{name}: got {written} of {expected} bytes")
            pq.ParquetFile(tmp).metadata  # a truncated body without Content-Length fails here (no footer)
            os.replace(tmp, path)
            return True
        except Exception as e:  # network errors, HTTP 5xx, truncated bodies: all worth a retry
            if os.path.exists(tmp):
                os.remove(tmp)
            if attempt == attempts:
                print(f"failed to download {name} after {attempts} attempts: {e}", flush=True)
                return False
            wait = backoff * 2 ** attempt
            print(f"{name}: attempt {attempt}/{attempts} failed ({e}); retrying in {wait:.1f}s", flush=True)
            time.sleep(wait)
    return False


def download(num_files=-1, num_workers=4, out_dir=None, base_url=None, backoff=1.0, progress=True):
    """Download train shards 0..num_files-1 (-1: all) plus the pinned val shard. Returns #successes."""
    n = MAX_SHARD if num_files < 0 else min(num_files, MAX_SHARD)
    ids = list(range(n)) + [VAL_SHARD]
    with ThreadPoolExecutor(max_workers=num_workers) as pool:  # downloads are I/O bound: threads suffice
        futures = [pool.submit(download_shard, i, out_dir, base_url, backoff=backoff) for i in ids]
        done = as_completed(futures)
        if progress:
            from tqdm import tqdm
            done = tqdm(done, total=len(futures), desc="shards", unit="shard")
        ok = sum(bool(fut.result()) for fut in done)
    return ok, len(ids)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Download FineWeb-Edu pretraining shards")
    parser.add_argument("-n", "--num-files", type=int, default=-1, help="number of train shards (-1 = all 1822); the val shard is always added")
    parser.add_argument("-w", "--num-workers", type=int, default=4, help="parallel downloads")
    args = parser.parse_args()
    out_dir = get_download_dir()
    print(f"downloading to {out_dir}")
    ok, total = download(args.num_files, args.num_workers, out_dir)
    print(f"done: {ok}/{total} shards in {out_dir}")
    if ok != total:
        raise SystemExit(1)
