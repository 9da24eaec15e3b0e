"""
scripts/chat_web.py: routes, the reference stream, the OpenAI-compatible API (checked with the official
`openai` client against a live server), input limits and the worker pool. A tiny random GPT and a BPE
tokenizer trained here keep it hermetic; the oracle for every reply is Engine.generate run directly on a
prompt rendered by the tokenizer's own render_for_completion.
"""

import copy
import json
import threading

import pytest

from conftest import make_tiny_chat_model

from nanochat.engine import Engine
from scripts import chat_web
from scripts.chat_web import ServeConfig, Worker, create_app, make_worker

CONTEXT = 64  # the tiny model's sequence_len: replies are clamped to what is left of it


@pytest.fixture(scope="module")
def tiny():
    tok, model = make_tiny_chat_model(CONTEXT)
    return tok, model


@pytest.fixture(scope="module")
def client(tiny):
    from fastapi.testclient import TestClient
    tok, model = tiny
    app = create_app(lambda: [make_worker(0, "cpu", model, tok)], ServeConfig(model_name="nanochat-test"))
    with TestClient(app) as c:
        yield c


def prompt_for(tok, messages):
    """The prompt as the tokenizer's chat renderer builds it (independent of chat_web's assembly)."""
    return tok.render_for_completion({"messages": messages + [{"role": "assistant", "content": "x"}]})


def oracle(tok, model, prompt, max_tokens, temperature, top_k, seed):
    """Engine run directly: (reply tokens without the stop token, finish_reason)."""
    stops = {tok.encode_special("<|assistant_end|>"), tok.get_bos_token_id()}
    out = []
    for column, _ in Engine(model, tok).generate(prompt, max_tokens=max_tokens, temperature=temperature,
                                                 top_k=top_k, seed=seed):
        if column[0] in stops:
            return out, "stop"
        out.append(column[0])
    return out, "length"


def sse_events(lines):
    """data: payloads of an event stream, JSON-decoded except the final [DONE]."""
    events = []
    for line in lines:
        if line.startswith("data: "):
            payload = line[len("data: "):]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


class ScriptedEngine:
    """Stands in for Engine: replays fixed tokens and records how it was called."""

    def __init__(self, tokens):
        self.tokens, self.calls = tokens, []

    def generate(self, tokens, num_samples=1, max_tokens=None, temperature=1.0, top_k=None, seed=42):
        self.calls.append(dict(prompt=list(tokens), max_tokens=max_tokens, temperature=temperature, top_k=top_k,
                               seed=seed))
        for t in self.tokens[:max_tokens]:
            yield [t], [1]


def scripted_client(tok, tokens, config=None, context_len=CONTEXT):
    from fastapi.testclient import TestClient
    engine = ScriptedEngine(tokens)
    app = create_app([Worker(0, "cpu", engine, tok, context_len)], config or ServeConfig())
    return TestClient(app), engine

# -----------------------------------------------------------------------------
# Plain routes


def test_health_stats_models_and_pages(client):
    assert client.get("/health").json() == {"status": "ok", "ready": True, "num_gpus": 1, "available_workers": 1}
    assert client.get("/stats").json() == {"total_workers": 1, "available_workers": 1, "busy_workers": 0,
                                           "workers": [{"gpu_id": 0, "device": "cpu"}]}
    models = client.get("/v1/models").json()
    assert models["object"] == "list"
    assert [(m["id"], m["object"]) for m in models["data"]] == [("nanochat-test", "model")]
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    # offline page: same-origin API, no external scripts/styles/fonts
    assert "/chat/completions" in page.text and "/health" in page.text
    assert "http://" not in page.text and "https://" not in page.text
    logo = client.get("/logo.svg")
    assert logo.status_code == 200 and logo.headers["content-type"].startswith("image/svg+xml")
    assert "<svg" in logo.text


def test_health_before_startup_is_not_ready(tiny):
    from fastapi.testclient import TestClient
    tok, model = tiny
    app = create_app(lambda: [make_worker(0, "cpu", model, tok)])
    h = TestClient(app).get("/health").json()  # no `with`: lifespan has not run, no pool yet
    assert h["ready"] is False and h["available_workers"] == 0

# -----------------------------------------------------------------------------
# Replies from the real tiny model


def test_openai_non_streaming_matches_engine(client, tiny):
    tok, model = tiny
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Héllo fox"}]
    r = client.post("/v1/chat/completions", json={"model": "whatever", "messages": messages, "temperature": 1.0,
                                                  "top_k": 20, "max_tokens": 25, "seed": 7})
    assert r.status_code == 200, r.text
    body = r.json()
    prompt = prompt_for(tok, messages)  # system folded into the first user turn by the tokenizer's renderer
    expected, finish = oracle(tok, model, prompt, 25, 1.0, 20, 7)
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["model"] == "nanochat-test" and isinstance(body["created"], int)
    assert body["choices"] == [{"index": 0, "message": {"role": "assistant", "content": tok.decode(expected)},
                                "finish_reason": finish}]
    assert body["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": len(expected),
                             "total_tokens": len(prompt) + len(expected)}


def test_openai_streaming_chunks(client, tiny):
    tok, model = tiny
    messages = [{"role": "user", "content": "quick brown"}, {"role": "assistant", "content": "lazy dog"},
                {"role": "user", "content": "café €"}]
    req = {"messages": messages, "temperature": 0.9, "max_tokens": 30, "seed": 11, "stream": True}
    with client.stream("POST", "/v1/chat/completions", json=req) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r.iter_lines())
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert len({c["id"] for c in chunks}) == 1 and all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    final = chunks[-1]["choices"][0]
    middle = [c["choices"][0] for c in chunks[1:-1]]
    assert all(c["finish_reason"] is None and set(c["delta"]) == {"content"} for c in middle)
    expected, finish = oracle(tok, model, prompt_for(tok, messages), 30, 0.9, 50, 11)
    assert final["delta"] == {} and final["finish_reason"] == finish
    assert "".join(c["delta"]["content"] for c in middle) == tok.decode(expected)
    # the same request without streaming gives the same text
    req["stream"] = False
    assert client.post("/v1/chat/completions", json=req).json()["choices"][0]["message"]["content"] == \
        tok.decode(expected)


def test_reference_stream(client, tiny):
    tok, model = tiny
    messages = [{"role": "user", "content": "jumps over"}]
    with client.stream("POST", "/chat/completions", json={"messages": messages, "temperature": 0.0,
                                                           "max_tokens": 20}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r.iter_lines())
    assert events[-1] == {"done": True}
    tokens = events[:-1]
    assert all(set(e) == {"token", "gpu"} and e["gpu"] == 0 for e in tokens)
    expected, _ = oracle(tok, model, prompt_for(tok, messages), 20, 0.0, 50, 0)  # greedy: seed irrelevant
    assert "".join(e["token"] for e in tokens) == tok.decode(expected)


def test_reply_clamped_to_model_context(client, tiny):
    tok, _ = tiny
    messages = [{"role": "user", "content": "fox"}]
    room = CONTEXT - len(prompt_for(tok, messages))
    body = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 4096, "seed": 1,
                                                     "temperature": 0.0}).json()
    assert body["usage"]["completion_tokens"] <= room
    assert body["usage"]["total_tokens"] <= CONTEXT

# -----------------------------------------------------------------------------
# Scripted engine: exact streaming behaviour


def test_utf8_safe_stream_stop_and_parameters(tiny):
    tok, _ = tiny
    text = "naïve € ok"
    script = [b for b in text.encode("utf-8")]  # one token per byte: multi-byte characters span tokens
    ids = [tok.enc.encode_single_token(bytes([b])) for b in script]  # the byte-level tokens
    assert tok.decode(ids) == text
    end = tok.encode_special("<|assistant_end|>")
    c, engine = scripted_client(tok, ids + [end] + ids, ServeConfig(temperature=0.3, top_k=7, max_tokens=100),
                                   context_len=1000)
    with c:
        with c.stream("POST", "/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]}) as r:
            events = sse_events(r.iter_lines())
        pieces = [e["token"] for e in events[:-1]]
        assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)
        assert len(pieces) == len(text)  # each complete character arrives once, as soon as it is complete
        call = engine.calls[-1]  # defaults come from the server config; the seed is fresh per request
        assert (call["temperature"], call["top_k"], call["max_tokens"]) == (0.3, 7, 100)
        assert call["prompt"] == prompt_for(tok, [{"role": "user", "content": "hi"}])
        body = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                    "top_k": 0, "max_tokens": 3, "seed": 5}).json()
        assert body["choices"][0]["finish_reason"] == "length" and body["usage"]["completion_tokens"] == 3
        assert (engine.calls[-1]["top_k"], engine.calls[-1]["seed"]) == (None, 5)  # top_k 0 = no filter
        body = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]}).json()
        assert body["choices"][0]["message"]["content"] == text
        assert body["choices"][0]["finish_reason"] == "stop"
        assert body["usage"]["completion_tokens"] == len(ids)  # the stop token is not counted
        seeds = set()
        for _ in range(3):
            c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "a"}]})
            seeds.add(engine.calls[-1]["seed"])
        assert len(seeds) == 3  # no seed given: a fresh random one per request


def test_tool_tokens_stream_as_literals(tiny):
    tok, _ = tiny
    s = tok.encode_special
    script = [s("<|python_start|>")] + tok.encode("12*3") + [s("<|python_end|>"), s("<|output_start|>")] + \
        tok.encode("36") + [s("<|output_end|>"), s("<|assistant_end|>")]
    c, _ = scripted_client(tok, script)
    with c:
        body = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "12*3?"}]}).json()
    assert body["choices"][0]["message"]["content"] == \
        "<|python_start|>12*3<|python_end|><|output_start|>36<|output_end|>"

# -----------------------------------------------------------------------------
# Input limits: every one answers 4xx JSON, never a crash

GOOD = {"messages": [{"role": "user", "content": "hi"}]}
BAD_BODIES = [
    ("no messages", {}),
    ("empty messages", {"messages": []}),
    ("messages not a list", {"messages": "hi"}),
    ("too many messages", {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}] * 250
                           + [{"role": "user", "content": "c"}]}),
    ("message not an object", {"messages": ["hi"]}),
    ("empty content", {"messages": [{"role": "user", "content": ""}]}),
    ("content not a string", {"messages": [{"role": "user", "content": 5}]}),
    ("message too long", {"messages": [{"role": "user", "content": "a" * 8001}]}),
    ("conversation too long", {"messages": [{"role": "user", "content": "a" * 8000},
                                            {"role": "assistant", "content": "a" * 8000}] * 2
                               + [{"role": "user", "content": "a"}]}),
    ("unknown role", {"messages": [{"role": "tool", "content": "hi"}]}),
    ("temperature too high", {**GOOD, "temperature": 2.5}),
    ("temperature negative", {**GOOD, "temperature": -0.1}),
    ("temperature not a number", {**GOOD, "temperature": "hot"}),
    ("top_k too high", {**GOOD, "top_k": 201}),
    ("top_k negative", {**GOOD, "top_k": -1}),
    ("top_k not an integer", {**GOOD, "top_k": 1.5}),
    ("max_tokens zero", {**GOOD, "max_tokens": 0}),
    ("max_tokens too high", {**GOOD, "max_tokens": 4097}),
    ("max_tokens a bool", {**GOOD, "max_tokens": True}),
    ("prompt longer than the model context", {"messages": [{"role": "user", "content": "x y z " * 200}]}),
]
OPENAI_ONLY = [
    ("top_p too high", {**GOOD, "top_p": 1.5}),
    ("n > 1", {**GOOD, "n": 2}),
    ("stream not a bool", {**GOOD, "stream": "yes"}),
    ("system message in the middle", {"messages": [{"role": "user", "content": "a"},
                                                   {"role": "system", "content": "b"}]}),
    ("system message alone", {"messages": [{"role": "system", "content": "b"}]}),
    ("image content part", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}),
]


@pytest.mark.parametrize("name,body", BAD_BODIES + OPENAI_ONLY, ids=[n for n, _ in BAD_BODIES + OPENAI_ONLY])
def test_openai_limits(client, name, body):
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 400, (name, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    assert err["message"]


@pytest.mark.parametrize("name,body", BAD_BODIES + [("system role", {"messages": [{"role": "system", "content": "x"},
                                                                                  {"role": "user", "content": "y"}]})],
                         ids=[n for n, _ in BAD_BODIES] + ["system role"])
def test_reference_limits(client, name, body):
    r = client.post("/chat/completions", json=body)
    assert r.status_code == 400, (name, r.text)
    assert r.json()["detail"]


@pytest.mark.parametrize("route", ["/chat/completions", "/v1/chat/completions"])
@pytest.mark.parametrize("raw", [b"{not json", b"\xff\xfe", b"[1, 2]", b"null"])
def test_malformed_json(client, route, raw):
    r = client.post(route, content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()


def test_accepted_openai_extras(client):
    body = {**GOOD, "top_p": 0.9, "n": 1, "max_completion_tokens": 2, "seed": 3, "stop": None, "user": "x",
            "messages": [{"role": "user", "content": [{"type": "text", "text": "hi "}, {"type": "text", "text": "fox"}]}]}
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] <= 2

# -----------------------------------------------------------------------------
# Live server: the official openai client, concurrency and the worker queue


def serve(app):
    """Run `app` with uvicorn on 127.0.0.1 and a free port in a thread: (url, stop function)."""
    import uvicorn
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(1500):
        if server.started:
            break
        thread.join(0.02)
    assert server.started, "uvicorn did not start"
    port = server.servers[0].sockets[0].getsockname()[1]

    def stop():
        server.should_exit = True
        thread.join(10)
    return f"http://127.0.0.1:{port}", stop


@pytest.fixture(scope="module")
def live_server(tiny):
    """Two workers (two replicas of the tiny model) behind a live server."""
    tok, model = tiny
    workers = [make_worker(0, "cpu", model, tok), make_worker(1, "cpu", copy.deepcopy(model), tok)]
    url, stop = serve(create_app(workers, ServeConfig(model_name="nanochat-test")))
    yield url
    stop()


def test_openai_client(live_server, tiny):
    from openai import OpenAI
    tok, model = tiny
    client = OpenAI(base_url=live_server + "/v1", api_key="unused")
    assert [m.id for m in client.models.list()] == ["nanochat-test"]
    messages = [{"role": "user", "content": "lazy dog"}]
    expected, finish = oracle(tok, model, prompt_for(tok, messages), 20, 0.7, 50, 123)
    r = client.chat.completions.create(model="nanochat-test", messages=messages, max_tokens=20, temperature=0.7,
                                       seed=123)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == tok.decode(expected) and r.choices[0].finish_reason == finish
    assert r.usage.completion_tokens == len(expected)
    stream = client.chat.completions.create(model="nanochat-test", messages=messages, max_tokens=20, temperature=0.7,
                                            seed=123, stream=True, extra_body={"top_k": 50})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == tok.decode(expected)
    assert chunks[-1].choices[0].finish_reason == finish
    import openai
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="nanochat-test", messages=messages, temperature=3.0)


def test_concurrent_requests_do_not_interleave(live_server, tiny):
    import httpx
    tok, model = tiny
    seeds = [1, 2, 3, 4]
    messages = [{"role": "user", "content": "brown fox"}]
    results, errors = {}, []

    def ask(seed):
        try:
            with httpx.stream("POST", live_server + "/chat/completions", timeout=60,
                              json={"messages": messages, "temperature": 1.0, "max_tokens": 20, "seed": seed}) as r:
                events = sse_events(r.iter_lines())
            results[seed] = ("".join(e["token"] for e in events[:-1]), {e["gpu"] for e in events[:-1]})
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=ask, args=(s,)) for s in seeds]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    prompt = prompt_for(tok, messages)
    for seed in seeds:
        text, gpus = results[seed]
        assert text == tok.decode(oracle(tok, model, prompt, 20, 1.0, 50, seed)[0]), seed
        assert len(gpus) <= 1  # one worker served the whole reply
    stats = httpx.get(live_server + "/stats").json()
    assert stats["available_workers"] == 2 and stats["busy_workers"] == 0  # every worker came back


def test_worker_held_for_whole_stream(live_server, tiny):
    """While a reply streams its worker is busy, and the event loop still answers other requests."""
    import httpx
    tok, _ = tiny
    gate = threading.Event()
    original = chat_web.Reply.pieces

    async def slow_pieces(self):  # pause after the first piece until the test has looked at /stats
        import asyncio
        first = True
        async for piece in original(self):
            yield piece
            if first:
                first = False
                while not gate.is_set():
                    await asyncio.sleep(0.01)

    chat_web.Reply.pieces = slow_pieces
    try:
        with httpx.stream("POST", live_server + "/chat/completions", timeout=60,
                          json={"messages": [{"role": "user", "content": "hi"}], "temperature": 0.0,
                                "max_tokens": 10}) as r:
            lines = r.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            stats = httpx.get(live_server + "/stats", timeout=10).json()
            health = httpx.get(live_server + "/health", timeout=10).json()
            gate.set()
            rest = list(lines)
    finally:
        chat_web.Reply.pieces = original
        gate.set()
    assert "token" in json.loads(first[6:])
    assert stats["busy_workers"] == 1 and stats["available_workers"] == 1
    assert health["available_workers"] == 1
    assert sse_events(rest)[-1] == {"done": True}


def test_client_disconnect_frees_worker(tiny):
    """A client that hangs up mid-reply stops generation, and the worker comes back to the pool."""
    import time
    import httpx
    tok, _ = tiny

    class Endless(ScriptedEngine):
        def generate(self, *args, **kwargs):
            self.calls.append(kwargs)
            for _ in range(kwargs["max_tokens"]):
                time.sleep(0.01)
                self.emitted = getattr(self, "emitted", 0) + 1
                yield [tok.encode("a")[0]], [1]

    engine = Endless([])
    url, stop = serve(create_app([Worker(0, "cpu", engine, tok, 10**6)]))
    try:
        with httpx.stream("POST", url + "/chat/completions", timeout=30,
                          json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4096}) as r:
            next(line for line in r.iter_lines() if line.startswith("data: "))
        deadline = time.time() + 20
        while httpx.get(url + "/health").json()["available_workers"] != 1:
            assert time.time() < deadline, "the worker never came back after the client left"
            time.sleep(0.05)
        assert engine.emitted < 4096  # generation stopped early instead of running to max_tokens
    finally:
        stop()


@pytest.mark.slow
def test_server_script_from_checkpoint(tiny, tmp_path):
    """python -m scripts.chat_web loads the sft checkpoint and answers the openai client."""
    import os
    import socket
    import subprocess
    import sys
    import time
    from dataclasses import asdict
    import httpx
    from openai import OpenAI
    from nanochat.checkpoint_manager import save_checkpoint, tokenizer_info
    tok, model = tiny
    tok.save(str(tmp_path / "tokenizer"))
    save_checkpoint(str(tmp_path / "chatsft_checkpoints" / "d2"), 5, model.state_dict(), None,
                    {"model_config": asdict(model.config), "tokenizer": tokenizer_info(tok), "step": 5})
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(tmp_path), "OMP_NUM_THREADS": "1"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen([sys.executable, "-m", "scripts.chat_web", "--host", "127.0.0.1", "-p", str(port),
                             "--device-type", "cpu"], cwd=root, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(base + "/health", timeout=2).json()["ready"]:
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline, "server did not become ready"
            time.sleep(0.2)
        client = OpenAI(base_url=base + "/v1", api_key="unused")
        assert [m.id for m in client.models.list()] == ["nanochat-sft"]
        messages = [{"role": "user", "content": "fox"}]
        expected, finish = oracle(tok, model, prompt_for(tok, messages), 8, 0.0, 50, 0)
        r = client.chat.completions.create(model="nanochat-sft", messages=messages, max_tokens=8, temperature=0)
        assert r.choices[0].message.content == tok.decode(expected) and r.choices[0].finish_reason == finish
        text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="nanochat-sft", messages=messages, max_tokens=8, temperature=0, stream=True))
        assert text == tok.decode(expected)
    finally:
        proc.terminate()
        proc.wait(20)
