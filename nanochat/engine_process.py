"""
A BatchEngine in a process of its own, behind the same interface (start, submit -> Stream, stats, stop): what the
chat server runs, one child process per replica.

Why a process: threads of one process share one GIL, and PyTorch lets go of it around every op it runs (~70 times
in a compiled d4 decode step, ~280 in an eager one); at each hand-off a busy thread beside it (the event loop,
another replica's decode loop) can take it for a whole switch interval. A pure-Python thread spinning beside a
compiled batch-8 step made the step 9x slower (3.7 -> 34 ms). Measured on 2 CPU cores: two replicas decoding
together gave 0.9-1.3x one replica's tok/s as threads of one process, 1.8-2.1x as two processes; a 60 s soak with
16 clients served 995 requests against 712-751 with the decode loop in a thread. And a replica that dies (out of
memory, a crash in a kernel) ends its streams with an error; the server goes on and answers 503.

    engine = EngineProcess(model, tokenizer, max_rows=8).start()   # the child rebuilds the model from its weights
    for token in engine.submit(prompt_ids, max_tokens=64, seed=1):
        ...

The pipe carries requests one way ("submit", "cancel", "stop") and the tokens the other, one message per batch of
tokens the loop emits. The child runs one thread: between iterations it takes every request that has arrived,
and it blocks on the pipe only when idle. The server process only validates and counts requests; the child
samples every token, so a request's tokens equal its BatchEngine (and solo Engine) run.
"""

import atexit
import collections
import functools
import multiprocessing
import queue
import random
import signal
import threading
import time

import torch

from nanochat.batch_engine import BatchEngine, QueueFull, Stream, recent_rate
from nanochat.engine import check_request

START_TIMEOUT_S = 600  # the child imports torch and rebuilds the model (a large one from disk-sized weights)


class EngineStopped(RuntimeError):
    """EngineProcess.submit(): the engine's process is not running (never started, stopped, or it died)."""


class _RemoteStream(Stream):
    """A Stream filled from the child's messages; cancel() also tells the child, which frees the row."""

    def __init__(self, engine, rid):
        super().__init__()
        self._engine, self._rid = engine, rid

    def cancel(self):
        self.cancelled = True
        if self.finish_reason is None:
            self._engine._send(("cancel", self._rid))


class EngineProcess:
    """See the module docstring. The arguments are BatchEngine's; `device`: where the child puts the model
    (default: where `model` is). The model's weights go to the child through shared memory (on a CPU, the
    parent's own tensors, no copy) and the parent keeps only its config."""

    def __init__(self, model, tokenizer, max_rows=8, max_queue=64, compile=None, prefill_tokens=None, device=None,
                 decode_threads=None):
        if max_rows < 1 or max_queue < 0:
            raise ValueError(f"max_rows must be >= 1 and max_queue >= 0, got {max_rows}, {max_queue}")
        self.config, self.max_rows, self.max_queue = model.config, max_rows, max_queue
        self.capacity = model.config.sequence_len
        device = str(device or next(model.parameters()).device)
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        self._child_args = (model.config, state, model.compute_dtype, device, tokenizer,
                            dict(max_rows=max_rows, max_queue=max_queue, compile=compile,
                                 prefill_tokens=prefill_tokens, decode_threads=decode_threads))
        self._process, self._conn, self._reader = None, None, None
        self._lock, self._send_lock = threading.Lock(), threading.Lock()
        self._streams, self._next_rid, self._stopping, self._dead = {}, 0, False, None
        self._recent = collections.deque()  # (time, tokens) per message, for tok_per_s
        self.total_tokens = 0

    def start(self):
        """Start the child and wait until it serves; raises RuntimeError with the child's error if it cannot."""
        if self._process is not None:
            return self
        ctx = multiprocessing.get_context("spawn")  # a fork would copy the parent's OpenMP and torch threads' state
        conn, child_conn = ctx.Pipe()
        self._process = ctx.Process(target=_child, args=(child_conn, *self._child_args), name="nanochat-engine")
        try:
            self._process.start()
        except (RuntimeError, OSError) as e:  # e.g. /dev/shm full: Docker's default is 64 MiB
            self._process = None
            conn.close(), child_conn.close()
            raise RuntimeError(f"could not hand the model's weights to the engine process through shared memory "
                               f"({e}); a container needs a /dev/shm larger than the model (docker run "
                               f"--shm-size=...)") from None
        child_conn.close()
        try:
            if not conn.poll(START_TIMEOUT_S):
                raise RuntimeError(f"the engine process did not start within {START_TIMEOUT_S} s")
            kind, detail = conn.recv()
            if kind != "ready":
                raise RuntimeError(f"the engine process failed to start: {detail}")
        except (EOFError, OSError, RuntimeError) as e:
            self._process.kill()
            self._process.join()
            self._process = None
            if isinstance(e, RuntimeError):
                raise
            raise RuntimeError("the engine process exited while starting (see its error above)") from None
        self._conn, self._stopping, self._dead = conn, False, None
        self._reader = threading.Thread(target=self._read, name="EngineProcess-reader", daemon=True)
        self._reader.start()
        # before multiprocessing's own exit hook, which would wait for the child forever (it waits for "stop")
        atexit.register(self.stop)
        return self

    def stop(self):
        """Stop the child; every pending and running stream ends "cancelled"."""
        if self._process is None:
            return
        self._stopping = True
        self._send(("stop",))
        self._process.join(30)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()
        self._reader.join()
        self._conn.close()
        self._process, self._dead = None, None
        atexit.unregister(self.stop)

    def submit(self, tokens, max_tokens, temperature=1.0, top_k=None, top_p=None, seed=None, on_put=None):
        """As BatchEngine.submit(); raises EngineStopped when the child is not running."""
        max_tokens = check_request(self.config, tokens, max_tokens, temperature, top_k, top_p)
        if len(tokens) >= self.capacity:
            raise ValueError(f"prompt of {len(tokens)} tokens leaves no room in the model's context "
                             f"({self.capacity}); shorten the conversation")
        seed = seed if seed is not None else random.getrandbits(63)
        with self._lock:
            if self._process is None or self._dead:
                raise EngineStopped(self._dead or "the engine is not running (start() it first)")
            busy = len(self._streams)
            if busy >= self.max_rows + self.max_queue:
                raise QueueFull(f"{busy} requests are already running or waiting (max_rows={self.max_rows}, "
                                f"max_queue={self.max_queue})")
            rid, self._next_rid = self._next_rid, self._next_rid + 1
            stream = _RemoteStream(self, rid)
            stream.on_put = on_put
            if max_tokens == 0:
                stream._finish("length")
                return stream
            self._streams[rid] = stream
        self._send(("submit", rid, list(tokens), max_tokens, temperature, top_k, top_p, seed))
        return stream

    def stats(self):
        """As BatchEngine.stats(), counted here: requests not finished fill the rows first, the rest wait."""
        with self._lock:
            busy = len(self._streams)
            return dict(queue_depth=max(0, busy - self.max_rows), active_rows=min(busy, self.max_rows),
                        max_rows=self.max_rows, tok_per_s=recent_rate(self._recent), total_tokens=self.total_tokens)

    def _send(self, message):
        with self._send_lock:
            try:
                self._conn.send(message)
            except (OSError, ValueError, AttributeError):  # the child has gone: _read ends the streams
                pass

    def _read(self):
        """The parent's one thread of its own: hands each iteration's tokens to their streams."""
        try:
            while True:
                _, out = self._conn.recv()
                n = 0
                with self._lock:
                    for rid, tok, reason, error in out:
                        stream = self._streams.get(rid)
                        if stream is None:
                            continue
                        if tok is None:
                            del self._streams[rid]
                            stream._finish(reason, error)
                        else:
                            stream._put(tok)
                            n += 1
                    self.total_tokens += n
                    self._recent.append((time.monotonic(), n))
        except (EOFError, OSError):
            pass
        with self._lock:
            if not self._stopping:
                self._process.join(5)
                self._dead = f"the engine process exited (exit code {self._process.exitcode}); restart the server"
            streams, self._streams = list(self._streams.values()), {}
        for stream in streams:
            stream._finish("cancelled") if self._stopping else stream._finish("error", self._dead)


class _ChildEngine(BatchEngine):
    """The BatchEngine in the child, driven by the child's one thread (no loop thread: nothing in the child waits
    on a GIL): the tokens and ends of each _emit and each iteration go to the parent in one message."""

    def __init__(self, conn, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.conn, self.streams, self.dirty = conn, {}, []

    def serve(self):
        """Until "stop" or the parent has gone: take every request that has arrived, then one iteration; block on
        the pipe only when there is nothing to do (a request wakes it, and is prefilled at once)."""
        while True:
            if not self.conn.poll(0 if self._busy() else None):
                self._iterate()
                continue
            message = self.conn.recv()
            if message[0] == "submit":
                rid = message[1]
                try:
                    self.streams[rid] = self.submit(*message[2:], on_put=functools.partial(self.dirty.append, rid))
                except Exception as e:  # the parent checked the request; a refusal here still ends its stream
                    self.conn.send(("out", [(rid, None, "error", f"{type(e).__name__}: {e}")]))
            elif message[0] == "cancel":
                stream = self.streams.get(message[1])
                if stream is not None:
                    stream.cancel()
            else:  # "stop"
                return

    def _flush(self):
        out, dirty = [], self.dirty.copy()
        self.dirty.clear()  # (emptied in place: each stream's on_put appends to this very list)
        for rid in dirty:
            stream = self.streams.get(rid)
            while stream is not None:  # None: already finished and sent
                try:
                    tok = stream.get_nowait()
                except queue.Empty:
                    break
                if tok is None:
                    out.append((rid, None, stream.finish_reason, stream.error))
                    del self.streams[rid]
                    break
                out.append((rid, tok, None, None))
        if out:
            self.conn.send(("out", out))


def _child(conn, config, state, dtype, device, tokenizer, engine_kwargs):
    """The child process: rebuild the model, set up its BatchEngine and serve the parent's requests."""
    from nanochat.gpt import GPT
    from nanochat.model_loader import materialize
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the parent stops us
    try:
        with torch.device("meta"):
            model = GPT(config)
        model = materialize(model, state, torch.device(device), "eval", dtype)
        del state
        engine = _ChildEngine(conn, model, tokenizer, **engine_kwargs)
        with torch.inference_mode():
            engine._setup()
    except Exception as e:
        conn.send(("failed", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ready", None))
    try:
        with torch.inference_mode():
            engine.serve()
    except (EOFError, OSError):  # the parent has gone
        pass
