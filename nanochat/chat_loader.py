"""
Batches of conversations for the chat stages, walking the dataset strided by rank:

- MidPacker (mid_train): whole conversations packed best-fit into rows of T+1 tokens on a background
  thread, padded rather than split across rows; every token but the padding is a target.
- SFTBatcher (chat_sft): one conversation per row, padded per batch (to the longest row, or up to a multiple
  of pad_multiple so compiled attention sees only a few shapes); only the tokens the mask marks (assistant
  replies) are targets.

Both have a small JSON-able state_dict(): a resumed run re-renders conversations from their indices and
sees exactly the batches an uninterrupted one would.
"""

import queue
import threading
import weakref

import torch

from nanochat.dataloader import put_unless_stopped, start_producer


def _world(rank, world_size):
    """The given rank and world size, else the process group's, else (0, 1)."""
    import torch.distributed as dist
    r, w = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
    return r if rank is None else rank, w if world_size is None else world_size


class _MidPacking:
    """The packing itself (runs on MidPacker's producer thread): whole conversations, best fit, padded rows."""

    def __init__(self, dataset, tokenizer, B, T, buffer_size, rank, world_size, state):
        self.dataset, self.tokenizer, self.B, self.T = dataset, tokenizer, B, T
        self.buffer_size, self.world_size = buffer_size, world_size
        self.bos = tokenizer.get_bos_token_id()
        # cursor: next dataset index to read (before the modulo); consumed: conversations used, counted
        # from `rank` in steps of the world size, so every rank's progress reads on the same scale
        st = state or {"cursor": rank, "consumed": rank, "buffer": [], "truncated": 0, "rows": 0}
        self.cursor, self.consumed, self.truncated = st["cursor"], st["consumed"], st["truncated"]
        self.rows = st["rows"]
        self.buffer = [(i, self._render(i)[0]) for i in st["buffer"]]

    def _render(self, index):
        """(first T+1 ids, whether the conversation was longer than a row). Rendered without the
        renderer's own 2048 cut so the count of truncated conversations is exact for any T."""
        conv = self.dataset[index % len(self.dataset)]
        ids, _ = self.tokenizer.render_conversation(conv, max_tokens=1 << 62)
        # a conversation longer than a whole row keeps its start (it would never fit otherwise)
        return ids[:self.T + 1], len(ids) > self.T + 1

    def _refill(self):
        while len(self.buffer) < self.buffer_size:
            ids, cut = self._render(self.cursor)
            self.truncated += cut
            self.buffer.append((self.cursor, ids))
            self.cursor += self.world_size

    def state_dict(self):
        return {"cursor": self.cursor, "consumed": self.consumed, "buffer": [i for i, _ in self.buffer],
                "truncated": self.truncated, "rows": self.rows}

    def next_batch(self):
        T = self.T
        rows = torch.full((self.B, T + 1), self.bos, dtype=torch.long)
        targets_mask = torch.ones((self.B, T), dtype=torch.bool)
        for b in range(self.B):
            self._refill()
            pos = 0
            while pos < T + 1:
                fits = [j for j, (_, ids) in enumerate(self.buffer) if len(ids) <= T + 1 - pos]
                if not fits:
                    break
                best = max(fits, key=lambda j: len(self.buffer[j][1]))  # the largest that fits (first on ties)
                _, ids = self.buffer.pop(best)
                rows[b, pos:pos + len(ids)] = torch.tensor(ids, dtype=torch.long)
                pos += len(ids)
                self.consumed += self.world_size
                self._refill()
            if pos < T + 1:  # padded tail: the prediction of the first pad and all after it are ignored
                targets_mask[b, max(pos - 1, 0):] = False
        self.rows += self.B
        inputs = rows[:, :-1]
        targets = rows[:, 1:].clone()
        targets[~targets_mask] = -1
        return inputs, targets


def _produce_mid(packing, q, stop, pin):
    """Producer thread: pack batches ahead of the trainer, each with the state right after it."""
    try:
        while not stop.is_set():
            inputs, targets = packing.next_batch()
            if pin:
                inputs, targets = inputs.pin_memory(), targets.pin_memory()
            put_unless_stopped(q, stop, (inputs, targets, packing.state_dict()))
    except BaseException as e:  # hand the error to the training thread instead of leaving it waiting
        put_unless_stopped(q, stop, e)


class MidPacker:
    """Iterator of (inputs, targets), (B, T) int64, packed a few batches ahead (queue_size) by a background
    thread; the state, progress and counts describe the batches handed out, so a checkpoint resumes exactly."""

    def __init__(self, dataset, tokenizer, B, T, device="cpu", buffer_size=100, rank=None, world_size=None,
                 state=None, queue_size=4):
        rank, world_size = _world(rank, world_size)
        if len(dataset) == 0:
            raise ValueError("the training mixture is empty: check the mixture flags")
        self.num_conversations, self.device = len(dataset), torch.device(device)
        packing = _MidPacking(dataset, tokenizer, B, T, buffer_size, rank, world_size, state)
        self._state = packing.state_dict()
        self._queue, self._stop = queue.Queue(maxsize=queue_size), threading.Event()
        # the thread gets no reference to self, so a dropped packer is collected, which stops the thread
        self._thread = start_producer(_produce_mid, (packing, self._queue, self._stop, self.device.type == "cuda"),
                                      self._stop)
        weakref.finalize(self, self._stop.set)

    @property
    def epoch(self):
        return self._state["cursor"] // self.num_conversations

    @property
    def progress(self):
        """Fraction of one epoch of the mixture consumed (may exceed 1)."""
        return self._state["consumed"] / self.num_conversations

    @property
    def truncated(self):
        """Conversations longer than a row (their start is kept), counted when fetched."""
        return self._state["truncated"]

    def state_dict(self):
        return dict(self._state)

    def __iter__(self):
        return self

    def __next__(self):
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        inputs, targets, self._state = item
        non_blocking = self.device.type == "cuda"
        return inputs.to(self.device, non_blocking=non_blocking), targets.to(self.device, non_blocking=non_blocking)

    def close(self):
        """Stop and join the packing thread now (a dropped packer's thread stops by itself)."""
        self._stop.set()
        self._thread.join(timeout=5)


# torch.compile's default recompile limit: a function compiled per shape (FlexAttention, compiled per sequence
# length) falls back to its unfused, score-materialising version once it has seen more shapes than this
MAX_PAD_LENGTHS = 8


def pad_multiple_for(max_tokens, multiple=256):
    """The smallest multiple of `multiple` that cuts rows of up to max_tokens into at most MAX_PAD_LENGTHS lengths."""
    return multiple * max(1, -(-max_tokens // (multiple * MAX_PAD_LENGTHS)))


def collate_sft(rendered, pad_id, ncols=None):
    """rendered: list of (ids, mask). Returns inputs, targets (B, ncols), by default ncols = max_len-1; targets are
    -1 on padding and wherever the mask says the token is not trained."""
    ncols = ncols or max(len(ids) for ids, _ in rendered) - 1
    inputs = torch.full((len(rendered), ncols), pad_id, dtype=torch.long)
    targets = torch.full((len(rendered), ncols), -1, dtype=torch.long)
    for i, (ids, mask) in enumerate(rendered):
        n = len(ids)
        ids_t = torch.tensor(ids, dtype=torch.long)
        inputs[i, :n - 1] = ids_t[:-1]
        targets[i, :n - 1] = ids_t[1:].masked_fill(~torch.tensor(mask[1:], dtype=torch.bool), -1)
    return inputs, targets


class SFTBatcher:
    """Iterator of (inputs, targets) with `B` conversations per batch, walking indices rank, rank+W, ...
    pad_multiple > 0: rows are padded up to the next multiple of it (at most max_tokens), so a run sees at most
    ceil(max_tokens / pad_multiple) shapes; the padding's targets are -1, so the loss is unchanged."""

    def __init__(self, dataset, tokenizer, B, device="cpu", max_tokens=2048, rank=None, world_size=None, state=None,
                 pad_multiple=0):
        self.dataset, self.tokenizer, self.B, self.device = dataset, tokenizer, B, torch.device(device)
        self.max_tokens, self.pad_multiple = max_tokens, pad_multiple
        self.rank, self.world_size = _world(rank, world_size)
        if len(dataset) == 0:
            raise ValueError("the SFT mixture is empty: check the mixture flags")
        self.cursor = (state or {"cursor": self.rank})["cursor"]
        self.pad_id = tokenizer.encode_special("<|assistant_end|>")  # pad positions never matter

    def state_dict(self):
        return {"cursor": self.cursor}

    @property
    def epoch(self):
        return self.cursor // len(self.dataset)

    def __iter__(self):
        return self

    def __next__(self):
        rendered = []
        for _ in range(self.B):
            conv = self.dataset[self.cursor % len(self.dataset)]
            rendered.append(self.tokenizer.render_conversation(conv, max_tokens=self.max_tokens))
            self.cursor += self.world_size
        ncols = max(len(ids) for ids, _ in rendered) - 1
        if self.pad_multiple > 0:
            ncols = min(-(-ncols // self.pad_multiple) * self.pad_multiple, self.max_tokens)
        inputs, targets = collate_sft(rendered, self.pad_id, ncols)
        return inputs.to(self.device), targets.to(self.device)
