"""Hugging Face modeling code of ReMoE models (ReLU-routed Mixture-of-Experts, arXiv 2412.14711).

Plain PyTorch plus ``transformers``; no Megatron dependency. It is copied (with
``configuration_remoe.py``) into every exported model folder, whose ``config.json`` names these
classes in ``auto_map``, so that

    AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)

works offline. Parameter names follow ``LlamaForCausalLM`` for everything but the MoE MLP:

    model.embed_tokens.weight, lm_head.weight, model.norm.weight
    model.layers.N.{input_layernorm,post_attention_layernorm}.weight
    model.layers.N.self_attn.{q,k,v,o}_proj.weight
    model.layers.N.mlp.{gate,up,down}_proj.weight                     (dense layers)
    model.layers.N.mlp.router.weight [E, hidden]                       (MoE layers)
    model.layers.N.mlp.router.expert_bias [E]                          (sigmoid + bias TopK only)
    model.layers.N.mlp.experts.E.{gate,up,down}_proj.weight

The MoE MLP computes only the active (token, expert) pairs: for each expert with at least one
token it gathers those tokens, runs the SwiGLU expert on them and scatter-adds the weighted result.
Router math runs in fp32. With ``output_router_logits=True`` the output carries the fp32 router
logits of every MoE layer (``router_logits``, ``[batch*seq, E]`` each) and the boolean routing maps
(``routing_maps``), from which ``routing_sparsity`` computes per-layer sparsity. ReLU routers
apply the config's inference-time compute dial (``router_dial``: per-layer gate thresholds and a
per-token cap) when it is set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import ModelOutput

try:
    from transformers import GenerationMixin
except ImportError:  # pragma: no cover - very old transformers
    GenerationMixin = object

try:
    from transformers.cache_utils import Cache, DynamicCache
except ImportError:  # pragma: no cover
    Cache, DynamicCache = None, None

import inspect

from .configuration_remoe import ReMoEConfig


def _cache_field() -> str:
    """transformers >= 5.2x passes the KV cache as `cache` (and rejects `past_key_values` next to
    it); older releases as `past_key_values`."""
    prepare = getattr(GenerationMixin, "prepare_inputs_for_generation", None)
    try:
        params = inspect.signature(prepare).parameters if prepare else {}
    except (TypeError, ValueError):
        params = {}
    return "cache" if "cache" in params else "past_key_values"


_CACHE_FIELD = _cache_field()


if _CACHE_FIELD == "cache":
    @dataclass
    class ReMoECausalLMOutput(ModelOutput):
        """Causal-LM output (``cache``: the KV cache, transformers >= 5.2x naming)."""

        loss: Optional[torch.Tensor] = None
        logits: Optional[torch.Tensor] = None
        cache: Optional[object] = None
        hidden_states: Optional[tuple] = None
        router_logits: Optional[tuple] = None
        routing_maps: Optional[tuple] = None
else:
    @dataclass
    class ReMoECausalLMOutput(ModelOutput):
        """Causal-LM output (``past_key_values``: the KV cache, older transformers naming)."""

        loss: Optional[torch.Tensor] = None
        logits: Optional[torch.Tensor] = None
        past_key_values: Optional[object] = None
        hidden_states: Optional[tuple] = None
        router_logits: Optional[tuple] = None
        routing_maps: Optional[tuple] = None


def routing_sparsity(routing_maps, valid: Optional[torch.Tensor] = None) -> list:
    """Per MoE layer: fraction of zero entries of the ``[tokens, E]`` routing map (the paper's
    sparsity). ``valid`` (bool ``[tokens]``) restricts the count to real (non-padding) tokens."""
    out = []
    for m in routing_maps:
        if valid is not None:
            m = m[valid.reshape(-1)]
        out.append(1.0 - m.float().mean().item() if m.numel() else float("nan"))
    return out


class ReMoERMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x * self.weight.float()).to(dtype)


class ReMoERotaryEmbedding(nn.Module):
    """Non-interleaved RoPE (rotate-half), the convention of megatron-core and HF Llama.

    The inverse frequencies are recomputed on each call (a few hundred flops) instead of living
    in a non-persistent buffer, which transformers' meta-device loading would leave
    uninitialised."""

    def __init__(self, head_dim: int, base: float):
        super().__init__()
        self.head_dim = head_dim
        self.base = float(base)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype):
        d = self.head_dim
        inv_freq = 1.0 / (self.base ** (torch.arange(0, d, 2, dtype=torch.float32,
                                                      device=position_ids.device) / d))
        freqs = position_ids.float()[..., None] * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)  # [B, S, D]
        return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [B, 1, S, D]
    return x * cos + _rotate_half(x) * sin


class ReMoEAttention(nn.Module):
    def __init__(self, config: ReMoEConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        h = config.hidden_size
        self.q_proj = nn.Linear(h, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, h, bias=False)

    def forward(self, x, cos, sin, mask, cache=None):
        B, S, _ = x.shape
        q = self.q_proj(x).view(B, S, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, S, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, S, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = _apply_rope(q, cos, sin), _apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        rep = self.num_heads // self.num_kv_heads
        if rep > 1:  # query head i uses kv head i // rep
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                             is_causal=mask is None and S > 1,
                                             scale=1.0 / math.sqrt(self.head_dim))
        return self.o_proj(out.transpose(1, 2).reshape(B, S, -1))


class ReMoEMLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class ReMoERouter(nn.Module):
    """Router weight ``[E, hidden]``; ``route`` maps fp32 logits to (gates, routing_map).
    ``moe_index``: position of this MoE layer among the MoE layers (its ``router_dial`` entry)."""

    def __init__(self, config: ReMoEConfig, moe_index: int = 0):
        super().__init__()
        self.config = config
        self.moe_index = moe_index
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))
        if config.router_type == "topk" and config.router_expert_bias:
            self.register_buffer("expert_bias", torch.zeros(config.num_experts, dtype=torch.float32))
        else:
            self.expert_bias = None

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.float(), self.weight.float())

    def route(self, logits: torch.Tensor):
        """fp32 logits [N, E] -> gates [N, E] fp32 (0 off the map) and routing_map [N, E] bool."""
        cfg = self.config
        if cfg.router_type == "relu":
            gates = torch.relu(logits)
            if cfg.router_dial is not None:
                gates = self._dial(logits, gates, cfg.router_dial)
            return gates, gates > 0
        k = cfg.num_experts_per_tok
        if cfg.router_score_function == "softmax":
            if cfg.router_pre_softmax:
                probs, idx = torch.softmax(logits, dim=-1).topk(k, dim=-1)
            else:
                top, idx = logits.topk(k, dim=-1)
                probs = torch.softmax(top, dim=-1)
        else:
            scores = torch.sigmoid(logits)
            if self.expert_bias is not None:
                _, idx = (scores + self.expert_bias.float()).topk(k, dim=-1)
                probs = scores.gather(1, idx)
            else:
                probs, idx = scores.topk(k, dim=-1)
            if k > 1:
                probs = probs / (probs.sum(dim=-1, keepdim=True) + 1e-20)
        if cfg.router_topk_scaling_factor:
            probs = probs * cfg.router_topk_scaling_factor
        gates = torch.zeros_like(logits).scatter(1, idx, probs)
        routing_map = torch.zeros_like(logits, dtype=torch.bool).scatter(1, idx, True)
        return gates, routing_map

    def _dial(self, logits: torch.Tensor, gates: torch.Tensor, dial: dict) -> torch.Tensor:
        """Compute dial (inference only): "cut" zeroes gates <= tau, "shift" is ReLU(logits -
        tau); then at most `max_experts` largest gates per token are kept."""
        if self.training:
            raise RuntimeError("router_dial is inference-only: call model.eval() or remove "
                               "router_dial from the config to train")
        tau = float(dial["thresholds"][self.moe_index])
        if dial.get("form", "cut") == "shift":
            gates = torch.relu(logits - tau)
        elif tau > 0:
            gates = gates.masked_fill(gates <= tau, 0)
        m = dial.get("max_experts")
        if m is not None and m < gates.shape[-1]:
            keep = torch.zeros_like(gates, dtype=torch.bool).scatter_(
                1, gates.topk(m, dim=-1).indices, True)
            gates = gates.masked_fill(~keep, 0)
        return gates


class ReMoESparseMoE(nn.Module):
    """y = sum_e gates_e * SwiGLU_e(x), computed only for the routed (token, expert) pairs."""

    def __init__(self, config: ReMoEConfig, moe_index: int = 0):
        super().__init__()
        self.num_experts = config.num_experts
        self.router = ReMoERouter(config, moe_index)
        self.experts = nn.ModuleList(
            ReMoEMLP(config.hidden_size, config.moe_intermediate_size)
            for _ in range(config.num_experts))

    def forward(self, x: torch.Tensor):
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        logits = self.router.logits(flat)
        gates, routing_map = self.router.route(logits)
        out = torch.zeros_like(flat)
        # The routed (expert, token) pairs, expert-major and tokens ascending within an expert:
        # one nonzero and one gather of the gates for all experts; an expert without tokens costs
        # nothing, one with tokens a gather of its rows (into fresh memory: GEMM results can
        # depend on the rows' alignment, so no slices of one shared gather) and its MLP.
        expert_idx, token_idx = routing_map.t().nonzero(as_tuple=True)
        if token_idx.numel() == 0:
            return out.view(shape), logits, routing_map
        counts = torch.bincount(expert_idx, minlength=self.num_experts).tolist()  # 1 host sync
        ys, start = [], 0
        for e, n in enumerate(counts):
            if n:
                ys.append(self.experts[e](flat.index_select(0, token_idx[start:start + n])))
                start += n
        y = torch.cat(ys) if len(ys) > 1 else ys[0]
        y = (y.float() * gates[token_idx, expert_idx].unsqueeze(1)).to(out.dtype)
        out.index_add_(0, token_idx, y)
        return out.view(shape), logits, routing_map


class ReMoEDecoderLayer(nn.Module):
    def __init__(self, config: ReMoEConfig, layer_idx: int):
        super().__init__()
        self.is_moe = bool(config.moe_layers[layer_idx])
        self.input_layernorm = ReMoERMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = ReMoEAttention(config, layer_idx)
        self.post_attention_layernorm = ReMoERMSNorm(config.hidden_size, config.rms_norm_eps)
        moe_index = sum(config.moe_layers[:layer_idx])  # this layer's router_dial entry
        self.mlp = ReMoESparseMoE(config, moe_index) if self.is_moe else \
            ReMoEMLP(config.hidden_size, config.intermediate_size)

    def forward(self, x, cos, sin, mask, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        h = self.post_attention_layernorm(x)
        if self.is_moe:
            y, logits, routing_map = self.mlp(h)
            return x + y, logits, routing_map
        return x + self.mlp(h), None, None


class ReMoEPreTrainedModel(PreTrainedModel):
    config_class = ReMoEConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["ReMoEDecoderLayer"]
    _supports_cache_class = True

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, ReMoERouter):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.expert_bias is not None:
                module.expert_bias.zero_()
        elif isinstance(module, ReMoERMSNorm):
            nn.init.ones_(module.weight)


class ReMoEModel(ReMoEPreTrainedModel):
    def __init__(self, config: ReMoEConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(ReMoEDecoderLayer(config, i)
                                    for i in range(config.num_hidden_layers))
        self.norm = ReMoERMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = ReMoERotaryEmbedding(config.head_dim, config.rope_theta)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None,
                inputs_embeds=None, use_cache=False, output_hidden_states=False):
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        B, S = x.shape[:2]
        if use_cache and cache is None:
            try:
                cache = DynamicCache(config=self.config)
            except TypeError:  # transformers < 4.5x
                cache = DynamicCache()
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            if attention_mask is not None:  # left padding: count real tokens only
                pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
                position_ids = pos[:, past:past + S]
            else:
                position_ids = torch.arange(past, past + S, device=x.device).expand(B, S)
        cos, sin = self.rotary_emb(position_ids, x.dtype)
        mask = _attention_mask(attention_mask, B, S, past, x.device)
        hidden, logits_all, maps_all = [], [], []
        for layer in self.layers:
            if output_hidden_states:
                hidden.append(x)
            x, logits, routing_map = layer(x, cos, sin, mask, cache)
            if logits is not None:
                logits_all.append(logits)
                maps_all.append(routing_map)
        x = self.norm(x)
        if output_hidden_states:
            hidden.append(x)
        return x, cache, tuple(hidden) or None, tuple(logits_all), tuple(maps_all)


def _attention_mask(attention_mask, B, S, past, device):
    """None (plain causal, the fast path) or a bool [B, 1, S, past+S] mask (True = attend)."""
    if attention_mask is None and past == 0:
        return None  # causal via is_causal
    total = past + S
    q = torch.arange(past, total, device=device)[:, None]
    kpos = torch.arange(total, device=device)[None, :]
    causal = (kpos <= q)[None, None]  # [1, 1, S, total]
    if attention_mask is None:
        return causal.expand(B, 1, S, total)
    keys = attention_mask[:, None, None, :total].bool()
    mask = causal & keys
    # a query row with no visible key (left padding) would give NaN: let it see itself
    mask = mask | (kpos == q)[None, None]
    return mask


class ReMoEForCausalLM(ReMoEPreTrainedModel, GenerationMixin):
    _tied_weights_keys = []

    def __init__(self, config: ReMoEConfig):
        super().__init__(config)
        self.model = ReMoEModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None,
                past_key_values=None, inputs_embeds=None, labels=None, use_cache=None,
                output_router_logits=None, output_hidden_states=None, return_dict=None,
                cache=None, **kwargs):
        if cache is None:
            cache = past_key_values
        if use_cache is None:
            use_cache = cache is not None
        if output_router_logits is None:
            output_router_logits = self.config.output_router_logits
        x, cache, hidden, logits_all, maps_all = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            cache=cache, inputs_embeds=inputs_embeds, use_cache=use_cache,
            output_hidden_states=bool(output_hidden_states))
        logits = self.lm_head(x)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)).float(),
                                   labels[:, 1:].reshape(-1), ignore_index=-100)
        return ReMoECausalLMOutput(
            loss=loss, logits=logits, **{_CACHE_FIELD: cache if use_cache else None},
            hidden_states=hidden,
            router_logits=logits_all if output_router_logits else None,
            routing_maps=maps_all if output_router_logits else None)

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, cache=None,
                                      attention_mask=None, inputs_embeds=None, use_cache=True,
                                      **kwargs):
        cache = cache if cache is not None else past_key_values
        past = cache.get_seq_length() if cache is not None else 0
        inputs = {"attention_mask": attention_mask, "use_cache": use_cache, _CACHE_FIELD: cache}
        if inputs_embeds is not None and past == 0:
            inputs["inputs_embeds"] = inputs_embeds
        else:
            inputs["input_ids"] = input_ids[:, past:] if past else input_ids
        return inputs

    def _reorder_cache(self, past_key_values, beam_idx):  # beam search on old transformers
        past_key_values.reorder_cache(beam_idx)
        return past_key_values


__all__ = ["ReMoEConfig", "ReMoEForCausalLM", "ReMoEModel", "ReMoEPreTrainedModel",
           "ReMoECausalLMOutput", "routing_sparsity"]
