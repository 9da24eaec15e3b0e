"""
Reinforcement learning on GSM8K: on-policy REINFORCE with a mean baseline.
For each question, sample completions through the Engine (calculator active), reward 1 if the
`#### N` answer is right, advantage = reward - mean reward, and push up the log-probability of
the sampled tokens (never the prompt, padding or calculator outputs) in proportion to it.

One CPU process, offline mirror:
    NANOCHAT_DATA_DIR=../shared/data python -m scripts.chat_rl --num-steps=20 --examples-per-step=4 \
        --num-samples=4 --max-new-tokens=128
8 GPUs:
    torchrun --standalone --nproc_per_node=8 -m scripts.chat_rl -- --run=rl
Resume from saved step S: the same flags plus --resume-from-step=S.
"""

import os
import argparse

import torch

from nanochat.common import compute_init, compute_cleanup, print0, get_base_dir, resolve_precision
from nanochat.model_loader import load_model
from nanochat.files import install_error_handler
from nanochat.engine import Engine
from nanochat.report import get_report
from nanochat.task_eval import pass_at_k
from nanochat.schedules import WARMUP_STEPS, warmup_multiplier, set_schedule, scale_lrs
from nanochat.train_step import guarded_step, stop_on_nonfinite, evaluating
from nanochat.run_state import RunState, start_run
from nanochat.resume import Checkpoints, stage_meta
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
parser.add_argument("--save-every", type=int, default=60, help="checkpoint every N steps (and at the end)")
parser.add_argument("--resume-from-step", type=int, default=-1, help="resume this RL run from a saved step")
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
    install_error_handler()
    for flag in ("device_batch_size", "examples_per_step", "num_samples", "max_new_tokens"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")

    is_dist, rank, local_rank, world_size, device = compute_init(args.device_type)
    # mostly sampling: the inference default (fp32 eager on a CPU), eager because the rollouts vary in length
    dtype, _, _ = resolve_precision(device.type, args.dtype or None, compile=False, training=False)
    user_config, wandb_run = start_run(args, "nanochat-rl", device, dtype, rank=rank)

    train_task, val_task = GSM8K("main", "train"), GSM8K("main", "test")
    model, tokenizer, _ = load_model(args.source, device, phase="train", model_tag=args.model_tag, step=args.model_step,
                                     dtype=dtype)
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
    checkpoints = Checkpoints(os.path.join(get_base_dir(), "chatrl_checkpoints", args.output_tag or f"d{model.config.n_layer}"),
                              model, optimizer, rank, device, save_every=args.save_every)
    run = RunState("val_pass_at_1")  # the validation figure: pass@1 on the test questions
    loader_state = checkpoints.resume(args.resume_from_step, run) if args.resume_from_step >= 0 else None
    # this rank's questions are rank, rank+W, ... cycling over the train set; the position is saved with the step
    next_question = loader_state["next_question"] if loader_state else rank

    def rollouts(example_idx, step):
        """Sample num_samples completions of one question; returns (ids list, masks list, rewards tensor)."""
        conv = train_task[example_idx]
        prompt = tokenizer.render_for_completion(conv)
        seqs, masks = [], []
        per_call = min(args.device_batch_size, args.num_samples)
        with evaluating(model):
            for sampling_step in range(max(1, args.num_samples // per_call)):
                seed = hash((step, example_idx, sampling_step)) & 0x7FFFFFFF
                out, out_masks = engine.generate_batch(prompt, num_samples=per_call, max_tokens=args.max_new_tokens,
                                                       temperature=args.temperature, top_k=args.top_k or None, seed=seed)
                seqs += out
                masks += out_masks
        rewards = [train_task.reward(conv, tokenizer.decode(s[len(prompt):])) for s in seqs]
        return seqs, masks, torch.tensor(rewards, dtype=torch.float32, device=device)

    def meta():
        return stage_meta(run, model.config, user_config, tokenizer, world_size, source=args.source,
                          **run.metrics_now())

    # The loop: the evaluation due at this step, the save when due, the stop, then the step
    with stop_on_nonfinite():
        while True:
            step, last_step = run.step, run.step == num_steps
            if args.eval_every > 0 and (last_step or step % args.eval_every == 0):
                with evaluating(model):
                    passk = pass_at_k(val_task, tokenizer, engine, num_samples=args.device_batch_size,
                                      max_new_tokens=args.max_new_tokens, temperature=1.0, top_k=50,
                                      max_problems=args.eval_examples, device=device)
                run.record_val(passk[0])
                run.record_metrics({f"pass@{k}": p for k, p in enumerate(passk[1:], 2)})
                print0(f"step {step:05d} | " + " | ".join(f"pass@{k} {p:.4f}" for k, p in enumerate(passk, 1)))
                wandb_run.log({"step": step, **{f"pass@{k}": p for k, p in enumerate(passk, 1)}})
            if last_step or checkpoints.due(step):
                checkpoints.save(step, meta(), {"next_question": next_question})
            if last_step:
                break

            run.timer.start()
            lrm = warmup_multiplier(step, args.warmup_steps) * (1.0 - step / num_steps)
            set_schedule(optimizer, lrm)
            rewards_sum, lengths_sum, loss_total = 0.0, 0.0, torch.zeros((), device=device)
            for _ in range(examples_per_rank):
                idx = next_question % len(train_task)
                next_question += world_size
                seqs, masks, rewards = rollouts(idx, step)
                advantages = rewards - rewards.mean()  # no std normalisation: equal rewards teach nothing, as they should
                rewards_sum += rewards.mean()
                lengths_sum += sum(len(s) for s in seqs) / len(seqs)
                passes = range(0, len(seqs), args.device_batch_size)
                for b in passes:
                    inputs, targets = pad_rollouts(seqs[b:b + args.device_batch_size],
                                                   masks[b:b + args.device_batch_size], pad_id)
                    loss = policy_gradient_loss(model, inputs.to(device), targets.to(device),
                                                advantages[b:b + args.device_batch_size],
                                                num_chunks=len(passes) * examples_per_rank)
                    loss.backward()
                    loss_total += loss.detach()
            # stops before the update on a NaN/inf loss or gradient; the means ride on the step's one all-reduce
            n = examples_per_rank * world_size
            loss, (mean_reward, mean_len) = guarded_step(step, optimizer, model, loss_total,
                                                         extras=[rewards_sum / n, loss_total.new_tensor(lengths_sum / n)])
            dt = run.timer.stop(step)
            run.record_loss(loss)
            print0(f"step {step:05d}/{num_steps:05d} | reward {mean_reward:.4f} | seq len {mean_len:.1f} | "
                   f"lrm {lrm:.3f} | dt {dt * 1000:.0f}ms | eta {run.timer.eta(num_steps - step)} | "
                   f"raw loss {loss:.17g}")
            wandb_run.log({"step": step, "reward": mean_reward, "sequence_length": mean_len, "train/loss": loss})
            run.step += 1

    get_report().log("Chat RL", [user_config, {"Number of steps": num_steps, "DDP world size": world_size,
                                               "Final pass@1": run.val_now(), **run.metrics_now()}])
    get_report().log_curves("Chat RL", run.curves)
    wandb_run.finish()
    compute_cleanup()


if __name__ == "__main__":
    main()
