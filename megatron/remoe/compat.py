"""Compatibility with the range of megatron-core releases we support (0.16.1 .. newest).

Everything that depends on the installed megatron-core version lives here, so the rest of the package
reads as if there were one version.
"""

from __future__ import annotations

import functools
import importlib.metadata
import inspect
import re
from typing import Optional


@functools.lru_cache(maxsize=None)
def mcore_version() -> tuple[int, int, int]:
    try:
        raw = importlib.metadata.version("megatron-core")
    except importlib.metadata.PackageNotFoundError:  # source checkout of Megatron-LM
        from megatron.core import package_info  # noqa: PLC0415 -- compat is stdlib-only at import

        raw = package_info.__version__
    return parse_version(raw)


def mcore_at_least(major: int, minor: int, patch: int = 0) -> bool:
    return mcore_version() >= (major, minor, patch)


def mcore_version_string() -> str:
    """The installed megatron-core version as "X.Y.Z" (what checkpoints record as their writer)."""
    return ".".join(map(str, mcore_version()))


def parse_version(text: str) -> tuple[int, int, int]:
    """(major, minor, patch) of a version string; "0.19.0rc1" -> (0, 19, 0)."""
    parts = []
    for piece in str(text).split(".")[:3]:
        digits = re.match(r"\d*", piece).group()
        parts.append(int(digits) if digits else 0)
    return tuple(parts + [0] * (3 - len(parts)))


# ------------------------------------------------------------------------------------------------
# Variable k (0..E experts per token) through megatron-core's dispatchers
# ------------------------------------------------------------------------------------------------
def variable_k_dispatch_settings(num_experts: int, topk: int, dispatcher: str,
                                 permute_fusion: bool,
                                 capacity_factor: Optional[float] = None) -> dict:
    """TransformerConfig overrides that make dispatch exact when tokens pick 0..E experts.

    Without a capacity factor the alltoall dispatcher sizes the permutation as `tokens * topk`
    (`num_out_tokens`), not as the real number of routed pairs. megatron-core >= 0.17's unfused
    permute cuts its index list to that length, and the experts' split then fails; TE's fused
    permute (`moe_permute_fusion`, every version) allocates that many rows and writes every routed
    pair without a bounds check: an out-of-bounds write in Stage I (more pairs than tokens * topk),
    uninitialised rows in Stage III (fewer). With any capacity factor set, the dispatcher counts
    the pairs exactly instead; the ReLU router never applies the capacity itself, so nothing is
    dropped. We set E/topk only when the user set none: a user's value is theirs (the config
    validation rejects one below E/topk). `config.check_variable_k_dispatch` re-checks this when a
    router is built.
    """
    if dispatcher != "alltoall" or capacity_factor is not None:
        return {}
    if not (mcore_at_least(0, 17) or permute_fusion):
        return {}
    return {"moe_expert_capacity_factor": float(num_experts) / float(topk)}


def fixed_k_features(cfg) -> list:
    """(field, why, fix) for the enabled megatron-core features that assume a fixed k per token,
    which ReLU routing (0..E experts per token) cannot use. Fields absent in this version are
    simply not enabled."""
    found = []
    if getattr(cfg, "moe_enable_deepep", False) or \
            getattr(cfg, "moe_token_dispatcher_type", None) == "flex":
        found.append(("moe_token_dispatcher_type='flex' (DeepEP/HybridEP)",
                      "dispatches top-k expert indices",
                      "use --moe-token-dispatcher-type alltoall or allgather"))
    if getattr(cfg, "moe_enable_routing_replay", False):
        found.append(("moe_enable_routing_replay", "records and replays top-k expert indices",
                      "remove it with --moe-relu-routing"))
    return found


def cuda_graph_settings(cfg) -> list:
    """The `field=value` settings of `cfg` that capture layers in CUDA graphs: `cuda_graph_impl`
    (0.16+; 'full_iteration' from 0.19) and its deprecated switches `enable_cuda_graph` /
    `external_cuda_graph`. The scope fields (`cuda_graph_scope`, 0.19's `cuda_graph_modules`)
    capture nothing while the implementation is 'none'. Fields absent in this version are off."""
    found = [f"{name}=True" for name in ("enable_cuda_graph", "external_cuda_graph")
             if getattr(cfg, name, False)]
    impl = getattr(cfg, "cuda_graph_impl", "none")
    if impl not in (None, "none"):
        found.append(f"cuda_graph_impl={impl!r}")
    return found


# ------------------------------------------------------------------------------------------------
# The router GEMM
# ------------------------------------------------------------------------------------------------
def patch_router_gemm(on_cpu: bool) -> None:
    """Make megatron-core's `router_gating_linear` take its torch.mm path where it must.

    mcore 0.16 calls `te_general_gemm` in router_gating_linear but only defines it when Transformer
    Engine imports; without TE the name is missing, and with TE (on a CPU-only machine) it would
    run a CUDA GEMM on CPU tensors. None selects the torch.mm path. Applied by
    `cpu_backend.apply_cpu_backend` (on GPUs without TE too)."""
    from megatron.core.transformer.moe import moe_utils  # noqa: PLC0415 -- compat is stdlib-only at import

    if on_cpu or not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


# ------------------------------------------------------------------------------------------------
# Layer specs: where the router goes
# ------------------------------------------------------------------------------------------------
def spec_module_class(spec):
    """The class a layer-spec entry builds: `ModuleSpec.module` (megatron-core <= 0.17 for MoE),
    `functools.partial(cls, ...)`.func (0.18+), or the class itself."""
    if isinstance(spec, functools.partial):
        return spec.func
    if isinstance(spec, type):
        return spec
    return getattr(spec, "module", None)


def spec_submodules(spec):
    """The `submodules` of a ModuleSpec or a functools.partial spec (megatron-core's own
    `spec_utils.get_submodules` where it exists, 0.17+)."""
    from megatron.core.transformer import spec_utils  # noqa: PLC0415 -- compat is stdlib-only at import

    getter = getattr(spec_utils, "get_submodules", None)
    if getter is not None:
        return getter(spec)
    if isinstance(spec, functools.partial):
        return spec.keywords["submodules"]
    return spec.submodules


def moe_submodules(mlp_spec):
    """The `MoESubmodules` of an MLP spec that builds a megatron-core MoELayer, else None."""
    from megatron.core.transformer.moe.moe_layer import MoELayer  # noqa: PLC0415 -- compat is stdlib-only at import

    cls = spec_module_class(mlp_spec)
    if not (isinstance(cls, type) and issubclass(cls, MoELayer)):
        return None
    return spec_submodules(mlp_spec)


def build_from_spec(spec, **kwargs):
    """Instantiate a layer-spec entry of either form (ModuleSpec or functools.partial)."""
    if isinstance(spec, functools.partial):
        return spec(**kwargs)
    from megatron.core.transformer.spec_utils import build_module  # noqa: PLC0415 -- compat is stdlib-only at import

    return build_module(spec, **kwargs)


# ------------------------------------------------------------------------------------------------
# MoE metrics (TopK aux losses)
# ------------------------------------------------------------------------------------------------
def _moe_metrics_tracker():
    """megatron-core >= 0.18's metrics tracker, or None (0.16/0.17: module-level functions)."""
    try:
        from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker  # noqa: PLC0415 -- 0.18+ only
    except ImportError:
        return None
    return get_moe_metrics_tracker()


def report_moe_metrics(**kwargs) -> str:
    """Reduce, aggregate and clear the MoE metrics the routers recorded this step (arguments of
    `MoEMetricsTracker.report` / `track_moe_metrics`, which share their names)."""
    tracker = _moe_metrics_tracker()
    if tracker is not None:
        return call_with_supported_kwargs(tracker.report, **kwargs)
    from megatron.core.transformer.moe.moe_utils import track_moe_metrics  # noqa: PLC0415 -- 0.16/0.17 only

    return call_with_supported_kwargs(track_moe_metrics, **kwargs)


def clear_moe_metrics() -> None:
    """Drop the MoE metrics recorded so far (e.g. by evaluation forwards)."""
    tracker = _moe_metrics_tracker()
    if tracker is not None:
        tracker.clear()
        return
    from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker  # noqa: PLC0415 -- 0.16/0.17 only

    clear_aux_losses_tracker()


# ------------------------------------------------------------------------------------------------
# Checkpoint layout
# ------------------------------------------------------------------------------------------------
def writes_common_pt() -> bool:
    """megatron-core < 0.19 writes the common (non-sharded) state to `common.pt`; 0.19+ embeds it
    in the `.distcp` files (and still reads the old layout)."""
    return not mcore_at_least(0, 19)


def reads_checkpoint_of(writer_version: str) -> bool:
    """Whether this megatron-core reads checkpoints written by `writer_version`: the same or an
    older minor release. A newer release may write a layout this one does not know (0.19 dropped
    common.pt, which 0.16-0.18 require)."""
    return parse_version(writer_version)[:2] <= mcore_version()[:2]


# ------------------------------------------------------------------------------------------------
# Transformer Engine / GPU fast path
# ------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def transformer_engine_usable() -> bool:
    """TE and megatron-core's TE extension import. A TE wheel on a machine without CUDA libraries
    raises OSError/RuntimeError rather than ImportError: any exception means "not usable"."""
    try:
        import transformer_engine  # noqa: F401, PLC0415 -- optional extra
        import transformer_engine.pytorch  # noqa: F401, PLC0415 -- optional extra
        from megatron.core.extensions import transformer_engine as _mcore_te  # noqa: F401, PLC0415 -- optional extra
    except Exception:  # noqa: BLE001 - see docstring
        return False
    return True


def fused_permute_available() -> bool:
    """megatron-core's fused (TE) token permutation can be enabled (`moe_permute_fusion`)."""
    if not transformer_engine_usable():
        return False
    try:
        from megatron.core.transformer.moe import moe_utils  # noqa: PLC0415 -- compat is stdlib-only at import
    except ImportError:
        return False
    return getattr(moe_utils, "fused_permute", None) is not None


def grouped_gemm_available() -> bool:
    """TEGroupedMLP can be built (TE >= 1.9 with megatron-core's TE extension)."""
    if not transformer_engine_usable():
        return False
    try:
        from megatron.core.extensions.transformer_engine import (  # noqa: PLC0415 -- optional extra
            TEColumnParallelGroupedLinear,
        )
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
    import torch  # noqa: PLC0415 -- compat is stdlib-only at import

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
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return fn(*args, **kwargs)
    return fn(*args, **{k: v for k, v in kwargs.items() if k in params})
