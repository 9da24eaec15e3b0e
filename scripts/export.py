"""
Export a nanochat checkpoint to a Hugging Face directory that `transformers` loads on its own:

    python -m scripts.export --source=sft --out=exports/d20              # latest sft checkpoint of the largest model
    python -m scripts.export --source=base --model-tag=d12 --step=5000 --out=exports/d12-base --dtype=bfloat16
    python -m scripts.export --source=sft --out=exports/d20 --push-to-hub=you/nanochat-d20   # then upload

The directory holds model.safetensors, config.json + modeling_nanochat.py (remote code), the tokenizer and
chat template, generation_config.json and a model card (README.md). Load it with

    AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True); AutoTokenizer.from_pretrained(DIR)

or chat with it here: `python -m scripts.chat_cli --source=hf:DIR`. Needs the export extra:
`pip install -e '.[export]'`. --push-to-hub needs a Hub login (`huggingface-cli login` or HF_TOKEN).
"""

import os
import argparse

parser = argparse.ArgumentParser(description="Export a checkpoint to a Hugging Face transformers directory")
parser.add_argument("-i", "--source", type=str, default="sft", help="checkpoint source: base|mid|sft|rl")
parser.add_argument("-g", "--model-tag", type=str, default=None, help="model tag to export (default: largest)")
parser.add_argument("-s", "--step", type=int, default=None, help="checkpoint step (default: last)")
parser.add_argument("--out", type=str, required=True, help="output directory (created; existing files are overwritten)")
parser.add_argument("--dtype", type=str, default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                    help="weights dtype (auto = each tensor as stored in the checkpoint)")
parser.add_argument("--push-to-hub", type=str, default="", help="also upload to this Hub repo id (user/name)")
parser.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo private")
parser.add_argument("--license", type=str, default="mit", help="license id for the model card")
parser.add_argument("--report", type=str, default=None,
                    help="report card whose summary goes into the model card (default: $NANOCHAT_BASE_DIR/report/report.md)")


def main():
    from nanochat.files import install_error_handler
    args = parser.parse_args()
    install_error_handler()
    import torch
    from nanochat.common import get_base_dir
    from nanochat import checkpoint_manager as ckpt
    from nanochat.model_loader import build_model
    from nanochat.hf_export import export_model, push_to_hub
    if args.source not in ckpt.SOURCE_DIRS:
        raise SystemExit(f"--source must be one of {sorted(ckpt.SOURCE_DIRS)}, got {args.source!r}")
    checkpoints_dir = os.path.join(get_base_dir(), ckpt.SOURCE_DIRS[args.source])
    try:
        model_tag = args.model_tag or ckpt.find_largest_model(checkpoints_dir)
        checkpoint_dir = os.path.join(checkpoints_dir, model_tag)
        step = args.step if args.step is not None else ckpt.find_last_step(checkpoint_dir)
        model, tokenizer, meta = build_model(checkpoint_dir, step, "cpu", phase="eval")
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"cannot export: {e}")
    # the checkpoint's own tensors decide each exported dtype (e.g. bf16 embeddings of a GPU run stay bf16)
    state, _, _ = ckpt.load_checkpoint(checkpoint_dir, step, "cpu")
    state = {k.removeprefix("_orig_mod."): v for k, v in state.items()}
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    report = args.report or os.path.join(get_base_dir(), "report", "report.md")
    repo_name = args.push_to_hub or f"nanochat-{model_tag}-{args.source}"
    try:
        export_model(model, tokenizer, meta, args.out, state=state, dtype=dtype, report_path=report,
                     repo_name=repo_name, license_id=args.license)
    except ImportError as e:  # the export extra is missing: say how to install it
        raise SystemExit(str(e))
    print(f"exported {args.source} {model_tag} step {step} to {args.out}"
          + ("" if os.path.exists(report) else f" (no report card at {report}: the model card says so)"))
    if args.push_to_hub:
        push_to_hub(args.out, args.push_to_hub, private=args.private)
        print(f"uploaded to https://huggingface.co/{args.push_to_hub}")


if __name__ == "__main__":
    main()
