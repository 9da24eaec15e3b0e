"""
A ready model from what was saved: a checkpoint step (load_model("sft"), build_model(dir, step)) or an exported
Hugging Face directory (load_model("hf:DIR")). Every file is checked before it is trusted: the config within
sane limits, the weights of the right names, shapes and dtypes, finite, and of a plausible size before they are
read; anything wrong is one CheckpointError line naming the file. The model computes in the dtype it is given
(the precision policy's choice, common.resolve_precision). Reading and writing the checkpoint files themselves is
checkpoint_manager's.
"""

import os
import logging
from dataclasses import fields, MISSING

import torch

from nanochat.common import get_base_dir
from nanochat.files import CheckpointError, MissingFileError, describe_error, load_json_file, open_regular
from nanochat.checkpoint_manager import (SOURCE_DIRS, check_tokenizer, find_largest_model, find_last_step,
                                         load_model_state, other_step_hint, saved_model_config, step_paths)
from nanochat.gpt import GPT, GPTConfig
from nanochat.tokenizer import get_tokenizer
from nanochat.hf_export import MODEL_TYPE, WEIGHTS_FILE, require_export_extra, tokenizer_from_hf_json

logger = logging.getLogger("nanochat")

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
        raise CheckpointError(f"{where}: model_config is not a valid GPTConfig ({describe_error(e)}); {fix}") from None


def _config_from_meta(meta, meta_path, fix):
    if not isinstance(meta.get("step", 0), int) or not isinstance(meta.get("tokenizer"), (dict, type(None))):
        raise CheckpointError(f"{meta_path}: 'step' must be an integer and 'tokenizer' an object; {fix}")
    return config_from_dict(saved_model_config(meta, meta_path, fix), meta_path, fix)


def meta_model(config, where, fix):
    """The GPT of `config` on the meta device: no memory, but its state_dict has every weight's name and shape."""
    try:
        with torch.device("meta"):
            return GPT(config)
    except Exception as e:  # e.g. a head count that does not divide the width
        raise CheckpointError(f"{where}: model_config does not build a model ({describe_error(e)}); {fix}") from None


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


def build_model(checkpoint_dir, step, device, phase, tokenizer=None, dtype=None):
    """(model, tokenizer, meta) of a step on `device` in eval() or train() mode, computing in `dtype` (the precision
    policy's choice; default fp32), tensors cast to the dtypes the fresh model uses there. `tokenizer` (default get_tokenizer()) must be the one the model was trained with.
    The meta is checked first, then the model is built on the meta device, so the weights file is checked
    against its size, names, shapes and dtypes before any memory is allocated."""
    if phase not in ("train", "eval"):
        raise ValueError(f"phase must be 'train' or 'eval', got {phase!r}")
    device = torch.device(device)
    meta_path, model_path = step_paths(checkpoint_dir, step)
    fix = other_step_hint(checkpoint_dir)
    meta = load_json_file(meta_path, fix)
    config = _config_from_meta(meta, meta_path, fix)
    if tokenizer is None:
        tokenizer = get_tokenizer()
    check_tokenizer(tokenizer, meta, checkpoint_dir)
    model = meta_model(config, meta_path, fix)
    shapes = model.state_dict()
    state = load_model_state(model_path, device, fix, max_weights_bytes(shapes))
    _patch_state_dict(state, shapes, config)
    check_weights(state, shapes, model_path, meta_path, fix)
    return materialize(model, state, device, phase, dtype), tokenizer, meta


def load_model(source, device, phase, model_tag=None, step=None, dtype=None):
    """(model, tokenizer, meta) of a stage: source base|mid|sft|rl, default tag = largest, step = last;
    or hf:DIR, a directory written by scripts/export.py (e.g. downloaded from the Hub). The model computes in
    `dtype` (the precision policy's choice; default fp32)."""
    if source.startswith("hf:"):
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


def load_exported(hf_dir, device, phase, dtype=None):
    """(model, tokenizer, meta) from an exported directory, as build_model returns them, with
    the same checks: each file is a regular file of a sane size, config.json a valid nanochat config that agrees
    with itself and the tokenizer, the weights of the right names, shapes, dtypes and finite. Anything wrong is a
    one-line CheckpointError naming the file."""
    hf_dir = os.path.expanduser(hf_dir)
    fix = "export the checkpoint again with python -m scripts.export (or download the directory again)"
    if not os.path.isdir(hf_dir):
        raise MissingFileError(f"{hf_dir} is not a directory: --source=hf:DIR needs a directory written by "
                               f"python -m scripts.export (or downloaded from the Hub)")
    config_path, weights_path, tokenizer_path = (os.path.join(hf_dir, name) for name in
                                                 ("config.json", WEIGHTS_FILE, "tokenizer.json"))
    for path in (config_path, weights_path, tokenizer_path):
        if not os.path.exists(path):
            raise MissingFileError(f"{path} not found: --source=hf:DIR needs a directory written by "
                                   "python -m scripts.export (or downloaded from the Hub)")
    hf_cfg = load_json_file(config_path, fix)
    if hf_cfg.get("model_type") != MODEL_TYPE or not isinstance(hf_cfg.get("nanochat_config"), dict):
        raise CheckpointError(f"{config_path}: model_type {str(hf_cfg.get('model_type'))[:40]!r} is not a nanochat "
                              f"export ({MODEL_TYPE!r} with a nanochat_config object); {fix}")
    config = config_from_dict(hf_cfg["nanochat_config"], f"{config_path} (nanochat_config)", fix)
    # transformers builds the model from the top-level fields: they must say what nanochat_config says
    for key in ("vocab_size", "sequence_len", "n_layer", "n_head", "n_kv_head", "n_embd"):
        if key in hf_cfg and hf_cfg[key] != getattr(config, key):
            raise CheckpointError(f"{config_path}: {key}={str(hf_cfg[key])[:40]} but nanochat_config.{key}="
                                  f"{getattr(config, key)} (the file was edited); {fix}")
    tokenizer = tokenizer_from_hf_json(tokenizer_path, fix)
    if tokenizer.get_vocab_size() != config.vocab_size:
        raise CheckpointError(f"{config_path}: vocab_size={config.vocab_size} but {tokenizer_path} has "
                              f"{tokenizer.get_vocab_size()} tokens: the two files come from different exports; {fix}")
    model = meta_model(config, config_path, fix)
    shapes = model.state_dict()
    require_export_extra("safetensors")
    from safetensors.torch import load_file  # an optional dependency (the export extra)
    # checked as a regular file of a plausible size first: safetensors maps whatever the path names
    open_regular(weights_path, fix, max_weights_bytes(shapes), "weights file").close()
    try:
        state = load_file(weights_path, device="cpu")
    except Exception as e:  # SafetensorError (truncated, header only, bad header), OSError...
        raise CheckpointError(f"{weights_path} cannot be read ({type(e).__name__}: {str(e)[:120]}): the file is "
                              f"truncated or corrupt; {fix}") from None
    check_weights(state, shapes, weights_path, config_path, fix)
    model = materialize(model, state, torch.device(device), phase, dtype)
    meta = {"step": None, "model_config": hf_cfg["nanochat_config"], "source": f"hf:{hf_dir}"}
    return model, tokenizer, meta
