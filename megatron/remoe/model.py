"""LLaMA-style GPT (the paper's architecture) built from megatron-core parts with our block spec."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel

from megatron.remoe.config import (
    ReMoETransformerConfig,
    apply_granularity,
    controller_options,
    default_ffn_hidden_size,
    is_relu_routed,
    moe_layer_pattern_of,
    num_moe_layers,
    router_overrides,
)
from megatron.remoe.controller import SparsityController
from megatron.remoe.spec import check_routers, get_block_spec

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
    if not is_relu_routed(config):
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


# ------------------------------------------------------------------------------------------------
# Parameter and FLOP counts: one owner for the trainer's summary, the ablation collector, the
# compute dial and the benchmarks (definitions in docs/results.md)
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelShape:
    """The sizes that parameter and FLOP counts read. Experts are counted after granularity (E*G
    experts of width ffn/G, k*G active); a dense model has no experts and no MoE layers."""

    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_query_groups: int
    head_dim: int
    ffn_hidden_size: int  # a dense MLP's width
    expert_ffn_hidden_size: int
    num_experts: int  # 0: dense
    topk: int  # experts per token at the target (0: dense)
    moe_layers: int
    glu: int = 3  # SwiGLU: gate, up and down projections

    @classmethod
    def of_transformer_config(cls, config) -> "ModelShape":
        """From a (ReMoE)TransformerConfig: granularity already applied."""
        heads = config.num_attention_heads
        experts = config.num_moe_experts or 0
        return cls(hidden_size=config.hidden_size, num_layers=config.num_layers,
                   num_attention_heads=heads, num_query_groups=config.num_query_groups or heads,
                   head_dim=config.kv_channels or config.hidden_size // heads,
                   ffn_hidden_size=config.ffn_hidden_size,
                   expert_ffn_hidden_size=config.moe_ffn_hidden_size or config.ffn_hidden_size,
                   num_experts=experts, topk=config.moe_router_topk if experts else 0,
                   moe_layers=num_moe_layers(config), glu=3 if config.gated_linear_unit else 2)

    @classmethod
    def of_train_fields(cls, cfg: dict) -> "ModelShape":
        """From a run's TrainConfig fields, all of them (`TrainConfig.to_dict()`, the ablation
        tool's resolved config.yaml: TrainConfig owns the defaults); E experts of width ffn before
        granularity G; `router` dense: no experts. Unset sizes (None) are derived as the trainer
        derives them."""
        h, heads = cfg["hidden_size"], cfg["num_attention_heads"]
        ffn = cfg["ffn_hidden_size"] or default_ffn_hidden_size(h)
        experts = topk = expert_ffn = moe_layers = 0
        if cfg["router"] != "dense":
            G = cfg["moe_granularity"]
            experts = cfg["num_experts"] * G
            topk = cfg["moe_router_topk"] * G
            expert_ffn = ffn // G
            moe_layers = sum(moe_layer_pattern_of(cfg["num_layers"], experts,
                                                  cfg["moe_layer_freq"]))
        return cls(hidden_size=h, num_layers=cfg["num_layers"], num_attention_heads=heads,
                   num_query_groups=cfg["num_query_groups"] or heads,
                   head_dim=cfg["kv_channels"] or h // heads, ffn_hidden_size=ffn,
                   expert_ffn_hidden_size=expert_ffn, num_experts=experts, topk=topk,
                   moe_layers=moe_layers)

    @property
    def attention(self) -> int:
        """Q, K, V and output projections of one layer (GQA: K and V per query group)."""
        h, hd, heads = self.hidden_size, self.head_dim, self.num_attention_heads
        return h * hd * (heads + 2 * self.num_query_groups) + heads * hd * h

    @property
    def expert(self) -> int:
        return self.glu * self.hidden_size * self.expert_ffn_hidden_size

    def mlp(self, experts_per_token):
        """MLP parameters a token uses in all layers with `experts_per_token` experts per MoE layer
        (every MoE layer's router, E x h, included)."""
        dense_mlp = self.glu * self.hidden_size * self.ffn_hidden_size
        return self.moe_layers * (experts_per_token * self.expert + self.num_experts * self.hidden_size) \
            + (self.num_layers - self.moe_layers) * dense_mlp


def count_parameters(config: ReMoETransformerConfig, vocab_size: int) -> dict:
    """Total and active (per token, at the target k) parameter counts, computed from the config."""
    shape = ModelShape.of_transformer_config(config)
    h, L = shape.hidden_size, shape.num_layers
    norms = 2 * h * L + h
    embed = 2 * vocab_size * h
    total = embed + L * shape.attention + norms + shape.mlp(shape.num_experts)
    active = embed + L * shape.attention + norms + shape.mlp(shape.topk)
    return {"total": total, "active": active, "active_non_embedding": active - embed}


def train_flops_per_token(shape: ModelShape, seq_length: int, vocab_size: int,
                          experts_per_token: Optional[float] = None) -> dict:
    """Training FLOPs per token (forward + backward = 3 x forward) of a LLaMA-style GPT.

    forward = 2 x (matmul parameters a token uses: attention projections, the experts it is
    routed to, the router, dense MLPs, the output layer) + causal attention 2 x seq x heads x
    head_dim per layer (QK^T and AV, half of the full 4 s d). Norms, softmax, activations and
    the input embedding lookup are not counted. `experts_per_token` (after granularity) defaults
    to k*G; pass the measured E*G*(1 - sparsity) for a ReLU step.
    Returns train FLOPs, the MoE experts' share of them at k*G experts, and the expert FLOPs of
    one expert in all MoE layers (train)."""
    h, L, n_moe, k = shape.hidden_size, shape.num_layers, shape.moe_layers, shape.topk
    core = L * 2 * seq_length * shape.num_attention_heads * shape.head_dim
    active = k if experts_per_token is None else experts_per_token
    forward = 2 * (L * shape.attention + shape.mlp(active) + vocab_size * h) + core
    at_k = 2 * (L * shape.attention + shape.mlp(k) + vocab_size * h) + core
    return {"train": 3 * forward,
            "moe_share": (3 * 2 * n_moe * k * shape.expert / (3 * at_k)) if n_moe else 0.0,
            "expert_train": 3 * 2 * n_moe * shape.expert}


def flops_per_token(cfg: dict, vocab_size: int, experts_per_token: Optional[float] = None) -> dict:
    """`train_flops_per_token` of a run given by its TrainConfig fields (`ModelShape.of_train_fields`)."""
    return train_flops_per_token(ModelShape.of_train_fields(cfg), cfg["seq_length"], vocab_size,
                                 experts_per_token)
