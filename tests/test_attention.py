"""SDPA attention paths vs a slow explicit-softmax reference; KV cache bookkeeping; the CUDA backends
(`gpu` tests: on a CPU their CUDA code path, FA3 aside)."""

import warnings

import pytest
import torch

import nanochat.attention as attn
from nanochat.attention import KVCache, flash_attn_decode, flash_attn_func, flash_attn_with_kvcache, reference_attention


@pytest.fixture(autouse=True)
def sdpa_backend():
    attn.set_backend("sdpa")
    yield
    attn._backend = None


def rand_qkv(B=2, T=24, H=4, Hkv=2, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, D, generator=g)
    k = torch.randn(B, T, Hkv, D, generator=g)
    v = torch.randn(B, T, Hkv, D, generator=g)
    return q, k, v


@pytest.mark.parametrize("Hkv", [4, 2, 1])
@pytest.mark.parametrize("left", [-1, 0, 3, 10, 23, 100])
def test_training_path_matches_reference(Hkv, left):
    q, k, v = rand_qkv(Hkv=Hkv)
    y = flash_attn_func(q, k, v, causal=True, window_size=(left, 0))
    ref = reference_attention(q, k, v, torch.arange(q.size(1)), window_left=left)
    assert y.shape == q.shape
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)


def test_reference_window_by_hand():
    # one head, D=1, q=k=0 -> uniform attention over exactly the visible keys: output = their mean
    T = 6
    q = torch.zeros(1, T, 1, 1)
    k = torch.zeros(1, T, 1, 1)
    v = torch.arange(T, dtype=torch.float32).view(1, T, 1, 1)
    y = reference_attention(q, k, v, torch.arange(T), window_left=2).flatten()
    expected = torch.tensor([0.0, 0.5, 1.0, 2.0, 3.0, 4.0])  # mean of v[t-2..t]
    torch.testing.assert_close(y, expected)
    y2 = flash_attn_func(q, k, v, causal=True, window_size=(2, 0)).flatten()
    torch.testing.assert_close(y2, expected)


def test_full_window_training_path_builds_no_mask(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("mask built on the full-window training path")
    monkeypatch.setattr(attn, "_build_mask", boom)
    q, k, v = rand_qkv()
    flash_attn_func(q, k, v, causal=True, window_size=(-1, 0))
    flash_attn_func(q, k, v, causal=True, window_size=(q.size(1), 0))  # window >= T is also full


def test_non_causal_is_full_attention():
    q, k, v = rand_qkv(Hkv=4)
    y = flash_attn_func(q, k, v, causal=False)
    ref = reference_attention(q, k, v, torch.arange(q.size(1)), causal=False)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("Hkv,left", [(4, -1), (2, -1), (2, 5), (1, 3), (4, 0)])
@pytest.mark.parametrize("chunks", [[24], [10, 1, 1, 1, 11], [1] * 24, [7, 5, 12]])
def test_kvcache_decode_matches_reference(Hkv, left, chunks):
    B, T, H, D = 2, 24, 4, 8
    q, k, v = rand_qkv(B=B, T=T, H=H, Hkv=Hkv, D=D)
    ref = reference_attention(q, k, v, torch.arange(T), window_left=left)
    k_cache = torch.zeros(B, T + 4, Hkv, D)
    v_cache = torch.zeros(B, T + 4, Hkv, D)
    seqlens = torch.zeros(B, dtype=torch.int32)
    outs, t = [], 0
    for n in chunks:
        sl = slice(t, t + n)
        outs.append(flash_attn_with_kvcache(q[:, sl], k_cache, v_cache, k=k[:, sl], v=v[:, sl],
                                            cache_seqlens=seqlens, causal=True, window_size=(left, 0)))
        seqlens += n
        t += n
    torch.testing.assert_close(torch.cat(outs, dim=1), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k_cache[:, :T], k)  # the cache holds exactly what was written
    assert torch.all(k_cache[:, T:] == 0)


@pytest.mark.parametrize("left", [-1, 2])
def test_kvcache_ragged_rows(left):
    # rows at different positions (FA3 semantics): each row must match its own reference
    B, H, Hkv, D, Tn = 3, 4, 2, 8, 2
    lens = [5, 0, 9]
    q, k, v = rand_qkv(B=B, T=12, H=H, Hkv=Hkv, D=D, seed=1)
    k_cache = torch.zeros(B, 16, Hkv, D)
    v_cache = torch.zeros(B, 16, Hkv, D)
    for b, n in enumerate(lens):
        k_cache[b, :n], v_cache[b, :n] = k[b, :n], v[b, :n]
    seqlens = torch.tensor(lens, dtype=torch.int32)
    qn = torch.stack([q[b, n:n + Tn] for b, n in enumerate(lens)])
    kn = torch.stack([k[b, n:n + Tn] for b, n in enumerate(lens)])
    vn = torch.stack([v[b, n:n + Tn] for b, n in enumerate(lens)])
    y = flash_attn_with_kvcache(qn, k_cache, v_cache, k=kn, v=vn, cache_seqlens=seqlens, window_size=(left, 0))
    for b, n in enumerate(lens):
        ref = reference_attention(q[b:b + 1, :n + Tn], k[b:b + 1, :n + Tn], v[b:b + 1, :n + Tn],
                                  torch.arange(n + Tn), window_left=left)[:, n:]
        torch.testing.assert_close(y[b:b + 1], ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(k_cache[b, n:n + Tn], kn[b])


@pytest.mark.parametrize("left", [-1, 3])
def test_decode_step_ragged_rows(left):
    # the fixed-shape decode attention: one token per row, rows at their own positions, the whole cache
    # masked rather than sliced; stale values past a row's position must not leak in
    B, H, Hkv, D = 3, 4, 2, 8
    lens = [5, 0, 9]
    q, k, v = rand_qkv(B=B, T=12, H=H, Hkv=Hkv, D=D, seed=2)
    k_cache = torch.full((B, 16, Hkv, D), 7.0)
    v_cache = torch.full((B, 16, Hkv, D), 7.0)
    for b, n in enumerate(lens):
        k_cache[b, :n], v_cache[b, :n] = k[b, :n], v[b, :n]
    pick = lambda x: torch.stack([x[b, n:n + 1] for b, n in enumerate(lens)])  # noqa: E731
    y = flash_attn_decode(pick(q), k_cache, v_cache, pick(k), pick(v), torch.tensor(lens, dtype=torch.int32),
                          window_size=(left, 0))
    for b, n in enumerate(lens):
        ref = reference_attention(q[b:b + 1, :n + 1], k[b:b + 1, :n + 1], v[b:b + 1, :n + 1],
                                  torch.arange(n + 1), window_left=left)[:, n:]
        torch.testing.assert_close(y[b:b + 1], ref, atol=1e-5, rtol=1e-5)


def test_kvcache_rows_view_and_insert_row():
    big = KVCache(4, num_heads=2, seq_len=8, head_dim=4, num_layers=3, device="cpu")
    big.prev_embedding = torch.zeros(4, 1, 5)
    src = KVCache(1, num_heads=2, seq_len=8, head_dim=4, num_layers=3, device="cpu")
    src.k_cache.normal_(), src.v_cache.normal_()
    src.advance(3)
    src.prev_embedding = torch.ones(1, 1, 5)
    big.insert_row(2, src)
    assert big.cache_seqlens.tolist() == [0, 0, 3, 0]
    assert torch.equal(big.k_cache[:, 2, :3], src.k_cache[:, 0, :3]) and torch.all(big.k_cache[:, 2, 3:] == 0)
    assert big.prev_embedding[:, 0, 0].tolist() == [0, 0, 1, 0]
    view = big.rows(3)  # shares storage: a step on the view lands in the big cache
    view.store_step(torch.full((3, 3, 2, 4), 5.0), torch.full((3, 3, 2, 4), 6.0))
    view.advance(1)
    assert big.cache_seqlens.tolist() == [1, 1, 4, 0]
    assert torch.all(big.k_cache[:, 2, 3] == 5) and torch.all(big.v_cache[:, 0, 0] == 6)
    assert torch.all(big.k_cache[:, 3] == 0)


def test_kvcache_overflow_is_an_error():
    q, k, v = rand_qkv(B=1, T=4)
    k_cache, v_cache = torch.zeros(1, 6, 2, 8), torch.zeros(1, 6, 2, 8)
    with pytest.raises(ValueError, match="overflow"):
        flash_attn_with_kvcache(q, k_cache, v_cache, k=k, v=v, cache_seqlens=torch.tensor([3], dtype=torch.int32))


def test_kvcache_prefill_replicates_and_resets():
    src = KVCache(1, num_heads=2, seq_len=8, head_dim=4, num_layers=3, device="cpu")
    src.k_cache.normal_()
    src.v_cache.normal_()
    src.advance(5)
    src.prev_embedding = torch.randn(1, 1, 16)
    dst = KVCache(4, num_heads=2, seq_len=12, head_dim=4, num_layers=3, device="cpu")
    dst.prefill(src)
    assert dst.get_pos() == 5 and dst.cache_seqlens.tolist() == [5] * 4
    for b in range(4):
        torch.testing.assert_close(dst.k_cache[:, b, :5], src.k_cache[:, 0, :5])
        torch.testing.assert_close(dst.v_cache[:, b, :5], src.v_cache[:, 0, :5])
        torch.testing.assert_close(dst.prev_embedding[b], src.prev_embedding[0])
    assert torch.all(dst.k_cache[:, :, 5:] == 0)
    with pytest.raises(ValueError, match="empty cache"):
        dst.prefill(src)
    dst.reset()
    assert dst.get_pos() == 0 and dst.prev_embedding is None
    bad = KVCache(4, num_heads=3, seq_len=12, head_dim=4, num_layers=3, device="cpu")
    with pytest.raises(ValueError, match="cache shapes differ"):
        bad.prefill(src)
    small = KVCache(2, num_heads=2, seq_len=4, head_dim=4, num_layers=3, device="cpu")
    with pytest.raises(ValueError, match="room"):
        small.prefill(src)


def test_backend_override(monkeypatch):
    with pytest.raises(ValueError, match="sdpa"):
        attn.set_backend("xformers")
    monkeypatch.setenv("NANOCHAT_ATTN", "sdpa")
    assert attn.set_backend(None) == "sdpa"
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="fa3"):
            attn.set_backend("fa3")
        monkeypatch.delenv("NANOCHAT_ATTN")
        assert attn.set_backend(None) == "sdpa"  # auto-detection falls back quietly

# -----------------------------------------------------------------------------
# Backend parity: banded SDPA / FlexAttention / FA3 vs the reference, forward and backward

def _grads(fn, q, k, v, seed=3):
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    y = fn(q, k, v)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed)).to(y.device, y.dtype)
    (y.float() * g.float()).sum().backward()
    return y.detach(), q.grad, k.grad, v.grad


@pytest.mark.parametrize("T,left", [(24, 0), (24, 5), (24, 11), (37, 8), (64, 16)])
@pytest.mark.parametrize("Hkv", [4, 2])
def test_banded_sdpa_forward_backward_matches_reference(T, left, Hkv):
    q, k, v = rand_qkv(T=T, Hkv=Hkv, seed=T + left)
    fast = _grads(lambda q, k, v: flash_attn_func(q, k, v, causal=True, window_size=(left, 0)), q, k, v)
    ref = _grads(lambda q, k, v: reference_attention(q, k, v, torch.arange(T), window_left=left), q, k, v)
    for a, b in zip(fast, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_windowed_model_training_forward_builds_no_dense_mask(monkeypatch):
    from nanochat.gpt import GPT, GPTConfig

    def boom(*a, **k):
        raise AssertionError("a dense T x T mask was built in a training forward")
    monkeypatch.setattr(attn, "_build_mask", boom)
    monkeypatch.setattr(attn, "_aligned_mask", boom)
    cfg = GPTConfig(sequence_len=64, vocab_size=64, n_layer=3, n_head=2, n_kv_head=1, n_embd=32,
                    window_pattern="SSL", short_window=16)
    model = GPT(cfg)
    model.init_weights()
    idx = torch.randint(0, 64, (2, 64))
    model(idx, idx).backward()
    assert model.window_sizes[0][0] == 16  # the windowed layers really ran


def test_flex_block_mask_matches_dense_definition():
    from torch.nn.attention.flex_attention import create_block_mask
    for T, left in [(512, 128), (384, 100), (300, 64), (256, 0)]:
        ours = attn.sliding_window_block_mask(T, left, "cpu", block=64).to_dense()
        ref = create_block_mask(lambda b, h, q, kv: (q >= kv) & (q - kv <= left), None, None, T, T,
                                device="cpu", BLOCK_SIZE=64).to_dense()
        assert torch.equal(ours, ref), (T, left)


def test_flex_forward_matches_reference_on_cpu():
    # eager FlexAttention runs on CPU (forward only): checks the mask_mod and layout handling
    T, left = 256, 48
    q, k, v = rand_qkv(T=T, Hkv=2, D=16, seed=5)
    with torch.no_grad():
        y = attn._flex_window(q, k, v, left, compiled=False)
    ref = reference_attention(q, k, v, torch.arange(T), window_left=left)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)


def test_naming_a_backend_that_cannot_run_is_an_error():
    if torch.cuda.is_available():
        pytest.skip("CPU-only check")
    with pytest.raises(RuntimeError, match="flex"):
        attn.set_backend("flex")
    with pytest.raises(SystemExit, match="--attn=fa3"):  # the scripts' flag: one clear message, no traceback
        attn.set_backend_from_flag("fa3")
    assert attn.set_backend("auto") == "sdpa"
    assert "CUDA" in attn.backend_reason()


def backends_here(device, wanted):
    """(backend, why-not) for each wanted backend: on CUDA the ones that run here; on a CPU (the `device` fixture's
    CUDA code path) flex stands in as itself (its functions run on a CPU, forward only) and FA3 is skipped."""
    for backend in wanted:
        if device == "cuda":
            try:
                attn.set_backend(backend)
            except RuntimeError as e:
                warnings.warn(f"backend {backend} not checked on this GPU: {e}")
                continue
        elif backend == "fa3":
            continue  # the FA3 kernel exists only on CUDA (Hopper): its statements are what a CPU skips
        else:
            attn.set_backend("sdpa")
            attn._backend = backend  # flex: the same functions; a CPU would never pick it
        yield backend


@pytest.mark.gpu
@pytest.mark.parametrize("left", [-1, 128, 300])
def test_cuda_backends_forward_backward_match_reference(device, left):
    T = 1024 if device == "cuda" else 512  # a CPU: the same windows over fewer positions, in seconds
    q, k, v = (t.to(device).bfloat16() for t in rand_qkv(B=2, T=T, H=4, Hkv=2, D=128, seed=7))
    ref = _grads(lambda q, k, v: reference_attention(q, k, v, torch.arange(T, device=device), window_left=left),
                 q, k, v)
    checked = []
    for backend in backends_here(device, ["sdpa", "flex", "fa3"]):
        fast = flash_attn_func
        if device == "cpu" and backend == "flex" and 0 <= left < T - 1:
            # what flash_attn_func runs on CUDA, compiled FlexAttention; its backward is a Triton kernel (CUDA-only)
            with torch.no_grad():
                y = attn._flex_window(q, k, v, left)
            torch.testing.assert_close(y.float(), ref[0].float(), atol=2e-2, rtol=2e-2)
            checked.append(backend)
            continue
        out = _grads(lambda q, k, v: fast(q, k, v, causal=True, window_size=(left, 0)), q, k, v)
        for a, b in zip(out, ref):  # bf16 inputs, fp32 reference: bf16 rounding of outputs and grads
            torch.testing.assert_close(a.float(), b.float(), atol=2e-2, rtol=2e-2)
        checked.append(backend)
    assert "sdpa" in checked and "flex" in checked


@pytest.mark.gpu
def test_cuda_kvcache_decode_matches_reference(device):
    B, T, H, Hkv, D, left = 2, 40, 4, 2, 128, 7
    q, k, v = (t.to(device).bfloat16() for t in rand_qkv(B=B, T=T, H=H, Hkv=Hkv, D=D, seed=9))
    ref = reference_attention(q, k, v, torch.arange(T, device=device), window_left=left)
    checked = []
    for backend in backends_here(device, ["sdpa", "fa3"]):
        k_cache = torch.zeros(B, T, Hkv, D, device=device, dtype=torch.bfloat16)
        v_cache = torch.zeros_like(k_cache)
        seqlens = torch.zeros(B, dtype=torch.int32, device=device)
        outs, t = [], 0
        for n in [17, 1, 1, 21]:
            sl = slice(t, t + n)
            outs.append(flash_attn_with_kvcache(q[:, sl], k_cache, v_cache, k=k[:, sl], v=v[:, sl],
                                                cache_seqlens=seqlens, causal=True, window_size=(left, 0)))
            seqlens += n
            t += n
        torch.testing.assert_close(torch.cat(outs, 1).float(), ref.float(), atol=2e-2, rtol=2e-2)
        checked.append(backend)
    assert "sdpa" in checked


@pytest.mark.gpu
@pytest.mark.parametrize("left", [-1, 5])
def test_compiled_decode_step_matches_reference(device, left):
    # the compilable decode attention (fullgraph: the compiled Engine step), every backend: under FA3 too it must
    # trace, so it takes the masked path rather than FA3's in-place cache op. A CPU compiles with aot_eager
    # (Dynamo + AOT autograd: the tracing, not Inductor's Triton code generation).
    B, Tmax, H, Hkv, D = 3, 16, 4, 2, 64
    lens = [5, 0, 9]
    q, k, v = (t.to(device).bfloat16() for t in rand_qkv(B=B, T=12, H=H, Hkv=Hkv, D=D, seed=4))
    pick = lambda x: torch.stack([x[b, n:n + 1] for b, n in enumerate(lens)])  # noqa: E731
    pos = torch.tensor(lens, dtype=torch.int32, device=device)
    for backend in backends_here(device, ["sdpa", "fa3"]):
        k_cache = torch.zeros(B, Tmax, Hkv, D, device=device, dtype=torch.bfloat16)
        v_cache = torch.zeros_like(k_cache)
        for b, n in enumerate(lens):
            k_cache[b, :n], v_cache[b, :n] = k[b, :n], v[b, :n]
        torch._dynamo.reset()
        step = torch.compile(lambda *a: flash_attn_decode(*a, window_size=(left, 0)), fullgraph=True,
                             backend="inductor" if device == "cuda" else "aot_eager")
        y = step(pick(q), k_cache, v_cache, pick(k), pick(v), pos)
        for b, n in enumerate(lens):
            ref = reference_attention(q[b:b + 1, :n + 1], k[b:b + 1, :n + 1], v[b:b + 1, :n + 1],
                                      torch.arange(n + 1, device=device), window_left=left)[:, n:]
            torch.testing.assert_close(y[b:b + 1].float(), ref.float(), atol=2e-2, rtol=2e-2)
    torch._dynamo.reset()
