"""
End-to-end tests of the pretraining stage, run as users run it: `python -m scripts.base_train` (and
torchrun), then base_loss / base_eval on the checkpoint. Tiny: depth 2, head dim 32, 64-token rows,
the fixture's 384-token tokenizer, and a small pretraining set whose epochs last only a few steps so
resumes cross epoch boundaries.

Faults are made deterministic with a sitecustomize (on PYTHONPATH, written per test) that can
  - SIGKILL the process in the middle of writing a chosen checkpoint file (half the bytes on disk), or
  - write NaN into the weights right after a chosen optimizer step.
"""

import glob
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from conftest import REPO, make_text, run_module, script_env

TINY = ["--depth=2", "--head-dim=32", "--max-seq-len=64", "--device-batch-size=4", "--core-metric-every=-1",
        "--sample-every=-1", "--eval-tokens=512", "--warmup-steps=2", "--run=dummy"]
N, K = 12, 4  # total steps; first save of the resume tests

HOOK = r'''
import os
_kill = os.environ.get("NANOCHAT_TEST_KILL_SAVING")  # substring of a checkpoint file name
_nan = os.environ.get("NANOCHAT_TEST_NAN_AFTER_STEP")  # optimizer step (0-based) after which weights -> NaN
if _kill:
    import io, signal, torch
    _orig_save = torch.save
    def _killing_save(obj, f, *args, **kwargs):
        name = f if isinstance(f, str) else getattr(f, "name", "")
        if _kill in os.path.basename(str(name)):
            buf = io.BytesIO()
            _orig_save(obj, buf, *args, **kwargs)
            data = buf.getvalue()
            if isinstance(f, str):
                f = open(f, "wb")
            f.write(data[: len(data) // 2])
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)  # a crash mid-write: half a file under the temp name
        return _orig_save(obj, f, *args, **kwargs)
    torch.save = _killing_save
if _nan:
    import torch
    from nanochat.optim import MuonAdamW
    _orig_step, _calls = MuonAdamW.step, [0]
    def _poisoning_step(self, *args, **kwargs):
        out = _orig_step(self, *args, **kwargs)
        if _calls[0] == int(_nan):
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("nan"))
        _calls[0] += 1
        return out
    MuonAdamW.step = _poisoning_step
'''

STEP_RE = re.compile(r"^step (\d+)/(\d+) .*\| epoch (\d+) \| raw loss (\S+)", re.M)

# -----------------------------------------------------------------------------
# Helpers


@pytest.fixture(scope="module")
def small_data_dir(tmp_path_factory, tiny_data_dir):
    """A data dir with 2 small train shards (short epochs) + a val shard, and the fixture's CORE bundle."""
    root = str(tmp_path_factory.mktemp("smalldata"))
    rng = random.Random(1)
    os.makedirs(os.path.join(root, "pretrain"))
    for i in range(3):
        docs = [make_text(rng, rng.randint(2, 12)) for _ in range(24)]
        pq.write_table(pa.table({"text": docs}), os.path.join(root, "pretrain", f"shard_{i:05d}.parquet"),
                       row_group_size=8)
    shutil.copytree(os.path.join(tiny_data_dir, "eval_bundle"), os.path.join(root, "eval_bundle"))
    return root


@pytest.fixture(scope="module")
def hook_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("hook"))
    with open(os.path.join(d, "sitecustomize.py"), "w") as f:
        f.write(HOOK)
    return d


def new_base(tmp_path_factory, tiny_tokenizer_dir, name):
    base = str(tmp_path_factory.mktemp(name) / "base")
    shutil.copytree(tiny_tokenizer_dir, base)
    return base


def hook_env(hook_dir, **kw):
    return {"PYTHONPATH": os.pathsep.join([hook_dir, REPO]), **kw}


def train(base, data, *extra, check=True, env=None):
    env = {"NANOCHAT_PEAK_FLOPS": "1e11", **(env or {})}  # skip the 1 s matmul probe
    return run_module("scripts.base_train", [*TINY, *extra], base, data, timeout=240, check=check, **env)


def step_losses(stdout):
    """{step: raw loss string} from the per-step log lines (full precision, so equality is exact)."""
    return {int(m.group(1)): m.group(4) for m in STEP_RE.finditer(stdout)}


def step_epochs(stdout):
    return {int(m.group(1)): int(m.group(3)) for m in STEP_RE.finditer(stdout)}


def ckpt_dir(base, tag="d2"):
    return os.path.join(base, "base_checkpoints", tag)


def load_weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


def free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def straight(tmp_path_factory, tiny_tokenizer_dir, small_data_dir):
    """The uninterrupted reference run: N steps, val bpb at 0/6/12, saved only at the end."""
    base = new_base(tmp_path_factory, tiny_tokenizer_dir, "straight")
    proc = train(base, small_data_dir, f"--num-iterations={N}", "--total-batch-size=512", "--eval-every=6",
                 "--window-pattern=SL")
    return base, proc.stdout


# -----------------------------------------------------------------------------
# 1. a short run learns and writes a complete checkpoint


def test_train_lowers_loss_and_writes_checkpoint(straight):
    base, out = straight
    losses = step_losses(out)
    assert sorted(losses) == list(range(N)), out[-3000:]
    first, last = float(losses[0]), float(losses[N - 1])
    assert last < first - 0.3, f"loss did not fall: {first} -> {last}"
    bpbs = [float(x) for x in re.findall(r"val bpb (\d+\.\d+)", out)]
    assert len(bpbs) == 3 and bpbs[-1] < bpbs[0]
    assert "grad accum: 2" in out  # 512 tokens = 2 micro-batches of 4 x 64

    d = ckpt_dir(base)
    assert sorted(os.listdir(d)) == [f"meta_{N:06d}.json", f"model_{N:06d}.pt", f"optim_{N:06d}_rank0.pt"]
    with open(os.path.join(d, f"meta_{N:06d}.json")) as f:
        meta = json.loads(f.read(), parse_constant=lambda c: pytest.fail(f"meta is not strict JSON: {c}"))
    assert meta["step"] == N
    assert meta["model_config"] == {"sequence_len": 64, "vocab_size": 384, "n_layer": 2, "n_head": 4,
                                    "n_kv_head": 4, "n_embd": 128, "window_pattern": "SL",
                                    "short_window": meta["model_config"]["short_window"]}
    assert meta["user_config"]["num_iterations"] == N and meta["user_config"]["window_pattern"] == "SL"
    loop = meta["loop_state"]
    # the final checkpoint is written after the final evaluation: its meta holds the val bpb of step N, not of step 6
    assert meta["val_bpb"] == pytest.approx(bpbs[-1], abs=1e-6)
    assert math.isclose(loop["min_val_bpb"], min(bpbs), rel_tol=1e-5)
    assert loop["curves"]["val_step"] == [0, 6, N]
    assert loop["total_training_time"] > 0 and loop["smooth_train_loss"] > 0
    assert meta["tokenizer"]["vocab_size"] == 384 and len(meta["tokenizer"]["fingerprint"]) == 64
    assert meta["dataloader_state_dict"]["cursor"][0] >= 1
    # the saved model loads for inference and reproduces the weights
    from nanochat.checkpoint_manager import find_last_step
    from nanochat.model_loader import build_model
    from nanochat.tokenizer import RustBPETokenizer
    assert find_last_step(d) == N
    tok = RustBPETokenizer.from_directory(os.path.join(base, "tokenizer"))
    model, _, _ = build_model(d, N, "cpu", phase="eval", tokenizer=tok)
    saved = load_weights(os.path.join(d, f"model_{N:06d}.pt"))
    assert_same_weights({k: v for k, v in model.state_dict().items() if k in saved}, saved)
    optim = load_weights(os.path.join(d, f"optim_{N:06d}_rank0.pt"))
    assert {"optimizer", "loader", "rng"} <= set(optim)


# -----------------------------------------------------------------------------
# 2+3. killed mid-save, resumed: the loss trace and final weights match the uninterrupted run


@pytest.mark.slow
def test_killed_save_then_resume_is_exact(straight, tmp_path_factory, tiny_tokenizer_dir, small_data_dir, hook_dir):
    ref_base, ref_out = straight
    ref = step_losses(ref_out)
    base = new_base(tmp_path_factory, tiny_tokenizer_dir, "killed")
    d = ckpt_dir(base)
    # saves step K, then dies while writing the optimizer file of step 2K (its model file is complete)
    proc = train(base, small_data_dir, f"--num-iterations={N}", "--total-batch-size=512", "--eval-every=6",
                 "--window-pattern=SL", f"--save-every={K}", check=False,
                 env=hook_env(hook_dir, NANOCHAT_TEST_KILL_SAVING=f"optim_{2 * K:06d}_rank0"))
    assert proc.returncode == -signal.SIGKILL, proc.stdout[-3000:]
    first = step_losses(proc.stdout)
    assert sorted(first) == list(range(2 * K))
    assert all(first[s] == ref[s] for s in first), "saving a checkpoint changed the trajectory"
    files = sorted(os.listdir(d))
    assert f"model_{2 * K:06d}.pt" in files and f"optim_{2 * K:06d}_rank0.pt.tmp" in files
    assert f"meta_{2 * K:06d}.json" not in files

    from nanochat.checkpoint_manager import find_last_step, load_checkpoint
    assert find_last_step(d) == K
    with pytest.raises(FileNotFoundError, match="incomplete"):
        load_checkpoint(d, 2 * K, "cpu")

    proc = train(base, small_data_dir, f"--num-iterations={N}", "--total-batch-size=512", "--eval-every=6",
                 "--window-pattern=SL", f"--save-every={K}", f"--resume-from-step={K}")
    resumed = step_losses(proc.stdout)
    assert sorted(resumed) == list(range(K, N))
    assert {s: ref[s] for s in resumed} == resumed  # bit-identical losses
    epochs = step_epochs(proc.stdout)
    assert epochs[N - 1] > epochs[K], "the resumed part should cross an epoch boundary of the data"
    # same val bpb at the shared eval steps and the same final weights
    assert re.findall(r"step 00012 \| val bpb (\S+)", proc.stdout) == re.findall(r"step 00012 \| val bpb (\S+)", ref_out)
    assert_same_weights(load_weights(os.path.join(d, f"model_{N:06d}.pt")),
                        load_weights(os.path.join(ckpt_dir(ref_base), f"model_{N:06d}.pt")))
    assert find_last_step(d) == N
    with open(os.path.join(d, f"meta_{N:06d}.json")) as f:
        meta = json.load(f)
    with open(os.path.join(ckpt_dir(ref_base), f"meta_{N:06d}.json")) as f:
        ref_meta = json.load(f)
    assert meta["loop_state"]["min_val_bpb"] == ref_meta["loop_state"]["min_val_bpb"]
    assert meta["loop_state"]["smooth_train_loss"] == ref_meta["loop_state"]["smooth_train_loss"]
    assert meta["dataloader_state_dict"] == ref_meta["dataloader_state_dict"]


def test_partial_later_step_is_ignored(tmp_path):
    """Simulated crash states of a later step: temp files, a model without meta, a stray meta."""
    from nanochat.checkpoint_manager import find_last_step, save_checkpoint, load_checkpoint
    d = str(tmp_path / "ck")
    save_checkpoint(d, 5, {"w": torch.ones(2)}, {"o": torch.zeros(1)}, {"step": 5})
    with open(os.path.join(d, "model_000010.pt.tmp"), "wb") as f:
        f.write(b"\x00" * 10)
    assert find_last_step(d) == 5
    shutil.copy(os.path.join(d, "model_000005.pt"), os.path.join(d, "model_000010.pt"))
    assert find_last_step(d) == 5  # model without meta: incomplete
    with open(os.path.join(d, "meta_000015.json"), "w") as f:
        json.dump({"step": 15}, f)
    assert find_last_step(d) == 5  # meta without model: incomplete
    _, optim, meta = load_checkpoint(d, 5, "cpu", load_optimizer=True)
    assert meta["step"] == 5 and torch.equal(optim["o"], torch.zeros(1))


# -----------------------------------------------------------------------------
# 4. non-finite loss or weights stop the run without writing the poisoned state


@pytest.mark.slow
def test_nan_weights_stop_before_save(tmp_path_factory, tiny_tokenizer_dir, small_data_dir, hook_dir):
    base = new_base(tmp_path_factory, tiny_tokenizer_dir, "nanw")
    # NaN lands in the weights with the update of step 3; step 4 would save them
    proc = train(base, small_data_dir, "--num-iterations=8", "--total-batch-size=256", "--eval-every=-1",
                 "--save-every=2", "--window-pattern=L", check=False,
                 env=hook_env(hook_dir, NANOCHAT_TEST_NAN_AFTER_STEP="3"))
    assert proc.returncode == 2, proc.stdout[-3000:]
    assert "non-finite weights at step 4" in proc.stdout
    assert "Traceback" not in proc.stdout
    d = ckpt_dir(base)
    assert sorted(os.listdir(d)) == ["meta_000002.json", "model_000002.pt", "optim_000002_rank0.pt"]
    w = load_weights(os.path.join(d, "model_000002.pt"))
    assert all(torch.isfinite(v).all() for v in w.values())


@pytest.mark.slow
def test_infinite_lr_stops_with_step(tmp_path_factory, tiny_tokenizer_dir, small_data_dir):
    base = new_base(tmp_path_factory, tiny_tokenizer_dir, "naninf")
    proc = train(base, small_data_dir, "--num-iterations=6", "--total-batch-size=256", "--eval-every=-1",
                 "--window-pattern=L", "--unembedding-lr=inf", check=False)
    assert proc.returncode == 2, proc.stdout[-3000:]
    assert re.search(r"ERROR: non-finite loss or gradient at step 1\b", proc.stdout), proc.stdout[-2000:]
    assert not glob.glob(os.path.join(ckpt_dir(base), "*"))  # nothing saved, not even the "final" step


# -----------------------------------------------------------------------------
# 5. torchrun on gloo: two ranks on one node, and two single-rank "nodes"; resume across launch modes


@pytest.mark.slow
def test_two_node_then_standalone_resume(tmp_path_factory, tiny_tokenizer_dir, small_data_dir):
    base = new_base(tmp_path_factory, tiny_tokenizer_dir, "dist")
    env = script_env(base, small_data_dir, NANOCHAT_PEAK_FLOPS="1e11")
    args = [*TINY, f"--num-iterations={N}", "--total-batch-size=512", "--eval-every=-1", "--window-pattern=L",
            f"--save-every={K}"]
    port = free_port()
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
                               f"--node_rank={r}", "--rdzv-backend=c10d", f"--rdzv-endpoint=localhost:{port}",
                               "-m", "scripts.base_train", "--", *args],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(2)]
    try:
        outs = [p.communicate(timeout=240)[0] for p in nodes]
    finally:
        for p in nodes:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in nodes] == [0, 0], "\n=====\n".join(o[-3000:] for o in outs)
    two_node = {}
    for o in outs:  # rank 0 prints; its node could be either process
        two_node.update(step_losses(o))
    assert sorted(two_node) == list(range(N))
    assert float(two_node[N - 1]) < float(two_node[0])
    assert "grad accum: 1" in "".join(outs)  # 512 tokens = 2 ranks x 4 x 64: the world size is 2
    d = ckpt_dir(base)
    for s in (K, 2 * K, N):
        for r in range(2):
            assert os.path.exists(os.path.join(d, f"optim_{s:06d}_rank{r}.pt"))
    final_two_node = load_weights(os.path.join(d, f"model_{N:06d}.pt"))

    # same world size, other launch mode: torchrun --standalone with 2 local ranks resumes step 2K
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "scripts.base_train", "--", *args, f"--resume-from-step={2 * K}"],
                          cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:]
    resumed = step_losses(proc.stdout)
    assert sorted(resumed) == list(range(2 * K, N))
    assert {s: two_node[s] for s in resumed} == resumed
    assert_same_weights(load_weights(os.path.join(d, f"model_{N:06d}.pt")), final_two_node)


# -----------------------------------------------------------------------------
# 6. base_loss and base_eval on the trained checkpoint


def bpb_by_hand(model, tokenizer, split, batches, B, T):
    """Bits per byte of the first `batches` loader batches, one target at a time from the logits:
    -log p(target) summed in nats over targets that are text, / (ln 2 * their UTF-8 byte count)."""
    import torch
    from nanochat.dataloader import PretrainLoader
    specials = {tokenizer.encode_special(s) for s in tokenizer.get_special_tokens()}
    loader = PretrainLoader(tokenizer, B, T, split)
    nats, nbytes = 0.0, 0
    with torch.no_grad():
        for _ in range(batches):
            x, y = next(loader)
            logp = torch.log_softmax(model(x).double(), dim=-1)  # (B, T, V)
            for b, t in zip(*torch.nonzero(y >= 0, as_tuple=True)):
                target = int(y[b, t])
                if target not in specials:
                    nats -= float(logp[b, t, target])
                    nbytes += len(tokenizer.enc.decode_single_token_bytes(target))
    loader.close()
    return nats / (math.log(2) * nbytes)


@pytest.mark.slow
def test_base_loss_and_eval(straight, small_data_dir, monkeypatch):
    base, _ = straight
    proc = run_module("scripts.base_loss", ["--device-batch-size=2", "--split-tokens=256", "--num-samples=2"],
                      base, small_data_dir, timeout=240)
    out = proc.stdout
    printed = {split: float(re.search(rf"{split} bpb: (\d+\.\d+)", out).group(1)) for split in ("train", "val")}
    assert "The capital of France is" in out and "unconditional 1:" in out
    report = glob.glob(os.path.join(base, "report", "*"))
    assert report, "base_loss should write its report section"
    # the same bpb recomputed here from the checkpoint's logits: 256 tokens = 2 batches of 2 x 64 per split
    from nanochat.model_loader import load_model
    monkeypatch.setenv("NANOCHAT_BASE_DIR", base)
    monkeypatch.setenv("NANOCHAT_DATA_DIR", small_data_dir)
    model, tokenizer, _ = load_model("base", "cpu", phase="eval")
    for split in ("train", "val"):
        assert abs(printed[split] - bpb_by_hand(model, tokenizer, split, 2, 2, 64)) < 2e-4, (split, printed)

    proc = run_module("scripts.base_eval", ["--max-per-task=4"], base, small_data_dir, timeout=240)
    csv_path = os.path.join(base, "base_eval", f"base_model_{N:06d}.csv")
    assert os.path.exists(csv_path), proc.stdout[-3000:]
    with open(csv_path) as f:
        rows = [line.strip().split(",") for line in f if line.strip()]
    assert rows[0] == ["Task", "Accuracy", "Centered"]
    assert {r[0] for r in rows[1:-1]} == {"toy_mc", "toy_lm"}
    # CORE recomputed from the per-task rows: each task's accuracy over its 4 examples, centered by the
    # random baseline of the bundle's metadata ((acc - b) / (1 - b)), then averaged
    with open(os.path.join(small_data_dir, "eval_bundle", "eval_meta_data.csv")) as f:
        baseline = {line.split(",")[0]: float(line.split(",")[5]) / 100 for line in list(f)[1:] if line.strip()}
    centered = []
    for task, acc, cen in rows[1:-1]:
        assert float(acc) * 4 == round(float(acc) * 4), (task, acc)  # a count out of 4 examples
        centered.append((float(acc) - baseline[task]) / (1 - baseline[task]))
        assert abs(float(cen) - centered[-1]) < 1e-4, (task, acc, cen)
    assert rows[-1][0] == "CORE" and abs(float(rows[-1][2]) - sum(centered) / len(centered)) < 1e-4, rows


# -----------------------------------------------------------------------------
# 7. clear errors at the edge


def test_bad_total_batch_size_names_flag(tmp_path_factory, tiny_tokenizer_dir, small_data_dir):
    base = new_base(tmp_path_factory, tiny_tokenizer_dir, "badbatch")
    proc = train(base, small_data_dir, "--num-iterations=2", "--total-batch-size=300", check=False)
    assert proc.returncode != 0
    msg = proc.stdout.strip().splitlines()[-1]
    assert "--total-batch-size=300" in msg and "--total-batch-size=256" in msg and "4*64*1 = 256" in msg


def test_missing_tokenizer_and_data(tmp_path, small_data_dir, tiny_tokenizer_dir):
    empty = str(tmp_path / "empty")
    os.makedirs(empty)
    proc = train(empty, small_data_dir, "--num-iterations=2", check=False)
    assert proc.returncode != 0
    assert "no tokenizer in" in proc.stdout and "tok_train" in proc.stdout

    base = str(tmp_path / "base")
    shutil.copytree(tiny_tokenizer_dir, base)
    nodata = str(tmp_path / "nodata")
    os.makedirs(nodata)
    proc = train(base, nodata, "--num-iterations=2", "--total-batch-size=256", check=False)
    assert proc.returncode != 0
    assert "parquet shards" in proc.stdout and "NANOCHAT_DATA_DIR" in proc.stdout
