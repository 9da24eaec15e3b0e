"""
EngineProcess (the BatchEngine in a child process, what the chat server runs): every request's tokens equal its
solo Engine run in this process, cancel frees the row, the queue limit and bad requests are refused here, and a
child that dies ends its streams with an error instead of hanging them.
"""

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from nanochat.batch_engine import QueueFull
from nanochat.engine import Engine
from nanochat.engine_process import EngineProcess, EngineStopped
from test_batch_engine import mixed_requests
from test_engine import first_special, make_model, tokenizer  # noqa: F401  (tokenizer: a fixture)


def drain(stream, timeout=30):
    """A stream's tokens up to its end; a token that never comes fails the test (queue.Empty), never hangs it."""
    out = []
    while (tok := stream.get(timeout=timeout)) is not None:
        out.append(tok)
    return out


def test_engine_process_matches_solo_runs_and_frees_rows(tokenizer):
    V = tokenizer.get_vocab_size()
    model = make_model(V, zero_specials_from=first_special(tokenizer))
    reqs = mixed_requests(tokenizer, 10, seed=3)  # through 2 rows and a queue
    engine = EngineProcess(model, tokenizer, max_rows=2, max_queue=8).start()
    try:
        streams = [engine.submit(p, n, **kw) for p, n, kw in reqs]
        with ThreadPoolExecutor(len(streams)) as ex:
            outs = list(ex.map(drain, streams))
        stats = engine.stats()
        # the parent refuses what it can check itself, without asking the child
        with pytest.raises(ValueError, match="token ids must lie"):
            engine.submit([V + 5], 4)
        with pytest.raises(ValueError, match="no room"):
            engine.submit([1] * model.config.sequence_len, 4)
        assert drain(engine.submit([1, 2], 0)) == []  # nothing to generate: finished here
        # max_rows + max_queue requests in flight: the next one is refused (they fill the context: still running)
        long = [engine.submit([1, 2, 3], None, temperature=0.0) for _ in range(10)]
        with pytest.raises(QueueFull):
            engine.submit([1, 2, 3], 4)
        # cancelling frees their rows and queue places: every stream ends "cancelled", the counts return to 0
        first = long[0].get(timeout=30)
        for s in long:
            s.cancel()
        rest = [drain(s) for s in long]
        assert first is not None and all(s.finish_reason == "cancelled" for s in long)
        assert len(rest[0]) < model.config.sequence_len - 4
        after = engine.stats()
    finally:
        engine.stop()
    solo = Engine(model, tokenizer)
    for (prompt, n, kw), out, stream in zip(reqs, outs, streams):
        results, _ = solo.generate_batch(prompt, max_tokens=n, **kw)
        assert out == results[0][len(prompt):]
        assert stream.finish_reason == "length"
    assert stats["total_tokens"] == sum(n for _, n, _ in reqs)
    assert stats["active_rows"] == 0 and stats["queue_depth"] == 0 and stats["max_rows"] == 2
    assert after["active_rows"] == 0 and after["queue_depth"] == 0


def test_engine_process_that_dies_ends_its_streams(tokenizer):
    V = tokenizer.get_vocab_size()
    engine = EngineProcess(make_model(V, n_layer=1), tokenizer, max_rows=2).start()
    try:
        stream = engine.submit([1, 2, 3], None, temperature=0.0)
        assert stream.get(timeout=30) is not None
        engine._process.kill()  # as the kernel's OOM killer would
        t0 = time.time()
        tokens = drain(stream, timeout=10)  # ends, never hangs
        assert time.time() - t0 < 10 and len(tokens) < 64
        assert stream.finish_reason == "error" and "engine process exited" in stream.error
        with pytest.raises(EngineStopped, match="exited"):
            engine.submit([1, 2], 4)
        assert engine.stats()["active_rows"] == 0
    finally:
        engine.stop()
    with pytest.raises(EngineStopped, match="not running"):
        engine.submit([1, 2], 4)


def test_engine_process_that_cannot_start_says_why(tokenizer):
    model = make_model(tokenizer.get_vocab_size(), n_layer=1)
    engine = EngineProcess(model, tokenizer, device="cuda:7" if not torch.cuda.is_available() else "nodevice")
    with pytest.raises(RuntimeError, match="failed to start: .*(CUDA|cuda|device)"):
        engine.start()
    assert engine._process is None


def test_engine_process_without_shared_memory_says_what_to_do(tokenizer, monkeypatch):
    # the weights travel through /dev/shm: when it is too small (a container's default 64 MiB), start() says so
    import multiprocessing.context

    def full(self):
        raise RuntimeError("unable to write to file </torch_1_2_3>: No space left on device (28)")
    monkeypatch.setattr(multiprocessing.context.SpawnProcess, "start", full)
    engine = EngineProcess(make_model(tokenizer.get_vocab_size(), n_layer=1), tokenizer)
    with pytest.raises(RuntimeError, match="No space left.*shm-size"):
        engine.start()
    assert engine._process is None
