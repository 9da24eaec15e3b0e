"""
scripts/export.py and nanochat/hf_export.py: a tiny checkpoint (sliding windows active, GQA, bf16 embeddings as a
GPU run stores them) is exported by the script, then loaded by transformers in a fresh process that never
imports this repository. Its logits, greedy generations, token ids and chat-template ids are compared with
our GPT, Engine and tokenizer; the round trip (--source=hf:DIR) gives our model back.
"""

import json
import os
import random
import subprocess
import sys

import pytest

pytest.importorskip("transformers", reason="the export extra is not installed: pip install -e '.[export]'")
pytest.importorskip("safetensors", reason="the export extra is not installed: pip install -e '.[export]'")

import torch
from safetensors.torch import load_file

from conftest import run_module
from nanochat.checkpoint_manager import SOURCE_DIRS, config_to_dict, save_checkpoint, tokenizer_info, tokenizer_fingerprint
from nanochat.model_loader import load_model
from nanochat.engine import Engine
from nanochat.gpt import GPT, GPTConfig
from nanochat.hf_export import bpe_merges, bytes_to_unicode, model_card, report_summary
from nanochat.tokenizer import RustBPETokenizer, SPECIAL_TOKENS

SEQ_LEN, SHORT_WINDOW = 64, 8


def varied_texts(n, seed):
    """Unicode, numbers, code, whitespace runs and special-token strings, mixed at random."""
    rng = random.Random(seed)
    pieces = ["Hello world", "héllo wörld", "naïve café", "日本語のテキスト", "中文字符", "한국어", "Ελληνικά", "русский текст",
              "עברית", "العربية", "emoji 😀🎉👍🏽", "e\u0301 combining", "ﬁ ligature", "3.14159", "-42", "1234567890",
              "12,345.67", "0x1F", "1e-9", "2024-01-31", "def f(x):\n    return x ** 2\n", "for (int i = 0; i < n; i++) {",
              "if x != y and not z:", "print('a', \"b\")", "{\"k\": [1, 2]}", "a+=b;", "   ", "\t\t", "\n\n\n", "\r\n",
              " \u00a0 ", "\u3000", "\u2028", "  x  ", "I'm", "you'LL", "they've", "DON'T", "<|bos|>", "<|assistant_end|>",
              "<|user_start|>hi<|user_end|>", "<|python_start|>1+1<|python_end|>", "<|", "|>", "#### 42", "$$$", "...",
              "---", "https://example.com/a?b=c", "user@mail.org", "ÀÉÎÕÜ", "ß", "\x00\x01", "~!@#%^&*()"]
    texts = []
    for _ in range(n):
        k = rng.randint(1, 6)
        sep = [" ", "", "\n", "  ", "\t", ". "]
        texts.append("".join(rng.choice(pieces) + rng.choice(sep) for _ in range(k)))
    return texts


def make_tokenizer():
    rng = random.Random(0)
    corpus = [" ".join(varied_texts(1, i)[0] for _ in range(3)) + f" The quick brown fox {rng.randint(0, 999)}"
              for i in range(400)]
    return RustBPETokenizer.train_from_iterator(iter(corpus), vocab_size=256 + len(SPECIAL_TOKENS) + 200)


def random_model(tokenizer, seed=0):
    """A tiny GPT whose every parameter is random (a fresh init zeroes c_proj and the scalars)."""
    config = GPTConfig(sequence_len=SEQ_LEN, vocab_size=tokenizer.get_vocab_size(), n_layer=3, n_head=4, n_kv_head=2,
                       n_embd=64, window_pattern="SL", short_window=SHORT_WINDOW)
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device="cpu")
    model.init_weights()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                std = 1.0 if "wte" in name or "value_embeds" in name else 1.5 / p.size(1) ** 0.5
                p.copy_(torch.randn_like(p) * std)
            else:
                p.add_(torch.randn_like(p) * 0.3)
    return model.eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(our model, tokenizer, checkpoint state, export dir, base dir): the script exported a saved checkpoint."""
    base = str(tmp_path_factory.mktemp("exportbase"))
    tok = make_tokenizer()
    tok.save(os.path.join(base, "tokenizer"))
    model = random_model(tok)
    # a GPU run stores embeddings in bf16: keep that in the checkpoint, the export must too
    state = {k: (v.to(torch.bfloat16) if "wte" in k or "value_embeds" in k else v) for k, v in model.state_dict().items()}
    meta = {"step": 7, "model_config": config_to_dict(model.config), "tokenizer": tokenizer_info(tok),
            "user_config": {"num_iterations": 7}}
    save_checkpoint(os.path.join(base, SOURCE_DIRS["sft"], "d3"), 7, state, None, meta)
    with torch.no_grad():  # our model, as the checkpoint holds it
        model.load_state_dict({k: v.float() for k, v in state.items()})
    out = os.path.join(base, "hf_export")
    proc = run_module("scripts.export", ["--source=sft", f"--out={out}"], base, base)
    assert "no report card" in proc.stdout
    return model, tok, state, out, base


def test_export_directory(exported):
    model, tok, _, out, _ = exported
    files = set(os.listdir(out))
    assert {"model.safetensors", "config.json", "modeling_nanochat.py", "tokenizer.json", "generation_config.json",
            "README.md"} <= files
    assert not any(f.endswith((".bin", ".pt", ".pkl", ".pth")) for f in files)  # no pickle anywhere
    with open(os.path.join(out, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_nanochat.NanoChatForCausalLM"
    assert cfg["window_sizes"] == [SHORT_WINDOW, SEQ_LEN, SEQ_LEN]  # "SL" pattern, the last layer full
    with open(os.path.join(out, "generation_config.json")) as f:
        gen = json.load(f)
    assert gen["eos_token_id"] == [tok.encode_special("<|assistant_end|>"), tok.get_bos_token_id()]
    with open(os.path.join(out, "README.md")) as f:
        card = f.read()
    assert "No report card" in card and "license: mit" in card and "FineWeb-Edu" in card and "num_iterations" in card


def test_safetensors_bitwise_equal_to_checkpoint(exported):
    _, _, state, out, _ = exported
    loaded = load_file(os.path.join(out, "model.safetensors"))
    assert set(loaded) == set(state)
    for k, v in state.items():
        assert loaded[k].dtype == v.dtype, k  # the checkpoint's dtype (bf16 embeddings stay bf16)
        assert torch.equal(loaded[k], v), k


def test_model_card_carries_report_summary(tmp_path, exported):
    model = exported[0]
    report = tmp_path / "report.md"
    report.write_text("# nanochat report\n\n## Base model training\nstuff\n\n## Summary\n\n"
                      "| Metric | BASE | SFT |\n|---|---|---|\n| CORE | 0.2219 | - |\n\nTotal wall clock time: 3h51m\n")
    summary = report_summary(str(report))
    assert summary.startswith("## Summary") and "| CORE | 0.2219 | - |" in summary and "stuff" not in summary
    card = model_card(model, {"step": 7}, "me/nanochat", summary, "mit")
    assert "| CORE | 0.2219 | - |" in card and "No report card" not in card
    assert report_summary(str(tmp_path / "missing.md")) is None


def test_bpe_merges_hand_example():
    ranks = {bytes([i]): i for i in range(256)}
    ranks.update({b"ab": 256, b"abc": 257, b"bc": 258, b"abab": 259})
    # every split of a token into two tokens, in the order of the merged token's rank, then of the parts' ranks
    assert bpe_merges(ranks) == [(b"a", b"b"), (b"a", b"bc"), (b"ab", b"c"), (b"b", b"c"), (b"ab", b"ab")]
    table = bytes_to_unicode()
    assert len(set(table.values())) == 256 and table[ord("A")] == "A" and table[ord(" ")] == "\u0120"


# A fresh interpreter with transformers alone: no repo on sys.path, offline.
FRESH_SCRIPT = r"""
import json, sys
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer
d, io = sys.argv[1], sys.argv[2]
with open(io + "/inputs.json") as f:
    inputs = json.load(f)
model = AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True, dtype=torch.float32)
tok = AutoTokenizer.from_pretrained(d)
out = {}
logits = {}
with torch.no_grad():
    for i, p in enumerate(inputs["prompts"]):
        logits[f"p{i}"] = model(torch.tensor([p])).logits[0].contiguous()
    g = model.generate(torch.tensor([inputs["gen_prompt"]]), max_new_tokens=32, do_sample=False)
out["generated"] = g[0, len(inputs["gen_prompt"]):].tolist()
out["plain_ids"] = [tok.encode(t, split_special_tokens=True) for t in inputs["texts"]]
out["default_ids"] = [tok.encode(t) for t in inputs["texts"]]
out["decoded"] = [tok.decode(ids) for ids in out["plain_ids"]]
def ids(x):
    return x["input_ids"] if not isinstance(x, list) else x
out["completion_ids"] = [ids(tok.apply_chat_template(m, add_generation_prompt=True, tokenize=True))
                         for m in inputs["completion_convs"]]
out["full_ids"] = [ids(tok.apply_chat_template(m, tokenize=True)) for m in inputs["full_convs"]]
out["nanochat_imported"] = sorted(m for m in sys.modules if m == "nanochat" or m.startswith(("nanochat.", "scripts.")))
save_file(logits, io + "/logits.safetensors")
with open(io + "/outputs.json", "w") as f:
    json.dump(out, f)
"""

CONVERSATIONS = [
    [{"role": "user", "content": "hi fox"}, {"role": "assistant", "content": "hello there"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "  and 3+3? 日本 😀\n"},
     {"role": "assistant", "content": "6."}],
    [{"role": "user", "content": "Compute 12*3 please"},
     {"role": "assistant", "content": [{"type": "text", "text": "Let me compute. "},
                                       {"type": "python", "text": "12*3"},
                                       {"type": "python_output", "text": "36"},
                                       {"type": "text", "text": " So it is 36."}]}],
]


@pytest.fixture(scope="module")
def fresh(exported, tmp_path_factory):
    """Run FRESH_SCRIPT on the export; returns (inputs, outputs, logits)."""
    model, tok, _, out, _ = exported
    io = str(tmp_path_factory.mktemp("fresh"))
    g = torch.Generator().manual_seed(1)
    V = tok.get_vocab_size()
    prompts = [torch.randint(0, V, (n,), generator=g).tolist() for n in (1, 9, 24, 40, SEQ_LEN)]  # > window 8
    gen_prompt = tok.render_for_completion({"messages": CONVERSATIONS[1]})
    texts = varied_texts(300, seed=123)
    inputs = {"prompts": prompts, "gen_prompt": gen_prompt, "texts": texts,
              "completion_convs": [c[:-1] for c in CONVERSATIONS], "full_convs": CONVERSATIONS}
    with open(os.path.join(io, "inputs.json"), "w") as f:
        json.dump(inputs, f)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=os.path.join(io, "hf_home"), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", FRESH_SCRIPT, out, io], cwd=io, env=env, stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:]
    with open(os.path.join(io, "outputs.json")) as f:
        outputs = json.load(f)
    return inputs, outputs, load_file(os.path.join(io, "logits.safetensors"))


def test_fresh_process_never_imports_this_repo(fresh):
    assert fresh[1]["nanochat_imported"] == []


def test_logits_equal_ours(exported, fresh):
    model = exported[0]
    inputs, _, logits = fresh
    for i, p in enumerate(inputs["prompts"]):
        with torch.no_grad():
            ours = model(torch.tensor([p]))[0]
        assert ours.shape == logits[f"p{i}"].shape
        torch.testing.assert_close(logits[f"p{i}"], ours, rtol=0, atol=1e-5)


def test_greedy_generate_equals_engine(exported, fresh):
    model, tok = exported[0], exported[1]
    inputs, outputs, _ = fresh
    results, masks = Engine(model, tok).generate_batch(inputs["gen_prompt"], max_tokens=32, temperature=0.0)
    reply = results[0][len(inputs["gen_prompt"]):]
    assert all(masks[0][len(inputs["gen_prompt"]):]), "test setup: the calculator tool fired, pick another seed"
    assert len(set(reply)) > 3, "test setup: a degenerate reply compares too little"
    assert len(inputs["gen_prompt"]) + len(reply) > SHORT_WINDOW * 4  # decode runs past the sliding window
    # the Engine drops its terminal stop token; transformers keeps it
    stops = {tok.encode_special("<|assistant_end|>"), tok.get_bos_token_id()}
    generated = outputs["generated"]
    if generated and generated[-1] in stops and len(generated) < 32:
        generated = generated[:-1]
    assert generated == reply


def test_tokenizer_ids_equal_ours(exported, fresh):
    tok = exported[1]
    inputs, outputs, _ = fresh
    texts = inputs["texts"]
    assert sum(any(s in t for s in SPECIAL_TOKENS) for t in texts) > 20  # special strings as plain text are covered
    for text, plain, default in zip(texts, outputs["plain_ids"], outputs["default_ids"]):
        ours = tok.encode(text)
        assert plain == ours, text
        if not any(s in text for s in SPECIAL_TOKENS):
            assert default == ours, text  # transformers' default call agrees wherever no special string appears
    assert outputs["decoded"] == texts


def test_chat_template_equals_render(exported, fresh):
    tok = exported[1]
    _, outputs, _ = fresh
    for conv, ids in zip(CONVERSATIONS, outputs["completion_ids"]):
        assert ids == tok.render_for_completion({"messages": conv})
    for conv, ids in zip(CONVERSATIONS, outputs["full_ids"]):
        assert ids == tok.render_conversation({"messages": conv})[0]


@pytest.fixture(scope="module")
def in_process(exported):
    """The export loaded by transformers in this process: (model, tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    out = exported[3]
    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
    return hf, AutoTokenizer.from_pretrained(out, trust_remote_code=True)


def test_cached_decode_and_left_padding(exported, in_process):
    """Token-by-token decode with transformers' cache and a left-padded batch give the logits of our full
    forward, past the sliding window."""
    model, hf = exported[0], in_process[0]
    ids = torch.randint(0, model.config.vocab_size, (1, 30), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = model(ids)[0]
        r = hf(ids[:, :5], use_cache=True)
        steps = [r.logits[0]]
        cache = getattr(r, "cache", None) or getattr(r, "past_key_values", None)
        for t in range(5, 30):
            r = hf(ids[:, t:t + 1], cache=cache, use_cache=True)
            steps.append(r.logits[0])
        torch.testing.assert_close(torch.cat(steps), full, rtol=0, atol=1e-5)
        # left padding: row 1 is row 0's last 20 tokens behind 10 pads
        batch = torch.stack([ids[0], torch.cat([torch.zeros(10, dtype=torch.long), ids[0, 10:]])])
        mask = torch.ones_like(batch)
        mask[1, :10] = 0
        padded = hf(batch, attention_mask=mask).logits
        with torch.no_grad():
            short = model(ids[:, 10:])[0]
    torch.testing.assert_close(padded[0], full, rtol=0, atol=1e-5)
    torch.testing.assert_close(padded[1, 10:], short, rtol=0, atol=1e-5)


def test_left_padded_batch_generate_equals_engine(exported, in_process):
    model, tok = exported[0], exported[1]
    hf, hf_tok = in_process
    hf_tok.padding_side = "left"
    convs = [CONVERSATIONS[0][:1], CONVERSATIONS[1][:-1]]  # prompts of different lengths
    batch = hf_tok.apply_chat_template(convs, add_generation_prompt=True, return_tensors="pt", return_dict=True,
                                       padding=True)
    out = hf.generate(**batch, max_new_tokens=20, do_sample=False)
    for row, conv in zip(out, convs):
        prompt = tok.render_for_completion({"messages": conv + [{"role": "assistant", "content": "x"}]})
        results, _ = Engine(model, tok).generate_batch(prompt, max_tokens=20, temperature=0.0)
        reply = results[0][len(prompt):]
        assert row[batch["input_ids"].size(1):].tolist()[:len(reply)] == reply


def test_round_trip_hf_source(exported):
    model, tok, _, out, _ = exported
    model2, tok2, meta = load_model(f"hf:{out}", "cpu", phase="eval")
    assert tokenizer_fingerprint(tok2) == tokenizer_fingerprint(tok)  # same ranks, pattern and specials
    ids = torch.randint(0, model.config.vocab_size, (2, SEQ_LEN), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(model2(ids), model(ids), rtol=0, atol=0)
    assert meta["model_config"] == config_to_dict(model.config)


def test_hf_source_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="scripts.export"):
        load_model(f"hf:{tmp_path}", "cpu", phase="eval")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(ValueError, match="not a nanochat export"):  # CheckpointError is a ValueError
        load_model(f"hf:{tmp_path}", "cpu", phase="eval")


# every corruption of an exported directory: one CheckpointError line naming the file, nothing built before


def edit_config(change):
    def damage(path):
        cfg = json.loads(path.read_text())
        change(cfg)
        path.write_text(json.dumps(cfg))
    return damage


def edit_weights(change):
    def damage(path):
        from safetensors.torch import save_file
        state = load_file(str(path))
        change(state)
        save_file(state, str(path))
    return damage


def replace_with(kind):
    def damage(path):
        path.unlink()
        {"dir": lambda: path.mkdir(), "fifo": lambda: os.mkfifo(path),
         "/dev/zero": lambda: path.symlink_to("/dev/zero")}[kind]()
    return damage


def header_only(path):
    data = path.read_bytes()
    path.write_bytes(data[:8 + int.from_bytes(data[:8], "little")])  # length prefix + JSON header, no tensors


def nan_everywhere(state):
    for v in state.values():
        v.fill_(float("nan"))


@pytest.mark.parametrize("name,damage,expect", [
    ("model.safetensors", lambda p: p.write_bytes(p.read_bytes()[:len(p.read_bytes()) // 2]), "cannot be read"),
    ("model.safetensors", header_only, "cannot be read"),
    ("model.safetensors", replace_with("dir"), "is a directory, not a regular file"),
    ("model.safetensors", replace_with("fifo"), "is a named pipe"),
    ("model.safetensors", edit_weights(nan_everywhere), r"tensor .* holds \d+ NaN/inf"),
    ("model.safetensors", edit_weights(lambda s: s.update({"lm_head.weight": s["lm_head.weight"].long()})),
     "tensor lm_head.weight is int64, expected a floating-point dtype"),
    ("config.json", edit_config(lambda c: c.update(vocab_size=c["vocab_size"] + 1)), "vocab_size=.* but nanochat_config"),
    ("config.json", edit_config(lambda c: c["nanochat_config"].update(vocab_size=1000)),
     "vocab_size=465 but nanochat_config.vocab_size=1000"),
    ("config.json", edit_config(lambda c: [c.update(vocab_size=1000), c["nanochat_config"].update(vocab_size=1000)]),
     "vocab_size=1000 but .*tokenizer.json has 465 tokens"),
    ("config.json", lambda p: p.write_bytes(b""), "is not valid JSON"),
    ("config.json", edit_config(lambda c: c["nanochat_config"].update(n_layer="3")), "n_layer is '3', expected type int"),
    ("config.json", edit_config(lambda c: c["nanochat_config"].update(sequence_len=10**12)),
     r"sequence_len=1000000000000 is outside 1\.\.1048576"),
    ("config.json", edit_config(lambda c: c["nanochat_config"].update(n_layer=10**9)), "n_layer=1000000000 is outside"),
    ("config.json", replace_with("/dev/zero"), "is a character device, not a regular file"),
    ("tokenizer.json", lambda p: p.write_bytes(p.read_bytes()[:1000]), "is not valid JSON"),
    ("tokenizer.json", edit_config(lambda c: c["model"].update(vocab={"a": 0})), "every byte must be a token"),
])
def test_damaged_export_is_one_line_naming_the_file(exported, tmp_path, name, damage, expect):
    import shutil
    import time
    from nanochat.files import InputFileError  # CheckpointError's base: the one-line kind
    out = tmp_path / "export"
    shutil.copytree(exported[3], out)
    damage(out / name)
    t0 = time.time()
    with pytest.raises(InputFileError, match=expect) as e:
        load_model(f"hf:{out}", "cpu", phase="eval")
    assert str(e.value).startswith(str(out / name)) and "\n" not in str(e.value), str(e.value)
    assert time.time() - t0 < 30


@pytest.mark.slow
def test_chat_cli_with_hf_source(exported):
    model, tok, _, out, base = exported
    proc = run_module("scripts.chat_cli", [f"--source=hf:{out}", "-p", "hi fox", "-t", "0", "-m", "8"], base, base)
    prompt = tok.render_for_completion({"messages": [{"role": "user", "content": "hi fox"},
                                                     {"role": "assistant", "content": "x"}]})
    results, _ = Engine(model, tok).generate_batch(prompt, max_tokens=8, temperature=0.0)
    assert tok.decode(results[0][len(prompt):]).strip() in proc.stdout
