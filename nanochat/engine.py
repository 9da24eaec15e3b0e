"""
Fast inference with a KV cache, and the calculator tool wired into the token stream.

Engine: one request, `num_samples` rows sharing its prompt (one batch-1 prefill replicated to the rows).
(Continuous batching, many requests in one decode loop: nanochat/batch_engine.py.)
Tool use: tokens between <|python_start|> and <|python_end|> go to `use_calculator`; its result is forced
back into that row as <|output_start|> result <|output_end|> (mask 0), one token per step.

    for token_column, mask_column in Engine(model, tokenizer).generate(prompt_ids, num_samples=4, max_tokens=64):
        ...
"""

import collections
import logging
import math
import os

import torch

from nanochat.attention import KVCache
from nanochat.calculator import use_calculator  # noqa: F401  (also importable from here)

# Sampling --------------------------------------------------------------------


def _sample_from_probs(probs, rng):
    """One draw per row from unnormalized probabilities (B, K) -> (B, 1), by inverse CDF. Exact like
    torch.multinomial, but ~10-20x faster on CPU at large K (full-vocabulary sampling at batch > 1)."""
    cdf = probs.cumsum(dim=-1)  # (B, K)
    u = torch.rand(probs.size(0), 1, generator=rng, device=probs.device, dtype=cdf.dtype) * cdf[:, -1:]
    # a zero-probability entry has its predecessor's cdf, so it is never chosen; clamp: the u == total edge
    return torch.searchsorted(cdf, u, right=True).clamp_(max=probs.size(-1) - 1)


# Below this temperature sampling is exactly greedy (argmax). softmax(l / T) weighs a token `gap` below the top
# one by e^(-gap / T) relative to it: at T = 1e-5 a gap of 1e-3 already gives e^-100 ~ 4e-44, under what a
# float32 uniform draw can resolve, so only logits equal to within rounding could still be told apart (and there
# argmax's first-index rule is as good as a draw). Dividing by anything smaller only risks overflow.
GREEDY_TEMPERATURE = 1e-5


def top_p_truncate(probs, top_p):
    """Nucleus truncation (https://arxiv.org/abs/1904.09751) of probabilities sorted descending on the last
    dim: keep the smallest prefix whose mass reaches top_p (at least one token), zero the rest (unnormalized)."""
    mass_before = probs.cumsum(dim=-1) - probs
    drop = mass_before >= top_p * probs.sum(dim=-1, keepdim=True)
    drop[..., 0] = False  # the most likely token always stays, even where top_p * mass underflows to 0
    return probs.masked_fill(drop, 0.0)


def check_sampling(temperature, top_k, top_p):
    """One clear error for sampling parameters out of range."""
    if not isinstance(temperature, (int, float)) or not 0 <= temperature < math.inf:
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0):
        raise ValueError(f"top_k must be a non-negative int (0 or None = off), got {top_k!r}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] (None = off), got {top_p!r}")


def sample_next_token(logits, rng, temperature=1.0, top_k=None, top_p=None):
    """logits (B, V) -> token ids (B, 1) int64. temperature below GREEDY_TEMPERATURE (0 included) = argmax; else
    sample softmax(logits / temperature) over the top min(top_k, V) logits (None/0 = all), then the top_p nucleus
    (None/1 = all), rows independently."""
    check_sampling(temperature, top_k, top_p)
    if temperature < GREEDY_TEMPERATURE:
        return torch.argmax(logits, dim=-1, keepdim=True)
    nucleus = top_p is not None and top_p < 1
    idx = None
    if top_k is not None and top_k > 0:
        logits, idx = torch.topk(logits, min(int(top_k), logits.size(-1)), dim=-1)  # (B, k), descending
    elif nucleus:
        logits, idx = torch.sort(logits, dim=-1, descending=True)
    logits = logits.float()
    # shifted to <= 0 before scaling, so no temperature can overflow it (the softmax is the same)
    probs = torch.softmax((logits - logits.amax(dim=-1, keepdim=True)) / temperature, dim=-1)
    if nucleus:
        probs = top_p_truncate(probs, top_p)
    choice = _sample_from_probs(probs, rng)
    return choice if idx is None else idx.gather(1, choice)  # map positions in the sorted list back to ids

# Per-row tool use and stopping (shared by Engine and BatchEngine) ------------


class _Tools:
    """The special ids the decode loop reacts to, and the calculator call."""

    def __init__(self, tokenizer):
        special = tokenizer.encode_special
        self.tokenizer = tokenizer
        self.python_start, self.python_end = special("<|python_start|>"), special("<|python_end|>")
        self.output_start, self.output_end = special("<|output_start|>"), special("<|output_end|>")
        self.assistant_end = special("<|assistant_end|>")
        self.stops = (self.assistant_end, tokenizer.get_bos_token_id())

    def result_tokens(self, expr_tokens):
        result = use_calculator(self.tokenizer.decode(expr_tokens))
        return None if result is None else [self.output_start] + self.tokenizer.encode(result) + [self.output_end]


class _Row:
    """One sequence in a decode loop: tool tokens to force, the expression being written, whether it ended.
    step() maps the sampled token to (token the row takes, mask: 1 = sampled, 0 = forced by the tool)."""
    __slots__ = ("forced", "in_python", "expr_tokens", "completed")

    def __init__(self):
        self.forced, self.expr_tokens = [], []  # forced: tokens to force into this row, a stack (next at the end)
        self.in_python = self.completed = False

    def step(self, sampled, tools):
        tok, mask = (self.forced.pop(), 0) if self.forced else (sampled, 1)
        if self.completed:
            return tok, mask
        if tok in tools.stops:
            self.completed = True
        elif tok == tools.python_start:
            self.in_python, self.expr_tokens = True, []
        elif tok == tools.python_end:
            if self.in_python and self.expr_tokens:
                out = tools.result_tokens(self.expr_tokens)
                if out is not None:
                    self.forced = out[::-1]  # stack: pop() returns them in order
            self.in_python, self.expr_tokens = False, []
        elif self.in_python:
            self.expr_tokens.append(tok)
        return tok, mask


def new_kv_cache(model, batch_size, seq_len):
    """An empty KV cache for `model` in the dtype its attention layers produce k/v in."""
    cfg = model.config
    device = next(model.parameters()).device
    dtype = model.compute_dtype or torch.float32  # None until the first forward of a model never initialised
    return KVCache(batch_size=batch_size, num_heads=cfg.n_kv_head, seq_len=seq_len, head_dim=cfg.n_embd // cfg.n_head,
                   num_layers=cfg.n_layer, device=device, dtype=dtype)


def check_request(config, tokens, max_tokens, temperature, top_k, top_p):
    """Validate one generation request for a model of `config`; returns max_tokens resolved (None = fill the
    model's context)."""
    if not isinstance(tokens, (list, tuple)) or len(tokens) == 0 or \
            not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
        raise ValueError("tokens must be a non-empty list of ints (the prompt's token ids)")
    cfg = config
    if min(tokens) < 0 or max(tokens) >= cfg.vocab_size:
        raise ValueError(f"token ids must lie in [0, {cfg.vocab_size}) for this model, "
                         f"got min {min(tokens)} max {max(tokens)}")
    check_sampling(temperature, top_k, top_p)
    if max_tokens is None:
        max_tokens = max(0, cfg.sequence_len - len(tokens))
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 0:
        raise ValueError(f"max_tokens must be a non-negative int, got {max_tokens!r}")
    return max_tokens

# Compiled or eager decode ----------------------------------------------------

# Where the compiled decode step measured faster than the eager one, by device type: the largest batch size
# measured (scripts/bench_infer --compile=0 vs 1). CPU (d4, fp32, 2 threads): 0.5-0.8x eager's step time at batch
# 1, 2, 8, 32 and 64. CUDA and MPS are not measured yet, so they decode eagerly.
COMPILED_DECODE_FASTER = {"cpu": 64}
# A first compilation costs ~5-15 s on a CPU, as long as ~4k eager decode steps: so with compile=None an Engine
# decodes eagerly until this process has decoded that many tokens, then compiles (a short chat never pays for it,
# an eval or RL run soon does). A BatchEngine, a long-lived server loop, compiles when it starts.
AUTO_COMPILE_AFTER_TOKENS = 4096
_eager_tokens = collections.Counter()  # device type -> tokens decoded eagerly under compile=None, this process
_compile_failed = set()  # device types where compiling the decode step failed: compile=None decodes eagerly there
logger = logging.getLogger("nanochat")


def compiled_decode_faster(device_type, batch_size):
    """Whether the compiled decode step is the faster one for this device type and batch size: the env
    NANOCHAT_DECODE_COMPILE=0|1 if set (0: never compile, e.g. tests), else COMPILED_DECODE_FASTER."""
    env = os.environ.get("NANOCHAT_DECODE_COMPILE", "")
    if env:
        if env not in ("0", "1"):
            raise ValueError(f"NANOCHAT_DECODE_COMPILE must be 0 or 1 (unset = decide), got {env!r}")
        return env == "1"
    return batch_size <= COMPILED_DECODE_FASTER.get(device_type, 0)


def use_compiled_decode(compile, device_type, batch_size, amortize=True):
    """The decode path for one step: compile True/False as given; None = compiled_decode_faster(), once (with
    amortize) this process has decoded AUTO_COMPILE_AFTER_TOKENS tokens eagerly. A dict lookup, no benchmark."""
    if compile is not None:
        return bool(compile)
    if device_type in _compile_failed or not compiled_decode_faster(device_type, batch_size):
        return False
    if amortize and _eager_tokens[device_type] < AUTO_COMPILE_AFTER_TOKENS:
        _eager_tokens[device_type] += batch_size
        return False
    return True


def compile_failed(device_type, error):
    """Compiling the decode step failed (no C++ compiler, an unsupported op): compile=None decodes eagerly on this
    device type from now on."""
    _compile_failed.add(device_type)
    logger.warning(f"compiling the decode step failed on {device_type} ({type(error).__name__}: {str(error)[:300]}); "
                   "decoding eagerly")

# Engine: one request, num_samples rows sharing its prompt --------------------


class Engine:

    def __init__(self, model, tokenizer, compile=None):
        """compile=True runs the decode step through torch.compile (the first use of one row, and of several,
        pays the compilation; output equals the eager path's in fp32), False eagerly, None decides (see
        use_compiled_decode)."""
        self.model, self.tokenizer, self.tools, self.compile = model, tokenizer, _Tools(tokenizer), compile

    @torch.inference_mode()
    def generate(self, tokens, num_samples=1, max_tokens=None, temperature=1.0, top_k=None, top_p=None, seed=42):
        """Yield (token_column, mask_column) per step, lists of num_samples ints (mask 0 = forced by the tool).
        Completed rows keep receiving tokens callers ignore. max_tokens None = fill the model's sequence_len."""
        max_tokens = check_request(self.model.config, tokens, max_tokens, temperature, top_k, top_p)
        if not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
        if max_tokens == 0:
            return
        model, B, T = self.model, num_samples, len(tokens)
        device = next(model.parameters()).device
        rng = torch.Generator(device=device).manual_seed(seed)

        # 1) prefill the prompt once at batch 1, then replicate it into a decode cache with room for every token
        prefill_cache = new_kv_cache(model, 1, T)
        ids = torch.tensor([tokens], dtype=torch.long, device=device)  # (1, T)
        logits = model.forward_cached(ids, prefill_cache, last_only=True)[:, -1, :]  # (1, V)
        # a compiled step reads any filled length, but the cache's strides are guarded: where it may compile, one
        # cache length per batch size (the context) keeps it to one graph across prompts and max_tokens
        compilable = use_compiled_decode(self.compile, device.type, B, amortize=False)
        cache = new_kv_cache(model, B, max(T + max_tokens, model.config.sequence_len) if compilable else T + max_tokens)
        cache.prefill(prefill_cache)
        del prefill_cache
        logits = logits.expand(B, -1)  # (B, V); each row still samples independently

        rows = [_Row() for _ in range(B)]
        for num_generated in range(1, max_tokens + 1):
            sampled = sample_next_token(logits, rng, temperature, top_k, top_p)  # (B, 1)
            sampled_list = sampled.view(-1).tolist()
            token_column, mask_column = map(list, zip(*(row.step(s, self.tools) for row, s in zip(rows, sampled_list))))
            yield token_column, mask_column
            if num_generated == max_tokens or all(row.completed for row in rows):
                return
            # 2) one decode step for the whole column; reuse the sampled tensor unless a row was forced
            forced = token_column != sampled_list
            ids = torch.tensor(token_column, dtype=torch.long, device=device).view(B, 1) if forced else sampled
            compile = use_compiled_decode(self.compile, device.type, B)
            try:
                logits = model.forward_cached(ids, cache, compile=compile)[:, -1, :]  # (B, V)
            except Exception as e:  # a failed compilation leaves the cache as it was: decode this step eagerly
                if not compile or self.compile is not None:
                    raise
                compile_failed(device.type, e)
                logits = model.forward_cached(ids, cache)[:, -1, :]

    def generate_batch(self, tokens, num_samples=1, **kwargs):
        """(results, masks): per sample, prompt + generated tokens without the terminal <|assistant_end|>/<|bos|>;
        mask 0 for the prompt and forced tokens, 1 sampled."""
        results = [list(tokens) for _ in range(num_samples)]
        masks = [[0] * len(tokens) for _ in range(num_samples)]
        done = [False] * num_samples
        for token_column, mask_column in self.generate(tokens, num_samples, **kwargs):
            for i, (tok, m) in enumerate(zip(token_column, mask_column)):
                done[i] = done[i] or tok in self.tools.stops
                if not done[i]:
                    results[i].append(tok)
                    masks[i].append(m)
            if all(done):
                break
        return results, masks
