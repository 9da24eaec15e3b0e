"""
Shared pieces of every task: the Task view with logical slicing, TaskMixture and TaskSequence, the
multiple-choice renderer, and row loading from the Hugging Face Hub or the offline mirror
($NANOCHAT_DATA_DIR/hub/<repo_id>/<config>/<split>.jsonl: one Hub row per line).
"""

import os
import random

import numpy as np

from nanochat.common import get_data_dir
from nanochat.files import MissingFileError, read_jsonl  # noqa: F401  (read_jsonl: tasks' row reader)
from nanochat.tokenizer import validate_conversation


class Task:
    """A view over a dataset: `task[i]` is example `start + i*step`. Subclasses implement num_examples(),
    get_example(physical_index) and, where they apply, eval_type, evaluate() and reward()."""

    def __init__(self, start=0, stop=None, step=1):
        if start < 0 or (stop is not None and stop < start) or step < 1:
            raise ValueError(f"bad task slice start={start} stop={stop} step={step} "
                             "(need start >= 0, stop >= start, step >= 1)")
        self.start, self.stop, self.step = start, stop, step

    @property
    def eval_type(self):
        raise NotImplementedError(f"{type(self).__name__} is a training-only task (no eval_type)")

    def num_examples(self):
        raise NotImplementedError

    def get_example(self, index):
        raise NotImplementedError

    def evaluate(self, conversation, response):
        raise NotImplementedError(f"{type(self).__name__} has no evaluate()")

    def reward(self, conversation, response):
        return float(self.evaluate(conversation, response))

    def __len__(self):
        # a stop past the end is clamped, so "--cap smoltalk=10000" works on a 3K-row stand-in
        n = self.num_examples()
        stop = n if self.stop is None else min(self.stop, n)
        return max(0, -(-(stop - self.start) // self.step))  # ceil division

    def __getitem__(self, index):
        if not isinstance(index, (int, np.integer)):
            raise TypeError(f"{type(self).__name__} indices must be ints, got {type(index).__name__}")
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {type(self).__name__} of length {len(self)}")
        return self.get_example(self.start + int(index) * self.step)


class TaskMixture(Task):
    """All (task, local index) pairs, shuffled once with random.Random(42). Listing a task twice oversamples it."""

    def __init__(self, tasks, **kwargs):
        super().__init__(**kwargs)
        self.tasks = list(tasks)
        lengths = [len(t) for t in self.tasks]
        # shuffling the flat positions gives the same permutation as shuffling the list of pairs
        # (random.shuffle only depends on the length), at a fraction of the memory
        order = list(range(sum(lengths)))
        random.Random(42).shuffle(order)
        task_of = np.repeat(np.arange(len(lengths), dtype=np.int32), lengths)  # (N,)
        offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        order = np.asarray(order, dtype=np.int64)
        self._task_idx = task_of[order]
        self._local_idx = order - offsets[self._task_idx]

    def num_examples(self):
        return len(self._task_idx)

    def get_example(self, index):
        return self.tasks[int(self._task_idx[index])][int(self._local_idx[index])]


class TaskSequence(Task):
    """Plain concatenation in order (a curriculum)."""

    def __init__(self, tasks, **kwargs):
        super().__init__(**kwargs)
        self.tasks = list(tasks)

    def num_examples(self):
        return sum(len(t) for t in self.tasks)

    def get_example(self, index):
        for t in self.tasks:
            if index < len(t):
                return t[index]
            index -= len(t)
        raise IndexError(index)

# -----------------------------------------------------------------------------
# Rendering and validation helpers

def render_mc(question, letters, choices):
    """The multiple-choice user message. The letter follows its choice (small models bind them better that
    way) with no space after '=', so it is the same token ("A", not " A") as the one-letter answer."""
    options = "".join(f"- {choice}={letter}\n" for letter, choice in zip(letters, choices))
    return f"Multiple Choice question: {question}\n{options}\nRespond only with the letter of the correct answer."


def mc_conversation(question, letters, choices, answer_letter, **extra):
    messages = [{"role": "user", "content": render_mc(question, letters, choices)},
                {"role": "assistant", "content": answer_letter}]
    return {"messages": messages, "letters": list(letters), **extra}


def evaluate_letter(conversation, letter):
    """Categorical evaluation shared by ARC and MMLU: 1 iff the chosen letter is the reference letter."""
    if letter not in conversation["letters"]:
        raise ValueError(f"answer {letter!r} is not one of the choices {conversation['letters']}")
    return int(letter == conversation["messages"][-1]["content"])


def parse_chat_row(messages):
    """A training conversation: what validate_conversation accepts (checked at load, so a bad row fails with its
    file:line, not mid-training), with at least one assistant reply to learn from."""
    validate_conversation({"messages": messages})
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("a training conversation needs at least one assistant reply")
    return messages

# -----------------------------------------------------------------------------
# Row loading

def _msg(e):
    return f"missing field {e}" if isinstance(e, KeyError) else str(e)


class _LazyRows:
    """A Hugging Face Dataset whose rows are validated as they are read (validating 460K rows upfront is slow)."""

    def __init__(self, ds, where, parse):
        self.ds, self.where, self.parse = ds, where, parse

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        row = self.ds[int(i)]
        if self.parse is None:
            return row
        try:
            return self.parse(row)
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{self.where} row {i}: malformed row: {_msg(e)}") from None


def hub_path(repo_id, config, split):
    """Where the offline mirror keeps a Hub split."""
    return os.path.join(get_data_dir(), "hub", repo_id, config or "default", f"{split}.jsonl")


def load_hub_rows(repo_id, config, split, parse=None):
    """Rows (len() and int indexing) of a Hub split: the mirror's hub_path() when NANOCHAT_DATA_DIR is set, else
    `datasets.load_dataset(repo_id, config, split=split)`. `parse` as in read_jsonl."""
    if get_data_dir():
        path = hub_path(repo_id, config, split)
        if not os.path.exists(path):
            raise MissingFileError(
                f"{path} not found: the offline mirror (NANOCHAT_DATA_DIR) has no {repo_id} {config}/{split}. "
                f"Write the Hub rows there as JSONL (one row per line), or unset NANOCHAT_DATA_DIR to download "
                f"{repo_id} from Hugging Face.")
        return read_jsonl(path, parse)
    import datasets
    try:
        ds = datasets.load_dataset(repo_id, config, split=split)
    except Exception as e:
        raise RuntimeError(
            f"could not load {repo_id} ({config}, split {split}) from Hugging Face: {type(e).__name__}: {e}. "
            "Check the network, or set NANOCHAT_DATA_DIR to an offline mirror "
            "(hub/<repo_id>/<config>/<split>.jsonl).") from e
    return _LazyRows(ds, f"{repo_id}/{config}/{split}", parse)


def shuffled_order(n, seed=42):
    """The order datasets.Dataset.shuffle(seed=42) produces, so offline rows match the Hub's."""
    return np.random.default_rng(seed).permutation(n)


class HubTask(Task):
    """A task over one Hub split, shuffled with seed 42 at construction."""

    def __init__(self, repo_id, config, split, parse=None, **kwargs):
        super().__init__(**kwargs)
        self.rows = load_hub_rows(repo_id, config, split, parse)
        self.order = shuffled_order(len(self.rows))

    def num_examples(self):
        return len(self.rows)

    def row(self, index):
        return self.rows[int(self.order[index])]


def require(cond, msg):
    """Row validation shorthand: raise ValueError(msg) unless cond."""
    if not cond:
        raise ValueError(msg)
