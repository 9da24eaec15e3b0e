"""
BatchEngine (continuous batching) tests: every request's tokens equal its solo Engine run (fp32, greedy and
seeded) whatever joins or leaves around it, prompts prefilled together or in chunks, and the scheduling: running
rows get a decode step between the chunks of a long prompt.
"""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import torch.nn as nn

from nanochat import batch_engine
from nanochat.batch_engine import BatchEngine, QueueFull
from nanochat.engine import Engine
from nanochat.gpt import GPTConfig
from test_engine import first_special, make_model, tokenizer, tool_tokens  # noqa: F401  (tokenizer: a fixture)


def mixed_requests(tokenizer, n, seed):
    """n (prompt, max_tokens, sampling) of unequal lengths: greedy, and seeded sampling with top-k/top-p."""
    g = torch.Generator().manual_seed(seed)
    reqs = []
    for i in range(n):
        prompt = torch.randint(0, first_special(tokenizer), (1 + (7 * i) % 13,), generator=g).tolist()
        sampling = dict(temperature=0.0) if i % 3 else dict(temperature=0.9, top_k=20 if i % 2 else None,
                                                             top_p=0.9, seed=i)
        reqs.append((prompt, 3 + (5 * i) % 17, sampling))
    return reqs


def test_batch_engine_matches_solo_runs(tokenizer):
    # 16 concurrent mixed requests through 4 rows: each one's tokens equal its solo Engine run
    V = tokenizer.get_vocab_size()
    model = make_model(V, zero_specials_from=first_special(tokenizer))
    reqs = mixed_requests(tokenizer, 16, seed=5)
    batch = BatchEngine(model, tokenizer, max_rows=4, max_queue=16).start()
    try:
        streams = [batch.submit(p, n, **kw) for p, n, kw in reqs]
        with ThreadPoolExecutor(16) as ex:
            outs = list(ex.map(list, streams))
        stats = batch.stats()
    finally:
        batch.stop()
    engine = Engine(model, tokenizer)
    for (prompt, n, kw), out, stream in zip(reqs, outs, streams):
        results, _ = engine.generate_batch(prompt, max_tokens=n, **kw)
        assert out == results[0][len(prompt):]
        assert stream.finish_reason == "length" and len(out) == n
    assert stats["total_tokens"] == sum(n for _, n, _ in reqs)
    assert stats["active_rows"] == 0 and stats["queue_depth"] == 0 and stats["max_rows"] == 4
    assert stats["tok_per_s"] > 0


def test_batch_engine_batched_prefill_matches_solo_runs(tokenizer):
    # 8 prompts of different lengths (some longer than the 6-token window) wait before the loop starts: they
    # are prefilled together, right-padded, and each greedy or seeded reply equals its solo Engine run
    V = tokenizer.get_vocab_size()
    model = make_model(V, zero_specials_from=first_special(tokenizer))
    g = torch.Generator().manual_seed(7)
    lengths = [13, 1, 7, 20, 2, 9, 4, 16]
    prompts = [torch.randint(0, first_special(tokenizer), (n,), generator=g).tolist() for n in lengths]
    samplings = [dict(temperature=0.0) if i % 4 else dict(temperature=0.8, top_p=0.9, seed=i) for i in range(8)]
    shapes, forward = [], model.forward_cached
    model.forward_cached = lambda idx, cache, **kw: (shapes.append(tuple(idx.shape)), forward(idx, cache, **kw))[1]
    batch = BatchEngine(model, tokenizer, max_rows=8)
    try:
        streams = [batch.submit(p, 12, **kw) for p, kw in zip(prompts, samplings)]
        batch.start()
        outs = [list(s) for s in streams]
    finally:
        batch.stop()
        del model.forward_cached
    assert [s for s in shapes if s[1] > 1] == [(8, 20)]  # one prefill for all eight
    engine = Engine(model, tokenizer)
    for prompt, kw, out in zip(prompts, samplings, outs):
        assert out == engine.generate_batch(prompt, max_tokens=12, **kw)[0][0][len(prompt):]


def record_forwards(model):
    """Wrap model.forward_cached to log each call's input shape; `del model.forward_cached` undoes it."""
    shapes, forward = [], model.forward_cached
    model.forward_cached = lambda idx, cache, **kw: (shapes.append(tuple(idx.shape)), forward(idx, cache, **kw))[1]
    return shapes


def test_batch_engine_prefill_budget_groups_and_chunks(tokenizer):
    # at most prefill_tokens (12) padded prompt tokens per iteration: the oldest prompts that fit go together; a
    # longer one is prefilled in chunks, half of every budget kept for it; replies equal solo runs
    V = tokenizer.get_vocab_size()
    model = make_model(V, n_layer=2, zero_specials_from=first_special(tokenizer))
    prompts = [[5] * 3, [6] * 4, [7] * 30, [8] * 2, [9] * 5, [10] * 2]
    shapes = record_forwards(model)
    batch = BatchEngine(model, tokenizer, max_rows=8, prefill_tokens=12)
    try:
        streams = [batch.submit(p, 4, temperature=0.0) for p in prompts]
        batch.start()
        outs = [list(s) for s in streams]
    finally:
        batch.stop()
        del model.forward_cached
    # 2 x 4 = 8 fit, 3 x 30 would not | the 30 alone: 12 | 6 kept for it: [8]*2 (5 x 2 = 10 > 6), 10 of the 30 |
    # [9]*5, 7 of the 30 | [10]*2, the last 1 of the 30 (a (1, 1) chunk, filtered out with the decode steps)
    assert [s for s in shapes if s[1] > 1] == [(2, 4), (1, 12), (1, 2), (1, 10), (1, 5), (1, 7), (1, 2)]
    engine = Engine(model, tokenizer)
    for prompt, out in zip(prompts, outs):
        assert out == engine.generate_batch(prompt, max_tokens=4, temperature=0.0)[0][0][len(prompt):]
    with pytest.raises(ValueError, match="prefill_tokens"):
        BatchEngine(model, tokenizer, prefill_tokens=1)


def test_batch_engine_long_prompt_never_stalls_running_rows(tokenizer):
    # a 45-token prompt arrives while 3 rows decode, with an 8-token budget: it is prefilled in 6 chunks, and the
    # running rows take a decode step between every two of them; every reply (the chunked one included, across
    # the 6-token sliding window) equals its solo run
    V = tokenizer.get_vocab_size()
    model = make_model(V, zero_specials_from=first_special(tokenizer))
    g = torch.Generator().manual_seed(11)
    short = [torch.randint(0, first_special(tokenizer), (3,), generator=g).tolist() for _ in range(3)]
    long = torch.randint(0, first_special(tokenizer), (45,), generator=g).tolist()
    shapes = record_forwards(model)
    batch = BatchEngine(model, tokenizer, max_rows=4, prefill_tokens=8).start()
    try:
        streams = [batch.submit(p, 55, temperature=0.0) for p in short]
        firsts = [s.get(timeout=60) for s in streams]  # all three are decoding
        mark = len(shapes)
        streams.append(batch.submit(long, 10, temperature=0.8, seed=3))
        outs = [[f] + list(s) for f, s in zip(firsts, streams)] + [list(streams[3])]
    finally:
        batch.stop()
        del model.forward_cached
    calls = shapes[mark:]
    chunks = [i for i, s in enumerate(calls) if s[0] == 1 and s[1] > 1]
    assert [calls[i] for i in chunks] == [(1, 8)] * 5 + [(1, 5)]
    assert all(any(calls[k][1] == 1 for k in range(a + 1, b)) for a, b in zip(chunks, chunks[1:]))
    engine = Engine(model, tokenizer)
    for prompt, out in zip(short, outs):
        assert out == engine.generate_batch(prompt, max_tokens=55, temperature=0.0)[0][0][len(prompt):]
    assert outs[3] == engine.generate_batch(long, max_tokens=10, temperature=0.8, seed=3)[0][0][len(long):]


def test_batch_engine_admits_arrivals_at_the_next_iteration(tokenizer):
    # a prompt submitted while two rows decode is prefilled before the loop's next decode step (at most the step
    # already under way runs first), and its first token is out before that next step: no polling interval
    V = tokenizer.get_vocab_size()
    model = make_model(V, n_layer=2, zero_specials_from=first_special(tokenizer))
    shapes = record_forwards(model)
    batch = BatchEngine(model, tokenizer, max_rows=4).start()
    try:
        running = [batch.submit([3 + i, 4, 5], 200, temperature=0.0) for i in range(2)]
        for s in running:
            s.get(timeout=60)
        for _ in range(3):  # a few steps with both rows decoding
            running[0].get(timeout=60)
        mark = len(shapes)
        puts = []  # forwards done when each of its tokens was queued (in the engine's thread: no race)
        late = batch.submit([9, 8, 7, 6, 5], 3, temperature=0.0, on_put=lambda: puts.append(len(shapes)))
        first = late.get(timeout=60)
        after_first = puts[0]
        rest = list(late)
        for s in running:
            s.cancel()
    finally:
        batch.stop()
        del model.forward_cached
    calls = shapes[mark:after_first]
    assert calls[-1] == (1, 5)  # its prefill was the last forward before its first token
    assert sum(1 for s in calls[:-1] if s[1] == 1) <= 1  # after at most the decode step already under way
    engine = Engine(model, tokenizer)
    assert [first] + rest == engine.generate_batch([9, 8, 7, 6, 5], max_tokens=3, temperature=0.0)[0][0][5:]


def test_batch_engine_freezes_the_heap_it_starts_with(tokenizer):
    # a full garbage collection over what the process held at start (torch, the model, compiled graphs) stalled
    # every request for ~180 ms: once serving, those objects are out of the collector's generations
    import gc
    V = tokenizer.get_vocab_size()
    model = make_model(V, n_layer=1, zero_specials_from=first_special(tokenizer))
    gc.unfreeze()
    sentinel = [object()]  # a container, so the collector tracks it
    assert any(o is sentinel for o in gc.get_objects())
    batch = BatchEngine(model, tokenizer, max_rows=2).start()
    try:
        assert len(list(batch.submit([3, 4, 5], 2, temperature=0.0))) == 2
        assert gc.get_freeze_count() > 0
        assert not any(o is sentinel for o in gc.get_objects())
    finally:
        batch.stop()
        gc.unfreeze()


def test_batch_engine_cancel_frees_the_row(tokenizer):
    V = tokenizer.get_vocab_size()
    model = make_model(V, n_layer=1, zero_specials_from=first_special(tokenizer))
    batch = BatchEngine(model, tokenizer, max_rows=1).start()
    try:
        long = batch.submit([1, 2, 3], max_tokens=60, temperature=0.0)
        assert isinstance(long.get(timeout=30), int)
        waiting = batch.submit([4, 5], max_tokens=3, temperature=0.0)  # needs the only row
        long.cancel()
        assert len(list(waiting)) == 3 and waiting.finish_reason == "length"
        rest = list(long)
        assert long.finish_reason == "cancelled" and len(rest) < 59
        assert long.get() is None  # a finished stream keeps answering None
    finally:
        batch.stop()


def test_batch_engine_queue_full_and_stop(tokenizer):
    V = tokenizer.get_vocab_size()
    batch = BatchEngine(make_model(V, n_layer=1), tokenizer, max_rows=1, max_queue=2)  # not started
    a, b, c = batch.submit([1], 5), batch.submit([2], 5), batch.submit([3], 5)  # one free row + two places
    assert batch.stats()["queue_depth"] == 3
    with pytest.raises(QueueFull):
        batch.submit([3], 5)
    with pytest.raises(ValueError, match="top_p"):
        batch.submit([3], 5, top_p=2.0)
    with pytest.raises(ValueError, match="token ids"):
        batch.submit([V], 5)
    batch.stop()
    assert list(a) == [] and all(s.finish_reason == "cancelled" for s in (a, b, c))


class NextTokenModel(nn.Module):
    """Predicts table[last input token] (default otherwise), whatever the row or step."""

    def __init__(self, vocab_size, table, default):
        super().__init__()
        self.config = GPTConfig(sequence_len=64, vocab_size=vocab_size, n_layer=1, n_head=1, n_kv_head=1, n_embd=8)
        self.dummy = nn.Parameter(torch.zeros(1))
        self.compute_dtype = torch.float32
        self.table, self.default = table, default

    def forward_cached(self, idx, kv_cache, last_only=False, compile=False, last_positions=None):
        B, T = idx.shape
        kv_cache.advance(T)
        if kv_cache.prev_embedding is None:
            kv_cache.prev_embedding = torch.zeros(B, 1, self.config.n_embd)
        logits = torch.zeros(B, 1 if last_only or last_positions is not None else T, self.config.vocab_size)
        for b in range(B):
            last = -1 if last_positions is None else int(last_positions[b])
            logits[b, -1, self.table.get(int(idx[b, last]), self.default)] = 10.0
        return logits


def test_batch_engine_tool_use_per_row(tokenizer):
    V = tokenizer.get_vocab_size()
    ps, pe, os_, oe, end = tool_tokens(tokenizer)
    two, plus, three = (tokenizer.encode(c)[0] for c in "2+3")
    five = tokenizer.encode("5")
    q, a, x = (tokenizer.encode(c)[0] for c in "qax")
    # a prompt ending in q calls the calculator on "2+3"; one ending in a answers x and stops; while the
    # tool output is forced, the model proposes x (discarded)
    table = {q: ps, ps: two, two: plus, plus: three, three: pe, pe: x, os_: x, oe: end, a: x, x: end}
    for f in five:
        table[f] = x
    model = NextTokenModel(V, table, default=end)
    batch = BatchEngine(model, tokenizer, max_rows=2).start()
    try:
        streams = [batch.submit([1, q], 30, temperature=0.0), batch.submit([1, a], 30, temperature=0.0),
                   batch.submit([2, q], 30, temperature=0.0)]
        outs = [list(s) for s in streams]
    finally:
        batch.stop()
    want_tool = [ps, two, plus, three, pe, os_] + five + [oe]
    assert outs == [want_tool, [x], want_tool]
    assert [s.finish_reason for s in streams] == ["stop"] * 3
    solo = Engine(NextTokenModel(V, table, default=end), tokenizer)
    assert solo.generate_batch([1, q], max_tokens=30, temperature=0.0)[0][0][2:] == want_tool


class SlowModel(NextTokenModel):
    """Never stops (predicts `default`) and takes 50 ms a forward, so no request ends during a burst."""

    def forward_cached(self, *args, **kwargs):
        time.sleep(0.05)
        return super().forward_cached(*args, **kwargs)


def test_batch_engine_burst_of_rows_plus_queue_is_all_accepted(tokenizer):
    """max_rows + max_queue + 1 requests released together by a barrier on an idle, running engine: exactly one
    (the last to get in) is refused, whichever order the threads run in."""
    V = tokenizer.get_vocab_size()
    x = tokenizer.encode("x")[0]
    rows, places = 2, 3
    batch = BatchEngine(SlowModel(V, {}, default=x), tokenizer, max_rows=rows, max_queue=places).start()
    n = rows + places + 1
    barrier = threading.Barrier(n)

    def submit(i):
        barrier.wait()
        try:
            return batch.submit([1, 2 + i], max_tokens=50, temperature=0.0)
        except QueueFull:
            return None

    try:
        for _ in range(3):  # the issue saw 429s in 2 bursts of 3
            with ThreadPoolExecutor(n) as pool:
                streams = list(pool.map(submit, range(n)))
            assert sum(s is None for s in streams) == 1
            stats = batch.stats()
            assert stats["active_rows"] + stats["queue_depth"] <= rows + places
            for s in streams:
                if s is not None:
                    s.cancel()
            deadline = time.time() + 30
            while (st := batch.stats())["active_rows"] + st["queue_depth"] and time.time() < deadline:
                time.sleep(0.01)
    finally:
        batch.stop()


def test_batch_engine_decode_threads_apply_to_decode_steps_and_small_prefills(tokenizer, monkeypatch):
    # decode_threads=1: every decode step and a prefill of up to SMALL_PREFILL_TOKENS run on 1 intra-op thread,
    # a larger prefill on the loop's own setting, which is back after each; the tokens equal the solo run's
    monkeypatch.setattr(batch_engine, "SMALL_PREFILL_TOKENS", 2)
    V = tokenizer.get_vocab_size()
    model = make_model(V, zero_specials_from=first_special(tokenizer))
    seen, forward_cached = [], model.forward_cached

    def recording(idx, kv_cache, **kw):
        seen.append((idx.shape[1] == 1 and kv_cache.prev_embedding is not None, torch.get_num_threads()))
        return forward_cached(idx, kv_cache, **kw)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        model.forward_cached = recording
        batch = BatchEngine(model, tokenizer, max_rows=2, compile=False, decode_threads=1).start()
        try:
            out = list(batch.submit([5, 6, 7], max_tokens=6, temperature=0.0))
            after = batch.submit([8, 9], max_tokens=1, temperature=0.0)  # a small prefill after decode steps
            list(after)
        finally:
            batch.stop()
        del model.forward_cached
    finally:
        torch.set_num_threads(threads)
    decodes = [n for decode, n in seen if decode]
    prefills = [n for decode, n in seen if not decode]
    assert len(decodes) == 5 and set(decodes) == {1}
    assert prefills == [2, 1]  # 3 tokens, then 2
    results, _ = Engine(model, tokenizer).generate_batch([5, 6, 7], max_tokens=6, temperature=0.0)
    assert out == results[0][3:]


def test_batch_engine_compiled_decode_on_its_own_threads_never_recompiles(tokenizer):
    # a compiled graph guards on torch's thread count: the warm-up compiles the decode step (one row, several)
    # on decode_threads, so serving rows under that setting adds no graph; the tokens equal the solo runs'
    V = tokenizer.get_vocab_size()
    model = make_model(V, n_layer=2, zero_specials_from=first_special(tokenizer))
    reqs = mixed_requests(tokenizer, 3, seed=7)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        batch = BatchEngine(model, tokenizer, max_rows=4, compile=True, decode_threads=1).start()
        try:
            streams = [batch.submit(p, n, **kw) for p, n, kw in reqs]
            outs = [list(s) for s in streams]
        finally:
            batch.stop()
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs == 2, "the decode step recompiled"
    finally:
        torch.set_num_threads(threads)
    engine = Engine(model, tokenizer)
    for (prompt, n, kw), out in zip(reqs, outs):
        assert out == engine.generate_batch(prompt, max_tokens=n, **kw)[0][0][len(prompt):]
