"""
scripts/chat_web.py and nanochat/chat_request.py under hostile input, as the hostile-input probes sent it: bad
bodies (each answered 4xx JSON in the route's shape), bodies built to be slow to parse (timed against a plain
body of the same size), encodings other than UTF-8, random mutations of valid bodies, and errors outside the
routes (404, 405, HEAD, absolute-form request lines). A tiny random model answers the valid requests.
"""

import json
import random
import socket
import threading
import time

import numpy as np
import pytest

from conftest import make_tiny_chat_model

from nanochat.chat_request import MAX_BODY_BYTES, json_shape
from scripts.chat_web import ServeConfig, create_app, make_replica, serve_in_thread

ROUTES = ["/chat/completions", "/v1/chat/completions"]


@pytest.fixture(scope="module")
def tiny():
    return make_tiny_chat_model(64)


@pytest.fixture(scope="module")
def client(tiny):
    from fastapi.testclient import TestClient
    tok, model = tiny
    app = create_app(lambda: [make_replica(0, "cpu", model, tok)], ServeConfig(model_name="nanochat-test"))
    with TestClient(app) as c:
        yield c


@pytest.fixture(scope="module")
def live_server(tiny):
    tok, model = tiny
    url, stop = serve_in_thread(create_app([make_replica(0, "cpu", model, tok)], ServeConfig(model_name="x")))
    yield url
    stop()


def sse_events(lines):
    """data: payloads of an event stream, JSON-decoded except the final [DONE]."""
    return [line[6:] if line == "data: [DONE]" else json.loads(line[6:]) for line in lines if line.startswith("data: ")]


# -----------------------------------------------------------------------------
# The probe: every case answered 4xx JSON in the route's shape (or 2xx), never a crash

GOOD = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
BAD_BODIES = [
    ("no messages", {}),
    ("empty messages", {"messages": []}),
    ("messages not a list", {"messages": "hi"}),
    ("messages an object", {"messages": {"role": "user", "content": "hi"}}),
    ("too many messages", {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}] * 250
                           + [{"role": "user", "content": "c"}]}),
    ("message not an object", {"messages": ["hi"]}),
    ("message null", {"messages": [None]}),
    ("empty content", {"messages": [{"role": "user", "content": ""}]}),
    ("missing content", {"messages": [{"role": "user"}]}),
    ("content not a string", {"messages": [{"role": "user", "content": 5}]}),
    ("content an object", {"messages": [{"role": "user", "content": {"text": "hi"}}]}),
    ("image content part", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}),
    ("content part without text", {"messages": [{"role": "user", "content": [{"type": "text"}]}]}),
    ("empty list of parts", {"messages": [{"role": "user", "content": []}]}),
    ("lone surrogate", {"messages": [{"role": "user", "content": "a\ud800"}]}),
    ("message too long", {"messages": [{"role": "user", "content": "a" * 8001}]}),
    ("conversation too long", {"messages": [{"role": "user", "content": "a" * 8000},
                                            {"role": "assistant", "content": "a" * 8000}] * 2
                               + [{"role": "user", "content": "a"}]}),
    ("unknown role", {"messages": [{"role": "tool", "content": "hi"}]}),
    ("role not a string", {"messages": [{"role": ["user"], "content": "hi"}]}),
    ("roles not alternating", {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}),
    ("assistant first", {"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]}),
    ("last message not the user's", {"messages": [{"role": "user", "content": "a"},
                                                  {"role": "assistant", "content": "b"}]}),
    ("system message in the middle", {"messages": [{"role": "user", "content": "a"},
                                                   {"role": "system", "content": "b"}]}),
    ("temperature too high", {**GOOD, "temperature": 2.5}),
    ("temperature negative", {**GOOD, "temperature": -0.1}),
    ("temperature not a number", {**GOOD, "temperature": "hot"}),
    ("temperature huge", {**GOOD, "temperature": 1e308}),
    ("top_k too high", {**GOOD, "top_k": 201}),
    ("top_k negative", {**GOOD, "top_k": -1}),
    ("top_k not an integer", {**GOOD, "top_k": 1.5}),
    ("top_k huge", {**GOOD, "top_k": 10**30}),
    ("top_p too high", {**GOOD, "top_p": 1.5}),
    ("top_p negative", {**GOOD, "top_p": -0.5}),
    ("top_p a string", {**GOOD, "top_p": "0.5"}),
    ("max_tokens zero", {**GOOD, "max_tokens": 0}),
    ("max_tokens negative", {**GOOD, "max_tokens": -5}),
    ("max_tokens too high", {**GOOD, "max_tokens": 4097}),
    ("max_tokens a bool", {**GOOD, "max_tokens": True}),
    ("max_tokens a float", {**GOOD, "max_tokens": 3.5}),
    ("seed not an integer", {**GOOD, "seed": "abc"}),
    ("seed too large", {**GOOD, "seed": 2**64}),
    ("n = 2", {**GOOD, "n": 2}),
    ("n = 0", {**GOOD, "n": 0}),
    ("n a string", {**GOOD, "n": "1"}),
    ("stream a string", {**GOOD, "stream": "yes"}),
    ("stream a number", {**GOOD, "stream": 1}),
    ("stop sequences (unsupported)", {**GOOD, "stop": ["\n"]}),
    ("logprobs (unsupported)", {**GOOD, "logprobs": True}),
    ("prompt longer than the model context", {"messages": [{"role": "user", "content": "x y z " * 200}]}),
]
BAD_RAW = [
    ("malformed JSON", b"{not json"),
    ("truncated JSON", b'{"messages": [{"role": "user", "content": "hi"'),
    ("invalid UTF-8", b"\xff\xfe"),
    ("empty body", b""),
    ("a JSON list", b"[1, 2]"),
    ("JSON null", b"null"),
    ("a JSON string", b'"hi"'),
    ("NaN temperature", b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}'),
    ("Infinity max_tokens", b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": Infinity}'),
    ("a 5000-digit number", b'{"messages": [{"role": "user", "content": "hi"}], "seed": ' + b"9" * 5000 + b"}"),
    ("escaped lone surrogate", b'{"messages": [{"role": "user", "content": "a\\ud800b"}]}'),
    ("100k nested brackets", b"[" * 100_000),
    ("100k nested objects", b'{"a":' * 100_000),
    ("deep nesting inside a valid field", b'{"messages": [{"role": "user", "content": "hi"}], "x": '
     + b"[" * 40 + b"]" * 40 + b"}"),
    ("oversized body", b'{"messages": [{"role": "user", "content": "' + b"a" * (2 << 20) + b'"}]}'),
    # the cases of the second probe: a quadratic pre-scan, encodings json.loads guesses, element counts
    ("48 KB of escaped quotes, unterminated", b'{"messages":"' + b'\\"' * 24_000),
    ("UTF-16LE nested 3000 deep behind U+2200", ("\u2200" + "[" * 3000).encode("utf-16-le")),
    ("UTF-16LE object nested 3000 deep", ('{"a":' * 3000).encode("utf-16-le")),
    ("a valid request in UTF-16 with a BOM", json.dumps(GOOD).encode("utf-16")),
    ("a valid request in UTF-32", json.dumps(GOOD).encode("utf-32-le")),
    ("a valid request behind a UTF-8 BOM", b"\xef\xbb\xbf" + json.dumps(GOOD).encode()),
    ("40k commas", b'{"messages": [{"role": "user", "content": "hi"}], "x": [' + b"0," * 40_000 + b"0]}"),
]
ACCEPTED = [  # odd but valid: answered 2xx
    ("unknown fields", {**GOOD, "frobnicate": {"x": [1, 2]}, "user": "me"}),
    ("null options", {**GOOD, "temperature": None, "top_k": None, "top_p": None, "seed": None, "stop": None}),
    ("text parts", {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi "},
                                                              {"type": "text", "text": "fox"}]}], "max_tokens": 3}),
    ("brackets inside a string", {"messages": [{"role": "user", "content": "[" * 40}], "max_tokens": 3}),
    ("max_completion_tokens", {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 2}),
    ("stream true", {**GOOD, "stream": True}),
    ("n = 1, top_p 0 and 1", {**GOOD, "n": 1, "top_p": 0}),
    ("negative seed", {**GOOD, "seed": -2**63}),
]


def check_answer(route, r):
    """A probe answer is acceptable: 2xx, or 4xx JSON in the route's error shape; streams end properly."""
    assert 200 <= r.status_code < 300 or 400 <= r.status_code < 500, r.status_code
    if r.headers["content-type"].startswith("text/event-stream"):
        assert r.status_code == 200
        events = sse_events(r.text.splitlines())
        assert events[-1] == ({"done": True} if route == "/chat/completions" else "[DONE]")
        return
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    if r.status_code >= 400:
        if route == "/chat/completions":
            assert set(body) == {"detail"} and isinstance(body["detail"], str) and body["detail"]
        else:
            assert set(body["error"]) == {"message", "type", "param", "code"} and body["error"]["message"]


@pytest.mark.parametrize("route", ["/chat/completions", "/v1/chat/completions"])
def test_hostile_input_probe(client, route):
    cases = [(name, json.dumps(body).encode(), 400) for name, body in BAD_BODIES] + \
        [(name, raw, 413 if "oversized" in name else 400) for name, raw in BAD_RAW] + \
        [(name, json.dumps(body).encode(), 200) for name, body in ACCEPTED]
    assert len(cases) >= 60
    for name, raw, status in cases:
        r = client.post(route, content=raw, headers={"content-type": "application/json"})
        check_answer(route, r)
        assert r.status_code == status, (name, r.status_code, r.text[:200])
    r = client.post(route, content=b"{}", headers={"content-length": str(10**12)})  # a lying Content-Length
    assert r.status_code in (400, 413)
    for method in ("GET", "PUT", "PATCH", "DELETE"):  # wrong method: still JSON in the route's shape
        r = client.request(method, route)
        check_answer(route, r)
        assert r.status_code == 405 and r.headers["allow"] == "POST", (method, r.text)



# -----------------------------------------------------------------------------
# The parser: the one-pass scan against independent counts, encodings, time


def naive_shape(text):
    """Character by character, as a JSON parser reads it: (deepest nesting, structural characters)."""
    depth = deepest = elements = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            in_string, escaped = (True, False) if escaped else (ch != '"', ch == "\\")
        elif ch == '"':
            in_string = True
        elif ch in ",:[]{}":
            elements += 1
            depth += (ch in "[{") - (ch in "]}")
            deepest = max(deepest, depth)
    return deepest, elements


def object_shape(obj):
    """(nesting, brackets + commas + colons) of json.dumps(obj), from the object itself."""
    if isinstance(obj, list):
        inner = [object_shape(x) for x in obj]
        return 1 + max([d for d, _ in inner], default=0), 2 + max(len(obj) - 1, 0) + sum(n for _, n in inner)
    if isinstance(obj, dict):
        inner = [object_shape(x) for x in obj.values()]
        return 1 + max([d for d, _ in inner], default=0), 2 + 2 * len(obj) - bool(obj) + sum(n for _, n in inner)
    return 0, 0


def test_json_shape_equals_independent_counts():
    rng = random.Random(0)
    pieces = ["a", "∀", "é", " ", "[", "]", "{", "}", ",", ":", '\\"', "\\\\", "\\n", "\\u0022", "\\/", "\\\\\\\""]
    for _ in range(3000):
        parts = []
        for _ in range(rng.randint(0, 12)):
            if rng.random() < 0.4:
                parts.append('"' + "".join(rng.choice(pieces) for _ in range(rng.randint(0, 6))) + '"')
            else:
                parts.append(rng.choice(["[", "]", "{", "}", ",", ":", " ", "1", "∀", "null"]))
        if rng.random() < 0.2:  # an unterminated string at the end
            parts.append('"' + "".join(rng.choice(pieces) for _ in range(3)))
        text = "".join(parts)
        assert json_shape(text.encode()) == naive_shape(text), text

    def random_value(depth):
        kind = rng.choice(["list", "dict", "str", "num"] if depth < 8 else ["str", "num"])
        if kind == "list":
            return [random_value(depth + 1) for _ in range(rng.randint(0, 4))]
        if kind == "dict":
            return {rng.choice(['k', '"[{', '\\"]', 'é']) + str(i): random_value(depth + 1) for i in range(rng.randint(0, 4))}
        return rng.choice(['"', '\\', '\\"', '[{', 'a"]}\\\\', "∀"]) if kind == "str" else rng.random()

    for _ in range(500):
        obj = random_value(0)
        assert json_shape(json.dumps(obj, ensure_ascii=rng.random() < 0.5).encode()) == object_shape(obj)


@pytest.mark.parametrize("route", ROUTES)
def test_only_utf8_bodies(client, route):
    body = {"messages": [{"role": "user", "content": "hi ∀"}], "max_tokens": 2}
    assert client.post(route, content=json.dumps(body, ensure_ascii=False).encode()).status_code == 200
    for encoding in ("utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-le", "utf-32-be", "utf-8-sig"):
        r = client.post(route, content=json.dumps(body).encode(encoding))
        message = r.json()["detail"] if route == "/chat/completions" else r.json()["error"]["message"]
        assert r.status_code == 400 and "UTF-8" in message, (encoding, message)
    r = client.post(route, content=b'{"messages": "\xc3\x28"}')  # an invalid UTF-8 sequence
    assert r.status_code == 400 and "not valid UTF-8" in r.text


def fill(prefix, unit, suffix=""):
    """prefix + unit * n + suffix, as long as fits in MAX_BODY_BYTES."""
    head, tail = prefix.encode(), suffix.encode()
    return head + unit.encode() * ((MAX_BODY_BYTES - len(head) - len(tail)) // len(unit.encode())) + tail


SLOW_TO_PARSE = {  # 1 MiB bodies that a regex or a recursive parser would choke on
    "escaped quotes, unterminated": fill('{"messages":"', '\\"'),
    "escaped quotes, closed": fill('{"messages":"', '\\"', '"}'),
    "backslashes": fill('{"messages":"', "\\\\", '"}'),
    "quotes": fill("", '"'),
    "empty strings": fill("[", '"",', '""]'),
    "flat brackets": fill("[", "[],", "[]]"),
    "open brackets": fill("", "["),
    "brackets in a string": fill('{"messages":"', "[{"),
    "many keys": fill("{", '"k":1,', '"k":1}'),
    "unicode escapes": fill('{"messages":"', "\\u2200", '"}'),
    "non-ASCII": fill('{"messages":"', "∀", '"}'),
    "whitespace": fill("", " ", "{}"),
}


def test_bodies_built_to_be_slow_parse_in_linear_time(live_server):
    """Each 1 MiB body is answered within a few times a plain 1 MiB body (one long string), and /health keeps
    answering while they are parsed. Minimums of interleaved repeats, so a busy machine slows both sides."""
    import httpx
    plain = fill('{"messages":[{"role":"user","content":"', "a", '"}]}')
    client = httpx.Client(timeout=30)

    def post(body):
        t0 = time.perf_counter()
        r = client.post(live_server + "/v1/chat/completions", content=body)
        assert r.status_code == 400 and r.json()["error"]["message"], r.text[:200]
        return time.perf_counter() - t0

    best = {name: float("inf") for name in ["plain", *SLOW_TO_PARSE]}
    for _ in range(3):
        for name, body in [("plain", plain), *SLOW_TO_PARSE.items()]:
            assert len(body) <= MAX_BODY_BYTES
            best[name] = min(best[name], post(body))
    print("1 MiB bodies, best of 3 (ms): " + ", ".join(f"{name} {t * 1000:.1f}" for name, t in best.items()))
    slow = {name: round(t / best["plain"], 1) for name, t in best.items() if t > 8 * best["plain"]}
    assert not slow, f"slower than 8x a plain body ({best['plain'] * 1000:.0f} ms): {slow}"

    def health_latencies(body):
        stop, latencies = threading.Event(), []
        sender = threading.Thread(target=lambda: [post(body) for _ in iter(stop.is_set, True)])
        sender.start()
        with httpx.Client(timeout=5) as c:
            for _ in range(25):
                t0 = time.perf_counter()
                assert c.get(live_server + "/health").status_code == 200
                latencies.append(time.perf_counter() - t0)
                time.sleep(0.01)
        stop.set()
        sender.join()
        return np.percentile(latencies, 90)

    baseline = health_latencies(plain)
    for name in ("open brackets", "empty strings", "escaped quotes, unterminated"):
        p90 = health_latencies(SLOW_TO_PARSE[name])
        print(f"/health p90 while {name} bodies arrive: {p90 * 1000:.1f} ms (plain bodies: {baseline * 1000:.1f} ms)")
        assert p90 < max(0.1, 3 * baseline), (name, p90, baseline)


def mutate(rng, raw):
    """One random edit of a body: bytes flipped, inserted, deleted, repeated or cut, values swapped for values of
    other types, or the whole re-encoded."""
    op = rng.randrange(8)
    i, j = sorted(rng.randrange(len(raw) + 1) for _ in range(2))
    if op == 0:
        return raw[:i] + bytes([rng.randrange(256)]) + raw[i + 1:]
    if op == 1:
        return raw[:i] + rng.choice([b'"', b"\\", b"[", b"]", b"{", b"}", b",", b":", b"\x00", b"\xff", b"\xe2\x88",
                                     b"-", b"e9", b"0" * 30, b"\\u", b"\\ud800", b"NaN", b"true"]) + raw[i:]
    if op == 2:
        return raw[:i] + raw[j:]
    if op == 3:
        return raw[:j] + raw[i:j] * rng.randint(2, 50) + raw[j:]
    if op == 4:
        return raw[:i]
    if op == 5:
        return raw.decode("utf-8", "replace").encode(rng.choice(["utf-16", "utf-16-le", "utf-32", "utf-8-sig"]))
    body = json.loads(raw)
    odd = [None, True, -1, 0, 2**70, 1e308, -1e-300, 5e-324, "", "∀" * 9000, [], {}, [[[]]], {"role": "user"},
           [{"role": "user", "content": "x"}] * 600, [{"type": "text", "text": ""}], "\ud800"]
    if op == 6 and isinstance(body, dict) and body:
        body[rng.choice(list(body))] = rng.choice(odd)
    elif isinstance(body, dict) and isinstance(body.get("messages"), list) and body["messages"]:
        message = rng.choice(body["messages"])
        if isinstance(message, dict):
            message[rng.choice(["role", "content", "name"])] = rng.choice(odd + ["system", "assistant", "tool"])
    return json.dumps(body).encode("utf-8", "surrogatepass")


VALID = [
    {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "fox"}], "max_tokens": 2,
     "temperature": 0.5, "top_k": 5, "top_p": 0.9, "seed": 3},
    {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                  {"role": "user", "content": [{"type": "text", "text": "café"}]}], "max_tokens": 2, "stream": True},
    {"model": "x", "messages": [{"role": "user", "content": "∀ x"}], "max_completion_tokens": 2, "n": 1,
     "stream": False, "temperature": 0},
]


def test_fuzz_random_mutations_of_valid_bodies(client):
    """About 2000 random mutations (1-3 edits each) of valid bodies, on both routes, within a time bound: every
    answer 2xx or 4xx JSON in the route's shape, streams ending with their terminal event."""
    rng = random.Random(0)
    seen, deadline = {}, time.time() + 60
    for n in range(2000):
        if time.time() > deadline:
            break
        route = ROUTES[n % 2]
        raw = json.dumps(rng.choice(VALID)).encode()
        for _ in range(rng.randint(1, 3)):
            try:
                raw = mutate(rng, raw)
            except ValueError:  # a JSON edit on a body that is no longer JSON: keep the bytes as they are
                pass
        r = client.post(route, content=raw)
        check_answer(route, r)
        seen[r.status_code] = seen.get(r.status_code, 0) + 1
    assert n >= 1000 and seen.get(200, 0) >= 20 and seen.get(400, 0) > 500, seen


# -----------------------------------------------------------------------------
# Outside the routes: 404, 405, HEAD, absolute-form targets; sampling at tiny temperatures


def test_errors_outside_the_routes_are_json_in_the_route_shape(client):
    for path in ("/v1/nope", "/v1", "/v1/chat/completions/x", "/v1/models/%00"):
        r = client.get(path)
        assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}, path
    r = client.get("/nope")
    assert r.status_code == 404 and set(r.json()) == {"detail"}
    r = client.post("/v1/models")
    assert r.status_code == 405 and r.json()["error"]["message"].startswith("method not allowed: POST /v1/models")
    for path in ("/health", "/stats", "/v1/models", "/"):
        r = client.head(path)
        assert r.status_code == 200 and r.content == b"", path
    r = client.head("/v1/chat/completions")
    assert r.status_code == 405


def test_absolute_form_request_line(live_server):
    host, port = live_server.removeprefix("http://").split(":")
    for target, want in [(f"http://{host}:{port}/v1/models", b'"object":"list"'),
                         (f"HTTP://{host}:{port}/health?x=1", b'"status":"ok"'),
                         (f"http://{host}:{port}", b'<html'),
                         (f"http://{host}:{port}/v1/nope", b'"error":{"message":"no such route')]:
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall(f"GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
            reply = b"".join(iter(lambda: s.recv(65536), b""))
        assert want in reply, (target, reply[:300])
        assert reply.startswith(b"HTTP/1.1 404" if "nope" in target else b"HTTP/1.1 200"), (target, reply[:100])


@pytest.mark.parametrize("route", ROUTES)
def test_tiny_temperatures_give_the_greedy_reply(client, route):
    def reply(temperature):
        body = {"messages": [{"role": "user", "content": "quick fox"}], "max_tokens": 12, "temperature": temperature,
                "seed": 5, "stream": True}
        with client.stream("POST", route, json=body) as r:
            events = sse_events(r.iter_lines())
        return "".join(e["token"] if "token" in e else e["choices"][0]["delta"].get("content", "")
                       for e in events[:-1])

    greedy = reply(0)
    assert greedy and all(reply(t) == greedy for t in (1e-39, 5e-324, 1e-300))


def test_requests_that_are_not_http_get_json_too(live_server):
    """uvicorn answers these itself, before the app sees them: a 400, in JSON like every other error."""
    host, port = live_server.removeprefix("http://").split(":")
    for raw in (b"GARBAGE\r\n\r\n", b"GET /health HTTP/1.1\r\n\r\n",  # no Host header
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello"):
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall(raw)
            reply = b"".join(iter(lambda: s.recv(65536), b""))
        head, _, body = reply.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 400") and b"content-type: application/json" in head.lower(), reply
        assert json.loads(body)["error"]["message"].startswith("invalid HTTP request"), reply
