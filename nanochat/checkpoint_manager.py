"""
Saving and loading checkpoints. Step S of a directory is:

    model_{S:06d}.pt          model.state_dict() (rank 0)
    optim_{S:06d}_rank{r}.pt  the script's per-rank dict (optimizer shard, loader state, RNG...), optional
    meta_{S:06d}.json         step, full model config, user config, loop state, tokenizer identity...

Each file is written to a temporary name and renamed into place; the meta goes last (after a barrier
under several ranks), so a step is complete exactly when its meta exists and a crash mid-save leaves the
previous step loadable. Files are read with torch.load(weights_only=True), so no code runs on load: the
per-rank dict may hold only tensors, plain containers, numbers, strings, bools and None (convert numpy
states with torch.from_numpy or .tolist()).

A file that cannot be used (truncated, zeroed, edited, another model's shape, a FIFO or a device in its place,
NaN or mistyped weights, a config asking for more than any model here), tokenizer files included, raises
CheckpointError before anything is built from it: one line naming the file, what is wrong and what to do, which
a dying script prints without a traceback (exit status 1). Exported Hugging Face directories (hf:DIR) get the
same checks (nanochat/hf_export.py).
"""

import os
import re
import json
import glob
import pickle
import hashlib
import logging
from dataclasses import fields, MISSING

import torch
import torch.distributed as dist

from nanochat.common import InputFileError, MissingFileError, get_base_dir, install_error_handler, open_regular

logger = logging.getLogger("nanochat")

SOURCE_DIRS = {"base": "base_checkpoints", "mid": "mid_checkpoints", "sft": "chatsft_checkpoints",
               "rl": "chatrl_checkpoints"}


class CheckpointError(InputFileError):
    """A checkpoint or tokenizer file that cannot be used; the message is one line (see install_error_handler)."""


# every script that loads a checkpoint or a tokenizer imports this module first (the tokenizer imports it to
# raise CheckpointError), so installing the hook here covers all of them; exit status stays 1
install_error_handler()

MAX_JSON_BYTES = 64 << 20  # a meta or config json is a few KB; a tokenizer.json a few MB


def _reason(e):
    """The first sentence of an exception from a reader (torch's zip reader writes a paragraph)."""
    lines = str(e).strip().splitlines()
    text = lines[0].split(". ")[0][:200] if lines else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _meta_steps(checkpoint_dir):
    """Sorted steps with a meta json in the directory."""
    return sorted(int(m.group(1)) for path in glob.glob(os.path.join(checkpoint_dir, "meta_*.json"))
                  if (m := re.fullmatch(r"meta_(\d+)\.json", os.path.basename(path))))


def _complete_steps(checkpoint_dir):
    return ", ".join(map(str, _meta_steps(checkpoint_dir))) or "none"


def _other_step_hint(checkpoint_dir):
    return (f"re-save it, or load another step with the script's --step/--model-step flag "
            f"(steps with a meta here: {_complete_steps(checkpoint_dir)})")


def load_json_file(path, fix, max_bytes=MAX_JSON_BYTES):
    """A JSON object from the regular file `path`, or CheckpointError naming it (truncated, zeroed, edited...)."""
    with open_regular(path, fix, max_bytes, "JSON file") as f:
        data = f.read()
    try:
        obj = json.loads(data.decode("utf-8"))
    except RecursionError:
        raise CheckpointError(f"{path} nests too deeply to be a config: the file is corrupt; {fix}") from None
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CheckpointError(f"{path} is not valid JSON ({_reason(e)}): the file is truncated or corrupt; {fix}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a JSON {type(obj).__name__}, expected an object; {fix}")
    return obj


def load_tensor_file(path, device, fix, expect=dict, max_bytes=None):
    """torch.load(weights_only=True) of the regular file `path` (of at most max_bytes), every reader failure
    turned into one CheckpointError line."""
    with open_regular(path, fix, max_bytes, "checkpoint file") as f:
        try:
            obj = torch.load(f, map_location=device, weights_only=True)
        except pickle.UnpicklingError:
            # torch's own message would suggest weights_only=False, which would run the file's code
            raise CheckpointError(f"{path} holds objects other than tensors and plain containers, which are never "
                                  f"unpickled (loading must not run code); {fix}") from None
        except Exception as e:  # zip reader RuntimeError, EOFError...: all mean a truncated or damaged file
            raise CheckpointError(f"{path} cannot be read ({_reason(e)}): the file is truncated or corrupt; {fix}") from None
    if not isinstance(obj, expect):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, expected a {expect.__name__}; {fix}")
    return obj

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
    return load_json_file(path, _other_step_hint(checkpoint_dir))


def _model_config(meta, where, fix):
    if not isinstance(meta.get("model_config"), dict):
        raise CheckpointError(f"{where} has no 'model_config' object (an edited or foreign meta?); {fix}")
    return meta["model_config"]


def config_to_dict(config):
    """The full GPTConfig as a plain dict, which meta["model_config"] always stores (so a checkpoint
    rebuilds its model without the flags of the run that made it)."""
    return {f.name: getattr(config, f.name) for f in fields(config)}


def check_resume_config(meta, config, tokenizer, checkpoint_dir=""):
    """A resumed run must rebuild exactly the model and tokenizer that were saved; say what differs."""
    saved = _model_config(meta, f"the meta json of the step resumed in {checkpoint_dir}",
                          "resume from another step, or start afresh without resuming")
    now = config_to_dict(config)
    diffs = [f"{k}: checkpoint {saved.get(k)!r} vs now {now.get(k)!r}" for k in sorted(set(saved) | set(now))
             if saved.get(k) != now.get(k)]
    if diffs:
        raise CheckpointError(f"cannot resume {checkpoint_dir}: the model config differs ({'; '.join(diffs)}); "
                              f"rerun with the flags of the original run")
    _check_tokenizer(tokenizer, meta, checkpoint_dir)


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


def _step_paths(checkpoint_dir, step):
    """(meta json, model file) of a step, both present (MissingFileError otherwise)."""
    meta_path = os.path.join(checkpoint_dir, f"meta_{step:06d}.json")
    model_path = os.path.join(checkpoint_dir, f"model_{step:06d}.pt")
    if not os.path.exists(meta_path) or not os.path.exists(model_path):
        raise MissingFileError(f"step {step} in {checkpoint_dir} is missing or incomplete (needs "
                               f"{os.path.basename(model_path)} and {os.path.basename(meta_path)}); the complete "
                               f"steps are the ones with a meta json ({_complete_steps(checkpoint_dir)})")
    return meta_path, model_path


def _load_state_dict(model_path, device, fix, max_bytes=None):
    state = load_tensor_file(model_path, device, fix, max_bytes=max_bytes)
    bad = [k for k, v in state.items() if not (isinstance(k, str) and torch.is_tensor(v))]
    if bad:
        raise CheckpointError(f"{model_path} is not a model state dict (entry {bad[0]!r} is not a named tensor); {fix}")
    return {k.removeprefix("_orig_mod."): v for k, v in state.items()}  # torch.compile's prefix


def load_checkpoint(checkpoint_dir, step, device, load_optimizer=False, rank=0):
    """(model_state, optim_state or None, meta) of a complete step; tensors mapped to `device`."""
    meta_path, model_path = _step_paths(checkpoint_dir, step)
    fix = _other_step_hint(checkpoint_dir)
    meta = load_json_file(meta_path, fix)
    model_state = _load_state_dict(model_path, device, fix)
    optim_state = None
    if load_optimizer:
        optim_path = os.path.join(checkpoint_dir, f"optim_{step:06d}_rank{rank}.pt")
        if not os.path.exists(optim_path):
            raise MissingFileError(f"{optim_path} not found: step {step} has no optimizer state for rank {rank} "
                                    f"(was it saved with the same number of ranks?)")
        optim_state = load_tensor_file(optim_path, device, "resume from another step (steps with a meta here: "
                                  f"{_complete_steps(checkpoint_dir)}), or start the run afresh without resuming")
    return model_state, optim_state, meta


def restore_training_state(model, optimizer, model_state, optim_state, checkpoint_dir, step, rank=0):
    """Load a resumed step into the live model and optimizer; a state of the wrong shape names its file."""
    model_path = os.path.join(checkpoint_dir, f"model_{step:06d}.pt")
    optim_path = os.path.join(checkpoint_dir, f"optim_{step:06d}_rank{rank}.pt")
    fix = "resume with the flags of the original run, from another step, or start afresh without resuming"
    try:
        model.load_state_dict(model_state, strict=True)
    except (RuntimeError, KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{model_path} does not fit the model being resumed ({_reason(e)}); {fix}") from None
    try:
        optimizer.load_state_dict(optim_state["optimizer"])
    except (RuntimeError, KeyError, ValueError, TypeError, IndexError, AttributeError) as e:
        raise CheckpointError(f"{optim_path} does not fit this model's optimizer ({_reason(e)}); {fix}") from None
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

# -----------------------------------------------------------------------------
# Building a model from a checkpoint (or an exported directory): every file is checked before it is trusted

# Sane limits on a saved model config, checked before the model is built: an edited or damaged config must not
# build a billion layers or ask for petabytes. Far beyond any model this code trains.
CONFIG_LIMITS = {"sequence_len": (1, 1 << 20), "vocab_size": (1, 1 << 24), "n_layer": (1, 1024), "n_head": (1, 1024),
                 "n_kv_head": (1, 1024), "n_embd": (2, 1 << 16), "short_window": (0, 1 << 20)}
MAX_WINDOW_PATTERN = 1024  # characters
# what a saved weight may be stored in (a checkpoint keeps the dtype it trained in, an export may cast)
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _patch_state_dict(state, model_state, config):
    """Back-compat: fill parameters that older checkpoints lack with values that switch them off."""
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


def config_from_dict(cfg, where, fix):
    """GPTConfig from a saved model config: known fields of the right types, within CONFIG_LIMITS (an edited
    config must not build nonsense); CheckpointError naming `where` otherwise."""
    from nanochat.gpt import GPTConfig
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{where}: the model config is a JSON {type(cfg).__name__}, expected an object; {fix}")
    cfg = dict(cfg)
    cfg.setdefault("window_pattern", "L")  # configs saved before sliding windows: full attention everywhere
    known = {f.name: f for f in fields(GPTConfig)}
    unknown = sorted(set(cfg) - set(known))
    if unknown:
        logger.warning(f"ignoring unknown model_config keys {unknown} in {where}")
    for name, f in known.items():
        default, value = f.default, cfg.get(name)
        if name not in cfg or default is MISSING or default is None:
            continue
        want = (int, float) if type(default) is float else type(default)
        if not isinstance(value, want) or (type(default) is not bool and isinstance(value, bool)) \
                or (want is int and value < 0):
            raise CheckpointError(f"{where}: model_config.{name} is {repr(value)[:40]}, expected type "
                                  f"{type(default).__name__}; {fix}")
    for name, (lo, hi) in CONFIG_LIMITS.items():
        if name in cfg and not lo <= cfg[name] <= hi:
            raise CheckpointError(f"{where}: model_config.{name}={cfg[name]} is outside {lo}..{hi}; {fix}")
    if not 0 < len(cfg["window_pattern"]) <= MAX_WINDOW_PATTERN:
        raise CheckpointError(f"{where}: model_config.window_pattern must have 1..{MAX_WINDOW_PATTERN} characters; {fix}")
    try:
        return GPTConfig(**{k: v for k, v in cfg.items() if k in known})
    except (TypeError, ValueError, AssertionError) as e:
        raise CheckpointError(f"{where}: model_config is not a valid GPTConfig ({_reason(e)}); {fix}") from None


def _config_from_meta(meta, meta_path, fix):
    if not isinstance(meta.get("step", 0), int) or not isinstance(meta.get("tokenizer"), (dict, type(None))):
        raise CheckpointError(f"{meta_path}: 'step' must be an integer and 'tokenizer' an object; {fix}")
    return config_from_dict(_model_config(meta, meta_path, fix), meta_path, fix)


def meta_model(config, where, fix):
    """The GPT of `config` on the meta device: no memory, but its state_dict has every weight's name and shape."""
    from nanochat.gpt import GPT
    try:
        with torch.device("meta"):
            return GPT(config)
    except Exception as e:  # e.g. a head count that does not divide the width
        raise CheckpointError(f"{where}: model_config does not build a model ({_reason(e)}); {fix}") from None


def max_weights_bytes(shapes):
    """The most bytes a file of these weights can take: float64 everywhere plus a few KB per tensor of container
    overhead. A bigger file is another file (or a device): refused before it is read."""
    return sum(8 * t.numel() + 4096 for t in shapes.values()) + (1 << 20)


def check_weights(state, shapes, path, config_path, fix):
    """One line naming the file (and the tensor) when the weights do not fit the model the config describes:
    missing or unexpected names, other shapes, an integer or other non-float dtype (it would be cast silently),
    NaN or inf values (a model that serves blank replies)."""
    missing = sorted(set(shapes) - set(state))
    unexpected = sorted(set(state) - set(shapes))
    mismatched = [f"{k} {tuple(state[k].shape)} vs {tuple(shapes[k].shape)}"
                  for k in shapes if k in state and state[k].shape != shapes[k].shape]
    problems = ([f"shapes differ: {'; '.join(mismatched[:3])}"] if mismatched else []) + \
               ([f"missing {', '.join(missing[:3])}"] if missing else []) + \
               ([f"unexpected {', '.join(unexpected[:3])}"] if unexpected else [])
    if problems:
        raise CheckpointError(f"{path} does not fit the model_config in {os.path.basename(config_path)} "
                              f"({'; '.join(problems)}): one of the two files was edited or comes from another "
                              f"run; {fix}")
    for name, want in shapes.items():
        t = state[name]
        if t.is_meta or t.layout != torch.strided:
            kind = "a meta tensor (no values)" if t.is_meta else f"not a dense tensor ({t.layout})"
            raise CheckpointError(f"{path}: tensor {name} is {kind}: the file was edited or is damaged; {fix}")
        if (t.dtype not in FLOAT_DTYPES) if want.is_floating_point() else (t.dtype != want.dtype):
            expected = "a floating-point dtype" if want.is_floating_point() else str(want.dtype)
            raise CheckpointError(f"{path}: tensor {name} is {str(t.dtype).removeprefix('torch.')}, expected "
                                  f"{expected}: the file was edited or is damaged; {fix}")
        if t.is_floating_point() and not torch.isfinite(t).all():
            bad = int((~torch.isfinite(t)).sum())
            raise CheckpointError(f"{path}: tensor {name} holds {bad} NaN/inf value(s) of {t.numel()}: the weights "
                                  f"are damaged (or training diverged before this step); {fix}")


def materialize(model, state, device, phase, dtype=None):
    """Allocate the meta-device `model` on `device` and load the checked `state`, each tensor cast to the dtype
    the fresh model uses there (its compute dtype `dtype`, default fp32); eval() or train() mode."""
    model.to_empty(device=device)
    model.init_weights(dtype)  # rotary buffers and the compute dtype
    model_state = model.state_dict()
    state = {k: v.to(device=device, dtype=model_state[k].dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    model.train() if phase == "train" else model.eval()
    return model


def _check_tokenizer(tokenizer, meta, checkpoint_dir):
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


def build_model(checkpoint_dir, step, device, phase, tokenizer=None, dtype=None):
    """(model, tokenizer, meta) of a step on `device` in eval() or train() mode, computing in `dtype` (the precision
    policy's choice; default fp32), tensors cast to the dtypes the fresh model uses there. `tokenizer` (default get_tokenizer()) must be the one the model was trained with.
    The meta is checked first, then the model is built on the meta device, so the weights file is checked
    against its size, names, shapes and dtypes before any memory is allocated."""
    if phase not in ("train", "eval"):
        raise ValueError(f"phase must be 'train' or 'eval', got {phase!r}")
    device = torch.device(device)
    meta_path, model_path = _step_paths(checkpoint_dir, step)
    fix = _other_step_hint(checkpoint_dir)
    meta = load_json_file(meta_path, fix)
    config = _config_from_meta(meta, meta_path, fix)
    if tokenizer is None:
        from nanochat.tokenizer import get_tokenizer
        tokenizer = get_tokenizer()
    _check_tokenizer(tokenizer, meta, checkpoint_dir)
    model = meta_model(config, meta_path, fix)
    shapes = model.state_dict()
    state = _load_state_dict(model_path, device, fix, max_weights_bytes(shapes))
    _patch_state_dict(state, shapes, config)
    check_weights(state, shapes, model_path, meta_path, fix)
    return materialize(model, state, device, phase, dtype), tokenizer, meta


def load_model(source, device, phase, model_tag=None, step=None, dtype=None):
    """(model, tokenizer, meta) of a stage: source base|mid|sft|rl, default tag = largest, step = last;
    or hf:DIR, a directory written by scripts/export.py (e.g. downloaded from the Hub). The model computes in
    `dtype` (the precision policy's choice; default fp32)."""
    if source.startswith("hf:"):
        from nanochat.hf_export import load_exported
        return load_exported(source[3:], device, phase, dtype)
    if source not in SOURCE_DIRS:
        raise ValueError(f"source must be one of {sorted(SOURCE_DIRS)} or hf:DIR, got {source!r}")
    checkpoints_dir = os.path.join(get_base_dir(), SOURCE_DIRS[source])
    if model_tag is None:
        model_tag = find_largest_model(checkpoints_dir)
    checkpoint_dir = os.path.join(checkpoints_dir, model_tag)
    if not os.path.isdir(checkpoint_dir):
        raise MissingFileError(f"no checkpoints for model tag {model_tag!r} in {checkpoints_dir}")
    if step is None:
        step = find_last_step(checkpoint_dir)
    logger.info(f"loading {source} model {model_tag} step {step} from {checkpoint_dir}")
    return build_model(checkpoint_dir, step, device, phase, dtype=dtype)
