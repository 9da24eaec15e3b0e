"""
Attention backends with one interface, plus the KV cache used for inference.

flash_attn_func / flash_attn_with_kvcache follow Flash Attention 3's API, tensors (B, T, H, D).
window_size = (left, right): query at position t sees keys t-left .. t (left = -1: unlimited).
GQA: k/v may have fewer heads than q; query head h reads kv head h // (H // Hkv).

Backends (set_backend / --attn / env NANOCHAT_ATTN; None or "auto" picks the first that runs here):
  fa3   Flash Attention 3 through the HF `kernels` package (Hopper GPUs, bf16/fp16).
  flex  CUDA without FA3: sliding windows via block-sparse FlexAttention, full windows SDPA is_causal.
  sdpa  elsewhere: full windows SDPA is_causal, sliding windows a banded SDPA over query chunks.
No backend builds a dense T x T mask for a training forward: cost grows with the window, not T^2.
`reference_attention` is the slow, obviously correct path tests compare against.
"""

import os
import json
import logging
from pathlib import Path

import torch
import torch.nn.functional as F

logger = logging.getLogger("nanochat")

# Backend selection -----------------------------------------------------------

BACKENDS = ("fa3", "flex", "sdpa")
# Flash Attention 3 from the HF kernel hub: the maintained build, at a stable API version. `kernels lock .` pins
# its exact commit in kernels.lock (input: [tool.kernels.dependencies] in pyproject.toml, keep the two in step).
FA3_KERNEL_REPO = "kernels-community/flash-attn3"
FA3_KERNEL_VERSION = 1
KERNELS_LOCK = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kernels.lock")
FA3_FIX = ("fetch it once with network: `bash runs/setup_env.sh` on this node (or on a node with the same torch "
           "and CUDA, then copy its kernel cache here and point KERNELS_CACHE at it)")
_backend = None  # resolved lazily: one of BACKENDS
_fa3 = None      # the FA3 module when loaded
_reason = ""     # why the backend was chosen (shown in logs and the report)


def _locked(lockfile):
    """Whether `lockfile` exists and pins FA3_KERNEL_REPO."""
    try:
        with open(lockfile, encoding="utf-8") as f:
            return any(e.get("dependency", {}).get("repo-id") == FA3_KERNEL_REPO for e in json.load(f))
    except (OSError, ValueError, AttributeError):
        return False


def load_fa3_kernel(lockfile=None):
    """(FA3 module, where it came from), read from the local kernel cache only: never the network, so a training
    step never waits on the Hub and an offline node loads what set-up fetched. The build is the commit kernels.lock
    pins when the repo has one, else version FA3_KERNEL_VERSION as fetch_fa3_kernel recorded it in the cache."""
    import kernels
    lockfile = lockfile or KERNELS_LOCK
    if _locked(lockfile):
        mod = kernels.load_kernel(FA3_KERNEL_REPO, lockfile=Path(lockfile))  # cache only, by its contract
        return mod, f"{FA3_KERNEL_REPO} as pinned by {os.path.basename(lockfile)}"
    # `kernels` decides cache-only from huggingface_hub.constants.HF_HUB_OFFLINE at each call; the environment
    # variable only counts if set before the first import of huggingface_hub, which is usually long past here
    from huggingface_hub import constants
    before, constants.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE, True
    try:
        mod = kernels.get_kernel(FA3_KERNEL_REPO, version=FA3_KERNEL_VERSION)
    finally:
        constants.HF_HUB_OFFLINE = before
    return mod, f"{FA3_KERNEL_REPO} version {FA3_KERNEL_VERSION} from the kernel cache"


def fetch_fa3_kernel(lockfile=None):
    """Download FA3 into the kernel cache (set-up time, online; runs/setup_env.sh calls it): the commit kernels.lock
    pins when there is one, else version FA3_KERNEL_VERSION. Returns the module."""
    import kernels
    trust = [FA3_KERNEL_REPO]  # this one repository's code, not every repository's
    lockfile = lockfile or KERNELS_LOCK
    if _locked(lockfile):
        return kernels.get_locked_kernel(FA3_KERNEL_REPO, lockfile=Path(lockfile), trust_remote_code=trust)
    return kernels.get_kernel(FA3_KERNEL_REPO, version=FA3_KERNEL_VERSION, trust_remote_code=trust)


def _load_fa3():
    """(FA3 interface module or None, why, fix): fix is set when a Hopper GPU could run FA3 but it did not load."""
    if not torch.cuda.is_available():
        return None, "no CUDA device", None
    major, _ = torch.cuda.get_device_capability()
    if major != 9:
        return None, f"compute capability {major}.x is not Hopper (FA3 needs 9.x)", None
    try:
        import kernels  # noqa: F401
    except ImportError:
        return None, "the `kernels` package is not installed", "pip install -e '.[gpu]' (runs/setup_env.sh does)"
    try:
        mod, where = load_fa3_kernel()
    except Exception as e:  # not in the cache, no build for this torch/CUDA: all mean "use the fallback"
        first = (str(e).strip().splitlines() or [""])[0][:300]
        return None, f"{FA3_KERNEL_REPO} did not load ({type(e).__name__}: {first})", FA3_FIX
    return getattr(mod, "flash_attn_interface", mod), f"Hopper GPU, loaded {where}", None


def _flex_available():
    if not torch.cuda.is_available():
        return False, "FlexAttention training needs CUDA (torch has no FlexAttention backward on CPU)"
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except ImportError:
        return False, f"torch {torch.__version__} has no FlexAttention"
    return True, "CUDA without FA3: FlexAttention for sliding windows, SDPA for full windows"


def set_backend(name=None):
    """Choose and return the attention backend: "fa3" | "flex" | "sdpa", or None / "auto" for the first that
    runs here (env NANOCHAT_ATTN is read when name is None). Naming a backend that cannot run is an error."""
    global _backend, _fa3, _reason
    name = name or os.environ.get("NANOCHAT_ATTN") or "auto"
    if name not in ("auto",) + BACKENDS:
        raise ValueError(f"attention backend must be one of auto|{'|'.join(BACKENDS)} "
                         f"(--attn / NANOCHAT_ATTN / set_backend), got {name!r}")
    fa3 = None
    if name == "sdpa":
        reason = "forced"
    elif name == "flex":
        ok, why = _flex_available()
        if not ok:
            raise RuntimeError(f"attention backend 'flex' cannot run here: {why}; use --attn=auto or --attn=sdpa")
        reason = "forced"
    else:
        fa3, why, fix = _load_fa3()
        if fa3 is None and name == "fa3":
            raise RuntimeError(f"attention backend 'fa3' cannot run here: {why}; use --attn=auto or another backend")
        if fa3 is not None:
            name, reason = "fa3", why
        else:
            ok, flex_why = _flex_available()
            name, reason = ("flex", f"{why}; {flex_why}") if ok else ("sdpa", f"{why}; {flex_why}")
            if fix:  # one line that stands out: without FA3 a Hopper GPU trains markedly slower
                logger.warning(f"WARNING: Flash Attention 3 is not in use on this Hopper GPU: {why}. Attention runs "
                               f"on {name} instead (slower). Fix: {fix}.")
    _backend, _fa3, _reason = name, fa3, reason
    logger.info(f"attention backend: {_backend} ({reason})")
    return _backend


def set_backend_from_flag(flag):
    """The scripts' --attn=auto|fa3|flex|sdpa: a backend that cannot run here stops with one clear message."""
    try:
        return set_backend(None if flag == "auto" else flag)
    except (RuntimeError, ValueError) as e:
        raise SystemExit(f"--attn={flag}: {e}")


def get_backend():
    if _backend is None:
        set_backend(None)
    return _backend


def backend_reason():
    """Why the current backend was chosen (for logs and the report)."""
    get_backend()
    return _reason


def _use_fa3(q):
    # FA3 kernels take only half precision; an fp32 run on a Hopper box quietly uses the fallback
    return get_backend() == "fa3" and q.is_cuda and q.dtype in (torch.bfloat16, torch.float16)


def _first(out):
    # some FA3 builds return (out, softmax_lse)
    return out[0] if isinstance(out, tuple) else out

# SDPA path -------------------------------------------------------------------

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


_mask_cache = {}  # key -> mask; training reuses the same few masks every step


def _cached_mask(key, build, cache=_mask_cache):
    if torch.compiler.is_compiling():  # in a compiled graph building it is fused and free
        return build()
    mask = cache.get(key)
    if mask is None:
        if len(cache) > 64:
            cache.clear()
        mask = cache[key] = build()
    return mask


def _aligned_mask(Tq, Tk, offset, left, device):
    return _cached_mask((Tq, Tk, offset, left, str(device)),
                        lambda: _build_mask(torch.arange(Tq, device=device) + offset, Tk, left, device))


def _attend(q, k, v, mask=None, is_causal=False):
    """SDPA on (B, T, H, D) tensors (GQA when k, v have fewer heads)."""
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                       is_causal=is_causal, enable_gqa=q.size(2) != k.size(2))
    return y.transpose(1, 2)


def _sdpa(q, k, v, offset, left, causal):
    """q (B, Tq, H, D) at absolute positions offset..offset+Tq-1; k, v (B, Tk, Hkv, D) at positions 0..Tk-1.
    Picks the cheapest correct SDPA call: built-in causal, sliced keys for a single query, or a mask."""
    Tq, Tk = q.size(1), k.size(1)
    mask, is_causal = None, False
    if causal and Tq > 1 and offset == 0 and Tq == Tk and (left < 0 or left >= Tq - 1):
        is_causal = True  # training fast path: no window in effect
    elif causal:
        # drop keys no query can see (left of the earliest window); a single query (decode) needs no mask
        start = max(0, offset - left) if left >= 0 else 0
        k, v = k[:, start:offset + Tq], v[:, start:offset + Tq]
        if Tq > 1:
            mask = _aligned_mask(Tq, k.size(1), offset - start, left, q.device)
    return _attend(q, k, v, mask, is_causal)


# Sliding windows in training: cost grows with the window, never a dense T x T mask ---

def _band_mask(n, C, P, left, device):
    """(n, C, (P+1)*C) bool: query a of chunk i vs key m of the key span starting at position (i-P)*C."""
    a = torch.arange(C, device=device)[:, None]
    m = torch.arange((P + 1) * C, device=device)[None, :]
    d = P * C + a - m                                              # q_pos - k_pos
    visible = (d >= 0) & (d <= left)                               # (C, S)
    i = torch.arange(n, device=device)[:, None, None]
    return visible & (i * C - P * C + m >= 0)                      # keys before position 0 are padding


def _sdpa_banded(q, k, v, left):
    """Causal sliding-window attention (window `left`, 0 <= left < T-1) as one batched SDPA over query
    chunks of C positions: chunk i attends only to the (P+1)*C keys ending at its last query, which
    cover its window (P*C >= left). Per query it costs ~1.5x the window, whatever T is; K and V are
    gathered 3x (P = 2), and the mask is (T/C, C, 3C), not (T, T)."""
    B, T, H, D = q.shape
    Hkv = k.size(2)
    C = max(1, -(-left // 2))
    P = -(-left // C)
    n = -(-T // C)
    S = (P + 1) * C
    pad = n * C - T  # end padding: keys there are in every real query's future, so masked
    qc = F.pad(q, (0, 0, 0, 0, 0, pad)) if pad else q

    def windows(t):  # (B, T, Hkv, D) -> (B*n, Hkv, S, D): the keys chunk i can see (unfold: one gather)
        t = F.pad(t, (0, 0, 0, 0, P * C, pad))                    # (B, (n+P)*C, Hkv, D)
        return t.unfold(1, S, C).permute(0, 1, 2, 4, 3).reshape(B * n, Hkv, S, D)
    # 4-D (B*n, heads, len, D) inputs: fused SDPA kernels take those, a 5-D batch falls back to the math kernel
    mask = _cached_mask(("band", B, n, C, P, left, str(q.device)),  # same for every layer and step
                        lambda: _band_mask(n, C, P, left, q.device)[None].expand(B, n, C, S).reshape(B * n, 1, C, S))
    y = F.scaled_dot_product_attention(qc.reshape(B * n, C, H, D).transpose(1, 2), windows(k), windows(v),
                                       attn_mask=mask, enable_gqa=H != Hkv)  # (B*n, H, C, D)
    return y.transpose(1, 2).reshape(B, n * C, H, D)[:, :T]


FLEX_BLOCK = 128  # FlexAttention's default tile
FLEX_COMPILE_BACKEND = "inductor"  # tests count compiles with a counting backend in its place
_flex_fn = None
_block_masks = {}  # (T, left, device) -> BlockMask, built once outside compiled code


def sliding_window_block_mask(T, left, device, block=FLEX_BLOCK):
    """FlexAttention BlockMask for causal attention with window `left`, built from the block structure
    directly (never evaluating a T x T mask): q tile i needs kv tiles from the one holding position
    i*block - left up to tile i; tiles strictly inside the window are "full" (no mask_mod evaluation)."""
    from torch.nn.attention.flex_attention import BlockMask
    nb = -(-T // block)
    i = torch.arange(nb, device=device)[:, None]
    j = torch.arange(nb, device=device)[None, :]
    any_visible = (j <= i) & ((j + 1) * block - 1 >= i * block - left)
    all_visible = (j < i) & (j * block >= (i + 1) * block - 1 - left)
    partial = any_visible & ~all_visible

    def blocks(m):  # (nb, nb) bool -> counts (1, 1, nb), indices (1, 1, nb, nb) with the True columns first
        idx = torch.argsort((~m).to(torch.int8), dim=-1, stable=True).to(torch.int32)
        return m.sum(-1).to(torch.int32)[None, None], idx[None, None]

    def mask_mod(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx <= left)

    kv_num, kv_idx = blocks(partial)
    full_num, full_idx = blocks(all_visible)
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block, mask_mod=mask_mod,
                                    seq_lengths=(T, T))


def _flex_window(q, k, v, left, compiled=True):
    """Sliding-window causal attention with FlexAttention; (B, T, H, D) in and out."""
    global _flex_fn
    from torch.nn.attention.flex_attention import flex_attention
    T = q.size(1)
    # compiling: traced into the graph (a few tiny ops); eager: built once per (T, left, device)
    bm = _cached_mask((T, left, str(q.device)), lambda: sliding_window_block_mask(T, left, q.device), _block_masks)
    if compiled and _flex_fn is None:
        # uncompiled FlexAttention is a slow dense reference; compiled it is a fused block-sparse kernel
        # one compile per sequence length: the chat stages pad batches to a few lengths (SFTBatcher's pad_multiple)
        # so they stay below torch's recompile limit, past which it would fall back to the unfused version
        _flex_fn = torch.compile(flex_attention, dynamic=False, backend=FLEX_COMPILE_BACKEND)
    fn = _flex_fn if compiled else flex_attention
    y = fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=bm,
           enable_gqa=q.size(2) != k.size(2))
    return y.transpose(1, 2)


def flash_attn_func(q, k, v, causal=True, window_size=(-1, -1)):
    """Attention over a whole sequence (training / no-cache forward). Returns (B, T, H, D)."""
    if _use_fa3(q):
        return _first(_fa3.flash_attn_func(q, k, v, causal=causal, window_size=tuple(window_size)))
    left = _window_left(window_size)
    T = q.size(1)
    if causal and k.size(1) == T and 0 <= left < T - 1:  # a window that actually cuts the context
        # FlexAttention is compiled per sequence length: training (fixed T, or inside the compiled model)
        # uses it; eager inference at varying lengths (samples, CORE) takes the banded SDPA instead
        if get_backend() == "flex" and q.is_cuda and (q.requires_grad or torch.compiler.is_compiling()):
            return _flex_window(q, k, v, left)
        return _sdpa_banded(q, k, v, left)
    return _sdpa(q, k, v, 0, left, causal)  # full window: SDPA is_causal, no mask


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, cache_seqlens=None, causal=True,
                            window_size=(-1, -1)):
    """Write new k, v (B, Tn, Hkv, D) into the caches (B, Tmax, Hkv, D) in place at each row's position
    cache_seqlens (int32, (B,)), then attend q (B, Tn, H, D) over every row's prefix plus the new
    tokens. Does not advance cache_seqlens (the caller does, once per forward)."""
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
    return _attend(q, k_cache[:, :Tk], v_cache[:, :Tk], mask)


def flash_attn_decode(q, k_cache, v_cache, k, v, cache_seqlens, window_size=(-1, -1)):
    """One new token per row at shapes fixed by the cache, for a compilable decode step: q (B, 1, H, D) at each
    row's position cache_seqlens (B,) int32 attends over that row's cached keys/values (B, Tmax, Hkv, D)
    before it plus its own new k, v (B, 1, Hkv, D), masked rather than sliced, so nothing depends on the
    positions' values. Returns (B, 1, H, D). The caller stores k, v afterwards (KVCache.store_step); the
    eager and FA3 paths may already have written them."""
    if _use_fa3(q) and not torch.compiler.is_compiling():
        # eager only: FA3's in-place cache write is an opaque op a compiled (fullgraph) step cannot trace; the
        # compiled step takes the masked path below, which FA3's write-back via store_step matches
        return flash_attn_with_kvcache(q, k_cache, v_cache, k=k, v=v, cache_seqlens=cache_seqlens,
                                       window_size=window_size)
    B, Tmax = k_cache.shape[:2]
    pos = cache_seqlens.long()
    if not torch.compiler.is_compiling():
        rows = torch.arange(B, device=q.device)
        k_cache[rows, pos], v_cache[rows, pos] = k[:, 0], v[:, 0]
        Tk = int(pos.max()) + 1  # eager: attend over the filled part only (one host sync)
        mask = _build_mask(pos[:, None], Tk, _window_left(window_size), q.device)  # (B, 1, Tk)
        return _attend(q, k_cache[:, :Tk], v_cache[:, :Tk], mask[:, None])
    mask = _build_mask(pos[:, None], Tmax, _window_left(window_size), q.device)  # (B, 1, Tmax)
    # Compiled: no writes (inductor would copy the whole cache, a graph input, every step) and no SDPA (it
    # would copy the cache into its (B, H, T, D) layout): broadcast products and sums, fused into loops
    # reading the cache in place; the new key joins the softmax as one extra column.
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
    """Slow, explicit attention for tests. q (B, Tq, H, D); k, v (B, Tk, Hkv, D) at positions 0..Tk-1;
    q_pos: absolute positions of the queries, (Tq,) or (B, Tq). Computed in fp32."""
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

# KV cache --------------------------------------------------------------------

class KVCache:
    """Keys/values of every layer for B rows: k_cache, v_cache (L, B, Tmax, Hkv, hd) in the compute dtype,
    cache_seqlens int32 (B,) = tokens stored per row (the model advances them once after its last layer).
    prev_embedding (B, 1, d): the last position's pre-smear normalized embedding (the smear reads it)."""

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
            self.prev_embedding = other.prev_embedding.expand(self.batch_size, *other.prev_embedding.shape[1:]).clone(
                memory_format=torch.contiguous_format)

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

    def insert_row(self, row, other, src=0, length=None):
        """Copy row `src` of another cache, its first `length` positions (default: all it holds), into row
        `row` (continuous batching: a request joins; a right-padded batched prefill keeps each real length)."""
        if not 0 <= src < other.batch_size or (self.num_layers, self.num_heads, self.head_dim) != \
                (other.num_layers, other.num_heads, other.head_dim):
            raise ValueError("insert_row() needs a source row of a cache of the same (layers, heads, head_dim)")
        pos = int(other.cache_seqlens[src]) if length is None else length
        if pos > min(self.seq_len, other.seq_len):
            raise ValueError(f"cannot copy {pos} positions between caches of {other.seq_len} and {self.seq_len}")
        self.k_cache[:, row, :pos] = other.k_cache[:, src, :pos]
        self.v_cache[:, row, :pos] = other.v_cache[:, src, :pos]
        self.cache_seqlens[row] = pos
        if self.prev_embedding is None or other.prev_embedding is None:
            raise ValueError("insert_row() needs prev_embedding on both caches (allocate it, prefill other)")
        self.prev_embedding[row] = other.prev_embedding[src]
