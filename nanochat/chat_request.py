"""
The chat server's input: an HTTP body becomes a checked ChatRequest, or a RequestError (a 4xx with one line
saying what is wrong). Every step costs time linear in the body, with small constants, so no body up to
MAX_BODY_BYTES can stall the server:

    body bytes --UTF-8 only--> text --one-pass scan: nesting depth, element count--> json.loads --> limits

The scan runs before json.loads, whose C parser recurses once per nesting level and builds a Python object per
element: both are bounded first (MAX_JSON_DEPTH, MAX_JSON_ELEMENTS), so parsing a body is as cheap as copying it.
"""

import json
from dataclasses import dataclass

import numpy as np

# Input limits: every request is checked against them and answered 4xx when outside.
MAX_BODY_BYTES = 1 << 20  # 413 above: the longest valid conversation (32k characters) fits many times over
MAX_JSON_DEPTH = 32  # a valid request nests 5 deep
MAX_JSON_ELEMENTS = 20_000  # brackets, commas and colons outside strings; MAX_MESSAGES messages need ~3500
MAX_MESSAGES = 500
MAX_MESSAGE_CHARS = 8000
MAX_TOTAL_CHARS = 32000
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.0, 2.0
MIN_TOP_K, MAX_TOP_K = 0, 200
MIN_MAX_TOKENS, MAX_MAX_TOKENS = 1, 4096
# OpenAI parameters that would change the reply but are not implemented: refused rather than ignored
UNSUPPORTED = ("stop", "logprobs", "top_logprobs", "tools", "tool_choice", "functions", "function_call",
               "response_format", "logit_bias", "presence_penalty", "frequency_penalty")


def safe_text(text):
    """`text` with anything UTF-8 cannot encode (a lone surrogate a client sent) written as an escape."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


class RequestError(Exception):
    def __init__(self, message, param=None, status=400, headers=None):
        super().__init__(message)
        self.message, self.param, self.status, self.headers = safe_text(message), param, status, headers


@dataclass
class ChatRequest:
    messages: list      # [{"role", "content": str}], as the tokenizer's chat renderer takes them
    temperature: float
    top_k: int
    top_p: float
    max_tokens: int
    seed: int           # None: a fresh random seed
    stream: bool        # None when the request did not say

# -----------------------------------------------------------------------------
# JSON in linear time

# bytes.translate table for the scan: 1 opens, 2 closes, 3 separates, 4 is a quote, 0 is anything else
_KINDS = bytearray(256)
for _chars, _kind in ((b"[{", 1), (b"]}", 2), (b",:", 3), (b'"', 4)):
    for _c in _chars:
        _KINDS[_c] = _kind
_KINDS = bytes(_KINDS)
_DEPTH_STEP = np.array([0, 1, -1, 0, 0], dtype=np.int32)  # per kind


def json_shape(raw):
    """(deepest nesting, elements: brackets + commas + colons outside strings) of UTF-8 JSON `raw`, in a few
    vectorised passes. Inside a string a backslash takes the next character with it, so escape pairs are blanked
    left to right (`\\\\` first, then `\\"`) and every quote left opens or closes a string. A backslash outside a
    string is invalid JSON: json.loads stops there, and the scan is exact up to that point, so the depth it
    reports still bounds how deep json.loads can go. UTF-8 keeps ASCII bytes for ASCII characters only, so
    scanning the bytes is scanning the decoded text."""
    kinds = np.frombuffer(raw.replace(b"\\\\", b"__").replace(b'\\"', b"__").translate(_KINDS), dtype=np.uint8)
    kinds = kinds[np.flatnonzero(kinds)]  # (n_marks,): the interesting characters in order
    quote = kinds == 4
    outside = (np.cumsum(quote, dtype=np.int64) & 1) == 0  # an even number of quotes before it
    kinds = kinds[outside & ~quote]
    return int(np.cumsum(_DEPTH_STEP[kinds]).max(initial=0)), int(kinds.size)


def _reject_constant(name):
    raise ValueError(f"{name} is not valid JSON")


def parse_json(raw):
    """The request body as JSON, if it is UTF-8 JSON within the depth and element limits (else RequestError)."""
    encoding = json.detect_encoding(raw)  # what json.loads would guess from the first bytes
    if encoding != "utf-8":
        what = "starts with a byte order mark" if encoding == "utf-8-sig" else f"looks like {encoding.upper()}"
        raise RequestError(f"request body {what}; send JSON as UTF-8 without a byte order mark "
                           f"(RFC 8259: JSON exchanged between systems is UTF-8)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RequestError(f"request body is not valid UTF-8 (byte {raw[e.start]:#04x} at offset {e.start}); "
                           f"send JSON as UTF-8")
    depth, elements = json_shape(raw)
    if depth > MAX_JSON_DEPTH:
        raise RequestError(f"request body nests {depth} levels deep; the limit is {MAX_JSON_DEPTH}")
    if elements > MAX_JSON_ELEMENTS:
        raise RequestError(f"request body has {elements} JSON brackets, commas and colons; the limit is "
                           f"{MAX_JSON_ELEMENTS} (a chat request needs far fewer)")
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except RecursionError:  # cannot happen within MAX_JSON_DEPTH; kept so that no input can ever give a 500
        raise RequestError(f"request body nests deeper than {MAX_JSON_DEPTH} levels")
    except ValueError as e:
        raise RequestError(f"request body is not valid JSON: {e}")


async def read_body(request):
    """The body's bytes, refused (413) as soon as they pass MAX_BODY_BYTES, whatever Content-Length said."""
    from starlette.requests import ClientDisconnect
    declared = request.headers.get("content-length", "")
    too_big = RequestError(f"request body is larger than {MAX_BODY_BYTES} bytes", status=413)
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise too_big
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY_BYTES:
                raise too_big
    except ClientDisconnect:
        raise RequestError("the client disconnected while sending the request")
    return bytes(body)

# -----------------------------------------------------------------------------
# The chat request's fields


def _number(body, key, lo, hi, default, integer=False):
    value = body.get(key)
    if value is None:
        return default
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type:
        kind = "an integer" if integer else "a number"
        raise RequestError(f"'{key}' must be {kind}, got {json.dumps(value)[:40]}", key)
    if not lo <= value <= hi:
        raise RequestError(f"'{key}' must be between {lo} and {hi}, got {str(value)[:40]}", key)
    return value


def _content_text(content, i):
    """Message content as text: a string, or (OpenAI style) a list of {"type": "text", "text": ...} parts."""
    if isinstance(content, list):
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
            raise RequestError(f"messages[{i}].content: only text parts are supported", "messages")
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise RequestError(f"messages[{i}].content must be a string or a list of text parts", "messages")
    if not content:
        raise RequestError(f"messages[{i}].content is empty", "messages")
    if len(content) > MAX_MESSAGE_CHARS:
        raise RequestError(f"messages[{i}].content is {len(content)} characters; the limit is {MAX_MESSAGE_CHARS}",
                           "messages")
    try:
        content.encode("utf-8")
    except UnicodeEncodeError:
        raise RequestError(f"messages[{i}].content is not valid Unicode (an unpaired surrogate such as \\ud800); "
                           f"send surrogates in pairs", "messages")
    return content


def parse_chat_request(body, defaults, roles=("system", "user", "assistant")):
    """Check a request's HTTP shape (types, limits, allowed roles) and apply the defaults (an object with
    temperature, top_k, top_p and max_tokens). The conversation rules (alternation, where a system message may
    go) are the tokenizer's, checked when the prompt is rendered."""
    if not isinstance(body, dict):
        raise RequestError("request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list of {role, content} objects", "messages")
    if len(messages) > MAX_MESSAGES:
        raise RequestError(f"too many messages: {len(messages)}; the limit is {MAX_MESSAGES}", "messages")
    parsed, total = [], 0
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise RequestError(f"messages[{i}] must be an object with 'role' and 'content'", "messages")
        if msg.get("role") not in roles:
            raise RequestError(f"messages[{i}].role must be one of {', '.join(roles)}; got "
                               f"{json.dumps(msg.get('role'))[:40]}", "messages")
        parsed.append({"role": msg["role"], "content": _content_text(msg.get("content"), i)})
        total += len(parsed[-1]["content"])
    if total > MAX_TOTAL_CHARS:
        raise RequestError(f"conversation is {total} characters; the limit is {MAX_TOTAL_CHARS}", "messages")
    if parsed[-1]["role"] != "user":
        raise RequestError(f"messages[{len(parsed) - 1}]: the last message must be the user's (the reply is the "
                           f"assistant's turn)", "messages")
    for key in UNSUPPORTED:
        if body.get(key) not in (None, False, 0, "", [], {}):
            raise RequestError(f"'{key}' is not supported by this server; leave it out", key)
    n = body.get("n")
    if n is not None and (type(n) is not int or n != 1):
        raise RequestError(f"'n' must be 1 (one reply per request), got {json.dumps(n)[:40]}", "n")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise RequestError(f"'stream' must be true or false, got {json.dumps(stream)[:40]}", "stream")
    tokens_key = "max_tokens" if body.get("max_tokens") is not None else "max_completion_tokens"
    max_tokens = _number(body, tokens_key, MIN_MAX_TOKENS, MAX_MAX_TOKENS, defaults.max_tokens, integer=True)
    seed = _number(body, "seed", -2**63, 2**63 - 1, None, integer=True)
    return ChatRequest(parsed,
                       float(_number(body, "temperature", MIN_TEMPERATURE, MAX_TEMPERATURE, defaults.temperature)),
                       int(_number(body, "top_k", MIN_TOP_K, MAX_TOP_K, defaults.top_k, integer=True)),
                       float(_number(body, "top_p", 0.0, 1.0, defaults.top_p)),
                       max_tokens, None if seed is None else seed % 2**31, stream)


def parse_body(raw, defaults, roles):
    """A body's bytes -> ChatRequest (both steps linear in the body; run off the event loop when it is big)."""
    return parse_chat_request(parse_json(raw), defaults, roles)
