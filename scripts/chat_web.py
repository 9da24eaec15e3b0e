"""
Serve a chat model over HTTP: a single-page chat UI, the reference's streaming endpoint and an
OpenAI-compatible API (REFERENCE 10.6-10.8, decision D13).

Launch:
    python -m scripts.chat_web                       # one worker (GPU 0, or CPU/MPS), http://localhost:8000
    python -m scripts.chat_web -n 8                  # 8 GPUs: one model replica per GPU, requests spread over them
    python -m scripts.chat_web -i mid -p 8080 --host 127.0.0.1

Routes:
    GET  /                      the chat UI (nanochat/ui.html)
    GET  /logo.svg              the logo
    POST /chat/completions      reference stream: data: {"token": "...", "gpu": i} ... data: {"done": true}
    GET  /health, GET /stats    readiness and worker-pool occupancy
    POST /v1/chat/completions   OpenAI-compatible, stream or not
    GET  /v1/models             the one model served

OpenAI client example:
    from openai import OpenAI
    client = OpenAI(base_url="http://localhost:8000/v1", api_key="none")
    client.chat.completions.create(model="nanochat", messages=[{"role": "user", "content": "Hi"}])

Sampling: temperature and top-k (the engine has no nucleus sampling). `top_p` is accepted and validated
for compatibility but ignored; pass `top_k` (e.g. `extra_body={"top_k": 20}`) to narrow sampling.
`seed` makes a request reproducible; without it every request gets a fresh random seed.
Tool calls (calculator) appear in the text as their literal special tokens, as in the reference.
"""

import os
import json
import time
import uuid
import random
import asyncio
import argparse
import threading
from dataclasses import dataclass
from contextlib import asynccontextmanager

parser = argparse.ArgumentParser(description="Chat web server (UI + OpenAI-compatible API)")
parser.add_argument("-n", "--num-gpus", type=int, default=1, help="model replicas, one per GPU (CUDA only if > 1)")
parser.add_argument("-i", "--source", type=str, default="sft", help="checkpoint source: base|mid|sft|rl, or hf:DIR (an exported model)")
parser.add_argument("-t", "--temperature", type=float, default=0.8, help="default sampling temperature")
parser.add_argument("-k", "--top-k", type=int, default=50, help="default top-k (0 = no filter)")
parser.add_argument("-m", "--max-tokens", type=int, default=512, help="default max tokens per reply")
parser.add_argument("-g", "--model-tag", type=str, default=None, help="model tag to load (default: largest)")
parser.add_argument("-s", "--step", type=int, default=None, help="checkpoint step (default: last)")
parser.add_argument("-p", "--port", type=int, default=8000, help="port to listen on")
parser.add_argument("--host", type=str, default="0.0.0.0", help="interface to bind")
parser.add_argument("--device-type", type=str, default="", help="cuda|cpu|mps (default: autodetect)")
parser.add_argument("-d", "--dtype", type=str, default="", help="bfloat16|float16|float32 (default: project policy)")

# Input limits (REFERENCE 10.6): every request is checked against them and answered 400 when outside.
MAX_MESSAGES = 500
MAX_MESSAGE_CHARS = 8000
MAX_TOTAL_CHARS = 32000
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.0, 2.0
MIN_TOP_K, MAX_TOP_K = 0, 200
MIN_MAX_TOKENS, MAX_MAX_TOKENS = 1, 4096

UI_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "nanochat", "ui.html")
LOGO_PATH = os.path.join(os.path.dirname(UI_PATH), "logo.svg")

# -----------------------------------------------------------------------------
# Workers: one model replica each, handed out through an asyncio.Queue (REFERENCE 10.7)

@dataclass
class Worker:
    gpu_id: int
    device: str
    engine: object      # nanochat.engine.Engine
    tokenizer: object   # nanochat.tokenizer.RustBPETokenizer
    context_len: int    # prompt + reply may not exceed the positions the model was trained for


def make_worker(gpu_id, device, model, tokenizer):
    from nanochat.engine import Engine
    model.eval()
    return Worker(gpu_id, str(device), Engine(model, tokenizer), tokenizer, model.config.sequence_len)


class WorkerPool:
    """A request takes a worker for its whole reply, so replies never interleave on one model."""

    def __init__(self, workers):
        self.workers = list(workers)
        self.queue = asyncio.Queue()  # created inside the running loop (lifespan)
        for w in self.workers:
            self.queue.put_nowait(w)

    async def acquire(self):
        return await self.queue.get()

    def release(self, worker):
        self.queue.put_nowait(worker)


@dataclass
class ServeConfig:
    temperature: float = 0.8
    top_k: int = 50
    max_tokens: int = 512
    model_name: str = "nanochat"

# -----------------------------------------------------------------------------
# Request validation: one parser for both APIs, raising RequestError -> 400

class RequestError(Exception):
    def __init__(self, message, param=None):
        super().__init__(message)
        self.message, self.param = message, param


@dataclass
class ChatRequest:
    messages: list      # [(role, text)] with role user|assistant (system already merged)
    temperature: float
    top_k: int
    max_tokens: int
    seed: int
    stream: bool


def _number(body, key, lo, hi, default, integer=False):
    value = body.get(key)
    if value is None:
        return default
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type:
        kind = "an integer" if integer else "a number"
        raise RequestError(f"'{key}' must be {kind}, got {json.dumps(value)[:40]}", key)
    if not lo <= value <= hi:
        raise RequestError(f"'{key}' must be between {lo} and {hi}, got {value}", key)
    return value


def _content_text(content, i):
    """Message content as text: a string, or (OpenAI style) a list of {"type": "text", "text": ...} parts."""
    if isinstance(content, list):
        texts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise RequestError(f"messages[{i}].content: only text parts are supported", "messages")
            texts.append(part["text"])
        content = "".join(texts)
    if not isinstance(content, str):
        raise RequestError(f"messages[{i}].content must be a string", "messages")
    if not content:
        raise RequestError(f"messages[{i}].content is empty", "messages")
    if len(content) > MAX_MESSAGE_CHARS:
        raise RequestError(f"messages[{i}].content is {len(content)} characters; the limit is {MAX_MESSAGE_CHARS}",
                           "messages")
    return content


def parse_chat_request(body, config, openai):
    """
    Validate a chat request body against the limits of REFERENCE 10.6. `openai=True` additionally
    allows system messages at the start (merged into the first user turn, like render_conversation),
    list-of-text-parts content, top_p, n=1, max_completion_tokens and stream.
    """
    if not isinstance(body, dict):
        raise RequestError("request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list of {role, content} objects", "messages")
    if len(messages) > MAX_MESSAGES:
        raise RequestError(f"too many messages: {len(messages)}; the limit is {MAX_MESSAGES}", "messages")
    system, parsed, total = [], [], 0
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise RequestError(f"messages[{i}] must be an object with 'role' and 'content'", "messages")
        role = msg.get("role")
        allowed = ("system", "user", "assistant") if openai else ("user", "assistant")
        if role not in allowed:
            raise RequestError(f"messages[{i}].role must be one of {', '.join(allowed)}; got {json.dumps(role)[:40]}",
                               "messages")
        text = _content_text(msg.get("content"), i)
        total += len(text)
        if role == "system":
            if parsed:
                raise RequestError(f"messages[{i}]: system messages are only allowed at the start", "messages")
            system.append(text)
        else:
            parsed.append((role, text))
    if total > MAX_TOTAL_CHARS:
        raise RequestError(f"conversation is {total} characters; the limit is {MAX_TOTAL_CHARS}", "messages")
    if system:
        # no system token exists: fold it into the first user turn, as render_conversation does
        if not parsed or parsed[0][0] != "user":
            raise RequestError("a system message must be followed by a user message", "messages")
        parsed[0] = ("user", "\n\n".join(system) + "\n\n" + parsed[0][1])
    temperature = _number(body, "temperature", MIN_TEMPERATURE, MAX_TEMPERATURE, config.temperature)
    top_k = _number(body, "top_k", MIN_TOP_K, MAX_TOP_K, config.top_k, integer=True)
    max_tokens = _number(body, "max_tokens", MIN_MAX_TOKENS, MAX_MAX_TOKENS, None, integer=True)
    if openai:
        _number(body, "top_p", 0.0, 1.0, None)  # accepted for compatibility, not applied (see docstring)
        if max_tokens is None:
            max_tokens = _number(body, "max_completion_tokens", MIN_MAX_TOKENS, MAX_MAX_TOKENS, None, integer=True)
        if _number(body, "n", 1, 1, 1, integer=True) != 1:
            raise RequestError("only n=1 is supported", "n")
    seed = _number(body, "seed", -2**63, 2**63 - 1, None, integer=True)
    stream = body.get("stream", False) if openai else True
    if not isinstance(stream, bool):
        raise RequestError("'stream' must be true or false", "stream")
    return ChatRequest(parsed, float(temperature), int(top_k), max_tokens or config.max_tokens,
                       random.randrange(2**31) if seed is None else seed % 2**31, stream)


def build_prompt(tokenizer, messages):
    """[<|bos|>] + each turn wrapped in its start/end tokens + <|assistant_start|> (REFERENCE 10.6)."""
    bos = tokenizer.get_bos_token_id()
    ids = [bos]
    for role, text in messages:
        ids += tokenizer.encode(text, prepend=f"<|{role}_start|>", append=f"<|{role}_end|>")
    ids.append(tokenizer.encode_special("<|assistant_start|>"))
    return ids

# -----------------------------------------------------------------------------
# Generation: the engine runs in a thread; text pieces come back through an asyncio.Queue

_END = object()


class Reply:
    """Streams one reply's text pieces and records its outcome (finish_reason, token count, gpu)."""

    def __init__(self, pool, request):
        # every worker holds a replica of the same checkpoint, so any one can tokenize and size the prompt
        first = pool.workers[0]
        self.pool, self.request = pool, request
        self.prompt = build_prompt(first.tokenizer, request.messages)
        self.prompt_tokens = len(self.prompt)
        room = first.context_len - len(self.prompt)
        if room <= 0:
            raise RequestError(f"conversation is {len(self.prompt)} tokens but the model's context is "
                               f"{first.context_len}; start a new conversation or shorten it", "messages")
        self.max_tokens = min(request.max_tokens, room)  # a reply cut here ends with finish_reason "length"
        self.completion_tokens = 0
        self.finish_reason = None
        self.gpu_id = None
        self.text = ""

    async def pieces(self):
        """Async iterator of text pieces; holds one worker from the first token to the last."""
        worker = await self.pool.acquire()
        self.gpu_id = worker.gpu_id
        tok, prompt, max_tokens = worker.tokenizer, self.prompt, self.max_tokens
        stops = {tok.encode_special("<|assistant_end|>"), tok.get_bos_token_id()}
        loop = asyncio.get_running_loop()
        queue = asyncio.Queue()
        cancel = threading.Event()
        # The worker goes back to the pool once both the generation thread and this stream are done:
        # not before the reply has been streamed out (REFERENCE 10.7), and never while the model still
        # runs (a disconnected client cancels the stream, but the thread finishes its current step).
        owners, owners_lock = [2], threading.Lock()

        def done_with_worker():
            with owners_lock:
                owners[0] -= 1
                last = owners[0] == 0
            if last:
                try:
                    loop.call_soon_threadsafe(self.pool.release, worker)
                except RuntimeError:  # the loop is gone (server shutting down)
                    pass

        def send(item):
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the loop is gone (server shutting down): nobody is listening
                pass

        def run():
            finish = "length"
            try:
                if worker.device.startswith("cuda"):
                    import torch
                    torch.cuda.set_device(worker.device)  # a new thread starts on cuda:0; replica i lives on cuda:i
                n = 0
                for column, _ in worker.engine.generate(prompt, num_samples=1, max_tokens=max_tokens,
                                                        temperature=self.request.temperature,
                                                        top_k=self.request.top_k or None, seed=self.request.seed):
                    if cancel.is_set():
                        break
                    token = column[0]
                    if token in stops:
                        finish = "stop"
                        break
                    n += 1
                    send(token)
                    if n >= max_tokens:
                        break
                send(("finish", finish))
            except BaseException as e:  # surfaces in the consumer
                send(e)
            finally:
                send(_END)
                done_with_worker()

        ids, emitted = [], ""
        try:
            try:
                threading.Thread(target=run, daemon=True, name=f"generate-gpu{worker.gpu_id}").start()
            except BaseException:
                done_with_worker()  # the thread's share: it never ran
                raise
            while (item := await queue.get()) is not _END:
                if isinstance(item, BaseException):
                    raise item
                if isinstance(item, tuple):
                    self.finish_reason = item[1]
                    continue
                ids.append(item)
                self.completion_tokens = len(ids)
                # decode everything so far; hold back while the text ends in half a UTF-8 character
                text = tok.decode(ids)
                if not text.endswith("\ufffd") and len(text) > len(emitted):
                    piece, emitted = text[len(emitted):], text
                    yield piece
            # the full decode is the reply; a reply cut off inside a multi-byte character reports what it has
            self.text = tok.decode(ids)
            if len(self.text) > len(emitted) and self.text.startswith(emitted):
                yield self.text[len(emitted):]
        finally:
            cancel.set()
            done_with_worker()


def log_exchange(request, reply):
    print("=" * 40, flush=True)
    for role, text in request.messages:
        print(f"[{role}]: {text}", flush=True)
    print(f"[assistant, gpu {reply.gpu_id}, {reply.completion_tokens} tokens, {reply.finish_reason}]: "
          f"{reply.text}", flush=True)

# -----------------------------------------------------------------------------
# The app

def create_app(workers, config=None):
    """
    `workers`: a list of Worker, or a zero-argument callable returning one (called at start-up, so the
    models load inside the server's lifespan). Tests pass a tiny model; main() passes checkpoint loaders.
    """
    from fastapi import FastAPI, Request
    from fastapi.middleware.cors import CORSMiddleware
    from fastapi.responses import JSONResponse, StreamingResponse, HTMLResponse, Response

    config = config or ServeConfig()

    @asynccontextmanager
    async def lifespan(app):
        loaded = workers() if callable(workers) else workers
        if not loaded:
            raise RuntimeError("no workers to serve with")
        app.state.pool = WorkerPool(loaded)
        print(f"serving {config.model_name} on {len(loaded)} worker(s): "
              f"{', '.join(w.device for w in loaded)}", flush=True)
        yield
        app.state.pool = None

    app = FastAPI(title="nanochat", lifespan=lifespan)
    app.state.pool = None
    app.add_middleware(CORSMiddleware, allow_origins=["*"], allow_credentials=True,
                       allow_methods=["*"], allow_headers=["*"])

    def openai_error(message, status=400, param=None, type_="invalid_request_error", code=None):
        return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}},
                            status_code=status)

    async def read_json(request):
        try:
            return await request.json()
        except (ValueError, UnicodeDecodeError):
            raise RequestError("request body is not valid JSON")

    def get_pool():
        pool = app.state.pool
        if pool is None:
            raise RuntimeError("the server has not started its workers yet")
        return pool

    @app.get("/")
    async def root():
        with open(UI_PATH, encoding="utf-8") as f:
            return HTMLResponse(f.read())

    @app.get("/logo.svg")
    async def logo():
        with open(LOGO_PATH, encoding="utf-8") as f:
            return Response(f.read(), media_type="image/svg+xml")

    @app.get("/health")
    async def health():
        pool = app.state.pool
        return {"status": "ok", "ready": bool(pool and pool.workers),
                "num_gpus": len(pool.workers) if pool else 0,
                "available_workers": pool.queue.qsize() if pool else 0}

    @app.get("/stats")
    async def stats():
        pool = app.state.pool
        workers_ = pool.workers if pool else []
        free = pool.queue.qsize() if pool else 0
        return {"total_workers": len(workers_), "available_workers": free, "busy_workers": len(workers_) - free,
                "workers": [{"gpu_id": w.gpu_id, "device": w.device} for w in workers_]}

    def sse(obj):
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    @app.post("/chat/completions")
    async def chat_completions(request: Request):
        try:
            req = parse_chat_request(await read_json(request), config, openai=False)
            reply = Reply(get_pool(), req)
        except RequestError as e:
            return JSONResponse({"detail": e.message}, status_code=400)

        async def stream():
            try:
                async for piece in reply.pieces():
                    yield sse({"token": piece, "gpu": reply.gpu_id})
            except Exception as e:  # headers are out already: report in-band instead of crashing
                print(f"generation failed: {e!r}", flush=True)
                yield sse({"error": f"generation failed: {e}"})
            else:
                log_exchange(req, reply)
            yield sse({"done": True})

        return StreamingResponse(stream(), media_type="text/event-stream")

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [{"id": config.model_name, "object": "model",
                                            "created": int(time.time()), "owned_by": "nanochat"}]}

    @app.post("/v1/chat/completions")
    async def openai_chat_completions(request: Request):
        try:
            req = parse_chat_request(await read_json(request), config, openai=True)
            reply = Reply(get_pool(), req)
        except RequestError as e:
            return openai_error(e.message, param=e.param)
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())

        def usage():
            return {"prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens,
                    "total_tokens": reply.prompt_tokens + reply.completion_tokens}

        if not req.stream:
            async for _ in reply.pieces():
                pass
            log_exchange(req, reply)
            return {"id": completion_id, "object": "chat.completion", "created": created, "model": config.model_name,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": reply.text},
                                 "finish_reason": reply.finish_reason}],
                    "usage": usage()}

        def chunk(delta, finish_reason=None):
            return sse({"id": completion_id, "object": "chat.completion.chunk", "created": created,
                        "model": config.model_name,
                        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]})

        async def stream():
            yield chunk({"role": "assistant", "content": ""})
            try:
                async for piece in reply.pieces():
                    yield chunk({"content": piece})
            except Exception as e:
                print(f"generation failed: {e!r}", flush=True)
                yield sse({"error": {"message": f"generation failed: {e}", "type": "server_error",
                                     "param": None, "code": None}})
            else:
                log_exchange(req, reply)
                yield chunk({}, reply.finish_reason)
            yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    return app

# -----------------------------------------------------------------------------
# Loading checkpoints into workers

def load_workers(args):
    """One replica per GPU on CUDA; a single worker on CPU/MPS (REFERENCE 10.7)."""
    import torch
    from nanochat.common import autodetect_device_type
    from nanochat.checkpoint_manager import load_model
    device_type = args.device_type or autodetect_device_type()
    if args.num_gpus < 1:
        raise SystemExit(f"--num-gpus must be at least 1, got {args.num_gpus}")
    if args.num_gpus > 1:
        if device_type != "cuda":
            raise SystemExit(f"--num-gpus={args.num_gpus} needs CUDA; on {device_type} run with -n 1")
        if args.num_gpus > torch.cuda.device_count():
            raise SystemExit(f"--num-gpus={args.num_gpus} but only {torch.cuda.device_count()} GPU(s) are visible")
    if args.dtype:
        os.environ["NANOCHAT_DTYPE"] = args.dtype  # read by the model through common.get_compute_dtype
    workers = []
    for i in range(args.num_gpus):
        device = torch.device("cuda", i) if device_type == "cuda" else torch.device(device_type)
        print(f"loading {args.source} model onto {device}...", flush=True)
        model, tokenizer, _ = load_model(args.source, device, phase="eval", model_tag=args.model_tag, step=args.step)
        workers.append(make_worker(i, device, model, tokenizer))
    return workers


def main():
    import uvicorn
    args = parser.parse_args()
    for flag, value, lo, hi in [("--temperature", args.temperature, MIN_TEMPERATURE, MAX_TEMPERATURE),
                                ("--top-k", args.top_k, MIN_TOP_K, MAX_TOP_K),
                                ("--max-tokens", args.max_tokens, MIN_MAX_TOKENS, MAX_MAX_TOKENS)]:
        if not lo <= value <= hi:
            raise SystemExit(f"{flag} must be between {lo} and {hi}, got {value}")
    name = f"nanochat-{args.source}" + (f"-{args.model_tag}" if args.model_tag else "")
    config = ServeConfig(args.temperature, args.top_k, args.max_tokens, name)
    app = create_app(load_workers(args), config)  # load first: a bad checkpoint exits with its one line
    print(f"chat UI at http://localhost:{args.port}/  OpenAI API at http://localhost:{args.port}/v1", flush=True)
    uvicorn.run(app, host=args.host, port=args.port)


if __name__ == "__main__":
    main()
