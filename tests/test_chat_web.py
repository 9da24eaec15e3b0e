"""
scripts/chat_web.py: routes, the UI's stream, the OpenAI-compatible API (checked with the official `openai`
client against a live server), continuous batching, the queue limit, and a hostile-input probe. A tiny
random GPT and a BPE tokenizer trained here keep it hermetic; the oracle for every reply is Engine.generate
run directly, alone, on a prompt rendered by the tokenizer's own render_for_completion.
"""

import json
import threading
import time

import pytest

from conftest import make_tiny_chat_model

from nanochat.batch_engine import Stream
from nanochat.engine import Engine
from scripts.chat_web import Replica, ServeConfig, create_app, make_replica, serve_in_thread

CONTEXT = 64  # the tiny model's sequence_len: replies are clamped to what is left of it


@pytest.fixture(scope="module")
def tiny():
    return make_tiny_chat_model(CONTEXT)


@pytest.fixture(scope="module")
def client(tiny):
    from fastapi.testclient import TestClient
    tok, model = tiny
    app = create_app(lambda: [make_replica(0, "cpu", model, tok)], ServeConfig(model_name="nanochat-test"))
    with TestClient(app) as c:
        yield c


def prompt_for(tok, messages):
    """The prompt as the tokenizer's chat renderer builds it (independent of chat_web's request handling)."""
    return tok.render_for_completion({"messages": messages + [{"role": "assistant", "content": ""}]})


def oracle(tok, model, prompt, max_tokens, temperature, top_k, seed, top_p=None):
    """Engine run directly and alone: (reply tokens without the stop token, finish_reason)."""
    stops = {tok.encode_special("<|assistant_end|>"), tok.get_bos_token_id()}
    out = []
    for column, _ in Engine(model, tok).generate(prompt, max_tokens=max_tokens, temperature=temperature,
                                                 top_k=top_k, top_p=top_p, seed=seed):
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


class ScriptedStream(Stream):
    """A real engine Stream, fed by a thread: the tokens (one every `delay` seconds), then the end."""

    def __init__(self, tokens, finish_reason, error=None, delay=0.0):
        super().__init__()

        def feed():
            for token in tokens:
                time.sleep(delay)
                self._put(token)
            self._finish(finish_reason, error)
        threading.Thread(target=feed, daemon=True).start()


class ScriptedEngine:
    """Stands in for BatchEngine: replays fixed tokens (up to <|assistant_end|>) and records each submit."""

    def __init__(self, tok, tokens, error=None, delay=0.0):
        self.end, self.tokens, self.error, self.calls = tok.encode_special("<|assistant_end|>"), tokens, error, []
        self.delay = delay  # seconds between tokens, so that they reach the server one by one

    def submit(self, tokens, max_tokens, temperature=1.0, top_k=None, top_p=None, seed=None):
        self.calls.append(dict(prompt=list(tokens), max_tokens=max_tokens, temperature=temperature, top_k=top_k,
                               top_p=top_p, seed=seed))
        out = self.tokens[:max_tokens]
        if self.end in out:
            return ScriptedStream(out[:out.index(self.end)], "stop", delay=self.delay)
        return ScriptedStream(out, "error" if self.error else "length", self.error, self.delay)

    def start(self):
        pass

    def stop(self):
        pass

    def stats(self):
        return {"queue_depth": 0, "active_rows": 0, "max_rows": 1, "tok_per_s": 0.0, "total_tokens": 0}


def scripted_client(tok, tokens, config=None, context_len=CONTEXT, error=None, delay=0.0):
    from fastapi.testclient import TestClient
    engine = ScriptedEngine(tok, tokens, error, delay)
    return TestClient(create_app([Replica(0, "cpu", engine, tok, context_len)], config or ServeConfig())), engine

# -----------------------------------------------------------------------------
# Plain routes


def test_health_stats_models_and_pages(client):
    assert client.get("/health").json() == {"status": "ok", "ready": True, "num_gpus": 1, "serve_mode": "batch"}
    stats = client.get("/stats").json()
    assert (stats["queue_depth"], stats["active_rows"], stats["max_rows"]) == (0, 0, 8)
    assert [(r["gpu_id"], r["device"]) for r in stats["replicas"]] == [(0, "cpu")]
    models = client.get("/v1/models").json()
    assert [(m["id"], m["object"]) for m in models["data"]] == [("nanochat-test", "model")]
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    # offline page: same-origin API, no external scripts/styles/fonts
    assert "/chat/completions" in page.text and "/health" in page.text
    assert "http://" not in page.text and "https://" not in page.text
    logo = client.get("/logo.svg")
    assert logo.status_code == 200 and logo.headers["content-type"].startswith("image/svg+xml")


def test_health_before_startup_is_not_ready(tiny):
    from fastapi.testclient import TestClient
    tok, model = tiny
    c = TestClient(create_app(lambda: [make_replica(0, "cpu", model, tok)]))  # no `with`: lifespan has not run
    assert c.get("/health").json()["ready"] is False
    r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 503 and r.headers["retry-after"] and r.json()["error"]["message"]

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
    req["stream"] = False  # the same request without streaming gives the same text
    assert client.post("/v1/chat/completions", json=req).json()["choices"][0]["message"]["content"] == \
        tok.decode(expected)


@pytest.mark.parametrize("route", ["/chat/completions", "/v1/chat/completions"])
def test_both_routes_honour_sampling_parameters(client, tiny, route):
    """temperature, top_k, top_p, seed and max_tokens reach the engine on both routes."""
    tok, model = tiny
    messages = [{"role": "user", "content": "jumps over"}]
    prompt = prompt_for(tok, messages)
    for temperature, top_k, top_p, seed, max_tokens in [(1.0, 30, 0.6, 5, 20), (1.5, 0, 0.9, 8, 12),
                                                        (0.0, 50, 1.0, 1, 9)]:
        with client.stream("POST", route, json={"messages": messages, "temperature": temperature, "top_k": top_k,
                                                "top_p": top_p, "seed": seed, "max_tokens": max_tokens,
                                                "stream": True}) as r:
            events = sse_events(r.iter_lines())
        if route == "/chat/completions":
            assert events[-1] == {"done": True} and all(e["gpu"] == 0 for e in events[:-1])
            text = "".join(e["token"] for e in events[:-1])
        else:
            assert events[-1] == "[DONE]"
            text = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1])
        expected, _ = oracle(tok, model, prompt, max_tokens, temperature, top_k or None, seed, top_p)
        assert text == tok.decode(expected), (temperature, top_k, top_p, seed)
    # a nucleus so small that it holds only the most likely token is greedy decoding, whatever the seed
    greedy, _ = oracle(tok, model, prompt, 15, 0.0, None, 0)
    for seed in (1, 2):
        with client.stream("POST", route, json={"messages": messages, "temperature": 1.0, "top_p": 1e-6, "seed": seed, "stream": True,
                                                "max_tokens": 15}) as r:
            events = sse_events(r.iter_lines())
        text = "".join(e["token"] if "token" in e else e["choices"][0]["delta"].get("content", "")
                       for e in events[:-1])
        assert text == tok.decode(greedy)


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
    ids = [tok.enc.encode_single_token(bytes([b])) for b in text.encode("utf-8")]  # multi-byte chars span tokens
    assert tok.decode(ids) == text
    end = tok.encode_special("<|assistant_end|>")
    c, engine = scripted_client(tok, ids + [end] + ids, ServeConfig(temperature=0.3, top_k=7, top_p=0.8,
                                                                    max_tokens=100), context_len=1000, delay=0.01)
    with c:
        with c.stream("POST", "/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]}) as r:
            events = sse_events(r.iter_lines())
        pieces = [e["token"] for e in events[:-1]]
        assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)  # characters never split
        assert len(pieces) > 3  # tokens 10 ms apart are streamed as they come, not all at the end
        call = engine.calls[-1]  # defaults come from the server config; no seed given: the engine picks one
        assert (call["temperature"], call["top_k"], call["top_p"], call["max_tokens"], call["seed"]) == \
            (0.3, 7, 0.8, 100, None)
        assert call["prompt"] == prompt_for(tok, [{"role": "user", "content": "hi"}])
        body = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                    "top_k": 0, "top_p": 1, "max_tokens": 3, "seed": 5}).json()
        assert body["choices"][0]["finish_reason"] == "length" and body["usage"]["completion_tokens"] == 3
        assert (engine.calls[-1]["top_k"], engine.calls[-1]["top_p"], engine.calls[-1]["seed"]) == (None, None, 5)
        body = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]}).json()
        assert body["choices"][0]["message"]["content"] == text and body["choices"][0]["finish_reason"] == "stop"
        assert body["usage"]["completion_tokens"] == len(ids)  # the stop token is not counted


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


def test_generation_error_still_ends_the_stream(tiny):
    tok, _ = tiny
    c, _ = scripted_client(tok, tok.encode("fox"), error="RuntimeError: boom")
    with c:
        with c.stream("POST", "/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]}) as r:
            events = sse_events(r.iter_lines())
        assert "boom" in events[-2]["error"] and events[-1] == {"done": True}
        with c.stream("POST", "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                            "stream": True}) as r:
            events = sse_events(r.iter_lines())
        assert events[-2]["error"]["type"] == "server_error" and events[-1] == "[DONE]"
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 500 and "boom" in r.json()["error"]["message"]


def test_dead_engine_process_answers_503(tiny):
    # a replica whose engine process has died (EngineProcess.submit raises EngineStopped): 503 naming it, on
    # both routes, and the server goes on answering
    from nanochat.engine_process import EngineStopped
    tok, _ = tiny
    c, engine = scripted_client(tok, tok.encode("fox"))

    def dead(*args, **kwargs):
        raise EngineStopped("the engine process exited (exit code -9); restart the server")
    engine.submit = dead
    with c:
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 503 and "exit code -9" in r.json()["error"]["message"]
        r = c.post("/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 503 and "restart the server" in r.json()["detail"]
        assert c.get("/health").status_code == 200

# -----------------------------------------------------------------------------
# Route rules (the hostile-input probe and the parser's limits: tests/test_chat_web_input.py)

GOOD = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def test_route_specific_rules(client):
    system = {"messages": [{"role": "system", "content": "x"}, {"role": "user", "content": "y"}], "max_tokens": 2}
    assert client.post("/v1/chat/completions", json=system).status_code == 200
    assert client.post("/chat/completions", json=system).status_code == 400  # the UI's route has no system role
    r = client.post("/chat/completions", json={**GOOD, "stream": False})  # this route only streams
    assert r.status_code == 400 and "stream" in r.json()["detail"]


def test_logging_survives_any_string(tiny, capsys):
    """The exchange log prints what the client sent; unencodable characters become escapes, never errors."""
    from scripts.chat_web import log
    log("a\ud800b \udfff é")
    assert "a\\ud800b \\udfff" in capsys.readouterr().out

# -----------------------------------------------------------------------------
# Live servers: the official openai client, continuous batching, disconnects and the queue limit


@pytest.fixture(scope="module")
def live_server(tiny):
    """The tiny model (fp32) behind a live server; 4 rows, so 16 concurrent requests also exercise the queue."""
    tok, model = tiny
    url, stop = serve_in_thread(create_app([make_replica(0, "cpu", model, tok, max_rows=4)], ServeConfig(model_name="nanochat-test")))
    yield url
    stop()


def test_openai_client(live_server, tiny):
    import openai
    tok, model = tiny
    client = openai.OpenAI(base_url=live_server + "/v1", api_key="unused")
    assert [m.id for m in client.models.list()] == ["nanochat-test"]
    messages = [{"role": "user", "content": "lazy dog"}]
    expected, finish = oracle(tok, model, prompt_for(tok, messages), 20, 0.7, 50, 123, 0.9)
    r = client.chat.completions.create(model="nanochat-test", messages=messages, max_tokens=20, temperature=0.7,
                                       top_p=0.9, seed=123)
    assert r.choices[0].message.content == tok.decode(expected) and r.choices[0].finish_reason == finish
    assert r.usage.completion_tokens == len(expected)
    stream = client.chat.completions.create(model="nanochat-test", messages=messages, max_tokens=20, temperature=0.7,
                                            top_p=0.9, seed=123, stream=True, extra_body={"top_k": 50})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == tok.decode(expected)
    assert chunks[-1].choices[0].finish_reason == finish
    for bad in ({"temperature": 3.0}, {"top_p": 2.0}, {"n": 2}):
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model="nanochat-test", messages=messages, **bad)


def test_16_concurrent_requests_equal_their_solo_runs(live_server, tiny):
    """Greedy and seeded requests of different prompts and lengths, batched together, each equal its solo run."""
    import openai
    tok, model = tiny
    client = openai.OpenAI(base_url=live_server + "/v1", api_key="unused", max_retries=0)
    words = ["fox", "lazy dog", "café €", "quick brown", "jumps", "naïve", "Héllo wörld", "over the"]
    jobs = [dict(messages=[{"role": "user", "content": words[i % 8] + " " * (i // 8)}], max_tokens=5 + 3 * i,
                 temperature=0.0 if i % 2 == 0 else 0.9, seed=i, stream=i % 3 == 0) for i in range(16)]
    results, errors = [None] * 16, []

    def ask(i):
        try:
            r = client.chat.completions.create(model="nanochat-test", **jobs[i])
            results[i] = "".join(c.choices[0].delta.content or "" for c in r) if jobs[i]["stream"] \
                else r.choices[0].message.content
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    for i, job in enumerate(jobs):
        expected, _ = oracle(tok, model, prompt_for(tok, job["messages"]), job["max_tokens"], job["temperature"],
                             50, job["seed"])
        assert results[i] == tok.decode(expected), i


@pytest.fixture(scope="module")
def long_server():
    """A tiny model with a 2048-token context whose greedy replies run long (random weights rarely stop),
    behind a server with one row and one queue place: room for a client killed mid-stream and a full queue."""
    tok, model = make_tiny_chat_model(2048)
    url, stop = serve_in_thread(create_app([make_replica(0, "cpu", model, tok, max_rows=1, max_queue=1)]))
    yield url
    stop()


LONG = {"messages": [{"role": "user", "content": "brown fox"}], "temperature": 0.0, "max_tokens": 1900,
        "stream": True}


def wait_for_stats(url, predicate, what, timeout=30):
    import httpx
    deadline = time.time() + timeout
    while not predicate(stats := httpx.get(url + "/stats", timeout=10).json()):
        assert time.time() < deadline, f"timed out waiting for {what}: {stats}"
        time.sleep(0.05)
    return stats


def test_client_killed_mid_stream_frees_its_row(long_server):
    import httpx
    before = httpx.get(long_server + "/stats").json()["total_tokens"]
    with httpx.stream("POST", long_server + "/v1/chat/completions", json=LONG, timeout=30) as r:
        lines = r.iter_lines()
        next(line for line in lines if '"content": "' in line and '"role"' not in line)  # one token arrived
        assert httpx.get(long_server + "/stats").json()["active_rows"] == 1
    stats = wait_for_stats(long_server, lambda s: s["active_rows"] == 0, "the row to be freed")
    assert stats["total_tokens"] - before < LONG["max_tokens"]  # generation stopped well before max_tokens


def test_full_queue_answers_429_with_retry_after(long_server):
    import httpx
    import openai
    with httpx.stream("POST", long_server + "/chat/completions", json=LONG, timeout=30) as running:
        lines = running.iter_lines()  # kept: a dropped iterator closes the response, which cancels the request
        next(lines)  # it holds the only row
        with httpx.stream("POST", long_server + "/chat/completions", json=LONG, timeout=30) as waiting:
            wait_for_stats(long_server, lambda s: s["queue_depth"] == 1, "the second request to wait")
            client = openai.OpenAI(base_url=long_server + "/v1", api_key="unused", max_retries=0)
            with pytest.raises(openai.RateLimitError) as e:
                client.chat.completions.create(model="x", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
            assert int(e.value.response.headers["retry-after"]) >= 1
            assert e.value.response.json()["error"]["type"] == "rate_limit_error"
            r = httpx.post(long_server + "/chat/completions", json=LONG, timeout=30)
            assert r.status_code == 429 and r.headers["retry-after"] and r.json()["detail"]
            assert waiting.status_code == 200
    wait_for_stats(long_server, lambda s: s["active_rows"] == 0 and s["queue_depth"] == 0, "both to be cancelled")


@pytest.fixture(scope="module")
def slow_server(tiny):
    """2 rows and 2 queue places, and a model that takes 50 ms a forward: requests that arrive together pile up
    in the queue before the decode loop admits any of them, as they do on a busy GPU."""
    import functools
    from conftest import tiny_gpt
    tok, model = tiny
    slow = tiny_gpt(sequence_len=CONTEXT, vocab_size=tok.get_vocab_size(), n_layer=1, n_head=2, n_kv_head=2,
                    n_embd=32).eval()

    @functools.wraps(slow.forward_cached)
    def forward_cached(*args, **kwargs):
        time.sleep(0.05)
        return type(slow).forward_cached(slow, *args, **kwargs)

    slow.forward_cached = forward_cached
    url, stop = serve_in_thread(create_app([make_replica(0, "cpu", slow, tok, max_rows=2, max_queue=2)]))
    yield url
    stop()


def test_burst_of_rows_plus_queue_is_all_accepted(slow_server):
    """max_rows + max_queue (2 + 2) requests and one more, released together by a barrier onto an idle server:
    exactly one answer is 429, three times over."""
    import httpx
    n, body = 5, {"messages": [{"role": "user", "content": "fox"}], "temperature": 0.0, "stream": True}
    for _ in range(3):
        barrier, answers, clients = threading.Barrier(n), [], [httpx.Client(timeout=30) for _ in range(n)]

        def send(client):
            request = client.build_request("POST", slow_server + "/v1/chat/completions", json=body)
            barrier.wait()
            answers.append(client.send(request, stream=True))

        threads = [threading.Thread(target=send, args=(c,)) for c in clients]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        try:
            assert sorted(r.status_code for r in answers) == [200] * (n - 1) + [429]
        finally:
            for r in answers:
                r.close()
            for c in clients:
                c.close()
        wait_for_stats(slow_server, lambda s: s["active_rows"] == 0 and s["queue_depth"] == 0, "rows to be freed")


@pytest.mark.slow
def test_server_script_from_checkpoint(tiny, tmp_path):
    """python -m scripts.chat_web loads the sft checkpoint and answers the openai client."""
    import os
    import socket
    import subprocess
    import sys
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
