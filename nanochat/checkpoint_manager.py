"""
Saving and loading checkpoints (REFERENCE 1.3-1.5, D6).

A checkpoint of step S in a directory is three kinds of files:

    model_{S:06d}.pt          model.state_dict() (rank 0)
    optim_{S:06d}_rank{r}.pt  whatever per-rank dict the script passes (optimizer shard, loader state,
                              RNG states...), one per rank, optional
    meta_{S:06d}.json         step, the full model config, user config, loop state, tokenizer identity...

Writes are atomic: every file goes to a temporary name and is renamed into place, and the meta json is
written last (after a barrier when several ranks save), so a step counts as complete exactly when its
meta exists. A crash mid-save leaves the previous step as the latest loadable one.

Every file is read with torch.load(weights_only=True): no code runs on load. So the per-rank dict must
hold only tensors, plain containers (dict/list/tuple), numbers, strings, bools and None: e.g.
torch.get_rng_state() and random.getstate() are fine, numpy arrays/states are not (convert them with
torch.from_numpy or .tolist() first).
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

from nanochat.common import get_base_dir

logger = logging.getLogger("nanochat")

SOURCE_DIRS = {"base": "base_checkpoints", "mid": "mid_checkpoints", "sft": "chatsft_checkpoints",
               "rl": "chatrl_checkpoints"}

# -----------------------------------------------------------------------------
# Saving


def _atomic_torch_save(obj, path):
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _atomic_json_save(obj, path):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _dist_ready():
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def save_checkpoint(checkpoint_dir, step, model_state, optim_state, meta, rank=0):
    """
    Save step `step`: rank 0 writes the model, every rank its optim_state (if not None), and rank 0
    writes the meta json last. Under torch.distributed every rank must call this (it has a barrier).
    """
    os.makedirs(checkpoint_dir, exist_ok=True)
    model_path = os.path.join(checkpoint_dir, f"model_{step:06d}.pt")
    meta_path = os.path.join(checkpoint_dir, f"meta_{step:06d}.json")
    if rank == 0 and os.path.exists(meta_path):
        os.remove(meta_path)  # re-saving a step: it is incomplete until the new meta lands
    if rank == 0:
        _atomic_torch_save(model_state, model_path)
    if optim_state is not None:
        _atomic_torch_save(optim_state, os.path.join(checkpoint_dir, f"optim_{step:06d}_rank{rank}.pt"))
    if _dist_ready():
        dist.barrier()  # every rank's shard is on disk before the step is declared complete
    if rank == 0:
        _atomic_json_save(meta, meta_path)
        logger.info(f"saved checkpoint step {step} to {checkpoint_dir}")


def tokenizer_fingerprint(tokenizer):
    """sha256 of the tokenizer's content (mergeable ranks, split pattern, special tokens)."""
    h = hashlib.sha256()
    enc = getattr(tokenizer, "enc", None)
    if enc is not None and hasattr(enc, "_mergeable_ranks"):
        for token, rank in sorted(enc._mergeable_ranks.items(), key=lambda kv: kv[1]):
            h.update(rank.to_bytes(4, "little") + len(token).to_bytes(2, "little") + token)
        h.update(enc._pat_str.encode("utf-8"))
        h.update(json.dumps(sorted(enc._special_tokens.items())).encode("utf-8"))
    else:  # any other tokenizer: hash its decoded vocabulary
        for i in range(tokenizer.get_vocab_size()):
            h.update(tokenizer.decode([i]).encode("utf-8", errors="surrogatepass") + b"\0")
    return h.hexdigest()


def load_meta(checkpoint_dir, step):
    path = os.path.join(checkpoint_dir, f"meta_{step:06d}.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no complete checkpoint of step {step} in {checkpoint_dir} (missing {path})")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def update_meta(checkpoint_dir, step, meta, rank=0):
    """Rewrite the meta of a complete step (e.g. to add the final evaluation run after saving it)."""
    if rank == 0:
        _atomic_json_save(meta, os.path.join(checkpoint_dir, f"meta_{step:06d}.json"))


def config_to_dict(config):
    """The full GPTConfig as a plain dict, which meta["model_config"] always stores (D6)."""
    return {f.name: getattr(config, f.name) for f in fields(config)}


def check_resume_config(meta, config, tokenizer, checkpoint_dir=""):
    """A resumed run must rebuild exactly the model and tokenizer that were saved; say what differs."""
    saved, now = meta["model_config"], config_to_dict(config)
    diffs = [f"{k}: checkpoint {saved.get(k)!r} vs now {now.get(k)!r}" for k in sorted(set(saved) | set(now))
             if saved.get(k) != now.get(k)]
    if diffs:
        raise ValueError(f"cannot resume {checkpoint_dir}: the model config differs ({'; '.join(diffs)}); "
                         f"rerun with the flags of the original run")
    _check_tokenizer(tokenizer, meta, checkpoint_dir)


def tokenizer_info(tokenizer):
    """What training scripts store as meta["tokenizer"] so loading can check it is the same tokenizer."""
    return {"vocab_size": tokenizer.get_vocab_size(), "fingerprint": tokenizer_fingerprint(tokenizer)}

# -----------------------------------------------------------------------------
# Finding and loading


def find_last_step(checkpoint_dir):
    """Largest complete step (its meta json and model file exist) in the directory."""
    steps = []
    for path in glob.glob(os.path.join(checkpoint_dir, "meta_*.json")):
        m = re.fullmatch(r"meta_(\d+)\.json", os.path.basename(path))
        if m and os.path.exists(os.path.join(checkpoint_dir, f"model_{int(m.group(1)):06d}.pt")):
            steps.append(int(m.group(1)))
    if not steps:
        raise FileNotFoundError(f"no complete checkpoint (meta_*.json + model_*.pt) in {checkpoint_dir}")
    return max(steps)


def find_largest_model(checkpoints_dir):
    """The model tag to load by default: largest d<N>, else the most recently modified directory."""
    if not os.path.isdir(checkpoints_dir):
        raise FileNotFoundError(f"checkpoint directory {checkpoints_dir} does not exist; train that stage first")
    tags = [d for d in os.listdir(checkpoints_dir) if os.path.isdir(os.path.join(checkpoints_dir, d))]
    if not tags:
        raise FileNotFoundError(f"no model tags (sub-directories) in {checkpoints_dir}; train that stage first")
    depth_tags = [(int(m.group(1)), t) for t in tags if (m := re.fullmatch(r"d(\d+)", t))]
    if depth_tags:
        return max(depth_tags)[1]
    return max(tags, key=lambda t: os.path.getmtime(os.path.join(checkpoints_dir, t)))


def load_checkpoint(checkpoint_dir, step, device, load_optimizer=False, rank=0):
    """(model_state, optim_state or None, meta) of a complete step; tensors mapped to `device`."""
    meta_path = os.path.join(checkpoint_dir, f"meta_{step:06d}.json")
    model_path = os.path.join(checkpoint_dir, f"model_{step:06d}.pt")
    if not os.path.exists(meta_path) or not os.path.exists(model_path):
        raise FileNotFoundError(f"step {step} in {checkpoint_dir} is missing or incomplete (needs {os.path.basename(model_path)} "
                                f"and {os.path.basename(meta_path)}); the complete steps are the ones with a meta json")
    with open(meta_path, encoding="utf-8") as f:
        meta = json.load(f)
    with open(model_path, "rb") as f:
        model_state = torch.load(f, map_location=device, weights_only=True)
    optim_state = None
    if load_optimizer:
        optim_path = os.path.join(checkpoint_dir, f"optim_{step:06d}_rank{rank}.pt")
        if not os.path.exists(optim_path):
            raise FileNotFoundError(f"{optim_path} not found: step {step} has no optimizer state for rank {rank} "
                                    f"(was it saved with the same number of ranks?)")
        with open(optim_path, "rb") as f:
            optim_state = torch.load(f, map_location=device, weights_only=True)
    return model_state, optim_state, meta

# -----------------------------------------------------------------------------
# Building a model from a checkpoint


def _patch_state_dict(state, model_state, config):
    """Back-compat (REFERENCE 1.4 step 5): fill parameters older checkpoints lack with inert values."""
    L = config.n_layer
    defaults = {
        "resid_lambdas": lambda: torch.ones(L),
        "x0_lambdas": lambda: torch.zeros(L),
        "smear_lambda": lambda: torch.zeros(1),    # smear off
        "backout_lambda": lambda: torch.zeros(1),  # backout off
        "smear_gate.weight": lambda: torch.zeros_like(model_state["smear_gate.weight"], device="cpu"),
    }
    for key, make in defaults.items():
        if key in model_state and key not in state:
            state[key] = make()
            logger.info(f"checkpoint lacks {key}: filled with the inert default")


def _check_state_dict(state, model_state, config):
    missing = sorted(set(model_state) - set(state))
    unexpected = sorted(set(state) - set(model_state))
    mismatched = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(model_state[k].shape)}"
                  for k in model_state if k in state and state[k].shape != model_state[k].shape]
    if missing or unexpected or mismatched:
        lines = [f"checkpoint weights do not match the model built from its config {config}:"]
        if mismatched:
            lines.append("  shape mismatch: " + "; ".join(mismatched))
        if missing:
            lines.append("  missing from the checkpoint: " + ", ".join(missing))
        if unexpected:
            lines.append("  not in the model: " + ", ".join(unexpected))
        lines.append("  fix: load with the model_config the checkpoint was trained with (its meta json), "
                     "or pick the matching --model-tag/--step")
        raise ValueError("\n".join(lines))


def _check_tokenizer(tokenizer, meta, checkpoint_dir):
    vocab = meta["model_config"]["vocab_size"]
    where = "the tokenizer in $NANOCHAT_BASE_DIR/tokenizer"
    fix = ("use the NANOCHAT_BASE_DIR of the run that trained this checkpoint, "
           "or retrain the model with this tokenizer")
    if tokenizer.get_vocab_size() != vocab:
        raise ValueError(f"tokenizer mismatch for {checkpoint_dir}: the model was trained with vocab_size={vocab}, "
                         f"{where} has {tokenizer.get_vocab_size()}; {fix}")
    saved = meta.get("tokenizer") or {}
    if saved.get("fingerprint"):
        fp = tokenizer_fingerprint(tokenizer)
        if fp != saved["fingerprint"]:
            raise ValueError(f"tokenizer mismatch for {checkpoint_dir}: same vocab size ({vocab}) but different "
                             f"merges/specials (fingerprint {saved['fingerprint'][:12]} in the checkpoint vs "
                             f"{fp[:12]} for {where}); {fix}")


def build_model(checkpoint_dir, step, device, phase, tokenizer=None):
    """
    (model, tokenizer, meta) from a checkpoint step, on `device`, in eval() or train() mode. Tensors are
    cast to the dtypes the freshly-initialised model uses on this device (GPU bf16 embeddings -> CPU fp32
    and back). `tokenizer` defaults to get_tokenizer(); it must match the one the model was trained with.
    """
    from nanochat.gpt import GPT, GPTConfig
    if phase not in ("train", "eval"):
        raise ValueError(f"phase must be 'train' or 'eval', got {phase!r}")
    device = torch.device(device)
    state, _, meta = load_checkpoint(checkpoint_dir, step, device)
    state = {k.removeprefix("_orig_mod."): v for k, v in state.items()}  # torch.compile prefix

    cfg = dict(meta["model_config"])
    cfg.setdefault("window_pattern", "L")  # configs saved before sliding windows: full attention everywhere
    known = {f.name for f in fields(GPTConfig)}
    unknown = sorted(set(cfg) - known)
    if unknown:
        logger.warning(f"ignoring unknown model_config keys {unknown} in {checkpoint_dir}")
    config = GPTConfig(**{k: v for k, v in cfg.items() if k in known})

    if tokenizer is None:
        from nanochat.tokenizer import get_tokenizer
        tokenizer = get_tokenizer()
    _check_tokenizer(tokenizer, meta, checkpoint_dir)

    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()  # rotary buffers and the per-device compute dtype
    model_state = model.state_dict()
    _patch_state_dict(state, model_state, config)
    _check_state_dict(state, model_state, config)
    state = {k: v.to(device=device, dtype=model_state[k].dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    model.train() if phase == "train" else model.eval()
    return model, tokenizer, meta


def load_model(source, device, phase, model_tag=None, step=None):
    """(model, tokenizer, meta) of a stage: source base|mid|sft|rl, default tag = largest, step = last;
    or hf:DIR, a directory written by scripts/export.py (e.g. downloaded from the Hub)."""
    if source.startswith("hf:"):
        from nanochat.hf_export import load_exported
        return load_exported(source[3:], device, phase)
    if source not in SOURCE_DIRS:
        raise ValueError(f"source must be one of {sorted(SOURCE_DIRS)} or hf:DIR, got {source!r}")
    checkpoints_dir = os.path.join(get_base_dir(), SOURCE_DIRS[source])
    if model_tag is None:
        model_tag = find_largest_model(checkpoints_dir)
    checkpoint_dir = os.path.join(checkpoints_dir, model_tag)
    if not os.path.isdir(checkpoint_dir):
        raise FileNotFoundError(f"no checkpoints for model tag {model_tag!r} in {checkpoints_dir}")
    if step is None:
        step = find_last_step(checkpoint_dir)
    logger.info(f"loading {source} model {model_tag} step {step} from {checkpoint_dir}")
    return build_model(checkpoint_dir, step, device, phase)
