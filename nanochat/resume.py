"""
Exact resume of a training run: what every stage saves at a checkpoint (the model, this rank's optimizer
shard, the loader's position and the RNG states), the meta every stage writes, and putting all of it back.
The files themselves (layout, atomic writes, checks on load) are checkpoint_manager's.
"""

import os
import math
import random
from dataclasses import dataclass

import torch

from nanochat import checkpoint_manager as ckpt
from nanochat.common import print0
from nanochat.files import CheckpointError, describe_error
from nanochat.train_step import check_finite_params


def get_rng_state():
    """RNG states as tensors/ints only, so they load with torch.load(weights_only=True)."""
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
             "python_pos": random.getstate()[2]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state):
    if not state:
        return
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), state["python_pos"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def restore_training_state(model, optimizer, model_state, optim_state, checkpoint_dir, step, rank=0):
    """Load a resumed step into the live model and optimizer; a state of the wrong shape names its file."""
    model_path = os.path.join(checkpoint_dir, f"model_{step:06d}.pt")
    optim_path = os.path.join(checkpoint_dir, f"optim_{step:06d}_rank{rank}.pt")
    fix = "resume with the flags of the original run, from another step, or start afresh without resuming"
    try:
        model.load_state_dict(model_state, strict=True)
    except (RuntimeError, KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{model_path} does not fit the model being resumed ({describe_error(e)}); {fix}") from None
    try:
        optimizer.load_state_dict(optim_state["optimizer"])
    except (RuntimeError, KeyError, ValueError, TypeError, IndexError, AttributeError) as e:
        raise CheckpointError(f"{optim_path} does not fit this model's optimizer ({describe_error(e)}); {fix}") from None
    for p, state in optimizer.state.items():
        for name, value in state.items():
            # AdamW moments may be this rank's slice of rows of the parameter and Muon's are stacked per
            # group: either way the dims after the first are the parameter's own
            if not (torch.is_tensor(value) and name in ("exp_avg", "exp_avg_sq", "momentum_buffer")):
                continue
            own = tuple(p.shape[1:]) if name != "momentum_buffer" else tuple(p.shape)
            if value.dim() != len(own) + 1 or tuple(value.shape[1:]) != own:
                raise CheckpointError(f"{optim_path}: optimizer state {name!r} has shape {tuple(value.shape)}, "
                                      f"its parameter {tuple(p.shape)}; {fix}")


def strict_json(obj):
    """A copy with every NaN/inf float replaced by None: metas stay strict JSON (json.loads of any tool)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    return obj


def stage_meta(run, config, user_config, tokenizer, world_size, **extra):
    """The meta every stage writes: the step, its validation figure (None unless measured at this very
    step), the full model config, the flags, the loop state for resume and the tokenizer's identity."""
    meta = {"step": run.step, run.val_name: run.val_now(), "model_config": ckpt.config_to_dict(config),
            "user_config": user_config, "world_size": world_size, **extra, "loop_state": run.loop_state(),
            "tokenizer": ckpt.tokenizer_info(tokenizer)}
    return strict_json(meta)


@dataclass
class Checkpoints:
    """Where and how a run saves: model + this rank's optimizer shard + loader position + RNG, so a resumed
    run continues exactly; non-finite weights are refused. Every rank calls save() (it has a barrier).
    `write=False` (a dry run) saves nothing."""
    directory: str
    model: torch.nn.Module
    optimizer: object
    rank: int
    device: torch.device
    save_every: int = -1  # also at these steps (-1: only at the end)
    write: bool = True
    resumed_from: int = -1

    def due(self, step):
        """A periodic save falls on this step: every save_every steps, never step 0 (nothing trained yet) nor the
        step this run resumed from (it is on disk already). The last step's save is the script's to call."""
        return self.save_every > 0 and step > 0 and step % self.save_every == 0 and step != self.resumed_from

    def save(self, step, meta, loader_state):
        """Write step `step` (every rank calls it); refuses non-finite weights."""
        if not self.write:
            return
        check_finite_params(self.model, step, self.device)
        state = {"optimizer": self.optimizer.state_dict(), "loader": loader_state, "rng": get_rng_state()}
        ckpt.save_checkpoint(self.directory, step, self.model.state_dict(), state, strict_json(meta), rank=self.rank)

    def resume(self, step, run):
        """Restore a saved step into the model, the optimizer (this rank's shard), the RNG and `run`; returns
        the loader state. Call it last before the loop: drawing random numbers after it shifts the RNG."""
        model_state, state, meta = ckpt.load_checkpoint(self.directory, step, self.device, load_optimizer=True,
                                                        rank=self.rank)
        restore_training_state(self.model, self.optimizer, model_state, state, self.directory, step, self.rank)
        set_rng_state(state.get("rng"))
        run.restore(meta)
        self.resumed_from = step  # that step is on disk already
        print0(f"resumed from step {meta['step']} of {self.directory}")
        return state["loader"]
