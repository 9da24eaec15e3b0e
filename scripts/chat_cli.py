"""
Talk to a chat model in the terminal. Replies stream token by token; calculator calls
show up as `[calc: 12*3] = 36`.

Launch:
    python -m scripts.chat_cli                        # multi-turn chat with the sft model
    python -m scripts.chat_cli -i mid -t 0.8 -k 20
    python -m scripts.chat_cli -p "Why is the sky blue?"   # answer one prompt and exit

Commands: `quit` / `exit` end the chat, `clear` starts a new conversation; Ctrl-D or Ctrl-C exit.
"""

import functools
import random
import argparse

parser = argparse.ArgumentParser(description="Chat with the model in the terminal")
parser.add_argument("-i", "--source", type=str, default="sft", help="checkpoint source: base|mid|sft|rl, or hf:DIR (an exported model)")
parser.add_argument("-g", "--model-tag", type=str, default=None, help="model tag to load (default: largest)")
parser.add_argument("-s", "--step", type=int, default=None, help="checkpoint step (default: last)")
parser.add_argument("-p", "--prompt", type=str, default="", help="answer this one prompt and exit")
parser.add_argument("-t", "--temperature", type=float, default=0.6, help="sampling temperature (0 = greedy)")
parser.add_argument("-k", "--top-k", type=int, default=50, help="top-k filter (0 = none)")
parser.add_argument("-m", "--max-tokens", type=int, default=256, help="max tokens per reply")
parser.add_argument("--seed", type=int, default=None, help="sampling seed of the first reply (default: random)")
parser.add_argument("--device-type", type=str, default="", help="cuda|cpu|mps (default: autodetect)")
parser.add_argument("-d", "--dtype", type=str, default="", help="bfloat16|float16|float32 (default: project policy)")

# Tool-use tokens made readable: <|python_start|>12*3<|python_end|><|output_start|>36<|output_end|> -> [calc: 12*3] = 36
TOOL_TEXT = {"<|python_start|>": "[calc: ", "<|python_end|>": "]", "<|output_start|>": " = ", "<|output_end|>": ""}


class ReplyPrinter:
    """Prints tokens as they arrive, never splitting a UTF-8 character, with tool tokens made readable."""

    def __init__(self, tokenizer, write):
        self.tokenizer, self.write = tokenizer, write
        self.tool_text = {tokenizer.encode_special(s): text for s, text in TOOL_TEXT.items()}
        self.pending, self.shown = [], ""  # ordinary tokens since the last tool token, and their text shown

    def add(self, token):
        if token in self.tool_text:
            self.flush()
            self.write(self.tool_text[token])
            return
        self.pending.append(token)
        text = self.tokenizer.decode(self.pending)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            self._show(text)

    def flush(self):
        self._show(self.tokenizer.decode(self.pending))
        self.pending, self.shown = [], ""

    def _show(self, text):
        if len(text) > len(self.shown):
            self.write(text[len(self.shown):])
            self.shown = text


def reply_parts(tokenizer, tokens):
    """A generated reply as assistant content parts, split at the tool tokens, so that the next turn's prompt
    renders it with its tool calls (<|python_start|>12*3<|python_end|><|output_start|>36<|output_end|>) intact."""
    kinds = {tokenizer.encode_special("<|python_start|>"): "python", tokenizer.encode_special("<|output_start|>"):
             "python_output", tokenizer.encode_special("<|python_end|>"): "text",
             tokenizer.encode_special("<|output_end|>"): "text"}
    parts, kind, run = [], "text", []
    for token in tokens + [None]:
        if token is None or token in kinds:
            if run or kind != "text":
                parts.append({"type": kind, "text": tokenizer.decode(run)})
            kind, run = kinds.get(token, "text"), []
        else:
            run.append(token)
    return parts or [{"type": "text", "text": ""}]  # an empty reply still takes its turn


def chat_loop(engine, tokenizer, read=input, write=None, prompt="", temperature=0.6, top_k=50, max_tokens=256,
              seed=None, context_len=None):
    """
    The conversation: a list of messages, rendered into the prompt by the tokenizer each turn. Each reply
    streams through `write` (default: stdout). `read(prompt_text)` returns the next user line (EOFError or
    KeyboardInterrupt end the chat). With `prompt`, answer it alone and return. Returns the messages.
    """
    write = write or functools.partial(print, end="", flush=True)
    stops = {tokenizer.encode_special("<|assistant_end|>"), tokenizer.get_bos_token_id()}
    rng = random.Random(seed)
    messages = []
    if not prompt:
        write("nanochat: type a message; 'clear' starts over, 'quit' or Ctrl-D exits\n")
    while True:
        try:
            text = prompt if prompt else read("\nUser: ")
        except (EOFError, KeyboardInterrupt):
            write("\n")
            return messages
        text = text.strip()
        command = text.lower()
        if command in ("quit", "exit"):
            return messages
        if command == "clear":
            messages = []
            write("(new conversation)\n")
            continue
        if not text:
            continue
        turn = messages + [{"role": "user", "content": text}]
        tokens = tokenizer.render_for_completion({"messages": turn + [{"role": "assistant", "content": ""}]})
        budget = max_tokens if context_len is None else min(max_tokens, context_len - len(tokens))
        if budget <= 0:
            write("(the conversation fills the model's context: type 'clear' to start over)\n")
            if prompt:
                return messages
            continue
        if not prompt:
            write("\nAssistant: ")
        printer = ReplyPrinter(tokenizer, write)
        reply = []
        try:
            for column, _ in engine.generate(tokens, num_samples=1, max_tokens=budget, temperature=temperature,
                                             top_k=top_k or None, seed=rng.randrange(2**31)):
                if column[0] in stops:
                    break
                reply.append(column[0])
                printer.add(column[0])
        except KeyboardInterrupt:
            return messages
        finally:
            printer.flush()
            write("\n")
        messages = turn + [{"role": "assistant", "content": reply_parts(tokenizer, reply)}]
        if prompt:
            return messages


def main():
    from nanochat.files import install_error_handler
    args = parser.parse_args()
    install_error_handler()
    if args.temperature < 0:
        raise SystemExit(f"--temperature must be >= 0, got {args.temperature}")
    if args.max_tokens < 1:
        raise SystemExit(f"--max-tokens must be >= 1, got {args.max_tokens}")
    import torch
    from nanochat.common import autodetect_device_type, resolve_precision
    from nanochat.model_loader import load_model
    from nanochat.engine import Engine
    device = torch.device(args.device_type or autodetect_device_type())
    dtype, _, _ = resolve_precision(device.type, args.dtype or None, training=False, verbose=False)
    model, tokenizer, _ = load_model(args.source, device, phase="eval", model_tag=args.model_tag, step=args.step,
                                     dtype=dtype)
    engine = Engine(model, tokenizer)
    chat_loop(engine, tokenizer, prompt=args.prompt, temperature=args.temperature, top_k=args.top_k,
              max_tokens=args.max_tokens, seed=args.seed, context_len=model.config.sequence_len)


if __name__ == "__main__":
    main()
