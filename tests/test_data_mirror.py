"""scripts/data_mirror.py against a local HTTP server standing in for the Hub (Parquet exports), the shard host,
the CORE bundle, the identity conversations and the word list: the mirror it writes is what NANOCHAT_DATA_DIR
readers load, row for row the served data; a missing split fails with its name and the rest is kept."""

import io
import json
import os
import threading
import zipfile
from http.server import ThreadingHTTPServer, BaseHTTPRequestHandler

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import build_data_dir, run_module
from nanochat import dataset


def read_rows(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def parquet_bytes(rows):
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    return buf.getvalue()


class Server:
    """Serves a dict {raw request path: bytes}; anything else is a 404. Records the paths asked for."""

    def __init__(self, files):
        self.files, self.requests = files, []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                server.requests.append(self.path)
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """The upstream data (the test workspace's rows) and a server publishing it the way the sources do."""
    from scripts.data_mirror import HUB_SPLITS
    ref = build_data_dir(str(tmp_path_factory.mktemp("upstream")))
    files, hub_rows = {}, {}
    for repo_id, config, splits in HUB_SPLITS:
        for split in splits:
            if repo_id == "HuggingFaceTB/smol-smoltalk":
                rows = read_rows(os.path.join(ref, "chat", f"{split}.jsonl"))
            else:
                rows = read_rows(os.path.join(ref, "hub", repo_id, config, f"{split}.jsonl"))
            hub_rows[(repo_id, config or "default", split)] = rows
            base = f"/hub/datasets/{repo_id}/resolve/refs%2Fconvert%2Fparquet/{config or 'default'}/{split}"
            half = len(rows) // 2  # two export files: their order must be kept
            files[f"{base}/0000.parquet"] = parquet_bytes(rows[:half])
            files[f"{base}/0001.parquet"] = parquet_bytes(rows[half:])
    shards = {}
    for i in (0, 1, dataset.VAL_SHARD):
        shards[i] = [f"shard {i} document {k}" for k in range(3)]
        buf = io.BytesIO()
        pq.write_table(pa.table({"text": shards[i]}), buf)
        files[f"/shards/{dataset.shard_name(i)}"] = buf.getvalue()
    bundle = io.BytesIO()
    with zipfile.ZipFile(bundle, "w") as zf:  # the real zip has one top-level eval_bundle/ directory
        for root, _, names in os.walk(os.path.join(ref, "eval_bundle")):
            for name in names:
                full = os.path.join(root, name)
                zf.write(full, os.path.join("eval_bundle", os.path.relpath(full, os.path.join(ref, "eval_bundle"))))
    files["/eval_bundle.zip"] = bundle.getvalue()
    files["/identity.jsonl"] = open(os.path.join(ref, "identity_conversations.jsonl"), "rb").read()
    files["/words.txt"] = open(os.path.join(ref, "words_alpha.txt"), "rb").read()
    server = Server(files)
    yield server, ref, hub_rows, shards
    server.close()


def mirror_args(server, out, *extra):
    return [out, "--shards=2", "--workers=2", f"--hub-url={server.url}/hub", f"--shards-url={server.url}/shards",
            f"--bundle-url={server.url}/eval_bundle.zip", f"--identity-url={server.url}/identity.jsonl",
            f"--words-url={server.url}/words.txt", *extra]


def test_mirror_is_what_the_readers_load(source, tmp_path, monkeypatch):
    server, ref, hub_rows, shards = source
    out = str(tmp_path / "mirror")
    proc = run_module("scripts.data_mirror", mirror_args(server, out), str(tmp_path / "base"), str(tmp_path))
    assert f"data mirror ready: NANOCHAT_DATA_DIR={out}" in proc.stdout
    for (repo_id, config, split), rows in hub_rows.items():
        assert read_rows(os.path.join(out, "hub", repo_id, config, f"{split}.jsonl")) == rows, (repo_id, split)
    assert sorted(os.listdir(out)) == ["eval_bundle", "hub", "identity_conversations.jsonl", "pretrain", "words_alpha.txt"]
    # the readers, pointed at the mirror
    monkeypatch.setenv("NANOCHAT_DATA_DIR", out)
    from tasks.arc import ARC
    from tasks.gsm8k import GSM8K
    from tasks.mmlu import MMLU
    from tasks.smoltalk import SmolTalk
    from tasks.customjson import CustomJSON, identity_conversations_path
    from tasks.spellingbee import load_words
    from nanochat.core_eval import get_bundle_dir, load_bundle
    assert len(ARC("ARC-Easy", "train")) == len(hub_rows[("allenai/ai2_arc", "ARC-Easy", "train")])
    assert len(MMLU("all", "auxiliary_train")) == len(hub_rows[("cais/mmlu", "all", "auxiliary_train")])
    assert len(GSM8K("main", "test")) == len(hub_rows[("openai/gsm8k", "main", "test")])
    smol = SmolTalk("train")  # the Hub copy, not the chat/ stand-in (the mirror has none)
    assert [smol[i]["messages"] for i in range(len(smol))] == \
        [hub_rows[("HuggingFaceTB/smol-smoltalk", "default", "train")][j]["messages"] for j in smol.order]
    assert len(CustomJSON(identity_conversations_path())) == 10
    assert set(load_words()) == set(open(os.path.join(ref, "words_alpha.txt")).read().split())
    assert [label for label, *_ in load_bundle(get_bundle_dir())] == ["toy_mc", "toy_lm"]
    val, train = dataset.get_split_files("val"), dataset.get_split_files("train")
    assert [os.path.basename(p) for p in val] == [dataset.shard_name(dataset.VAL_SHARD)] and len(train) == 2
    assert [t for batch in dataset.parquets_iter_batched("val") for t in batch] == shards[dataset.VAL_SHARD]
    # a second run has nothing left to fetch
    before = len(server.requests)
    run_module("scripts.data_mirror", mirror_args(server, out), str(tmp_path / "base"), str(tmp_path))
    assert server.requests[before:] == []


def test_a_missing_split_fails_by_name_and_keeps_the_rest(source, tmp_path):
    server, _, hub_rows, _ = source
    gone = "/hub/datasets/openai/gsm8k/resolve/refs%2Fconvert%2Fparquet/main/test/0000.parquet"
    saved = server.files.pop(gone)
    try:
        out = str(tmp_path / "mirror")
        proc = run_module("scripts.data_mirror", mirror_args(server, out, "--skip=pretrain,core,words"),
                          str(tmp_path / "base"), str(tmp_path), check=False)
    finally:
        server.files[gone] = saved
    assert proc.returncode == 1
    assert "incomplete, failed: openai/gsm8k/main/test" in proc.stdout and "HTTP 404" in proc.stdout
    assert not os.path.exists(os.path.join(out, "hub", "openai", "gsm8k", "main", "test.jsonl"))
    assert not os.path.exists(os.path.join(out, "hub", "openai", "gsm8k", "main", "test.jsonl.tmp"))
    assert read_rows(os.path.join(out, "hub", "openai", "gsm8k", "main", "train.jsonl")) == \
        hub_rows[("openai/gsm8k", "main", "train")]
    assert not os.path.exists(os.path.join(out, "pretrain"))  # skipped


def test_bad_skip_is_one_clear_error(tmp_path):
    proc = run_module("scripts.data_mirror", [str(tmp_path / "m"), "--skip=hub,bogus"], str(tmp_path / "base"),
                      str(tmp_path), check=False)
    assert proc.returncode == 1 and "--skip: unknown parts ['bogus']" in proc.stdout
    assert "Traceback" not in proc.stdout
