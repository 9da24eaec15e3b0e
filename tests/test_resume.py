"""
nanochat/resume.py: RNG states through a weights-only load, and when a run saves.
"""

import io
import random

import torch

from nanochat.resume import Checkpoints, get_rng_state, set_rng_state


def test_rng_state_round_trip_through_weights_only_load():
    random.seed(3)
    torch.manual_seed(3)
    buf = io.BytesIO()
    torch.save(get_rng_state(), buf)
    expected = (random.random(), torch.rand(4))
    random.random(), torch.rand(10)  # move on
    buf.seek(0)
    set_rng_state(torch.load(buf, weights_only=True))
    got = (random.random(), torch.rand(4))
    assert got[0] == expected[0] and torch.equal(got[1], expected[1])
    set_rng_state(None)  # older checkpoints without RNG state: no-op


def test_periodic_saves_fall_every_n_steps_but_not_at_0_or_the_resumed_step():
    checkpoints = Checkpoints("unused", model=None, optimizer=None, rank=0, device=torch.device("cpu"), save_every=4)
    assert [s for s in range(13) if checkpoints.due(s)] == [4, 8, 12]
    checkpoints.resumed_from = 8  # on disk already
    assert [s for s in range(13) if checkpoints.due(s)] == [4, 12]
    never = Checkpoints("unused", model=None, optimizer=None, rank=0, device=torch.device("cpu"))
    assert not any(never.due(s) for s in range(13))  # -1: the script's final save only
