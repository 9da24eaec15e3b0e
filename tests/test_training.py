"""
Unit tests of nanochat/training.py against hand-computed values: schedules, the NaN guard and the
step's one host sync, RNG capture, the MFU peak, the step timer and line, the run's counters and
strict-JSON metas, the prefetching loader view and the context filter of chat_sft's evaluations.
"""

import io
import json
import math
import random
from types import SimpleNamespace

import pytest
import torch

from nanochat.common import format_eta
from nanochat.training import (lr_multiplier_base, muon_momentum_base, muon_momentum_mid, muon_weight_decay_cosine,
                               set_schedule, guarded_step, check_finite_params, NonFiniteLossError, get_rng_state,
                               set_rng_state, PeakFlops, StepTimer, Speed, RunState, format_step, mean_mfu,
                               all_reduce_mean, any_rank, supervised_loss, strict_json, Prefetcher, FittingProblems,
                               grad_accum_steps, accumulate_gradients)

CPU = torch.device("cpu")


@pytest.mark.parametrize("it, expected", [
    (0, 0.1), (4, 0.5), (9, 1.0), (10, 1.0), (80, 1.0),   # warm-up (it+1)/10, then flat up to N - warmdown
    (81, 0.95 + 0.05 * 0.05), (90, 0.5 + 0.5 * 0.05), (100, 0.05),  # p = (N - it)/20; p + (1 - p) * 0.05
])
def test_lr_multiplier_hand_values(it, expected):
    assert lr_multiplier_base(it, 100, 10, 20, 0.05) == pytest.approx(expected, abs=1e-12)


def test_lr_multiplier_without_warmup_or_warmdown():
    assert [lr_multiplier_base(i, 10, 0, 0, 0.0) for i in range(11)] == [1.0] * 11
    # a warm-up longer than the run (tiny test runs with the default 40 steps): still linear in it
    assert lr_multiplier_base(4, 10, 40, 0, 0.0) == pytest.approx(5 / 40)


@pytest.mark.parametrize("it, expected", [
    (0, 0.85), (200, 0.91), (399, 0.85 + 0.12 * 399 / 400), (400, 0.97), (499, 0.97), (500, 0.97),
    (750, 0.935), (1000, 0.90),
])
def test_muon_momentum_base_hand_values(it, expected):
    # N = 1000, warm-down = 500 steps starting at 500
    assert muon_momentum_base(it, 1000, 500) == pytest.approx(expected, abs=1e-12)


def test_muon_momentum_base_short_run_warmup_wins():
    # N = 200, warm-down 130 (starts at 70): inside the first 400 steps the warm-up ramp applies (NEW source)
    assert muon_momentum_base(100, 200, 130) == pytest.approx(0.85 + 0.12 * 100 / 400)
    assert muon_momentum_base(199, 200, 130) == pytest.approx(0.85 + 0.12 * 199 / 400)
    # no warm-down: flat after the ramp
    assert muon_momentum_base(5000, 10000, 0) == 0.97


@pytest.mark.parametrize("it, expected", [(0, 0.85), (150, 0.90), (300, 0.95), (1000, 0.95)])
def test_muon_momentum_mid_hand_values(it, expected):
    assert muon_momentum_mid(it) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("it, expected", [(0, 0.2), (25, 0.1 * (1 + math.sqrt(0.5))), (50, 0.1), (100, 0.0)])
def test_muon_weight_decay_cosine(it, expected):
    assert muon_weight_decay_cosine(it, 100, 0.2) == pytest.approx(expected, abs=1e-12)


def test_set_schedule_touches_the_right_groups():
    opt = SimpleNamespace(param_groups=[
        {"kind": "adamw", "initial_lr": 0.1, "lr": 0.1, "weight_decay": 0.0, "betas": (0.8, 0.95)},
        {"kind": "muon", "initial_lr": 0.02, "lr": 0.02, "weight_decay": 0.3, "momentum": 0.95},
    ])
    set_schedule(opt, 0.5, momentum=0.9, muon_wd=0.1)
    adam, muon = opt.param_groups
    assert adam["lr"] == pytest.approx(0.05) and adam["weight_decay"] == 0.0 and "momentum" not in adam
    assert muon["lr"] == pytest.approx(0.01) and muon["momentum"] == 0.9 and muon["weight_decay"] == 0.1
    set_schedule(opt, 1.0)  # LR only: momentum / wd stay
    assert muon["lr"] == pytest.approx(0.02) and muon["momentum"] == 0.9 and muon["weight_decay"] == 0.1


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


def test_peak_flops_env_override(monkeypatch):
    monkeypatch.setenv("NANOCHAT_PEAK_FLOPS", "2.5e12")
    peak = PeakFlops.for_device(CPU, torch.float32, measure=lambda *a: pytest.fail("pinned peak must not probe"))
    assert peak.flops == 2.5e12 and "NANOCHAT_PEAK_FLOPS" in peak.describe()
    peak.reprobe("step 5")
    assert peak.flops == 2.5e12


def test_measured_peak_keeps_the_highest_and_says_when(monkeypatch):
    monkeypatch.delenv("NANOCHAT_PEAK_FLOPS", raising=False)
    probes = iter([100e9, 80e9, 190e9, 150e9])  # a noisy machine: the first probe reads low
    peak = PeakFlops.for_device(CPU, torch.float32, measure=lambda device, dtype: next(probes))
    assert (peak.flops, peak.measured_at) == (100e9, "start")
    peak.reprobe("step 50")  # lower: ignored
    assert (peak.flops, peak.measured_at) == (100e9, "start")
    peak.reprobe("step 100")
    assert (peak.flops, peak.measured_at) == (190e9, "step 100")
    peak.reprobe("step 150")
    assert peak.flops == 190e9 and "190.0 GFLOP/s" in peak.describe() and "step 100" in peak.describe()
    # MFU follows the highest peak: 1e6 FLOPs/token * 1000 tokens in 0.5 s on 1 rank = 2e9 FLOP/s
    assert Speed(1000, 1e6, 1, peak).mfu(0.5) == pytest.approx(100 * 2e9 / 190e9)


def test_reprobe_leaves_the_rng_alone(monkeypatch):
    monkeypatch.delenv("NANOCHAT_PEAK_FLOPS", raising=False)
    peak = PeakFlops.for_device(CPU, torch.float32, measure=lambda device, dtype: float(torch.rand(()).item() + 1))
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    peak.reprobe("step 1")  # draws random numbers inside
    assert torch.equal(torch.rand(3), expected)


class FakeClock:
    """Each step takes durations[i] seconds."""

    def __init__(self, durations):
        self.times = [0.0]
        for d in durations:
            self.times += [self.times[-1], self.times[-1] + d]  # start() then stop() of each step
        self.times = iter(self.times[1:])

    def __call__(self):
        return next(self.times)


def test_step_timer_skips_warmup_steps():
    durations = [30.0, 20.0, 1.0, 3.0, 2.0]  # steps 0-2: compilation warm-up, much slower
    t = StepTimer(skip=2, clock=FakeClock(durations))
    assert t.eta(10) == "?"
    dts = []
    for step in range(5):
        t.start()
        dts.append(t.stop(step))
    assert dts == durations
    assert t.timed_steps == 2 and t.total_time == 5.0  # steps 3 and 4 only: (3 + 2) s
    assert t.eta(10) == format_eta(25.0)  # 2.5 s per step
    t2 = StepTimer(skip=0, total_time=10.0, timed_steps=5)  # resumed: 2 s per step
    assert t2.eta(30) == format_eta(60.0)


def test_format_step_hand_values():
    run = RunState("val_bpb", step=5, timer=StepTimer(skip=0, total_time=4.0, timed_steps=2))
    speed = Speed(1000, 1e6, 2, PeakFlops(1e10, "datasheet"))
    line = format_step(run, 10, 3.14159, 0.5, 0.5, speed, extra="epoch 1")
    assert speed.tok_per_sec(0.5) == 2000.0
    assert speed.mfu(0.5) == pytest.approx(100 * 1e6 * 1000 / 0.5 / (1e10 * 2))  # 10 %
    assert line == ("step 00005/00010 ( 50.0%) | loss 3.141590 | lrm 0.500 | dt 500ms | tok/s 2,000 | mfu 10.0% | "
                    f"eta {format_eta(10.0)} | epoch 1")
    assert mean_mfu(run, speed) == pytest.approx(100 * 1e6 * 1000 / 2.0 / (1e10 * 2))  # 2 s per step: 2.5 %


def test_run_state_counters_and_strict_meta():
    run = RunState("val_bpb")
    assert run.record_loss(2.0) == pytest.approx(2.0)  # debiased EMA of one value is the value
    run.step = 1
    assert run.record_loss(1.0) == pytest.approx((0.9 * 0.2 + 0.1) / (1 - 0.81))
    run.record_val(float("inf"))  # e.g. no byte counted: never the minimum, never written as Infinity
    assert run.min_val is None and run.val_now() == float("inf")
    run.step = 2
    run.record_val(1.5)
    assert run.val_now() == 1.5 and run.min_val == 1.5
    run.step = 3
    assert run.val_now() is None  # no evaluation at this step: no stale figure
    text = json.dumps(strict_json({"loop_state": run.loop_state(), "x": [float("nan"), (1.0, float("-inf"))]}))
    loaded = json.loads(text, parse_constant=lambda c: pytest.fail(f"not strict JSON: {c}"))
    assert loaded["x"] == [None, [1.0, None]]
    assert loaded["loop_state"]["curves"]["val_bpb"] == [None, 1.5]
    resumed = RunState("val_bpb")
    resumed.restore({"step": 3, "loop_state": loaded["loop_state"]})
    assert (resumed.step, resumed.val, resumed.val_step, resumed.min_val) == (3, 1.5, 2, 1.5)
    assert resumed.smooth_loss == run.smooth_loss and resumed.curves["loss"] == [2.0, 1.0]


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


class LengthTask:
    """Problem i has a prompt of lengths[i] tokens."""

    def __init__(self, lengths):
        self.lengths = lengths

    def __len__(self):
        return len(self.lengths)

    def __getitem__(self, i):
        return {"n": self.lengths[i], "i": i}

    def evaluate(self, conv, answer):
        return answer == conv["i"]


def test_fitting_problems_skip_and_count_overlong_prompts():
    tok = SimpleNamespace(render_for_completion=lambda conv: [0] * conv["n"])
    problems = FittingProblems(LengthTask([5, 11, 10, 30, 2, 99]), tok, max_len=10, max_problems=5)
    assert problems.skipped == 2  # 11 and 30; the sixth problem is beyond max_problems
    assert len(problems) == 3 and [problems[i]["i"] for i in range(3)] == [0, 2, 4]
    assert problems.evaluate(problems[1], 2) and not problems.evaluate(problems[1], 1)


def test_single_process_reductions_are_identity():
    assert all_reduce_mean(1.5, CPU) == 1.5
    assert any_rank(True, CPU) is True and any_rank(False, CPU) is False


class StubModel:
    """Returns fixed per-token NLLs (0 where the target is -1), like GPT(..., loss_reduction='none')."""

    def __init__(self, nll):
        self.nll = nll

    def __call__(self, x, y, loss_reduction="mean"):
        assert loss_reduction == "none"
        return self.nll


def test_supervised_loss_plain_and_dft():
    y = torch.tensor([[1, 2, -1, 3]])
    nll = torch.tensor([[1.0, 2.0, 0.0, 0.5]], requires_grad=True)
    loss, psum = supervised_loss(StubModel(nll), None, y, num_tokens_step=3, world_size=1)
    assert loss.item() == pytest.approx(3.5 / 3)
    assert psum.item() == pytest.approx(math.exp(-1) + math.exp(-2) + math.exp(-0.5))
    loss.backward()
    assert torch.allclose(nll.grad, torch.tensor([[1 / 3, 1 / 3, 0.0, 1 / 3]]))

    # DFT alpha=1: weights are the (stop-gradient) target probabilities
    nll.grad = None
    # the step's token count as a device tensor (how chat_sft passes it, without a host sync)
    loss, _ = supervised_loss(StubModel(nll), None, y, num_tokens_step=torch.tensor(3), world_size=2, dft_alpha=1.0)
    p = [math.exp(-1), math.exp(-2), math.exp(-0.5)]
    assert loss.item() == pytest.approx(2 * (p[0] * 1 + p[1] * 2 + p[2] * 0.5) / 3)
    loss.backward()
    assert torch.allclose(nll.grad, torch.tensor([[2 * p[0] / 3, 2 * p[1] / 3, 0.0, 2 * p[2] / 3]]))


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
