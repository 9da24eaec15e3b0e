"""
Engine tests: the KV-cache path against the model's naive generate() (full recompute per token), sampling,
the tool state machine with a scripted stub model, and BatchEngine (continuous batching) against solo runs.
"""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import torch.nn as nn

from nanochat.attention import KVCache
from nanochat.engine import BatchEngine, Engine, QueueFull
from nanochat.gpt import GPT, GPTConfig
from nanochat.tokenizer import RustBPETokenizer

CORPUS = [
    "The quick brown fox jumps over the lazy dog. 2+3=5 and 12*4=48, 7-2=5.",
    "How many r are in strawberry? Let me count: s,t,r,a,w,b,e,r,r,y gives 3.",
    "Numbers 0 1 2 3 4 5 6 7 8 9 10 100 1000, plus minus times divided by.",
]


@pytest.fixture(scope="module")
def tokenizer():
    return RustBPETokenizer.train_from_iterator(iter(CORPUS * 20), 300)


def tool_tokens(tokenizer):
    """The ids of <|python_start|>, <|python_end|>, <|output_start|>, <|output_end|>, <|assistant_end|>."""
    return tuple(tokenizer.encode_special(f"<|{name}|>")
                 for name in ("python_start", "python_end", "output_start", "output_end", "assistant_end"))


def make_model(vocab_size, seed=0, n_layer=3, zero_specials_from=None, logit_std=1.0):
    """
    A tiny real GPT (GQA, a short sliding window so decode crosses it) with random weights everywhere,
    including the parts the reference init zeroes (c_proj, smear/backout scalars), so every path of the
    forward matters. zero_specials_from: zero the lm_head rows of ids >= this, so greedy decoding never
    picks a special token (stop/tool tokens would cut the comparison with naive generate short).
    """
    cfg = GPTConfig(sequence_len=64, vocab_size=vocab_size, n_layer=n_layer, n_head=4, n_kv_head=2,
                    n_embd=64, window_pattern="SL", short_window=6)
    with torch.device("meta"):
        model = GPT(cfg)
    model.to_empty(device="cpu")
    model.init_weights()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                std = 1.0 if "wte" in name or "value_embeds" in name else p.size(1) ** -0.5
                if "lm_head" in name:
                    std = logit_std * p.size(1) ** -0.5 * 3
                p.copy_(torch.randn(p.shape, generator=g) * std)
        model.smear_lambda.fill_(0.5)
        model.backout_lambda.fill_(0.3)
        if zero_specials_from is not None:
            model.lm_head.weight[zero_specials_from:] = 0.0
    model.eval()
    return model


def first_special(tokenizer):
    return min(tokenizer.encode_special(s) for s in tokenizer.get_special_tokens())


# -----------------------------------------------------------------------------
# engine vs naive generate


@pytest.mark.parametrize("prompt_text", ["The quick brown fox", "T"])
def test_greedy_matches_naive_generate(tokenizer, prompt_text):
    V = tokenizer.get_vocab_size()
    model = make_model(V, zero_specials_from=first_special(tokenizer))
    prompt = tokenizer.encode(prompt_text, prepend="<|bos|>")
    if prompt_text == "T":
        prompt = [tokenizer.encode("T")[0]]  # a one-token prompt
        assert len(prompt) == 1
    n = 30  # with the prompt this runs well past the 6-token sliding window
    naive = list(model.generate(prompt, max_tokens=n, temperature=0.0))
    engine = Engine(model, tokenizer)
    columns = list(engine.generate(prompt, num_samples=3, max_tokens=n, temperature=0.0, seed=123))
    assert len(columns) == n
    for row in range(3):
        assert [c[0][row] for c in columns] == naive
        assert all(c[1][row] == 1 for c in columns)
    # generate_batch: prompt + generated, masks 0 on the prompt
    results, masks = engine.generate_batch(prompt, num_samples=2, max_tokens=n, temperature=0.0)
    assert results == [prompt + naive] * 2
    assert masks == [[0] * len(prompt) + [1] * n] * 2


def test_kv_cache_logits_match_full_forward(tokenizer):
    # the decode path's logits (not just the argmax) agree with the uncached forward
    V = tokenizer.get_vocab_size()
    model = make_model(V)
    cfg = model.config
    ids = torch.randint(0, V, (1, 20), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        full = model(ids)  # (1, 20, V)
        cache = KVCache(1, cfg.n_kv_head, 20, cfg.n_embd // cfg.n_head, cfg.n_layer, "cpu", torch.float32)
        pre = model.forward_cached(ids[:, :8], cache)
        steps = [model.forward_cached(ids[:, t:t + 1], cache) for t in range(8, 20)]
    got = torch.cat([pre] + steps, dim=1)
    torch.testing.assert_close(got, full, atol=1e-4, rtol=1e-4)


def test_compiled_decode_matches_eager(tokenizer):
    # the one compile test (it costs a compilation): greedy tokens and logits of the torch.compile'd
    # decode step equal the eager path's in fp32, with rows at different positions and a sliding window
    V = tokenizer.get_vocab_size()
    model = make_model(V, n_layer=2, zero_specials_from=first_special(tokenizer))
    prompt = tokenizer.encode("The quick brown fox", prepend="<|bos|>")
    eager = Engine(model, tokenizer).generate_batch(prompt, num_samples=2, max_tokens=20, temperature=0.0)
    compiled = Engine(model, tokenizer, compile=True).generate_batch(prompt, num_samples=2, max_tokens=20,
                                                                     temperature=0.0)
    assert compiled == eager
    cfg = model.config
    caches = [KVCache(2, cfg.n_kv_head, 64, cfg.n_embd // cfg.n_head, cfg.n_layer, "cpu") for _ in range(2)]
    ids = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(0))
    for cache in caches:  # ragged rows: row 1 starts 5 positions later
        model.forward_cached(ids[:, :7], cache)
        cache.cache_seqlens[0] = 2
    steps = [[model.forward_cached(ids[:, t:t + 1], c, compile=flag) for t in range(7, 12)]
             for c, flag in zip(caches, (False, True))]
    torch.testing.assert_close(torch.cat(steps[1], 1), torch.cat(steps[0], 1), atol=1e-4, rtol=1e-4)


def test_seeded_reproducibility(tokenizer):
    V = tokenizer.get_vocab_size()
    model = make_model(V)
    engine = Engine(model, tokenizer)
    prompt = tokenizer.encode("hello world", prepend="<|bos|>")
    kw = dict(num_samples=4, max_tokens=12, temperature=1.0, top_k=50)
    a = list(engine.generate(prompt, seed=7, **kw))
    b = list(engine.generate(prompt, seed=7, **kw))
    c = list(engine.generate(prompt, seed=8, **kw))
    assert a == b
    assert a != c
    # temperature 0 ignores the seed
    g1 = list(engine.generate(prompt, num_samples=2, max_tokens=8, temperature=0.0, seed=1))
    g2 = list(engine.generate(prompt, num_samples=2, max_tokens=8, temperature=0.0, seed=2))
    assert g1 == g2


def test_first_tokens_differ_across_samples(tokenizer):
    V = tokenizer.get_vocab_size()
    model = make_model(V, logit_std=0.3)  # a flat-ish distribution
    engine = Engine(model, tokenizer)
    prompt = tokenizer.encode("The quick", prepend="<|bos|>")
    first = next(engine.generate(prompt, num_samples=16, max_tokens=4, temperature=1.0, seed=0))
    tokens, mask = first
    assert len(tokens) == 16 and mask == [1] * 16
    assert len(set(tokens)) > 1  # each row samples its own first token from the shared prefill logits


def test_max_tokens_and_num_samples(tokenizer):
    V = tokenizer.get_vocab_size()
    model = make_model(V, zero_specials_from=first_special(tokenizer))
    engine = Engine(model, tokenizer)
    prompt = tokenizer.encode("lazy dog", prepend="<|bos|>")
    cols = list(engine.generate(prompt, num_samples=5, max_tokens=7, temperature=1.0))
    assert len(cols) == 7 and all(len(t) == 5 and len(m) == 5 for t, m in cols)
    results, masks = engine.generate_batch(prompt, num_samples=5, max_tokens=7, temperature=1.0)
    assert len(results) == 5 and all(len(r) == len(prompt) + 7 for r in results)
    assert all(len(r) == len(m) for r, m in zip(results, masks))
    # max_tokens=None stops at the model's sequence_len
    cols = list(engine.generate(prompt, max_tokens=None, temperature=1.0))
    assert len(prompt) + len(cols) == model.config.sequence_len
    assert list(engine.generate(prompt, max_tokens=0)) == []


def test_stop_tokens_end_rows(tokenizer):
    # a (stub) model that always predicts <|assistant_end|> / <|bos|>: generate_batch returns the prompt
    V = tokenizer.get_vocab_size()
    for stop in ["<|assistant_end|>", "<|bos|>"]:
        stub = ScriptModel(V, [[tokenizer.encode_special(stop)]])
        results, masks = Engine(stub, tokenizer).generate_batch([1, 2, 3], num_samples=2, max_tokens=10,
                                                                temperature=0.0)
        assert results == [[1, 2, 3]] * 2 and masks == [[0, 0, 0]] * 2
        assert stub.calls == 1  # prefill only: every row ended at its first token, no wasted decode step


def test_bad_arguments(tokenizer):
    V = tokenizer.get_vocab_size()
    engine = Engine(make_model(V, n_layer=1), tokenizer)
    with pytest.raises(ValueError, match="non-empty list"):
        next(engine.generate([]))
    with pytest.raises(ValueError, match="temperature"):
        next(engine.generate([1], temperature=-1.0))
    with pytest.raises(ValueError, match="token ids"):
        next(engine.generate([V + 5]))
    with pytest.raises(ValueError, match="num_samples"):
        next(engine.generate([1], num_samples=0))

# -----------------------------------------------------------------------------
# sampling inside the engines (sample_next_token itself: tests/test_sampling.py)


def test_engines_at_tiny_temperatures_give_the_greedy_reply(tokenizer):
    V = tokenizer.get_vocab_size()
    model = make_model(V, n_layer=1, zero_specials_from=first_special(tokenizer))
    engine = Engine(model, tokenizer)
    greedy = engine.generate_batch([1, 2, 3], max_tokens=12, temperature=0.0)[0]
    for temperature in (1e-39, 5e-324, 1e-300):
        assert engine.generate_batch([1, 2, 3], max_tokens=12, temperature=temperature, seed=3)[0] == greedy
    batch = BatchEngine(model, tokenizer, max_rows=2).start()
    try:
        assert list(batch.submit([1, 2, 3], 12, temperature=5e-324, seed=3)) == greedy[0][3:]
    finally:
        batch.stop()


# -----------------------------------------------------------------------------
# tool use, driven by a scripted stub model


class ScriptModel(nn.Module):
    """
    Predicts scripts[row][step] at decode step `step` (the prefill is step 0), whatever the input; past
    the end of the script it repeats the last token. Records the token columns it was fed.
    """

    def __init__(self, vocab_size, scripts):
        super().__init__()
        self.config = GPTConfig(sequence_len=128, vocab_size=vocab_size, n_layer=1, n_head=1, n_kv_head=1, n_embd=8)
        self.dummy = nn.Parameter(torch.zeros(1))
        self.compute_dtype = torch.float32
        self.scripts = scripts
        self.calls = 0
        self.inputs = []

    def forward_cached(self, idx, kv_cache, last_only=False, compile=False):
        B, T = idx.shape
        step = self.calls
        self.calls += 1
        if step > 0:
            self.inputs.append(idx[:, -1].tolist())
        kv_cache.advance(T)
        logits = torch.zeros(B, T, self.config.vocab_size)
        for b in range(B):
            script = self.scripts[b % len(self.scripts)]
            logits[b, -1, script[min(step, len(script) - 1)]] = 10.0
        return logits


def test_tool_output_is_forced_with_mask_zero(tokenizer):
    V = tokenizer.get_vocab_size()
    ps, pe, os_, oe, end = tool_tokens(tokenizer)
    expr = tokenizer.encode("2+3")
    five = tokenizer.encode("5")
    filler = tokenizer.encode("x")[0]
    forced = [os_] + five + [oe]
    # the model's own proposals during the forced steps are `filler` (they must be discarded)
    script = [ps] + expr + [pe] + [filler] * len(forced) + tokenizer.encode(" ok") + [end]
    stub = ScriptModel(V, [script])
    engine = Engine(stub, tokenizer)
    prompt = tokenizer.encode("q", prepend="<|bos|>")
    cols = list(engine.generate(prompt, num_samples=1, max_tokens=50, temperature=0.0))
    tokens = [t[0] for t, _ in cols]
    mask = [m[0] for _, m in cols]
    n_call = 1 + len(expr) + 1
    assert tokens == [ps] + expr + [pe] + forced + tokenizer.encode(" ok") + [end]
    assert mask == [1] * n_call + [0] * len(forced) + [1] * (len(tokenizer.encode(" ok")) + 1)
    # the forced tokens (not the discarded samples) were fed back into the model
    assert [c[0] for c in stub.inputs[n_call:n_call + len(forced)]] == forced
    # generate_batch drops the terminal token and keeps the masks aligned
    stub2 = ScriptModel(V, [script])
    results, masks = Engine(stub2, tokenizer).generate_batch(prompt, max_tokens=50, temperature=0.0)
    assert results[0] == prompt + tokens[:-1]
    assert masks[0] == [0] * len(prompt) + mask[:-1]


def test_tool_rows_are_independent(tokenizer):
    # row 0 computes 2+3, row 1 asks for something the calculator refuses: no output forced there
    V = tokenizer.get_vocab_size()
    ps, pe, os_, oe, end = tool_tokens(tokenizer)
    good, bad = tokenizer.encode("2+3"), tokenizer.encode("2*x")
    n = max(len(good), len(bad))
    pad = tokenizer.encode(" ")[0]
    # both scripts must agree on the first token (it comes from the shared prefill)
    s0 = [ps] + good + [pad] * (n - len(good)) + [pe] + [pad] * 10 + [end]
    s1 = [ps] + bad + [pad] * (n - len(bad)) + [pe] + [pad] * 10 + [end]
    stub = ScriptModel(V, [s0, s1])
    results, masks = Engine(stub, tokenizer).generate_batch([0], num_samples=2, max_tokens=40, temperature=0.0)
    gen0, gen1 = results[0][1:], results[1][1:]
    assert os_ in gen0 and oe in gen0
    i = gen0.index(os_)
    assert gen0[i:i + len(tokenizer.encode("5")) + 2] == [os_] + tokenizer.encode("5") + [oe]
    assert os_ not in gen1
    assert masks[1] == [0] + [1] * len(gen1)
    assert masks[0][1 + i] == 0


def test_spelling_tool_call(tokenizer):
    V = tokenizer.get_vocab_size()
    sp = tokenizer.encode_special
    call = tokenizer.encode("'strawberry'.count('r')")
    script = [sp("<|python_start|>")] + call + [sp("<|python_end|>")] + [0] * 5 + [sp("<|assistant_end|>")]
    results, masks = Engine(ScriptModel(V, [script]), tokenizer).generate_batch([0], max_tokens=60, temperature=0.0)
    out = results[0]
    i = out.index(sp("<|output_start|>"))
    j = out.index(sp("<|output_end|>"))
    assert tokenizer.decode(out[i + 1:j]) == "3"
    assert all(m == 0 for m in masks[0][i:j + 1])

# -----------------------------------------------------------------------------
# BatchEngine (continuous batching)


def test_batch_engine_matches_solo_runs(tokenizer):
    # 16 concurrent mixed requests through 4 rows: each one's tokens equal its solo Engine run
    V = tokenizer.get_vocab_size()
    model = make_model(V, zero_specials_from=first_special(tokenizer))
    g = torch.Generator().manual_seed(5)
    reqs = []
    for i in range(16):
        prompt = torch.randint(0, first_special(tokenizer), (1 + (7 * i) % 13,), generator=g).tolist()
        sampling = dict(temperature=0.0) if i % 3 else dict(temperature=0.9, top_k=20 if i % 2 else None,
                                                             top_p=0.9, seed=i)
        reqs.append((prompt, 3 + (5 * i) % 17, sampling))
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


def test_batch_engine_prefill_groups_stay_under_the_token_budget(tokenizer):
    # oldest first, at most prefill_tokens padded tokens per group (a longer prompt alone); replies unchanged
    V = tokenizer.get_vocab_size()
    model = make_model(V, n_layer=2, zero_specials_from=first_special(tokenizer))
    prompts = [[5] * 3, [6] * 4, [7] * 30, [8] * 2, [9] * 5, [10] * 2]
    shapes, forward = [], model.forward_cached
    model.forward_cached = lambda idx, cache, **kw: (shapes.append(tuple(idx.shape)), forward(idx, cache, **kw))[1]
    batch = BatchEngine(model, tokenizer, max_rows=8, prefill_tokens=12)
    try:
        streams = [batch.submit(p, 4, temperature=0.0) for p in prompts]
        batch.start()
        outs = [list(s) for s in streams]
    finally:
        batch.stop()
        del model.forward_cached
    # 2 rows x 4 = 8 fit; adding the 30-token prompt would pad 3 x 30; then it alone; 3 x 5 = 15 > 12 splits the rest
    assert [s for s in shapes if s[1] > 1] == [(2, 4), (1, 30), (2, 5), (1, 2)]
    engine = Engine(model, tokenizer)
    for prompt, out in zip(prompts, outs):
        assert out == engine.generate_batch(prompt, max_tokens=4, temperature=0.0)[0][0][len(prompt):]
    with pytest.raises(ValueError, match="prefill_tokens"):
        BatchEngine(model, tokenizer, prefill_tokens=0)


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
