"""
Serve a chat model over HTTP: a single-page chat UI, a streaming endpoint for it and an OpenAI-compatible API.

Launch:
    python -m scripts.chat_web                       # one replica (GPU 0, or CPU/MPS), http://localhost:8000
    python -m scripts.chat_web -n 8                  # 8 GPUs: one model replica per GPU, requests spread over them
    python -m scripts.chat_web -i mid -p 8080 --host 127.0.0.1 --max-rows 16
    python -m scripts.chat_web --serve-mode worker   # one request at a time per replica (for comparison)

Each replica batches up to --max-rows requests in one decode loop (nanochat.batch_engine.BatchEngine): a request
joins once its prompt is processed and leaves at its stop token or max_tokens; up to --max-queue more wait,
beyond that the answer is 429 with Retry-After. A disconnected client frees its row at the next decode step.
Each replica's decode loop runs in a process of its own (nanochat.engine_process), so that it never waits on the
GIL for the server's event loop.

Routes:
    GET  /, GET /logo.svg       the chat UI (nanochat/ui.html) and its logo
    POST /chat/completions      the UI's stream: data: {"token": "...", "gpu": i} ... data: {"done": true}
    GET  /health, GET /stats    readiness; queue depth, active rows and recent tok/s per replica
    POST /v1/chat/completions   OpenAI-compatible, stream or not: OpenAI(base_url="http://localhost:8000/v1",
                                api_key="none").chat.completions.create(model="nanochat", messages=[...])
    GET  /v1/models             the one model served

Both POST routes validate temperature, top_k (`extra_body={"top_k": 20}` in the openai client), top_p, seed
(default: a fresh random one per request), max_tokens (or max_completion_tokens), n (only 1) and stream (a
boolean); bodies are UTF-8 JSON, parsed in linear time (nanochat/chat_request.py). Every error is JSON:
{"error": {"message", "type", "param", "code"}} under /v1 (404 and 405 included), {"detail": "..."} elsewhere.
The GET routes answer HEAD too. A stream always ends with its terminal event ({"done": true} or [DONE]), after
an in-band error event if generation failed. Tool calls (calculator) appear in the text as their literal
special tokens.
"""

import os
if __name__ == "__main__":  # run as the server: before torch loads OpenMP (it reads this once, at load)
    # idle OpenMP threads that spin take the 2 cores from the event loop and the engine thread: with them passive,
    # 8 clients' TTFT p50 measured 23 vs 36 ms and tok/s +30% (bench_serve on 2 cores)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import sys
import json
import time
import uuid
import queue
import asyncio
import argparse
import threading
from dataclasses import dataclass
from contextlib import asynccontextmanager
from urllib.parse import unquote, urlsplit

from nanochat.chat_request import (RequestError, MAX_TEMPERATURE, MIN_TEMPERATURE, MAX_TOP_K, MIN_TOP_K,
                                   MAX_MAX_TOKENS, MIN_MAX_TOKENS, parse_body, read_body, safe_text)

parser = argparse.ArgumentParser(description="Chat web server (UI + OpenAI-compatible API)")
parser.add_argument("-n", "--num-gpus", type=int, default=1, help="model replicas, one per GPU (CUDA only if > 1)")
parser.add_argument("-i", "--source", type=str, default="sft", help="checkpoint source: base|mid|sft|rl, or hf:DIR (an exported model)")
parser.add_argument("-t", "--temperature", type=float, default=0.8, help="default sampling temperature")
parser.add_argument("-k", "--top-k", type=int, default=50, help="default top-k (0 = no filter)")
parser.add_argument("--top-p", type=float, default=1.0, help="default nucleus top-p (1 = no filter)")
parser.add_argument("-m", "--max-tokens", type=int, default=512, help="default max tokens per reply")
parser.add_argument("-g", "--model-tag", type=str, default=None, help="model tag to load (default: largest)")
parser.add_argument("-s", "--step", type=int, default=None, help="checkpoint step (default: last)")
parser.add_argument("-p", "--port", type=int, default=8000, help="port to listen on")
parser.add_argument("--host", type=str, default="0.0.0.0", help="interface to bind")
parser.add_argument("--device-type", type=str, default="", help="cuda|cpu|mps (default: autodetect)")
parser.add_argument("-d", "--dtype", type=str, default="", help="bfloat16|float16|float32 (default: project policy)")
parser.add_argument("--serve-mode", type=str, default="batch", choices=["batch", "worker"],
                    help="batch: continuous batching of --max-rows requests per replica; worker: one at a time")
parser.add_argument("--max-rows", type=int, default=8, help="requests decoded together per replica (batch mode)")
parser.add_argument("--max-queue", type=int, default=64, help="requests waiting per replica before 429")

DISCONNECT_CHECK_S = 0.2  # how often a streaming reply asks whether its client is still there
PARSE_OFF_LOOP_BYTES = 64 << 10  # bodies above this are parsed in a worker thread, so /health and streams go on

UI_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "nanochat", "ui.html")
LOGO_PATH = os.path.join(os.path.dirname(UI_PATH), "logo.svg")

# -----------------------------------------------------------------------------
# Replicas: one model copy each, with its own decode loop


@dataclass
class Replica:
    gpu_id: int
    device: str
    engine: object      # BatchEngine or EngineProcess (started, if not yet, and stopped by the app's lifespan)
    tokenizer: object   # nanochat.tokenizer.RustBPETokenizer
    context_len: int    # prompt + reply may not exceed the positions the model was trained for


def make_replica(gpu_id, device, model, tokenizer, max_rows=8, max_queue=64, process=False):
    """process: run the decode loop in a child process (EngineProcess, what the server runs), with the model on
    `device` there; else in a thread of this process (BatchEngine, the model where it is: tests)."""
    import torch
    from nanochat.batch_engine import BatchEngine
    from nanochat.engine_process import EngineProcess
    model.eval()
    # on a CPU the decode steps leave one core to the server's event loop: a BLAS call split over every core waits
    # for whichever thread the OS put off to run the loop. d4 on 2 cores, bench_serve at 8 clients, interleaved:
    # 2,375-2,381 tok/s on 1 thread vs 1,938-2,118 on 2. So do small prefills; large ones use every core
    decode_threads = max(1, torch.get_num_threads() - 1) if torch.device(device).type == "cpu" else None
    engine = EngineProcess(model, tokenizer, max_rows=max_rows, max_queue=max_queue, device=device,
                           decode_threads=decode_threads) if process \
        else BatchEngine(model, tokenizer, max_rows=max_rows, max_queue=max_queue, decode_threads=decode_threads)
    return Replica(gpu_id, str(device), engine, tokenizer, model.config.sequence_len)


@dataclass
class ServeConfig:
    temperature: float = 0.8
    top_k: int = 50
    top_p: float = 1.0
    max_tokens: int = 512
    model_name: str = "nanochat"
    serve_mode: str = "batch"


def log(text):
    """Console logging that no client string can break (unencodable characters, a closed stdout)."""
    encoding = sys.stdout.encoding or "utf-8"
    try:
        print(text.encode(encoding, "backslashreplace").decode(encoding), flush=True)
    except (OSError, ValueError):
        pass

# -----------------------------------------------------------------------------
# Generation: the replica's decode loop produces tokens and wakes the reply's coroutine on its event loop


class Reply:
    """One request on the least busy replica: its prompt, its engine stream, its text and outcome."""

    def __init__(self, replicas, request):
        from nanochat.batch_engine import QueueFull
        from nanochat.engine_process import EngineStopped
        self.replica = min(replicas, key=lambda r: (lambda s: s["active_rows"] + s["queue_depth"])(r.engine.stats()))
        try:  # the tokenizer's chat renderer checks the conversation rules and builds the prompt
            self.prompt = self.replica.tokenizer.render_for_completion(
                {"messages": request.messages + [{"role": "assistant", "content": ""}]})
        except ValueError as e:
            raise RequestError(str(e), "messages")
        room = self.replica.context_len - len(self.prompt)
        if room <= 0:
            raise RequestError(f"conversation is {len(self.prompt)} tokens but the model's context is "
                               f"{self.replica.context_len}; start a new conversation or shorten it", "messages")
        self.prompt_tokens = len(self.prompt)
        # top_p 0 (allowed by the OpenAI API) keeps only the most likely token, as top_k 1 does; top_p 1 = None
        top_k, top_p = (1, None) if request.top_p == 0 else (request.top_k or None, request.top_p)
        top_p = top_p if top_p is not None and top_p < 1.0 else None
        try:  # a reply cut at the context's end finishes with finish_reason "length"
            self.stream = self.replica.engine.submit(self.prompt, min(request.max_tokens, room), seed=request.seed,
                                                     temperature=request.temperature, top_k=top_k, top_p=top_p)
        except ValueError as e:  # a combination the engine refuses
            raise RequestError(str(e))
        except EngineStopped as e:  # the replica's engine process died
            raise RequestError(f"the model is not available: {e}", status=503)
        except QueueFull:
            stats = self.replica.engine.stats()
            wait = 1 + stats["queue_depth"] // max(1, stats["max_rows"])  # rough: a second per batch queued ahead
            raise RequestError(f"the server is busy ({stats['queue_depth']} requests waiting); retry in {wait} s",
                               status=429, headers={"Retry-After": str(wait)})
        self.text, self.completion_tokens = "", 0

    @property
    def finish_reason(self):
        return self.stream.finish_reason

    async def pieces(self, http_request):
        """Text pieces as tokens arrive, never splitting a UTF-8 character; under load one piece carries every
        token that arrived since the last. Stops early when the client has gone; the stream is cancelled on exit
        either way, which frees its row at the next decode step."""
        loop, ready, scheduled = asyncio.get_running_loop(), asyncio.Event(), threading.Event()

        def wake():
            scheduled.clear()
            ready.set()

        def on_put():  # in the decode thread: wake this coroutine at most once per batch of tokens, no thread of ours
            if not scheduled.is_set():
                scheduled.set()
                try:
                    loop.call_soon_threadsafe(wake)
                except RuntimeError:  # the event loop is gone (server shutting down)
                    pass

        def tick():  # wakes the loop below every DISCONNECT_CHECK_S, to look for a client that has gone
            nonlocal ticker
            ready.set()
            ticker = loop.call_later(DISCONNECT_CHECK_S, tick)

        tok, pending, texts, finished = self.replica.tokenizer, [], [], False
        next_check = loop.time() + DISCONNECT_CHECK_S
        self.stream.on_put = on_put
        ready.set()  # tokens that arrived before on_put was set are read at once
        # one timer per reply, not asyncio.wait_for per token (a task and a timer each: ~15 us of the event loop's
        # time per token, which the decode thread waits on for the GIL)
        ticker = loop.call_later(DISCONNECT_CHECK_S, tick)
        try:
            while not finished:
                await ready.wait()
                ready.clear()
                if loop.time() >= next_check:
                    next_check = loop.time() + DISCONNECT_CHECK_S
                    if await http_request.is_disconnected():
                        return
                while not finished:
                    try:
                        token = self.stream.get_nowait()
                    except queue.Empty:
                        break
                    finished = token is None
                    if not finished:
                        pending.append(token)
                        self.completion_tokens += 1
                text = tok.decode(pending)  # hold back while it ends in half a UTF-8 character
                if text and (finished or not text.endswith("\ufffd")):
                    texts.append(text)
                    pending = []
                    yield text
            if self.stream.finish_reason == "error":
                raise RuntimeError(self.stream.error)
        finally:
            ticker.cancel()
            self.text = "".join(texts)
            self.stream.cancel()


def log_exchange(request, reply):
    lines = ["=" * 40] + [f"[{m['role']}]: {m['content']}" for m in request.messages]
    lines.append(f"[assistant, gpu {reply.replica.gpu_id}, {reply.completion_tokens} tokens, {reply.finish_reason}]: "
                 f"{reply.text}")
    log("\n".join(lines))

# -----------------------------------------------------------------------------
# The app


def is_api(path):
    return path == "/v1" or path.startswith("/v1/")


class AbsoluteFormTargets:
    """ASGI middleware: a request line may name its target in absolute form (`GET http://host/v1/models
    HTTP/1.1`, what clients send to a proxy), which a server must accept (RFC 9112, section 3.2.2); uvicorn
    passes the whole URL on as the path, so it is cut down to the path here."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"][:8].lower().startswith(("http://", "https://")):
            raw = urlsplit((scope.get("raw_path") or scope["path"].encode()).decode("latin-1")).path or "/"
            scope = {**scope, "path": unquote(raw), "raw_path": raw.encode("latin-1")}
        await self.app(scope, receive, send)


def create_app(replicas, config=None):
    """`replicas`: a list of Replica, or a zero-argument callable returning one (called at start-up, so the
    models load inside the server's lifespan)."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.middleware.cors import CORSMiddleware
    from fastapi.responses import JSONResponse, StreamingResponse, HTMLResponse, Response
    from starlette.exceptions import HTTPException

    config = config or ServeConfig()

    @asynccontextmanager
    async def lifespan(app):
        loaded = replicas() if callable(replicas) else replicas
        if not loaded:
            raise RuntimeError("no model replicas to serve with")
        for r in loaded:
            r.engine.start()
        app.state.replicas = loaded
        log(f"serving {config.model_name} ({config.serve_mode} mode) on {len(loaded)} replica(s): "
            f"{', '.join(r.device for r in loaded)}")
        yield
        app.state.replicas = None
        for r in loaded:
            r.engine.stop()

    app = FastAPI(title="nanochat", lifespan=lifespan)
    app.state.replicas = None
    app.add_middleware(CORSMiddleware, allow_origins=["*"], allow_credentials=True,
                       allow_methods=["*"], allow_headers=["*"])
    app.add_middleware(AbsoluteFormTargets)  # added last: the outermost, so routing sees the plain path

    def openai_error(e):
        kind = {429: "rate_limit_error"}.get(e.status, "server_error" if e.status >= 500 else "invalid_request_error")
        return JSONResponse({"error": {"message": e.message, "type": kind, "param": e.param, "code": None}},
                            status_code=e.status, headers=e.headers)

    def reference_error(e):
        return JSONResponse({"detail": e.message}, status_code=e.status, headers=e.headers)

    def error_for(request, e):
        """Every error is JSON in the shape of where it happened: OpenAI's under /v1, {"detail"} elsewhere."""
        return openai_error(e) if is_api(request.url.path) else reference_error(e)

    @app.exception_handler(HTTPException)
    async def http_error(request, exc):  # no such route (404), wrong method (405), ...
        where = f"{request.method} {safe_text(request.url.path)[:200]}"
        message = {404: f"no such route: {where}" + (" (the API has POST /v1/chat/completions and GET /v1/models)"
                                                     if is_api(request.url.path) else ""),
                   405: f"method not allowed: {where}; allowed: {(exc.headers or {}).get('Allow', '')}"}
        return error_for(request, RequestError(message.get(exc.status_code, str(exc.detail)), status=exc.status_code,
                                               headers=exc.headers))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc):
        first = exc.errors()[0] if exc.errors() else {}
        return error_for(request, RequestError(f"invalid request: {first.get('msg', exc)}", status=422))

    @app.exception_handler(Exception)
    async def unexpected(request, exc):  # a bug, not bad input: still JSON, in the route's shape
        log(f"internal error on {request.url.path}: {exc!r}")
        return error_for(request, RequestError(f"internal server error: {type(exc).__name__}", status=500))

    async def start_reply(http_request, roles, streams_only=False):
        """The prologue both POST routes share: read, validate and submit. Raises RequestError."""
        raw = await read_body(http_request)
        if len(raw) > PARSE_OFF_LOOP_BYTES:
            req = await asyncio.to_thread(parse_body, raw, config, roles)
        else:
            req = parse_body(raw, config, roles)
        if streams_only and req.stream is False:  # refused before anything reaches the engine
            raise RequestError("this route always streams; use /v1/chat/completions for one JSON reply", "stream")
        if not app.state.replicas:
            raise RequestError("the server is still loading its model; retry shortly", status=503,
                               headers={"Retry-After": "5"})
        return req, Reply(app.state.replicas, req)

    def sse(obj):
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    async def event_stream(req, reply, http_request, head, piece_event, end_events, error_event, terminal):
        """SSE body: `head`, one event per text piece, then `end_events()`, or `error_event` if generation
        failed; the route's terminal event comes last either way."""
        for event in head:
            yield event
        try:
            async for piece in reply.pieces(http_request):
                yield sse(piece_event(piece))
            log_exchange(req, reply)
            for event in end_events():
                yield event
        except Exception as e:  # headers are out already: report in-band, then end the stream properly
            log(f"generation failed: {e!r}")
            yield sse(error_event(safe_text(f"generation failed: {e}")))
        yield terminal

    @app.api_route("/", methods=["GET", "HEAD"])
    async def root():
        with open(UI_PATH, encoding="utf-8") as f:
            return HTMLResponse(f.read())

    @app.api_route("/logo.svg", methods=["GET", "HEAD"])
    async def logo():
        with open(LOGO_PATH, encoding="utf-8") as f:
            return Response(f.read(), media_type="image/svg+xml")

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health():
        loaded = app.state.replicas or []
        return {"status": "ok", "ready": bool(loaded), "num_gpus": len(loaded), "serve_mode": config.serve_mode}

    @app.api_route("/stats", methods=["GET", "HEAD"])
    async def stats():
        per_replica = [{"gpu_id": r.gpu_id, "device": r.device, **r.engine.stats()} for r in app.state.replicas or []]
        totals = {key: sum(s[key] for s in per_replica)
                  for key in ("queue_depth", "active_rows", "max_rows", "tok_per_s", "total_tokens")}
        return {"serve_mode": config.serve_mode, **totals, "replicas": per_replica}

    @app.post("/chat/completions")
    async def chat_completions(request: Request):
        try:
            req, reply = await start_reply(request, roles=("user", "assistant"), streams_only=True)
        except RequestError as e:
            return reference_error(e)
        body = event_stream(req, reply, request, [], lambda piece: {"token": piece, "gpu": reply.replica.gpu_id},
                            lambda: [], lambda message: {"error": message}, sse({"done": True}))
        return StreamingResponse(body, media_type="text/event-stream")

    @app.api_route("/v1/models", methods=["GET", "HEAD"])
    async def list_models():
        return {"object": "list", "data": [{"id": config.model_name, "object": "model",
                                            "created": int(time.time()), "owned_by": "nanochat"}]}

    @app.post("/v1/chat/completions")
    async def openai_chat_completions(request: Request):
        try:
            req, reply = await start_reply(request, roles=("system", "user", "assistant"))
        except RequestError as e:
            return openai_error(e)
        completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if not req.stream:
            try:
                async for _ in reply.pieces(request):
                    pass
            except RuntimeError as e:
                log(f"generation failed: {e!r}")
                return openai_error(RequestError(f"generation failed: {e}", status=500))
            log_exchange(req, reply)
            return {"id": completion_id, "object": "chat.completion", "created": created, "model": config.model_name,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": reply.text},
                                 "finish_reason": reply.finish_reason}],
                    "usage": {"prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens,
                              "total_tokens": reply.prompt_tokens + reply.completion_tokens}}

        def chunk(delta, finish_reason=None):
            return {"id": completion_id, "object": "chat.completion.chunk", "created": created,
                    "model": config.model_name, "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}

        body = event_stream(req, reply, request, [sse(chunk({"role": "assistant", "content": ""}))],
                            lambda piece: chunk({"content": piece}), lambda: [sse(chunk({}, reply.finish_reason))],
                            lambda message: {"error": {"message": message, "type": "server_error", "param": None,
                                                       "code": None}}, "data: [DONE]\n\n")
        return StreamingResponse(body, media_type="text/event-stream")

    return app

# -----------------------------------------------------------------------------
# Loading checkpoints into replicas


def load_replicas(args):
    """One replica per GPU on CUDA; a single one on CPU/MPS."""
    import torch
    from nanochat.common import autodetect_device_type, resolve_precision
    from nanochat.model_loader import load_model
    device_type = args.device_type or autodetect_device_type()
    if args.num_gpus > 1:
        if device_type != "cuda":
            raise SystemExit(f"--num-gpus={args.num_gpus} needs CUDA; on {device_type} run with -n 1")
        if args.num_gpus > torch.cuda.device_count():
            raise SystemExit(f"--num-gpus={args.num_gpus} but only {torch.cuda.device_count()} GPU(s) are visible")
    dtype, _, _ = resolve_precision(device_type, args.dtype or None, training=False, verbose=False)
    max_rows = 1 if args.serve_mode == "worker" else args.max_rows
    # loaded (and checked) here on the CPU, once; each replica's engine process puts it on its device
    log(f"loading {args.source} model...")
    model, tokenizer, _ = load_model(args.source, "cpu", phase="eval", model_tag=args.model_tag, step=args.step,
                                     dtype=dtype)
    replicas = []
    for i in range(args.num_gpus):
        device = torch.device("cuda", i) if device_type == "cuda" else torch.device(device_type)
        log(f"starting replica {i} on {device}...")
        replica = make_replica(i, device, model, tokenizer, max_rows, args.max_queue, process=True)
        try:
            replica.engine.start()
        except RuntimeError as e:
            raise SystemExit(f"chat_web: replica {i} on {device} cannot start: {e}")
        replicas.append(replica)
    return replicas


def json_http_protocol():
    """uvicorn's h11 protocol, with the 400 it sends itself for a request that is not valid HTTP (no Host
    header, a garbled request line, two Content-Lengths) written as JSON like every other error."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class JsonErrorsH11Protocol(H11Protocol):
        def send_400_response(self, msg):
            body = json.dumps({"error": {"message": f"invalid HTTP request: {msg}", "type": "invalid_request_error",
                                         "param": None, "code": None}}).encode()
            try:
                headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                           (b"connection", b"close")]
                for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"), h11.Data(data=body),
                              h11.EndOfMessage()):
                    self.transport.write(self.conn.send(event))
                self.transport.close()
            except Exception:  # an h11 state this does not expect: uvicorn's own plain-text answer
                super().send_400_response(msg)

    return JsonErrorsH11Protocol


def serve_in_thread(app, host="127.0.0.1", port=0):
    """Run `app` with uvicorn in a background thread (tests, benchmarks): (base url, stop function)."""
    import uvicorn
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", http=json_http_protocol()))
    thread = threading.Thread(target=server.run, daemon=True, name="uvicorn")
    thread.start()
    deadline = time.time() + 60
    while not server.started:
        if not thread.is_alive() or time.time() > deadline:
            raise RuntimeError("uvicorn did not start (see its log above)")
        time.sleep(0.02)

    def stop():
        server.should_exit = True
        thread.join(30)
    return f"http://{host}:{server.servers[0].sockets[0].getsockname()[1]}", stop


def main():
    import uvicorn
    from nanochat.common import init_script
    args = parser.parse_args()
    init_script()
    for flag, value, lo, hi in [("--temperature", args.temperature, MIN_TEMPERATURE, MAX_TEMPERATURE),
                                ("--top-k", args.top_k, MIN_TOP_K, MAX_TOP_K), ("--top-p", args.top_p, 0.0, 1.0),
                                ("--max-tokens", args.max_tokens, MIN_MAX_TOKENS, MAX_MAX_TOKENS),
                                ("--num-gpus", args.num_gpus, 1, 1024), ("--max-rows", args.max_rows, 1, 4096),
                                ("--max-queue", args.max_queue, 0, 10**6)]:
        if not lo <= value <= hi:
            raise SystemExit(f"{flag} must be between {lo} and {hi}, got {value}")
    name = f"nanochat-{args.source}" + (f"-{args.model_tag}" if args.model_tag else "")
    config = ServeConfig(args.temperature, args.top_k, args.top_p, args.max_tokens, name, args.serve_mode)
    app = create_app(load_replicas(args), config)  # load first: a bad checkpoint exits with its one line
    log(f"chat UI at http://localhost:{args.port}/  OpenAI API at http://localhost:{args.port}/v1")
    uvicorn.run(app, host=args.host, port=args.port, http=json_http_protocol())


if __name__ == "__main__":
    main()
