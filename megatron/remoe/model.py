"""LLaMA-style GPT (the paper's architecture) built from megatron-core parts with our block spec."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from megatron.remoe.config import (
    ReMoETransformerConfig,
    apply_granularity,
    controller_options,
    router_overrides,
)
from megatron.remoe.regularizer import SparsityController
from megatron.remoe.spec import check_routers, get_block_spec, num_moe_layers

# The paper's models: SwiGLU (ffn = 4h), RoPE base 1e6, RMSNorm, untied embeddings, no biases,
# no dropout, GQA with 4 groups, init std 0.01.
LLAMA_DEFAULTS = dict(
    normalization="RMSNorm",
    gated_linear_unit=True,
    activation_func=F.silu,
    add_bias_linear=False,
    hidden_dropout=0.0,
    attention_dropout=0.0,
    init_method_std=0.01,
    bias_activation_fusion=False,
    masked_softmax_fusion=False,
    persist_layer_norm=False,
    bias_dropout_fusion=False,
    apply_rope_fusion=False,
    gradient_accumulation_fusion=False,
)


def build_transformer_config(router: str = "relu", num_experts: Optional[int] = 8,
                             moe_router_topk: int = 1, moe_granularity: int = 1,
                             moe_aux_loss_coeff: float = 1e-2, **fields
                             ) -> ReMoETransformerConfig:
    """A TransformerConfig for `router` in {relu, topk, topk-sigmoid-bias, dense}.

    Granularity G turns E experts of width ffn into E*G experts of width ffn/G with top-(k*G).
    `fields` are any TransformerConfig / ReMoETransformerConfig fields and override the defaults.
    """
    kwargs = dict(LLAMA_DEFAULTS)
    kwargs.update(router_overrides(router, moe_aux_loss_coeff))
    if router != "dense":
        ffn = fields.get("moe_ffn_hidden_size") or fields["ffn_hidden_size"]
        experts, topk, width = apply_granularity(num_experts, moe_router_topk, ffn, moe_granularity)
        kwargs.update(num_moe_experts=experts, moe_router_topk=topk, moe_ffn_hidden_size=width,
                      moe_granularity=moe_granularity)
        if router == "relu":
            kwargs["moe_relu_target_sparsity"] = fields.pop("moe_relu_target_sparsity", None)
    kwargs.update(fields)
    if kwargs.get("num_query_groups") is None:
        kwargs["num_query_groups"] = kwargs["num_attention_heads"]
    return ReMoETransformerConfig(**kwargs)


def build_controller(config: ReMoETransformerConfig,
                     device: torch.device | None = None) -> Optional[SparsityController]:
    """The shared lambda controller for a ReLU-routed model (None for other routers)."""
    if not getattr(config, "moe_relu_routing", False):
        return None
    return SparsityController(
        num_layers=config.num_layers, num_experts=config.num_moe_experts,
        target_sparsity=config.target_sparsity,
        l1_coeff_init=config.moe_relu_l1_reg_coeff_init,
        multiplier=config.moe_relu_l1_reg_coeff_multiplier, device=device,
        options=controller_options(config))


def build_gpt_model(config: ReMoETransformerConfig, vocab_size: int, max_sequence_length: int,
                    controller: Optional[SparsityController] = None,
                    pre_process: Optional[bool] = None, post_process: Optional[bool] = None,
                    use_transformer_engine: Optional[bool] = None, vp_stage: Optional[int] = None,
                    rotary_base: int = 1_000_000):
    """megatron-core GPTModel for this pipeline stage with the configured MLPs/routers."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=vp_stage is None,
                                                             vp_stage=vp_stage)
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=vp_stage is None,
                                                             vp_stage=vp_stage)
    spec = get_block_spec(config, controller, use_transformer_engine=use_transformer_engine,
                          vp_stage=vp_stage)
    model = GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=vocab_size,
        max_sequence_length=max_sequence_length,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=False,
        position_embedding_type="rope",
        rotary_base=rotary_base,
        vp_stage=vp_stage,
    )
    # every builder (trainer, HF conversion, analysis) comes through here: no model whose routers
    # differ from the config leaves this function
    check_routers(model, config)
    return model


def count_parameters(config: ReMoETransformerConfig, vocab_size: int) -> dict:
    """Total and active (per token, at the target k) parameter counts, computed from the config."""
    h, L = config.hidden_size, config.num_layers
    heads, groups = config.num_attention_heads, config.num_query_groups or config.num_attention_heads
    head_dim = config.kv_channels or h // heads
    attn = h * head_dim * (heads + 2 * groups) + heads * head_dim * h
    glu = 3 if config.gated_linear_unit else 2
    dense_mlp = glu * h * config.ffn_hidden_size
    n_moe = num_moe_layers(config)
    expert = glu * h * (config.moe_ffn_hidden_size or config.ffn_hidden_size)
    E = config.num_moe_experts or 0
    k = config.moe_router_topk if E else 0
    norms = 2 * h * L + h
    embed = 2 * vocab_size * h
    mlp_total = n_moe * (E * expert + E * h) + (L - n_moe) * dense_mlp
    mlp_active = n_moe * (k * expert + E * h) + (L - n_moe) * dense_mlp
    total = embed + L * attn + norms + mlp_total
    active = embed + L * attn + norms + mlp_active
    return {"total": total, "active": active, "active_non_embedding": active - embed}
