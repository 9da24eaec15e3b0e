"""
scripts/chat_cli.py: the chat loop with scripted input, a tiny random GPT and a tokenizer trained here.
Replies are checked against Engine.generate run directly on prompts from the tokenizer's renderer.
"""

import pytest

from conftest import make_tiny_chat_model

from nanochat.engine import Engine
from scripts.chat_cli import ReplyPrinter, chat_loop


@pytest.fixture(scope="module")
def tiny():
    return make_tiny_chat_model(128)


def greedy_reply(tok, model, prompt, max_tokens):
    stops = {tok.encode_special("<|assistant_end|>"), tok.get_bos_token_id()}
    out = []
    for column, _ in Engine(model, tok).generate(prompt, max_tokens=max_tokens, temperature=0.0):
        if column[0] in stops:
            break
        out.append(column[0])
    return out


def scripted(lines):
    """An input() stand-in: returns the lines, then raises EOFError like Ctrl-D."""
    it = iter(lines)

    def read(prompt_text):
        try:
            return next(it)
        except StopIteration:
            raise EOFError
    return read


def completion_prompt(tok, messages):
    return tok.render_for_completion({"messages": messages + [{"role": "assistant", "content": ""}]})


def test_multi_turn_with_commands(tiny):
    tok, model = tiny
    out = []
    engine = Engine(model, tok)
    messages = chat_loop(engine, tok, read=scripted(["hi fox", "clear", "", "   ", "lazy dog", "café"]),
                         write=out.append, temperature=0.0, max_tokens=12)
    printed = "".join(out)
    # turn 1 and, after `clear`, a fresh turn 2 start a new conversation; turn 3 continues turn 2's, whose
    # reply is sent back as the text it decoded to
    r1 = greedy_reply(tok, model, completion_prompt(tok, [{"role": "user", "content": "hi fox"}]), 12)
    turn2 = [{"role": "user", "content": "lazy dog"}]
    r2 = greedy_reply(tok, model, completion_prompt(tok, turn2), 12)
    turn3 = turn2 + [{"role": "assistant", "content": tok.decode(r2)}, {"role": "user", "content": "café"}]
    r3 = greedy_reply(tok, model, completion_prompt(tok, turn3), 12)
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    assert [m["content"] for m in messages[::2]] == ["lazy dog", "café"]
    assert ["".join(p["text"] for p in m["content"]) for m in messages[1::2]] == [tok.decode(r2), tok.decode(r3)]
    assert printed.count("Assistant: ") == 3 and "(new conversation)" in printed
    for reply in (r1, r2, r3):
        assert "Assistant: " + tok.decode(reply) + "\n" in printed


def test_one_shot_prompt_and_quit(tiny):
    tok, model = tiny
    out = []
    messages = chat_loop(Engine(model, tok), tok, read=None, write=out.append, prompt="brown fox", temperature=0.0,
                         max_tokens=10)
    reply = greedy_reply(tok, model, completion_prompt(tok, [{"role": "user", "content": "brown fox"}]), 10)
    assert "".join(out) == tok.decode(reply) + "\n"  # just the answer: easy to use from scripts
    assert messages[0] == {"role": "user", "content": "brown fox"} and len(messages) == 2
    for word in ("quit", "EXIT"):
        out = []
        messages = chat_loop(Engine(model, tok), tok, read=scripted([word, "never read"]), write=out.append)
        assert messages == [] and "Assistant" not in "".join(out)


def test_context_full_is_reported(tiny):
    tok, model = tiny
    out = []
    chat_loop(Engine(model, tok), tok, read=scripted(["fox " * 200]), write=out.append, context_len=128)
    assert "fills the model's context" in "".join(out)


def test_tool_calls_and_utf8_render_readably(tiny):
    tok, _ = tiny
    s = tok.encode_special
    byte_tokens = [tok.enc.encode_single_token(bytes([b])) for b in "€ ok".encode("utf-8")]
    tokens = tok.encode("so ") + [s("<|python_start|>")] + tok.encode("12*3") + [s("<|python_end|>"),
             s("<|output_start|>")] + tok.encode("36") + [s("<|output_end|>")] + tok.encode(" then ") + byte_tokens
    pieces = []
    printer = ReplyPrinter(tok, pieces.append)
    for t in tokens:
        printer.add(t)
    printer.flush()
    assert "".join(pieces) == "so [calc: 12*3] = 36 then € ok"
    assert not any("\ufffd" in p for p in pieces)  # the 3-byte € is printed once, whole


def test_streams_through_engine_with_tools(tiny):
    """A scripted engine emitting a tool call: the loop prints it readably, and the next turn's prompt holds the
    call and its output as the same special tokens."""
    tok, _ = tiny
    s = tok.encode_special
    reply = [s("<|python_start|>")] + tok.encode("2+2") + [s("<|python_end|>"), s("<|output_start|>")] + \
        tok.encode("4") + [s("<|output_end|>")]

    class ScriptedEngine:
        def generate(self, tokens, num_samples=1, max_tokens=None, temperature=1.0, top_k=None, seed=42):
            for t in reply + [s("<|assistant_end|>"), 0, 0]:
                yield [t], [1]

    out = []
    messages = chat_loop(ScriptedEngine(), tok, read=scripted(["2+2?"]), write=out.append)
    assert "Assistant: [calc: 2+2] = 4\n" in "".join(out)
    assert messages[1]["content"] == [{"type": "python", "text": "2+2"}, {"type": "python_output", "text": "4"}]
    rendered = completion_prompt(tok, messages + [{"role": "user", "content": "ok"}])
    start = rendered.index(s("<|python_start|>"))
    assert rendered[start:start + len(reply) + 1] == reply + [s("<|assistant_end|>")]


def save_tiny_checkpoint(base_dir, tok, model, source_dir="chatsft_checkpoints", tag="d2"):
    """A tokenizer and one checkpoint laid out as training writes them, for the script-level tests."""
    from dataclasses import asdict
    from nanochat.checkpoint_manager import save_checkpoint, tokenizer_info
    tok.save(str(base_dir / "tokenizer"))
    meta = {"model_config": asdict(model.config), "tokenizer": tokenizer_info(tok), "step": 5}
    save_checkpoint(str(base_dir / source_dir / tag), 5, model.state_dict(), None, meta)


@pytest.mark.slow
def test_script_one_shot_from_checkpoint(tiny, tmp_path):
    """python -m scripts.chat_cli -p ... loads the sft checkpoint and prints the (greedy) answer."""
    import os
    import subprocess
    import sys
    tok, model = tiny
    save_tiny_checkpoint(tmp_path, tok, model)
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(tmp_path), "OMP_NUM_THREADS": "1"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-m", "scripts.chat_cli", "-p", "brown fox", "-t", "0", "-m", "10",
                        "--device-type", "cpu"], cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    prompt = completion_prompt(tok, [{"role": "user", "content": "brown fox"}])
    assert r.stdout.endswith(tok.decode(greedy_reply(tok, model, prompt, 10)) + "\n")
