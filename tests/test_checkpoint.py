"""Checkpoint files (checkpoint_manager) and the models built from them (model_loader): round trip, atomic writes,
weights_only, config/tokenizer checks, dtypes, damaged files as one line; restoring a resumed step (resume)."""

import os
import json
import random
import pathlib
import threading
from dataclasses import asdict

import pytest
import torch

from nanochat import checkpoint_manager as cm
from nanochat import model_loader
from nanochat.files import InputFileError
from nanochat.resume import restore_training_state
from nanochat.gpt import GPTConfig
from nanochat.tokenizer import RustBPETokenizer

from conftest import tiny_gpt

VOCAB = 300


def make_tokenizer(seed):
    rng = random.Random(seed)
    words = ["".join(rng.choice("abcdefghij") for _ in range(rng.randint(2, 6))) for _ in range(300)]
    texts = [" ".join(rng.choice(words) for _ in range(50)) for _ in range(200)]
    return RustBPETokenizer.train_from_iterator(iter(texts), VOCAB)


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer(0)


def tiny_config(**kw):
    cfg = dict(sequence_len=32, vocab_size=VOCAB, n_layer=2, n_head=2, n_kv_head=2, n_embd=32, window_pattern="SL")
    cfg.update(kw)
    return GPTConfig(**cfg)


def make_model(config, seed=0):
    model = tiny_gpt(seed, **asdict(config))
    with torch.no_grad():  # init zeroes some projections: give every weight a value so outputs depend on all
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def meta_for(config, tokenizer, step):
    return {"step": step, "model_config": asdict(config), "tokenizer": cm.tokenizer_info(tokenizer)}


def save(ckpt_dir, step, model, tokenizer, optim_state=None, config=None):
    config = config or model.config
    cm.save_checkpoint(str(ckpt_dir), step, model.state_dict(), optim_state, meta_for(config, tokenizer, step))


class Evil:  # a custom class: unpickling it would run arbitrary code paths, weights_only must refuse it
    def __reduce__(self):
        return (os.getcwd, ())


def test_round_trip_identical_outputs(tmp_path, tokenizer):
    model = make_model(tiny_config())
    rng_state = {"torch": torch.get_rng_state(), "python": random.getstate(), "loader": {"pq_idx": 3, "rg_idx": 1}}
    save(tmp_path, 5, model, tokenizer, optim_state=rng_state)
    assert sorted(os.listdir(tmp_path)) == ["meta_000005.json", "model_000005.pt", "optim_000005_rank0.pt"]
    loaded, tok, meta = model_loader.build_model(str(tmp_path), 5, "cpu", "eval", tokenizer=tokenizer)
    assert meta["step"] == 5 and not loaded.training and tok is tokenizer
    x = torch.randint(0, VOCAB, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    # the per-rank dict comes back intact (RNG states included)
    _, optim, _ = cm.load_checkpoint(str(tmp_path), 5, "cpu", load_optimizer=True)
    assert torch.equal(optim["torch"], rng_state["torch"]) and optim["loader"] == {"pq_idx": 3, "rg_idx": 1}
    random.setstate(optim["python"])  # a plain tuple again
    # train phase
    trained, _, _ = model_loader.build_model(str(tmp_path), 5, "cpu", "train", tokenizer=tokenizer)
    assert trained.training


def test_killed_model_write_keeps_previous_step(tmp_path, tokenizer, monkeypatch):
    model = make_model(tiny_config())
    save(tmp_path, 1, model, tokenizer)
    real_save = torch.save

    def dying_save(obj, f, *args, **kwargs):  # write half a file, then "get killed"
        real_save(obj, f, *args, **kwargs)
        f.truncate(100)
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        save(tmp_path, 2, model, tokenizer)
    monkeypatch.setattr(torch, "save", real_save)
    assert not os.path.exists(tmp_path / "model_000002.pt")  # only a temp file was left behind
    assert cm.find_last_step(str(tmp_path)) == 1
    loaded, _, _ = model_loader.build_model(str(tmp_path), 1, "cpu", "eval", tokenizer=tokenizer)
    x = torch.randint(0, VOCAB, (1, 8))
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    with pytest.raises(FileNotFoundError, match="incomplete"):
        cm.load_checkpoint(str(tmp_path), 2, "cpu")


def test_killed_meta_write_and_resave_of_same_step(tmp_path, tokenizer, monkeypatch):
    model = make_model(tiny_config())
    save(tmp_path, 1, model, tokenizer)
    save(tmp_path, 2, model, tokenizer)
    real_dump = json.dump

    def dying_dump(obj, f, *args, **kwargs):
        f.write('{"step": ')
        raise KeyboardInterrupt("killed while writing meta")

    monkeypatch.setattr(json, "dump", dying_dump)
    # model written, meta not: step 3 must not count
    with pytest.raises(KeyboardInterrupt):
        save(tmp_path, 3, model, tokenizer)
    assert os.path.exists(tmp_path / "model_000003.pt")
    assert cm.find_last_step(str(tmp_path)) == 2
    # re-saving an existing step that dies: that step is no longer complete, the one before is latest
    with pytest.raises(KeyboardInterrupt):
        save(tmp_path, 2, model, tokenizer)
    monkeypatch.setattr(json, "dump", real_dump)
    assert cm.find_last_step(str(tmp_path)) == 1
    cm.load_checkpoint(str(tmp_path), 1, "cpu")


def test_find_last_step_needs_complete_steps(tmp_path):
    with pytest.raises(FileNotFoundError):
        cm.find_last_step(str(tmp_path))
    (tmp_path / "model_000010.pt").write_bytes(b"")  # no meta -> not a step
    (tmp_path / "meta_000007.json").write_text("{}")  # no model -> not a step
    with pytest.raises(FileNotFoundError):
        cm.find_last_step(str(tmp_path))


def test_weights_only_refuses_custom_classes(tmp_path, tokenizer):
    model = make_model(tiny_config())
    save(tmp_path, 1, model, tokenizer)
    state = dict(model.state_dict())
    state["evil"] = Evil()
    torch.save(state, tmp_path / "model_000001.pt")
    with pytest.raises(cm.CheckpointError, match="model_000001.pt holds objects other than tensors"):
        cm.load_checkpoint(str(tmp_path), 1, "cpu")
    cm.save_checkpoint(str(tmp_path), 2, model.state_dict(), {"x": Evil()}, meta_for(model.config, tokenizer, 2))
    cm.load_checkpoint(str(tmp_path), 2, "cpu")  # model fine
    with pytest.raises(cm.CheckpointError, match="optim_000002_rank0.pt holds objects other than tensors"):
        cm.load_checkpoint(str(tmp_path), 2, "cpu", load_optimizer=True)


def test_config_mismatch_names_keys(tmp_path, tokenizer):
    model = make_model(tiny_config())
    save(tmp_path, 1, model, tokenizer, config=tiny_config(n_embd=64))  # meta claims a wider model
    with pytest.raises(cm.CheckpointError) as e:
        model_loader.build_model(str(tmp_path), 1, "cpu", "eval", tokenizer=tokenizer)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(str(tmp_path / "model_000001.pt")) and "meta_000001.json" in msg
    assert "shapes differ" in msg and "transformer.wte.weight" in msg and "(320, 32)" in msg and "(320, 64)" in msg
    # a deeper config: the checkpoint lacks the extra layer
    save(tmp_path, 2, model, tokenizer, config=tiny_config(n_layer=3))
    with pytest.raises(cm.CheckpointError, match=r"missing .*transformer\.h\.2\."):
        model_loader.build_model(str(tmp_path), 2, "cpu", "eval", tokenizer=tokenizer)


def test_tokenizer_mismatch(tmp_path, tokenizer):
    model = make_model(tiny_config())
    save(tmp_path, 1, model, tokenizer)
    other = make_tokenizer(1)  # same vocab size, different merges
    assert other.get_vocab_size() == VOCAB
    with pytest.raises(ValueError, match="tokenizer mismatch.*fingerprint"):
        model_loader.build_model(str(tmp_path), 1, "cpu", "eval", tokenizer=other)
    small = RustBPETokenizer.train_from_iterator(iter(["abc abd abe " * 50]), 266)
    with pytest.raises(ValueError, match="vocab_size=300.*has 266"):
        model_loader.build_model(str(tmp_path), 1, "cpu", "eval", tokenizer=small)


def test_bf16_compiled_old_checkpoint_loads_on_cpu_fp32(tmp_path, tokenizer):
    """A GPU-style checkpoint (bf16 embeddings, _orig_mod. keys, no smear/backout, no window_pattern)."""
    config = tiny_config(window_pattern="L")
    model = make_model(config)
    state = {}
    for k, v in model.state_dict().items():
        if k in ("smear_lambda", "backout_lambda", "smear_gate.weight"):
            continue  # an older model without these
        state["_orig_mod." + k] = v.to(torch.bfloat16) if "wte" in k or "value_embeds" in k else v
    meta = meta_for(config, tokenizer, 4)
    del meta["model_config"]["window_pattern"]
    cm.save_checkpoint(str(tmp_path), 4, state, None, meta)
    loaded, _, _ = model_loader.build_model(str(tmp_path), 4, "cpu", "eval", tokenizer=tokenizer)
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    assert loaded.config.window_pattern == "L"
    assert loaded.smear_lambda.item() == 0 and loaded.backout_lambda.item() == 0
    assert torch.count_nonzero(loaded.smear_gate.weight) == 0
    # reference: the original model with the bf16-rounded embeddings and inert smear/backout
    with torch.no_grad():
        model.transformer.wte.weight.copy_(model.transformer.wte.weight.bfloat16().float())
        for ve in model.value_embeds.values():
            ve.weight.copy_(ve.weight.bfloat16().float())
        model.smear_lambda.zero_()
        model.backout_lambda.zero_()
        model.smear_gate.weight.zero_()
        x = torch.randint(0, VOCAB, (2, 12))
        torch.testing.assert_close(loaded(x), model(x))


def test_load_model_picks_largest_tag_and_last_step(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    tokenizer.save(str(tmp_path / "tokenizer"))
    small, big = make_model(tiny_config(n_layer=1)), make_model(tiny_config(n_layer=2))
    root = tmp_path / "mid_checkpoints"
    save(root / "d1", 3, small, tokenizer)
    save(root / "d2", 1, big, tokenizer)
    save(root / "d2", 7, big, tokenizer)
    (root / "d2" / "model_000009.pt").write_bytes(b"partial")  # an unfinished save is ignored
    assert cm.find_largest_model(str(root)) == "d2"
    model, tok, meta = model_loader.load_model("mid", "cpu", "eval")
    assert meta["step"] == 7 and model.config.n_layer == 2 and tok.get_vocab_size() == VOCAB
    model, _, meta = model_loader.load_model("mid", "cpu", "eval", model_tag="d1")
    assert meta["step"] == 3 and model.config.n_layer == 1
    with pytest.raises(FileNotFoundError):
        model_loader.load_model("sft", "cpu", "eval")
    with pytest.raises(ValueError, match="source"):
        model_loader.load_model("pretrain", "cpu", "eval")


def test_largest_model_falls_back_to_newest_dir(tmp_path):
    for i, name in enumerate(["alpha", "beta", "gamma"]):
        (tmp_path / name).mkdir()
        os.utime(tmp_path / name, (1000 + i * (1 if name != "beta" else 100), 1000 + i * (1 if name != "beta" else 100)))
    assert cm.find_largest_model(str(tmp_path)) == "beta"


def _save_worker(rank, world, store, ckpt_dir):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    cm.save_checkpoint(ckpt_dir, 3, {"w": torch.ones(2)}, {"shard": torch.full((2,), float(rank))},
                       {"step": 3, "model_config": {}}, rank=rank)
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_save_per_rank_shards(tmp_path):
    import torch.multiprocessing as mp
    mp.spawn(_save_worker, args=(2, str(tmp_path / "store"), str(tmp_path / "ckpt")), nprocs=2, join=True)
    ckpt = str(tmp_path / "ckpt")
    assert cm.find_last_step(ckpt) == 3
    for rank in range(2):
        _, optim, meta = cm.load_checkpoint(ckpt, 3, "cpu", load_optimizer=True, rank=rank)
        assert torch.equal(optim["shard"], torch.full((2,), float(rank))) and meta["step"] == 3
    assert not [f for f in os.listdir(ckpt) if f.endswith(".tmp")]

# -----------------------------------------------------------------------------
# Damaged files: one CheckpointError line naming the file and the fix, never a reader's traceback


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def zero(path):
    path.write_bytes(bytes(path.stat().st_size))


def flip_tail(path):
    data = bytearray(path.read_bytes())
    data[-30] ^= 0xFF  # inside the zip reader's central directory
    path.write_bytes(bytes(data))


def rename_key(path):
    data = path.read_bytes()  # a key renamed inside the pickle, same length: the archive stays valid
    assert b"transformer.wte.weight" in data
    path.write_bytes(data.replace(b"transformer.wte.weight", b"transformer.wxe.weight"))


def edit_json(path, change):
    meta = json.loads(path.read_text())
    change(meta)
    path.write_text(json.dumps(meta))


def edit_meta(path):
    edit_json(path, lambda meta: meta["model_config"].update(n_layer="two"))


def optimizer_step(model):
    optimizer = model.setup_optimizers()
    model(torch.randint(0, VOCAB, (1, 8)), torch.randint(0, VOCAB, (1, 8))).backward()
    optimizer.step()
    return optimizer


@pytest.fixture(scope="module")
def saved_template(tmp_path_factory, tokenizer):
    ckpt_dir = tmp_path_factory.mktemp("saved")
    model = make_model(tiny_config()).train()
    optimizer = optimizer_step(model)
    save(ckpt_dir, 1, model, tokenizer, optim_state={"optimizer": optimizer.state_dict()})
    return ckpt_dir, model


@pytest.fixture
def saved(tmp_path, saved_template):
    """Step 1 with a model and an optimizer file, as the training scripts write them (a private copy)."""
    import copy
    import shutil
    template_dir, model = saved_template
    shutil.copytree(template_dir, tmp_path / "ckpt")
    return tmp_path / "ckpt", copy.deepcopy(model)


def load_for_eval(ckpt_dir, tokenizer):
    model_loader.build_model(str(ckpt_dir), 1, "cpu", "eval", tokenizer=tokenizer)


def resume(ckpt_dir, model):
    model_state, optim_state, _ = cm.load_checkpoint(str(ckpt_dir), 1, "cpu", load_optimizer=True)
    restore_training_state(model, model.setup_optimizers(), model_state, optim_state, str(ckpt_dir), 1)


@pytest.mark.parametrize("name,damage,expect", [
    ("model_000001.pt", truncate, "truncated or corrupt; re-save it, or load another step"),
    ("model_000001.pt", zero, "truncated or corrupt; re-save it, or load another step"),
    ("model_000001.pt", flip_tail, "truncated or corrupt"),
    ("model_000001.pt", rename_key, r"does not fit the model_config .*missing transformer\.wte\.weight"),
    ("meta_000001.json", truncate, "not valid JSON .*truncated or corrupt"),
    ("meta_000001.json", zero, "not valid JSON"),
    ("meta_000001.json", edit_meta, "model_config.n_layer is 'two', expected type int"),
    ("meta_000001.json", lambda p: p.write_text('{"step": 1}'), "no 'model_config' object"),
    ("meta_000001.json", lambda p: edit_json(p, lambda m: m["model_config"].update(sequence_len=10**9)),
     "sequence_len=1000000000 is outside"),
    ("meta_000001.json", lambda p: edit_json(p, lambda m: m.update(tokenizer="x")), "'tokenizer' an object"),
])
def test_damaged_model_or_meta_is_one_line_naming_the_file(saved, tokenizer, name, damage, expect):
    ckpt_dir, _ = saved
    damage(ckpt_dir / name)
    with pytest.raises(cm.CheckpointError, match=expect) as e:
        load_for_eval(ckpt_dir, tokenizer)
    assert str(e.value).startswith(str(ckpt_dir / name)) and "\n" not in str(e.value)


def test_model_of_the_wrong_shape(saved, tokenizer):
    ckpt_dir, _ = saved
    torch.save(make_model(tiny_config(n_embd=64)).state_dict(), ckpt_dir / "model_000001.pt")
    with pytest.raises(cm.CheckpointError, match=r"model_000001.pt does not fit .*\(320, 64\) vs \(320, 32\)"):
        load_for_eval(ckpt_dir, tokenizer)
    torch.save([1, 2], ckpt_dir / "model_000001.pt")  # not a dict at all
    with pytest.raises(cm.CheckpointError, match="model_000001.pt holds a list, expected a dict"):
        load_for_eval(ckpt_dir, tokenizer)


@pytest.mark.parametrize("damage", [truncate, zero, flip_tail])
def test_damaged_optimizer_file_names_it(saved, damage):
    ckpt_dir, model = saved
    damage(ckpt_dir / "optim_000001_rank0.pt")
    with pytest.raises(cm.CheckpointError, match="optim_000001_rank0.pt cannot be read .* resume from another step"):
        resume(ckpt_dir, model)


def test_optimizer_of_the_wrong_shape(saved, tokenizer):
    ckpt_dir, model = saved
    resume(ckpt_dir, model)  # the intact file resumes
    path = ckpt_dir / "optim_000001_rank0.pt"
    # a deeper model's optimizer: more parameters per group
    torch.save({"optimizer": optimizer_step(make_model(tiny_config(n_layer=3)).train()).state_dict()}, path)
    with pytest.raises(cm.CheckpointError, match="optim_000001_rank0.pt does not fit this model's optimizer"):
        resume(ckpt_dir, model)
    # same parameter counts, but a moment edited to another shape
    state = optimizer_step(make_model(tiny_config()).train()).state_dict()
    moments = next(s for s in state["state"].values() if "exp_avg" in s and s["exp_avg"].dim() == 2)
    moments["exp_avg"] = moments["exp_avg"][:, :1]
    torch.save({"optimizer": state}, path)
    with pytest.raises(cm.CheckpointError, match="optim_000001_rank0.pt: optimizer state 'exp_avg' has shape"):
        resume(ckpt_dir, model)
    torch.save({"loader": {}}, path)  # no optimizer entry at all
    with pytest.raises(cm.CheckpointError, match="optim_000001_rank0.pt does not fit .*KeyError"):
        resume(ckpt_dir, model)


# -----------------------------------------------------------------------------
# Damaged files, round two: special files, absurd configs, bad tensors, all refused before anything is built


def replace_with(path, kind):
    path.unlink()
    {"fifo": lambda: os.mkfifo(path), "dir": lambda: path.mkdir(), "/dev/zero": lambda: path.symlink_to("/dev/zero")}[kind]()


def error_within(seconds, load):
    """The exception load() raises, run in a thread that must finish within `seconds` (a FIFO would block it)."""
    result = {}

    def run():
        try:
            load()
        except BaseException as e:
            result["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still loading after {seconds} s"
    return result.get("error")


@pytest.mark.parametrize("kind,expect", [("fifo", "is a named pipe (FIFO), not a regular file"),
                                         ("dir", "is a directory, not a regular file"),
                                         ("/dev/zero", "is a character device, not a regular file")])
@pytest.mark.parametrize("name", ["model_000001.pt", "meta_000001.json", "optim_000001_rank0.pt"])
def test_special_file_in_place_of_a_checkpoint_file(saved, tokenizer, name, kind, expect):
    ckpt_dir, model = saved
    replace_with(ckpt_dir / name, kind)
    e = error_within(10, lambda: resume(ckpt_dir, model) if name.startswith("optim") else load_for_eval(ckpt_dir, tokenizer))
    assert isinstance(e, InputFileError) and str(e) == f"{ckpt_dir / name} {expect}; {str(e).split('; ', 1)[1]}", e


@pytest.mark.parametrize("change,expect", [
    ({"n_layer": 10**9}, "n_layer=1000000000 is outside 1..1024"),
    ({"sequence_len": 10**12}, "sequence_len=1000000000000 is outside"),
    ({"vocab_size": 10**12}, "vocab_size=1000000000000 is outside"),
    ({"n_embd": 10**9, "n_head": 2}, "n_embd=1000000000 is outside"),
    ({"n_head": 10**6}, "n_head=1000000 is outside"),
    ({"window_pattern": "S" * 10**6}, "window_pattern must have 1..1024 characters"),
    ({"n_layer": 2.0}, "n_layer is 2.0, expected type int"),
])
def test_config_beyond_sane_limits_is_refused_at_once(saved, tokenizer, change, expect):
    ckpt_dir, _ = saved
    edit_json(ckpt_dir / "meta_000001.json", lambda meta: meta["model_config"].update(change))
    e = error_within(10, lambda: load_for_eval(ckpt_dir, tokenizer))
    assert isinstance(e, cm.CheckpointError) and expect in str(e) and str(e).startswith(str(ckpt_dir)), e


def edit_state(path, change):
    state = torch.load(path, weights_only=True)
    change(state)
    torch.save(state, path)


@pytest.mark.parametrize("change,expect", [
    (lambda s: [v.fill_(float("nan")) for v in s.values()], r"tensor resid_lambdas holds 2 NaN/inf value\(s\) of 2"),
    (lambda s: s["lm_head.weight"].view(-1)[7].fill_(float("inf")), r"tensor lm_head\.weight holds 1 NaN/inf value"),
    (lambda s: s.update({"lm_head.weight": s["lm_head.weight"].long()}), "tensor lm_head.weight is int64, expected a "
                                                                          "floating-point dtype"),
    (lambda s: s.update({"resid_lambdas": s["resid_lambdas"].bool()}), "tensor resid_lambdas is bool"),
    (lambda s: s.update({"x0_lambdas": s["x0_lambdas"].to(torch.complex64)}), "tensor x0_lambdas is complex64"),
    (lambda s: s.update({"x0_lambdas": torch.empty(2, device="meta")}), r"tensor x0_lambdas is a meta tensor \(no values\)"),
    (lambda s: s.update({"x0_lambdas": s["x0_lambdas"].to_sparse()}), r"tensor x0_lambdas is not a dense tensor \(torch.sparse_coo\)"),
])
def test_bad_tensors_are_refused_naming_them(saved, tokenizer, change, expect):
    ckpt_dir, _ = saved
    edit_state(ckpt_dir / "model_000001.pt", change)
    with pytest.raises(cm.CheckpointError, match=expect) as e:
        load_for_eval(ckpt_dir, tokenizer)
    assert str(e.value).startswith(str(ckpt_dir / "model_000001.pt: tensor")) and "\n" not in str(e.value)


def test_model_file_far_larger_than_its_config_is_refused_unread(saved, tokenizer):
    ckpt_dir, _ = saved
    with open(ckpt_dir / "model_000001.pt", "r+b") as f:
        f.truncate(1 << 30)  # sparse: costs no disk
    e = error_within(10, lambda: load_for_eval(ckpt_dir, tokenizer))
    assert isinstance(e, InputFileError) and "is 1,073,741,824 bytes, more than a checkpoint file can be" in str(e)


def nan_weights(path):
    edit_state(path, lambda s: [v.fill_(float("nan")) for v in s.values()])


def deep_jsonl(path):
    path.write_text('[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]\n' + "[" * 100_000 + "\n")


SFT_ARGS = ["--max-seq-len=64", "--device-batch-size=4", "--target-examples-per-step=8", "--eval-steps=2",
            "--eval-metrics-every=-1", "--num-iterations=1"]
SCRIPT_CASES = [  # script, its flags, the damaged file (relative to the base dir), the damage, what the line says
    ("scripts.chat_cli", ["--source=sft", "--prompt=hi"], "chatsft_checkpoints/d2/model_000003.pt", truncate,
     "cannot be read"),
    ("scripts.chat_cli", ["--source=mid", "--prompt=hi"], "tokenizer/tokenizer.json", lambda p: p.write_text("{"),
     "is not valid JSON"),
    ("scripts.chat_web", ["--source=sft", "--port=0"], "chatsft_checkpoints/d2/model_000003.pt",
     lambda p: replace_with(p, "fifo"), "is a named pipe"),
    ("scripts.chat_eval", ["-i", "sft", "-a", "ARC-Easy", "-x", "2"], "chatsft_checkpoints/d2/model_000003.pt",
     nan_weights, "NaN/inf"),
    ("scripts.base_eval", ["--max-per-task=2"], "base_checkpoints/d2/meta_000003.json",
     lambda p: edit_json(p, lambda m: m["model_config"].update(n_layer=10**9)), "n_layer=1000000000 is outside"),
    ("scripts.base_loss", ["--device-batch-size=2", "--split-tokens=128"], "tokenizer/mergeable_ranks.tiktoken",
     lambda p: replace_with(p, "/dev/zero"), "is a character device"),
    ("scripts.chat_sft", SFT_ARGS + ["--source=mid", "--mix={file}"], "empty.jsonl", lambda p: p.write_text(""),
     "has no conversations"),
    ("scripts.mid_train", ["--max-seq-len=64", "--device-batch-size=4", "--total-batch-size=256", "--num-iterations=1",
                           "--mix={file}"], "deep.jsonl", deep_jsonl,
     ":2: malformed row: nested too deeply"),
]


@pytest.mark.slow  # subprocesses that import torch: a few seconds each
@pytest.mark.parametrize("script,args,name,damage,expect", SCRIPT_CASES, ids=[c[0] + ":" + c[2] for c in SCRIPT_CASES])
def test_scripts_print_one_line_naming_the_damaged_file(chat_base_dir, tiny_data_dir, script, args, name, damage,
                                                        expect):
    """Each script that loads a model or data, given one damaged file: exit status 1 within 60 s, no traceback,
    and a last line that names the file (the data and base checkpoint come before the model loads)."""
    import time
    from conftest import run_module, save_tiny_chat_checkpoints
    save_tiny_chat_checkpoints(chat_base_dir, sources=("base",))
    path = pathlib.Path(chat_base_dir) / name
    damage(path)
    t0 = time.time()
    proc = run_module(script, [a.format(file=path) for a in args], chat_base_dir, tiny_data_dir, check=False,
                      timeout=60, NANOCHAT_PEAK_FLOPS="1e11")
    last = proc.stdout.strip().splitlines()[-1]
    assert proc.returncode == 1 and "Traceback" not in proc.stdout, proc.stdout[-3000:]
    assert last.lower().startswith("error") and str(path) in last and expect in last, proc.stdout[-3000:]
    assert "loading" not in proc.stdout or not name.endswith(".jsonl"), "data must be checked before the model loads"
    assert time.time() - t0 < 60
