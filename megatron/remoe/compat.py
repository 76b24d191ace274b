"""Compatibility with the range of megatron-core releases we support (0.16.1 .. newest).

Everything that depends on the installed megatron-core version lives here, so the rest of the package
reads as if there were one version.
"""

from __future__ import annotations

import functools
import importlib.metadata

from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler  # noqa: F401 (re-export)


@functools.lru_cache(maxsize=None)
def mcore_version() -> tuple[int, int, int]:
    try:
        raw = importlib.metadata.version("megatron-core")
    except importlib.metadata.PackageNotFoundError:  # source checkout of Megatron-LM
        from megatron.core import package_info

        raw = package_info.__version__
    parts = []
    for piece in raw.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    while len(parts) < 3:
        parts.append(0)
    return tuple(parts)


def mcore_at_least(major: int, minor: int, patch: int = 0) -> bool:
    return mcore_version() >= (major, minor, patch)


def variable_k_dispatch_settings(num_experts: int, topk: int, dispatcher: str,
                                 permute_fusion: bool) -> dict:
    """TransformerConfig overrides that make dispatch exact when tokens pick 0..E experts.

    megatron-core >= 0.17 sizes the dropless alltoall permutation as `tokens * topk` (and TE's fused
    permutation does on every version), truncating tokens that chose more than `topk` experts.
    Setting a capacity factor of at least E/topk makes the dispatcher use the real per-expert token
    count instead; the ReLU router never applies the capacity itself, so nothing is dropped.
    """
    if dispatcher != "alltoall":
        return {}
    if not (mcore_at_least(0, 17) or permute_fusion):
        return {}
    return {"moe_expert_capacity_factor": float(num_experts) / float(topk),
            "moe_pad_expert_input_to_capacity": False}


# ------------------------------------------------------------------------------------------------
# Transformer Engine / GPU fast path
# ------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def transformer_engine_usable() -> bool:
    """TE and megatron-core's TE extension import. A TE wheel on a machine without CUDA libraries
    raises OSError/RuntimeError rather than ImportError: any exception means "not usable"."""
    try:
        import transformer_engine  # noqa: F401
        import transformer_engine.pytorch  # noqa: F401

        from megatron.core.extensions import transformer_engine as _mcore_te  # noqa: F401
    except Exception:  # noqa: BLE001 - see docstring
        return False
    return True


def te_version() -> tuple[int, int, int] | None:
    if not transformer_engine_usable():
        return None
    for name in ("transformer_engine", "transformer-engine", "transformer_engine_torch"):
        try:
            raw = importlib.metadata.version(name)
            break
        except importlib.metadata.PackageNotFoundError:
            continue
    else:
        import transformer_engine

        raw = getattr(transformer_engine, "__version__", "0.0.0")
    parts = [int("".join(ch for ch in p if ch.isdigit()) or 0) for p in raw.split(".")[:3]]
    return tuple(parts + [0] * (3 - len(parts)))


def fused_permute_available() -> bool:
    """megatron-core's fused (TE) token permutation can be enabled (`moe_permute_fusion`)."""
    if not transformer_engine_usable():
        return False
    try:
        from megatron.core.transformer.moe import moe_utils
    except ImportError:
        return False
    return getattr(moe_utils, "fused_permute", None) is not None


def grouped_gemm_available() -> bool:
    """TEGroupedMLP can be built (TE >= 1.9 with megatron-core's TE extension)."""
    if not transformer_engine_usable():
        return False
    try:
        from megatron.core.extensions.transformer_engine import TEColumnParallelGroupedLinear
    except ImportError:
        return False
    return TEColumnParallelGroupedLinear is not None


def gpu_fast_path_fields(num_experts: int | None, bf16: bool = True,
                         grouped_gemm: bool | None = None,
                         permute_fusion: bool | None = None) -> dict:
    """TransformerConfig fields for the GPU path: bf16 weights/activations with the router GEMM,
    ReLU, regulariser and statistics in fp32 (`moe_router_dtype='fp32'`), TE grouped-GEMM experts
    and fused permutation where available. Combine with `use_transformer_engine=True` when
    building the model; the ReLU router's variable-k dispatch settings (capacity factor E/topk for
    fused permutation and megatron-core >= 0.17) are applied by the config itself.
    """
    import torch

    fields = {"bf16": bf16, "params_dtype": torch.bfloat16 if bf16 else torch.float32,
              "pipeline_dtype": torch.bfloat16 if bf16 else torch.float32}
    if num_experts:
        fields["moe_router_dtype"] = "fp32"
        fields["moe_grouped_gemm"] = grouped_gemm_available() if grouped_gemm is None \
            else grouped_gemm
        fields["moe_permute_fusion"] = fused_permute_available() if permute_fusion is None \
            else permute_fusion
    return fields


def call_with_supported_kwargs(fn, *args, **kwargs):
    """Call `fn` with only the keyword arguments its signature accepts (megatron-core adds and
    renames keyword arguments between releases, e.g. `pp_rank` of the block-spec builders)."""
    import inspect

    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return fn(*args, **kwargs)
    return fn(*args, **{k: v for k, v in kwargs.items() if k in params})
