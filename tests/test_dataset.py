"""Tests for nanochat.dataset: downloads against a local HTTP server, skip/retry/truncation, splits."""

import io
import os
import sys
import threading
import subprocess
from http.server import ThreadingHTTPServer, BaseHTTPRequestHandler

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanochat import dataset


def parquet_bytes(texts, row_group_size=2):
    buf = io.BytesIO()
    pq.write_table(pa.table({"text": texts}), buf, row_group_size=row_group_size)
    return buf.getvalue()


def write_parquet(path, texts, row_group_size=2):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(parquet_bytes(texts, row_group_size))


class ShardServer:
    """Serves shard bytes by name; `fail[name]` = how many HTTP 500s come first, `truncate[name]` = how
    many responses send half the body (with the full Content-Length) and then drop the connection."""

    def __init__(self, files):
        self.files, self.fail, self.truncate, self.requests = files, {}, {}, []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                name = self.path.rsplit("/", 1)[-1]
                server.requests.append(name)
                if name not in server.files:
                    self.send_error(404)
                    return
                if server.fail.get(name, 0) > 0:
                    server.fail[name] -= 1
                    self.send_error(500)
                    return
                body = server.files[name]
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if server.truncate.get(name, 0) > 0:
                    server.truncate[name] -= 1
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def shards():
    names = [dataset.shard_name(i) for i in (0, 1, dataset.VAL_SHARD)]
    return {n: parquet_bytes([f"{n} doc {k} " * 20 for k in range(5)]) for n in names}


def test_download_retries_after_server_errors_and_truncation(tmp_path, shards):
    with ShardServer(shards) as srv:
        srv.fail[dataset.shard_name(0)] = 2  # two HTTP 500s, then success
        srv.truncate[dataset.shard_name(1)] = 1  # connection drops mid-body once, then success
        ok, total = dataset.download(2, num_workers=2, out_dir=str(tmp_path), base_url=srv.url, backoff=0, progress=False)
    assert (ok, total) == (3, 3)
    assert sorted(os.listdir(tmp_path)) == sorted(shards)  # val shard fetched too; no .tmp left behind
    for name, body in shards.items():
        assert (tmp_path / name).read_bytes() == body
    assert srv.requests.count(dataset.shard_name(0)) == 3
    assert srv.requests.count(dataset.shard_name(1)) == 2


def test_interrupted_download_leaves_no_corrupt_shard(tmp_path, shards):
    name = dataset.shard_name(0)
    with ShardServer(shards) as srv:
        srv.truncate[name] = 10  # every attempt is cut short
        assert not dataset.download_shard(0, str(tmp_path), srv.url, attempts=3, backoff=0)
        assert os.listdir(tmp_path) == []  # neither the final name nor a partial .tmp
        srv.truncate[name] = 0
        assert dataset.download_shard(0, str(tmp_path), srv.url, attempts=3, backoff=0)
    assert (tmp_path / name).read_bytes() == shards[name]
    assert pq.ParquetFile(tmp_path / name).metadata.num_rows == 5


def test_truncated_shard_served_whole_is_rejected(tmp_path, shards):
    # the HTTP transfer is complete but the file itself is cut short (no parquet footer): never kept
    name = dataset.shard_name(0)
    shards[name] = shards[name][:-100]
    with ShardServer(shards) as srv:
        assert not dataset.download_shard(0, str(tmp_path), srv.url, attempts=2, backoff=0)
    assert os.listdir(tmp_path) == []


def test_complete_files_are_skipped(tmp_path, shards):
    name = dataset.shard_name(0)
    (tmp_path / name).write_bytes(b"already here")
    with ShardServer(shards) as srv:
        assert dataset.download_shard(0, str(tmp_path), srv.url, backoff=0)
    assert srv.requests == []
    assert (tmp_path / name).read_bytes() == b"already here"


def test_cli_downloads_train_shards_plus_pinned_val(tmp_path, shards):
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(tmp_path), OMP_NUM_THREADS="1")
    env.pop("NANOCHAT_DATA_DIR", None)
    with ShardServer(shards) as srv:
        env["NANOCHAT_DATASET_URL"] = srv.url
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        r = subprocess.run([sys.executable, "-m", "nanochat.dataset", "-n", "1", "-w", "2"], cwd=root, env=env,
                           capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert sorted(os.listdir(tmp_path / "base_data")) == [dataset.shard_name(0), dataset.shard_name(dataset.VAL_SHARD)]


def test_fineweb_split_pins_val_shard(tmp_path, monkeypatch):
    monkeypatch.delenv("NANOCHAT_DATA_DIR", raising=False)
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    d = tmp_path / "base_data"
    for i in (0, 1, 5):
        write_parquet(str(d / dataset.shard_name(i)), ["x"])
    (d / (dataset.shard_name(7) + ".tmp")).write_bytes(b"partial")
    with pytest.raises(FileNotFoundError, match="no val shard"):
        dataset.get_split_files("val")
    write_parquet(str(d / dataset.shard_name(dataset.VAL_SHARD)), ["v"])
    assert [os.path.basename(p) for p in dataset.get_split_files("train")] == [dataset.shard_name(i) for i in (0, 1, 5)]
    assert [os.path.basename(p) for p in dataset.get_split_files("val")] == [dataset.shard_name(dataset.VAL_SHARD)]


def test_data_dir_split_and_row_group_iteration(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_DATA_DIR", str(tmp_path))
    texts = {i: [f"f{i} r{k}" for k in range(5)] for i in range(3)}
    for i, t in texts.items():
        write_parquet(str(tmp_path / "pretrain" / f"shard_{i:05d}.parquet"), t, row_group_size=2)
    files = dataset.list_parquet_files()
    assert [os.path.basename(f) for f in files] == [f"shard_{i:05d}.parquet" for i in range(3)]
    assert dataset.get_split_files("train") == files[:2]
    assert dataset.get_split_files("val") == files[2:]
    # row groups of 2 rows: [r0 r1] [r2 r3] [r4]
    assert list(dataset.parquets_iter_batched("val")) == [texts[2][0:2], texts[2][2:4], texts[2][4:]]
    assert list(dataset.parquets_iter_batched("train", start=1, step=2)) == [texts[0][2:4], texts[1][2:4]]
    with pytest.raises(ValueError, match="split"):
        dataset.get_split_files("test")


def test_missing_shards_error_names_both_remedies(tmp_path, monkeypatch):
    monkeypatch.delenv("NANOCHAT_DATA_DIR", raising=False)
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    for split in ("train", "val"):
        with pytest.raises(FileNotFoundError) as e:
            dataset.get_split_files(split)
        assert "python -m nanochat.dataset -n 8" in str(e.value) and "NANOCHAT_DATA_DIR" in str(e.value)
    monkeypatch.setenv("NANOCHAT_DATA_DIR", str(tmp_path))  # a mirror without pretrain/
    with pytest.raises(FileNotFoundError, match="NANOCHAT_DATA_DIR"):
        list(dataset.parquets_iter_batched("train"))


def corrupt_middle(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 3: len(data) // 3 + 64] = b"\xff" * 64  # inside the column data, footer intact
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage,expect", [
    (lambda p: p.write_bytes(p.read_bytes()[:len(p.read_bytes()) // 2]), "is not a readable parquet shard"),
    (lambda p: p.write_bytes(bytes(p.stat().st_size)), "is not a readable parquet shard"),
    (lambda p: (p.unlink(), os.mkfifo(p)), r"is a named pipe \(FIFO\), not a regular file"),
    (lambda p: (p.unlink(), p.symlink_to("/dev/zero")), "is a character device, not a regular file"),
    (lambda p: pq.write_table(pa.table({"body": ["x"] * 5}), p), "row group 0 cannot be read"),
    (lambda p: pq.write_table(pa.table({"text": [1, 2, 3]}), p), "the 'text' column must hold strings, not int64"),
    (lambda p: pq.write_table(pa.table({"text": ["a", None]}), p), r"must hold strings, not string \(1 nulls\)"),
    (corrupt_middle, "cannot be read"),
])
def test_damaged_shard_is_one_line_naming_it(tmp_path, monkeypatch, damage, expect):
    from nanochat.files import InputFileError
    monkeypatch.setenv("NANOCHAT_DATA_DIR", str(tmp_path))
    for i in range(2):
        write_parquet(str(tmp_path / "pretrain" / f"shard_{i:05d}.parquet"), [f"text {k} " * 50 for k in range(40)],
                      row_group_size=20)
    path = tmp_path / "pretrain" / "shard_00001.parquet"
    damage(path)
    with pytest.raises(InputFileError, match=expect) as e:
        list(dataset.parquets_iter_batched("val"))
    assert str(e.value).startswith(str(path)) and "\n" not in str(e.value) and "download it again" in str(e.value)
