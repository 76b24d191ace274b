"""What a checkpoint holds per rank: the sharded state dict of the model chunk(s), the optimizer
and the RNG states, with the fixes megatron-core's DistributedOptimizer needs around torch Adam."""

from __future__ import annotations

import random
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, tensor_parallel
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedBase, ShardedObject
from megatron.core.optimizer import distrib_optimizer
from megatron.core.utils import unwrap_model

from megatron.remoe.controller import SparsityController
from megatron.remoe.spec import MOE_NORM_KEY_MAP
from megatron.remoe.training.checkpointing.files import this_rank


def sharded_metadata() -> dict:
    """Passed to sharded_state_dict() on save and recorded in the checkpoint (content metadata), so
    a load builds the matching structure.

    Distributed-optimizer state: 'fully_reshardable' (canonical per-parameter layout: loads into any
    TP/PP/EP/DP layout) when megatron-core runs with Transformer Engine or Apex Adam. With torch Adam
    (CPU, or GPUs without TE) megatron-core 0.16 cannot load that format (its gathered state lacks
    torch Adam's per-parameter 'step') and its 'fully_sharded_model_space' is unsupported, so we use
    'dp_reshardable' there: re-shardable across DP only (model weights always re-shard).
    """
    kind = "fully_reshardable" if distrib_optimizer.HAVE_APEX_OR_TE else "dp_reshardable"
    return {"distrib_optim_sharding_type": kind, "singleton_local_shards": False,
            "chained_optim_avoid_prefix": True}


def parallel_layout(cfg) -> dict:
    world = dist.get_world_size() if dist.is_initialized() else 1
    return {"world_size": world, "tp": cfg.tensor_model_parallel_size,
            "pp": cfg.pipeline_model_parallel_size, "vp": cfg.virtual_pipeline_model_parallel_size,
            "ep": cfg.expert_model_parallel_size, "cp": cfg.context_parallel_size}


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state(),
             "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
    try:
        state["tracker"] = tensor_parallel.get_cuda_rng_tracker().get_states()
    except Exception:  # tracker not initialised (no model-parallel RNG in use)
        state["tracker"] = None
    return state


def restore_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    if state.get("tracker") is not None:
        tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _rng_sharded(rng: Optional[dict]):
    world = dist.get_world_size() if dist.is_initialized() else 1
    return ShardedObject("rng_state", rng, (world,), (this_rank(),), replica_id=0)


def _prime_empty_optimizer_state(optimizer) -> None:
    """Without Transformer Engine / Apex, megatron-core's DistributedOptimizer wraps torch Adam,
    whose state is empty until the first step, and `state_dict()` (called while building the
    loading state dict) asserts on a missing 'step'. Allocate zero state with step 0 first; the
    load then overwrites all of it (step included) from the checkpoint."""
    if distrib_optimizer.HAVE_APEX_OR_TE:
        return
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if not isinstance(opt, distrib_optimizer.DistributedOptimizer) or opt.optimizer.state:
            continue
        for group in opt.optimizer.param_groups:
            for p in group["params"]:
                opt.optimizer.state[p] = {"exp_avg": torch.zeros_like(p.data),
                                          "exp_avg_sq": torch.zeros_like(p.data),
                                          "step": torch.tensor(0.0)}


def restore_torch_adam_steps(optimizer, loaded) -> None:
    """Without Transformer Engine / Apex, megatron-core 0.16's DistributedOptimizer loads torch
    Adam's 'step' as ONE tensor shared by every parameter and leaves it at a stale value (0 after
    loading a step-3 checkpoint), so the updates after a resume used the wrong Adam bias
    correction (found by tests/training/test_parity.py, exact resume). Give every parameter its own step
    tensor holding the saved count."""
    if distrib_optimizer.HAVE_APEX_OR_TE:
        return
    opts = getattr(optimizer, "chained_optimizers", [optimizer])
    states = [loaded] if len(opts) == 1 else [loaded[i] for i in range(len(opts))]
    for opt, saved in zip(opts, states):
        if not isinstance(opt, distrib_optimizer.DistributedOptimizer):
            continue
        steps = {float(g["step"]) for g in saved["optimizer"]["param_groups"] if "step" in g}
        if len(steps) != 1:
            continue
        step = steps.pop()
        for param_state in opt.optimizer.state.values():
            param_state["step"] = torch.tensor(step, dtype=torch.float32)


def build_state_dict(model, optimizer, is_loading: bool, with_optimizer: bool,
                     with_rng: bool, metadata: dict) -> dict:
    """The sharded state dict of this rank (model chunk(s), optimizer, RNG)."""
    model = unwrap_model(model)  # keys of the bare GPTModel, without DDP/Float16Module prefixes
    sd = {}
    if len(model) == 1:
        sd["model"] = model[0].sharded_state_dict(metadata=metadata)
    else:
        for i, chunk in enumerate(model):
            sd[f"model{i}"] = chunk.sharded_state_dict(metadata=metadata)
    if with_optimizer:
        if is_loading:
            _prime_empty_optimizer_state(optimizer)
        sd["optimizer"] = optimizer.sharded_state_dict(sd, is_loading=is_loading,
                                                       metadata=metadata)
    if with_rng:
        sd["rng_state"] = _rng_sharded(None if is_loading else _rng_state())
    return sd


# every ReLURouter's `_extra_state` holds the sparsity controller's state (router.py)
ROUTER_STATE_SUFFIX = ".router._extra_state"


def load_sharded(sd: dict, path: str, common: dict) -> dict:
    """dist_checkpointing.load of the sharded state dict `sd` (model chunks under "model*")
    from checkpoint `path` with common state `common`.

    Checkpoints written before the controller's state moved into the routers hold it in their
    common state under SparsityController.CHECKPOINT_KEY and have no router `_extra_state`:
    those entries are not read from the files but filled with that common state, so the
    routers (and their controller) load it as from a current checkpoint. MoE-layer norms that
    `path` holds in megatron-core's TE layout are read from there (`_request_te_moe_norm_keys`)."""
    _request_te_moe_norm_keys(sd, path)
    legacy = common.get(SparsityController.CHECKPOINT_KEY)
    moved = {}
    if legacy is not None:
        for name, part in sd.items():
            if name.startswith("model") and isinstance(part, dict):
                moved[name] = [key for key in part if key.endswith(ROUTER_STATE_SUFFIX)]
                for key in moved[name]:
                    del part[key]
    state = dist_checkpointing.load(sd, path, strict="assume_ok_unexpected")
    for name, keys in moved.items():
        state[name].update({key: legacy for key in keys})
    return state


def _request_te_moe_norm_keys(sharded_sd: dict, path: str) -> int:
    """Checkpoints written with transformer_impl=transformer_engine before the project's spec gave
    TE MoE layers the local keys (spec.MOE_NORM_KEY_MAP) hold each MoE layer's norm as
    `pre_mlp_layernorm.*`; ask for those keys where the checkpoint lacks the local ones (model and
    optimizer entries alike). Returns the number of entries redirected."""
    ((te_prefix, local_prefix),) = MOE_NORM_KEY_MAP.items()
    wanted = [v for v in nested_values(sharded_sd)
              if isinstance(v, ShardedBase) and local_prefix in v.key]
    if not wanted:
        return 0
    saved = set(dist_checkpointing.load_tensors_metadata(path))
    moved = 0
    for entry in wanted:
        te_key = entry.key.replace(local_prefix, te_prefix, 1)
        if entry.key not in saved and te_key in saved:
            entry.key = te_key
            moved += 1
    return moved
