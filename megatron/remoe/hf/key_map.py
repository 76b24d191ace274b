"""The Megatron <-> HF parameter-name map: ONE table (`key_map`) read in both directions.

Each `KeyRule` pairs megatron-core GPTModel keys (TP=PP=EP=1) with HF keys and names how the tensors
relate; `megatron_to_hf_state_dict` applies the rules forwards, `hf_to_megatron_state_dict`
backwards, so a name or layout is written once for both directions.

    copy     one tensor each side
    fp32     copy; the HF side is kept in fp32 (the router's expert bias selects experts only)
    qkv      megatron's fused, GQA-interleaved linear_qkv <-> q_proj, k_proj, v_proj
    gate_up  megatron's fused SwiGLU linear_fc1 = [gate; up] <-> gate_proj, up_proj (w1, w3)
    stack    one megatron key per expert <-> one HF tensor stacked over experts (fused Mixtral)

`load_into` loads a mapped state dict into a model, strictly; `bare_megatron` unwraps a megatron
model to the GPTModel whose keys the table names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from megatron.core.utils import unwrap_model

from megatron.remoe.config import moe_layer_pattern
from megatron.remoe.hf.errors import ConversionError


@dataclass(frozen=True)
class KeyRule:
    megatron: tuple  # megatron key(s)
    hf: tuple  # HF key(s)
    op: str = "copy"  # copy | fp32 | qkv | gate_up | stack
    optional: bool = False  # present only in some models (converted when the source has it)


def dims(tcfg) -> dict:
    """Attention heads, query groups and head width of a megatron config."""
    heads = tcfg.num_attention_heads
    groups = tcfg.num_query_groups or heads
    head_dim = tcfg.kv_channels or tcfg.hidden_size // heads
    return dict(heads=heads, groups=groups, head_dim=head_dim)


def conversion_moe_layer_pattern(tcfg) -> list:
    """config.moe_layer_pattern with the converter's error type (ConversionError) and wording."""
    try:
        return moe_layer_pattern(tcfg)
    except ValueError as e:
        freq = tcfg.moe_layer_freq
        if isinstance(freq, (list, tuple)) and len(freq) != tcfg.num_layers:
            raise ConversionError(f"moe_layer_freq pattern has {len(freq)} entries for "
                                  f"{tcfg.num_layers} layers") from None
        raise ConversionError(str(e)) from None


def mixtral_layout(hf_keys) -> str:
    """'fused' (transformers >= 5: experts.gate_up_proj / down_proj) or 'legacy' (w1/w2/w3)."""
    keys = list(hf_keys)
    if any(k.endswith("mlp.experts.gate_up_proj") for k in keys):
        return "fused"
    if any(".block_sparse_moe.experts." in k for k in keys):
        return "legacy"
    raise ConversionError("cannot recognise the Mixtral parameter layout of this transformers "
                          "version")


def _expert_rules(m: str, h: str, E: int, kind: str, layout: str) -> list:
    """Router and experts of one MoE layer (m, h: the layer's megatron / HF key prefixes)."""
    fc1 = [m + f"mlp.experts.local_experts.{e}.linear_fc1.weight" for e in range(E)]
    fc2 = [m + f"mlp.experts.local_experts.{e}.linear_fc2.weight" for e in range(E)]
    if kind == "mixtral" and layout == "fused":
        return [KeyRule((m + "mlp.router.weight",), (h + "mlp.gate.weight",)),
                KeyRule(tuple(fc1), (h + "mlp.experts.gate_up_proj",), "stack"),  # [gate; up]
                KeyRule(tuple(fc2), (h + "mlp.experts.down_proj",), "stack")]
    if kind == "mixtral":
        rules = [KeyRule((m + "mlp.router.weight",), (h + "block_sparse_moe.gate.weight",))]
        for e in range(E):
            x = h + f"block_sparse_moe.experts.{e}."
            rules += [KeyRule((fc1[e],), (x + "w1.weight", x + "w3.weight"), "gate_up"),
                      KeyRule((fc2[e],), (x + "w2.weight",))]
        return rules
    rules = [KeyRule((m + "mlp.router.weight",), (h + "mlp.router.weight",)),
             KeyRule((m + "mlp.router.expert_bias",), (h + "mlp.router.expert_bias",), "fp32",
                     optional=True)]
    for e in range(E):
        x = h + f"mlp.experts.{e}."
        rules += [KeyRule((fc1[e],), (x + "gate_proj.weight", x + "up_proj.weight"), "gate_up"),
                  KeyRule((fc2[e],), (x + "down_proj.weight",))]
    return rules


def key_map(tcfg, kind: str, layout: Optional[str] = None) -> list:
    """Every parameter of a megatron GPTModel built from `tcfg` and its HF (`kind`) counterpart.
    `layout`: 'fused' or 'legacy' for kind 'mixtral' (see `mixtral_layout`)."""
    rules = [KeyRule(("embedding.word_embeddings.weight",), ("model.embed_tokens.weight",)),
             KeyRule(("decoder.final_layernorm.weight",), ("model.norm.weight",)),
             KeyRule(("output_layer.weight",), ("lm_head.weight",))]
    for i, moe in enumerate(conversion_moe_layer_pattern(tcfg)):
        m, h = f"decoder.layers.{i}.", f"model.layers.{i}."
        rules += [
            KeyRule((m + "self_attention.linear_qkv.weight",),
                    tuple(h + f"self_attn.{p}_proj.weight" for p in "qkv"), "qkv"),
            KeyRule((m + "self_attention.linear_proj.weight",), (h + "self_attn.o_proj.weight",)),
            KeyRule((m + "input_layernorm.weight",), (h + "input_layernorm.weight",)),
            KeyRule((m + "pre_mlp_layernorm.weight",), (h + "post_attention_layernorm.weight",))]
        if moe:
            rules += _expert_rules(m, h, tcfg.num_moe_experts, kind, layout)
        else:
            rules += [KeyRule((m + "mlp.linear_fc1.weight",),
                              (h + "mlp.gate_proj.weight", h + "mlp.up_proj.weight"), "gate_up"),
                      KeyRule((m + "mlp.linear_fc2.weight",), (h + "mlp.down_proj.weight",))]
    return rules


def _split_qkv(w: torch.Tensor, d: dict):
    """megatron's interleaved GQA layout [groups x (q heads of the group, k, v), hd, h] -> q, k, v."""
    g, hd = d["groups"], d["head_dim"]
    qpg = d["heads"] // g
    w = w.view(g, qpg + 2, hd, -1)
    q = w[:, :qpg].reshape(g * qpg * hd, -1)
    k = w[:, qpg].reshape(g * hd, -1)
    v = w[:, qpg + 1].reshape(g * hd, -1)
    return q, k, v


def _merge_qkv(q, k, v, d: dict) -> torch.Tensor:
    g, hd = d["groups"], d["head_dim"]
    qpg = d["heads"] // g
    h = q.shape[-1]
    qkv = torch.cat([q.reshape(g, qpg, hd, h), k.reshape(g, 1, hd, h), v.reshape(g, 1, hd, h)],
                    dim=1)
    return qkv.reshape(g * (qpg + 2) * hd, h)


def _to_hf(rule: KeyRule, msd: dict, d: dict) -> tuple:
    """The HF tensors of one rule, in the order of rule.hf."""
    if rule.op == "stack":
        return (torch.stack([msd[k] for k in rule.megatron]),)
    w = msd[rule.megatron[0]]
    if rule.op == "qkv":
        return _split_qkv(w, d)
    if rule.op == "gate_up":
        return w.chunk(2, dim=0)
    return (w.float(),) if rule.op == "fp32" else (w,)


def _to_megatron(rule: KeyRule, hsd: dict, d: dict) -> tuple:
    """The megatron tensors of one rule, in the order of rule.megatron."""
    if rule.op == "stack":
        w = hsd[rule.hf[0]]
        return tuple(w[e] for e in range(len(rule.megatron)))
    if rule.op == "qkv":
        return (_merge_qkv(*(hsd[k] for k in rule.hf), d),)
    if rule.op == "gate_up":
        return (torch.cat([hsd[k] for k in rule.hf], dim=0),)
    return (hsd[rule.hf[0]],)


def megatron_to_hf_state_dict(msd: dict, tcfg, kind: str, hf_keys=None) -> dict:
    """Megatron GPTModel state dict (TP=PP=EP=1) -> HF state dict of `kind`.

    `hf_keys`: the parameter names of the target HF model (needed for Mixtral, whose expert
    layout depends on the transformers version)."""
    d = dims(tcfg)
    msd = {k: v for k, v in msd.items() if not k.endswith("_extra_state")}
    layout = mixtral_layout(hf_keys) if kind == "mixtral" else None
    out = {}
    for rule in key_map(tcfg, kind, layout):
        if rule.optional and not all(k in msd for k in rule.megatron):
            continue
        out.update(zip(rule.hf, _to_hf(rule, msd, d)))
    return out


def hf_to_megatron_state_dict(hsd: dict, tcfg, kind: str) -> dict:
    """HF state dict of `kind` -> megatron GPTModel state dict (without `_extra_state` entries)."""
    d = dims(tcfg)
    layout = mixtral_layout(hsd) if kind == "mixtral" else None
    out = {}
    for rule in key_map(tcfg, kind, layout):
        if rule.optional and not all(k in hsd for k in rule.hf):
            continue
        out.update(zip(rule.megatron, _to_megatron(rule, hsd, d)))
    return out


def load_into(module, sd: dict, what: str) -> None:
    """load_state_dict with only the unavoidable extras tolerated (megatron `_extra_state`,
    non-persistent buffers); anything else missing or unexpected is an error."""
    current = module.state_dict()
    missing = [k for k in current if k not in sd and not k.endswith("_extra_state")
               and not k.endswith("local_tokens_per_expert")]
    unexpected = [k for k in sd if k not in current]
    if missing or unexpected:
        raise ConversionError(f"{what}: missing {missing[:4]}{'...' if len(missing) > 4 else ''}"
                              f" unexpected {unexpected[:4]}{'...' if len(unexpected) > 4 else ''}")
    for k, v in sd.items():
        if tuple(current[k].shape) != tuple(v.shape):
            raise ConversionError(f"{what}: {k} has shape {tuple(v.shape)}, the model expects "
                                  f"{tuple(current[k].shape)}")
    full = dict(current)
    full.update({k: v.to(current[k].dtype) for k, v in sd.items()})
    module.load_state_dict(full, strict=True)


def bare_megatron(model):
    """The GPTModel inside a (list of one) DDP/Float16Module-wrapped model."""
    if isinstance(model, list):
        if len(model) != 1:
            raise ConversionError("pass a single (non-pipelined) model chunk")
        model = model[0]
    return unwrap_model(model)
