"""
GPT-4 style byte-level BPE tokenizer and chat rendering with a training mask (which tokens the model learns).

Training uses `rustbpe`; encoding/decoding uses a `tiktoken.Encoding` built from the learned merges.
On disk a tokenizer is plain data, never a pickle (loading one must not run code):
    tokenizer.json            {"format", "name", "pattern", "special_tokens": {token: id}}
    mergeable_ranks.tiktoken  one "<base64 token bytes> <rank>" line per mergeable token (tiktoken's format)
"""

import os
import json
import base64
import threading

import torch
import tiktoken
import rustbpe

from nanochat.common import get_base_dir
from nanochat.files import CheckpointError, MissingFileError, load_json_file, load_tensor_file, open_regular

# GPT-4's pattern, except digit runs are split into chunks of at most 2 (better bpb at a 32K vocab).
SPLIT_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""

# Order matters: the specials get ids V-9 .. V-1 in this order. <|bos|> begins every document / conversation;
# python_start/end wrap an assistant tool call, output_start/end the tool output injected by the runtime.
SPECIAL_TOKENS = ["<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>",
                  "<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>"]

CONFIG_FILE = "tokenizer.json"
RANKS_FILE = "mergeable_ranks.tiktoken"
FORMAT = "nanochat-tokenizer-v1"
MAX_RANKS_BYTES = 64 << 20  # ~20-40 bytes a line: over a million tokens, far more than any vocabulary here
MAX_TOKEN_BYTES_FILE = 64 << 20  # token_bytes.pt: 4 bytes per token


def validate_conversation(conversation):
    """
    The one check of a chat conversation wherever one enters; returns its messages. {"messages": [...]}: an optional
    leading system message, then user/assistant alternating from user. Content: non-empty str; assistant content may
    also be a non-empty list of {"type": "text"|"python"|"python_output", "text": str}. ValueError names the index.
    """
    messages = conversation.get("messages") if isinstance(conversation, dict) else None
    if not isinstance(messages, list):
        raise ValueError("conversation must be a dict with a 'messages' list")
    if not messages:
        raise ValueError("conversation is empty: it needs at least one user message")
    offset = 1 if isinstance(messages[0], dict) and messages[0].get("role") == "system" else 0
    if offset and len(messages) == 1:
        raise ValueError("message 0: a system message must be followed by a user message")
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise ValueError(f"message {i}: must be a dict with 'role' and 'content', got {type(msg).__name__}")
        role = msg.get("role")
        if role not in ("system", "user", "assistant"):
            raise ValueError(f"message {i}: unknown role {role!r} (expected 'system', 'user' or 'assistant')")
        if role == "system" and i != 0:
            raise ValueError(f"message {i}: a system message is only allowed as the first message")
        if role != "system":
            expected = "user" if (i - offset) % 2 == 0 else "assistant"
            if role != expected:
                raise ValueError(f"message {i}: roles out of order, expected {expected!r} but got {role!r} "
                                 f"(user and assistant must alternate, starting with user)")
        if "content" not in msg:
            raise ValueError(f"message {i} ({role}): missing 'content'")
        content = msg["content"]
        if role in ("system", "user") or isinstance(content, str):
            if not isinstance(content, str):
                raise ValueError(f"message {i} ({role}): content must be a string, got {type(content).__name__}")
            if not content:
                raise ValueError(f"message {i} ({role}): empty content")
            continue
        if not isinstance(content, list):
            raise ValueError(f"message {i} (assistant): content must be a string or a list of parts, "
                             f"got {type(content).__name__}")
        if not content:
            raise ValueError(f"message {i} (assistant): empty content (no parts)")
        for j, part in enumerate(content):
            ptype = part.get("type") if isinstance(part, dict) else None
            if ptype not in ("text", "python", "python_output"):
                raise ValueError(f"message {i} (assistant): part {j} has unknown type {ptype!r} "
                                 f"(expected 'text', 'python' or 'python_output')")
            if not isinstance(part.get("text"), str):
                raise ValueError(f"message {i} (assistant): part {j} ({ptype}) needs a string 'text'")
    return messages


class RustBPETokenizer:
    """A tiktoken.Encoding plus the nanochat conventions (BOS, chat specials, rendering)."""

    def __init__(self, enc, bos_token, mergeable_ranks=None, pattern=None):
        self.enc = enc
        # token string -> id (looked up on every render), through tiktoken's public API
        self.special_ids = {tok: enc.encode_single_token(tok) for tok in enc.special_tokens_set}
        self.bos_token_id = self.special_ids[bos_token]
        # tiktoken keeps what it was built from private: we keep our own copies for save() and the
        # checkpoint fingerprint (None for a pretrained encoding, which we never save)
        self.mergeable_ranks, self.pattern = mergeable_ranks, pattern

    @classmethod
    def train_from_iterator(cls, text_iterator, vocab_size):
        """Train BPE on an iterator of strings; vocab_size includes the 9 special tokens."""
        num_mergeable = vocab_size - len(SPECIAL_TOKENS)
        if num_mergeable < 256:
            raise ValueError(f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)} (256 bytes + "
                             f"{len(SPECIAL_TOKENS)} specials), got {vocab_size}")
        bpe = rustbpe.Tokenizer()
        # rustbpe splits and counts in parallel with rayon (all cores unless RAYON_NUM_THREADS is set)
        bpe.train_from_iterator(text_iterator, num_mergeable, pattern=SPLIT_PATTERN)
        ranks = {bytes(token): rank for token, rank in bpe.get_mergeable_ranks()}
        if len(ranks) != num_mergeable:
            # rustbpe stops early when no pair is left to merge; the model needs the exact vocab size
            raise ValueError(f"training text too small: learned {len(ranks)} mergeable tokens, "
                             f"need {num_mergeable} for vocab_size={vocab_size}; give more text or a smaller vocab")
        return cls._from_ranks(ranks, SPLIT_PATTERN)

    @classmethod
    def _from_ranks(cls, ranks, pattern, special_tokens=None):
        if special_tokens is None:
            special_tokens = {tok: len(ranks) + i for i, tok in enumerate(SPECIAL_TOKENS)}
        enc = tiktoken.Encoding(name="rustbpe", pat_str=pattern, mergeable_ranks=ranks,
                                special_tokens=special_tokens)
        return cls(enc, "<|bos|>", ranks, pattern)

    @classmethod
    def from_pretrained(cls, name, timeout=None):
        """Wrap a tiktoken encoding ("gpt2", "cl100k_base"); needs network on first use (or tiktoken's cache)."""
        if timeout is None:
            return cls(tiktoken.get_encoding(name), "<|endoftext|>")
        # tiktoken's download has no timeout of its own and can hang offline: fetch in a daemon thread
        # (a hung fetch then can't keep the process alive) and give up after `timeout` seconds
        result = {}

        def fetch():
            try:
                result["enc"] = tiktoken.get_encoding(name)
            except Exception as e:
                result["error"] = e

        thread = threading.Thread(target=fetch, daemon=True)
        thread.start()
        thread.join(timeout)
        if "error" in result:
            raise result["error"]
        if "enc" not in result:
            raise TimeoutError(f"fetching tiktoken encoding {name!r} took over {timeout}s (offline?)")
        return cls(result["enc"], "<|endoftext|>")

    @classmethod
    def from_directory(cls, tokenizer_dir):
        """Load a tokenizer written by save(). Only parses JSON and base64 text: never executes code.
        A truncated, corrupt or inconsistent file raises CheckpointError naming it."""
        config_path = os.path.join(tokenizer_dir, CONFIG_FILE)
        ranks_path = os.path.join(tokenizer_dir, RANKS_FILE)
        for path in (config_path, ranks_path):
            if not os.path.exists(path):
                raise MissingFileError(f"tokenizer file {path} not found; run python -m scripts.tok_train first")
        fix = (f"the tokenizer files are damaged: retrain the tokenizer with python -m scripts.tok_train (then "
               f"retrain the models that use it), or restore {tokenizer_dir} from a copy")

        def bad(path, what):
            return CheckpointError(f"{path}: {what}; {fix}")

        config = load_json_file(config_path, fix)
        if config.get("format") != FORMAT:
            raise bad(config_path, f"unknown format {config.get('format')!r}, expected {FORMAT!r}")
        specials = config.get("special_tokens")
        if not isinstance(config.get("pattern"), str) or not isinstance(specials, dict) \
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in specials.values()):
            raise bad(config_path, "needs a string 'pattern' and a 'special_tokens' object of integer ids")
        ranks = {}
        with open_regular(ranks_path, fix, MAX_RANKS_BYTES, "tokenizer ranks file") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    token_b64, rank = line.split()
                    token = base64.b64decode(token_b64, validate=True)
                    ranks[token] = int(rank)
                except ValueError as e:  # binascii.Error is a ValueError too
                    raise bad(f"{ranks_path}:{lineno}", f"expected '<base64> <rank>' ({e})") from None
                if not token:
                    raise bad(f"{ranks_path}:{lineno}", "empty token")
        if sorted(ranks.values()) != list(range(len(ranks))):
            raise bad(ranks_path, f"ranks must be unique and cover 0..{len(ranks) - 1}")
        if any(bytes([b]) not in ranks for b in range(256)):
            raise bad(ranks_path, "every single byte must be a token (the file is truncated or edited)")
        expected = {tok: len(ranks) + i for i, tok in enumerate(SPECIAL_TOKENS)}
        if specials != expected:
            # e.g. a ranks file cut at a line boundary: the specials no longer follow the last rank
            raise bad(config_path, f"the special tokens do not follow the {len(ranks)} ranks of {RANKS_FILE} "
                                   f"(expected the {len(SPECIAL_TOKENS)} chat specials with ids "
                                   f"{len(ranks)}..{len(ranks) + len(SPECIAL_TOKENS) - 1})")
        try:
            return cls._from_ranks(ranks, config["pattern"], specials)
        except ValueError as e:  # an edited split pattern that does not compile
            raise bad(config_path, f"cannot build the encoding ({e})") from None

    def save(self, tokenizer_dir):
        if self.mergeable_ranks is None:
            raise ValueError("only a tokenizer trained here (or loaded from a directory) can be saved")
        os.makedirs(tokenizer_dir, exist_ok=True)
        with open(os.path.join(tokenizer_dir, RANKS_FILE), "w", encoding="ascii") as f:
            for token, rank in sorted(self.mergeable_ranks.items(), key=lambda kv: kv[1]):
                f.write(f"{base64.b64encode(token).decode('ascii')} {rank}\n")
        config = {"format": FORMAT, "name": self.enc.name, "pattern": self.pattern,
                  "special_tokens": self.special_ids}
        with open(os.path.join(tokenizer_dir, CONFIG_FILE), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, ensure_ascii=False)
        print(f"Saved tokenizer to {tokenizer_dir}")

    def get_vocab_size(self):
        return self.enc.n_vocab

    def get_bos_token_id(self):
        return self.bos_token_id

    def get_special_tokens(self):
        return self.enc.special_tokens_set

    def encode_special(self, text):
        if text not in self.special_ids:
            raise ValueError(f"{text!r} is not a special token of this tokenizer")
        return self.special_ids[text]

    def id_to_token(self, id):
        return self.enc.decode([id])

    def _to_id(self, token):
        return self.encode_special(token) if isinstance(token, str) else int(token)

    def encode(self, text, prepend=None, append=None, num_threads=8):
        """Special-token strings in the text stay plain text. A list of str is encoded in parallel threads
        (tiktoken releases the GIL). prepend/append: a special token string or an id."""
        head = [] if prepend is None else [self._to_id(prepend)]
        tail = [] if append is None else [self._to_id(append)]
        if isinstance(text, str):
            return head + self.enc.encode_ordinary(text) + tail
        if isinstance(text, list):
            rows = self.enc.encode_ordinary_batch(text, num_threads=num_threads)
            return [head + row + tail for row in rows]
        raise TypeError(f"encode expects a str or a list of str, got {type(text).__name__}")

    def __call__(self, *args, **kwargs):
        return self.encode(*args, **kwargs)

    def decode(self, ids):
        return self.enc.decode(ids)

    def render_conversation(self, conversation, max_tokens=2048):
        """Chat conversation -> (ids, mask); mask 1 on tokens the model learns (assistant content, tool calls,
        <|assistant_end|>), 0 on prompts and tool output."""
        messages = validate_conversation(conversation)
        if messages[0]["role"] == "system":
            # the system prompt is folded into the first user turn (there is no system token)
            merged = messages[0]["content"] + "\n\n" + messages[1]["content"]
            messages = [{**messages[1], "content": merged}, *messages[2:]]

        ids, mask = [], []

        def add(tokens, m):
            tokens = [tokens] if isinstance(tokens, int) else tokens
            ids.extend(tokens)
            mask.extend([m] * len(tokens))

        sp = self.special_ids
        add(sp["<|bos|>"], 0)
        for msg in messages:
            content = msg["content"]
            if msg["role"] == "user":
                add(sp["<|user_start|>"], 0)
                add(self.encode(content), 0)
                add(sp["<|user_end|>"], 0)
                continue
            add(sp["<|assistant_start|>"], 0)
            if isinstance(content, str):
                add(self.encode(content), 1)
            else:
                # each part is encoded on its own, so token boundaries fall on part boundaries
                for part in content:
                    part_ids = self.encode(part["text"])
                    if part["type"] == "text":
                        add(part_ids, 1)
                    elif part["type"] == "python":
                        add(sp["<|python_start|>"], 1)
                        add(part_ids, 1)
                        add(sp["<|python_end|>"], 1)
                    else:  # python_output: written by the runtime at inference, never a target
                        add(sp["<|output_start|>"], 0)
                        add(part_ids, 0)
                        add(sp["<|output_end|>"], 0)
            add(sp["<|assistant_end|>"], 1)
        return ids[:max_tokens], mask[:max_tokens]

    def render_for_completion(self, conversation):
        """Prompt ids for sampling the final assistant reply: render all but it, then <|assistant_start|>."""
        messages = conversation.get("messages") if isinstance(conversation, dict) else None
        if not messages or not isinstance(messages[-1], dict) or messages[-1].get("role") != "assistant":
            raise ValueError("render_for_completion: the last message must be an assistant message (it is replaced "
                             "by the model's completion)")
        ids, _ = self.render_conversation({**conversation, "messages": messages[:-1]})
        return ids + [self.encode_special("<|assistant_start|>")]

    def visualize_tokenization(self, ids, mask, color=True):
        """One string of tokens separated by '|': supervised (mask 1) green, others grey; specials bold.
        With color=False, supervised tokens are wrapped in [[...]] instead."""
        GREEN, GREY, BOLD, RESET = "\033[92m", "\033[90m", "\033[1m", "\033[0m"
        specials = set(self.special_ids.values())
        out = []
        for token_id, m in zip(ids, mask):
            text = self.id_to_token(token_id).replace("\n", "\\n")
            if not color:
                out.append(f"[[{text}]]" if m else text)
                continue
            style = (GREEN if m else GREY) + (BOLD if token_id in specials else "")
            out.append(f"{style}{text}{RESET}")
        return "|".join(out)


def get_tokenizer_dir():
    return os.path.join(get_base_dir(), "tokenizer")


def get_tokenizer():
    """The trained tokenizer in $NANOCHAT_BASE_DIR/tokenizer."""
    tokenizer_dir = get_tokenizer_dir()
    if not os.path.exists(os.path.join(tokenizer_dir, CONFIG_FILE)):
        raise MissingFileError(f"no tokenizer in {tokenizer_dir}; run python -m scripts.tok_train first "
                                f"(or set NANOCHAT_BASE_DIR to the directory that holds tokenizer/)")
    return RustBPETokenizer.from_directory(tokenizer_dir)


def compute_token_bytes(tokenizer):
    """(V,) int32: raw byte length of each token, 0 for specials (they count no bytes in bits-per-byte)."""
    enc = tokenizer.enc
    specials = set(tokenizer.special_ids.values())
    lengths = [0 if i in specials else len(enc.decode_single_token_bytes(i)) for i in range(enc.n_vocab)]
    return torch.tensor(lengths, dtype=torch.int32)


def get_token_bytes(device="cpu"):
    """token_bytes.pt of the tokenizer in $NANOCHAT_BASE_DIR/tokenizer, checked against its vocabulary size."""
    path = os.path.join(get_tokenizer_dir(), "token_bytes.pt")
    if not os.path.exists(path):
        raise MissingFileError(f"{path} not found; run python -m scripts.tok_train first")
    fix = "rebuild it with python -m scripts.tok_train (or restore it from a copy)"
    token_bytes = load_tensor_file(path, device, fix, expect=torch.Tensor, max_bytes=MAX_TOKEN_BYTES_FILE)
    if token_bytes.dim() != 1 or token_bytes.is_floating_point() or token_bytes.is_complex() \
            or token_bytes.dtype == torch.bool or (token_bytes.numel() and int(token_bytes.min()) < 0):
        raise CheckpointError(f"{path} is not a 1-D integer tensor of non-negative token byte lengths; {fix}")
    config_path = os.path.join(get_tokenizer_dir(), CONFIG_FILE)
    if os.path.exists(config_path):  # one entry per token: the specials follow the mergeable tokens
        specials = load_json_file(config_path, fix).get("special_tokens")
        vocab = max(specials.values()) + 1 if isinstance(specials, dict) and specials and \
            all(isinstance(v, int) for v in specials.values()) else None
        if vocab is not None and token_bytes.numel() != vocab:
            raise CheckpointError(f"{path} has {token_bytes.numel()} entries but the tokenizer has {vocab} tokens; "
                                  f"{fix}")
    return token_bytes
