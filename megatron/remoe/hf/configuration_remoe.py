"""Hugging Face configuration of ReMoE models (ReLU-routed Mixture-of-Experts, arXiv 2412.14711).

This file is copied into every exported model folder (``trust_remote_code``); it depends only on
``transformers``. The architecture is LLaMA-style: RMSNorm, RoPE (non-interleaved, rotate-half),
grouped-query attention, SwiGLU MLPs, untied embeddings, no biases. Layers whose entry of
``moe_layers`` is 1 use a routed Mixture-of-Experts MLP; the others a dense SwiGLU MLP.

Routers (``router_type``):

* ``"relu"`` (ReMoE): ``gates = ReLU(x W^T)`` computed in fp32; a token goes to every expert with a
  positive gate (0..E experts) and ``y = sum_e gates_e * FFN_e(x)``. No softmax, no top-k, no
  renormalisation; 0 active experts give an MoE output of exactly 0.
* ``"topk"``: megatron-core's TopK router. ``router_score_function`` "softmax" with
  ``router_pre_softmax`` (softmax over all experts, then top-k, no renormalisation) or post-softmax
  (top-k logits, then softmax over those k); "sigmoid" scores with an optional per-expert routing
  bias (``router_expert_bias``, selection only) and renormalisation when k > 1;
  ``router_topk_scaling_factor`` multiplies the weights.

Inference-time compute dial (ReLU routers only), ``router_dial``: None (the trained model) or
``{"thresholds": [tau per MoE layer], "form": "cut" | "shift", "max_experts": m | None}``. Per
MoE layer l, "cut" keeps ``gates * [gates > tau_l]``, "shift" uses ``ReLU(x W^T - tau_l)``;
``max_experts`` keeps each token's m largest gates. All thresholds 0 and no cap is the trained model
exactly. A dialled model refuses to run in training mode. Written by ``remoe dial`` / the converter's
``--dial`` (see docs/compute-dial.md).
"""

from __future__ import annotations

import math

try:  # transformers >= 4.56 spells it PreTrainedConfig; PretrainedConfig stays as an alias
    from transformers import PretrainedConfig
except ImportError:  # pragma: no cover
    from transformers import PreTrainedConfig as PretrainedConfig

ROUTER_TYPES = ("relu", "topk")
SCORE_FUNCTIONS = ("softmax", "sigmoid")


class ReMoEConfig(PretrainedConfig):
    model_type = "remoe"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    def __init__(
        self,
        vocab_size: int = 50304,
        hidden_size: int = 768,
        intermediate_size: int = 3072,
        moe_intermediate_size: int | None = None,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 12,
        num_key_value_heads: int | None = None,
        head_dim: int | None = None,
        hidden_act: str = "silu",
        max_position_embeddings: int = 1024,
        rms_norm_eps: float = 1e-5,
        rope_theta: float = 1_000_000.0,
        num_experts: int = 8,
        moe_layers: list | None = None,
        router_type: str = "relu",
        num_experts_per_tok: int = 1,
        router_score_function: str = "softmax",
        router_pre_softmax: bool = True,
        router_topk_scaling_factor: float | None = None,
        router_expert_bias: bool = False,
        moe_granularity: int = 1,
        target_sparsity: float | None = None,
        router_dial: dict | None = None,
        output_router_logits: bool = False,
        initializer_range: float = 0.01,
        use_cache: bool = True,
        tie_word_embeddings: bool = False,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.moe_intermediate_size = moe_intermediate_size or intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = float(rope_theta)
        self.num_experts = int(num_experts or 0)
        if moe_layers is None:
            moe_layers = [1 if self.num_experts else 0] * num_hidden_layers
        self.moe_layers = [int(bool(x)) for x in moe_layers]
        self.router_type = router_type
        self.num_experts_per_tok = num_experts_per_tok
        self.router_score_function = router_score_function
        self.router_pre_softmax = bool(router_pre_softmax)
        self.router_topk_scaling_factor = router_topk_scaling_factor
        self.router_expert_bias = bool(router_expert_bias)
        self.moe_granularity = moe_granularity
        self.target_sparsity = target_sparsity
        self.router_dial = dict(router_dial) if router_dial is not None else None
        self.output_router_logits = output_router_logits
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        self._validate()
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    def _validate(self) -> None:
        if self.router_type not in ROUTER_TYPES:
            raise ValueError(f"router_type={self.router_type!r} must be one of {ROUTER_TYPES}")
        if self.router_score_function not in SCORE_FUNCTIONS:
            raise ValueError(f"router_score_function={self.router_score_function!r} must be one "
                             f"of {SCORE_FUNCTIONS}")
        if len(self.moe_layers) != self.num_hidden_layers:
            raise ValueError(f"moe_layers has {len(self.moe_layers)} entries for "
                             f"{self.num_hidden_layers} layers")
        if any(self.moe_layers) and self.num_experts < 1:
            raise ValueError("moe_layers marks MoE layers but num_experts is 0")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} is not a multiple "
                             f"of num_key_value_heads={self.num_key_value_heads}")
        if self.router_dial is not None:
            self._validate_dial()
        if self.router_type == "topk" and any(self.moe_layers) and \
                not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ValueError(f"num_experts_per_tok={self.num_experts_per_tok} must be in "
                             f"[1, num_experts={self.num_experts}]")

    def _validate_dial(self) -> None:
        dial, n = self.router_dial, sum(self.moe_layers)
        if self.router_type != "relu":
            raise ValueError("router_dial applies to router_type 'relu' only")
        unknown = set(dial) - {"thresholds", "form", "max_experts"}
        if unknown:
            raise ValueError(f"router_dial has unknown keys {sorted(unknown)}")
        taus = dial.get("thresholds")
        if not isinstance(taus, list) or len(taus) != n:
            raise ValueError(f"router_dial thresholds must be a list of {n} numbers (one per MoE "
                             f"layer), got {taus!r}")
        for i, t in enumerate(taus):
            if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) \
                    or t < 0:
                raise ValueError(f"router_dial threshold {i} = {t!r} must be a finite number >= 0")
        if dial.get("form", "cut") not in ("cut", "shift"):
            raise ValueError(f"router_dial form {dial.get('form')!r} is not 'cut' or 'shift'")
        m = dial.get("max_experts")
        if m is not None and (isinstance(m, bool) or not isinstance(m, int)
                              or not 1 <= m <= self.num_experts):
            raise ValueError(f"router_dial max_experts={m!r} must be in [1, {self.num_experts}]")
