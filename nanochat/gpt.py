"""
The GPT: a modern decoder-only transformer in the modded-nanogpt / nanochat lineage:
- rotary position embeddings (base 100k, half-split pairing), no learned positions
- QK-norm (then x1.2), parameter-free RMS norm everywhere, no biases
- ReLU^2 MLP, untied lm_head, vocab padded to a multiple of 64, fp32 logits soft-capped at 15
- GQA, a per-layer sliding-window pattern (last layer always full)
- value embeddings on alternate layers mixed into v by per-head gates
- per-layer resid/x0 scalars, smear (bigram mixing of embeddings) and backout (subtract a mid-layer state)
On CPU, training's loss is fused: HeadSoftcapCE in fp32 eager (head matmul + soft-cap + CE), SoftcapCE under
torch.compile (soft-cap + CE, one pass each way); same math, fewer passes.

Build: `with torch.device("meta"): model = GPT(cfg)`, then `model.to_empty(device=d)`, `model.init_weights(dtype)` (the compute dtype: common.resolve_precision).
"""

import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat.cpu_ops import (embed, RMSNormCPU, ReluSquareCPU, HeadSoftcapCE, cpu_kernels, use_cpu_kernels,  # noqa: F401
                              use_compiled_cpu_ops, softcap_cross_entropy)
from nanochat.attention import flash_attn_func, flash_attn_with_kvcache, flash_attn_decode, get_backend
from nanochat.optim import MuonAdamW

ROPE_BASE = 100_000
SOFTCAP = 15.0
QK_SCALE = 1.2        # applied to q and k after QK-norm ("sharper attention")
VE_GATE_CHANNELS = 12  # input channels of the value-embedding gate
VE_GATE_SCALE = 3.0
SMEAR_CHANNELS = 24
MATVEC_MAX_ROWS = 1  # a compiled CPU decode step of more rows uses BLAS: the fused loops measured far slower there

@dataclass
class GPTConfig:
    sequence_len: int = 2048
    vocab_size: int = 32768
    n_layer: int = 12
    n_head: int = 6      # query heads
    n_kv_head: int = 6   # key/value heads (GQA when < n_head)
    n_embd: int = 768
    window_pattern: str = "SSSL"
    short_window: int = 0  # left window of "S" layers; 0 = the reference rule (T/4 rounded up to 128)


def config_from_depth(depth, aspect_ratio=64, head_dim=128, max_seq_len=2048, vocab_size=32768,
                      window_pattern="SSSL", n_kv_head=None):
    """The depth dial: width = depth*aspect rounded up to a multiple of head_dim."""
    if depth < 1 or aspect_ratio < 1 or head_dim < 1:
        raise ValueError(f"depth, aspect_ratio and head_dim must be positive, got {depth}, {aspect_ratio}, {head_dim}")
    n_embd = -(-depth * aspect_ratio // head_dim) * head_dim
    n_head = n_embd // head_dim
    n_kv_head = n_head if n_kv_head is None else n_kv_head
    if n_head % n_kv_head != 0:
        raise ValueError(f"n_kv_head={n_kv_head} must divide n_head={n_head}")
    return GPTConfig(sequence_len=max_seq_len, vocab_size=vocab_size, n_layer=depth, n_head=n_head,
                     n_kv_head=n_kv_head, n_embd=n_embd, window_pattern=window_pattern)


def padded_vocab_size(vocab_size, multiple=64):
    return -(-vocab_size // multiple) * multiple


def has_value_embed(layer_idx, n_layer):
    """Alternate layers, the last one always included."""
    return layer_idx % 2 == (n_layer - 1) % 2


def embedding(num, dim):
    """nn.Embedding without its default init (init_weights does it): skipping normal_ here also
    avoids a ~1.5 s lazy import of torch._dynamo in every process that builds a model."""
    return nn.Embedding(num, dim, _weight=torch.empty(num, dim))


def norm(x):
    if x.requires_grad and use_cpu_kernels(x):
        return RMSNormCPU.apply(x)
    return F.rms_norm(x, (x.size(-1),))


def relu_square(x):
    if x.requires_grad and use_cpu_kernels(x):
        return ReluSquareCPU.apply(x)
    return F.relu(x).square()


def apply_rotary(x, cos, sin):
    """x (B, T, H, hd); cos/sin broadcastable to (B, T, 1, hd/2). Rotates the pairs (i, i + hd/2)."""
    h = x.size(-1) // 2
    x1, x2 = x[..., :h], x[..., h:]
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


def rotary_qk_norm(x, cos, sin):
    """Queries or keys (B, T, heads, hd): rotary, then QK-norm and its scale."""
    return norm(apply_rotary(x, cos, sin)) * QK_SCALE


def matvec(x, w):
    """x @ w.T for a few rows of x as a broadcast product and sum: under torch.compile on a CPU one fused loop
    streaming the weight, at decode sizes ~2-5x faster than F.linear's BLAS call (per-call cost dominates)."""
    return (x.unsqueeze(-2) * w).sum(-1)


def matmul_t(x, wt):
    """x @ w.T with the weight stored transposed, wt = w.T contiguous (in, out): on a CPU BLAS's fast layout at
    a few rows (d4, 1 thread, 8 rows: the head 0.40 vs 1.00 ms as F.linear(x, w), the layers 1.3-2.5x faster;
    at 128 rows 0.9-1.15x)."""
    return x @ wt


class Linear(nn.Linear):
    """Bias-free Linear whose fp32 master weight is cast to the activation dtype on the fly (no autocast)."""

    def __init__(self, in_features, out_features):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x):
        return F.linear(x, self.weight.to(x.dtype))


class CausalSelfAttention(nn.Module):
    """One layer's attention weights (the math: GPT._layer)."""

    def __init__(self, config, layer_idx):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.n_embd // config.n_head
        d, hd = config.n_embd, self.head_dim
        self.c_q = Linear(d, self.n_head * hd)
        self.c_k = Linear(d, self.n_kv_head * hd)
        self.c_v = Linear(d, self.n_kv_head * hd)
        self.c_proj = Linear(d, d)
        self.ve_gate = Linear(VE_GATE_CHANNELS, self.n_kv_head) if has_value_embed(layer_idx, config.n_layer) else None


class MLP(nn.Module):
    """One layer's MLP weights (the math: GPT._layer)."""

    def __init__(self, config):
        super().__init__()
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = Linear(4 * config.n_embd, config.n_embd)


class Block(nn.Module):
    """One transformer layer's weights; GPT._layer is its math, the one copy of it."""

    def __init__(self, config, layer_idx):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)


def module_linear(x, module):
    """The `linear` of training's forward: the layer's own module (autograd; an fp8-converted one runs fp8)."""
    return module(x)


def decode_kernel_threads():
    """Threads for the compiled CPU decode step's kernels. A decode step runs dozens of tiny kernels, each a
    fork/join of the OpenMP threads: cheap while idle threads spin (the default), a wake-up per kernel where they
    sleep (OMP_WAIT_POLICY=PASSIVE, as the server and runcpu.sh set it). d4, bench_infer, interleaved: spinning,
    2 threads 0.92-1.13 vs 1 thread 1.26-1.36 ms/token at batch 1; passive, 1 thread 1.35-1.62 vs 1.51-1.79."""
    return 1 if os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE" else torch.get_num_threads()


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        if config.n_embd % config.n_head or config.n_head % config.n_kv_head:
            raise ValueError(f"n_embd={config.n_embd} must be divisible by n_head={config.n_head}, "
                             f"and n_head by n_kv_head={config.n_kv_head}")
        self.config = config
        self.head_dim = config.n_embd // config.n_head
        if self.head_dim % 2 or self.head_dim < 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        self.window_sizes = self._compute_window_sizes(config)
        V_pad, d, L = padded_vocab_size(config.vocab_size), config.n_embd, config.n_layer
        self.transformer = nn.ModuleDict(dict(wte=embedding(V_pad, d),
                                              h=nn.ModuleList([Block(config, i) for i in range(L)])))
        self.lm_head = Linear(d, V_pad)
        kv_dim = config.n_kv_head * self.head_dim
        self.value_embeds = nn.ModuleDict({str(i): embedding(V_pad, kv_dim) for i in range(L) if has_value_embed(i, L)})
        self.resid_lambdas = nn.Parameter(torch.ones(L))
        self.x0_lambdas = nn.Parameter(torch.zeros(L))
        self.smear_gate = Linear(SMEAR_CHANNELS, 1)
        self.smear_lambda = nn.Parameter(torch.zeros(1))
        self.backout_lambda = nn.Parameter(torch.zeros(1))
        self.rotary_len = 10 * config.sequence_len  # decode may run past the training length
        self.register_buffer("cos", torch.empty(1, self.rotary_len, 1, self.head_dim // 2), persistent=False)
        self.register_buffer("sin", torch.empty(1, self.rotary_len, 1, self.head_dim // 2), persistent=False)
        self.compute_dtype = None  # the dtype activations run in: init_weights' argument
        get_backend()  # pick (and log) the attention backend now, outside any torch.compile trace
        self.fused_loss = True  # CPU fp32 eager training uses HeadSoftcapCE (tests compare it to the plain path)

    @staticmethod
    def _compute_window_sizes(config):
        pattern = config.window_pattern.upper()
        if not pattern or any(c not in "SL" for c in pattern):
            raise ValueError(f"window_pattern must be a non-empty string of S and L, got {config.window_pattern!r}")
        T = config.sequence_len
        short = config.short_window or -(-T // 4 // 128) * 128
        sizes = [(short if pattern[i % len(pattern)] == "S" else T, 0) for i in range(config.n_layer)]
        sizes[-1] = (T, 0)  # the last layer always sees the full context
        return sizes

    def get_device(self):
        return self.transformer.wte.weight.device

    @torch.no_grad()
    def init_weights(self, dtype=None):
        """Initialize (zero output projections, small uniform q/k/v and MLP-in, small head) after to_empty().
        dtype: the compute dtype, the precision policy's choice (common.resolve_precision); default fp32."""
        cfg, d = self.config, self.config.n_embd
        s = math.sqrt(3) / math.sqrt(d)  # U(-s, s) has std 1/sqrt(d)
        self.transformer.wte.weight.normal_(0.0, 0.8)
        self.lm_head.weight.normal_(0.0, 0.001)
        for block in self.transformer.h:
            a, m = block.attn, block.mlp
            for w in (a.c_q.weight, a.c_k.weight, a.c_v.weight):
                w.uniform_(-s, s)
            a.c_proj.weight.zero_()
            m.c_fc.weight.uniform_(-0.4 * s, 0.4 * s)
            m.c_proj.weight.zero_()
            if a.ve_gate is not None:
                a.ve_gate.weight.uniform_(0.0, 0.02)
        for ve in self.value_embeds.values():
            ve.weight.uniform_(-s, s)
        frac = torch.arange(cfg.n_layer, dtype=torch.float32) / max(cfg.n_layer - 1, 1)
        self.resid_lambdas.copy_(1.15 - 0.10 * frac)
        self.x0_lambdas.copy_(0.20 - 0.15 * frac)
        self.smear_gate.weight.uniform_(0.0, 0.02)
        self.smear_lambda.zero_()
        self.backout_lambda.fill_(0.2)
        device = self.get_device()
        # Every parameter stays an fp32 master, embeddings included; bf16 is only the compute copy (lookups and
        # linears cast on the fly). Stored in bf16, an embedding loses every AdamW update below half its ulp
        # (~0.002 at |w| ~ 0.8): late in a run most of them, and the other weights learn to compensate (a bf16
        # d4 base ended with negative x0 scalars and spiked at mid-training's start; with fp32 masters its
        # scalars and val bpb track the fp32 run's).
        self.compute_dtype = dtype or torch.float32
        self._init_rotary(device)

    def _init_rotary(self, device):
        hd = self.head_dim
        inv_freq = ROPE_BASE ** (-torch.arange(0, hd, 2, dtype=torch.float32, device=device) / hd)  # (hd/2,)
        t = torch.arange(self.rotary_len, dtype=torch.float32, device=device)
        angle = torch.outer(t, inv_freq)  # (T_max, hd/2)
        dtype = self.compute_dtype or torch.float32
        self.cos = angle.cos().to(dtype)[None, :, None, :]
        self.sin = angle.sin().to(dtype)[None, :, None, :]

    def forward(self, idx, targets=None, loss_reduction="mean", last_only=False, positions=None):
        """idx (B, T) int64 -> fp32 logits (B, T, V), or the loss when targets (B, T) are given (-1 = ignore).
        last_only: only the last position's logits, (B, 1, V). positions: (rows, cols) index tensors, logits only
        there, (P, V) (a scorer reading a few positions skips the head and soft-cap everywhere else).
        KV-cached inference is forward_cached(); both run the layers through _stack()."""
        B, T = idx.shape
        V = self.config.vocab_size
        self._ensure_compute_dtype()
        dtype = self.compute_dtype
        if T > self.rotary_len:
            raise ValueError(f"sequence of {T} tokens exceeds the rotary table ({self.rotary_len})")
        cos, sin = self.cos[:, :T], self.sin[:, :T]

        def attend(i, q, k, v):  # causal self-attention within layer i's window
            return flash_attn_func(q, k, v, causal=True, window_size=self.window_sizes[i])

        x, _ = self._stack(self._module_weights(), idx, None, cos, sin, attend, module_linear)
        x = norm(x).to(dtype)
        if last_only and targets is None:
            x = x[:, -1:]
            T = 1
        if positions is not None and targets is None:
            x = x[positions]  # (P, d)

        # only the first V rows of the padded head are real tokens: skip the padded ones entirely
        w_head = self.lm_head.weight[:V].to(dtype)
        if targets is not None and self.fused_loss and dtype == torch.float32 and use_cpu_kernels(x):
            return HeadSoftcapCE.apply(x.view(B * T, -1), w_head, targets.reshape(-1), SOFTCAP, loss_reduction)
        if targets is not None and use_compiled_cpu_ops(x):
            return softcap_cross_entropy(F.linear(x, w_head).view(B * T, V), targets.reshape(-1), SOFTCAP,
                                         loss_reduction)
        logits = F.linear(x, w_head).float()  # (B, T, V) fp32
        logits = SOFTCAP * torch.tanh(logits / SOFTCAP)
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, V), targets.reshape(-1), ignore_index=-1, reduction=loss_reduction)

    # the model's math, one copy: training's forward() and the KV-cached inference both run _stack() -----------

    def _stack(self, w, idx, prev, cos, sin, attend, linear):
        """Embedding, smear and every layer, up to (not including) the final norm. w: the weights, as
        _module_weights() (training) or _inference_weights() (cached inference) gives them; linear(x, w) applies
        one of its matrices. idx (B, T); prev (B, 1, d): the pre-smear embedding of the token before idx[:, 0],
        None at a sequence start; cos/sin: the rotary angles at idx's positions; attend(i, q, k, v) -> (B, T, H,
        hd): layer i's attention (training: within its window; inference: write to the KV cache and attend over
        it). Returns the hidden states (B, T, d) and the pre-smear embeddings (B, T, d), the next chunk's prev."""
        T, cdt = idx.size(1), self.compute_dtype
        # the residual stream is fp32 whatever the compute dtype; only the matmuls' inputs are cast (as autocast
        # does). At init every scalar's gradient is zero exactly (the final norm undoes any rescaling of the
        # stream): in a bf16 stream it is rounding noise of ~1e-7, which Adam turns into full-size steps of random
        # sign; in fp32 it stays ~1e-11, under Adam's eps.
        emb = norm(embed(idx, w["wte"]).to(cdt))  # (B, T, d)
        x = emb.float()
        # smear: add to each position its predecessor's embedding, gated (the gate starts at 0); a sequence's
        # first position has none and stays as it is
        start = prev is None
        before = x[:, :-1] if start else prev if T == 1 else torch.cat([prev, x[:, :-1]], dim=1)
        rest = x[:, 1:] if start else x
        gate = torch.sigmoid(linear(rest[..., :SMEAR_CHANNELS].to(cdt), w["smear_gate"])) * w["smear_lambda"]
        rest = torch.addcmul(rest, gate, before)
        x = x0 = torch.cat([x[:, :1], rest], dim=1) if start else rest
        x_backout = None
        for i, lw in enumerate(w["layers"]):
            x = self._layer(i, x, x0, idx, lw, cos, sin, attend, linear)
            if i == self.config.n_layer // 2:
                x_backout = x
        return x - w["backout"] * x_backout, emb

    def _layer(self, i, x, x0, idx, lw, cos, sin, attend, linear):
        """Transformer layer i on x (B, T, d): x0 mixed back in, attention (see _stack's attend), MLP."""
        B, T, _ = x.shape
        H, Hkv, hd = self.config.n_head, self.config.n_kv_head, self.head_dim
        cdt = self.compute_dtype
        x = torch.addcmul(x * lw["resid"], x0, lw["x0"])
        xn = norm(x).to(cdt)
        if len(lw["qkv"]) == 1:  # inference: q, k, v stacked in one matrix: one matmul, and one pass over q and k
            qkv = linear(xn, lw["qkv"][0]).view(B, T, H + 2 * Hkv, hd)
            qk, v = rotary_qk_norm(qkv[:, :, :H + Hkv], cos, sin), qkv[:, :, H + Hkv:]
            q, k = qk[:, :, :H], qk[:, :, H:]
        else:
            q, k = (rotary_qk_norm(linear(xn, m).view(B, T, -1, hd), cos, sin) for m in lw["qkv"][:2])
            v = linear(xn, lw["qkv"][2]).view(B, T, Hkv, hd)
        if lw["ve"] is not None:  # value embeddings, mixed into v by a gate per kv head
            gate = VE_GATE_SCALE * torch.sigmoid(linear(xn[..., :VE_GATE_CHANNELS], lw["ve_gate"]))  # (B, T, Hkv)
            v = torch.addcmul(v, gate.unsqueeze(-1), embed(idx, lw["ve"]).to(v.dtype).view_as(v))
        y = attend(i, q, k, v)  # (B, T, H, hd)
        x = x + linear(y.reshape(B, T, H * hd), lw["proj"])
        return x + linear(relu_square(linear(norm(x).to(cdt), lw["fc"])), lw["mlp_proj"])

    def _module_weights(self):
        """The weights for _stack() in training: the modules and parameters themselves (see module_linear)."""
        layers = []
        for i, block in enumerate(self.transformer.h):
            a, m = block.attn, block.mlp
            layers.append(dict(qkv=(a.c_q, a.c_k, a.c_v), proj=a.c_proj, fc=m.c_fc, mlp_proj=m.c_proj,
                               ve=self.value_embeds[str(i)].weight if a.ve_gate is not None else None,
                               ve_gate=a.ve_gate, resid=self.resid_lambdas[i], x0=self.x0_lambdas[i]))
        return dict(wte=self.transformer.wte.weight, smear_gate=self.smear_gate, smear_lambda=self.smear_lambda[0],
                    backout=self.backout_lambda[0], layers=layers)

    # inference with a KV cache: the one cached path (the Engine's prefill and decode steps) ---

    def _ensure_compute_dtype(self):
        if self.compute_dtype is None:  # weights loaded without init_weights(): fp32, like the weights
            self.compute_dtype = torch.float32
            self._init_rotary(self.get_device())

    def _inference_weights(self, recheck=True):
        """The weights for _stack() in cached inference, by layout: "rows", every matrix (out, in) cast to the
        compute dtype, q/k/v stacked into one, applied by F.linear (or matvec); on a CPU also "cols", the same
        matrices transposed for matmul_t (see _layout; in fp32 "rows" are the parameters themselves but for the
        q/k/v stack, so "cols" is one more copy of the matrices). Cast once and kept (a per-step bf16 cast would
        read the fp32 weights anyway); rebuilt whenever a parameter is modified in place (optimizer step,
        load_state_dict) or replaced. The scalars are 0-d views of their parameters, not Python floats: a compiled
        step would bake a float in and recompile when it changes (every RL step). recheck=False (decode steps):
        listing the parameters costs more than a small model's whole step, so only the ones listed at the last
        prefill are checked for in-place changes."""
        cached = getattr(self, "_inference_cache", None)
        params = cached[2] if cached is not None and not recheck else list(self.parameters())
        key = (self.compute_dtype,) + tuple((p.data_ptr(), p._version) for p in params)
        if cached is not None and cached[0] == key:
            return cached[1]
        dtype = self.compute_dtype

        def cast(t):
            return t.detach() if t.dtype == dtype else t.detach().to(dtype)

        def transposed(w):  # the matrices of a "rows" dict as (in, out); scalars and embedding tables shared
            mats = ("qkv", "proj", "fc", "mlp_proj", "ve_gate")
            layers = [{k: (tuple(m.t().contiguous() for m in v) if k == "qkv" else v.t().contiguous())
                       if k in mats and v is not None else v for k, v in lw.items()} for lw in w["layers"]]
            return {**w, "smear_gate": w["smear_gate"].t().contiguous(), "head": w["head"].t().contiguous(),
                    "layers": layers}

        layers = []
        for i, block in enumerate(self.transformer.h):
            a, m = block.attn, block.mlp
            layers.append(dict(
                qkv=(torch.cat([cast(a.c_q.weight), cast(a.c_k.weight), cast(a.c_v.weight)], dim=0),),
                proj=cast(a.c_proj.weight), fc=cast(m.c_fc.weight), mlp_proj=cast(m.c_proj.weight),
                ve=cast(self.value_embeds[str(i)].weight) if a.ve_gate is not None else None,
                ve_gate=cast(a.ve_gate.weight) if a.ve_gate is not None else None,
                resid=self.resid_lambdas.detach()[i], x0=self.x0_lambdas.detach()[i]))
        w = dict(wte=cast(self.transformer.wte.weight), smear_gate=cast(self.smear_gate.weight),
                 smear_lambda=self.smear_lambda.detach()[0], backout=self.backout_lambda.detach()[0],
                 head=cast(self.lm_head.weight[:self.config.vocab_size]), layers=layers)
        w = {"rows": w, "cols": transposed(w) if self.get_device().type == "cpu" else None}
        self._inference_cache = (key, w, params)
        return w

    @staticmethod
    def _layout(idx, compiled):
        """How cached inference applies a matrix to idx's B*T rows: (weights layout, function). A compiled CPU
        step of a few rows runs fused matrix-vector loops, faster there than BLAS calls; other CPU forwards call
        BLAS on the transposed weights; other devices F.linear."""
        B, T = idx.shape
        if idx.device.type != "cpu":
            return "rows", F.linear
        return ("rows", matvec) if compiled and B * T <= MATVEC_MAX_ROWS else ("cols", matmul_t)

    def _cached_forward(self, w, idx, prev, cos, sin, attend, last_only=False, last_positions=None):
        """_stack() then the head, for tokens continuing a cache: fp32 logits (B, T or 1, V) and the last
        pre-smear embedding (B, 1, d). last_positions (B,) long: take both at each row's own position instead
        (right-padded rows of different lengths)."""
        B, T = idx.shape
        _, linear = self._layout(idx, torch.compiler.is_compiling())  # w is in its layout (forward_cached)
        x, emb = self._stack(w, idx, prev, cos, sin, attend, linear)
        rows = None if last_positions is None else torch.arange(B, device=idx.device)
        if last_only or rows is not None:
            x = x[:, -1:] if rows is None else x[rows, last_positions].unsqueeze(1)
        new_prev = emb[:, -1:] if rows is None else emb[rows, last_positions].unsqueeze(1)
        logits = linear(norm(x).to(self.compute_dtype), w["head"]).float()
        return SOFTCAP * torch.tanh(logits / SOFTCAP), new_prev

    def _decode_step(self, w, idx, k_cache, v_cache, pos, prev):
        """One token per row at its own position pos (B,) int32 over the caches' filled prefix (L, B, n, Hkv, hd),
        n > max(pos): no host syncs, so torch.compile traces it once for one row and once for several (n and the
        number of rows are dynamic dims). Returns fp32 logits (B, 1, V), the new prev embedding and the new k, v
        (L, B, Hkv, hd) to store (a write inside the graph would copy the cache)."""
        cos, sin = self.cos[0][pos.long()[:, None]], self.sin[0][pos.long()[:, None]]  # (B, 1, 1, hd/2)
        new_k, new_v = [], []

        def attend(i, q, k, v):
            new_k.append(k[:, 0]), new_v.append(v[:, 0])
            return flash_attn_decode(q, k_cache[i], v_cache[i], k, v, pos, self.window_sizes[i])

        logits, new_prev = self._cached_forward(w, idx, prev, cos, sin, attend)
        return logits, new_prev, torch.stack(new_k), torch.stack(new_v)

    def _compiled_decode_step(self):  # built on first use
        if getattr(self, "_compiled_decode", None) is None:
            # CPU: launch the graph from C++, not a Python wrapper allocating each buffer
            options = {"cpp_wrapper": True, "cpp.threads": decode_kernel_threads()} if self.get_device().type == "cpu" \
                else {}
            self._compiled_decode = torch.compile(self._decode_step, dynamic=False, fullgraph=True, options=options)
        return self._compiled_decode

    @torch.inference_mode()
    def forward_cached(self, idx, kv_cache, last_only=False, compile=False, last_positions=None):
        """idx (B, T) continues each row of kv_cache at its own position -> fp32 logits (B, T, V), or (B, 1, V)
        with last_only or last_positions (B,) long (right-padded prompts: logits and prev_embedding at each row's
        index). Writes and advances the cache; the layers are forward()'s (_stack). A decode step (one token, started
        cache) runs without host syncs, with compile=True through torch.compile (traced once for one row, once for
        several); prefills and chunks run eagerly."""
        self._ensure_compute_dtype()
        B, T = idx.shape
        if kv_cache.seq_len > self.rotary_len:
            raise ValueError(f"KV cache of {kv_cache.seq_len} positions exceeds the rotary table ({self.rotary_len})")
        prev = kv_cache.prev_embedding
        decode = T == 1 and prev is not None
        w = self._inference_weights(recheck=not decode)[self._layout(idx, decode and compile)[0]]
        if decode:
            top = int(kv_cache.cache_seqlens.max())  # one host sync (free on CPU)
            if top + 1 > kv_cache.seq_len:
                raise ValueError(f"KV cache overflow: {top} + 1 new token > capacity {kv_cache.seq_len}; "
                                 "make the cache longer (seq_len) or stop generating earlier")
            # only the filled prefix takes part (slot `top` is where the new token goes): a long, mostly empty
            # cache costs nothing
            k_cache, v_cache = kv_cache.k_cache[:, :, :top + 1], kv_cache.v_cache[:, :, :top + 1]
            args = (w, idx, k_cache, v_cache, kv_cache.cache_seqlens, prev)
            if compile:
                step = self._compiled_decode_step()
                # the filled length is a dynamic dim, so one graph serves every position; so is the number of
                # rows (one graph for every batch size), except where the fused matvec loops are specialized to it
                rows = not (idx.device.type == "cpu" and B <= MATVEC_MAX_ROWS)
                for t in (k_cache, v_cache):
                    torch._dynamo.maybe_mark_dynamic(t, 2)
                    if rows:
                        torch._dynamo.maybe_mark_dynamic(t, 1)
                for t in (idx, kv_cache.cache_seqlens, prev) if rows else ():
                    torch._dynamo.maybe_mark_dynamic(t, 0)
            else:
                step = self._decode_step
            logits, new_prev, k, v = step(*args)
            kv_cache.store_step(k, v)
            kv_cache.prev_embedding.copy_(new_prev)
        else:
            p = kv_cache.cache_seqlens.long().unsqueeze(1) + torch.arange(T, device=idx.device)  # (B, T)
            cos, sin = self.cos[0][p], self.sin[0][p]  # (B, T, 1, hd/2)

            def attend(i, q, k, v):
                k_cache, v_cache = kv_cache.get_layer_cache(i)
                return flash_attn_with_kvcache(q, k_cache, v_cache, k=k, v=v, cache_seqlens=kv_cache.cache_seqlens,
                                               causal=True, window_size=self.window_sizes[i])

            logits, new_prev = self._cached_forward(w, idx, prev, cos, sin, attend, last_only, last_positions)
            # canonical strides: a view's (T*d, d, 1) would make the compiled decode step recompile per prompt length
            kv_cache.prev_embedding = (new_prev.clone(memory_format=torch.contiguous_format) if prev is None
                                       else prev.copy_(new_prev))
        kv_cache.advance(T)  # after the last layer, so every layer saw the same positions
        return logits

    def estimate_flops(self):
        """Training FLOPs per token (forward + backward), the PaLM appendix B accounting: 6 per matmul weight
        plus attention's 12 * heads * head_dim * window per layer."""
        T = self.config.sequence_len
        attn = sum(12 * self.config.n_head * self.head_dim * min(left, T) for left, _ in self.window_sizes)
        return 6 * sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear)) + attn

    def num_scaling_params(self):
        """Parameter counts by kind; scaling laws use transformer_matrices + lm_head."""
        counts = dict(
            wte=self.transformer.wte.weight.numel(),
            value_embeds=sum(p.numel() for p in self.value_embeds.parameters()),
            lm_head=self.lm_head.weight.numel(),
            transformer_matrices=sum(p.numel() for p in self.transformer.h.parameters()),
            scalars=sum(p.numel() for p in (self.resid_lambdas, self.x0_lambdas, self.smear_gate.weight,
                                             self.smear_lambda, self.backout_lambda)),
        )
        counts["total"] = sum(counts.values())
        assert counts["total"] == sum(p.numel() for p in self.parameters()), "a parameter is not accounted for"
        return counts

    def setup_optimizers(self, unembedding_lr=0.004, embedding_lr=0.2, matrix_lr=0.02, weight_decay=0.0,
                         scalar_lr=0.5, compile=None):
        """AdamW for embeddings/head/scalars (width-scaled LRs), Muon per matrix shape. compile: torch.compile
        the optimizer step (pass the precision policy's choice; None: on CUDA only). Muon orthogonalizes in
        bf16 where the model computes in bf16 (the precision policy found bf16 matmuls fast here)."""
        s = (self.config.n_embd / 768) ** -0.5

        def adamw(params, lr, betas, wd):
            return dict(kind="adamw", params=list(params), lr=lr, initial_lr=lr, betas=betas, eps=1e-10,
                        weight_decay=wd)

        groups = [
            adamw(self.lm_head.parameters(), unembedding_lr * s, (0.8, 0.96), 0.01),
            adamw(self.transformer.wte.parameters(), embedding_lr * s, (0.8, 0.995), 0.001),
            adamw(self.value_embeds.parameters(), embedding_lr * s * 0.5, (0.8, 0.995), 0.01),
            adamw([self.resid_lambdas], scalar_lr * 0.01, (0.8, 0.95), 0.05),
            adamw([self.x0_lambdas], scalar_lr, (0.96, 0.95), 0.0),
            adamw([self.smear_gate.weight, self.smear_lambda, self.backout_lambda], 0.2, (0.8, 0.95), 0.0),
        ]
        by_shape = {}
        for p in self.transformer.h.parameters():
            by_shape.setdefault(tuple(p.shape), []).append(p)
        for shape in sorted(by_shape):
            groups.append(dict(kind="muon", params=by_shape[shape], lr=matrix_lr, initial_lr=matrix_lr,
                               momentum=0.95, ns_steps=5, beta2=0.9, weight_decay=weight_decay))
        n_grouped = sum(len(g["params"]) for g in groups)
        assert n_grouped == len(list(self.parameters())), "every parameter must be in exactly one group"
        muon_dtype = torch.bfloat16 if self.compute_dtype == torch.bfloat16 else None
        return MuonAdamW(groups, muon_dtype=muon_dtype, compile=compile)

    # naive sampling (the slow reference beside the Engine) -------------------

    @torch.inference_mode()
    def generate(self, tokens, max_tokens, temperature=1.0, top_k=None, seed=42):
        """Re-runs the full forward for every new token (no cache). Yields token ids (ints)."""
        if not isinstance(tokens, (list, tuple)) or not tokens:
            raise ValueError("generate() needs a non-empty list of token ids")
        device = self.get_device()
        rng = torch.Generator(device=device).manual_seed(seed) if temperature > 0 else None
        ids = torch.tensor([list(tokens)], dtype=torch.long, device=device)  # (1, T)
        for _ in range(max_tokens):
            logits = self.forward(ids[:, -self.rotary_len:])[:, -1, :]  # (1, V)
            if top_k is not None and top_k > 0:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits = logits.masked_fill(logits < v[:, [-1]], float("-inf"))
            if temperature > 0:
                probs = F.softmax(logits / temperature, dim=-1)
                nxt = torch.multinomial(probs, num_samples=1, generator=rng)
            else:
                nxt = torch.argmax(logits, dim=-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
            yield nxt.item()
