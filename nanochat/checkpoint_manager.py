"""
Checkpoint files: writing a step, finding one, and reading it back checked. Step S of a directory is:

    model_{S:06d}.pt          model.state_dict() (rank 0)
    optim_{S:06d}_rank{r}.pt  the script's per-rank dict (optimizer shard, loader state, RNG...), optional
    meta_{S:06d}.json         step, full model config, user config, loop state, tokenizer identity...

Each file is written to a temporary name and renamed into place; the meta goes last (after a barrier
under several ranks), so a step is complete exactly when its meta exists and a crash mid-save leaves the
previous step loadable. Files are read with torch.load(weights_only=True), so no code runs on load: the
per-rank dict may hold only tensors, plain containers, numbers, strings, bools and None (convert numpy
states with torch.from_numpy or .tolist()). A file that cannot be used raises CheckpointError, one line
naming it (nanochat/files.py).

Owns the files only: building a model from a step is model_loader's, what a training run saves and how it
resumes is resume's.
"""

import os
import re
import json
import glob
import hashlib
import logging
from dataclasses import fields

import torch
import torch.distributed as dist

from nanochat.files import CheckpointError, MissingFileError, load_json_file, load_tensor_file

logger = logging.getLogger("nanochat")

# where each stage's checkpoints live under the base directory, one sub-directory per model tag
SOURCE_DIRS = {"base": "base_checkpoints", "mid": "mid_checkpoints", "sft": "chatsft_checkpoints",
               "rl": "chatrl_checkpoints"}


def _meta_steps(checkpoint_dir):
    """Sorted steps with a meta json in the directory."""
    return sorted(int(m.group(1)) for path in glob.glob(os.path.join(checkpoint_dir, "meta_*.json"))
                  if (m := re.fullmatch(r"meta_(\d+)\.json", os.path.basename(path))))


def _complete_steps(checkpoint_dir):
    return ", ".join(map(str, _meta_steps(checkpoint_dir))) or "none"


def other_step_hint(checkpoint_dir):
    """What to do about a damaged step: the `fix` part of its error line."""
    return (f"re-save it, or load another step with the script's --step/--model-step flag "
            f"(steps with a meta here: {_complete_steps(checkpoint_dir)})")


# -----------------------------------------------------------------------------
# Saving


def _atomic_save(path, write, mode="wb"):
    """write(f) into a temporary file, fsync it, then rename it to `path`."""
    tmp = path + ".tmp"
    with open(tmp, mode, encoding=None if "b" in mode else "utf-8") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _save_meta(meta, path):
    _atomic_save(path, lambda f: json.dump(meta, f, indent=2), "w")


def save_checkpoint(checkpoint_dir, step, model_state, optim_state, meta, rank=0):
    """Save step `step`: rank 0 writes the model, every rank its optim_state (if not None), and rank 0
    writes the meta json last. Under torch.distributed every rank must call this (it has a barrier)."""
    os.makedirs(checkpoint_dir, exist_ok=True)
    meta_path = os.path.join(checkpoint_dir, f"meta_{step:06d}.json")
    if rank == 0:
        if os.path.exists(meta_path):
            os.remove(meta_path)  # re-saving a step: it is incomplete until the new meta lands
        _atomic_save(os.path.join(checkpoint_dir, f"model_{step:06d}.pt"), lambda f: torch.save(model_state, f))
    if optim_state is not None:
        optim_path = os.path.join(checkpoint_dir, f"optim_{step:06d}_rank{rank}.pt")
        _atomic_save(optim_path, lambda f: torch.save(optim_state, f))
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()  # every rank's shard is on disk before the step is declared complete
    if rank == 0:
        _save_meta(meta, meta_path)
        logger.info(f"saved checkpoint step {step} to {checkpoint_dir}")


def tokenizer_fingerprint(tokenizer):
    """sha256 of the tokenizer's content (mergeable ranks, split pattern, special tokens)."""
    h = hashlib.sha256()
    ranks = getattr(tokenizer, "mergeable_ranks", None)
    if ranks is not None:
        for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
            h.update(rank.to_bytes(4, "little") + len(token).to_bytes(2, "little") + token)
        h.update(tokenizer.pattern.encode("utf-8"))
        h.update(json.dumps(sorted(tokenizer.special_ids.items())).encode("utf-8"))
    else:  # any other tokenizer: hash its decoded vocabulary
        for i in range(tokenizer.get_vocab_size()):
            h.update(tokenizer.decode([i]).encode("utf-8", errors="surrogatepass") + b"\0")
    return h.hexdigest()


def load_meta(checkpoint_dir, step):
    path = os.path.join(checkpoint_dir, f"meta_{step:06d}.json")
    if not os.path.exists(path):
        raise MissingFileError(f"no complete checkpoint of step {step} in {checkpoint_dir} (missing {path})")
    return load_json_file(path, other_step_hint(checkpoint_dir))


def saved_model_config(meta, where, fix):
    """meta["model_config"] as saved (a dict, not yet checked as a GPTConfig: model_loader does that)."""
    if not isinstance(meta.get("model_config"), dict):
        raise CheckpointError(f"{where} has no 'model_config' object (an edited or foreign meta?); {fix}")
    return meta["model_config"]


def config_to_dict(config):
    """The full GPTConfig as a plain dict, which meta["model_config"] always stores (so a checkpoint
    rebuilds its model without the flags of the run that made it)."""
    return {f.name: getattr(config, f.name) for f in fields(config)}


def check_resume_config(meta, config, tokenizer, checkpoint_dir=""):
    """A resumed run must rebuild exactly the model and tokenizer that were saved; say what differs."""
    saved = saved_model_config(meta, f"the meta json of the step resumed in {checkpoint_dir}",
                               "resume from another step, or start afresh without resuming")
    now = config_to_dict(config)
    diffs = [f"{k}: checkpoint {saved.get(k)!r} vs now {now.get(k)!r}" for k in sorted(set(saved) | set(now))
             if saved.get(k) != now.get(k)]
    if diffs:
        raise CheckpointError(f"cannot resume {checkpoint_dir}: the model config differs ({'; '.join(diffs)}); "
                              f"rerun with the flags of the original run")
    check_tokenizer(tokenizer, meta, checkpoint_dir)


def tokenizer_info(tokenizer):
    """What training scripts store as meta["tokenizer"] so loading can check it is the same tokenizer."""
    return {"vocab_size": tokenizer.get_vocab_size(), "fingerprint": tokenizer_fingerprint(tokenizer)}

# -----------------------------------------------------------------------------
# Finding and loading


def find_last_step(checkpoint_dir):
    """Largest complete step (its meta json and model file exist) in the directory."""
    steps = [s for s in _meta_steps(checkpoint_dir)
             if os.path.exists(os.path.join(checkpoint_dir, f"model_{s:06d}.pt"))]
    if not steps:
        raise MissingFileError(f"no complete checkpoint (meta_*.json + model_*.pt) in {checkpoint_dir}")
    return max(steps)


def find_largest_model(checkpoints_dir):
    """The model tag to load by default: largest d<N>, else the most recently modified directory."""
    if not os.path.isdir(checkpoints_dir):
        raise MissingFileError(f"checkpoint directory {checkpoints_dir} does not exist; train that stage first")
    tags = [d for d in os.listdir(checkpoints_dir) if os.path.isdir(os.path.join(checkpoints_dir, d))]
    if not tags:
        raise MissingFileError(f"no model tags (sub-directories) in {checkpoints_dir}; train that stage first")
    depth_tags = [(int(m.group(1)), t) for t in tags if (m := re.fullmatch(r"d(\d+)", t))]
    if depth_tags:
        return max(depth_tags)[1]
    return max(tags, key=lambda t: os.path.getmtime(os.path.join(checkpoints_dir, t)))


def step_paths(checkpoint_dir, step):
    """(meta json, model file) of a step, both present (MissingFileError otherwise)."""
    meta_path = os.path.join(checkpoint_dir, f"meta_{step:06d}.json")
    model_path = os.path.join(checkpoint_dir, f"model_{step:06d}.pt")
    if not os.path.exists(meta_path) or not os.path.exists(model_path):
        raise MissingFileError(f"step {step} in {checkpoint_dir} is missing or incomplete (needs "
                               f"{os.path.basename(model_path)} and {os.path.basename(meta_path)}); the complete "
                               f"steps are the ones with a meta json ({_complete_steps(checkpoint_dir)})")
    return meta_path, model_path


def load_model_state(model_path, device, fix, max_bytes=None):
    """The state dict of a model file: named tensors only, torch.compile's key prefix removed."""
    state = load_tensor_file(model_path, device, fix, max_bytes=max_bytes)
    bad = [k for k, v in state.items() if not (isinstance(k, str) and torch.is_tensor(v))]
    if bad:
        raise CheckpointError(f"{model_path} is not a model state dict (entry {bad[0]!r} is not a named tensor); {fix}")
    return {k.removeprefix("_orig_mod."): v for k, v in state.items()}  # torch.compile's prefix


def load_checkpoint(checkpoint_dir, step, device, load_optimizer=False, rank=0):
    """(model_state, optim_state or None, meta) of a complete step; tensors mapped to `device`."""
    meta_path, model_path = step_paths(checkpoint_dir, step)
    fix = other_step_hint(checkpoint_dir)
    meta = load_json_file(meta_path, fix)
    model_state = load_model_state(model_path, device, fix)
    optim_state = None
    if load_optimizer:
        optim_path = os.path.join(checkpoint_dir, f"optim_{step:06d}_rank{rank}.pt")
        if not os.path.exists(optim_path):
            raise MissingFileError(f"{optim_path} not found: step {step} has no optimizer state for rank {rank} "
                                    f"(was it saved with the same number of ranks?)")
        optim_state = load_tensor_file(optim_path, device, "resume from another step (steps with a meta here: "
                                  f"{_complete_steps(checkpoint_dir)}), or start the run afresh without resuming")
    return model_state, optim_state, meta


def check_tokenizer(tokenizer, meta, checkpoint_dir):
    """The tokenizer a checkpoint was trained with, by vocabulary size and fingerprint; say what differs."""
    vocab = meta["model_config"].get("vocab_size")
    where = "the tokenizer in $NANOCHAT_BASE_DIR/tokenizer"
    fix = ("use the NANOCHAT_BASE_DIR of the run that trained this checkpoint, "
           "or retrain the model with this tokenizer")
    if tokenizer.get_vocab_size() != vocab:
        raise CheckpointError(f"tokenizer mismatch for {checkpoint_dir}: the model was trained with vocab_size={vocab}, "
                         f"{where} has {tokenizer.get_vocab_size()}; {fix}")
    saved = meta.get("tokenizer") or {}
    if saved.get("fingerprint"):
        fp = tokenizer_fingerprint(tokenizer)
        if fp != saved["fingerprint"]:
            raise CheckpointError(f"tokenizer mismatch for {checkpoint_dir}: same vocab size ({vocab}) but different "
                             f"merges/specials (fingerprint {saved['fingerprint'][:12]} in the checkpoint vs "
                             f"{fp[:12]} for {where}); {fix}")
