"""
Pretraining loader: rank-sharded document stream, background tokenization, BOS-aligned best-fit packing
and exact resume. PretrainLoader(tokenizer, B, T, split, device, state=sd) yields (x, y), (B, T) int64 on
`device`; state_dict() is JSON-able and describes the batches consumed so far.

A document is named by (epoch, file index, row group, row). The state is the stream cursor (next doc to
read) plus the names of the docs in the packing buffer, which are read and tokenized again on resume.
"""

import bisect
import queue
import atexit
import threading
from collections import deque

import numpy as np
import torch

from nanochat.common import get_dist_info
from nanochat.dataset import get_split_files, open_shard, read_texts

SEQ_BITS = 40  # buffer sort key = (doc length << SEQ_BITS) | insertion number: ties go by arrival
SEQ_MASK = (1 << SEQ_BITS) - 1


def build_plan(files, rank, world_size):
    """This rank's share of one epoch: [(file_idx, row_group, first_row, row_step)] in file order. Row groups
    are strided over all row groups (not per file), so small shards still feed every rank; a split with fewer
    row groups than ranks (a tiny val shard on 8 GPUs) has every rank read every row group, striding rows."""
    units = [(fi, rg) for fi, path in enumerate(files) for rg in range(open_shard(path).num_row_groups)]
    if len(units) >= world_size:
        return [(fi, rg, 0, 1) for fi, rg in units[rank::world_size]]
    return [(fi, rg, rank, world_size) for fi, rg in units]


def _encode(tokenizer, bos, texts):
    return [np.asarray(ids, dtype=np.int64) for ids in tokenizer.encode(texts, prepend=bos)]


def put_unless_stopped(q, stop, item):
    """Producer side of a bounded queue: wait for room, but give up as soon as `stop` is set."""
    while not stop.is_set():
        try:
            return q.put(item, timeout=0.1)
        except queue.Full:
            pass


# Every producer thread ever started, as (stop event, thread). At interpreter exit they are stopped
# and joined: a daemon thread killed inside pyarrow/tokenizer C++ code during finalization aborts
# the process ("terminate called without an active exception").
_PRODUCERS = []


@atexit.register
def _stop_producers():
    for stop, _ in _PRODUCERS:
        stop.set()
    for _, thread in _PRODUCERS:
        thread.join(timeout=30)


def start_producer(target, args, stop):
    """A daemon thread running target(*args); `stop` is set and the thread joined at interpreter exit."""
    thread = threading.Thread(target=target, args=args, daemon=True)
    _PRODUCERS[:] = [(e, t) for e, t in _PRODUCERS if t.is_alive()]
    _PRODUCERS.append((stop, thread))
    thread.start()
    return thread


def _produce(files, plan, tokenizer, bos, cursor, q, stop, rank, split):
    """Producer thread: reads and tokenizes this rank's row groups from `cursor` on, epoch after epoch."""
    try:
        epoch, fi, rg, row = cursor
        start = [(p[0], p[1]) for p in plan].index((fi, rg))
        pf, pf_idx = None, None
        while not stop.is_set():
            docs_this_epoch = 0
            for i in range(start, len(plan)):
                if stop.is_set():
                    return
                fi, rg, first_row, step = plan[i]
                first = row if i == start and row is not None else first_row
                if pf_idx != fi:
                    pf, pf_idx = open_shard(files[fi]), fi
                texts = read_texts(pf, rg, files[fi])[first::step]
                docs_this_epoch += len(texts)
                if texts:
                    ids = [(epoch, fi, rg, first + k * step) for k in range(len(texts))]
                    put_unless_stopped(q, stop, (step, list(zip(ids, _encode(tokenizer, bos, texts)))))
            if docs_this_epoch == 0 and start == 0:
                raise ValueError(f"rank {rank} found no documents in a whole epoch of the {split} split")
            epoch, start, row = epoch + 1, 0, None
    except BaseException as e:  # hand the error to the training thread instead of leaving it waiting
        put_unless_stopped(q, stop, e)


class PretrainLoader:
    def __init__(self, tokenizer, B, T, split, device="cpu", rank=None, world_size=None,
                 buffer_size=1000, state=None, queue_size=4):
        _, env_rank, _, env_world = get_dist_info()
        self.rank = env_rank if rank is None else rank
        self.world_size = env_world if world_size is None else world_size
        self.tokenizer, self.B, self.T, self.split = tokenizer, B, T, split
        self.device = torch.device(device)
        self.buffer_size = buffer_size
        self.bos = tokenizer.get_bos_token_id()
        self.files = get_split_files(split)
        self.plan = build_plan(self.files, self.rank, self.world_size)
        if not self.plan:
            raise ValueError(f"rank {self.rank} of {self.world_size} gets no data from the {split} split")

        # packing buffer, kept sorted by key; _docs[i] = (doc_id, tokens) for _keys[i]
        self._keys, self._docs, self._seq = [], [], 0
        self._chunk = deque()  # docs of the current tokenized row group not yet in the buffer
        self.used_tokens = self.cropped_tokens = 0
        fi, rg, first_row, _ = self.plan[0]
        self.cursor = (1, fi, rg, first_row)  # (epoch, file, row group, row) of the next doc to read
        if state is not None:
            self._load_state(state)

        # background producer: reads and tokenizes row groups ahead of the trainer
        self._queue = queue.Queue(maxsize=queue_size)
        self._stop = threading.Event()
        # the thread gets no reference to self, so a dropped loader is collected and its __del__ stops it
        args = (self.files, self.plan, tokenizer, self.bos, self.cursor, self._queue, self._stop, self.rank, split)
        self._thread = start_producer(_produce, args, self._stop)

    def _next_doc(self):
        while not self._chunk:
            item = self._queue.get()
            if isinstance(item, BaseException):
                raise item
            self._step, docs = item
            self._chunk.extend(docs)
        doc_id, tokens = self._chunk.popleft()
        epoch, fi, rg, row = doc_id
        self.cursor = (epoch, fi, rg, row + self._step)
        return doc_id, tokens

    # -- packing (training thread) --------------------------------------------

    def _add(self, doc_id, tokens):
        key = (len(tokens) << SEQ_BITS) | self._seq
        self._seq += 1
        i = bisect.bisect_right(self._keys, key)
        self._keys.insert(i, key)
        self._docs.insert(i, (doc_id, tokens))

    def _fill_row(self, row):
        """Fill row (T+1,) with whole docs, largest that fits first; crop the shortest when none fits."""
        pos, n = 0, len(row)
        while pos < n:
            while len(self._keys) < self.buffer_size:
                self._add(*self._next_doc())
            room = n - pos
            i = bisect.bisect_right(self._keys, (room << SEQ_BITS) | SEQ_MASK) - 1
            i = max(i, 0)  # -1: nothing fits, take the shortest (index 0) and crop it
            self._keys.pop(i)
            _, tokens = self._docs.pop(i)
            take = min(len(tokens), room)
            row[pos:pos + take] = tokens[:take]
            pos += take
            self.used_tokens += take
            self.cropped_tokens += len(tokens) - take

    def __iter__(self):
        return self

    def __next__(self):
        use_cuda = self.device.type == "cuda"
        # one contiguous (2, B, T) host buffer -> one transfer; inputs and targets stay contiguous.
        # Filled with numpy (not torch copy_, whose intra-op threads stall on a busy CPU).
        host = torch.empty((2, self.B, self.T), dtype=torch.int64, pin_memory=use_cuda)
        h, row = host.numpy(), np.empty(self.T + 1, dtype=np.int64)
        for b in range(self.B):
            self._fill_row(row)
            h[0, b], h[1, b] = row[:-1], row[1:]
        dev = host.to(self.device, non_blocking=use_cuda)
        return dev[0], dev[1]

    @property
    def crop_fraction(self):
        total = self.used_tokens + self.cropped_tokens
        return self.cropped_tokens / total if total else 0.0

    @property
    def epoch(self):
        return self.cursor[0]

    # -- state ----------------------------------------------------------------

    def state_dict(self):
        # the docs of self._chunk are not in the state: the cursor points at the first of them
        return {
            "cursor": list(self.cursor),
            "buffer": [list(doc_id) for doc_id, _ in self._docs],  # in key order
            "used_tokens": self.used_tokens, "cropped_tokens": self.cropped_tokens,
            "world_size": self.world_size, "rank": self.rank, "num_files": len(self.files),
        }

    def _load_state(self, state):
        for k, mine in (("world_size", self.world_size), ("rank", self.rank), ("num_files", len(self.files))):
            if state[k] != mine:
                raise ValueError(f"loader state was saved with {k}={state[k]} but this loader has {k}={mine}; "
                                 f"exact resume needs the same ranks and the same {self.split} shards")
        self.cursor = tuple(state["cursor"])
        self.used_tokens, self.cropped_tokens = state["used_tokens"], state["cropped_tokens"]
        # re-tokenize the buffered docs, reading each row group once; re-adding them in saved key
        # order with fresh insertion numbers reproduces the same order, ties included
        ids = [tuple(d) for d in state["buffer"]]
        texts = {(fi, rg): read_texts(open_shard(self.files[fi]), rg, self.files[fi])
                 for fi, rg in sorted({(d[1], d[2]) for d in ids})}
        tokens = _encode(self.tokenizer, self.bos, [texts[(d[1], d[2])][d[3]] for d in ids]) if ids else []
        for doc_id, tok in zip(ids, tokens):
            self._add(doc_id, tok)

    def close(self):
        self._stop.set()
        self._thread.join(timeout=5)

    def __del__(self):
        if hasattr(self, "_stop"):
            self._stop.set()
