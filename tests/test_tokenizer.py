"""Tokenizer tests: a tiny BPE trained in-process on generated text; rendering checked segment by segment."""

import os
import sys
import json
import random
import subprocess

import pytest
import torch

from conftest import TOOL_CALL_REPLY
from nanochat.files import CheckpointError
from nanochat.files import InputFileError
from nanochat.tokenizer import (SPECIAL_TOKENS, RustBPETokenizer, compute_token_bytes, get_token_bytes,
                                get_tokenizer, validate_conversation)

VOCAB = 256 + len(SPECIAL_TOKENS) + 40
WORDS = ("the cat sat on mat and a dog ran to park while children played with ball in sun "
         "then everyone went home for dinner tea time is good").split()


def make_corpus(n_docs=200, seed=0):
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        words = [rng.choice(WORDS) for _ in range(rng.randint(10, 40))]
        docs.append(" ".join(words).capitalize() + f". Call 555-{rng.randint(1000, 9999)} now!\n")
    return docs


@pytest.fixture(scope="module")
def tok():
    return RustBPETokenizer.train_from_iterator(iter(make_corpus()), VOCAB)


def sp(tok, name):
    return tok.encode_special(name)

# -----------------------------------------------------------------------------
# Training and basic encoding


def test_vocab_size_and_special_ids(tok):
    assert tok.get_vocab_size() == VOCAB
    # specials take the last 9 ids, in SPECIAL_TOKENS order
    assert [tok.encode_special(s) for s in SPECIAL_TOKENS] == list(range(VOCAB - 9, VOCAB))
    assert tok.get_bos_token_id() == VOCAB - 9
    assert tok.get_special_tokens() == set(SPECIAL_TOKENS)
    # merges were learned: a frequent word is one token, shorter than its bytes
    assert len(tok.encode(" the")) == 1


def test_train_errors():
    with pytest.raises(ValueError, match="at least 265"):
        RustBPETokenizer.train_from_iterator(iter(["abc"]), 264)
    with pytest.raises(ValueError, match="too small"):
        RustBPETokenizer.train_from_iterator(iter(["ab ab"]), 300)


@pytest.mark.parametrize("text", [
    "", "hello world", "  leading and trailing spaces  \n\n", "Numbers 1234567 and 3.14159",
    "Unicode: 你好世界 안녕하세요 Привет ñandú", "Emoji 🌍🚀👩‍👩‍👧 mixed", "tabs\tand\r\nCRLF", "\x00\x7f control",
])
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert all(0 <= i < VOCAB - 9 for i in ids)
    assert tok.decode(ids) == text


def test_special_strings_in_text_are_plain(tok):
    text = "a <|bos|> b <|assistant_end|>"
    ids = tok.encode(text)
    specials = {tok.encode_special(s) for s in SPECIAL_TOKENS}
    assert not specials & set(ids)
    assert tok.decode(ids) == text
    assert len(tok.encode("<|bos|>")) > 1


def test_encode_special_unknown(tok):
    with pytest.raises(ValueError, match="not a special token"):
        tok.encode_special("<|endoftext|>")


def test_prepend_append(tok):
    bos, end = sp(tok, "<|bos|>"), sp(tok, "<|assistant_end|>")
    base = tok.encode("the cat")
    assert tok.encode("the cat", prepend="<|bos|>") == [bos] + base
    assert tok.encode("the cat", prepend=bos, append="<|assistant_end|>") == [bos] + base + [end]
    assert tok.encode("the cat", append=end) == base + [end]


def test_batch_equals_single(tok):
    texts = make_corpus(50, seed=1) + ["", "ünïcödé 🌍"]
    assert tok.encode(texts, num_threads=4) == [tok.encode(t) for t in texts]
    assert tok.encode(texts, prepend="<|bos|>") == [[tok.get_bos_token_id()] + tok.encode(t) for t in texts]
    with pytest.raises(TypeError):
        tok.encode(42)

# -----------------------------------------------------------------------------
# Rendering: expected (ids, mask) built segment by segment from the rule of render_conversation's docstring


def build(*segments):
    """segments: (list of ids, mask value) -> (ids, mask)"""
    ids, mask = [], []
    for seg_ids, m in segments:
        ids += seg_ids
        mask += [m] * len(seg_ids)
    return ids, mask


def test_render_string_content(tok):
    conv = {"messages": [{"role": "user", "content": "Hello there"},
                         {"role": "assistant", "content": "Hi, the cat sat."}]}
    expected = build(([sp(tok, "<|bos|>")], 0), ([sp(tok, "<|user_start|>")], 0), (tok.encode("Hello there"), 0),
                     ([sp(tok, "<|user_end|>")], 0), ([sp(tok, "<|assistant_start|>")], 0),
                     (tok.encode("Hi, the cat sat."), 1), ([sp(tok, "<|assistant_end|>")], 1))
    assert tok.render_conversation(conv) == expected


def test_render_multi_turn(tok):
    turns = ["u one", "a one", "u two", "a two", "u three"]  # may end on a user turn
    conv = {"messages": [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]}
    us, ue, as_, ae = (sp(tok, s) for s in ("<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>"))
    expected = build(([sp(tok, "<|bos|>")], 0),
                     ([us], 0), (tok.encode("u one"), 0), ([ue], 0), ([as_], 0), (tok.encode("a one"), 1), ([ae], 1),
                     ([us], 0), (tok.encode("u two"), 0), ([ue], 0), ([as_], 0), (tok.encode("a two"), 1), ([ae], 1),
                     ([us], 0), (tok.encode("u three"), 0), ([ue], 0))
    assert tok.render_conversation(conv) == expected


def test_render_system_message_merged(tok):
    conv = {"messages": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "hi"},
                         {"role": "assistant", "content": "yo"}]}
    merged = {"messages": [{"role": "user", "content": "Be terse.\n\nhi"}, {"role": "assistant", "content": "yo"}]}
    assert tok.render_conversation(conv) == tok.render_conversation(merged)
    assert conv["messages"][1]["content"] == "hi"  # the caller's conversation is not modified


def test_render_parts(tok):
    conv = {"messages": [{"role": "user", "content": "What is 6*7?"}, TOOL_CALL_REPLY]}
    expected = build(([sp(tok, "<|bos|>")], 0), ([sp(tok, "<|user_start|>")], 0), (tok.encode("What is 6*7?"), 0),
                     ([sp(tok, "<|user_end|>")], 0), ([sp(tok, "<|assistant_start|>")], 0),
                     (tok.encode("Let me compute. "), 1),
                     ([sp(tok, "<|python_start|>")], 1), (tok.encode("6*7"), 1), ([sp(tok, "<|python_end|>")], 1),
                     ([sp(tok, "<|output_start|>")], 0), (tok.encode("42"), 0), ([sp(tok, "<|output_end|>")], 0),
                     (tok.encode("It is 42."), 1), ([sp(tok, "<|assistant_end|>")], 1))
    assert tok.render_conversation(conv) == expected


def test_render_truncation(tok):
    conv = {"messages": [{"role": "user", "content": "the cat sat on the mat " * 5},
                         {"role": "assistant", "content": "and the dog ran " * 5}]}
    full_ids, full_mask = tok.render_conversation(conv, max_tokens=10_000)
    assert len(full_ids) > 12
    ids, mask = tok.render_conversation(conv, max_tokens=12)
    assert (ids, mask) == (full_ids[:12], full_mask[:12])
    assert ids[-1] != sp(tok, "<|assistant_end|>")  # nothing re-appended after the cut


def test_render_for_completion(tok):
    conv = {"messages": [{"role": "system", "content": "sys"}, {"role": "user", "content": "q one"},
                         {"role": "assistant", "content": "a one"}, {"role": "user", "content": "q two"},
                         {"role": "assistant", "content": [{"type": "text", "text": "answer"}]}]}
    expected = build(([sp(tok, "<|bos|>")], 0), ([sp(tok, "<|user_start|>")], 0), (tok.encode("sys\n\nq one"), 0),
                     ([sp(tok, "<|user_end|>")], 0), ([sp(tok, "<|assistant_start|>")], 0), (tok.encode("a one"), 1),
                     ([sp(tok, "<|assistant_end|>")], 1), ([sp(tok, "<|user_start|>")], 0),
                     (tok.encode("q two"), 0), ([sp(tok, "<|user_end|>")], 0))[0] + [sp(tok, "<|assistant_start|>")]
    assert tok.render_for_completion(conv) == expected
    assert len(conv["messages"]) == 5
    with pytest.raises(ValueError, match="last message must be an assistant"):
        tok.render_for_completion({"messages": [{"role": "user", "content": "hi"}]})


U = {"role": "user", "content": "hi"}
A = {"role": "assistant", "content": "yo"}


@pytest.mark.parametrize("messages, match", [
    ([], "empty"),
    ([{"role": "robot", "content": "x"}], r"message 0: unknown role 'robot'"),
    ([U, A, {"role": "tool", "content": "x"}], r"message 2: unknown role"),
    ([A], r"message 0: roles out of order, expected 'user'"),
    ([U, U], r"message 1: roles out of order, expected 'assistant'"),
    ([{"role": "system", "content": "s"}, A], r"message 1: roles out of order"),
    ([U, A, {"role": "system", "content": "s"}], r"message 2: a system message is only allowed as the first"),
    ([{"role": "system", "content": "s"}], r"message 0: a system message must be followed"),
    ([U, {"role": "assistant"}], r"message 1 \(assistant\): missing 'content'"),
    ([{"role": "user", "content": ""}], r"message 0 \(user\): empty content"),
    ([U, {"role": "assistant", "content": ""}], r"message 1 \(assistant\): empty content"),
    ([U, {"role": "assistant", "content": []}], r"message 1 \(assistant\): empty content"),
    ([{"role": "user", "content": ["hi"]}], r"message 0 \(user\): content must be a string"),
    ([{"role": "system", "content": 3}, U], r"message 0 \(system\): content must be a string"),
    ([U, {"role": "assistant", "content": 7}], r"message 1 \(assistant\): content must be a string or a list"),
    ([U, A, U, {"role": "assistant", "content": [{"type": "image", "text": "x"}]}],
     r"message 3 \(assistant\): part 0 has unknown type 'image'"),
    ([U, {"role": "assistant", "content": [{"type": "text", "text": "a"}, {"type": "python"}]}],
     r"message 1 \(assistant\): part 1 \(python\) needs a string 'text'"),
    (["hi"], r"message 0: must be a dict"),
])
def test_render_validation_errors(tok, messages, match):
    with pytest.raises(ValueError, match=match):
        validate_conversation({"messages": messages})
    with pytest.raises(ValueError, match=match):  # the renderer applies the same check
        tok.render_conversation({"messages": messages})


def test_render_needs_messages_dict(tok):
    with pytest.raises(ValueError, match="'messages' list"):
        tok.render_conversation([U, A])


def test_visualize(tok):
    ids, mask = tok.render_conversation({"messages": [U, A]})
    plain = tok.visualize_tokenization(ids, mask, color=False)
    assert plain.startswith("<|bos|>|<|user_start|>") and "[[<|assistant_end|>]]" in plain
    assert "\033[" in tok.visualize_tokenization(ids, mask)

# -----------------------------------------------------------------------------
# Persistence and token_bytes


def test_save_load(tok, tmp_path):
    tok.save(str(tmp_path))
    loaded = RustBPETokenizer.from_directory(str(tmp_path))
    texts = make_corpus(20, seed=2) + ["<|bos|> 🌍 ünïcödé 12345"]
    assert loaded.encode(texts) == tok.encode(texts)
    assert loaded.get_vocab_size() == VOCAB
    assert [loaded.encode_special(s) for s in SPECIAL_TOKENS] == [tok.encode_special(s) for s in SPECIAL_TOKENS]
    conv = {"messages": [U, A]}
    assert loaded.render_conversation(conv) == tok.render_conversation(conv)
    # no pickle: every file is UTF-8 text (pickles start with b"\x80"), and the config is JSON
    for name in os.listdir(tmp_path):
        data = (tmp_path / name).read_bytes()
        assert not name.endswith((".pkl", ".pickle")) and not data.startswith(b"\x80")
        data.decode("utf-8")
    config = json.loads((tmp_path / "tokenizer.json").read_text())
    assert config["special_tokens"]["<|bos|>"] == VOCAB - 9


def truncate(path, at_line=False):
    data = path.read_bytes()
    cut = len(data) // 2
    path.write_bytes(data[:data.rindex(b"\n", 0, cut) + 1] if at_line else data[:cut])


def edit_json(path, change):
    config = json.loads(path.read_text())
    change(config)
    path.write_text(json.dumps(config))


def other_size_ranks(path):
    RustBPETokenizer.train_from_iterator(iter(make_corpus()), VOCAB + 20).save(str(path.parent / "other"))
    path.write_bytes((path.parent / "other" / path.name).read_bytes())


@pytest.mark.parametrize("name,damage,expect", [
    ("tokenizer.json", truncate, "not valid JSON"),
    ("tokenizer.json", lambda p: p.write_bytes(bytes(p.stat().st_size)), "not valid JSON"),
    ("tokenizer.json", lambda p: edit_json(p, lambda c: c.update(pattern="(unclosed")), "cannot build the encoding"),
    ("tokenizer.json", lambda p: edit_json(p, lambda c: c.update(special_tokens=["<|bos|>"])),
     "'special_tokens' object of integer ids"),
    ("tokenizer.json", lambda p: edit_json(p, lambda c: c["special_tokens"].pop("<|user_end|>")),
     "do not follow the 296 ranks"),
    ("mergeable_ranks.tiktoken", truncate, r"mergeable_ranks.tiktoken:\d+: expected '<base64> <rank>'"),
    ("mergeable_ranks.tiktoken", lambda p: truncate(p, at_line=True), "every single byte must be a token"),
    ("mergeable_ranks.tiktoken", lambda p: p.write_bytes(bytes(p.stat().st_size)), r"tiktoken:1: expected"),
    ("mergeable_ranks.tiktoken", lambda p: p.write_text(p.read_text().replace(" 7\n", " 8\n")),
     "ranks must be unique"),
    ("mergeable_ranks.tiktoken", lambda p: p.write_text("not-base64!! 5\n" + p.read_text()), r"tiktoken:1: expected"),
    ("mergeable_ranks.tiktoken", other_size_ranks, "do not follow the 316 ranks"),
])
def test_damaged_tokenizer_is_one_line_naming_the_file(tok, tmp_path, name, damage, expect):
    tok.save(str(tmp_path))
    damage(tmp_path / name)
    with pytest.raises(CheckpointError, match=expect) as e:
        RustBPETokenizer.from_directory(str(tmp_path))
    msg = str(e.value)
    assert "\n" not in msg and "retrain the tokenizer with python -m scripts.tok_train" in msg
    assert msg.startswith(str(tmp_path / "tokenizer.json")) or msg.startswith(str(tmp_path / "mergeable_ranks"))


@pytest.mark.parametrize("damage,expect", [
    (lambda p: truncate(p), "truncated or corrupt"),
    (lambda p: p.write_bytes(bytes(p.stat().st_size)), "truncated or corrupt"),
    (lambda p: torch.save(torch.zeros(3, 4, dtype=torch.int32), p), "not a 1-D integer tensor"),
])
def test_damaged_token_bytes_names_the_file(tok, tmp_path, monkeypatch, damage, expect):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    path = tmp_path / "tokenizer" / "token_bytes.pt"
    path.parent.mkdir()
    torch.save(compute_token_bytes(tok), path)
    damage(path)
    with pytest.raises(CheckpointError, match=expect) as e:
        get_token_bytes()
    assert str(e.value).startswith(str(path)) and "scripts.tok_train" in str(e.value)


@pytest.mark.parametrize("kind,expect", [("/dev/zero", "is a character device"), ("fifo", "is a named pipe"),
                                         ("dir", "is a directory")])
@pytest.mark.parametrize("name", ["tokenizer.json", "mergeable_ranks.tiktoken", "token_bytes.pt"])
def test_special_file_in_place_of_a_tokenizer_file(tok, tmp_path, monkeypatch, name, kind, expect):
    """Refused at once (a symlink to /dev/zero used to read until MemoryError, a FIFO blocked forever)."""
    import time
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    path = tmp_path / "tokenizer" / name
    tok.save(str(path.parent))
    torch.save(compute_token_bytes(tok), path.parent / "token_bytes.pt")
    path.unlink()
    {"/dev/zero": lambda: path.symlink_to("/dev/zero"), "fifo": lambda: os.mkfifo(path), "dir": path.mkdir}[kind]()
    t0 = time.time()
    with pytest.raises(InputFileError, match=expect) as e:
        get_token_bytes() if name == "token_bytes.pt" else RustBPETokenizer.from_directory(str(path.parent))
    assert str(e.value).startswith(f"{path} {expect}") and "\n" not in str(e.value) and time.time() - t0 < 5


def test_token_bytes_of_another_vocabulary_is_refused(tok, tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    tok.save(str(tmp_path / "tokenizer"))
    torch.save(compute_token_bytes(tok)[:-1], tmp_path / "tokenizer" / "token_bytes.pt")
    with pytest.raises(CheckpointError, match=f"has {tok.get_vocab_size() - 1} entries but the tokenizer has "
                                              f"{tok.get_vocab_size()} tokens"):
        get_token_bytes()


def test_get_tokenizer_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="scripts.tok_train"):
        get_tokenizer()
    with pytest.raises(FileNotFoundError, match="scripts.tok_train"):
        get_token_bytes()


def test_token_bytes(tok, tmp_path, monkeypatch):
    tb = compute_token_bytes(tok)
    assert tb.dtype == torch.int32 and tb.shape == (VOCAB,)
    assert tb[VOCAB - 9:].tolist() == [0] * 9  # specials count no bytes
    assert tb[:256].tolist() == [1] * 256  # single bytes, including ones that are not valid UTF-8 alone
    # hand counts: " the" is 4 bytes; a lone continuation byte 0x80 is 1 raw byte (3 if decoded to U+FFFD)
    assert tb[tok.enc.encode_single_token(b" the")] == 4
    assert tb[tok.enc.encode_single_token(b"\x80")] == 1
    # get_token_bytes reads what tok_train saves
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    tok.save(str(tmp_path / "tokenizer"))
    torch.save(tb, tmp_path / "tokenizer" / "token_bytes.pt")
    assert torch.equal(get_token_bytes("cpu"), tb)
    assert get_tokenizer().encode("the cat") == tok.encode("the cat")

# -----------------------------------------------------------------------------
# scripts.tok_train end to end on two tiny parquet shards


@pytest.mark.slow  # a subprocess that imports torch: a few seconds
def test_tok_train_script(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    (tmp_path / "data" / "pretrain").mkdir(parents=True)
    docs = make_corpus(300, seed=3)
    for i, chunk in enumerate((docs[:200], docs[200:])):  # the last shard is validation
        pq.write_table(pa.table({"text": chunk}), tmp_path / "data" / "pretrain" / f"shard_{i:05d}.parquet",
                       row_group_size=50)
    env = dict(os.environ, NANOCHAT_DATA_DIR=str(tmp_path / "data"), NANOCHAT_BASE_DIR=str(tmp_path / "base"),
               RAYON_NUM_THREADS="2")
    max_chars = 5000
    out = subprocess.run([sys.executable, "-m", "scripts.tok_train", f"--vocab-size={VOCAB}",
                          f"--max-chars={max_chars}", "--doc-cap=100"], env=env, capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr
    # the iterator stops after the first cropped doc that pushes the count past max_chars
    cropped = [d[:100] for d in docs[:200]]
    n, total = 0, 0
    while total <= max_chars:
        total += len(cropped[n])
        n += 1
    assert f"Trained on {total:,} chars" in out.stdout
    tok_dir = tmp_path / "base" / "tokenizer"
    loaded = RustBPETokenizer.from_directory(str(tok_dir))
    assert loaded.get_vocab_size() == VOCAB
    tb = torch.load(tok_dir / "token_bytes.pt", weights_only=True)
    assert torch.equal(tb, compute_token_bytes(loaded))
