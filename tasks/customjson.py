"""
CustomJSON: conversations from a local JSONL file.
Each line is a JSON list of messages, or an object {"messages": [...]}; blank lines are skipped.
"""

import os

from nanochat.common import get_base_dir, get_data_dir
from nanochat.files import MissingFileError
from tasks.common import Task, read_jsonl, parse_chat_row

IDENTITY_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/identity_conversations.jsonl"
LINE_FORMAT = 'one conversation per line: a JSON list of {"role", "content"} messages, or {"messages": [...]}'


def identity_conversations_path():
    """$NANOCHAT_DATA_DIR/identity_conversations.jsonl when the mirror is set, else $BASE/identity_conversations.jsonl."""
    return os.path.join(get_data_dir() or get_base_dir(), "identity_conversations.jsonl")


def parse_conversation(obj):
    if isinstance(obj, dict) and "messages" not in obj:
        raise ValueError('an object row needs a "messages" key')
    return parse_chat_row(obj["messages"] if isinstance(obj, dict) else obj)


class CustomJSON(Task):

    def __init__(self, filepath, **kwargs):
        super().__init__(**kwargs)
        if not os.path.exists(filepath):
            hint = f"create it ({LINE_FORMAT})"
            if os.path.basename(filepath) == "identity_conversations.jsonl":
                hint = (f"download it with `curl -L -o {filepath} {IDENTITY_URL}`, or set NANOCHAT_DATA_DIR "
                        "to a mirror that has it")
            raise MissingFileError(f"conversation file {filepath} not found: {hint}")
        self.filepath = filepath
        self.conversations = read_jsonl(filepath, parse_conversation)

    def num_examples(self):
        return len(self.conversations)

    def get_example(self, index):
        return {"messages": self.conversations[index]}
