"""Megatron-Core <-> Hugging Face conversion of megatron-remoe GPT models, plus a parity check.

Core (works on in-memory models; needs megatron-core's parallel state with TP=PP=EP=1, e.g.
``init_distributed(ParallelConfig())``):

    export_kind(tcfg)                                  -> "remoe" | "mixtral" | "llama"
    hf_config_from_megatron(tcfg, vocab_size, ...)     -> ReMoEConfig / MixtralConfig / LlamaConfig
    megatron_to_hf_state_dict(megatron_sd, tcfg, kind, hf_keys)
    hf_to_megatron_state_dict(hf_sd, tcfg, kind)
    megatron_to_hf(model, tcfg, vocab_size, ...)       -> HF model (weights copied)
    transformer_config_from_hf(hf_config)              -> ReMoETransformerConfig
    hf_to_megatron(hf_model)                           -> (megatron GPTModel, tcfg)
    verify_parity(megatron_model, hf_model, ...)       -> ParityReport (logits, routing, sparsity,
                                                          greedy decoding)
    save_hf_folder(hf_model, out_dir, tokenizer, ...)  atomic folder write (tmp dir + rename)

Checkpoint front ends (torch_dist checkpoints of `megatron.remoe.checkpointing`):

    load_megatron_checkpoint(path, iteration=None)     -> (model, tcfg, TrainConfig, info)
    save_megatron_checkpoint_from_hf(hf_dir, save_dir) -> iter_0000000 checkpoint for continued
                                                          training

Which HF class a checkpoint becomes:

* ``--router relu`` -> ``ReMoEForCausalLM`` (our trust_remote_code class, ``router_type: relu``).
* ``--router dense`` -> ``LlamaForCausalLM`` (identical architecture).
* TopK -> ``MixtralForCausalLM`` only when the routing semantics are Mixtral's: softmax scores,
  **post**-softmax top-k (top-k logits, softmax over those k, which equals Mixtral's softmax ->
  top-k -> renormalise), no expert bias, no scaling factor, no group-limited routing and every
  layer an MoE layer. The trainer's `topk` preset is **pre**-softmax without renormalisation (with
  k=1 the gate is the softmax probability, Mixtral's is 1.0) and `topk-sigmoid-bias` uses sigmoid
  scores plus a routing bias, so both export to ``ReMoEForCausalLM`` with ``router_type: topk`` and
  megatron-core's exact routing semantics.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
REMOTE_CODE_FILES = ("configuration_remoe.py", "modeling_remoe.py")
CONVERSION_META = "remoe_conversion.json"
TRAIN_CONFIG_FILE = "remoe_train_config.json"


class ConversionError(ValueError):
    """The model or checkpoint cannot be converted; the message is one line and names the fix."""


def _log(msg: str) -> None:
    print(msg, flush=True)


# ------------------------------------------------------------------------------------------------
# Architecture checks and configs
# ------------------------------------------------------------------------------------------------
def moe_layer_pattern(tcfg) -> list:
    """0/1 per layer: 1 where the layer has a routed MoE MLP."""
    L = tcfg.num_layers
    if not tcfg.num_moe_experts:
        return [0] * L
    freq = tcfg.moe_layer_freq
    if isinstance(freq, int):
        return [1 if i % freq == 0 else 0 for i in range(L)]
    pattern = [int(x) for x in freq]
    if len(pattern) != L:
        raise ConversionError(f"moe_layer_freq pattern has {len(pattern)} entries for {L} layers")
    return pattern


def _check_supported(tcfg) -> None:
    """Only the LLaMA-style models megatron-remoe builds can be expressed by the HF classes."""
    problems = []
    if tcfg.normalization != "RMSNorm":
        problems.append(f"normalization={tcfg.normalization} (need RMSNorm)")
    if not tcfg.gated_linear_unit or tcfg.activation_func is not F.silu:
        problems.append("MLP is not SwiGLU (gated_linear_unit + silu)")
    if tcfg.add_bias_linear or getattr(tcfg, "add_qkv_bias", False):
        problems.append("linear biases")
    if getattr(tcfg, "qk_layernorm", False):
        problems.append("qk_layernorm")
    if getattr(tcfg, "rotary_interleaved", False):
        problems.append("interleaved RoPE")
    if getattr(tcfg, "multi_latent_attention", False):
        problems.append("multi-latent attention")
    if getattr(tcfg, "moe_shared_expert_intermediate_size", None):
        problems.append("shared experts")
    if getattr(tcfg, "num_moe_experts", None) and getattr(tcfg, "moe_router_num_groups", None):
        problems.append("group-limited routing")
    if problems:
        raise ConversionError("unsupported architecture for HF export: " + ", ".join(problems))


def export_kind(tcfg) -> str:
    """'llama' (dense), 'mixtral' (TopK with Mixtral's exact semantics) or 'remoe'."""
    _check_supported(tcfg)
    if not tcfg.num_moe_experts:
        return "llama"
    if getattr(tcfg, "moe_relu_routing", False):
        return "remoe"
    mixtral_like = (
        tcfg.moe_router_score_function == "softmax" and not tcfg.moe_router_pre_softmax
        and not tcfg.moe_router_enable_expert_bias and not tcfg.moe_router_topk_scaling_factor
        and all(moe_layer_pattern(tcfg)))
    return "mixtral" if mixtral_like else "remoe"


def _dims(tcfg) -> dict:
    heads = tcfg.num_attention_heads
    groups = tcfg.num_query_groups or heads
    head_dim = tcfg.kv_channels or tcfg.hidden_size // heads
    return dict(heads=heads, groups=groups, head_dim=head_dim)


def hf_config_from_megatron(tcfg, vocab_size: int, max_position_embeddings: int,
                            rotary_base: float = 1_000_000, kind: Optional[str] = None,
                            eos_token_id: Optional[int] = None, dtype: str = "float32",
                            target_sparsity: Optional[float] = None):
    """The HF config describing the same network as megatron config `tcfg`."""
    kind = kind or export_kind(tcfg)
    d = _dims(tcfg)
    common = dict(
        vocab_size=vocab_size, hidden_size=tcfg.hidden_size, num_hidden_layers=tcfg.num_layers,
        num_attention_heads=d["heads"], num_key_value_heads=d["groups"], head_dim=d["head_dim"],
        hidden_act="silu", max_position_embeddings=max_position_embeddings,
        rms_norm_eps=tcfg.layernorm_epsilon, rope_theta=float(rotary_base),
        initializer_range=tcfg.init_method_std, tie_word_embeddings=False,
        bos_token_id=eos_token_id, eos_token_id=eos_token_id)
    if kind == "llama":
        from transformers import LlamaConfig

        cfg = LlamaConfig(intermediate_size=tcfg.ffn_hidden_size, attention_bias=False,
                          mlp_bias=False, **common)
    elif kind == "mixtral":
        from transformers import MixtralConfig

        cfg = MixtralConfig(intermediate_size=tcfg.moe_ffn_hidden_size,
                            num_local_experts=tcfg.num_moe_experts,
                            num_experts_per_tok=tcfg.moe_router_topk, router_jitter_noise=0.0,
                            router_aux_loss_coef=tcfg.moe_aux_loss_coeff or 0.0,
                            sliding_window=None, **common)
    elif kind == "remoe":
        from megatron.remoe.hf.configuration_remoe import ReMoEConfig

        relu = bool(getattr(tcfg, "moe_relu_routing", False))
        if target_sparsity is None and relu:
            target_sparsity = tcfg.target_sparsity
        cfg = ReMoEConfig(
            intermediate_size=tcfg.ffn_hidden_size, moe_intermediate_size=tcfg.moe_ffn_hidden_size,
            num_experts=tcfg.num_moe_experts, moe_layers=moe_layer_pattern(tcfg),
            router_type="relu" if relu else "topk", num_experts_per_tok=tcfg.moe_router_topk,
            router_score_function=getattr(tcfg, "moe_router_score_function", "softmax"),
            router_pre_softmax=bool(tcfg.moe_router_pre_softmax),
            router_topk_scaling_factor=tcfg.moe_router_topk_scaling_factor,
            router_expert_bias=bool(tcfg.moe_router_enable_expert_bias),
            moe_granularity=getattr(tcfg, "moe_granularity", 1),
            target_sparsity=target_sparsity, router_dial=_dial_dict(tcfg), **common)
        cfg.auto_map = {"AutoConfig": "configuration_remoe.ReMoEConfig",
                        "AutoModelForCausalLM": "modeling_remoe.ReMoEForCausalLM"}
        cfg.architectures = ["ReMoEForCausalLM"]
    else:
        raise ConversionError(f"unknown export kind {kind!r}")
    cfg.torch_dtype = dtype
    return cfg


def _dial_dict(tcfg) -> Optional[dict]:
    """The compute dial of a megatron config in HF `router_dial` form (None: undialled)."""
    dial = getattr(tcfg, "moe_relu_dial", None)
    return dial.to_dict() if dial is not None else None


def hf_kind(hf_config) -> str:
    mt = getattr(hf_config, "model_type", None)
    if mt in ("remoe", "llama", "mixtral"):
        return mt
    raise ConversionError(f"HF model_type {mt!r} is not supported (remoe, llama, mixtral)")


def _rope_theta(hf_config) -> float:
    params = getattr(hf_config, "rope_parameters", None) or {}
    if isinstance(params, dict) and params.get("rope_theta") is not None:
        if params.get("rope_type", "default") != "default":
            raise ConversionError(f"RoPE scaling {params.get('rope_type')!r} is not supported")
        return float(params["rope_theta"])
    scaling = getattr(hf_config, "rope_scaling", None)
    if scaling:
        raise ConversionError(f"RoPE scaling {scaling} is not supported")
    return float(getattr(hf_config, "rope_theta", 10000.0))


def transformer_config_fields_from_hf(hf_config) -> dict:
    """build_transformer_config(**fields) arguments of the megatron model matching `hf_config`."""
    kind = hf_kind(hf_config)
    head_dim = getattr(hf_config, "head_dim", None) or \
        hf_config.hidden_size // hf_config.num_attention_heads
    if getattr(hf_config, "attention_bias", False) or getattr(hf_config, "mlp_bias", False):
        raise ConversionError("HF model has linear biases; megatron-remoe models have none")
    if getattr(hf_config, "hidden_act", "silu") != "silu":
        raise ConversionError(f"hidden_act={hf_config.hidden_act} (need silu / SwiGLU)")
    if getattr(hf_config, "tie_word_embeddings", False):
        raise ConversionError("tied embeddings are not supported (megatron-remoe unties them)")
    fields = dict(num_layers=hf_config.num_hidden_layers, hidden_size=hf_config.hidden_size,
                  num_attention_heads=hf_config.num_attention_heads,
                  num_query_groups=hf_config.num_key_value_heads or
                  hf_config.num_attention_heads,
                  kv_channels=head_dim, layernorm_epsilon=hf_config.rms_norm_eps,
                  init_method_std=getattr(hf_config, "initializer_range", 0.01),
                  ffn_hidden_size=hf_config.intermediate_size)
    if kind == "llama":
        return dict(router="dense", num_experts=None, **fields)
    if kind == "mixtral":
        if getattr(hf_config, "sliding_window", None):
            raise ConversionError("Mixtral with sliding-window attention is not supported")
        return dict(router="topk", num_experts=hf_config.num_local_experts,
                    moe_router_topk=hf_config.num_experts_per_tok, moe_router_pre_softmax=False,
                    moe_router_dtype="fp32", **fields)
    E = hf_config.num_experts
    fields["moe_ffn_hidden_size"] = hf_config.moe_intermediate_size
    pattern = list(hf_config.moe_layers)
    fields["moe_layer_freq"] = 1 if all(pattern) else pattern
    if hf_config.router_type == "relu":
        extra = {}
        if hf_config.target_sparsity is not None and \
                abs(hf_config.target_sparsity - (1 - hf_config.num_experts_per_tok / E)) > 1e-12:
            extra["moe_relu_target_sparsity"] = hf_config.target_sparsity
        if getattr(hf_config, "router_dial", None) is not None:
            extra["moe_relu_dial"] = dict(hf_config.router_dial)
        return dict(router="relu", num_experts=E, moe_router_topk=hf_config.num_experts_per_tok,
                    moe_router_dtype="fp32", **extra, **fields)
    if hf_config.router_score_function == "sigmoid":
        return dict(router="topk-sigmoid-bias", num_experts=E,
                    moe_router_topk=hf_config.num_experts_per_tok, moe_router_dtype="fp32",
                    moe_router_enable_expert_bias=hf_config.router_expert_bias,
                    moe_router_topk_scaling_factor=hf_config.router_topk_scaling_factor,
                    **fields)
    return dict(router="topk", num_experts=E, moe_router_topk=hf_config.num_experts_per_tok,
                moe_router_pre_softmax=hf_config.router_pre_softmax, moe_router_dtype="fp32",
                moe_router_topk_scaling_factor=hf_config.router_topk_scaling_factor, **fields)


def transformer_config_from_hf(hf_config, **overrides):
    """A single-process fp32 ReMoETransformerConfig matching `hf_config`."""
    from megatron.remoe.model import build_transformer_config

    fields = transformer_config_fields_from_hf(hf_config)
    fields.update(use_cpu_initialization=True)
    fields.update(overrides)
    return build_transformer_config(**fields)


# ------------------------------------------------------------------------------------------------
# State-dict mapping
# ------------------------------------------------------------------------------------------------
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


def _mixtral_layout(hf_keys) -> str:
    """'fused' (transformers >= 5: experts.gate_up_proj / down_proj) or 'legacy' (w1/w2/w3)."""
    keys = list(hf_keys)
    if any(k.endswith("mlp.experts.gate_up_proj") for k in keys):
        return "fused"
    if any(".block_sparse_moe.experts." in k for k in keys):
        return "legacy"
    raise ConversionError("cannot recognise the Mixtral parameter layout of this transformers "
                          "version")


def megatron_to_hf_state_dict(msd: dict, tcfg, kind: str, hf_keys=None) -> dict:
    """Megatron GPTModel state dict (TP=PP=EP=1) -> HF state dict of `kind`.

    `hf_keys`: the parameter names of the target HF model (needed for Mixtral, whose expert
    layout depends on the transformers version)."""
    d = _dims(tcfg)
    msd = {k: v for k, v in msd.items() if not k.endswith("_extra_state")}
    out = {"model.embed_tokens.weight": msd["embedding.word_embeddings.weight"],
           "model.norm.weight": msd["decoder.final_layernorm.weight"],
           "lm_head.weight": msd["output_layer.weight"]}
    pattern = moe_layer_pattern(tcfg)
    layout = _mixtral_layout(hf_keys) if kind == "mixtral" else None
    for i in range(tcfg.num_layers):
        m, h = f"decoder.layers.{i}.", f"model.layers.{i}."
        q, k, v = _split_qkv(msd[m + "self_attention.linear_qkv.weight"], d)
        out.update({h + "self_attn.q_proj.weight": q, h + "self_attn.k_proj.weight": k,
                    h + "self_attn.v_proj.weight": v,
                    h + "self_attn.o_proj.weight": msd[m + "self_attention.linear_proj.weight"],
                    h + "input_layernorm.weight": msd[m + "input_layernorm.weight"],
                    h + "post_attention_layernorm.weight": msd[m + "pre_mlp_layernorm.weight"]})
        if not pattern[i]:
            gate, up = msd[m + "mlp.linear_fc1.weight"].chunk(2, dim=0)
            out.update({h + "mlp.gate_proj.weight": gate, h + "mlp.up_proj.weight": up,
                        h + "mlp.down_proj.weight": msd[m + "mlp.linear_fc2.weight"]})
            continue
        E = tcfg.num_moe_experts
        fc1 = [msd[m + f"mlp.experts.local_experts.{e}.linear_fc1.weight"] for e in range(E)]
        fc2 = [msd[m + f"mlp.experts.local_experts.{e}.linear_fc2.weight"] for e in range(E)]
        router = msd[m + "mlp.router.weight"]
        if kind == "mixtral" and layout == "fused":
            out[h + "mlp.gate.weight"] = router
            out[h + "mlp.experts.gate_up_proj"] = torch.stack(fc1)  # [gate; up] per expert
            out[h + "mlp.experts.down_proj"] = torch.stack(fc2)
        elif kind == "mixtral":
            out[h + "block_sparse_moe.gate.weight"] = router
            for e in range(E):
                gate, up = fc1[e].chunk(2, dim=0)
                x = h + f"block_sparse_moe.experts.{e}."
                out.update({x + "w1.weight": gate, x + "w3.weight": up, x + "w2.weight": fc2[e]})
        else:
            out[h + "mlp.router.weight"] = router
            bias = msd.get(m + "mlp.router.expert_bias")
            if getattr(tcfg, "moe_router_enable_expert_bias", False) and bias is not None:
                out[h + "mlp.router.expert_bias"] = bias.float()
            for e in range(E):
                gate, up = fc1[e].chunk(2, dim=0)
                x = h + f"mlp.experts.{e}."
                out.update({x + "gate_proj.weight": gate, x + "up_proj.weight": up,
                            x + "down_proj.weight": fc2[e]})
    return out


def hf_to_megatron_state_dict(hsd: dict, tcfg, kind: str) -> dict:
    """HF state dict of `kind` -> megatron GPTModel state dict (without `_extra_state` entries)."""
    d = _dims(tcfg)
    out = {"embedding.word_embeddings.weight": hsd["model.embed_tokens.weight"],
           "decoder.final_layernorm.weight": hsd["model.norm.weight"],
           "output_layer.weight": hsd["lm_head.weight"]}
    pattern = moe_layer_pattern(tcfg)
    layout = _mixtral_layout(hsd) if kind == "mixtral" else None
    for i in range(tcfg.num_layers):
        m, h = f"decoder.layers.{i}.", f"model.layers.{i}."
        out[m + "self_attention.linear_qkv.weight"] = _merge_qkv(
            hsd[h + "self_attn.q_proj.weight"], hsd[h + "self_attn.k_proj.weight"],
            hsd[h + "self_attn.v_proj.weight"], d)
        out[m + "self_attention.linear_proj.weight"] = hsd[h + "self_attn.o_proj.weight"]
        out[m + "input_layernorm.weight"] = hsd[h + "input_layernorm.weight"]
        out[m + "pre_mlp_layernorm.weight"] = hsd[h + "post_attention_layernorm.weight"]
        if not pattern[i]:
            out[m + "mlp.linear_fc1.weight"] = torch.cat(
                [hsd[h + "mlp.gate_proj.weight"], hsd[h + "mlp.up_proj.weight"]], dim=0)
            out[m + "mlp.linear_fc2.weight"] = hsd[h + "mlp.down_proj.weight"]
            continue
        E = tcfg.num_moe_experts
        if kind == "mixtral" and layout == "fused":
            out[m + "mlp.router.weight"] = hsd[h + "mlp.gate.weight"]
            gu, dn = hsd[h + "mlp.experts.gate_up_proj"], hsd[h + "mlp.experts.down_proj"]
            fc1, fc2 = [gu[e] for e in range(E)], [dn[e] for e in range(E)]
        elif kind == "mixtral":
            out[m + "mlp.router.weight"] = hsd[h + "block_sparse_moe.gate.weight"]
            x = h + "block_sparse_moe.experts.{}."
            fc1 = [torch.cat([hsd[x.format(e) + "w1.weight"], hsd[x.format(e) + "w3.weight"]])
                   for e in range(E)]
            fc2 = [hsd[x.format(e) + "w2.weight"] for e in range(E)]
        else:
            out[m + "mlp.router.weight"] = hsd[h + "mlp.router.weight"]
            if h + "mlp.router.expert_bias" in hsd:
                out[m + "mlp.router.expert_bias"] = hsd[h + "mlp.router.expert_bias"]
            x = h + "mlp.experts.{}."
            fc1 = [torch.cat([hsd[x.format(e) + "gate_proj.weight"],
                              hsd[x.format(e) + "up_proj.weight"]]) for e in range(E)]
            fc2 = [hsd[x.format(e) + "down_proj.weight"] for e in range(E)]
        for e in range(E):
            out[m + f"mlp.experts.local_experts.{e}.linear_fc1.weight"] = fc1[e]
            out[m + f"mlp.experts.local_experts.{e}.linear_fc2.weight"] = fc2[e]
    return out


def _load_into(module, sd: dict, what: str) -> None:
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


# ------------------------------------------------------------------------------------------------
# Whole models
# ------------------------------------------------------------------------------------------------
def _hf_class(kind: str):
    if kind == "llama":
        from transformers import LlamaForCausalLM
        return LlamaForCausalLM
    if kind == "mixtral":
        from transformers import MixtralForCausalLM
        return MixtralForCausalLM
    from megatron.remoe.hf.modeling_remoe import ReMoEForCausalLM
    return ReMoEForCausalLM


def _bare_megatron(model):
    from megatron.core.utils import unwrap_model

    if isinstance(model, list):
        if len(model) != 1:
            raise ConversionError("pass a single (non-pipelined) model chunk")
        model = model[0]
    return unwrap_model(model)


def megatron_to_hf(model, tcfg, vocab_size: int, max_position_embeddings: int,
                   rotary_base: float = 1_000_000, kind: Optional[str] = None,
                   dtype: torch.dtype = torch.float32, eos_token_id: Optional[int] = None,
                   target_sparsity: Optional[float] = None):
    """An HF model (Llama / Mixtral / ReMoE) holding the weights of megatron `model` (TP=PP=EP=1)."""
    kind = kind or export_kind(tcfg)
    model = _bare_megatron(model)
    name = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[dtype]
    hf_config = hf_config_from_megatron(tcfg, vocab_size, max_position_embeddings, rotary_base,
                                        kind, eos_token_id, name, target_sparsity)
    hf = _hf_class(kind)(hf_config)
    hf_sd = megatron_to_hf_state_dict(
        {k: v.detach().float().cpu() for k, v in model.state_dict().items()
         if isinstance(v, torch.Tensor)}, tcfg, kind, hf.state_dict().keys())
    _load_into(hf, hf_sd, "HF model")
    hf = hf.to(dtype)
    if kind == "remoe":  # the router's expert bias stays fp32 (selection only)
        for mod in hf.modules():
            if getattr(mod, "expert_bias", None) is not None:
                mod.expert_bias.data = mod.expert_bias.data.float()
    hf.eval()
    return hf, kind


def hf_to_megatron(hf_model, tcfg=None, rotary_base: Optional[float] = None):
    """A megatron GPTModel (single process) holding the weights of `hf_model`.
    Returns (model, tcfg)."""
    from megatron.core import tensor_parallel

    from megatron.remoe.model import build_gpt_model

    kind = hf_kind(hf_model.config)
    tcfg = tcfg or transformer_config_from_hf(hf_model.config)
    model = build_gpt_model(tcfg, vocab_size=hf_model.config.vocab_size,
                            max_sequence_length=hf_model.config.max_position_embeddings,
                            controller=None, use_transformer_engine=False,
                            rotary_base=rotary_base or _rope_theta(hf_model.config))
    for p in model.parameters():
        tensor_parallel.set_defaults_if_not_set_tensor_model_parallel_attributes(p)
    hsd = {k: v.detach().float().cpu() for k, v in hf_model.state_dict().items()}
    _load_into(model, hf_to_megatron_state_dict(hsd, tcfg, kind), "megatron model")
    model.eval()
    return model, tcfg


# ------------------------------------------------------------------------------------------------
# Parity check
# ------------------------------------------------------------------------------------------------
@dataclass
class ParityReport:
    max_abs_logit_diff: float = math.inf
    mean_abs_logit_diff: float = math.inf
    routing_mismatches: int = 0
    routing_ignored: int = 0
    routing_entries: int = 0
    sparsity_megatron: list = field(default_factory=list)
    sparsity_hf: list = field(default_factory=list)
    greedy_megatron: list = field(default_factory=list)
    greedy_hf: list = field(default_factory=list)
    greedy_hf_cached: list = field(default_factory=list)
    tolerance: float = 1e-4
    dial: Optional[dict] = None
    ok: bool = False
    failures: list = field(default_factory=list)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def summary(self) -> str:
        lines = [f"verify: max |logit diff| = {self.max_abs_logit_diff:.3e} "
                 f"(mean {self.mean_abs_logit_diff:.3e}, tolerance {self.tolerance:g})"]
        if self.dial:
            lines.append(f"verify: compute dial {self.dial['form']} thresholds "
                         f"{[round(t, 6) for t in self.dial['thresholds']]} max_experts "
                         f"{self.dial['max_experts']} (both models)")
        if self.routing_entries:
            lines.append(f"verify: routing maps: {self.routing_mismatches} mismatching of "
                         f"{self.routing_entries} entries ({self.routing_ignored} ignored, "
                         f"|router logit - threshold| < {self.tolerance:g})")
            lines.append("verify: per-layer sparsity megatron " +
                         " ".join(f"{s:.4f}" for s in self.sparsity_megatron) + " | HF " +
                         " ".join(f"{s:.4f}" for s in self.sparsity_hf))
        lines.append(f"verify: greedy {len(self.greedy_megatron)} tokens megatron "
                     f"{self.greedy_megatron} | HF {self.greedy_hf} | HF generate() "
                     f"{self.greedy_hf_cached}")
        lines.append("verify: PASS" if self.ok else "verify: FAIL: " + "; ".join(self.failures))
        return "\n".join(lines)


def _megatron_forward(model, input_ids: torch.Tensor, capture: bool = False):
    """logits [B, S, V] fp32 and (if capture) per-MoE-layer (probs, routing_map) in HF token
    order (row b * S + s)."""
    from megatron.core.transformer.moe.router import Router

    B, S = input_ids.shape
    routers = sorted(((int(m.layer_number), m) for m in model.modules()
                      if isinstance(m, Router)), key=lambda x: x[0])
    seen = {}
    handles = []
    if capture:
        def hook(n):
            def fn(module, args, output):
                seen[n] = (output[0].detach().float(), output[1].detach())
            return fn
        handles = [m.register_forward_hook(hook(n)) for n, m in routers]
    try:
        pos = torch.arange(S).unsqueeze(0).expand(B, S)
        with torch.no_grad():
            logits = model(input_ids, pos, None).float()
    finally:
        for h in handles:
            h.remove()
    maps = []
    for n, _ in routers:
        if n in seen:
            probs, rmap = seen[n]
            E = rmap.shape[-1]
            maps.append((probs.reshape(S, B, E).transpose(0, 1).reshape(B * S, E),
                         rmap.reshape(S, B, E).transpose(0, 1).reshape(B * S, E)))
    return logits, maps


def greedy_megatron(model, prompt: torch.Tensor, new_tokens: int) -> list:
    ids = prompt.clone()
    for _ in range(new_tokens):
        logits, _ = _megatron_forward(model, ids)
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[0, prompt.shape[1]:].tolist()


def greedy_hf(hf_model, prompt: torch.Tensor, new_tokens: int) -> list:
    ids = prompt.clone()
    with torch.no_grad():
        for _ in range(new_tokens):
            logits = hf_model(input_ids=ids, use_cache=False).logits.float()
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[0, prompt.shape[1]:].tolist()


def greedy_hf_generate(hf_model, prompt: torch.Tensor, new_tokens: int) -> list:
    with torch.no_grad():
        out = hf_model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                                max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                do_sample=False, use_cache=True, pad_token_id=0)
    return out[0, prompt.shape[1]:].tolist()


def verify_parity(megatron_model, hf_model, input_ids: Optional[torch.Tensor] = None,
                  prompt: Optional[torch.Tensor] = None, new_tokens: int = 16,
                  tolerance: float = 1e-4, seed: int = 0) -> ParityReport:
    """Same inputs through both models (fp32, router fp32): logits within `tolerance` (max abs
    diff), routing maps equal except entries with |router logit| < tolerance (TopK: tokens whose
    k-th and (k+1)-th router logits are closer than that), per-layer sparsity equal up to those
    ignored entries, identical greedy decoding of `new_tokens` tokens (plain loop and HF
    generate() with KV cache)."""
    megatron_model = _bare_megatron(megatron_model)
    megatron_model.eval()
    hf_model.eval()
    if next(hf_model.parameters()).dtype != torch.float32:
        raise ConversionError("verify needs the fp32 HF model (ReLU gates near 0 flip in bf16)")
    vocab = hf_model.config.vocab_size
    g = torch.Generator().manual_seed(seed)
    if input_ids is None:
        input_ids = torch.randint(0, vocab, (2, 32), generator=g)
    if prompt is None:
        prompt = input_ids[:1, :8]
    rep = ParityReport(tolerance=tolerance)
    m_dial = _dial_dict(getattr(megatron_model, "config", None))
    h_dial = getattr(hf_model.config, "router_dial", None)
    rep.dial = m_dial
    if m_dial != h_dial:
        rep.failures.append(f"compute dial differs: megatron {m_dial} vs HF {h_dial}")
    m_logits, m_maps = _megatron_forward(megatron_model, input_ids, capture=True)
    with torch.no_grad():
        out = hf_model(input_ids=input_ids, use_cache=False, output_router_logits=True)
    h_logits = out.logits.float()
    diff = (m_logits - h_logits).abs()
    rep.max_abs_logit_diff = float(diff.max())
    rep.mean_abs_logit_diff = float(diff.mean())
    if not rep.max_abs_logit_diff <= tolerance:
        rep.failures.append(f"max |logit diff| {rep.max_abs_logit_diff:.3e} > {tolerance:g}")

    h_router_logits = getattr(out, "router_logits", None)
    if m_maps:
        if isinstance(out.router_logits, tuple) and out.router_logits and \
                out.router_logits[0].dim() == 3:  # some HF classes: [B, S, E]
            h_router_logits = tuple(x.reshape(-1, x.shape[-1]) for x in out.router_logits)
        h_maps = getattr(out, "routing_maps", None)
        if h_maps is None:  # Mixtral: top-k of the softmax (same as top-k of the logits)
            k = hf_model.config.num_experts_per_tok
            h_maps = tuple(torch.zeros_like(lg, dtype=torch.bool).scatter(
                1, lg.float().topk(k, dim=-1).indices, True) for lg in h_router_logits)
        if len(h_maps) != len(m_maps):
            rep.failures.append(f"{len(m_maps)} MoE layers in megatron, {len(h_maps)} in HF")
        relu = getattr(hf_model.config, "router_type", "topk") == "relu"
        k = getattr(hf_model.config, "num_experts_per_tok", 1)
        dial = getattr(hf_model.config, "router_dial", None) if relu else None
        for i, ((_, m_map), h_map, lg) in enumerate(zip(m_maps, h_maps, h_router_logits)):
            lg = lg.float()
            if relu:  # the routing boundary: logit = tau (0 undialled)
                tau = float(dial["thresholds"][i]) if dial else 0.0
                ignore = (lg - tau).abs() < tolerance
                cap = dial.get("max_experts") if dial else None
                if cap is not None and cap < lg.shape[-1]:  # near tie at the cap
                    top = lg.topk(cap + 1, dim=-1).values
                    ignore = ignore | ((top[:, cap - 1] - top[:, cap]).abs() < tolerance)[:, None]
            else:  # a token whose k-th/(k+1)-th choice is a near tie may legitimately swap
                E = lg.shape[-1]
                top = lg.topk(min(k + 1, E), dim=-1).values
                near = (top[:, k - 1] - top[:, k]).abs() < tolerance if k < E else \
                    torch.zeros(lg.shape[0], dtype=torch.bool)
                ignore = near[:, None].expand_as(lg)
            mism = (m_map != h_map) & ~ignore
            rep.routing_mismatches += int(mism.sum())
            rep.routing_ignored += int(ignore.sum())
            rep.routing_entries += m_map.numel()
            rep.sparsity_megatron.append(1.0 - m_map.float().mean().item())
            rep.sparsity_hf.append(1.0 - h_map.float().mean().item())
            slack = int(((m_map != h_map) & ignore).sum()) / max(m_map.numel(), 1)
            if abs(rep.sparsity_megatron[-1] - rep.sparsity_hf[-1]) > slack + 1e-12:
                rep.failures.append(f"sparsity differs in MoE layer {len(rep.sparsity_hf)}")
        if rep.routing_mismatches:
            rep.failures.append(f"{rep.routing_mismatches} routing-map entries differ")
    if new_tokens:
        rep.greedy_megatron = greedy_megatron(megatron_model, prompt, new_tokens)
        rep.greedy_hf = greedy_hf(hf_model, prompt, new_tokens)
        rep.greedy_hf_cached = greedy_hf_generate(hf_model, prompt, new_tokens)
        if rep.greedy_megatron != rep.greedy_hf:
            rep.failures.append("greedy decoding differs (megatron vs HF)")
        if rep.greedy_hf_cached != rep.greedy_hf:
            rep.failures.append("HF generate() with KV cache differs from the uncached loop")
    rep.ok = not rep.failures
    return rep


# ------------------------------------------------------------------------------------------------
# HF folders
# ------------------------------------------------------------------------------------------------
def write_tokenizer_files(tokenizer, out_dir: str, model_max_length: int) -> None:
    """tokenizer.json + tokenizer_config.json (+ special_tokens_map.json) so that
    AutoTokenizer.from_pretrained(out_dir) loads a PreTrainedTokenizerFast."""
    tokenizer.backend.save(os.path.join(out_dir, "tokenizer.json"))
    eod = tokenizer.eod_token
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model_max_length,
           "bos_token": eod, "eos_token": eod, "unk_token": eod, "pad_token": eod,
           "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False}
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as fh:
        json.dump(cfg, fh, indent=2)
    with open(os.path.join(out_dir, "special_tokens_map.json"), "w", encoding="utf-8") as fh:
        json.dump({k: eod for k in ("bos_token", "eos_token", "unk_token", "pad_token")}, fh,
                  indent=2)


def check_output_dir(out_dir: str, overwrite: bool) -> str:
    """Fail early (before any work) on an output path we must not or cannot write."""
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir):
        if not os.path.isdir(out_dir):
            raise ConversionError(f"output {out_dir} exists and is not a directory")
        if os.listdir(out_dir) and not overwrite:
            raise ConversionError(f"output {out_dir} exists and is not empty; choose a new path "
                                  "or pass --overwrite")
    parent = os.path.dirname(out_dir)
    probe = parent
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe) or not os.access(probe, os.W_OK):
        raise ConversionError(f"cannot write into {parent}")
    return out_dir


def _atomic_dir(out_dir: str, overwrite: bool):
    out_dir = check_output_dir(out_dir, overwrite)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    # no leading dot / extra dots: transformers derives the remote-code module name from it
    stem = "".join(c if c.isalnum() else "_" for c in os.path.basename(out_dir))
    return out_dir, tempfile.mkdtemp(prefix=f"{stem}_tmp_", dir=parent)


def _finish_atomic(tmp: str, out_dir: str) -> None:
    if os.path.exists(out_dir):
        old = out_dir + ".old" + str(os.getpid())
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)


def save_hf_folder(hf_model, out_dir: str, tokenizer=None, meta: Optional[dict] = None,
                   train_config: Optional[dict] = None, overwrite: bool = False,
                   check: Optional[Callable[[str], bool]] = None) -> Optional[str]:
    """Write the HF model folder atomically (a temporary sibling directory, renamed at the end):
    config.json, model.safetensors, generation_config.json, the remote-code files for ReMoE,
    tokenizer files, remoe_conversion.json (provenance) and the training config if given.
    `check(tmp_dir)` runs on the complete temporary folder before the rename; if it returns False
    the folder is deleted, nothing is written and None is returned."""
    out_dir, tmp = _atomic_dir(out_dir, overwrite)
    try:
        hf_model.save_pretrained(tmp, safe_serialization=True)
        if getattr(hf_model.config, "model_type", "") == "remoe":
            for name in REMOTE_CODE_FILES:
                shutil.copyfile(os.path.join(HERE, name), os.path.join(tmp, name))
        if tokenizer is not None:
            write_tokenizer_files(tokenizer, tmp, hf_model.config.max_position_embeddings)
        if meta is not None:
            with open(os.path.join(tmp, CONVERSION_META), "w", encoding="utf-8") as fh:
                json.dump(meta, fh, indent=2, sort_keys=True, default=str)
        if train_config is not None:
            with open(os.path.join(tmp, TRAIN_CONFIG_FILE), "w", encoding="utf-8") as fh:
                json.dump(train_config, fh, indent=2, sort_keys=True, default=str)
        if check is not None and not check(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
            return None
        _finish_atomic(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def load_hf_folder(hf_dir: str, dtype: torch.dtype = torch.float32):
    """(model, kind) from an exported folder (ReMoE folders through trust_remote_code)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if not os.path.isfile(os.path.join(hf_dir, "config.json")):
        raise ConversionError(f"{hf_dir} is not a Hugging Face model folder (no config.json)")
    try:
        config = AutoConfig.from_pretrained(hf_dir, trust_remote_code=True)
        kind = hf_kind(config)
        model = AutoModelForCausalLM.from_pretrained(hf_dir, trust_remote_code=True,
                                                     dtype=dtype)
    except ConversionError:
        raise
    except TypeError:  # transformers < 4.56 spells it torch_dtype
        model = AutoModelForCausalLM.from_pretrained(hf_dir, trust_remote_code=True,
                                                     torch_dtype=dtype)
    except Exception as e:  # noqa: BLE001
        raise ConversionError(f"cannot load {hf_dir}: {' '.join(str(e).split())[:300]}") from None
    model.eval()
    return model, kind


# ------------------------------------------------------------------------------------------------
# Checkpoint front ends
# ------------------------------------------------------------------------------------------------
def _run_tokenizer(cfg, tokenizer_override: Optional[str] = None):
    name = tokenizer_override or cfg.tokenizer
    if not name:
        return None
    from megatron.remoe.data.tokenizer import load_tokenizer

    try:
        return load_tokenizer(name)
    except Exception as e:  # noqa: BLE001
        raise ConversionError(f"tokenizer {name}: {' '.join(str(e).split())}") from None


def load_megatron_checkpoint(load: str, iteration: Optional[int] = None,
                             tokenizer: Optional[str] = None, log: Callable = _log,
                             overrides: Optional[dict] = None, dial=None):
    """Build the checkpoint's model in this single process (TP=PP=EP=1, fp32) and load its
    weights; dist_checkpointing re-shards any saved layout. Needs init_distributed() first.
    `overrides`: TrainConfig fields that do not change the weights' shapes (e.g. the TopK
    `moe_router_topk` or the token dispatcher, for inference); `dial`: a compute dial (see
    megatron.remoe.dial.set_dial) applied to the loaded model.
    Returns (model, tcfg, TrainConfig, info) where info has the iteration, lambda, tokenizer,
    padded vocabulary size."""
    from megatron.core import dist_checkpointing, tensor_parallel

    from megatron.remoe.arguments import transformer_config
    from megatron.remoe.checkpointing import (
        read_checkpoint_config,
        resolve_checkpoint,
        sharded_metadata,
        single_process_config,
    )
    from megatron.remoe.datasets import padded_vocab_size
    from megatron.remoe.model import build_gpt_model

    path = resolve_checkpoint(load, iteration, log=_log)
    cfg, common = read_checkpoint_config(path)
    if cfg.virtual_pipeline_model_parallel_size:
        raise ConversionError(f"{path}: virtual-pipeline checkpoints are not supported by the "
                              "converter; re-save without interleaving")
    tok = _run_tokenizer(cfg, tokenizer)
    base_vocab = tok.vocab_size if tok is not None else cfg.vocab_size
    if not base_vocab:
        raise ConversionError(f"{path}: unknown vocabulary size; pass --tokenizer")
    vocab = padded_vocab_size(base_vocab, cfg)  # padding of the TRAINING layout (depends on TP)
    single = single_process_config(cfg)
    if overrides:
        single = dataclasses.replace(single, **overrides)
    try:
        tcfg = transformer_config(single, use_cpu_initialization=True)
    except Exception as e:  # noqa: BLE001
        raise ConversionError(f"{path}: cannot rebuild the model config: {e}") from None
    t0 = time.perf_counter()
    model = build_gpt_model(tcfg, vocab_size=vocab, max_sequence_length=cfg.seq_length,
                            controller=None, use_transformer_engine=False,
                            rotary_base=cfg.rotary_base)
    for p in model.parameters():
        tensor_parallel.set_defaults_if_not_set_tensor_model_parallel_attributes(p)
    metadata = dist_checkpointing.load_content_metadata(path) or sharded_metadata()
    try:
        state = dist_checkpointing.load({"model": model.sharded_state_dict(metadata=metadata)},
                                        path, strict="assume_ok_unexpected")
        model.load_state_dict(state["model"], strict=True)
    except Exception as e:  # noqa: BLE001
        raise ConversionError(f"cannot load the model weights of {path}: "
                              f"{' '.join(str(e).split())[:300]}") from None
    model.eval()
    if dial is not None:
        from megatron.remoe.dial import set_dial

        set_dial(model, dial)
    controller = dict(common.get("controller") or {})
    for key, value in list(controller.items()):
        if isinstance(value, torch.Tensor):
            controller[key] = float(value)
    lam = controller.get("l1_coeff")
    layout = common.get("layout") or {}
    info = {"checkpoint": os.path.abspath(path), "iteration": common.get("iteration"),
            "consumed_train_samples": common.get("consumed_train_samples"),
            "saved_layout": layout, "router": cfg.router, "l1_reg_coeff": lam,
            "controller": controller or None,
            "vocab_size": vocab, "tokenizer": tok, "tokenizer_name": tokenizer or cfg.tokenizer}
    log(f"convert: loaded {path} ({cfg.router}, {cfg.num_layers} layers, iteration "
        f"{common.get('iteration')}, saved layout TP{layout.get('tp', '?')} "
        f"PP{layout.get('pp', '?')} EP{layout.get('ep', '?')}) in "
        f"{time.perf_counter() - t0:.1f} s")
    return model, tcfg, cfg, info


def megatron_checkpoint_to_hf(load: str, out_dir: str, iteration: Optional[int] = None,
                              dtype: str = "fp32", verify: bool = False,
                              tokenizer: Optional[str] = None, overwrite: bool = False,
                              tolerance: float = 1e-4, log: Callable = _log, dial=None) -> dict:
    """Checkpoint -> HF folder (optionally with the parity check, run before anything is written:
    a failing check writes nothing). `dial`: a compute dial (dial.json's content) written into
    config.json as `router_dial`; --verify then compares the two dialled models.
    Returns a summary dict (with the ParityReport if verified)."""
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}.get(dtype)
    if torch_dtype is None:
        raise ConversionError(f"--dtype {dtype} is not one of fp32, bf16")
    check_output_dir(out_dir, overwrite)
    model, tcfg, cfg, info = load_megatron_checkpoint(load, iteration, tokenizer, log, dial=dial)
    tok = info["tokenizer"]
    eos = tok.eod if tok is not None else None
    hf, kind = megatron_to_hf(model, tcfg, info["vocab_size"], cfg.seq_length, cfg.rotary_base,
                              eos_token_id=eos)
    log(f"convert: exporting as {type(hf).__name__} ({kind})")
    summary = {"kind": kind, "class": type(hf).__name__, "out": os.path.abspath(out_dir),
               **{k: v for k, v in info.items() if k != "tokenizer"}}
    prompt = None
    if tok is not None:
        ids = tok.encode("The meaning of life is")[:8]
        prompt = torch.tensor([ids]) if len(ids) >= 2 else None
    hf_fp32 = hf
    if torch_dtype != torch.float32:
        hf = _cast(hf, torch_dtype)

    def check(tmp_dir: str) -> bool:
        """Parity of the folder as written: reloaded through from_pretrained (trust_remote_code
        for ReMoE). fp32 exports are compared with megatron directly; bf16 exports must reload
        bit-identical to the cast weights, and the fp32 conversion is compared with megatron."""
        reloaded, _ = load_hf_folder(tmp_dir, torch_dtype)
        if torch_dtype == torch.float32:
            rep = verify_parity(model, reloaded, prompt=prompt, tolerance=tolerance)
        else:
            rep = verify_parity(model, hf_fp32, prompt=prompt, tolerance=tolerance)
            a, b = hf.state_dict(), reloaded.state_dict()
            same = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
            if not same:
                rep.ok = False
                rep.failures.append("the written bf16 folder does not reload to the same weights")
        log(rep.summary())
        summary["verify"] = rep.as_dict()
        return rep.ok

    meta = {"source": "megatron-remoe", "export_kind": kind, "dtype": dtype,
            **{k: v for k, v in info.items() if k != "tokenizer"}}
    written = save_hf_folder(hf, out_dir, tok, meta=meta, train_config=cfg.to_dict(),
                             overwrite=overwrite, check=check if verify else None)
    if written:
        log(f"convert: wrote {os.path.abspath(out_dir)}")
    return summary


def _cast(hf, dtype):
    import copy

    hf = copy.deepcopy(hf).to(dtype)
    for mod in hf.modules():
        if getattr(mod, "expert_bias", None) is not None:
            mod.expert_bias.data = mod.expert_bias.data.float()
    return hf


def _refuse_dial(hf_dir: str, dial) -> None:
    if dial is not None:
        raise ConversionError(
            f"{hf_dir}/config.json sets router_dial (an inference-time compute dial); training "
            "a dialled model is not supported: remove router_dial from config.json first")


def train_config_from_hf(hf_dir: str, hf_config, config_yaml: Optional[str] = None):
    """The TrainConfig recorded in a checkpoint made from an HF folder.

    `config_yaml` (the planned continued-training config) wins; else the training config the
    exporter stored in the folder; else one derived from the HF config (seq_length =
    max_position_embeddings, tokenizer = the folder itself when it has tokenizer.json). The model
    fields must describe `hf_config` exactly."""
    from megatron.remoe.arguments import FIELDS, TrainConfig, _coerce, load_yaml_config

    fields = transformer_config_fields_from_hf(hf_config)
    router = fields["router"]
    _refuse_dial(hf_dir, fields.get("moe_relu_dial"))
    if router == "topk" and fields.get("moe_router_pre_softmax") is False:
        raise ConversionError(
            "this model routes post-softmax (Mixtral semantics); the trainer's topk preset is "
            "pre-softmax, so continued training would change the routing. Use "
            "megatron.remoe.hf.convert.hf_to_megatron() with your own TransformerConfig instead")
    values: dict = {}
    stored = os.path.join(hf_dir, TRAIN_CONFIG_FILE)
    if config_yaml:
        values = load_yaml_config(config_yaml)
    elif os.path.isfile(stored):
        with open(stored, encoding="utf-8") as fh:
            values = {k: v for k, v in json.load(fh).items() if k in FIELDS}
    G = getattr(hf_config, "moe_granularity", 1) or 1
    model_values = dict(
        num_layers=fields["num_layers"], hidden_size=fields["hidden_size"],
        num_attention_heads=fields["num_attention_heads"],
        num_query_groups=fields["num_query_groups"], kv_channels=fields["kv_channels"],
        ffn_hidden_size=fields["ffn_hidden_size"], rotary_base=int(_rope_theta(hf_config))
        if float(_rope_theta(hf_config)).is_integer() else _rope_theta(hf_config),
        router=router, moe_granularity=G)
    if router != "dense":
        E, k = fields["num_experts"], fields["moe_router_topk"]
        if E % G or k % G:
            raise ConversionError(f"experts {E} / top-k {k} not divisible by granularity {G}")
        if fields.get("moe_ffn_hidden_size", fields["ffn_hidden_size"]) * G != \
                fields["ffn_hidden_size"]:
            raise ConversionError(
                f"expert width {fields.get('moe_ffn_hidden_size')} x granularity {G} != dense "
                f"width {fields['ffn_hidden_size']}: the trainer cannot express this model")
        model_values.update(num_experts=E // G, moe_router_topk=k // G,
                            moe_layer_freq=fields.get("moe_layer_freq", 1))
        if "moe_relu_target_sparsity" in fields:
            model_values["moe_relu_target_sparsity"] = fields["moe_relu_target_sparsity"]
    for key, value in model_values.items():
        if config_yaml and key in values and _coerce(key, values[key]) != value and \
                key not in ("rotary_base",):
            raise ConversionError(f"--config {config_yaml}: {key}={values[key]!r} but the HF model "
                                  f"has {key}={value!r}; fix the config")
    values.update(model_values)
    values.setdefault("seq_length", hf_config.max_position_embeddings)
    values.setdefault("train_iters", 1)
    if not values.get("tokenizer") and os.path.isfile(os.path.join(hf_dir, "tokenizer.json")):
        values["tokenizer"] = os.path.abspath(hf_dir)
    values = {k: _coerce(k, v) for k, v in values.items() if k in FIELDS}
    # parallel layout of the saved checkpoint: one process (re-sharded on load)
    values.update(tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
                  virtual_pipeline_model_parallel_size=None, expert_model_parallel_size=1,
                  expert_tensor_parallel_size=None, context_parallel_size=1,
                  sequence_parallel=False, bf16=False, transformer_impl="local",
                  moe_grouped_gemm=False, data_path=[], valid_data_path=[], mock_data=True,
                  vocab_size=hf_config.vocab_size, make_vocab_size_divisible_by=1,
                  load=None, save=None, metrics_file=None, use_distributed_optimizer=False)
    return TrainConfig(**values)


def save_megatron_checkpoint_from_hf(hf_dir: str, save_dir: str, config_yaml: Optional[str] = None,
                                     overwrite: bool = False, log: Callable = _log) -> str:
    """HF folder -> trainer checkpoint `save_dir/iter_0000000` (+ tracker) for continued training.

    The checkpoint holds the weights, the LR-schedule state of the recorded training config at
    step 0 and, for ReLU routing, the sparsity controller of the exported run (lambda, steps,
    target reached; from remoe_conversion.json, else lambda_0), but no optimizer state (an HF
    folder has none): resume it with `remoe train --load SAVE_DIR --no-load-optim ...`.
    Needs init_distributed(ParallelConfig()) first (one process)."""
    from megatron.remoe.arguments import config_to_yaml, finalize_config, transformer_config
    from megatron.remoe.checkpointing import save_checkpoint
    from megatron.remoe.model import build_controller
    from megatron.remoe.training import build_model, build_optimizer

    save_dir = check_output_dir(save_dir, overwrite)
    try:  # refuse a dialled folder before loading its weights
        with open(os.path.join(hf_dir, "config.json"), encoding="utf-8") as fh:
            saved = json.load(fh)
    except (OSError, ValueError):
        saved = {}  # load_hf_folder reports an unreadable folder
    _refuse_dial(hf_dir, saved.get("router_dial") if isinstance(saved, dict) else None)
    hf, kind = load_hf_folder(hf_dir, torch.float32)
    cfg = train_config_from_hf(hf_dir, hf.config, config_yaml)
    cfg.save = save_dir
    try:
        cfg = finalize_config(cfg, world_size=1, cuda=False)
    except Exception as e:  # noqa: BLE001
        raise ConversionError(f"invalid training config for this model: {e}") from None
    tcfg = transformer_config(cfg, use_cpu_initialization=True)
    controller = build_controller(tcfg)
    meta_path = os.path.join(hf_dir, CONVERSION_META)
    if controller is not None and os.path.isfile(meta_path):
        # continue where the exported run stopped: lambda, its step count, target reached
        with open(meta_path, encoding="utf-8") as fh:
            saved = json.load(fh).get("controller") or {}
        if saved.get("l1_coeff"):
            controller.load_state_dict({**saved,
                                        "l1_coeff": torch.tensor(float(saved["l1_coeff"]))})
    model = build_model(cfg, tcfg, hf.config.vocab_size, controller, torch.device("cpu"))
    inner = _bare_megatron(model)
    hsd = {k: v.detach().float() for k, v in hf.state_dict().items()}
    _load_into(inner, hf_to_megatron_state_dict(hsd, tcfg, kind), "megatron model")
    # the trainer's save needs an optimizer; an HF folder has no Adam state to put in it, so
    # the checkpoint is resumed with --no-load-optim (Adam restarts from zero moments)
    optimizer, scheduler = build_optimizer(cfg, model)
    # The final iter_* rename + tracker write of save_checkpoint is atomic; build next to the
    # target and move it in, so a failure leaves nothing at save_dir.
    parent = os.path.dirname(save_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(save_dir)}.tmp", dir=parent)
    try:
        save_checkpoint(tmp, 0, model, optimizer, scheduler, controller, 0, cfg,
                        config_to_yaml(cfg))
        if os.path.exists(save_dir):
            shutil.rmtree(save_dir)
        os.replace(tmp, save_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"convert: wrote megatron checkpoint {save_dir}/iter_0000000 ({kind} -> router "
        f"{cfg.router}); resume with `remoe train --load {save_dir} --no-load-optim ...`")
    return save_dir
