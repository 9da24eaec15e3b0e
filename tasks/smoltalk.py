"""
SmolTalk (HuggingFaceTB/smol-smoltalk), general multi-turn chat, training/val loss only.
With NANOCHAT_DATA_DIR set and no hub copy of smol-smoltalk there, the mirror's chat stand-in
$NANOCHAT_DATA_DIR/chat/{train,test}.jsonl (same {"messages": [...]} rows) is used instead.
"""

import os

from nanochat.common import get_data_dir, print0
from tasks.common import HubTask, Task, read_jsonl, shuffled_order, hub_path, parse_chat_row

REPO_ID = "HuggingFaceTB/smol-smoltalk"


def _parse(row):
    parse_chat_row(row["messages"])
    return row


class SmolTalk(HubTask):

    def __init__(self, split="train", **kwargs):
        if split not in ("train", "test"):
            raise ValueError(f"SmolTalk split must be train or test, got {split!r}")
        data_dir = get_data_dir()
        standin = data_dir and os.path.join(data_dir, "chat", f"{split}.jsonl")
        if data_dir and not os.path.exists(hub_path(REPO_ID, None, split)) and os.path.exists(standin):
            print0(f"SmolTalk: no {REPO_ID} in NANOCHAT_DATA_DIR, using the chat stand-in {standin}")
            Task.__init__(self, **kwargs)
            self.rows = read_jsonl(standin, _parse)
            self.order = shuffled_order(len(self.rows))
        else:
            super().__init__(REPO_ID, None, split, parse=_parse, **kwargs)

    def get_example(self, index):
        return {"messages": self.row(index)["messages"]}
