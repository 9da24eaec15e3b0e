"""
nanochat/train_step.py: the NaN guard and the step's one host sync, the weights check before a save, the
prefetching loader view, the micro-step count and its error, and a real tiny GPT step read from the device once.
"""

import math

import pytest
import torch

from nanochat.common import all_reduce_mean, any_rank
from nanochat.train_step import (grad_accum_steps, accumulate_gradients, guarded_step, check_finite_params,
                                 NonFiniteLossError, Prefetcher)

CPU = torch.device("cpu")


class CountingOptimizer:
    def __init__(self, model):
        self.model, self.steps = model, 0

    def step(self):
        self.steps += 1

    def zero_grad(self, set_to_none=True):
        for p in self.model.parameters():
            p.grad = None


def test_guarded_step_stops_before_the_update_on_nonfinite_loss_or_grad():
    model = torch.nn.Linear(3, 2)
    opt = CountingOptimizer(model)
    model(torch.ones(1, 3)).sum().backward()
    loss, extras = guarded_step(0, opt, model, torch.tensor(1.25),
                                extras=[torch.tensor(3.0), torch.tensor(4, dtype=torch.long)])
    assert (loss, extras, opt.steps) == (1.25, [3.0, 4.0], 1)
    assert all(p.grad is None for p in model.parameters())  # zeroed after the update
    with pytest.raises(NonFiniteLossError, match=r"step 7\b.*resume-from-step"):
        guarded_step(7, opt, model, torch.tensor(float("nan")))
    with pytest.raises(NonFiniteLossError, match=r"step 3\b"):
        guarded_step(3, opt, model, torch.tensor(float("inf")))
    model(torch.ones(1, 3)).sum().backward()
    model.weight.grad[0, 0] = float("inf")  # a finite loss but an infinite gradient
    with pytest.raises(NonFiniteLossError, match=r"step 2\b"):
        guarded_step(2, opt, model, torch.tensor(0.5))
    assert opt.steps == 1  # none of the bad steps reached the optimizer


def test_guarded_step_syncs_with_the_host_once(monkeypatch):
    """The loss, the NaN flag and the extras come to the host in one copy (Tensor.tolist), and never via .item()."""
    model = torch.nn.Linear(3, 2)
    model(torch.ones(1, 3)).sum().backward()
    calls = {"item": 0, "tolist": 0}
    for name in calls:
        orig = getattr(torch.Tensor, name)

        def counted(self, *a, _orig=orig, _name=name, **k):
            calls[_name] += 1
            return _orig(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, counted)
    guarded_step(0, CountingOptimizer(model), model, torch.tensor(2.0), extras=[torch.tensor(1.0)])
    assert calls == {"item": 0, "tolist": 1}


def test_check_finite_params():
    model = torch.nn.Linear(3, 2)
    check_finite_params(model, 4, CPU)
    with torch.no_grad():
        model.bias[1] = float("nan")
    with pytest.raises(NonFiniteLossError, match=r"weights at step 4 .*step 3"):
        check_finite_params(model, 4, CPU)


class CountingLoader:
    """Batches 0, 1, 2, ...; its state counts the batches it produced."""

    def __init__(self):
        self.n = 0

    def __next__(self):
        self.n += 1
        return self.n - 1

    def state_dict(self):
        return {"produced": self.n}

    @property
    def epoch(self):
        return self.n // 3


def test_prefetcher_state_counts_only_batches_handed_out():
    loader = CountingLoader()
    batches = Prefetcher(loader)
    assert [next(batches), next(batches)] == [0, 1] and batches.state_dict() == {"produced": 2}
    batches.prefetch()
    batches.prefetch()  # idempotent: still one batch held
    assert loader.n == 3 and batches.state_dict() == {"produced": 2} and batches.epoch == 0
    assert next(batches) == 2 and batches.state_dict() == {"produced": 3} and batches.epoch == 1
    assert next(batches) == 3


def test_grad_accum_steps_and_its_error():
    assert grad_accum_steps(512, 4, 64, 1) == 2
    with pytest.raises(SystemExit, match=r"--total-batch-size=300 .* 4\*64\*1 = 256; try --total-batch-size=256"):
        grad_accum_steps(300, 4, 64, 1)


def test_single_process_reductions_are_identity():
    assert all_reduce_mean(1.5, CPU) == 1.5
    assert any_rank(True, CPU) is True and any_rank(False, CPU) is False


class RandomBatches:
    """A stand-in loader of random (x, y) batches of one shape."""
    epoch = 0

    def __init__(self, B, T, V):
        self.B, self.T, self.V, self.n = B, T, V, 0

    def __next__(self):
        self.n += 1
        return torch.randint(0, self.V, (self.B, self.T)), torch.randint(0, self.V, (self.B, self.T))

    def state_dict(self):
        return {"n": self.n}


def test_a_training_step_reads_from_the_device_once(monkeypatch):
    """Micro-steps, prefetch, NaN guard and the Muon/AdamW update of a real tiny GPT: one device->host read."""
    import contextlib
    import nanochat.gpt as gpt
    torch.manual_seed(0)
    with torch.device("meta"):
        model = gpt.GPT(gpt.GPTConfig(sequence_len=16, vocab_size=64, n_layer=2, n_head=2, n_kv_head=2, n_embd=32,
                                      window_pattern="L"))
    model.to_empty(device="cpu")
    model.init_weights()
    optimizer = model.setup_optimizers()
    batches = Prefetcher(RandomBatches(2, 16, 64))
    # the GPU's code path where the CPU-only kernels can be switched off (their host reads never happen on a GPU)
    cuda_path = gpt.cpu_kernels(False) if hasattr(gpt, "cpu_kernels") else contextlib.nullcontext()
    with cuda_path:
        guarded_step(0, optimizer, model, accumulate_gradients(model, batches, 2))  # lazy state is created here
        reads = []
        for name in ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__"):
            orig = getattr(torch.Tensor, name)

            def counted(self, *a, _orig=orig, _name=name, **k):
                reads.append(_name)
                return _orig(self, *a, **k)
            monkeypatch.setattr(torch.Tensor, name, counted)
        loss, _ = guarded_step(1, optimizer, model, accumulate_gradients(model, batches, 3))
    assert reads == ["tolist"] and math.isfinite(loss)
    assert batches.state_dict() == {"n": 5} and batches.loader.n == 6  # 2 + 3 taken, 1 prefetched
