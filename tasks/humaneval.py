"""HumanEval (openai/openai_humaneval), 164 Python problems run in the sandbox."""

import re

from tasks.common import HubTask, require

CODE_BLOCK_RE = re.compile(r"```(?:python)?\s*\n(.*?)\n```", re.DOTALL)


def _parse(row):
    for key in ("prompt", "canonical_solution", "test", "entry_point"):
        require(isinstance(row[key], str), f"{key} must be a string")
    return row


def extract_imports(prompt):
    """The prompt's leading import lines (the completion may not repeat them)."""
    imports = []
    for line in prompt.split("\n"):
        s = line.strip()
        if s.startswith("import ") or s.startswith("from "):
            imports.append(s)
        elif s and not s.startswith("#"):
            break
    return "\n".join(imports)


def extract_program(completion):
    """The first fenced code block, else the whole completion."""
    m = CODE_BLOCK_RE.search(completion)
    return (m.group(1) if m else completion).strip()


class HumanEval(HubTask):
    eval_type = "generative"

    def __init__(self, **kwargs):
        super().__init__("openai/openai_humaneval", "openai_humaneval", "test", parse=_parse, **kwargs)

    def get_example(self, index):
        row = self.row(index)
        messages = [{"role": "user", "content": row["prompt"]},
                    {"role": "assistant", "content": row["prompt"] + "\n" + row["canonical_solution"]}]
        return {"messages": messages, "entry_point": row["entry_point"], "test": row["test"]}

    def evaluate(self, conversation, response):
        from nanochat.execution import execute_code  # imported late: only evaluation needs the sandbox
        imports = extract_imports(conversation["messages"][0]["content"])
        program = (imports + "\n\n" + extract_program(response) + "\n\n" + conversation["test"] + "\n"
                   + f"check({conversation['entry_point']})")
        return int(execute_code(program).success)
