"""GSM8K (openai/gsm8k), grade-school math with calculator tool calls."""

import re

from tasks.common import HubTask, require

ANSWER_RE = re.compile(r"#### (\-?[0-9\.\,]+)")
TOOL_RE = re.compile(r"(<<[^>]+>>)")


def extract_answer(text):
    """The number after '#### ' with commas removed, or None."""
    m = ANSWER_RE.search(text)
    return m.group(1).strip().replace(",", "") if m else None


def answer_to_parts(answer):
    """Each <<expr=result>> becomes a python part and a python_output part; everything else is text."""
    parts = []
    for piece in TOOL_RE.split(answer):
        if piece.startswith("<<") and piece.endswith(">>"):
            inner = piece[2:-2]
            expr, _, result = inner.rpartition("=")
            if not _:  # no '=': the whole annotation is the expression
                expr, result = inner, ""
            parts.append({"type": "python", "text": expr})
            parts.append({"type": "python_output", "text": result})
        else:
            parts.append({"type": "text", "text": piece})
    return parts


def _parse(row):
    require(isinstance(row["question"], str), "question must be a string")
    require(isinstance(row["answer"], str) and extract_answer(row["answer"]) is not None,
            "answer must be a string ending in '#### <number>'")
    return row


class GSM8K(HubTask):
    eval_type = "generative"

    def __init__(self, subset="main", split="train", **kwargs):
        if subset not in ("main", "socratic") or split not in ("train", "test"):
            raise ValueError(f"GSM8K takes subset main|socratic and split train|test, got {subset!r}/{split!r}")
        super().__init__("openai/gsm8k", subset, split, parse=_parse, **kwargs)

    def get_example(self, index):
        row = self.row(index)
        return {"messages": [
            {"role": "user", "content": row["question"]},
            {"role": "assistant", "content": answer_to_parts(row["answer"])},
        ]}

    def evaluate(self, conversation, response):
        reference = conversation["messages"][-1]["content"][-1]["text"]
        return int(extract_answer(response) == extract_answer(reference))
