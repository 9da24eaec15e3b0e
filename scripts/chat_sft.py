"""
Supervised fine-tuning (REFERENCE 7.8, decisions D8 and D9): a small curated mixture, one
conversation per row, only the assistant's tokens are trained. The loss of a step is the mean over
all supervised tokens of that step, across micro-batches and ranks. `--loss=dft` weights each
token's cross-entropy by the model's own (stop-gradient) probability of it (REFERENCE 7.9).

One CPU process, offline mirror:
    NANOCHAT_DATA_DIR=../shared/data python -m scripts.chat_sft --device-batch-size=4 --num-iterations=100
With DFT:
    python -m scripts.chat_sft --loss=dft --dft-alpha=1.0
8 GPUs:
    torchrun --standalone --nproc_per_node=8 -m scripts.chat_sft -- --run=sft
Resume from saved step S: the same flags plus --resume-from-step=S.
"""

import os
import argparse

import torch

from nanochat.common import (compute_init, compute_cleanup, print0, get_base_dir, resolve_precision, get_wandb,
                             get_max_memory)
from nanochat.checkpoint_manager import load_model
from nanochat import checkpoint_manager as ckpt
from nanochat.chat_loader import SFTBatcher
from nanochat.task_eval import run_categorical_eval
from nanochat.report import get_report
from nanochat.training import (set_schedule, check_finite, NonFiniteLossError, get_peak_flops, StepTimer, format_step,
                               all_reduce_sum, supervised_loss, scale_lrs, save_training_checkpoint, resume_training)
from tasks.mixtures import (add_mixture_args, mixtures_from_args, default_sft_sources,
                            default_sft_val_sources)
from tasks.arc import ARC
from tasks.mmlu import MMLU

parser = argparse.ArgumentParser(description="Supervised fine-tuning on a curated conversation mixture")
parser.add_argument("--run", type=str, default="dummy", help="wandb run name ('dummy' disables wandb)")
parser.add_argument("--device-type", type=str, default="", help="cuda|cpu|mps (empty = autodetect)")
parser.add_argument("--dtype", type=str, default="", help="compute dtype override: bfloat16|float16|float32")
parser.add_argument("--source", type=str, default="mid", choices=["mid", "base"], help="which checkpoint to start from")
parser.add_argument("--model-tag", type=str, default=None, help="source checkpoint tag")
parser.add_argument("--model-step", type=int, default=None, help="source checkpoint step")
parser.add_argument("--num-epochs", type=int, default=1, help="epochs over the mixture")
parser.add_argument("--num-iterations", type=int, default=-1, help="optimizer steps (-1 = from --num-epochs)")
parser.add_argument("--device-batch-size", type=int, default=4, help="conversations per forward pass")
parser.add_argument("--target-examples-per-step", type=int, default=32, help="conversations per optimizer step")
parser.add_argument("--max-seq-len", type=int, default=2048, help="conversations are truncated to this many tokens")
parser.add_argument("--embedding-lr", type=float, default=0.2, help="AdamW LR of the token embedding")
parser.add_argument("--unembedding-lr", type=float, default=0.004, help="AdamW LR of lm_head")
parser.add_argument("--matrix-lr", type=float, default=0.02, help="Muon LR of the block matrices")
parser.add_argument("--weight-decay", type=float, default=0.0, help="Muon weight decay")
parser.add_argument("--init-lr-frac", type=float, default=0.02, help="initial LR as a fraction of the above")
parser.add_argument("--loss", type=str, default="ce", choices=["ce", "dft"], help="objective: cross-entropy or DFT")
parser.add_argument("--dft-alpha", type=float, default=1.0, help="DFT weight: w = alpha*p + (1-alpha); 0 equals CE")
parser.add_argument("--eval-every", type=int, default=100, help="val loss every N steps (-1 = only at the end)")
parser.add_argument("--eval-steps", type=int, default=100, help="val batches per evaluation")
parser.add_argument("--eval-metrics-every", type=int, default=200, help="MMLU/ARC-Easy accuracy every N steps")
parser.add_argument("--eval-metrics-max-problems", type=int, default=1024, help="problems per accuracy evaluation")
parser.add_argument("--save-every", type=int, default=-1, help="checkpoint every N steps (-1 = only at the end)")
parser.add_argument("--resume-from-step", type=int, default=-1, help="resume this SFT run from a saved step")
parser.add_argument("--output-tag", type=str, default=None, help="chatsft_checkpoints/<tag> (default d<n_layer>)")
add_mixture_args(parser, default_sft_sources(), default_sft_val_sources())
args = parser.parse_args()
if not 0.0 <= args.dft_alpha <= 1.0:
    parser.error(f"--dft-alpha must be in [0, 1], got {args.dft_alpha}")
user_config = vars(args).copy()
alpha = args.dft_alpha if args.loss == "dft" else 0.0

is_dist, rank, local_rank, world_size, device = compute_init(args.device_type)
master = rank == 0
dtype, _, _ = resolve_precision(device.type, args.dtype or None, compile=False)  # variable-length batches: eager
wandb_run = get_wandb(args.run, "nanochat-sft", user_config, master)

train_ds, val_ds = mixtures_from_args(args)

model, tokenizer, src_meta = load_model(args.source, device, phase="train", model_tag=args.model_tag,
                                        step=args.model_step)
config = model.config
flops_per_token = model.estimate_flops()

examples_per_step = args.device_batch_size * world_size
if args.target_examples_per_step % examples_per_step != 0:
    raise SystemExit(f"--target-examples-per-step={args.target_examples_per_step} must be a multiple of "
                     f"device_batch_size*world_size = {examples_per_step}")
grad_accum_steps = args.target_examples_per_step // examples_per_step
num_iterations = args.num_iterations if args.num_iterations > 0 else \
    (len(train_ds) // args.target_examples_per_step) * args.num_epochs
if num_iterations < 1:
    raise SystemExit(f"the mixture has {len(train_ds)} conversations, fewer than one step of "
                     f"{args.target_examples_per_step}; lower --target-examples-per-step")
print0(f"grad accum: {grad_accum_steps} | iterations: {num_iterations} | loss: {args.loss} (alpha {alpha})")

optimizer = model.setup_optimizers(unembedding_lr=args.unembedding_lr, embedding_lr=args.embedding_lr,
                                   matrix_lr=args.matrix_lr, weight_decay=args.weight_decay)
scale_lrs(optimizer, args.init_lr_frac)

output_dir = os.path.join(get_base_dir(), "chatsft_checkpoints", args.output_tag or f"d{config.n_layer}")
step, val_loss, metrics = 0, None, {}
timer = StepTimer(device, skip=0)
loader_state = None
curves = {"step": [], "loss": [], "val_step": [], "val_loss": []}
peak_flops = get_peak_flops(device, dtype)  # before resuming: measuring it draws random numbers
if args.resume_from_step >= 0:
    loader_state, meta = resume_training(output_dir, args.resume_from_step, model, optimizer, device, rank)
    step, val_loss = meta["step"], meta.get("val_loss")
    curves = meta["loop_state"]["curves"]
    timer = StepTimer(device, skip=0, total_time=meta["loop_state"]["total_training_time"],
                      timed_steps=meta["loop_state"]["timed_steps"])

train_loader = SFTBatcher(train_ds, tokenizer, args.device_batch_size, device=device, max_tokens=args.max_seq_len,
                          state=loader_state)


def run_val_loss():
    loader = SFTBatcher(val_ds, tokenizer, args.device_batch_size, device=device, max_tokens=args.max_seq_len)
    total_nll = torch.zeros((), dtype=torch.float64, device=device)
    total_tokens = torch.zeros((), dtype=torch.float64, device=device)
    model.eval()
    with torch.no_grad():
        for _ in range(args.eval_steps):
            x, y = next(loader)
            nll = model(x, y, loss_reduction="none")
            total_nll += nll.sum().double()  # ignored positions come back as 0
            total_tokens += (y >= 0).sum().double()
    model.train()
    all_reduce_sum(total_nll)
    all_reduce_sum(total_tokens)
    return (total_nll / total_tokens.clamp(min=1)).item()


def run_metrics():
    model.eval()
    out = {}
    for name, task in (("mmlu_acc", MMLU("all", "test")), ("arc_easy_acc", ARC("ARC-Easy", "test"))):
        out[name] = run_categorical_eval(task, tokenizer, model, batch_size=2 * args.device_batch_size,
                                         max_problems=args.eval_metrics_max_problems, device=device)
    model.train()
    return out


def make_meta(step):
    return {"step": step, "val_loss": val_loss, **metrics, "model_config": ckpt.config_to_dict(config),
            "user_config": user_config, "world_size": world_size, "source": args.source,
            "loop_state": {"curves": curves, "total_training_time": timer.total_time, "timed_steps": timer.timed_steps},
            "tokenizer": ckpt.tokenizer_info(tokenizer)}


def save(step):
    save_training_checkpoint(output_dir, step, model, optimizer, train_loader, make_meta(step), rank, device)


def record_final_eval(step):
    """The last step is saved before its evaluation; put that evaluation's results into the step's meta."""
    if master:
        ckpt.update_meta(output_dir, step, make_meta(step))


def evaluate(step, last_step):
    global val_loss, metrics
    if last_step or (args.eval_every > 0 and step % args.eval_every == 0):
        val_loss = run_val_loss()
        curves["val_step"].append(step)
        curves["val_loss"].append(val_loss)
        print0(f"step {step:05d} | val loss {val_loss:.6f}")
        wandb_run.log({"step": step, "val/loss": val_loss})
    if last_step or (args.eval_metrics_every > 0 and step > 0 and step % args.eval_metrics_every == 0):
        metrics = run_metrics()
        print0(f"step {step:05d} | " + " | ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        wandb_run.log({"step": step, **metrics})


train_loss = None
try:
    while True:
        last_step = step == num_iterations
        if last_step:
            save(step)  # the finished model is on disk before the (interruptible) final evaluation
            evaluate(step, last_step)
            record_final_eval(step)
            break
        evaluate(step, last_step)
        if step > 0 and step != args.resume_from_step and args.save_every > 0 and step % args.save_every == 0:
            save(step)

        timer.start()
        lrm = 1.0 - step / num_iterations
        set_schedule(optimizer, lrm)
        # all micro-batches of the step first, so every token is weighted by 1/(supervised tokens of the step)
        batches = [next(train_loader) for _ in range(grad_accum_steps)]
        num_tokens = torch.tensor(sum(int((y >= 0).sum()) for _, y in batches), dtype=torch.long, device=device)
        all_reduce_sum(num_tokens)
        loss_sum, p_sum = 0.0, 0.0
        for x, y in batches:
            loss, p_correct_sum = supervised_loss(model, x, y, int(num_tokens), world_size, alpha)
            loss.backward()
            loss_sum += loss.item() / world_size
            p_sum += p_correct_sum
        stats = torch.tensor([loss_sum, p_sum], dtype=torch.float64, device=device)
        all_reduce_sum(stats)
        train_loss, mean_p = stats[0].item(), stats[1].item() / max(int(num_tokens), 1)
        check_finite(train_loss, step, device, model)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        dt = timer.stop(step)

        tokens_step = sum(x.numel() for x, _ in batches) * world_size
        line, tok_per_sec, mfu = format_step(step, num_iterations, train_loss, lrm, dt, tokens_step, flops_per_token,
                                             peak_flops, world_size, timer,
                                             extra=f"sup tokens {int(num_tokens):,} | p(correct) {mean_p:.4f}")
        print0(line)
        curves["step"].append(step)
        curves["loss"].append(train_loss)
        wandb_run.log({"step": step, "train/loss": train_loss, "train/p_correct": mean_p, "train/lrm": lrm,
                       "train/num_tokens": int(num_tokens)})
        step += 1
except NonFiniteLossError as e:
    print0(f"ERROR: {e}")
    compute_cleanup()
    raise SystemExit(2)

print0(f"peak memory: {get_max_memory(device) / 2**20:.0f} MiB | training time: {timer.total_time / 60:.2f} min")
get_report().log("Chat SFT", [user_config, {
    "Training rows": len(train_ds), "Number of iterations": num_iterations, "DDP world size": world_size,
    "Loss": args.loss, "DFT alpha": alpha, "Training loss": train_loss, "Validation loss": val_loss,
    "MMLU accuracy": metrics.get("mmlu_acc"), "ARC-Easy accuracy": metrics.get("arc_easy_acc")}])
get_report().log_curves("Chat SFT", curves)
wandb_run.finish()
compute_cleanup()
