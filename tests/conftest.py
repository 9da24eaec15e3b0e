"""
Shared test fixtures: a tiny offline workspace that looks like a real one.

`tiny_data_dir` is a NANOCHAT_DATA_DIR laid out like shared/data, with generated text and a few
hand-made rows per task; `tiny_base_dir` adds a trained tiny tokenizer under NANOCHAT_BASE_DIR.
`run_module` runs `python -m <module>` with that environment (scripts are tested as users run them).
"""

import json
import os
import random
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Tests build many tiny models: compiling each one's decode step (seconds) would dominate the suite, so engines
# decode eagerly unless a test asks for compile=True (tests/test_engine.py compares the two paths)
os.environ.setdefault("NANOCHAT_DECODE_COMPILE", "0")

SUBJECTS = ["the cat", "a dog", "my friend", "the teacher", "our team", "the bird", "a farmer", "the king"]
VERBS = ["sees", "likes", "finds", "builds", "paints", "follows", "reads", "visits"]
OBJECTS = ["the house", "a river", "the old tree", "a red ball", "the city", "a small boat", "the garden"]
ENDINGS = ["today", "at night", "in the morning", "with joy", "again", "slowly", "every day"]


# an assistant turn that calls the calculator: text, the call, the tool's output (never a target), more text
TOOL_CALL_REPLY = {"role": "assistant", "content": [
    {"type": "text", "text": "Let me compute. "},
    {"type": "python", "text": "6*7"},
    {"type": "python_output", "text": "42"},
    {"type": "text", "text": "It is 42."}]}


def make_text(rng, n_sentences):
    """Simple, learnable English-like text (a tiny model's loss falls on it within a few steps)."""
    return " ".join(f"{rng.choice(SUBJECTS).capitalize()} {rng.choice(VERBS)} {rng.choice(OBJECTS)} "
                    f"{rng.choice(ENDINGS)}." for _ in range(n_sentences))


def write_jsonl(path, rows):
    """One JSON row per line (a str row is written as it is, e.g. a malformed line); returns the path."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return str(path)


def chat_rows(rng, n):
    rows = []
    for _ in range(n):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        rows.append({"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                                  {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]})
    return rows


def build_data_dir(root, seed=0):
    """A NANOCHAT_DATA_DIR with every source the pipeline reads, a few rows each."""
    rng = random.Random(seed)
    # pretraining: 3 train shards + 1 val shard (the last file), small row groups
    os.makedirs(os.path.join(root, "pretrain"))
    for i in range(4):
        docs = [make_text(rng, rng.randint(3, 30)) for _ in range(120)]
        pq.write_table(pa.table({"text": docs}), os.path.join(root, "pretrain", f"shard_{i:05d}.parquet"),
                       row_group_size=40)
    # chat stand-in and identity conversations
    write_jsonl(os.path.join(root, "chat", "train.jsonl"), chat_rows(rng, 200))
    write_jsonl(os.path.join(root, "chat", "test.jsonl"), chat_rows(rng, 40))
    write_jsonl(os.path.join(root, "identity_conversations.jsonl"),
                [[{"role": "user", "content": "Who are you?"},
                  {"role": "assistant", "content": "I am nanochat, a small language model."}]] * 10)
    # multiple choice (ARC schema and MMLU schema)
    arc = [{"id": f"q{i}", "question": f"Which one is number {i % 4 + 1}?",
            "choices": {"text": ["one", "two", "three", "four"], "label": ["A", "B", "C", "D"]},
            "answerKey": "ABCD"[i % 4]} for i in range(24)]
    for subset in ("ARC-Easy", "ARC-Challenge"):
        for split in ("train", "validation", "test"):
            write_jsonl(os.path.join(root, "hub", "allenai", "ai2_arc", subset, f"{split}.jsonl"), arc)
    mmlu = [{"question": f"What is {i} + 1?", "subject": "math", "choices": [str(i), str(i + 1), str(i + 2), str(i + 3)],
             "answer": 1} for i in range(24)]
    for split in ("test", "dev", "validation", "auxiliary_train"):
        write_jsonl(os.path.join(root, "hub", "cais", "mmlu", "all", f"{split}.jsonl"), mmlu)
    gsm = [{"question": f"Tom has {a} apples and buys {b} more. How many does he have?",
            "answer": f"He has {a}+{b} = <<{a}+{b}={a + b}>>{a + b} apples.\n#### {a + b}"}
           for a, b in [(rng.randint(1, 20), rng.randint(1, 20)) for _ in range(30)]]
    for split in ("train", "test"):
        write_jsonl(os.path.join(root, "hub", "openai", "gsm8k", "main", f"{split}.jsonl"), gsm)
    he = [{"task_id": f"HumanEval/{i}", "prompt": f"def add{i}(a, b):\n    \"\"\"Add two numbers.\"\"\"\n",
           "canonical_solution": "    return a + b\n", "test": f"def check(f):\n    assert f(1, 2) == 3\n",
           "entry_point": f"add{i}"} for i in range(4)]
    write_jsonl(os.path.join(root, "hub", "openai", "openai_humaneval", "openai_humaneval", "test.jsonl"), he)
    with open(os.path.join(root, "words_alpha.txt"), "w") as f:
        f.write("\n".join(["apple", "banana", "cherry", "strawberry", "river", "garden", "boat", "house"]) + "\n")
    # a two-task CORE bundle (one multiple choice, one language modeling)
    bundle = os.path.join(root, "eval_bundle")
    write_jsonl(os.path.join(bundle, "eval_data", "toy", "mc.jsonl"),
                [{"query": f"The cat sees the {w}", "choices": [" house.", " river."], "gold": i % 2}
                 for i, w in enumerate(["dog", "bird", "king", "tree", "boat", "city"])])
    write_jsonl(os.path.join(bundle, "eval_data", "toy", "lm.jsonl"),
                [{"context": "The dog likes the", "continuation": " garden"} for _ in range(6)])
    with open(os.path.join(bundle, "core.yaml"), "w") as f:
        f.write("icl_tasks:\n"
                "- label: toy_mc\n  dataset_uri: toy/mc.jsonl\n  num_fewshot: [1]\n  icl_task_type: multiple_choice\n"
                "- label: toy_lm\n  dataset_uri: toy/lm.jsonl\n  num_fewshot: [0]\n  icl_task_type: language_modeling\n")
    with open(os.path.join(bundle, "eval_meta_data.csv"), "w") as f:
        f.write("Eval Task,Task Category,Task Type,#shots,#datapoints,Random baseline,Centered Metric?,Description\n"
                "toy_mc,toy,multiple_choice,1,6,50,,toy\ntoy_lm,toy,language_modeling,0,6,0,,toy\n")
    return root


def train_tiny_tokenizer(base_dir, data_dir, vocab_size=384):
    """Tokenizer + token_bytes under base_dir/tokenizer, trained in-process on the data dir's text."""
    import torch
    from nanochat.tokenizer import RustBPETokenizer, compute_token_bytes
    texts = []
    for name in sorted(os.listdir(os.path.join(data_dir, "pretrain"))):
        texts += pq.read_table(os.path.join(data_dir, "pretrain", name)).column("text").to_pylist()
    texts.append("What is plus ? Who are you? I am nanochat, a small language model. 0123456789 #### ABCD")
    tok = RustBPETokenizer.train_from_iterator(iter(texts), vocab_size)
    out = os.path.join(base_dir, "tokenizer")
    tok.save(out)
    torch.save(compute_token_bytes(tok), os.path.join(out, "token_bytes.pt"))
    return tok


def tiny_gpt(seed=0, device="cpu", dtype=None, **config):
    """A freshly initialised GPT with these GPTConfig fields, computing in `dtype` (default fp32): built on the meta
    device, then materialised and initialised under torch.manual_seed(seed) (the training scripts' order, so
    weights are reproducible)."""
    import torch
    from nanochat.gpt import GPT, GPTConfig
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = GPT(GPTConfig(**config))
    model.to_empty(device=device)
    model.init_weights(dtype)
    return model


def make_tiny_chat_model(sequence_len):
    """(tokenizer, eval-mode GPT) small enough for serving tests: a byte-ish BPE with unicode, random weights."""
    from nanochat.tokenizer import RustBPETokenizer
    texts = [f"The quick brown fox {i} jumps over the lazy dog. Héllo wörld, naïve café € {i * 7}!" for i in range(200)]
    tok = RustBPETokenizer.train_from_iterator(iter(texts), vocab_size=256 + 9 + 40)
    model = tiny_gpt(sequence_len=sequence_len, vocab_size=tok.get_vocab_size(), n_layer=2, n_head=2, n_kv_head=2,
                     n_embd=32)
    return tok, model.eval()


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory):
    return build_data_dir(str(tmp_path_factory.mktemp("data")))


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory, tiny_data_dir):
    """A base dir holding only a trained tiny tokenizer (copy it per test with `fresh_base_dir`)."""
    base = str(tmp_path_factory.mktemp("tokbase"))
    train_tiny_tokenizer(base, tiny_data_dir)
    return base


def copy_workspace(template, dest):
    """A private copy of a session-scoped template base dir, so a test can change it freely."""
    import shutil
    shutil.copytree(template, dest)
    return str(dest)


@pytest.fixture
def fresh_base_dir(tmp_path, tiny_tokenizer_dir):
    """A new NANOCHAT_BASE_DIR with the tiny tokenizer in it."""
    return copy_workspace(tiny_tokenizer_dir, tmp_path / "base")


def script_env(base_dir, data_dir, **extra):
    env = dict(os.environ)
    env.update({"NANOCHAT_BASE_DIR": base_dir, "NANOCHAT_DATA_DIR": data_dir, "OMP_NUM_THREADS": "1",
                "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled"})
    env.pop("RANK", None), env.pop("WORLD_SIZE", None), env.pop("LOCAL_RANK", None)
    # fp32 eager whatever the machine's bf16 probe says: tests compare exact losses and must not compile
    env.setdefault("NANOCHAT_DTYPE", "float32")
    env.update(extra)
    return env


def run_module(module, args, base_dir, data_dir, timeout=300, check=True, **extra_env):
    """Run `python -m module args` from the repo root; returns the CompletedProcess (stdout+stderr merged)."""
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=script_env(base_dir, data_dir, **extra_env),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"python -m {module} {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}")
    return proc


def save_tiny_chat_checkpoints(base_dir, sources=("mid", "sft"), step=3, seed=0):
    """
    A randomly initialised tiny GPT (depth 2, head dim 32, context 64) saved under base_dir as tag d2 of each
    source, in the training scripts' format; the tokenizer must already be in base_dir/tokenizer.
    Enough for scripts that load a chat model (chat_eval, chat_rl, ...) to run end to end in seconds.
    """
    from nanochat.checkpoint_manager import SOURCE_DIRS, save_checkpoint, tokenizer_info, config_to_dict
    from nanochat.tokenizer import RustBPETokenizer
    tok = RustBPETokenizer.from_directory(os.path.join(base_dir, "tokenizer"))
    model = tiny_gpt(seed, sequence_len=64, vocab_size=tok.get_vocab_size(), n_layer=2, n_head=2, n_kv_head=2, n_embd=64,
                     window_pattern="L")
    meta = {"step": step, "model_config": config_to_dict(model.config), "tokenizer": tokenizer_info(tok)}
    for source in sources:
        save_checkpoint(os.path.join(base_dir, SOURCE_DIRS[source], "d2"), step, model.state_dict(), None, meta)
    return model


def tokenizer_and_checkpoints(tmp_path_factory, tiny_tokenizer_dir, name, sources):
    base = copy_workspace(tiny_tokenizer_dir, tmp_path_factory.mktemp(name) / "base")
    save_tiny_chat_checkpoints(base, sources=sources)
    return base


@pytest.fixture(scope="session")
def tiny_chat_template_dir(tmp_path_factory, tiny_tokenizer_dir):
    """Tokenizer plus mid and sft checkpoints d2 (copy it per test with `chat_base_dir`)."""
    return tokenizer_and_checkpoints(tmp_path_factory, tiny_tokenizer_dir, "chatbase", ("mid", "sft"))


@pytest.fixture
def chat_base_dir(tmp_path, tiny_chat_template_dir):
    """A new NANOCHAT_BASE_DIR with the tiny tokenizer and tiny mid/sft checkpoints in it."""
    return copy_workspace(tiny_chat_template_dir, tmp_path / "chatbase")


@pytest.fixture(scope="session")
def tiny_base_checkpoint_dir(tmp_path_factory, tiny_tokenizer_dir):
    """A base dir with the tiny tokenizer and a tiny freshly initialised base model in base_checkpoints/d2
    (step 3, see save_tiny_chat_checkpoints). Copy it per test with `fresh_model_base_dir`."""
    return tokenizer_and_checkpoints(tmp_path_factory, tiny_tokenizer_dir, "modelbase", ("base",))


@pytest.fixture
def fresh_model_base_dir(tmp_path, tiny_base_checkpoint_dir):
    """A new NANOCHAT_BASE_DIR holding the tiny tokenizer and the tiny base checkpoint."""
    return copy_workspace(tiny_base_checkpoint_dir, tmp_path / "base")


# -----------------------------------------------------------------------------
# `gpu` tests: device-parametrized, so a CPU runs their bodies on every commit

# The kernels only a CUDA GPU has. A `gpu` test may skip as a whole on a CPU only when it needs one of them
# (pytest_runtest_makereport turns any other such skip into a failure); below that, skip just the statements.
CUDA_ONLY_KERNELS = ("FA3", "_scaled_mm", "Triton")


def cuda_available():
    import torch
    return torch.cuda.is_available()


def pytest_generate_tests(metafunc):
    if "device" in metafunc.fixturenames:
        metafunc.parametrize("device", ["cuda" if cuda_available() else "cpu"], indirect=True)


@pytest.fixture
def device(request):
    """A `gpu` test's device: "cuda" where there is one, else "cpu" running the CUDA code path: the stock ops a GPU
    runs (cpu_kernels(False) turns off the CPU-only fused autograd paths), the same functions; the test builds its
    model in bf16, the GPU's compute dtype."""
    from nanochat.cpu_ops import cpu_kernels
    with cpu_kernels(False):
        yield request.param


def skip_cuda_only(kernel, detail=""):
    """Skip a whole `gpu` test instance on a CPU because it needs `kernel` (one of CUDA_ONLY_KERNELS)."""
    assert kernel in CUDA_ONLY_KERNELS, kernel
    pytest.skip(f"needs the CUDA-only kernel {kernel}{': ' + detail if detail else ''}")


def gpu_skip_reason_ok(reason):
    return any(kernel in reason for kernel in CUDA_ONLY_KERNELS)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A `gpu` test must take the `device` fixture, and on a machine without CUDA one skipped as a whole without
    naming the CUDA-only kernel it needs fails: either would let its body go unrun on every commit."""
    outcome = yield
    report = outcome.get_result()
    if item.get_closest_marker("gpu") is None:
        return
    if call.when == "setup" and "device" not in getattr(item, "fixturenames", ()):
        report.outcome = "failed"
        report.longrepr = f"{item.nodeid}: a gpu test must be device-parametrized (take the `device` fixture)"
    elif report.skipped and not cuda_available():
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if not gpu_skip_reason_ok(reason):
            report.outcome = "failed"
            report.longrepr = (f"{item.nodeid}: a gpu test skipped on a CPU without naming the CUDA-only kernel it "
                               f"needs (one of {', '.join(CUDA_ONLY_KERNELS)}); run its body through the CUDA code "
                               f"path on the CPU instead (the `device` fixture). Skip reason: {reason}")
