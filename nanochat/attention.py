"""
Attention backends with one interface, plus the KV cache used for inference.

Two functions shaped like Flash Attention 3's API, tensors in (B, T, H, D) layout (REFERENCE 5.10):
    flash_attn_func(q, k, v, causal=True, window_size=(-1, -1))
    flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, cache_seqlens=None, causal=True,
                            window_size=(-1, -1))
window_size = (left, right): query at absolute position t sees keys t-left .. t (left = -1: unlimited).
GQA: k/v may have fewer heads than q; query head h reads kv head h // (H // Hkv).

Backend: FA3 (HF `kernels` package, Hopper = compute capability 9.x) when importable and the tensors
are CUDA bf16/fp16; PyTorch SDPA otherwise (CPU, MPS, every other GPU). Override with env
NANOCHAT_ATTN=sdpa|fa3 or set_backend("sdpa"|"fa3"|None). The choice is logged once.
`reference_attention` is a slow, obviously correct path that tests compare the fast ones against.
"""

import os
import logging

import torch
import torch.nn.functional as F

logger = logging.getLogger("nanochat")

# -----------------------------------------------------------------------------
# Backend selection

_backend = None  # resolved lazily: "fa3" or "sdpa"
_fa3 = None      # the FA3 module when loaded


def _load_fa3():
    """FA3 interface module, or None (with the reason) when it can't be had on this machine."""
    if not torch.cuda.is_available():
        return None, "no CUDA device"
    major, _ = torch.cuda.get_device_capability()
    if major != 9:
        return None, f"compute capability {major}.x is not Hopper (FA3 needs 9.x)"
    try:
        from kernels import get_kernel
        mod = get_kernel("varunneal/flash-attention-3")
        return getattr(mod, "flash_attn_interface", mod), "Hopper GPU, loaded varunneal/flash-attention-3"
    except Exception as e:  # not installed, offline, build mismatch: all mean "use SDPA"
        return None, f"FA3 unavailable ({type(e).__name__}: {e})"


def set_backend(name=None):
    """Force "sdpa" or "fa3" (tests, benchmarks); None re-runs auto-detection (env NANOCHAT_ATTN first)."""
    global _backend, _fa3
    name = name or os.environ.get("NANOCHAT_ATTN") or None
    if name not in (None, "sdpa", "fa3"):
        raise ValueError(f"attention backend must be 'sdpa' or 'fa3' (NANOCHAT_ATTN / set_backend), got {name!r}")
    if name == "sdpa":
        _backend, _fa3, reason = "sdpa", None, "forced"
    else:
        _fa3, reason = _load_fa3()
        if _fa3 is None and name == "fa3":
            raise RuntimeError(f"attention backend 'fa3' was forced but cannot be used: {reason}; "
                               "unset NANOCHAT_ATTN or pass 'sdpa'")
        _backend = "fa3" if _fa3 is not None else "sdpa"
    logger.info(f"attention backend: {_backend} ({reason})")
    return _backend


def get_backend():
    if _backend is None:
        set_backend(None)
    return _backend


def _use_fa3(q):
    # FA3 kernels take only half precision; an fp32 run on a Hopper box quietly uses SDPA
    return get_backend() == "fa3" and q.is_cuda and q.dtype in (torch.bfloat16, torch.float16)


def _first(out):
    # some FA3 builds return (out, softmax_lse)
    return out[0] if isinstance(out, tuple) else out

# -----------------------------------------------------------------------------
# SDPA path

def _window_left(window_size):
    left = window_size[0] if window_size is not None else -1
    return -1 if left is None or left < 0 else int(left)


def _build_mask(q_pos, Tk, left, device):
    """Boolean mask (..., Tq, Tk), True = may attend. q_pos: absolute query positions (..., Tq)."""
    col = torch.arange(Tk, device=device)
    qp = q_pos.unsqueeze(-1)
    mask = col <= qp
    if left >= 0:
        mask = mask & (qp - col <= left)
    return mask


_mask_cache = {}  # (Tq, Tk, offset, left, device) -> mask; training reuses the same few masks every step


def _aligned_mask(Tq, Tk, offset, left, device):
    if torch.compiler.is_compiling():  # in a compiled graph building it is fused and free
        return _build_mask(torch.arange(Tq, device=device) + offset, Tk, left, device)
    key = (Tq, Tk, offset, left, str(device))
    mask = _mask_cache.get(key)
    if mask is None:
        if len(_mask_cache) > 64:
            _mask_cache.clear()
        mask = _mask_cache[key] = _build_mask(torch.arange(Tq, device=device) + offset, Tk, left, device)
    return mask


def _sdpa(q, k, v, offset, left, causal):
    """
    q (B, Tq, H, D) at absolute positions offset..offset+Tq-1; k, v (B, Tk, Hkv, D) at positions 0..Tk-1.
    Picks the cheapest correct SDPA call: built-in causal, sliced keys for a single query, or a mask.
    """
    Tq, Tk = q.size(1), k.size(1)
    gqa = q.size(2) != k.size(2)
    mask, is_causal = None, False
    if not causal:
        pass  # full bidirectional attention over all keys
    elif Tq == 1:
        # decode: the visible keys are one contiguous slice, so no mask at all
        start = max(0, offset - left) if left >= 0 else 0
        k, v = k[:, start:offset + 1], v[:, start:offset + 1]
    elif offset == 0 and Tq == Tk and (left < 0 or left >= Tq - 1):
        is_causal = True  # training fast path: no window in effect
    else:
        # drop keys no query can see (left of the earliest window), then mask the rest
        start = max(0, offset - left) if left >= 0 else 0
        k, v = k[:, start:offset + Tq], v[:, start:offset + Tq]
        mask = _aligned_mask(Tq, k.size(1), offset - start, left, q.device)
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       attn_mask=mask, is_causal=is_causal, enable_gqa=gqa)
    return y.transpose(1, 2)  # (B, Tq, H, D)


def flash_attn_func(q, k, v, causal=True, window_size=(-1, -1)):
    """Attention over a whole sequence (training / no-cache forward). Returns (B, T, H, D)."""
    if _use_fa3(q):
        return _first(_fa3.flash_attn_func(q, k, v, causal=causal, window_size=tuple(window_size)))
    return _sdpa(q, k, v, 0, _window_left(window_size), causal)


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, cache_seqlens=None, causal=True,
                            window_size=(-1, -1)):
    """
    Write new k, v (B, Tn, Hkv, D) into the caches (B, Tmax, Hkv, D) in place at each row's position
    cache_seqlens (int32, (B,)), then attend q (B, Tn, H, D) over every row's prefix plus the new
    tokens. Does not advance cache_seqlens (the caller does, once per forward).
    """
    if _use_fa3(q):
        return _first(_fa3.flash_attn_with_kvcache(q, k_cache, v_cache, k=k, v=v, cache_seqlens=cache_seqlens,
                                                   causal=causal, window_size=tuple(window_size)))
    B, Tq = q.shape[:2]
    left = _window_left(window_size)
    pos = cache_seqlens.tolist()  # one host sync; SDPA needs python ints to slice anyway
    if max(pos) + Tq > k_cache.size(1):
        raise ValueError(f"KV cache overflow: {max(pos)} + {Tq} new tokens > capacity {k_cache.size(1)}; "
                         "make the cache longer (seq_len) or stop generating earlier")
    if all(p == pos[0] for p in pos):
        p = pos[0]
        if k is not None:
            k_cache[:, p:p + Tq] = k
            v_cache[:, p:p + Tq] = v
        return _sdpa(q, k_cache[:, :p + Tq], v_cache[:, :p + Tq], p, left, causal)
    # ragged rows (rare): per-row writes and a per-row mask
    if k is not None:
        for b, p in enumerate(pos):
            k_cache[b, p:p + Tq] = k[b]
            v_cache[b, p:p + Tq] = v[b]
    Tk = max(pos) + Tq
    q_pos = cache_seqlens.long().unsqueeze(1) + torch.arange(Tq, device=q.device)  # (B, Tq)
    if causal:
        mask = _build_mask(q_pos, Tk, left, q.device).unsqueeze(1)  # (B, 1, Tq, Tk)
    else:
        mask = (torch.arange(Tk, device=q.device) < (cache_seqlens.long() + Tq)[:, None])[:, None, None, :]
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k_cache[:, :Tk].transpose(1, 2),
                                       v_cache[:, :Tk].transpose(1, 2), attn_mask=mask,
                                       enable_gqa=q.size(2) != k_cache.size(2))
    return y.transpose(1, 2)


def flash_attn_decode(q, k_cache, v_cache, k, v, cache_seqlens, window_size=(-1, -1)):
    """
    One new token per row at shapes fixed by the cache, for a compilable decode step: q (B, 1, H, D)
    at each row's own position cache_seqlens (B,) int32 attends over that row's cached keys/values
    (B, Tmax, Hkv, D) before the position, plus its own new k, v (B, 1, Hkv, D), with a mask (causal and
    window) rather than a slice, so nothing depends on the positions' values. Returns (B, 1, H, D).
    The caller stores k, v at the positions afterwards (see KVCache.store_step); the eager and FA3 paths
    may already have written them there.
    """
    if _use_fa3(q):
        return _first(_fa3.flash_attn_with_kvcache(q, k_cache, v_cache, k=k, v=v, cache_seqlens=cache_seqlens,
                                                   causal=True, window_size=tuple(window_size)))
    B, Tmax = k_cache.shape[:2]
    pos = cache_seqlens.long()
    if not torch.compiler.is_compiling():
        rows = torch.arange(B, device=q.device)
        k_cache[rows, pos], v_cache[rows, pos] = k[:, 0], v[:, 0]
        Tk = int(pos.max()) + 1  # eager: attend over the filled part only (one host sync)
        mask = _build_mask(pos[:, None], Tk, _window_left(window_size), q.device)  # (B, 1, Tk)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k_cache[:, :Tk].transpose(1, 2),
                                           v_cache[:, :Tk].transpose(1, 2), attn_mask=mask[:, None],
                                           enable_gqa=q.size(2) != k_cache.size(2))
        return y.transpose(1, 2)
    mask = _build_mask(pos[:, None], Tmax, _window_left(window_size), q.device)  # (B, 1, Tmax)
    # Compiled: no writes (an in-place write into a graph input makes inductor copy the whole cache every
    # step) and no SDPA (it would copy the cache into its (B, H, T, D) layout). Broadcast products and
    # sums instead, which inductor fuses into loops reading the cache in place; the new key joins the
    # softmax as one extra column.
    H, Hkv, D = q.size(2), k_cache.size(2), q.size(3)
    qg = q.view(B, 1, Hkv, H // Hkv, D).float() * D ** -0.5
    mask = mask & (torch.arange(Tmax, device=q.device) < pos[:, None, None])  # cached keys only
    s_cache = (qg * k_cache.unsqueeze(3)).sum(-1)  # (B, Tmax, Hkv, H/Hkv)
    s_cache = s_cache.masked_fill(~mask.view(B, Tmax, 1, 1), float("-inf"))
    s_new = (qg[:, 0] * k.view(B, Hkv, 1, D)).sum(-1)  # (B, Hkv, H/Hkv)
    m = torch.maximum(s_cache.amax(dim=1), s_new)
    p_cache, p_new = torch.exp(s_cache - m[:, None]), torch.exp(s_new - m)
    y = (p_cache.unsqueeze(-1) * v_cache.unsqueeze(3)).sum(1) + p_new.unsqueeze(-1) * v.view(B, Hkv, 1, D)
    y = y / (p_cache.sum(1) + p_new).unsqueeze(-1)  # (B, Hkv, H/Hkv, D)
    return y.view(B, 1, H, D).to(q.dtype)


def reference_attention(q, k, v, q_pos, window_left=-1, causal=True):
    """
    Slow, explicit attention for tests. q (B, Tq, H, D); k, v (B, Tk, Hkv, D) at positions 0..Tk-1;
    q_pos: absolute positions of the queries, (Tq,) or (B, Tq). Computed in fp32.
    """
    B, Tq, H, D = q.shape
    Tk, Hkv = k.size(1), k.size(2)
    rep = H // Hkv
    qf = q.float().permute(0, 2, 1, 3)                                   # (B, H, Tq, D)
    kf = k.float().repeat_interleave(rep, dim=2).permute(0, 2, 1, 3)     # (B, H, Tk, D)
    vf = v.float().repeat_interleave(rep, dim=2).permute(0, 2, 1, 3)
    scores = (qf @ kf.transpose(-1, -2)) / D ** 0.5                      # (B, H, Tq, Tk)
    if causal:
        q_pos = torch.as_tensor(q_pos, device=q.device)
        mask = _build_mask(q_pos, Tk, window_left, q.device)
        mask = mask.unsqueeze(-3) if mask.dim() == 3 else mask           # (B|1, 1|.., Tq, Tk)
        scores = scores.masked_fill(~mask, float("-inf"))
    att = torch.softmax(scores, dim=-1)
    return (att @ vf).permute(0, 2, 1, 3).to(q.dtype)                   # (B, Tq, H, D)

# -----------------------------------------------------------------------------
# KV cache

class KVCache:
    """
    Keys/values of every layer for B rows: k_cache, v_cache (L, B, Tmax, Hkv, hd) in the compute dtype,
    cache_seqlens int32 (B,) = tokens stored per row. The model writes layer i through
    get_layer_cache(i) and advances the positions once after its last layer. prev_embedding (B, 1, d)
    holds the last position's pre-smear normalized embedding (the model's smear reads it).
    """

    def __init__(self, batch_size, num_heads, seq_len, head_dim, num_layers, device, dtype=torch.float32):
        self.batch_size, self.num_heads, self.seq_len = batch_size, num_heads, seq_len
        self.head_dim, self.num_layers = head_dim, num_layers
        shape = (num_layers, batch_size, seq_len, num_heads, head_dim)
        self.k_cache = torch.zeros(shape, device=device, dtype=dtype)
        self.v_cache = torch.zeros(shape, device=device, dtype=dtype)
        self.cache_seqlens = torch.zeros(batch_size, dtype=torch.int32, device=device)
        self.prev_embedding = None

    def get_pos(self):
        """Position of row 0 (the Engine's rows move together; BatchEngine's do not)."""
        return int(self.cache_seqlens[0].item())

    def get_layer_cache(self, layer_idx):
        return self.k_cache[layer_idx], self.v_cache[layer_idx]

    def advance(self, num_tokens):
        self.cache_seqlens += num_tokens

    def reset(self):
        self.cache_seqlens.zero_()
        self.prev_embedding = None

    def prefill(self, other):
        """Copy a (usually batch-1) cache's contents into this empty cache, broadcasting over rows."""
        if self.get_pos() != 0:
            raise ValueError("prefill() needs an empty cache; call reset() first")
        if (self.num_layers, self.num_heads, self.head_dim) != (other.num_layers, other.num_heads, other.head_dim):
            raise ValueError(f"cache shapes differ: (L, Hkv, hd) = {(self.num_layers, self.num_heads, self.head_dim)} "
                             f"vs {(other.num_layers, other.num_heads, other.head_dim)}")
        if other.batch_size not in (1, self.batch_size):
            raise ValueError(f"cannot broadcast a batch of {other.batch_size} rows into {self.batch_size}")
        pos = other.get_pos()
        if pos > self.seq_len:
            raise ValueError(f"other holds {pos} tokens but this cache has room for {self.seq_len}")
        self.k_cache[:, :, :pos] = other.k_cache[:, :, :pos]
        self.v_cache[:, :, :pos] = other.v_cache[:, :, :pos]
        self.cache_seqlens.fill_(pos)
        if other.prev_embedding is not None:
            pe = other.prev_embedding
            self.prev_embedding = pe.expand(self.batch_size, *pe.shape[1:]).clone()

    def rows(self, n):
        """A cache over rows [0, n) that shares this one's storage (writes and advances land here)."""
        if not 1 <= n <= self.batch_size:
            raise ValueError(f"rows({n}) needs 1 <= n <= batch_size={self.batch_size}")
        view = KVCache.__new__(KVCache)
        view.__dict__.update(self.__dict__)
        view.batch_size = n
        view.k_cache, view.v_cache = self.k_cache[:, :n], self.v_cache[:, :n]
        view.cache_seqlens = self.cache_seqlens[:n]
        view.prev_embedding = None if self.prev_embedding is None else self.prev_embedding[:n]
        return view

    def store_step(self, k, v):
        """Store one new token per row, k, v (L, B, Hkv, D), at each row's position (not advanced)."""
        rows, pos = torch.arange(self.batch_size, device=k.device), self.cache_seqlens.long()
        self.k_cache[:, rows, pos] = k
        self.v_cache[:, rows, pos] = v

    def insert_row(self, row, other):
        """Copy a batch-1 cache's contents into row `row` (continuous batching: a request joins)."""
        if other.batch_size != 1 or (self.num_layers, self.num_heads, self.head_dim) != \
                (other.num_layers, other.num_heads, other.head_dim):
            raise ValueError("insert_row() needs a batch-1 cache of the same (layers, heads, head_dim)")
        pos = other.get_pos()
        if pos > self.seq_len:
            raise ValueError(f"other holds {pos} tokens but this cache has room for {self.seq_len}")
        self.k_cache[:, row, :pos] = other.k_cache[:, 0, :pos]
        self.v_cache[:, row, :pos] = other.v_cache[:, 0, :pos]
        self.cache_seqlens[row] = pos
        if self.prev_embedding is None or other.prev_embedding is None:
            raise ValueError("insert_row() needs prev_embedding on both caches (allocate it, prefill other)")
        self.prev_embedding[row] = other.prev_embedding[0]
