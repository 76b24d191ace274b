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
