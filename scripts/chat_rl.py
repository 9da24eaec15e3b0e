"""
Reinforcement learning on GSM8K: on-policy REINFORCE with a mean baseline.
For each question, sample completions through the Engine (calculator active), reward 1 if the
`#### N` answer is right, advantage = reward - mean reward, and push up the log-probability of
the sampled tokens (never the prompt, padding or calculator outputs) in proportion to it.

    python -m scripts.chat_rl --num-steps=20 --examples-per-step=4 --num-samples=4 --max-new-tokens=128
    torchrun --standalone --nproc_per_node=8 -m scripts.chat_rl -- --run=rl
"""

import os
import argparse
import itertools

import torch

from nanochat.common import (compute_init, compute_cleanup, print0, get_base_dir, get_compute_dtype, get_wandb,
                             all_reduce_mean)
from nanochat.checkpoint_manager import load_model
from nanochat import checkpoint_manager as ckpt
from nanochat.engine import Engine
from nanochat.report import get_report
from nanochat.schedules import WARMUP_STEPS, warmup_multiplier, set_schedule, scale_lrs
from nanochat.train_step import guarded_step
from tasks.gsm8k import GSM8K

parser = argparse.ArgumentParser(description="RL on GSM8K")
parser.add_argument("--run", type=str, default="dummy", help="wandb run name ('dummy' disables wandb)")
parser.add_argument("--device-type", type=str, default="", help="cuda|cpu|mps (empty = autodetect)")
parser.add_argument("--dtype", type=str, default="", help="compute dtype override")
parser.add_argument("--source", type=str, default="sft", choices=["sft", "mid"], help="checkpoint to start from")
parser.add_argument("--model-tag", type=str, default=None, help="source checkpoint tag")
parser.add_argument("--model-step", type=int, default=None, help="source checkpoint step")
parser.add_argument("--num-epochs", type=int, default=1, help="epochs over GSM8K train")
parser.add_argument("--num-steps", type=int, default=-1, help="optimizer steps (-1 = from --num-epochs)")
parser.add_argument("--device-batch-size", type=int, default=8, help="max sequences per forward pass")
parser.add_argument("--examples-per-step", type=int, default=16, help="questions per optimizer step (all ranks)")
parser.add_argument("--num-samples", type=int, default=16, help="completions per question")
parser.add_argument("--max-new-tokens", type=int, default=256, help="max tokens per completion")
parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
parser.add_argument("--top-k", type=int, default=50, help="top-k sampling (0 = off)")
parser.add_argument("--embedding-lr", type=float, default=0.2, help="AdamW LR of the token embedding")
parser.add_argument("--unembedding-lr", type=float, default=0.004, help="AdamW LR of lm_head")
parser.add_argument("--matrix-lr", type=float, default=0.02, help="Muon LR of the block matrices")
parser.add_argument("--weight-decay", type=float, default=0.0, help="Muon weight decay")
parser.add_argument("--init-lr-frac", type=float, default=0.05, help="initial LR as a fraction of the above")
parser.add_argument("--warmup-steps", type=int, default=WARMUP_STEPS, help="linear LR warm-up steps (a new optimizer on a trained model)")
parser.add_argument("--eval-every", type=int, default=60, help="pass@k on the test set every N steps")
parser.add_argument("--eval-examples", type=int, default=400, help="test questions per evaluation")
parser.add_argument("--save-every", type=int, default=60, help="checkpoint every N steps")
parser.add_argument("--output-tag", type=str, default=None, help="chatrl_checkpoints/<tag> (default d<n_layer>)")

# The batch and loss math are plain functions above main() so tests can import them without running the script


def pad_rollouts(seqs, masks, pad_id):
    """Sequences (prompt + completion) of unequal length -> (inputs, targets), int64 (B, T-1) each, padded
    with pad_id. Targets are -1 wherever the mask of the predicted token is 0: the prompt, the padding and
    calculator outputs forced by the engine are never trained."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)  # (B, T), padding 0
    for i, (s, m) in enumerate(zip(seqs, masks)):
        ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, :len(m)] = torch.tensor(m, dtype=torch.long)
    inputs, targets = ids[:, :-1], ids[:, 1:].clone()
    targets[mask[:, 1:] == 0] = -1
    return inputs, targets


def policy_gradient_loss(model, inputs, targets, advantages, num_chunks):
    """REINFORCE loss of one forward pass: -sum over trained tokens of logp(token) * advantage of its row,
    divided by the number of trained tokens in the pass and by num_chunks (the passes summed into one
    optimizer step on this rank), so the step's gradient is a token-level mean (DAPO-style).
    inputs/targets (B, T) with -1 = not trained; advantages (B,)."""
    valid = targets >= 0
    nll = model(inputs, targets, loss_reduction="none").view(targets.shape)  # (B, T), 0 where not trained
    logp = -nll * valid  # keep untrained positions out even if a model put something there
    num_valid = valid.sum().clamp(min=1)
    return -(logp * advantages.unsqueeze(1)).sum() / (num_valid * num_chunks)


def main():
    args = parser.parse_args()
    user_config = vars(args).copy()
    for flag in ("device_batch_size", "examples_per_step", "num_samples", "max_new_tokens"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")

    is_dist, rank, local_rank, world_size, device = compute_init(args.device_type)
    master = rank == 0
    get_compute_dtype(device.type, args.dtype or None)
    wandb_run = get_wandb(args.run, "nanochat-rl", user_config, master)

    train_task, val_task = GSM8K("main", "train"), GSM8K("main", "test")
    model, tokenizer, meta = load_model(args.source, device, phase="train", model_tag=args.model_tag, step=args.model_step)
    engine = Engine(model, tokenizer)
    if args.examples_per_step % world_size != 0:
        raise SystemExit(f"--examples-per-step={args.examples_per_step} must be divisible by the world size {world_size}")
    if args.num_samples % args.device_batch_size != 0 and args.num_samples > args.device_batch_size:
        raise SystemExit(f"--num-samples={args.num_samples} must be a multiple of --device-batch-size={args.device_batch_size}")
    examples_per_rank = args.examples_per_step // world_size
    num_steps = args.num_steps if args.num_steps > 0 else (len(train_task) // args.examples_per_step) * args.num_epochs
    pad_id = tokenizer.encode_special("<|assistant_end|>")

    optimizer = model.setup_optimizers(unembedding_lr=args.unembedding_lr, embedding_lr=args.embedding_lr,
                                       matrix_lr=args.matrix_lr, weight_decay=args.weight_decay)
    scale_lrs(optimizer, args.init_lr_frac)
    output_dir = os.path.join(get_base_dir(), "chatrl_checkpoints", args.output_tag or f"d{model.config.n_layer}")

    @torch.no_grad()
    def rollouts(example_idx, step):
        """Sample num_samples completions of one question; returns (ids list, masks list, rewards tensor)."""
        conv = train_task[example_idx]
        prompt = tokenizer.render_for_completion(conv)
        model.eval()
        seqs, masks = [], []
        per_call = min(args.device_batch_size, args.num_samples)
        for sampling_step in range(max(1, args.num_samples // per_call)):
            seed = hash((step, example_idx, sampling_step)) & 0x7FFFFFFF
            out, out_masks = engine.generate_batch(prompt, num_samples=per_call, max_tokens=args.max_new_tokens,
                                                   temperature=args.temperature, top_k=args.top_k or None, seed=seed)
            seqs += out
            masks += out_masks
        model.train()
        rewards = [train_task.reward(conv, tokenizer.decode(s[len(prompt):])) for s in seqs]
        return seqs, masks, torch.tensor(rewards, dtype=torch.float32, device=device)

    @torch.no_grad()
    def pass_at_k(num_questions, k):
        """Fraction of test questions with at least one correct answer among the first j samples, j = 1..k."""
        model.eval()
        hits, total = torch.zeros(k, device=device), torch.zeros((), device=device)
        for i in range(rank, min(num_questions, len(val_task)), world_size):
            conv = val_task[i]
            prompt = tokenizer.render_for_completion(conv)
            out, _ = engine.generate_batch(prompt, num_samples=k, max_tokens=args.max_new_tokens, temperature=1.0,
                                           top_k=50, seed=i)
            correct = torch.tensor([val_task.evaluate(conv, tokenizer.decode(s[len(prompt):])) for s in out],
                                   dtype=torch.float32, device=device)
            hits += (torch.cumsum(correct, 0) > 0).float()
            total += 1
        model.train()
        if is_dist:
            torch.distributed.all_reduce(hits)
            torch.distributed.all_reduce(total)
        return (hits / total.clamp(min=1)).tolist()

    train_indices = itertools.count(rank, world_size)  # questions rank, rank+W, ... cycling over the train set
    for step in range(num_steps):
        if args.eval_every > 0 and step % args.eval_every == 0:
            passk = pass_at_k(args.eval_examples, args.device_batch_size)
            print0(f"step {step:05d} | " + " | ".join(f"pass@{j + 1} {p:.4f}" for j, p in enumerate(passk)))
            wandb_run.log({"step": step, **{f"pass@{j + 1}": p for j, p in enumerate(passk)}})

        lrm = warmup_multiplier(step, args.warmup_steps) * (1.0 - step / num_steps)
        set_schedule(optimizer, lrm)
        mean_rewards, mean_lengths, loss_total = [], [], torch.zeros((), device=device)
        for _ in range(examples_per_rank):
            idx = next(train_indices) % len(train_task)
            seqs, masks, rewards = rollouts(idx, step)
            advantages = rewards - rewards.mean()  # no std normalisation: equal rewards teach nothing, as they should
            mean_rewards.append(rewards.mean().item())
            mean_lengths.append(sum(len(s) for s in seqs) / len(seqs))
            passes = range(0, len(seqs), args.device_batch_size)
            for b in passes:
                inputs, targets = pad_rollouts(seqs[b:b + args.device_batch_size], masks[b:b + args.device_batch_size],
                                               pad_id)
                loss = policy_gradient_loss(model, inputs.to(device), targets.to(device),
                                            advantages[b:b + args.device_batch_size],
                                            num_chunks=len(passes) * examples_per_rank)
                loss.backward()
                loss_total += loss.detach()
        guarded_step(step, optimizer, model, loss_total)  # stops before the update on a NaN/inf loss or gradient
        mean_reward = all_reduce_mean(sum(mean_rewards) / len(mean_rewards), device)
        mean_len = all_reduce_mean(sum(mean_lengths) / len(mean_lengths), device)
        print0(f"step {step:05d}/{num_steps:05d} | reward {mean_reward:.4f} | seq len {mean_len:.1f} | lrm {lrm:.3f}")
        wandb_run.log({"step": step, "reward": mean_reward, "sequence_length": mean_len})

        if (step > 0 and step % args.save_every == 0) or step == num_steps - 1:  # every rank calls (barrier inside)
            ckpt.save_checkpoint(output_dir, step, model.state_dict(), None,
                                 {"step": step, "model_config": ckpt.config_to_dict(model.config),
                                  "user_config": user_config, "tokenizer": ckpt.tokenizer_info(tokenizer)}, rank=rank)

    get_report().log("Chat RL", [user_config])
    wandb_run.finish()
    compute_cleanup()


if __name__ == "__main__":
    main()
