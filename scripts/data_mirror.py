"""
Write an offline data mirror: the directory NANOCHAT_DATA_DIR reads, filled from the Hugging Face Hub and the
other public sources on a machine with network, to copy to an air-gapped node (see README, "Air-gapped nodes").

    python -m scripts.data_mirror DIR                  # 8 pretraining shards + validation, every task set, the
                                                       # CORE bundle, identity conversations, the word list
    python -m scripts.data_mirror DIR --shards 370     # the d20 speedrun's amount of pretraining text
    NANOCHAT_DATA_DIR=DIR bash speedrun.sh             # then, on the node

Layout: pretrain/shard_*.parquet (train shards, then the pinned validation shard, the last file by name),
hub/<repo_id>/<config>/<split>.jsonl (one Hub row per line, in the Hub's order), eval_bundle/ (core.yaml, ...),
identity_conversations.jsonl, words_alpha.txt. Hub rows come from each dataset's Parquet export on the Hub
(<hub>/datasets/<repo_id>/resolve/refs%2Fconvert%2Fparquet/<config>/<split>/0000.parquet, 0001, ...), so any
server with that layout can stand in (--hub-url; default $HF_ENDPOINT or https://huggingface.co). Files already
there are kept, so an interrupted run resumes; every file appears under its name only once complete.
"""

import argparse
import json
import os
import tempfile
import urllib.error

import pyarrow.parquet as pq

from nanochat.common import download_file_with_lock, print0
from nanochat.files import install_error_handler
from nanochat import dataset
from nanochat.core_eval import EVAL_BUNDLE_URL, unzip_bundle
from tasks.customjson import IDENTITY_URL
from tasks.smoltalk import REPO_ID as SMOLTALK_REPO
from tasks.spellingbee import WORDS_URL

# every Hub split a stage or evaluation reads: (repo_id, config, splits); config None is the Hub's "default"
HUB_SPLITS = [
    ("allenai/ai2_arc", "ARC-Easy", ["train", "validation", "test"]),
    ("allenai/ai2_arc", "ARC-Challenge", ["train", "validation", "test"]),
    ("cais/mmlu", "all", ["test", "dev", "validation", "auxiliary_train"]),
    ("openai/gsm8k", "main", ["train", "test"]),
    ("openai/openai_humaneval", "openai_humaneval", ["test"]),
    (SMOLTALK_REPO, None, ["train", "test"]),
]

parser = argparse.ArgumentParser(description="Write an offline data mirror (the NANOCHAT_DATA_DIR layout)")
parser.add_argument("out_dir", help="the mirror directory (created; files already there are kept)")
parser.add_argument("--shards", type=int, default=8, help="pretraining train shards (the validation shard is added)")
parser.add_argument("--workers", type=int, default=4, help="parallel shard downloads")
parser.add_argument("--hub-url", default=os.environ.get("HF_ENDPOINT", "https://huggingface.co"),
                    help="Hugging Face Hub endpoint for the task sets' Parquet exports")
parser.add_argument("--shards-url", default=None, help="pretraining shard base URL (default: nanochat.dataset's)")
parser.add_argument("--bundle-url", default=EVAL_BUNDLE_URL, help="CORE eval bundle zip")
parser.add_argument("--identity-url", default=IDENTITY_URL, help="identity conversations JSONL")
parser.add_argument("--words-url", default=WORDS_URL, help="word list for SpellingBee")
parser.add_argument("--skip", default="", help="comma-separated parts to leave out: pretrain,hub,core,identity,words")


def hub_split_to_jsonl(hub_url, repo_id, config, split, path):
    """Every row of one Hub split, from its Parquet export files in order, as JSONL at `path`. Returns the row count."""
    base = f"{hub_url.rstrip('/')}/datasets/{repo_id}/resolve/refs%2Fconvert%2Fparquet/{config or 'default'}/{split}"
    rows = 0
    try:
        with tempfile.TemporaryDirectory() as tmp, open(path + ".tmp", "w", encoding="utf-8") as out:
            for i in range(10_000):
                part = os.path.join(tmp, f"{i:04d}.parquet")
                try:
                    download_file_with_lock(f"{base}/{i:04d}.parquet", part)
                except urllib.error.HTTPError as e:
                    if e.code == 404 and i > 0:
                        break  # past the last file of the split
                    raise RuntimeError(f"{base}/{i:04d}.parquet: HTTP {e.code}") from e
                for batch in pq.ParquetFile(part).iter_batches(batch_size=4096):
                    for row in batch.to_pylist():
                        out.write(json.dumps(row, ensure_ascii=False) + "\n")
                        rows += 1
                os.remove(part)
    except BaseException:
        os.remove(path + ".tmp")  # no half split under any name
        raise
    os.replace(path + ".tmp", path)
    return rows


def main(args):
    install_error_handler()
    out = os.path.abspath(args.out_dir)
    skip = {s for s in args.skip.split(",") if s}
    unknown = skip - {"pretrain", "hub", "core", "identity", "words"}
    if unknown:
        raise SystemExit(f"--skip: unknown parts {sorted(unknown)}; choose from pretrain,hub,core,identity,words")
    os.makedirs(out, exist_ok=True)
    failed = []
    if "pretrain" not in skip:
        ok, total = dataset.download(args.shards, args.workers, os.path.join(out, "pretrain"), args.shards_url,
                                     progress=False)
        print0(f"pretrain: {ok}/{total} shards")
        failed += [] if ok == total else [f"pretrain ({total - ok} shards)"]
    if "hub" not in skip:
        for repo_id, config, splits in HUB_SPLITS:
            for split in splits:
                path = os.path.join(out, "hub", repo_id, config or "default", f"{split}.jsonl")
                if os.path.exists(path):
                    continue
                os.makedirs(os.path.dirname(path), exist_ok=True)
                try:
                    print0(f"hub: {repo_id} {config or 'default'}/{split}: "
                           f"{hub_split_to_jsonl(args.hub_url, repo_id, config, split, path):,} rows")
                except (OSError, RuntimeError) as e:
                    print0(f"hub: FAILED {repo_id} {config or 'default'}/{split}: {e}")
                    failed.append(f"{repo_id}/{config or 'default'}/{split}")
    fetches = [("core", args.bundle_url, "eval_bundle.zip"), ("identity", args.identity_url, "identity_conversations.jsonl"),
               ("words", args.words_url, "words_alpha.txt")]
    for part, url, name in fetches:
        if part in skip or (part == "core" and os.path.exists(os.path.join(out, "eval_bundle", "core.yaml"))):
            continue
        try:
            download_file_with_lock(url, os.path.join(out, name), postprocess=unzip_bundle if part == "core" else None)
        except OSError as e:
            print0(f"{part}: FAILED {url}: {e}")
            failed.append(part)
    # what the downloads leave beside the mirror's files: the bundle's zip once unzipped, the download locks
    leftovers = [name + ".lock" for _, _, name in fetches]
    if os.path.exists(os.path.join(out, "eval_bundle", "core.yaml")):
        leftovers.append("eval_bundle.zip")
    for name in leftovers:
        if os.path.exists(os.path.join(out, name)):
            os.remove(os.path.join(out, name))
    if failed:
        raise SystemExit(f"data mirror {out}: incomplete, failed: {', '.join(failed)} (rerun to retry; files "
                         f"already there are kept)")
    print0(f"data mirror ready: NANOCHAT_DATA_DIR={out}")


if __name__ == "__main__":
    main(parser.parse_args())
