"""
Batching of conversations for the chat stages (nanochat/chat_loader.py):
MidPacker (best-fit packing of whole conversations, padding instead of cropping)
checked against a naive packer written here, and collate_sft / SFTBatcher (only the assistant's tokens are targets)
checked against the worked example built by hand with a real (tiny) tokenizer.
"""

import json
import os
import random

import pytest
import torch

from conftest import TOOL_CALL_REPLY
from nanochat.chat_loader import MidPacker, collate_sft, SFTBatcher
from nanochat.tokenizer import RustBPETokenizer

WORDS = ["apple", "river", "garden", "boat", "house", "king", "bird", "tree", "city", "ball"]


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    return RustBPETokenizer.from_directory(os.path.join(tiny_tokenizer_dir, "tokenizer"))


def make_conversations(n, seed=0, max_words=14, long_every=0):
    """Conversations of varied lengths; every `long_every`-th one is far longer than a row."""
    rng = random.Random(seed)
    convs = []
    for i in range(n):
        k = 60 if long_every and i % long_every == long_every - 1 else rng.randint(1, max_words)
        convs.append({"messages": [
            {"role": "user", "content": " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 4)))},
            {"role": "assistant", "content": " ".join(rng.choice(WORDS) for _ in range(k))}]})
    return convs


def naive_pack(dataset, tok, B, T, num_batches, buffer_size, rank=0, world_size=1):
    """
    The packing recipe spelled out with plain lists: before every pick top the buffer up to
    `buffer_size` (fetching indices rank, rank+W, ... modulo the dataset), put the longest buffered
    conversation that still fits the row (earliest on ties), pad with BOS when none fits.
    Returns rows of T+1 ids and their content lengths.
    """
    bos = tok.get_bos_token_id()
    renders = [tok.render_conversation(c, max_tokens=10 ** 9)[0][:T + 1] for c in dataset]
    buffer, fetch = [], rank
    out = []
    for _ in range(num_batches):
        batch = []
        for _ in range(B):
            row = []
            while True:
                while len(buffer) < buffer_size:
                    buffer.append(renders[fetch % len(dataset)])
                    fetch += world_size
                room = T + 1 - len(row)
                fitting = [(len(c), -pos) for pos, c in enumerate(buffer) if len(c) <= room]
                if not fitting:
                    break
                _, neg_pos = max(fitting)
                row += buffer.pop(-neg_pos)
            batch.append((row + [bos] * (T + 1 - len(row)), len(row)))
        out.append(batch)
    return out


def check_rows(inputs, targets, renders_set, bos, T):
    """Properties any valid packing has, independent of which conversations were picked."""
    B = inputs.shape[0]
    assert inputs.shape == targets.shape == (B, T)
    for b in range(B):
        x, y = inputs[b].tolist(), targets[b].tolist()
        ignored = [t for t in range(T) if y[t] == -1]
        c = ignored[0] + 1 if ignored else T + 1  # content length: the first ignored target predicts the first pad
        assert ignored == list(range(c - 1, T)), "padding targets must be -1 exactly from the first pad's prediction on"
        row = x + [y[-1]] if c == T + 1 else x[:c] + [bos] * (T + 1 - c)
        assert row[:T] == x
        assert y[:c - 1] == row[1:c], "targets are the inputs shifted by one"
        assert all(t == bos for t in x[c:]), "padding is BOS"
        assert row[0] == bos, "a row starts at a conversation start"
        # split the content at BOS (each rendered conversation holds exactly one, at its start)
        starts = [t for t in range(c) if row[t] == bos] + [c]
        for s, e in zip(starts, starts[1:]):
            assert tuple(row[s:e]) in renders_set, f"row {b} holds a cut or altered conversation at {s}:{e}"


def test_midpacker_matches_naive_and_keeps_conversations_whole(tok):
    T, B = 48, 3
    convs = make_conversations(40, seed=1)
    renders = [tok.render_conversation(c)[0] for c in convs]
    assert all(len(r) <= T + 1 for r in renders) and min(len(r) for r in renders) < T // 3
    packer = MidPacker(convs, tok, B, T, buffer_size=8, rank=0, world_size=1)
    expected = naive_pack(convs, tok, B, T, num_batches=12, buffer_size=8)
    renders_set = set(map(tuple, renders))
    for batch in expected:
        x, y = next(packer)
        assert x.dtype == y.dtype == torch.long
        check_rows(x, y, renders_set, tok.get_bos_token_id(), T)
        for b, (row, c) in enumerate(batch):
            assert x[b].tolist() == row[:-1]
            assert y[b].tolist() == row[1:c] + [-1] * (T + 1 - c)
    assert packer.truncated == 0
    # 12 batches of 3 rows with several conversations each walk the 40-row dataset more than once
    assert packer.progress > 1.0


def test_midpacker_overlong_conversation_is_truncated_and_counted(tok):
    T, B = 32, 2
    convs = make_conversations(12, seed=2, max_words=6, long_every=4)  # 3 of 12 are longer than a row
    full = [tok.render_conversation(c, max_tokens=10 ** 9)[0] for c in convs]
    long_ids = [i for i, r in enumerate(full) if len(r) > T + 1]
    assert len(long_ids) == 3
    packer = MidPacker(convs, tok, B, T, buffer_size=4)
    expected = naive_pack(convs, tok, B, T, num_batches=10, buffer_size=4)
    truncated_rows = 0
    for batch in expected:
        x, y = next(packer)
        for b, (row, c) in enumerate(batch):
            assert x[b].tolist() == row[:-1] and y[b].tolist() == row[1:c] + [-1] * (T + 1 - c)
            if any(row == full[i][:T + 1] for i in long_ids):
                truncated_rows += 1
                assert (y[b] >= 0).all(), "a truncated conversation fills its row: nothing is padding"
    assert truncated_rows > 0
    # counted once per fetch: the packer fetched packer.cursor indices (world size 1)
    assert packer.truncated == sum(len(full[i % len(convs)]) > T + 1 for i in range(packer.state_dict()["cursor"]))
    # a dataset of only over-long conversations never stalls: every row is one truncated conversation
    only_long = [convs[i] for i in long_ids]
    p2 = MidPacker(only_long, tok, B, T, buffer_size=2)
    for _ in range(5):
        x, y = next(p2)
        assert (y >= 0).all()
        for b in range(B):
            assert x[b].tolist() + [y[b, -1].item()] in [full[i][:T + 1] for i in long_ids]
    assert p2.truncated >= 10


def test_midpacker_resume_gives_the_following_batches(tok):
    T, B = 40, 2
    convs = make_conversations(30, seed=3, long_every=7)
    ref = MidPacker(convs, tok, B, T, buffer_size=6, rank=1, world_size=2)
    ref_batches = [next(ref) for _ in range(9)]
    first = MidPacker(convs, tok, B, T, buffer_size=6, rank=1, world_size=2)
    for _ in range(4):
        next(first)
    state = json.loads(json.dumps(first.state_dict()))  # it must survive a JSON round trip (checkpoint meta)
    resumed = MidPacker(convs, tok, B, T, buffer_size=6, rank=1, world_size=2, state=state)
    assert resumed.truncated == first.truncated and resumed.progress == first.progress
    for x_ref, y_ref in ref_batches[4:]:
        x, y = next(resumed)
        assert torch.equal(x, x_ref) and torch.equal(y, y_ref)
    assert resumed.state_dict() == ref.state_dict()


def test_midpacker_ranks_read_disjoint_strides(tok):
    T, B = 40, 2
    convs = make_conversations(50, seed=4)
    for rank in range(3):
        packer = MidPacker(convs, tok, B, T, buffer_size=5, rank=rank, world_size=3)
        expected = naive_pack(convs, tok, B, T, num_batches=3, buffer_size=5, rank=rank, world_size=3)
        for batch in expected:
            x, y = next(packer)
            assert x.tolist() == [row[:-1] for row, _ in batch]
        state = packer.state_dict()
        assert all(i % 3 == rank for i in state["buffer"]) and state["cursor"] % 3 == rank


def test_midpacker_empty_dataset_is_an_error(tok):
    with pytest.raises(ValueError, match="empty"):
        MidPacker([], tok, 2, 16)


# -----------------------------------------------------------------------------
# SFT collation

WORKED_EXAMPLE = {"messages": [{"role": "system", "content": "Be terse."},
                              {"role": "user", "content": "What is 6*7?"}, TOOL_CALL_REPLY]}

SHORT = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}


def hand_render(tok):
    """The chat template by hand, segment by segment, with which segments are trained (mask 1)."""
    sp, enc = tok.encode_special, tok.encode
    segments = [
        ([sp("<|bos|>"), sp("<|user_start|>")], 0), (enc("Be terse.\n\nWhat is 6*7?"), 0),
        ([sp("<|user_end|>"), sp("<|assistant_start|>")], 0), (enc("Let me compute. "), 1),
        ([sp("<|python_start|>")], 1), (enc("6*7"), 1), ([sp("<|python_end|>")], 1),
        ([sp("<|output_start|>")], 0), (enc("42"), 0), ([sp("<|output_end|>")], 0),
        (enc("It is 42."), 1), ([sp("<|assistant_end|>")], 1)]
    ids = [i for seg, _ in segments for i in seg]
    mask = [m for seg, m in segments for _ in seg]
    short_ids = [sp("<|bos|>"), sp("<|user_start|>"), *enc("Hi"), sp("<|user_end|>"), sp("<|assistant_start|>"),
                 *enc("Hello!"), sp("<|assistant_end|>")]
    short_mask = [0, 0] + [0] * len(enc("Hi")) + [0, 0] + [1] * len(enc("Hello!")) + [1]
    return (ids, mask), (short_ids, short_mask)


def test_collate_sft_worked_example(tok):
    (ids, mask), (sids, smask) = hand_render(tok)
    assert tok.render_conversation(WORKED_EXAMPLE) == (ids, mask)
    assert tok.render_conversation(SHORT) == (sids, smask)
    pad = tok.encode_special("<|assistant_end|>")
    inputs, targets = collate_sft([(sids, smask), (ids, mask)], pad)
    ncols = len(ids) - 1
    assert inputs.shape == targets.shape == (2, ncols)
    # the short row: its own inputs then pad; targets -1 on the prompt part and on all padding
    n = len(sids)
    assert inputs[0].tolist() == sids[:-1] + [pad] * (ncols - (n - 1))
    expected_short = [sids[t + 1] if smask[t + 1] else -1 for t in range(n - 1)] + [-1] * (ncols - (n - 1))
    assert targets[0].tolist() == expected_short
    # the short conversation: the last len("Hello!")+1 targets are the reply and <|assistant_end|>
    k = len(tok.encode("Hello!"))
    assert targets[0, :n - 1].tolist() == [-1] * (n - 2 - k) + sids[-k - 1:]
    # the worked example: targets are ids[1:] where mask[1:] is 1, the output part and the prompt -1
    assert inputs[1].tolist() == ids[:-1]
    y = targets[1].tolist()
    for t in range(ncols):
        assert y[t] == (ids[t + 1] if mask[t + 1] == 1 else -1), t
    # spot checks straight from the table: <|python_start|> and <|python_end|> are targets, the output span is not
    sp = tok.encode_special
    assert sp("<|python_start|>") in y and sp("<|python_end|>") in y and sp("<|assistant_end|>") in y
    assert sp("<|output_start|>") not in y and sp("<|output_end|>") not in y and sp("<|assistant_start|>") not in y
    assert y.count(-1) == sum(1 for m in mask[1:] if m == 0)


def test_sftbatcher_strides_truncates_and_resumes(tok):
    convs = make_conversations(11, seed=5) + [WORKED_EXAMPLE]
    B, W = 3, 2
    pad = tok.encode_special("<|assistant_end|>")
    ref = SFTBatcher(convs, tok, B, max_tokens=24, rank=1, world_size=W)
    ref_batches = [next(ref) for _ in range(6)]  # 18 conversations of a 12-row dataset: wraps around
    idx = 1
    for x, y in ref_batches:
        rendered = []
        for _ in range(B):
            rendered.append(tok.render_conversation(convs[idx % len(convs)], max_tokens=24))
            idx += W
        assert max(len(r) for r, _ in rendered) <= 24
        ex, ey = collate_sft(rendered, pad)
        assert torch.equal(x, ex) and torch.equal(y, ey)
    assert ref.epoch == idx // len(convs)
    first = SFTBatcher(convs, tok, B, max_tokens=24, rank=1, world_size=W)
    for _ in range(2):
        next(first)
    resumed = SFTBatcher(convs, tok, B, max_tokens=24, rank=1, world_size=W,
                         state=json.loads(json.dumps(first.state_dict())))
    for x_ref, y_ref in ref_batches[2:]:
        x, y = next(resumed)
        assert torch.equal(x, x_ref) and torch.equal(y, y_ref)


def test_sftbatcher_pads_to_multiples_without_changing_rows(tok):
    convs = make_conversations(12, seed=3, max_words=40)
    plain = SFTBatcher(convs, tok, 3, max_tokens=100)
    padded = SFTBatcher(convs, tok, 3, max_tokens=100, pad_multiple=32)
    for _ in range(4):
        (x, y), (px, py) = next(plain), next(padded)
        T = x.size(1)
        assert px.size(1) == min(-(-T // 32) * 32, 100) and px.size(1) % 32 in (0, 100 % 32)
        assert torch.equal(px[:, :T], x) and torch.equal(py[:, :T], y)  # the same rows, then padding
        assert (py[:, T:] == -1).all() and (px[:, T:] == tok.encode_special("<|assistant_end|>")).all()


def test_padded_batch_loss_equals_the_unpadded_loss(tok):
    # the unpadded loss: every conversation alone (no padding at all), summed over its supervised tokens
    from conftest import tiny_gpt
    convs = make_conversations(6, seed=4, max_words=30)
    model = tiny_gpt(sequence_len=128, vocab_size=tok.get_vocab_size(), n_layer=2, n_head=2, n_kv_head=1, n_embd=32,
                     window_pattern="SL", short_window=8).eval()
    nll, count = 0.0, 0
    for conv in convs:
        ids, mask = tok.render_conversation(conv)
        x = torch.tensor([ids[:-1]])
        y = torch.tensor([[t if m else -1 for t, m in zip(ids[1:], mask[1:])]])
        with torch.no_grad():
            nll += model(x, y, loss_reduction="sum").item()
        count += int((y >= 0).sum())
    x, y = next(SFTBatcher(convs, tok, len(convs), max_tokens=128, pad_multiple=64))
    assert x.size(1) in (64, 128) and (y == -1).any()
    with torch.no_grad():
        loss = model(x, y).item()
    assert loss == pytest.approx(nll / count, rel=1e-5)


def test_padded_sft_batches_compile_flex_attention_once_per_length(tok):
    # 20 batches of varied conversations through the compiled FlexAttention of the flex backend (what SFT runs on a
    # GPU without FA3): padded to multiples, one compile per length and never the unfused fallback; the same
    # batches unpadded would bring more lengths than torch's recompile limit
    import warnings
    from torch._dynamo.testing import CompileCounterWithBackend
    import nanochat.attention as attn
    from nanochat.chat_loader import MAX_PAD_LENGTHS, pad_multiple_for
    convs = make_conversations(60, seed=11, max_words=90)
    max_tokens, B = 256, 3
    pad_multiple = pad_multiple_for(max_tokens, multiple=64)
    assert pad_multiple == 64
    unpadded = {next(SFTBatcher(convs, tok, B, max_tokens=max_tokens, state={"cursor": i * B}))[0].shape[1]
                for i in range(20)}
    assert len(unpadded) > MAX_PAD_LENGTHS  # the situation that recompiles past the limit
    batches = SFTBatcher(convs, tok, B, max_tokens=max_tokens, pad_multiple=pad_multiple)
    counter = CompileCounterWithBackend("aot_eager")
    torch._dynamo.reset()
    saved = attn._flex_fn, attn.FLEX_COMPILE_BACKEND
    attn._flex_fn, attn.FLEX_COMPILE_BACKEND = None, counter
    lengths = set()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(20):
                x, _ = next(batches)
                T = x.size(1)
                lengths.add(T)
                g = torch.Generator().manual_seed(T)
                q, k, v = (torch.randn(B, T, h, 16, generator=g) for h in (2, 1, 1))
                with torch.no_grad():  # FlexAttention's backward is a Triton kernel: the forward compiles the same
                    y = attn._flex_window(q, k, v, 32)
                torch.testing.assert_close(y, attn.reference_attention(q, k, v, torch.arange(T), window_left=32),
                                           atol=1e-5, rtol=1e-5)
    finally:
        attn._flex_fn, attn.FLEX_COMPILE_BACKEND = saved
        torch._dynamo.reset()
    assert len(lengths) <= max_tokens // pad_multiple
    assert counter.frame_count == len(lengths), (counter.frame_count, sorted(lengths))
    assert not [w for w in caught if "materializes" in str(w.message)]
