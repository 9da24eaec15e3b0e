"""
Fast inference: one batch-1 prefill, the KV cache replicated to `num_samples` rows, then one decode step
per generated column, with the calculator tool wired into the token stream (REFERENCE 10.1-10.4).

The engine knows nothing about text except for tool use: between <|python_start|> and <|python_end|> the
tokens are decoded and handed to `use_calculator`; a result is forced back into that row as
<|output_start|> result <|output_end|> (mask 0), one token per step.

The calculator (D12) is a whitelist evaluator over Python's `ast`, not `eval`: numbers, + - * / // ( ),
unary minus/plus, and `'string literal'.count('string literal')`. Everything else is refused. Every operand
is bounded (expression length, integer size), so one evaluation costs microseconds whatever the input;
a deadline is still checked while walking the tree. Neither needs signals, so it works in any thread.

    engine = Engine(model, tokenizer)
    for token_column, mask_column in engine.generate(prompt_ids, num_samples=4, max_tokens=64):
        ...
    results, masks = engine.generate_batch(prompt_ids, num_samples=4, max_tokens=64)
"""

import ast
import inspect
import math
import time

import torch

from nanochat.attention import KVCache

# -----------------------------------------------------------------------------
# Calculator tool

MAX_EXPR_CHARS = 1000  # longer "expressions" are not calculator calls
MAX_INT_BITS = 1024  # any integer literal or intermediate beyond ~308 digits is refused
MAX_DEPTH = 64  # nesting depth of the syntax tree (parentheses, unary minus chains)
CALC_TIMEOUT = 3.0  # seconds; the reference's SIGALRM budget, enforced here by a deadline


class _Refused(Exception):
    pass


def _strip_commas_outside_strings(expr):
    # "1,234 * 2" -> "1234 * 2" (the model writes thousands separators), but "'a,b'.count(',')" keeps its
    # literals intact (the reference removed every comma, which changed string arguments).
    out, quote = [], None
    for ch in expr:
        if quote is None:
            if ch in "'\"":
                quote = ch
            elif ch == ",":
                continue
        elif ch == quote:
            quote = None
        out.append(ch)
    return "".join(out)


def _check_number(x):
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise _Refused(f"not a number: {type(x).__name__}")
    if isinstance(x, int) and x.bit_length() > MAX_INT_BITS:
        raise _Refused("integer too large")
    if isinstance(x, float) and not math.isfinite(x):
        raise _Refused("non-finite result")
    return x


def _eval_node(node, deadline, depth):
    if depth > MAX_DEPTH:
        raise _Refused("expression nested too deeply")
    if time.monotonic() > deadline:
        raise _Refused("time limit")
    if isinstance(node, ast.Expression):
        return _eval_node(node.body, deadline, depth + 1)
    if isinstance(node, ast.Constant):
        # numbers only: strings are legal solely as the receiver/argument of .count, handled below
        return _check_number(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        v = _eval_node(node.operand, deadline, depth + 1)
        return _check_number(-v if isinstance(node.op, ast.USub) else +v)
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv)):
        # `**` (ast.Pow) is refused on purpose: one short token sequence can ask for an astronomically
        # large number, and GSM8K-style calculator calls never use it (the reference refuses it too).
        a = _eval_node(node.left, deadline, depth + 1)
        b = _eval_node(node.right, deadline, depth + 1)
        if isinstance(node.op, ast.Add):
            r = a + b
        elif isinstance(node.op, ast.Sub):
            r = a - b
        elif isinstance(node.op, ast.Mult):
            r = a * b  # both operands are <= MAX_INT_BITS, so this is cheap; the result is checked
        elif isinstance(node.op, ast.Div):
            r = a / b
        else:
            r = a // b
        return _check_number(r)
    if isinstance(node, ast.Call):
        # exactly  'literal'.count('literal')  - no keywords, no start/end, no chained methods
        f = node.func
        if (isinstance(f, ast.Attribute) and f.attr == "count" and isinstance(f.value, ast.Constant)
                and isinstance(f.value.value, str) and len(node.args) == 1 and not node.keywords
                and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            return f.value.value.count(node.args[0].value)
        raise _Refused("only 'string'.count('x') calls are allowed")
    raise _Refused(f"{type(node).__name__} is not allowed")


def _format_result(x):
    # integers print as integers; floats that are whole numbers print without ".0" (the GSM8K annotations
    # the model was trained on write "<<10/2=5>>"), other floats with 12 significant digits so that
    # 0.1+0.2 gives "0.3" rather than "0.30000000000000004".
    if isinstance(x, int):
        return str(x)
    if x.is_integer() and abs(x) < 1e16:
        return str(int(x))
    return f"{x:.12g}"


def use_calculator(expr, timeout=CALC_TIMEOUT):
    """
    Evaluate a calculator expression the model wrote. Returns the result as a string, or None when the
    expression is refused (anything outside the whitelist), invalid, or fails (division by zero, ...).
    Never raises, never uses signals; safe to call from any thread.
    """
    if not isinstance(expr, str) or len(expr) > MAX_EXPR_CHARS:
        return None
    expr = _strip_commas_outside_strings(expr).strip()
    if not expr:
        return None
    deadline = time.monotonic() + timeout
    try:
        tree = ast.parse(expr, mode="eval")
        return _format_result(_eval_node(tree, deadline, 0))
    except (_Refused, SyntaxError, ValueError, ZeroDivisionError, OverflowError, ArithmeticError,
            RecursionError, MemoryError, TypeError):
        return None

# -----------------------------------------------------------------------------
# Sampling


def _sample_from_probs(probs, rng):
    """
    One draw per row from unnormalized probabilities (B, K) by inverse CDF: a single uniform per row and a
    binary search. Exact like torch.multinomial, but ~10-20x faster on CPU at large K (multinomial spends
    ~0.3 ms per row of 8192 there), which matters for full-vocabulary sampling at batch > 1.
    """
    cdf = probs.cumsum(dim=-1)  # (B, K)
    u = torch.rand(probs.size(0), 1, generator=rng, device=probs.device, dtype=cdf.dtype) * cdf[:, -1:]
    # first index whose cdf exceeds u; a zero-probability entry has cdf equal to its predecessor's, so it
    # can never be chosen. clamp guards the u == total rounding edge.
    return torch.searchsorted(cdf, u, right=True).clamp_(max=probs.size(-1) - 1)  # (B, 1)


def sample_next_token(logits, rng, temperature=1.0, top_k=None, top_p=None):
    """
    logits (B, V) -> next token ids (B, 1) int64. temperature 0 = argmax (rng unused); top_k None/0 =
    sample from the full softmax; otherwise from the top min(top_k, V) logits. top_p None/1 = no nucleus
    filter; otherwise sample from the smallest set of most likely tokens whose probability reaches top_p
    (Holtzman et al. 2019, https://arxiv.org/abs/1904.09751), after top_k. Rows are sampled
    independently from the one generator `rng`.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0.0:
        return torch.argmax(logits, dim=-1, keepdim=True)
    idx = None
    if top_k is not None and top_k > 0:
        k = min(int(top_k), logits.size(-1))
        logits, idx = torch.topk(logits, k, dim=-1)  # (B, k)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p is not None and top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # keep a token while the mass of the more likely ones is still below top_p; the first always stays
        keep = (sorted_probs.cumsum(dim=-1) - sorted_probs) < top_p
        keep[:, 0] = True
        choice = order.gather(1, _sample_from_probs(sorted_probs * keep, rng))
    else:
        choice = _sample_from_probs(probs, rng)
    return choice if idx is None else idx.gather(1, choice)  # map a position in the top k back to ids

# -----------------------------------------------------------------------------
# Engine


class _RowState:
    """Per-row bookkeeping of the decode loop (tool use and completion)."""
    __slots__ = ("forced", "in_python", "expr_tokens", "completed")

    def __init__(self):
        self.forced = []  # tokens to force into this row, next one at the end (list used as a stack)
        self.in_python = False
        self.expr_tokens = []
        self.completed = False


class Engine:

    def __init__(self, model, tokenizer):
        self.model = model
        self.tokenizer = tokenizer
        special = tokenizer.encode_special
        self.python_start = special("<|python_start|>")
        self.python_end = special("<|python_end|>")
        self.output_start = special("<|output_start|>")
        self.output_end = special("<|output_end|>")
        self.assistant_end = special("<|assistant_end|>")
        self.bos = tokenizer.get_bos_token_id()
        # models that can return only the last position's logits skip the (T, V) head matmul of the prefill
        try:
            params = inspect.signature(model.forward).parameters
        except (TypeError, ValueError):
            params = {}
        self._fwd_kwargs = {"last_only": True} if "last_only" in params else {}

    def _new_cache(self, batch_size, seq_len, device, dtype):
        cfg = self.model.config
        return KVCache(batch_size=batch_size, num_heads=cfg.n_kv_head, seq_len=seq_len,
                       head_dim=cfg.n_embd // cfg.n_head, num_layers=cfg.n_layer, device=device, dtype=dtype)

    def _cache_dtype(self, device):
        # the dtype the attention layers produce k/v in: the model's compute dtype
        dtype = getattr(self.model, "compute_dtype", None)
        if dtype is None:
            from nanochat.common import get_compute_dtype
            dtype = get_compute_dtype(device.type, verbose=False)
        return dtype

    def _tool_result_tokens(self, expr_tokens):
        result = use_calculator(self.tokenizer.decode(expr_tokens))
        if result is None:
            return None
        return [self.output_start] + self.tokenizer.encode(result) + [self.output_end]

    @torch.inference_mode()
    def generate(self, tokens, num_samples=1, max_tokens=None, temperature=1.0, top_k=None, seed=42, top_p=None):
        """
        Stream one column per step: (token_column, mask_column), lists of num_samples ints; mask 1 = the
        token was sampled, 0 = forced by the tool. Completed rows keep receiving (meaningless) tokens;
        callers ignore them. max_tokens None = until every row ends or the model's sequence_len is full.
        """
        if not isinstance(tokens, (list, tuple)) or len(tokens) == 0 or not all(isinstance(t, int) for t in tokens):
            raise ValueError("tokens must be a non-empty list of ints (the prompt's token ids)")
        if not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
        if temperature is None or temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature!r}")
        cfg = self.model.config
        vocab = cfg.vocab_size
        if min(tokens) < 0 or max(tokens) >= vocab:
            raise ValueError(f"token ids must lie in [0, {vocab}) for this model, got min {min(tokens)} max {max(tokens)}")
        if max_tokens is None:
            max_tokens = max(0, cfg.sequence_len - len(tokens))
        if max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0, got {max_tokens}")
        if max_tokens == 0:
            return
        device = next(self.model.parameters()).device
        dtype = self._cache_dtype(device)
        rng = torch.Generator(device=device)
        rng.manual_seed(seed)

        # 1) prefill the prompt once at batch 1
        T = len(tokens)
        prefill_cache = self._new_cache(1, T, device, dtype)
        ids = torch.tensor([tokens], dtype=torch.long, device=device)  # (1, T)
        logits = self.model(ids, kv_cache=prefill_cache, **self._fwd_kwargs)[:, -1, :]  # (1, V)
        # 2) replicate it into the decode cache: room for the prompt plus every token we may forward
        cache = self._new_cache(num_samples, T + max_tokens, device, dtype)
        cache.prefill(prefill_cache)
        del prefill_cache
        logits = logits.expand(num_samples, -1)  # (B, V); each row still samples independently

        B = num_samples
        rows = [_RowState() for _ in range(B)]
        num_generated = 0
        while True:
            sampled = sample_next_token(logits, rng, temperature, top_k, top_p)  # (B, 1)
            sampled_list = sampled.view(-1).tolist()
            token_column, mask_column = sampled_list, [1] * B
            any_forced = False
            for i, row in enumerate(rows):
                if row.forced:
                    tok = row.forced.pop()
                    token_column[i] = tok
                    mask_column[i] = 0
                    any_forced = True
                else:
                    tok = token_column[i]
                if row.completed:
                    continue
                if tok == self.assistant_end or tok == self.bos:
                    row.completed = True
                elif tok == self.python_start:
                    row.in_python, row.expr_tokens = True, []
                elif tok == self.python_end:
                    if row.in_python and row.expr_tokens:
                        out = self._tool_result_tokens(row.expr_tokens)
                        if out is not None:
                            row.forced = out[::-1]  # stack: pop() returns them in order
                    row.in_python, row.expr_tokens = False, []
                elif row.in_python:
                    row.expr_tokens.append(tok)
            yield token_column, mask_column
            num_generated += 1
            if num_generated >= max_tokens or all(row.completed for row in rows):
                return
            # 3) one decode step for the whole column; reuse the sampled tensor unless a row was forced
            ids = torch.tensor(token_column, dtype=torch.long, device=device).view(B, 1) if any_forced else sampled
            logits = self.model(ids, kv_cache=cache, **self._fwd_kwargs)[:, -1, :]  # (B, V)

    def generate_batch(self, tokens, num_samples=1, **kwargs):
        """
        Non-streaming: returns (results, masks), num_samples lists each = prompt + generated tokens, the
        terminal <|assistant_end|>/<|bos|> excluded; masks 0 for the prompt and forced tokens, 1 sampled.
        """
        results = [list(tokens) for _ in range(num_samples)]
        masks = [[0] * len(tokens) for _ in range(num_samples)]
        done = [False] * num_samples
        for token_column, mask_column in self.generate(tokens, num_samples, **kwargs):
            for i, (tok, m) in enumerate(zip(token_column, mask_column)):
                if done[i]:
                    continue
                if tok == self.assistant_end or tok == self.bos:
                    done[i] = True
                else:
                    results[i].append(tok)
                    masks[i].append(m)
            if all(done):
                break
        return results, masks

# -----------------------------------------------------------------------------
# TEMPORARY stand-in for the continuous-batching engine (owner: h1-infer). It has the agreed public
# interface (QueueFull, BatchEngine, Stream) so the server can be built and tested against it, but its
# loop steps each active request's own Engine.generate in turn instead of decoding the rows as one batch.
# Drop this whole section in favour of the real BatchEngine at merge.

import collections
import queue
import random
import threading


class QueueFull(Exception):
    """submit() found the wait queue full: retry later."""


class Stream:
    """The tokens of one submitted request, produced by the BatchEngine's loop thread."""

    def __init__(self):
        self._tokens = queue.Queue()
        self._cancelled = threading.Event()
        self.finish_reason = None
        self.error = None

    def get(self, timeout=None):
        item = self._tokens.get(timeout=timeout)
        if item is None:
            self._tokens.put(None)  # stay finished for every later call
        return item

    def __iter__(self):
        while (token := self.get()) is not None:
            yield token

    def cancel(self):
        self._cancelled.set()

    def _finish(self, reason, error=None):
        if self.finish_reason is None:
            self.finish_reason, self.error = reason, error
            self._tokens.put(None)


class BatchEngine:

    def __init__(self, model, tokenizer, max_rows=8, max_queue=64):
        self.engine = Engine(model, tokenizer)
        self.model, self.max_rows, self.max_queue = model, max_rows, max_queue
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._waiting = collections.deque()  # (stream, generate kwargs)
        self._rows = []  # [stream, generator, generated, max_tokens]
        self._recent = collections.deque()  # (time, tokens) of the last few seconds
        self._thread, self._stopping = None, False
        self.total_tokens = 0

    def start(self):
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, daemon=True, name="batch-engine")
        self._thread.start()

    def stop(self):
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
        with self._lock:
            for stream, _ in self._waiting:
                stream._finish("cancelled")
            for row in self._rows:
                row[1].close()
                row[0]._finish("cancelled")
            self._waiting.clear()
            self._rows.clear()

    def submit(self, tokens, max_tokens, temperature=1.0, top_k=None, top_p=None, seed=None):
        if not isinstance(tokens, (list, tuple)) or not tokens or not all(isinstance(t, int) for t in tokens):
            raise ValueError("tokens must be a non-empty list of ints (the prompt's token ids)")
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive int, got {max_tokens!r}")
        seed = random.randrange(2**31) if seed is None else seed
        kwargs = dict(tokens=list(tokens), max_tokens=max_tokens, temperature=temperature, top_k=top_k,
                      top_p=top_p, seed=seed)
        stream = Stream()
        with self._lock:
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are already waiting")
            self._waiting.append((stream, kwargs))
        self._wake.set()
        return stream

    def stats(self):
        with self._lock:
            now = time.monotonic()
            while self._recent and self._recent[0][0] < now - 5.0:
                self._recent.popleft()
            span = now - self._recent[0][0] if self._recent else 0.0
            rate = sum(n for _, n in self._recent) / span if span > 0.5 else 0.0
            return {"queue_depth": len(self._waiting), "active_rows": len(self._rows), "max_rows": self.max_rows,
                    "tok_per_s": rate, "total_tokens": self.total_tokens}

    def _loop(self):
        device = next(self.model.parameters()).device
        if device.type == "cuda":
            torch.cuda.set_device(device)  # a new thread starts on cuda:0
        while not self._stopping:
            self._wake.clear()
            with self._lock:
                while self._waiting and len(self._rows) < self.max_rows:
                    stream, kw = self._waiting.popleft()
                    gen = self.engine.generate(kw.pop("tokens"), max_tokens=kw["max_tokens"],
                                               temperature=kw["temperature"], top_k=kw["top_k"],
                                               top_p=kw["top_p"], seed=kw["seed"])
                    self._rows.append([stream, gen, 0, kw["max_tokens"]])
                rows = list(self._rows)
            if not rows:
                self._wake.wait(0.1)
                continue
            for row in rows:
                reason = self._step(row)
                if reason is not None:
                    row[1].close()
                    with self._lock:
                        self._rows.remove(row)
                    row[0]._finish(*reason)

    def _step(self, row):
        """One token for one row; returns (finish_reason, error) when the row is done, else None."""
        stream, gen = row[0], row[1]
        if stream._cancelled.is_set():
            return ("cancelled",)
        try:
            token = next(gen)[0][0]
        except StopIteration:
            return ("length",)
        except Exception as e:
            return ("error", f"{type(e).__name__}: {e}")
        if token in (self.engine.assistant_end, self.engine.bos):
            return ("stop",)
        stream._tokens.put(token)
        row[2] += 1
        with self._lock:
            self.total_tokens += 1
            self._recent.append((time.monotonic(), 1))
        return ("length",) if row[2] >= row[3] else None
