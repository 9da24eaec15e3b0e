"""
A nanochat GPT for Hugging Face `transformers` (remote code): the exporter copies this file into a model
directory as `modeling_nanochat.py`, loaded with `AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`.
It imports only torch and transformers (users may not have the nanochat repository). The math is nanochat/gpt.py's
training forward (half-split rotary, QK-norm x1.2, ReLU^2 MLP, GQA, per-layer left windows, gated value embeddings,
resid/x0 scalars, smear, backout, untied head over a padded vocab, soft-capped fp32 logits); every constant comes
from config.json, written by the exporter from the nanochat model.

Generation uses transformers' DynamicCache, each decode step running only the new tokens. The smear needs the
token before them: `generate()` passes it (prepare_inputs_for_generation); a forward that continues a cache by
hand may pass `prev_input_ids` (B,) or rely on the last ids remembered on the cache.
"""

import dataclasses

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

try:
    from transformers import PreTrainedConfig
except ImportError:  # transformers 4.x name
    from transformers import PretrainedConfig as PreTrainedConfig
try:  # transformers 5: init functions that leave weights already loaded from the checkpoint alone
    from transformers import initialization as init
except ImportError:
    from torch.nn import init

# transformers 5 renamed the cache field of model outputs (past_key_values -> cache)
_CACHE_FIELD = "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} else "past_key_values"


class NanoChatConfig(PreTrainedConfig):
    model_type = "nanochat_gpt"  # not "nanochat": transformers' built-in NanoChat is the older architecture
    attribute_map = {"hidden_size": "n_embd", "num_attention_heads": "n_head", "num_hidden_layers": "n_layer",
                     "num_key_value_heads": "n_kv_head", "max_position_embeddings": "sequence_len"}

    def __init__(self, vocab_size=32768, padded_vocab_size=32768, sequence_len=2048, n_layer=12, n_head=6,
                 n_kv_head=6, n_embd=768, window_sizes=None, value_embed_layers=None, backout_layer=None,
                 rope_base=100000.0, softcap=15.0, qk_scale=1.2, ve_gate_channels=12, ve_gate_scale=3.0,
                 smear_channels=24, **kwargs):
        self.vocab_size = vocab_size
        self.padded_vocab_size = padded_vocab_size
        self.sequence_len = sequence_len
        self.n_layer, self.n_head, self.n_kv_head, self.n_embd = n_layer, n_head, n_kv_head, n_embd
        # left window per layer: a query at position t sees keys t-window .. t
        self.window_sizes = list(window_sizes) if window_sizes is not None else [sequence_len] * n_layer
        self.value_embed_layers = list(value_embed_layers) if value_embed_layers is not None else []
        self.backout_layer = n_layer // 2 if backout_layer is None else backout_layer
        self.rope_base, self.softcap, self.qk_scale = rope_base, softcap, qk_scale
        self.ve_gate_channels, self.ve_gate_scale, self.smear_channels = ve_gate_channels, ve_gate_scale, smear_channels
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)


def _norm(x):
    return F.rms_norm(x, (x.size(-1),))


def _rotary(x, cos, sin):
    """x (B, T, H, hd); cos/sin (B, T, 1, hd/2). Rotates the pairs (i, i + hd/2)."""
    h = x.size(-1) // 2
    x1, x2 = x[..., :h], x[..., h:]
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


def _linear(x, weight):
    return F.linear(x, weight.to(x.dtype))


class NanoChatAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        self.window = config.window_sizes[layer_idx]
        self.ve_gate_scale = config.ve_gate_scale
        self.qk_scale = config.qk_scale
        d, hd = config.n_embd, self.head_dim
        self.c_q = nn.Linear(d, self.n_head * hd, bias=False)
        self.c_k = nn.Linear(d, self.n_kv_head * hd, bias=False)
        self.c_v = nn.Linear(d, self.n_kv_head * hd, bias=False)
        self.c_proj = nn.Linear(d, d, bias=False)
        has_ve = layer_idx in config.value_embed_layers
        self.ve_gate = nn.Linear(config.ve_gate_channels, self.n_kv_head, bias=False) if has_ve else None

    def forward(self, x, ve, cos, sin, cache, key_valid):
        B, T, C = x.shape
        q = _linear(x, self.c_q.weight).view(B, T, self.n_head, self.head_dim)
        k = _linear(x, self.c_k.weight).view(B, T, self.n_kv_head, self.head_dim)
        v = _linear(x, self.c_v.weight).view(B, T, self.n_kv_head, self.head_dim)
        if ve is not None:
            gate = self.ve_gate_scale * torch.sigmoid(_linear(x[..., :self.ve_gate.in_features], self.ve_gate.weight))
            v = v + gate.unsqueeze(-1) * ve.view_as(v)
        q, k = _rotary(q, cos, sin), _rotary(k, cos, sin)
        q, k = _norm(q) * self.qk_scale, _norm(k) * self.qk_scale
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, hd)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)  # every key so far, (B, Hkv, Tk, hd)
        Tk = k.size(2)
        past = Tk - T  # cache index of the first query
        # keys left of the earliest query's window are never seen: drop them (decode reads O(window) keys)
        start = max(0, past - self.window)
        k, v = k[:, :, start:], v[:, :, start:]
        q_idx = torch.arange(past, Tk, device=x.device)[:, None]
        k_idx = torch.arange(start, Tk, device=x.device)[None, :]
        mask = (k_idx <= q_idx) & (q_idx - k_idx <= self.window)  # (T, Tk - start)
        if key_valid is not None:  # padding: (B, Tk) -> (B, 1, T, Tk - start); a row always sees itself
            mask = (mask & key_valid[:, None, None, start:]) | (k_idx == q_idx)
        elif T == 1:
            mask = None  # one query: every key left after slicing is visible
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.n_head != self.n_kv_head)
        return _linear(y.transpose(1, 2).reshape(B, T, C), self.c_proj.weight)


class NanoChatMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return _linear(F.relu(_linear(x, self.c_fc.weight)).square(), self.c_proj.weight)


class NanoChatBlock(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.attn = NanoChatAttention(config, layer_idx)
        self.mlp = NanoChatMLP(config)

    def forward(self, x, ve, cos, sin, cache, key_valid):
        x = x + self.attn(_norm(x), ve, cos, sin, cache, key_valid)
        return x + self.mlp(_norm(x))


class NanoChatForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = NanoChatConfig
    base_model_prefix = "model"  # no separate base model: parameter names are those of nanochat's GPT
    _no_split_modules = ["NanoChatBlock"]
    _supports_sdpa = True

    def __init__(self, config):
        super().__init__(config)
        V, d, L = config.padded_vocab_size, config.n_embd, config.n_layer
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(V, d),
            h=nn.ModuleList([NanoChatBlock(config, i) for i in range(L)]),
        ))
        self.lm_head = nn.Linear(d, V, bias=False)
        kv_dim = config.n_kv_head * (d // config.n_head)
        self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(V, kv_dim) for i in config.value_embed_layers})
        self.resid_lambdas = nn.Parameter(torch.ones(L))
        self.x0_lambdas = nn.Parameter(torch.zeros(L))
        self.smear_gate = nn.Linear(config.smear_channels, 1, bias=False)
        self.smear_lambda = nn.Parameter(torch.zeros(1))
        self.backout_lambda = nn.Parameter(torch.zeros(1))
        self.post_init()

    def _init_weights(self, module):
        # only for a model built from a config alone; from_pretrained overwrites all of these
        if isinstance(module, (nn.Linear, nn.Embedding)):
            init.normal_(module.weight, 0.0, 0.02)
        elif isinstance(module, NanoChatForCausalLM):
            init.ones_(module.resid_lambdas)
            for p in (module.x0_lambdas, module.smear_lambda, module.backout_lambda):
                init.zeros_(p)

    def get_input_embeddings(self):
        return self.transformer.wte

    def set_input_embeddings(self, value):
        self.transformer.wte = value

    def get_output_embeddings(self):
        return self.lm_head

    def _rotary_tables(self, positions, dtype):
        """cos, sin (B, T, 1, hd/2) for integer positions (B, T), computed as nanochat builds its table."""
        hd = self.config.n_embd // self.config.n_head
        inv_freq = self.config.rope_base ** (-torch.arange(0, hd, 2, dtype=torch.float32, device=positions.device) / hd)
        angle = positions.float()[..., None] * inv_freq
        return angle.cos().to(dtype)[:, :, None, :], angle.sin().to(dtype)[:, :, None, :]

    def prepare_inputs_for_generation(self, input_ids, *args, **kwargs):
        inputs = super().prepare_inputs_for_generation(input_ids, *args, **kwargs)
        new = inputs.get("input_ids")
        if new is not None and new.size(1) < input_ids.size(1):  # continuing a cache: smear needs the token before
            inputs["prev_input_ids"] = input_ids[:, input_ids.size(1) - new.size(1) - 1]
        return inputs

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, past_key_values=None,
                use_cache=None, labels=None, logits_to_keep=0, prev_input_ids=None, inputs_embeds=None,
                return_dict=None, **kwargs):
        """input_ids (B, T) -> logits (B, T, vocab_size) fp32. attention_mask (B, past + T): 1 = real token (left
        padding). prev_input_ids (B,): the token before input_ids when continuing a cache."""
        if input_ids is None or inputs_embeds is not None:
            raise ValueError("NanoChat needs input_ids (its value embeddings and smear look tokens up by id); "
                             "inputs_embeds is not supported")
        cfg = self.config
        B, T = input_ids.shape
        cache = cache if cache is not None else past_key_values
        use_cache = getattr(cfg, "use_cache", True) if use_cache is None else use_cache
        if cache is None and use_cache:
            cache = DynamicCache()
        past = cache.get_seq_length() if cache is not None else 0
        dtype = self.lm_head.weight.dtype  # the compute dtype: that of the loaded weights

        key_valid = None
        if attention_mask is not None and attention_mask.dim() == 2 and not bool(attention_mask.all()):
            key_valid = attention_mask.bool()  # (B, past + T)
        if position_ids is None:
            if key_valid is not None:  # left padding: each row's first real token is position 0
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:past + T]
            else:
                position_ids = torch.arange(past, past + T, device=input_ids.device)[None].expand(B, T)
        cos, sin = self._rotary_tables(position_ids, dtype)

        x = _norm(self.transformer.wte(input_ids).to(dtype))  # (B, T, d)
        # smear: mix each position's embedding with the previous token's; at sequence start (s = 1) the first
        # position has no predecessor and is left as is
        s = 0 if past > 0 else 1
        prev = x[:, :-1]
        if past > 0:
            if prev_input_ids is None:
                prev_input_ids = getattr(cache, "nanochat_last_ids", None)
            if prev_input_ids is None:
                raise ValueError("continuing a cache needs prev_input_ids (B,): the token before input_ids")
            prev = torch.cat([_norm(self.transformer.wte(prev_input_ids.view(B, 1)).to(dtype)), prev], dim=1)
        gate = torch.sigmoid(_linear(x[:, s:, :cfg.smear_channels], self.smear_gate.weight))
        gate = self.smear_lambda.to(dtype) * gate
        if key_valid is not None:  # no mixing in of a padding token
            gate = gate * key_valid[:, past + s - 1:past + T - 1, None]
        x = x0 = torch.cat([x[:, :s], x[:, s:] + gate * prev], dim=1)
        if cache is not None:
            cache.nanochat_last_ids = input_ids[:, -1].clone()

        x_backout = None
        for i, block in enumerate(self.transformer.h):
            x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](input_ids).to(dtype) if str(i) in self.value_embeds else None
            x = block(x, ve, cos, sin, cache, key_valid)
            if i == cfg.backout_layer:
                x_backout = x
        if x_backout is not None:
            x = x - self.backout_lambda.to(dtype) * x_backout
        x = _norm(x)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        # only the first vocab_size rows of the padded head are real tokens
        logits = F.linear(x, self.lm_head.weight[:cfg.vocab_size].to(dtype)).float()
        logits = cfg.softcap * torch.tanh(logits / cfg.softcap)

        loss = None
        if labels is not None:  # transformers' convention: labels are the inputs, shifted here, -100 ignored
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1),
                                   ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: cache if use_cache else None})


NanoChatConfig.register_for_auto_class()
NanoChatForCausalLM.register_for_auto_class("AutoModelForCausalLM")
