"""
Engine tests: the KV-cache path against the model's naive generate() (full recompute per token), sampling,
and the tool state machine with a scripted stub model. (BatchEngine: tests/test_batch_engine.py.)
"""

import pytest
import torch
import torch.nn as nn

from nanochat.attention import KVCache
from nanochat.batch_engine import BatchEngine, generate_many
from nanochat.engine import Engine
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


def test_decode_kernel_threads_follow_the_openmp_wait_policy(monkeypatch):
    # sleeping OpenMP threads make every kernel's fork a wake-up: one thread then; spinning ones: all of torch's
    from nanochat.gpt import decode_kernel_threads
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        for policy, want in (("PASSIVE", 1), ("passive", 1), ("ACTIVE", 3), (None, 3)):
            if policy is None:
                monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
            else:
                monkeypatch.setenv("OMP_WAIT_POLICY", policy)
            assert decode_kernel_threads() == want, policy
    finally:
        torch.set_num_threads(before)


def test_compiled_decode_matches_eager(tokenizer):
    # the one compile test (it costs a compilation): greedy tokens and logits of the torch.compile'd
    # decode step equal the eager path's in fp32, with rows at different positions and a sliding window
    V = tokenizer.get_vocab_size()
    model = make_model(V, n_layer=2, zero_specials_from=first_special(tokenizer))
    prompt = tokenizer.encode("The quick brown fox", prepend="<|bos|>")
    for rows in (1, 2):  # one row takes the fused matrix-vector loops, several the BLAS calls
        eager = Engine(model, tokenizer).generate_batch(prompt, num_samples=rows, max_tokens=20, temperature=0.0)
        compiled = Engine(model, tokenizer, compile=True).generate_batch(prompt, num_samples=rows, max_tokens=20,
                                                                         temperature=0.0)
        assert compiled == eager
    # prompts of other lengths and other max_tokens reuse the one-row graph: no recompilation per request (an eval
    # of many prompts hit dynamo's recompile limit and paid ~8 compilations before falling back to eager)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    engine = Engine(model, tokenizer, compile=True)
    for text, max_tokens in (("Hi", 5), ("A much longer prompt than the one before it", 9), ("Two words", 13)):
        engine.generate_batch(tokenizer.encode(text, prepend="<|bos|>"), max_tokens=max_tokens, temperature=0.0)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs, "the decode step recompiled"
    cfg = model.config
    caches = [KVCache(2, cfg.n_kv_head, 64, cfg.n_embd // cfg.n_head, cfg.n_layer, "cpu") for _ in range(2)]
    ids = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(0))
    for cache in caches:  # ragged rows: row 1 starts 5 positions later
        model.forward_cached(ids[:, :7], cache)
        cache.cache_seqlens[0] = 2
    steps = [[model.forward_cached(ids[:, t:t + 1], c, compile=flag) for t in range(7, 12)]
             for c, flag in zip(caches, (False, True))]
    torch.testing.assert_close(torch.cat(steps[1], 1), torch.cat(steps[0], 1), atol=1e-4, rtol=1e-4)


def test_generate_many_equals_one_request_at_a_time(tokenizer):
    # the evals' batched path: each prompt's completion, greedy and seeded sampling, equals its own
    # generate_batch run, in order, with more prompts than rows (rows are reused) and prompts of unequal length
    V = tokenizer.get_vocab_size()
    model = make_model(V, zero_specials_from=first_special(tokenizer))
    engine = Engine(model, tokenizer)
    texts = ["Hi", "The quick brown fox jumps", "one two three four five six seven", "x", "hello world"]
    prompts = [tokenizer.encode(t, prepend="<|bos|>") for t in texts]
    prompts.insert(2, (prompts[1] * 10)[:58])  # its reply runs past the 64-token context: decoded alone, as before
    assert len(prompts[2]) < model.config.sequence_len < len(prompts[2]) + 12
    for kw in (dict(temperature=0.0), dict(temperature=1.0, top_k=20)):
        solo = [engine.generate_batch(p, max_tokens=12, seed=10 + i, **kw)[0][0][len(p):] for i, p in enumerate(prompts)]
        many = list(generate_many(engine, prompts, seeds=[10 + i for i in range(len(prompts))], max_tokens=12,
                                         max_rows=2, **kw))
        assert many == solo
        assert all(len(c) > 0 for c in many)
    with pytest.raises(ValueError, match="seeds"):
        list(generate_many(engine, prompts, seeds=[1]))


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


def test_cached_paths_follow_weights_changed_in_place(tokenizer):
    # the cached paths keep their own (on a CPU, transposed) copies of the matrices: after an in-place change of
    # a parameter, as an optimizer step or load_state_dict makes, prefill and decode logits must follow it and
    # agree with the uncached forward, which reads the parameters themselves
    V = tokenizer.get_vocab_size()
    model = make_model(V)
    cfg = model.config
    ids = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(2))

    def cached_logits():
        cache = KVCache(2, cfg.n_kv_head, 12, cfg.n_embd // cfg.n_head, cfg.n_layer, "cpu", torch.float32)
        pre = model.forward_cached(ids[:, :6], cache)
        return torch.cat([pre] + [model.forward_cached(ids[:, t:t + 1], cache) for t in range(6, 12)], dim=1)

    with torch.inference_mode():
        before = cached_logits()
        model.transformer.h[0].mlp.c_fc.weight.mul_(-1.5)
        model.lm_head.weight[:V].add_(0.02)
        after, full = cached_logits(), model(ids)
    assert (after - before).abs().max() > 1e-2  # the change reached the cached paths
    torch.testing.assert_close(after, full, atol=1e-4, rtol=1e-4)
    # on a CPU the head is applied from its transposed copy (matmul_t), which must be the parameter's transpose
    cols = model._inference_weights()["cols"]
    torch.testing.assert_close(cols["head"], model.lm_head.weight[:V].t())
