"""
Fast inference with a KV cache, and the calculator tool wired into the token stream.

Engine: one request, `num_samples` rows sharing its prompt (one batch-1 prefill replicated to the rows).
BatchEngine: continuous batching; requests join and leave a running decode loop (a background thread),
each in its own row of one cache at its own position.
Tool use: tokens between <|python_start|> and <|python_end|> go to `use_calculator`; its result is forced
back into that row as <|output_start|> result <|output_end|> (mask 0), one token per step.

    for token_column, mask_column in Engine(model, tokenizer).generate(prompt_ids, num_samples=4, max_tokens=64):
        ...
    for token in BatchEngine(model, tokenizer, max_rows=8).start().submit(prompt_ids, max_tokens=64, seed=1):
        ...
"""

import collections
import math
import queue
import random
import threading
import time

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


def cache_len_bucket(n):
    """Cache capacity for n positions, rounded up to a power of two (>= 64): a compiled decode step is
    traced once per cache length, so lengths come from a handful of sizes."""
    return max(64, 1 << (n - 1).bit_length())


def new_kv_cache(model, batch_size, seq_len):
    """An empty KV cache for `model` in the dtype its attention layers produce k/v in."""
    cfg = model.config
    device = next(model.parameters()).device
    dtype = model.compute_dtype or torch.float32  # None until the first forward of a model never initialised
    return KVCache(batch_size=batch_size, num_heads=cfg.n_kv_head, seq_len=seq_len, head_dim=cfg.n_embd // cfg.n_head,
                   num_layers=cfg.n_layer, device=device, dtype=dtype)


def check_request(model, tokens, max_tokens, temperature, top_k, top_p):
    """Validate one generation request; returns max_tokens resolved (None = fill the model's context)."""
    if not isinstance(tokens, (list, tuple)) or len(tokens) == 0 or \
            not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
        raise ValueError("tokens must be a non-empty list of ints (the prompt's token ids)")
    cfg = model.config
    if min(tokens) < 0 or max(tokens) >= cfg.vocab_size:
        raise ValueError(f"token ids must lie in [0, {cfg.vocab_size}) for this model, "
                         f"got min {min(tokens)} max {max(tokens)}")
    check_sampling(temperature, top_k, top_p)
    if max_tokens is None:
        max_tokens = max(0, cfg.sequence_len - len(tokens))
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 0:
        raise ValueError(f"max_tokens must be a non-negative int, got {max_tokens!r}")
    return max_tokens

# Engine: one request, num_samples rows sharing its prompt --------------------


class Engine:

    def __init__(self, model, tokenizer, compile=False):
        """compile=True runs the decode step through torch.compile (first use of each batch size and
        cache length pays the compilation; output equals the eager path's in fp32)."""
        self.model, self.tokenizer, self.tools, self.compile = model, tokenizer, _Tools(tokenizer), compile

    @torch.inference_mode()
    def generate(self, tokens, num_samples=1, max_tokens=None, temperature=1.0, top_k=None, top_p=None, seed=42):
        """Yield (token_column, mask_column) per step, lists of num_samples ints (mask 0 = forced by the tool).
        Completed rows keep receiving tokens callers ignore. max_tokens None = fill the model's sequence_len."""
        max_tokens = check_request(self.model, tokens, max_tokens, temperature, top_k, top_p)
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
        cache_len = max(T + max_tokens, min(cache_len_bucket(T + max_tokens), getattr(model, "rotary_len", 1 << 62)))
        cache = new_kv_cache(model, B, cache_len)
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
            logits = model.forward_cached(ids, cache, compile=self.compile)[:, -1, :]  # (B, V)

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

# Continuous batching: one decode loop per model replica, requests joining and leaving it ---


class QueueFull(Exception):
    """BatchEngine.submit(): the wait queue is full; retry later."""


class Stream:
    """The tokens of one BatchEngine request: iterate (blocking) or get(). finish_reason: "stop" (end token),
    "length" (max_tokens), "cancelled" (cancel() or engine stop) or "error" (then `error` says what)."""

    def __init__(self):
        self._queue, self._ended = queue.Queue(), False
        self.finish_reason, self.error, self.cancelled = None, None, False

    def __iter__(self):
        while (tok := self.get()) is not None:
            yield tok

    def get(self, timeout=None):
        """The next token id, or None once the stream has finished; raises queue.Empty on timeout."""
        if self._ended:
            return None
        tok = self._queue.get(timeout=timeout)
        self._ended = tok is None
        return tok

    def cancel(self):
        """Stop generating; the row is freed at the decode loop's next step."""
        self.cancelled = True

    def _finish(self, reason, error=None):
        if self.finish_reason is None:
            self.finish_reason, self.error = reason, error
            self._queue.put(None)


class _Request:
    __slots__ = ("tokens", "max_tokens", "temperature", "top_k", "top_p", "rng", "stream", "row", "generated")

    def __init__(self, tokens, max_tokens, temperature, top_k, top_p, rng):
        self.tokens, self.max_tokens, self.rng = tokens, max_tokens, rng
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.stream, self.row, self.generated = Stream(), _Row(), 0


class BatchEngine:
    """Continuous batching (Orca, Yu et al. 2022): one thread decodes up to max_rows requests at once. A request
    waits in a bounded queue, is prefilled (with the others waiting, see _admit) into a free row of one shared
    KV cache, and leaves at its stop token or max_tokens. Each request has its own sampling parameters and
    generator, so its tokens (greedy, or seeded) equal its solo Engine.generate run."""

    def __init__(self, model, tokenizer, max_rows=8, max_queue=64, compile=False, prefill_tokens=2048):
        if max_rows < 1 or max_queue < 0 or prefill_tokens < 1:
            raise ValueError(f"max_rows and prefill_tokens must be >= 1 and max_queue >= 0, "
                             f"got {max_rows}, {prefill_tokens}, {max_queue}")
        self.model, self.tools, self.compile = model, _Tools(tokenizer), compile
        self.max_rows, self.max_queue, self.prefill_tokens = max_rows, max_queue, prefill_tokens
        self.device = next(model.parameters()).device
        self.capacity = model.config.sequence_len  # positions per row
        self._cache = None  # built by the loop thread
        self._rows = [None] * max_rows  # _Request per slot
        self._waiting = collections.deque()
        self._admitting = 0  # taken from _waiting by _admit, not in a row yet
        self._cond = threading.Condition()
        self._thread, self._stopping = None, False
        self._recent = collections.deque()  # (time, tokens) of recent steps, for tok_per_s
        self.total_tokens = 0

    def start(self):
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="BatchEngine", daemon=True)
            self._thread.start()
        return self

    def stop(self):
        """End the loop thread; every pending and running stream ends "cancelled"."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._cond:
            pending = list(self._waiting) + [r for r in self._rows if r is not None]
            self._waiting.clear()
            self._rows = [None] * self.max_rows
        for req in pending:
            req.stream._finish("cancelled")

    def submit(self, tokens, max_tokens, temperature=1.0, top_k=None, top_p=None, seed=None):
        """Queue one request; returns its Stream. Raises ValueError on bad arguments, QueueFull when max_rows +
        max_queue requests are already running or waiting (a row the decode loop has not filled yet is free)."""
        max_tokens = check_request(self.model, tokens, max_tokens, temperature, top_k, top_p)
        if len(tokens) >= self.capacity:
            raise ValueError(f"prompt of {len(tokens)} tokens leaves no room in the model's context "
                             f"({self.capacity}); shorten the conversation")
        rng = torch.Generator(device=self.device).manual_seed(seed if seed is not None else random.getrandbits(63))
        req = _Request(list(tokens), min(max_tokens, self.capacity - len(tokens)), temperature, top_k, top_p, rng)
        with self._cond:
            busy = len(self._waiting) + self._admitting + sum(r is not None for r in self._rows)
            if busy >= self.max_rows + self.max_queue:
                raise QueueFull(f"{busy} requests are already running or waiting (max_rows={self.max_rows}, "
                                f"max_queue={self.max_queue})")
            if max_tokens == 0:
                req.stream._finish("length")
            else:
                self._waiting.append(req)
                self._cond.notify_all()
        return req.stream

    def stats(self):
        """queue_depth, active_rows, max_rows, tok_per_s (tokens streamed over the last ~10 s) and
        total_tokens (streamed since start; terminal tokens not counted)."""
        with self._cond:
            now = time.monotonic()
            while self._recent and now - self._recent[0][0] > 10.0:
                self._recent.popleft()
            span = now - self._recent[0][0] if self._recent else 0.0
            recent = sum(n for _, n in self._recent)
            return dict(queue_depth=len(self._waiting), active_rows=sum(r is not None for r in self._rows),
                        max_rows=self.max_rows, tok_per_s=recent / span if span > 0 else 0.0,
                        total_tokens=self.total_tokens)

    # the loop thread -----------------------------------------------------------

    def _loop(self):
        with torch.inference_mode():
            self._cache = new_kv_cache(self.model, self.max_rows, self.capacity)
            cfg = self.model.config
            self._cache.prev_embedding = torch.zeros(self.max_rows, 1, cfg.n_embd, dtype=self._cache.k_cache.dtype,
                                                     device=self.device)
            self._logits = torch.zeros(self.max_rows, cfg.vocab_size, device=self.device)
            self._column = [None] * self.max_rows  # per slot: the token its next decode step feeds in
            while True:
                with self._cond:
                    while not self._stopping and not self._waiting and all(r is None for r in self._rows):
                        self._cond.wait()
                    if self._stopping:
                        return
                try:
                    # requests that arrive over a few ms (HTTP) join before the next decode step rather than
                    # one group per step; the running rows wait for at most ~prefill_tokens of prefill
                    spent = 0
                    while spent < self.prefill_tokens and (n := self._admit()):
                        spent += n
                    self._step()
                except Exception as e:  # a failing step ends every running request, not the server
                    self._end_all("error", f"{type(e).__name__}: {e}")

    def _admit(self):
        """Prefill the oldest waiting requests that fit in free rows (lowest first) in one forward, right-padded
        (causal attention hides the padding; logits and smear state are taken at each row's last real token),
        at most prefill_tokens padded tokens (a longer prompt goes alone), and emit their first tokens.
        Returns the padded tokens prefilled (0: nothing admitted)."""
        with self._cond:
            free = [slot for slot, r in enumerate(self._rows) if r is None]
            group, longest = [], 0
            while self._waiting and len(group) < len(free):
                req = self._waiting[0]
                if req.stream.cancelled:
                    self._waiting.popleft().stream._finish("cancelled")
                    continue
                if group and max(longest, len(req.tokens)) * (len(group) + 1) > self.prefill_tokens:
                    break
                group.append(self._waiting.popleft())
                longest = max(longest, len(req.tokens))
            self._admitting = len(group)
        if not group:
            return 0
        slots = free[:len(group)]
        try:
            lengths = [len(req.tokens) for req in group]
            ids = torch.zeros(len(group), longest, dtype=torch.long)  # pad id 0: never attended to, never kept
            for i, req in enumerate(group):
                ids[i, :lengths[i]] = torch.tensor(req.tokens)
            last = torch.tensor(lengths, device=self.device) - 1
            pc = new_kv_cache(self.model, len(group), longest)
            logits = self.model.forward_cached(ids.to(self.device), pc, last_positions=last)[:, 0]  # (n, V)
            for i, slot in enumerate(slots):
                self._cache.insert_row(slot, pc, src=i, length=lengths[i])
                self._logits[slot] = logits[i]
        except Exception as e:
            with self._cond:
                self._admitting = 0
            for req in group:
                req.stream._finish("error", f"{type(e).__name__}: {e}")
        else:
            with self._cond:
                for slot, req in zip(slots, group):
                    self._rows[slot] = req
                self._admitting = 0
            self._emit(slots)  # first tokens out now, not after the next decode step
        return len(group) * longest

    def _free(self, slot, reason, error=None):
        req = self._rows[slot]
        with self._cond:
            self._rows[slot] = None
        req.stream._finish(reason, error)

    def _end_all(self, reason, error=None):
        for slot, req in enumerate(self._rows):
            if req is not None:
                self._free(slot, reason, error)

    def _emit(self, slots):
        """Sample the next token of the rows in `slots` (from their own logits and generator) into their
        streams; a row that goes on keeps it in _column for the next decode step."""
        greedy = self._logits[slots].argmax(dim=-1).tolist()
        n_out = 0
        for slot, best in zip(slots, greedy):
            req = self._rows[slot]
            if req is None:
                continue
            if req.stream.cancelled:
                self._free(slot, "cancelled")
                continue
            sampled = best if req.temperature < GREEDY_TEMPERATURE else \
                int(sample_next_token(self._logits[slot:slot + 1], req.rng, req.temperature, req.top_k, req.top_p))
            tok, _ = req.row.step(sampled, self.tools)
            req.generated += 1
            if req.row.completed:
                self._free(slot, "stop")
                continue
            req.stream._queue.put(tok)
            n_out += 1
            if req.generated >= req.max_tokens:
                self._free(slot, "length")
                continue
            self._column[slot] = tok
        with self._cond:
            self.total_tokens += n_out
            self._recent.append((time.monotonic(), n_out))

    def _step(self):
        """Emit a token for every active row not served yet, then one decode step for those that go on."""
        self._emit([slot for slot, req in enumerate(self._rows) if req is not None and self._column[slot] is None])
        active = [slot for slot, req in enumerate(self._rows) if req is not None]
        if not active:
            return
        # rows [0, n) take part, n rounded up to a power of two so a compiled step sees few batch sizes;
        # free rows among them decode a dummy token at position 0 (their cache is rewritten when reused)
        n = min(self.max_rows, 1 << max(active).bit_length())
        view = self._cache.rows(n)
        for slot in range(n):
            if self._rows[slot] is None:
                view.cache_seqlens[slot] = 0
        column = [0 if self._rows[slot] is None else self._column[slot] for slot in range(n)]
        self._column = [None] * self.max_rows
        ids = torch.tensor(column, dtype=torch.long, device=self.device).view(n, 1)
        self._logits[:n] = self.model.forward_cached(ids, view, compile=self.compile)[:, -1]
