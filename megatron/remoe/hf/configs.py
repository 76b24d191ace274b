"""Which HF architecture a megatron model becomes, and the configs in both directions.

* ``--router relu`` -> ``ReMoEForCausalLM`` (our trust_remote_code class, ``router_type: relu``).
* ``--router dense`` -> ``LlamaForCausalLM`` (identical architecture).
* TopK -> ``MixtralForCausalLM`` only when the routing semantics are Mixtral's: softmax scores,
  **post**-softmax top-k (top-k logits, softmax over those k, which equals Mixtral's softmax ->
  top-k -> renormalise), no expert bias, no scaling factor, no group-limited routing and every
  layer an MoE layer. The trainer's `topk` preset is **pre**-softmax without renormalisation (with
  k=1 the gate is the softmax probability, Mixtral's is 1.0) and `topk-sigmoid-bias` uses sigmoid
  scores plus a routing bias, so both export to ``ReMoEForCausalLM`` with ``router_type: topk`` and
  megatron-core's exact routing semantics.

transformers is an optional dependency (the `eval` extra): the config classes (ours subclasses
transformers' PretrainedConfig) are imported where they are built, so that this module imports
without it.
"""

from __future__ import annotations

from typing import Optional

import torch.nn.functional as F

from megatron.remoe.config import is_relu_routed
from megatron.remoe.hf.errors import ConversionError
from megatron.remoe.hf.key_map import conversion_moe_layer_pattern, dims
from megatron.remoe.model import build_transformer_config


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
    if is_relu_routed(tcfg):
        return "remoe"
    mixtral_like = (
        tcfg.moe_router_score_function == "softmax" and not tcfg.moe_router_pre_softmax
        and not tcfg.moe_router_enable_expert_bias and not tcfg.moe_router_topk_scaling_factor
        and all(conversion_moe_layer_pattern(tcfg)))
    return "mixtral" if mixtral_like else "remoe"



def hf_config_from_megatron(tcfg, vocab_size: int, max_position_embeddings: int,
                            rotary_base: float = 1_000_000, kind: Optional[str] = None,
                            eos_token_id: Optional[int] = None, dtype: str = "float32",
                            target_sparsity: Optional[float] = None):
    """The HF config describing the same network as megatron config `tcfg`."""
    kind = kind or export_kind(tcfg)
    d = dims(tcfg)
    common = dict(
        vocab_size=vocab_size, hidden_size=tcfg.hidden_size, num_hidden_layers=tcfg.num_layers,
        num_attention_heads=d["heads"], num_key_value_heads=d["groups"], head_dim=d["head_dim"],
        hidden_act="silu", max_position_embeddings=max_position_embeddings,
        rms_norm_eps=tcfg.layernorm_epsilon, rope_theta=float(rotary_base),
        initializer_range=tcfg.init_method_std, tie_word_embeddings=False,
        bos_token_id=eos_token_id, eos_token_id=eos_token_id)
    if kind == "llama":
        from transformers import LlamaConfig  # noqa: PLC0415 -- optional extra (eval)

        cfg = LlamaConfig(intermediate_size=tcfg.ffn_hidden_size, attention_bias=False,
                          mlp_bias=False, **common)
    elif kind == "mixtral":
        from transformers import MixtralConfig  # noqa: PLC0415 -- optional extra (eval)

        cfg = MixtralConfig(intermediate_size=tcfg.moe_ffn_hidden_size,
                            num_local_experts=tcfg.num_moe_experts,
                            num_experts_per_tok=tcfg.moe_router_topk, router_jitter_noise=0.0,
                            router_aux_loss_coef=tcfg.moe_aux_loss_coeff or 0.0,
                            sliding_window=None, **common)
    elif kind == "remoe":
        from megatron.remoe.hf.configuration_remoe import ReMoEConfig  # noqa: PLC0415 -- needs transformers, an optional extra (eval)

        relu = is_relu_routed(tcfg)
        if target_sparsity is None and relu:
            target_sparsity = tcfg.target_sparsity
        cfg = ReMoEConfig(
            intermediate_size=tcfg.ffn_hidden_size, moe_intermediate_size=tcfg.moe_ffn_hidden_size,
            num_experts=tcfg.num_moe_experts, moe_layers=conversion_moe_layer_pattern(tcfg),
            router_type="relu" if relu else "topk", num_experts_per_tok=tcfg.moe_router_topk,
            router_score_function=getattr(tcfg, "moe_router_score_function", "softmax"),
            router_pre_softmax=bool(tcfg.moe_router_pre_softmax),
            router_topk_scaling_factor=tcfg.moe_router_topk_scaling_factor,
            router_expert_bias=bool(tcfg.moe_router_enable_expert_bias),
            moe_granularity=getattr(tcfg, "moe_granularity", 1),
            target_sparsity=target_sparsity, router_dial=dial_dict(tcfg), **common)
        cfg.auto_map = {"AutoConfig": "configuration_remoe.ReMoEConfig",
                        "AutoModelForCausalLM": "modeling_remoe.ReMoEForCausalLM"}
        cfg.architectures = ["ReMoEForCausalLM"]
    else:
        raise ConversionError(f"unknown export kind {kind!r}")
    cfg.torch_dtype = dtype
    return cfg


def dial_dict(tcfg) -> Optional[dict]:
    """The compute dial of a megatron config in HF `router_dial` form (None: undialled)."""
    dial = getattr(tcfg, "moe_relu_dial", None)
    return dial.to_dict() if dial is not None else None


def hf_kind(hf_config) -> str:
    mt = getattr(hf_config, "model_type", None)
    if mt in ("remoe", "llama", "mixtral"):
        return mt
    raise ConversionError(f"HF model_type {mt!r} is not supported (remoe, llama, mixtral)")


def rope_theta(hf_config) -> float:
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
    fields = transformer_config_fields_from_hf(hf_config)
    fields.update(use_cpu_initialization=True)
    fields.update(overrides)
    return build_transformer_config(**fields)

