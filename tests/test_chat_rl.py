"""
scripts/chat_rl.py: the batch and the REINFORCE loss against hand computations (a stub model whose
logits are a free table per position, and a real tiny GPT against log_softmax of its plain logits),
then runs of the script: a smoke run, a resumed run that reproduces the uninterrupted one exactly, a
non-finite stop with status 2, and (slow) a 2-rank torchrun run that must save without deadlocking.
"""

import json
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import REPO, run_module, script_env
from scripts.chat_rl import pad_rollouts, policy_gradient_loss

RL_ARGS = ["--num-steps=2", "--examples-per-step=2", "--num-samples=2", "--device-batch-size=2",
           "--max-new-tokens=16", "--eval-every=1", "--eval-examples=2", "--save-every=1", "--device-type=cpu"]


def test_pad_rollouts_by_hand():
    # row 0: prompt 10 11, sampled 20, forced tool output 21, sampled 22; row 1: prompt 10 11, sampled 30
    inputs, targets = pad_rollouts([[10, 11, 20, 21, 22], [10, 11, 30]], [[0, 0, 1, 0, 1], [0, 0, 1]], pad_id=99)
    assert inputs.tolist() == [[10, 11, 20, 21], [10, 11, 30, 99]]
    assert targets.tolist() == [[-1, 20, -1, 22], [-1, 30, -1, -1]]
    assert inputs.dtype == targets.dtype == torch.long


class PositionTable(torch.nn.Module):
    """Logits at position t are a free parameter row table[t], whatever the input (B, T, V)."""

    def __init__(self, T, V):
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(T, V, generator=torch.Generator().manual_seed(0)))

    def forward(self, idx, targets, loss_reduction="mean"):
        B, T = idx.shape
        logits = self.table[:T].unsqueeze(0).expand(B, T, -1)
        return F.cross_entropy(logits.reshape(B * T, -1), targets.reshape(-1), ignore_index=-1,
                               reduction=loss_reduction)


def stub_batch():
    targets = torch.tensor([[-1, 3, 0, -1, 4],
                            [-1, 1, -1, -1, -1],
                            [-1, 2, 2, -1, 0]])  # position 0 and 3 never trained
    return torch.zeros_like(targets), targets


def test_loss_and_gradient_match_hand_computation():
    model = PositionTable(5, 6)
    inputs, targets = stub_batch()
    advantages = torch.tensor([0.5, -1.0, 0.25])
    loss = policy_gradient_loss(model, inputs, targets, advantages, num_chunks=3)
    loss.backward()

    table = model.table.detach()
    logp = torch.log_softmax(table, dim=-1)  # (T, V)
    probs = logp.exp()
    trained = [(b, t, int(targets[b, t])) for b in range(3) for t in range(5) if targets[b, t] >= 0]
    denom = len(trained) * 3  # 7 trained tokens, 3 passes in the step
    expected_loss = -sum(float(logp[t, y]) * float(advantages[b]) for b, t, y in trained) / denom
    expected_grad = torch.zeros_like(table)
    for b, t, y in trained:  # d(-A logp_y)/d logits = -A (onehot(y) - softmax)
        expected_grad[t] -= float(advantages[b]) * (F.one_hot(torch.tensor(y), 6).float() - probs[t]) / denom
    assert loss.item() == pytest.approx(expected_loss, rel=1e-6)
    assert torch.allclose(model.table.grad, expected_grad, atol=1e-7)
    assert model.table.grad[[0, 3]].abs().max() == 0  # untrained positions get no gradient at all


def test_equal_rewards_give_zero_gradient():
    """advantage = reward - mean: a question whose samples all score the same teaches nothing."""
    inputs, targets = stub_batch()
    for rewards in ([1.0, 1.0, 1.0], [0.0, 0.0, 0.0]):
        model = PositionTable(5, 6)
        r = torch.tensor(rewards)
        policy_gradient_loss(model, inputs, targets, r - r.mean(), num_chunks=1).backward()
        assert model.table.grad.abs().max() == 0


def test_positive_advantage_raises_sampled_logprob():
    model = PositionTable(5, 6)
    inputs, targets = stub_batch()
    before = torch.log_softmax(model.table.detach(), -1)[1, 3].item()
    policy_gradient_loss(model, inputs, targets, torch.tensor([1.0, 0.0, 0.0]), num_chunks=1).backward()
    with torch.no_grad():
        model.table -= 0.1 * model.table.grad
    assert torch.log_softmax(model.table.detach(), -1)[1, 3].item() > before


def test_real_gpt_matches_log_softmax_reference():
    """Through the GPT's fused CPU loss path: same loss and gradients as log_softmax of its plain logits."""
    from nanochat.gpt import GPT, GPTConfig
    torch.manual_seed(0)
    config = GPTConfig(sequence_len=16, vocab_size=40, n_layer=2, n_head=2, n_kv_head=2, n_embd=32, window_pattern="L")
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device="cpu")
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():  # init leaves some weights at zero; make every path carry gradient
            p.add_(0.05 * torch.randn_like(p))
    seqs = [torch.randint(0, 40, (n,)).tolist() for n in (12, 9, 7)]
    masks = [[0] * 4 + [1] * (n - 4) for n in (12, 9, 7)]
    masks[0][7] = 0  # a forced tool-output token inside the completion
    inputs, targets = pad_rollouts(seqs, masks, pad_id=39)
    advantages = torch.tensor([0.7, -0.2, -0.5])

    loss = policy_gradient_loss(model, inputs, targets, advantages, num_chunks=2)
    grads = torch.autograd.grad(loss, list(model.parameters()))

    logits = model(inputs)  # (B, T, V), the plain (non-fused) path
    logp = torch.log_softmax(logits, -1).gather(2, targets.clamp(min=0).unsqueeze(2)).squeeze(2)  # (B, T)
    valid = (targets >= 0).float()
    reference = -(logp * valid * advantages[:, None]).sum() / (valid.sum() * 2)
    ref_grads = torch.autograd.grad(reference, list(model.parameters()))
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5, abs=1e-7)
    for g, r in zip(grads, ref_grads):
        assert torch.allclose(g, r, atol=1e-6, rtol=1e-4)


def check_rl_outputs(base_dir, out, world_size=1):
    for step in (0, 1):
        assert f"step {step:05d}/00002 | reward " in out and f"step {step:05d} | pass@1 " in out, out
    assert "step 00002 | pass@1 " in out  # the final evaluation, after the last update
    ckpt = os.path.join(base_dir, "chatrl_checkpoints", "d2")
    # step S holds the weights after S updates, as in the other stages; step 0 (nothing trained) is not saved
    assert sorted(os.listdir(ckpt)) == sorted([f"{kind}_{s:06d}{ext}" for s in (1, 2) for kind, ext in
                                               (("meta", ".json"), ("model", ".pt"))] +
                                              [f"optim_{s:06d}_rank{r}.pt" for s in (1, 2) for r in range(world_size)])
    meta = json.load(open(os.path.join(ckpt, "meta_000002.json")))
    assert meta["step"] == 2 and meta["model_config"]["n_layer"] == 2 and meta["world_size"] == world_size
    assert 0.0 <= meta["val_pass_at_1"] <= meta["pass@2"] <= 1.0  # pass@k grows with k
    assert os.path.exists(os.path.join(base_dir, "report", "chat-rl.md"))


def test_smoke_run_saves_loadable_checkpoint(chat_base_dir, tiny_data_dir, monkeypatch):
    out = run_module("scripts.chat_rl", RL_ARGS, chat_base_dir, tiny_data_dir).stdout
    check_rl_outputs(chat_base_dir, out)
    monkeypatch.setenv("NANOCHAT_BASE_DIR", chat_base_dir)
    from nanochat.model_loader import load_model
    model, tok, meta = load_model("rl", "cpu", phase="eval")
    assert meta["step"] == 2 and model.config.vocab_size == tok.get_vocab_size()


def step_lines(out):
    """{step: its line without the timing fields} of every RL step logged."""
    return {int(m.group(1)): [f for f in m.group(0).split(" | ") if not f.startswith(("dt ", "eta "))]
            for m in re.finditer(r"^step (\d+)/\d+ \|.*$", out, re.M)}


def test_resume_reproduces_the_uninterrupted_run(chat_base_dir, tiny_data_dir):
    args = [a for a in RL_ARGS if not a.startswith("--num-steps")] + ["--num-steps=3"]
    full = run_module("scripts.chat_rl", args, chat_base_dir, tiny_data_dir).stdout
    steps = step_lines(full)
    assert sorted(steps) == [0, 1, 2], full[-2000:]
    ckpt = os.path.join(chat_base_dir, "chatrl_checkpoints", "d2")
    final = torch.load(os.path.join(ckpt, "model_000003.pt"), weights_only=True)
    resumed = run_module("scripts.chat_rl", args + ["--resume-from-step=1"], chat_base_dir, tiny_data_dir).stdout
    assert "resumed from step 1" in resumed
    rsteps = step_lines(resumed)
    assert sorted(rsteps) == [1, 2] and all(rsteps[s] == steps[s] for s in rsteps), (rsteps, steps)
    passk = re.compile(r"^step (\d+) \| (pass@1 .*)$", re.M)
    assert passk.findall(resumed) == [p for p in passk.findall(full) if int(p[0]) >= 1]
    after = torch.load(os.path.join(ckpt, "model_000003.pt"), weights_only=True)
    assert all(torch.equal(after[k], final[k]) for k in final)


def test_nonfinite_update_stops_with_status_2(chat_base_dir, tiny_data_dir):
    args = [a for a in RL_ARGS if not a.startswith(("--num-steps", "--save-every"))]
    proc = run_module("scripts.chat_rl", args + ["--num-steps=1", "--unembedding-lr=inf"], chat_base_dir,
                      tiny_data_dir, check=False)
    assert proc.returncode == 2, proc.stdout[-3000:]
    assert "ERROR: non-finite weights at step 1" in proc.stdout and "Traceback" not in proc.stdout
    assert not os.path.exists(os.path.join(chat_base_dir, "chatrl_checkpoints", "d2", "model_000001.pt"))
    # no save due at step 1: the NaN weights reach the next step's loss, whose guard stops the run
    proc = run_module("scripts.chat_rl", args + ["--num-steps=2", "--unembedding-lr=inf"], chat_base_dir,
                      tiny_data_dir, check=False)
    assert proc.returncode == 2, proc.stdout[-3000:]
    assert re.search(r"ERROR: non-finite loss or gradient at step 1\b", proc.stdout), proc.stdout[-3000:]
    assert "Traceback" not in proc.stdout and not os.path.exists(os.path.join(chat_base_dir, "chatrl_checkpoints"))


def test_bad_flags(chat_base_dir, tiny_data_dir):
    proc = run_module("scripts.chat_rl", ["--num-samples=4", "--device-batch-size=3"], chat_base_dir, tiny_data_dir,
                      check=False)
    assert proc.returncode != 0 and "must be a multiple of --device-batch-size=3" in proc.stdout, proc.stdout


@pytest.mark.slow
def test_two_ranks_save_without_deadlock(chat_base_dir, tiny_data_dir):
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "scripts.chat_rl", "--", *RL_ARGS], cwd=REPO,
                          env=script_env(chat_base_dir, tiny_data_dir), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[:3000] + "\n...\n" + proc.stdout[-6000:]  # rank errors come first
    check_rl_outputs(chat_base_dir, proc.stdout, world_size=2)
