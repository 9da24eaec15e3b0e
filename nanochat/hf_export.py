"""
Export a nanochat model to a Hugging Face directory, and load one back. The directory holds
model.safetensors (the GPT state_dict under its own names), config.json (auto_map -> modeling_nanochat.py, a
copy of nanochat/hf_modeling.py), tokenizer.json + tokenizer_config.json + chat_template.jinja, generation_config.json
(stops on <|assistant_end|> and <|bos|>, like the Engine) and README.md, so that transformers alone loads it with
`AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)` and `AutoTokenizer.from_pretrained(DIR)`.
nanochat.model_loader.load_exported(DIR) rebuilds nanochat's GPT and tokenizer from it (`--source=hf:DIR`), with
tokenizer_from_hf_json below. Needs the `export` extra:
    pip install -e '.[export]'
"""

import os
import json
import shutil
from dataclasses import fields

from nanochat.gpt import padded_vocab_size, has_value_embed, ROPE_BASE, SOFTCAP, QK_SCALE, \
    VE_GATE_CHANNELS, VE_GATE_SCALE, SMEAR_CHANNELS
from nanochat.tokenizer import RustBPETokenizer
from nanochat.files import CheckpointError, load_json_file

MODELING_SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hf_modeling.py")
MODELING_FILE = "modeling_nanochat.py"
WEIGHTS_FILE = "model.safetensors"
MODEL_TYPE = "nanochat_gpt"

# Renders ids exactly like RustBPETokenizer.render_conversation (system prompt folded into the first user turn);
# add_generation_prompt appends <|assistant_start|>, like render_for_completion. Special-token strings inside
# message text become special tokens here (transformers matches them in the text); our renderer keeps them plain.
CHAT_TEMPLATE = """\
{%- set ns = namespace(system='') -%}
{{- '<|bos|>' -}}
{%- for message in messages -%}
    {%- if message['role'] == 'system' -%}
        {%- if not loop.first -%}{{- raise_exception('a system message is only allowed as the first message') -}}{%- endif -%}
        {%- set ns.system = message['content'] + '\\n\\n' -%}
    {%- elif message['role'] == 'user' -%}
        {{- '<|user_start|>' + ns.system + message['content'] + '<|user_end|>' -}}
        {%- set ns.system = '' -%}
    {%- elif message['role'] == 'assistant' -%}
        {{- '<|assistant_start|>' -}}
        {%- if message['content'] is string -%}
            {{- message['content'] -}}
        {%- else -%}
            {%- for part in message['content'] -%}
                {%- if part['type'] == 'text' -%}
                    {{- part['text'] -}}
                {%- elif part['type'] == 'python' -%}
                    {{- '<|python_start|>' + part['text'] + '<|python_end|>' -}}
                {%- elif part['type'] == 'python_output' -%}
                    {{- '<|output_start|>' + part['text'] + '<|output_end|>' -}}
                {%- else -%}
                    {{- raise_exception('unknown content part type ' + part['type']) -}}
                {%- endif -%}
            {%- endfor -%}
        {%- endif -%}
        {{- '<|assistant_end|>' -}}
    {%- else -%}
        {{- raise_exception('unknown role ' + message['role']) -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|assistant_start|>' -}}{%- endif -%}"""


def require_export_extra(module):
    """Import an optional dependency of export and hf: loading, or say how to install it."""
    try:
        return __import__(module)
    except ImportError:
        raise ImportError(f"exporting/loading Hugging Face directories needs {module!r}: "
                          "pip install -e '.[export]'") from None

# -----------------------------------------------------------------------------
# Tokenizer: tiktoken ranks <-> a byte-level BPE for the `tokenizers` library


def bytes_to_unicode():
    """GPT-2's byte -> printable character map (used by `tokenizers`' ByteLevel, so vocabulary strings use it):
    printable latin-1 bytes map to themselves, the other 68 to chr(256 + n) in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in keep]
    return {b: chr(b) if b in keep else chr(256 + others.index(b)) for b in range(256)}


def bpe_merges(ranks):
    """Merges that make `tokenizers`' BPE match tiktoken's: every split of a token into two tokens, ordered by
    the merged token's rank (tiktoken merges the lowest-rank concatenation first), ties by the parts' ranks."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        splits = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in ranks and token[i:] in ranks]
        merges += sorted(splits, key=lambda p: (ranks[p[0]], ranks[p[1]]))
    return merges


def build_hf_tokenizer(tokenizer, model_max_length, chat_template=CHAT_TEMPLATE):
    """A transformers PreTrainedTokenizerFast that encodes like `tokenizer` (a RustBPETokenizer)."""
    require_export_extra("transformers")
    from tokenizers import Tokenizer, Regex, AddedToken, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast
    enc = tokenizer.enc
    ranks = enc._mergeable_ranks
    byte_map = bytes_to_unicode()

    def to_str(b):
        return "".join(byte_map[x] for x in b)

    vocab = {to_str(token): rank for token, rank in ranks.items()}
    merges = [(to_str(a), to_str(b)) for a, b in bpe_merges(ranks)]
    # ignore_merges: a whole pre-token found in the vocabulary is one token, as in tiktoken
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True, fuse_unk=False, byte_fallback=False))
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(enc._pat_str), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tk.decoder = decoders.ByteLevel()
    specials = sorted(enc._special_tokens.items(), key=lambda kv: kv[1])
    tk.add_special_tokens([AddedToken(name, special=True, normalized=False) for name, _ in specials])
    for name, idx in specials:
        if tk.token_to_id(name) != idx:
            raise ValueError(f"special token {name} got id {tk.token_to_id(name)} in the exported tokenizer, "
                             f"expected {idx}: the specials must follow the mergeable tokens")
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<|bos|>", eos_token="<|assistant_end|>",
        # padding with an eos id keeps generate() from inferring a padding mask from the prompt's tokens
        pad_token="<|assistant_end|>", model_max_length=model_max_length, clean_up_tokenization_spaces=False,
        chat_template=chat_template)


MAX_HF_TOKENIZER_BYTES = 512 << 20  # a 65K vocabulary with every BPE merge is tens of MB


def tokenizer_from_hf_json(path, fix="export the model again with python -m scripts.export"):
    """A RustBPETokenizer from a tokenizer.json written by build_hf_tokenizer (vocabulary ids are the ranks);
    a damaged or foreign file raises CheckpointError naming it."""
    data = load_json_file(path, fix, MAX_HF_TOKENIZER_BYTES)
    try:
        vocab = data["model"]["vocab"]
        pattern = data["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"]
        added = {t["content"]: t["id"] for t in data["added_tokens"] if t.get("special")}
        inverse = {ch: b for b, ch in bytes_to_unicode().items()}
        ranks = {bytes(inverse[ch] for ch in token): idx for token, idx in vocab.items()}
    except (KeyError, IndexError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path}: not a byte-level BPE written by nanochat's exporter "
                              f"({type(e).__name__}: {str(e)[:80]}); {fix}") from None
    if sorted(ranks.values()) != list(range(len(ranks))) or not all(isinstance(v, int) for v in added.values()):
        raise CheckpointError(f"{path}: vocabulary ids must cover 0..{len(ranks) - 1} and special ids be integers; {fix}")
    if any(bytes([b]) not in ranks for b in range(256)) or sorted(added.values()) != \
            list(range(len(ranks), len(ranks) + len(added))):
        raise CheckpointError(f"{path}: every byte must be a token and the special tokens must follow the "
                              f"{len(ranks)} mergeable ones (the file is truncated or edited); {fix}")
    try:
        return RustBPETokenizer._from_ranks(ranks, pattern, added)
    except Exception as e:  # an edited split pattern that does not compile, a special token missing...
        raise CheckpointError(f"{path}: cannot build the tokenizer ({type(e).__name__}: {str(e)[:80]}); {fix}") from None

# -----------------------------------------------------------------------------
# Export


def hf_config(model, tokenizer, torch_dtype):
    """config.json's content: the transformers-side architecture, plus nanochat's GPTConfig to rebuild it here."""
    cfg = model.config
    return {
        "architectures": ["NanoChatForCausalLM"],
        "auto_map": {"AutoConfig": f"{MODELING_FILE[:-3]}.NanoChatConfig",
                     "AutoModelForCausalLM": f"{MODELING_FILE[:-3]}.NanoChatForCausalLM"},
        "model_type": MODEL_TYPE,
        "vocab_size": cfg.vocab_size,
        "padded_vocab_size": padded_vocab_size(cfg.vocab_size),
        "sequence_len": cfg.sequence_len,
        "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_kv_head": cfg.n_kv_head, "n_embd": cfg.n_embd,
        "window_sizes": [left for left, _ in model.window_sizes],
        "value_embed_layers": [i for i in range(cfg.n_layer) if has_value_embed(i, cfg.n_layer)],
        "backout_layer": cfg.n_layer // 2,
        "rope_base": float(ROPE_BASE), "softcap": SOFTCAP, "qk_scale": QK_SCALE,
        "ve_gate_channels": VE_GATE_CHANNELS, "ve_gate_scale": VE_GATE_SCALE, "smear_channels": SMEAR_CHANNELS,
        **{k: v for k, v in generation_config(tokenizer).items() if k != "do_sample"},  # bos, eos, pad ids
        "tie_word_embeddings": False,
        "use_cache": True,
        "torch_dtype": str(torch_dtype).removeprefix("torch."),
        "nanochat_config": {f.name: getattr(cfg, f.name) for f in fields(cfg)},
    }


def generation_config(tokenizer):
    end, bos = tokenizer.encode_special("<|assistant_end|>"), tokenizer.get_bos_token_id()
    # greedy by default; stop where the Engine stops (end of the reply, or a new document)
    return {"bos_token_id": bos, "eos_token_id": [end, bos], "pad_token_id": end, "do_sample": False}


def report_summary(report_path):
    """The '## Summary' section of a report card, or None when there is no report."""
    if not report_path or not os.path.exists(report_path):
        return None
    with open(report_path, encoding="utf-8") as f:
        text = f.read()
    start = text.find("## Summary")
    if start < 0:
        return None
    end = text.find("\n## ", start + 1)
    return text[start:end if end >= 0 else len(text)].strip()


def model_card(model, meta, repo_name, summary, license_id):
    cfg = model.config
    n_params = sum(p.numel() for p in model.parameters())
    summary = summary or ("No report card was found for this run (`python -m nanochat.report generate` writes "
                          "one), so there is no summary table.")
    user_config = meta.get("user_config")
    details = f"\n<details><summary>training flags</summary>\n\n```json\n{json.dumps(user_config, indent=2)}\n```\n</details>\n" \
        if user_config else ""
    return f"""---
license: {license_id}
library_name: transformers
pipeline_tag: text-generation
tags: [nanochat, custom_code]
---

# {repo_name}

A small chat model trained from scratch with [nanochat](https://github.com/karpathy/nanochat) (this fork):
{cfg.n_layer} layers, width {cfg.n_embd}, {cfg.n_head} query / {cfg.n_kv_head} key-value heads, context
{cfg.sequence_len}, vocabulary {cfg.vocab_size}, {n_params / 1e6:.1f}M parameters (step {meta.get("step", "?")}).
The architecture (value embeddings, smear, backout, per-layer scalars, sliding windows) is not transformers'
built-in NanoChat, so it ships its own modeling file: load it with `trust_remote_code=True`.

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("{repo_name}", trust_remote_code=True)
tok = AutoTokenizer.from_pretrained("{repo_name}", trust_remote_code=True)  # the flag only skips a question
ids = tok.apply_chat_template([{{"role": "user", "content": "Why is the sky blue?"}}],
                              add_generation_prompt=True, return_tensors="pt", return_dict=True)
out = model.generate(**ids, max_new_tokens=128)   # stops at <|assistant_end|>
print(tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
```

In nanochat itself: `python -m scripts.chat_cli --source=hf:DIR` (DIR = a local copy of this repository).

The tokenizer encodes special-token strings found in text as special tokens (transformers' default); to encode
untrusted text as plain text, as nanochat does, pass `split_special_tokens=True`.

## Summary

{summary.removeprefix("## Summary").strip()}

## Training data

- pretraining: [FineWeb-Edu](https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle) shards
- midtraining and SFT: [SmolTalk](https://huggingface.co/datasets/HuggingFaceTB/smol-smoltalk), MMLU auxiliary
  train, GSM8K (with calculator tool calls), ARC, identity conversations, spelling tasks
{details}
## License

Released under the `{license_id}` license.
"""


def export_model(model, tokenizer, meta, out_dir, state=None, dtype=None, report_path=None, repo_name=None,
                 license_id="mit"):
    """Write the Hugging Face directory for a nanochat GPT; returns out_dir. Each tensor keeps its dtype in `state`
    (the checkpoint's state_dict; default: the model's), unless `dtype` casts every floating tensor."""
    require_export_extra("transformers")  # checked before anything is written
    require_export_extra("safetensors")
    from safetensors.torch import save_file
    os.makedirs(out_dir, exist_ok=True)
    tensors = {}
    for name, t in model.state_dict().items():
        target = dtype or (state[name].dtype if state is not None and name in state else t.dtype)
        t = t.detach().to("cpu")
        tensors[name] = (t.to(target) if t.is_floating_point() else t).contiguous()
    save_file(tensors, os.path.join(out_dir, WEIGHTS_FILE), metadata={"format": "pt"})
    compute = tensors["lm_head.weight"].dtype
    with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(hf_config(model, tokenizer, compute), f, indent=2)
    with open(os.path.join(out_dir, "generation_config.json"), "w", encoding="utf-8") as f:
        json.dump(generation_config(tokenizer), f, indent=2)
    shutil.copyfile(MODELING_SRC, os.path.join(out_dir, MODELING_FILE))
    build_hf_tokenizer(tokenizer, model.config.sequence_len).save_pretrained(out_dir)
    # transformers 5 writes its own class name ("TokenizersBackend"); the old name loads in 4.x and 5.x alike
    tok_config_path = os.path.join(out_dir, "tokenizer_config.json")
    with open(tok_config_path, encoding="utf-8") as f:
        tok_config = json.load(f)
    tok_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    with open(tok_config_path, "w", encoding="utf-8") as f:
        json.dump(tok_config, f, indent=2, ensure_ascii=False)
    with open(os.path.join(out_dir, "README.md"), "w", encoding="utf-8") as f:
        f.write(model_card(model, meta, repo_name or os.path.basename(os.path.abspath(out_dir)),
                           report_summary(report_path), license_id))
    return out_dir


def push_to_hub(out_dir, repo_id, private=False):
    """Upload an exported directory to the Hub (needs `huggingface-cli login` or HF_TOKEN)."""
    require_export_extra("huggingface_hub")
    from huggingface_hub import HfApi
    api = HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True)
    return api.upload_folder(folder_path=out_dir, repo_id=repo_id, commit_message="Upload nanochat export")
