"""Layer specs: megatron-core's GPT block spec with our router (and a CPU-capable RMSNorm) plugged in.

The block layout (dense/MoE pattern from `moe_layer_freq`, pipeline-stage slicing) is megatron-core's
`get_gpt_decoder_block_spec`; we only swap modules inside it.
"""

from __future__ import annotations

import copy
import functools
from typing import Optional

import torch
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

from megatron.remoe.compat import (
    call_with_supported_kwargs,
    mcore_version_string,
    moe_submodules,
    transformer_engine_usable,
)
from megatron.remoe.config import is_relu_routed
from megatron.remoe.controller import SparsityController
from megatron.remoe.cpu.experts import cpu_experts_spec
from megatron.remoe.errors import ConfigError
from megatron.remoe.router import ReLURouter


def have_transformer_engine() -> bool:
    """True when Transformer Engine (and megatron-core's TE extension) import.

    TE wheels fail on machines without CUDA libraries with OSError/RuntimeError rather than
    ImportError, so any exception means "not usable".
    """
    return transformer_engine_usable()


def default_use_transformer_engine() -> bool:
    """TE layers by default only where they can run: TE imports and a GPU is present. A CPU-only
    machine with TE installed keeps megatron-core's local modules (TE kernels need CUDA)."""
    return have_transformer_engine() and torch.cuda.is_available()


class RMSNorm(torch.nn.RMSNorm):
    """torch RMSNorm with megatron-core's norm constructor, usable with sequence parallelism.

    megatron-core's torch fallback norm refuses sequence parallel. With SP each TP rank normalises
    different tokens, so the weight's gradient must be summed over TP ranks: the `sequence_parallel`
    attribute tells megatron-core's finalize_model_grads to do exactly that.
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **kwargs):
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)

    def forward(self, x):
        # Normalise in fp32 (as fused kernels do) and cast back.
        return super().forward(x.float()).to(x.dtype) if x.dtype != torch.float32 else \
            super().forward(x)


# megatron-core's local layer spec stores EVERY layer's pre-MLP norm under the key of TE's fused
# norm+fc1 (dense layers), MoE layers included; its TE spec keeps MoE layers' standalone norm under
# `pre_mlp_layernorm.*` plus a TE `_extra_state`. We give TE MoE layers the local keys, so one
# checkpoint layout loads under either transformer_impl (and the checkpoints written so far, all
# local, keep loading unchanged).
MOE_NORM_KEY_MAP = {"pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"}
_EXTRA_STATE = "_extra_state"


class NormWithoutExtraState:
    """Builds the norm `norm` (set by `norm_without_extra_state`) and keeps its `_extra_state` out
    of checkpoints: a TE norm's extra state holds quantizer metadata, and a norm has no quantizers
    (TE writes an empty tensor). Checkpoints of the local spec have no such key, so one missing on
    load is expected; one present in a checkpoint (TE runs before this) is left unread."""

    norm = None

    def __new__(cls, *args, **kwargs):
        norm = cls.norm
        module = build_module(norm, *args, **kwargs) if isinstance(norm, ModuleSpec) else \
            norm(*args, **kwargs)
        module.register_state_dict_post_hook(_drop_extra_state)
        module.register_load_state_dict_post_hook(_extra_state_not_missing)
        return module


def _drop_extra_state(module, state_dict, prefix, local_metadata) -> None:
    state_dict.pop(prefix + _EXTRA_STATE, None)


def _extra_state_not_missing(module, incompatible_keys) -> None:
    # torch does not pass the module's prefix to this hook: these norms are `pre_mlp_layernorm`
    missing = incompatible_keys.missing_keys
    missing[:] = [k for k in missing if not k.endswith(f"pre_mlp_layernorm.{_EXTRA_STATE}")]


def norm_without_extra_state(norm) -> type:
    """A builder of `norm` (a class; megatron-core >= 0.18 calls it directly, so it must be one)
    whose instances keep their `_extra_state` out of checkpoints (`NormWithoutExtraState`)."""
    if isinstance(norm, type) and issubclass(norm, NormWithoutExtraState):
        return norm
    return type(f"{getattr(norm, '__name__', 'Norm')}WithoutExtraState",
                (NormWithoutExtraState,), {"norm": norm})


def align_moe_layer_checkpoint_keys(layer_submodules) -> None:
    """Give a TE MoE layer the local spec's checkpoint layout: its norm saved as
    `mlp.linear_fc1.layer_norm_*` (MOE_NORM_KEY_MAP), without the norm's TE `_extra_state`."""
    layer_submodules.sharded_state_dict_keys_map = {
        **MOE_NORM_KEY_MAP, **layer_submodules.sharded_state_dict_keys_map}
    layer_submodules.pre_mlp_layernorm = norm_without_extra_state(
        layer_submodules.pre_mlp_layernorm)


def make_router_builder(config, controller: Optional[SparsityController]):
    """The callable for `MoESubmodules.router`."""
    if is_relu_routed(config):
        return functools.partial(ReLURouter, controller=controller)
    return TopKRouter


def get_block_spec(config, controller: Optional[SparsityController] = None,
                   use_transformer_engine: Optional[bool] = None,
                   vp_stage: Optional[int] = None, pp_rank: Optional[int] = None
                   ) -> TransformerBlockSubmodules:
    """GPT decoder block spec with the configured router in every MoE layer.

    With `use_transformer_engine` (default: TE importable and CUDA present) the layers are
    megatron-core's TE spec: fused norm+QKV (`TELayerNormColumnParallelLinear`), `TENorm` before
    each MoE block, TE attention, and `TEGroupedMLP` experts when `config.moe_grouped_gemm` (TE
    `SequentialMLP` otherwise); MoE layers save that norm under the local spec's keys
    (`align_moe_layer_checkpoint_keys`), so a checkpoint loads under either implementation.
    Without TE: megatron-core's local modules with our RMSNorm; on a CPU machine the experts are
    `cpu_experts.GroupedCPUExperts` (SequentialMLP's parameters and checkpoints, one grouped pass
    over the experts) unless `config.moe_cpu_experts` is "sequential" or the config needs
    SequentialMLP (logged). The router slot is ours in either case.
    """
    if use_transformer_engine is None:
        use_transformer_engine = default_use_transformer_engine()
    elif use_transformer_engine and not have_transformer_engine():
        raise RuntimeError("use_transformer_engine=True but Transformer Engine does not import; "
                           "pip install the [gpu] extra or build with the local spec")
    block = call_with_supported_kwargs(
        get_gpt_decoder_block_spec, config, use_transformer_engine=use_transformer_engine,
        normalization=config.normalization, vp_stage=vp_stage, pp_rank=pp_rank)
    block = copy.deepcopy(block)
    router = make_router_builder(config, controller)
    local_norm = not use_transformer_engine and config.normalization == "RMSNorm"
    if local_norm:
        block.layer_norm = RMSNorm
    for layer_spec in block.layer_specs:
        sub = layer_spec.submodules
        if local_norm:
            sub.input_layernorm = RMSNorm
            sub.pre_mlp_layernorm = RMSNorm
        moe = moe_submodules(sub.mlp)  # a ModuleSpec up to megatron-core 0.17, a partial after
        if moe is not None:
            moe.router = router
            if not use_transformer_engine:  # CPU: grouped experts (megatron/remoe/cpu/experts.py)
                moe.experts = cpu_experts_spec(moe.experts, config)
            else:  # the local spec's checkpoint keys (MOE_NORM_KEY_MAP)
                align_moe_layer_checkpoint_keys(sub)
    return block


def expected_router_class(config) -> Optional[type]:
    """The router class every MoE layer of a model built from `config` must have."""
    if not config.num_moe_experts:
        return None
    return ReLURouter if is_relu_routed(config) else TopKRouter


def check_routers(model, config) -> int:
    """Refuse a model whose MoE layers do not route as `config` says (e.g. a megatron-core release
    whose layer spec our router swap did not reach would leave TopKRouter in a ReLU model, which
    trains silently as the wrong method). Returns the number of MoE layers checked."""
    want = expected_router_class(config)
    modules = model if isinstance(model, (list, tuple)) else [model]
    checked = 0
    for chunk in modules:
        for name, module in chunk.named_modules():
            if not isinstance(module, MoELayer):
                continue
            got = type(getattr(module, "router", None))
            if want is None or got is not want:
                configured = "relu" if want is ReLURouter else "topk" if want else "dense"
                raise ConfigError(
                    f"{name} was built with {got.__name__} but the config says router "
                    f"{configured} ({want.__name__ if want else 'no MoE layers'}): the router was "
                    f"not installed in megatron-core {mcore_version_string()}'s layer spec; fix: "
                    f"use a megatron-core in the tested range (docs/compat.md)")
            checked += 1
    return checked
