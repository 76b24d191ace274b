"""Checkpoints in megatron-core's dist_checkpointing `torch_dist` format, saved atomically.

Layout of `--save DIR`:

    DIR/iter_0001000/                     one complete checkpoint (dist_checkpointing files)
    DIR/iter_0001000/config.yaml          the effective training config (loadable with --config)
    DIR/latest_checkpointed_iteration.txt the tracker, written last

Atomicity: every rank writes into `iter_XXXXXXX.tmp`; only after all ranks finished does rank 0
rename it to `iter_XXXXXXX` and then replace the tracker (tmp file + rename). A crash at any point
leaves the previous checkpoint and tracker intact; a leftover `.tmp` directory is ignored (and
removed by the next save of that iteration).

Contents: the model's and the optimizer's sharded state dicts (re-shardable: a checkpoint loads into
another TP/PP/EP/DP layout; the distributed optimizer uses the `fully_sharded_model_space` format) plus
common state saved once: iteration, consumed samples, LR scheduler, the ReMoE sparsity controller
(lambda), the effective config; and per-rank RNG states (restored when the layout is unchanged).
"""

from __future__ import annotations

import os
import random
import re
import shutil
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron.remoe.config import ConfigError

TRACKER = "latest_checkpointed_iteration.txt"
CHECKPOINT_VERSION = 1
_ITER_DIR = re.compile(r"^iter_(\d{7})$")

def sharded_metadata() -> dict:
    """Passed to sharded_state_dict() on save and recorded in the checkpoint (content metadata), so
    a load builds the matching structure.

    Distributed-optimizer state: 'fully_reshardable' (canonical per-parameter layout: loads into any
    TP/PP/EP/DP layout) when megatron-core runs with Transformer Engine or Apex Adam. With torch Adam
    (CPU, or GPUs without TE) megatron-core 0.16 cannot load that format (its gathered state lacks
    torch Adam's per-parameter 'step') and its 'fully_sharded_model_space' is unsupported, so we use
    'dp_reshardable' there: re-shardable across DP only (model weights always re-shard).
    """
    from megatron.core.optimizer import distrib_optimizer

    kind = "fully_reshardable" if distrib_optimizer.HAVE_APEX_OR_TE else "dp_reshardable"
    return {"distrib_optim_sharding_type": kind, "singleton_local_shards": False,
            "chained_optim_avoid_prefix": True}


def iteration_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _layout(cfg) -> dict:
    world = dist.get_world_size() if dist.is_initialized() else 1
    return {"world_size": world, "tp": cfg.tensor_model_parallel_size,
            "pp": cfg.pipeline_model_parallel_size, "vp": cfg.virtual_pipeline_model_parallel_size,
            "ep": cfg.expert_model_parallel_size, "cp": cfg.context_parallel_size}


def _rng_state() -> dict:
    from megatron.core import tensor_parallel

    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state(),
             "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
    try:
        state["tracker"] = tensor_parallel.get_cuda_rng_tracker().get_states()
    except Exception:  # tracker not initialised (no model-parallel RNG in use)
        state["tracker"] = None
    return state


def _set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    if state.get("tracker") is not None:
        tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _rng_sharded(rng: Optional[dict]):
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    world = dist.get_world_size() if dist.is_initialized() else 1
    return ShardedObject("rng_state", rng, (world,), (_rank(),), replica_id=0)


def _prime_empty_optimizer_state(optimizer) -> None:
    """Without Transformer Engine / Apex, megatron-core's DistributedOptimizer wraps torch Adam,
    whose state is empty until the first step, and `state_dict()` (called while building the
    loading state dict) asserts on a missing 'step'. Allocate zero state with step 0 first; the
    load then overwrites all of it (step included) from the checkpoint."""
    from megatron.core.optimizer import distrib_optimizer

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


def _state_dict(model, optimizer, is_loading: bool, with_optimizer: bool,
                with_rng: bool, metadata: dict) -> dict:
    """The sharded state dict of this rank (model chunk(s), optimizer, RNG)."""
    from megatron.core.utils import unwrap_model

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


def save_checkpoint(root: str, iteration: int, model, optimizer, scheduler, controller,
                    consumed_train_samples: int, cfg, config_yaml: str) -> str:
    """Save atomically into root/iter_XXXXXXX; every rank must call this."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy

    final, tmp = iteration_dir(root, iteration), iteration_dir(root, iteration) + ".tmp"
    if _rank() == 0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # a crashed earlier attempt
        os.makedirs(tmp)
    _barrier()
    metadata = sharded_metadata()
    sd = _state_dict(model, optimizer, is_loading=False, with_optimizer=True,
                     with_rng=True, metadata=metadata)
    # common (non-sharded) state: written once by rank 0, identical on every rank
    sd.update(iteration=iteration, consumed_train_samples=consumed_train_samples,
              opt_param_scheduler=scheduler.state_dict(),
              checkpoint_version=CHECKPOINT_VERSION, layout=_layout(cfg), config=cfg.to_dict(),
              controller=controller.state_dict() if controller is not None else None)
    dist_checkpointing.save(sd, tmp, get_default_save_sharded_strategy("torch_dist"),
                            content_metadata=metadata)
    _barrier()
    if _rank() == 0:
        with open(os.path.join(tmp, "config.yaml"), "w", encoding="utf-8") as fh:
            fh.write(config_yaml)
        if os.path.exists(final):  # re-saving the same iteration
            shutil.rmtree(final)
        os.replace(tmp, final)
        tracker_tmp = os.path.join(root, TRACKER + ".tmp")
        with open(tracker_tmp, "w", encoding="utf-8") as fh:
            fh.write(f"{iteration}\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tracker_tmp, os.path.join(root, TRACKER))
    _barrier()
    return final


def find_latest_checkpoint(root: str, log=print) -> Optional[str]:
    """The newest complete checkpoint directory in `root`, or None when there is none.

    The tracker names it; if the tracker is missing or stale (a crash between the rename and the
    tracker update) the newest complete `iter_XXXXXXX` directory is used, and we say so.
    """
    if not root or not os.path.isdir(root):
        return None
    complete = sorted(int(m.group(1)) for name in os.listdir(root)
                      if (m := _ITER_DIR.match(name)) and os.path.isdir(os.path.join(root, name)))
    tracker = os.path.join(root, TRACKER)
    if os.path.isfile(tracker):
        with open(tracker, encoding="utf-8") as fh:
            text = fh.read().strip()
        if text.isdigit() and int(text) in complete and int(text) == complete[-1]:
            return iteration_dir(root, int(text))
        if complete:
            log(f"checkpoint: tracker {tracker} says {text!r} but the newest complete checkpoint "
                f"is iter_{complete[-1]:07d}; loading that one")
    elif complete:
        log(f"checkpoint: no tracker in {root}; loading the newest complete checkpoint "
            f"iter_{complete[-1]:07d}")
    return iteration_dir(root, complete[-1]) if complete else None


def _check_optimizer_reshardable(path, saved: dict, now: dict, saved_cfg: dict, cfg,
                                 metadata: dict) -> None:
    """Refuse (with the fix) the layout changes whose optimizer state megatron-core cannot map."""
    fix = (f"resume with --no-load-optim (weights, lambda, scheduler position and data position "
           f"are still restored; Adam moments restart), or use the saved layout {saved}")
    model_dims = ("tp", "pp", "vp", "ep", "cp")
    if bool(saved_cfg.get("use_distributed_optimizer")) != cfg.use_distributed_optimizer:
        raise ConfigError(f"{path}: saved with use_distributed_optimizer="
                         f"{saved_cfg.get('use_distributed_optimizer')}, now "
                         f"{cfg.use_distributed_optimizer}; {fix}")
    changed = [d for d in model_dims if saved.get(d) != now.get(d)]
    if (cfg.use_distributed_optimizer and changed
            and metadata.get("distrib_optim_sharding_type") == "dp_reshardable"):
        raise ConfigError(f"{path}: distributed-optimizer state in 'dp_reshardable' format (saved "
                         f"without Transformer Engine/Apex) cannot move to another "
                         f"{'/'.join(changed).upper()} layout; {fix}")
    # expert parameters get their own optimizer only with EP > 1 (megatron-core's chained optimizer)
    if saved_cfg.get("router", "dense") != "dense" and \
            (saved.get("ep", 1) > 1) != (now.get("ep", 1) > 1):
        raise ConfigError(f"{path}: EP={saved.get('ep')} -> EP={now.get('ep')} changes the number of "
                         f"optimizers (experts get their own with EP > 1); {fix}")


def load_checkpoint(path: str, model, optimizer, scheduler, controller, cfg, log=print) -> dict:
    """Load `path` (a checkpoint directory) into the current layout; returns the common state
    (iteration, consumed_train_samples, layout, config, ...)."""
    from megatron.core import dist_checkpointing
    from megatron.core.utils import unwrap_model

    common = dist_checkpointing.load_common_state_dict(path)
    metadata = dist_checkpointing.load_content_metadata(path) or sharded_metadata()
    saved, now = common.get("layout") or {}, _layout(cfg)
    same_layout = saved == now
    if not cfg.no_load_optim:
        _check_optimizer_reshardable(path, saved, now, common.get("config") or {}, cfg, metadata)
    with_rng = same_layout and not cfg.no_load_rng
    if not same_layout and not cfg.no_load_rng:
        log(f"checkpoint: parallel layout changed ({common.get('layout')} -> {_layout(cfg)}): "
            "the state is re-sharded, RNG states are not restored")
    with_optimizer = not cfg.no_load_optim
    sd = _state_dict(model, optimizer, is_loading=True, with_optimizer=with_optimizer,
                     with_rng=with_rng, metadata=metadata)
    state = dist_checkpointing.load(sd, path, strict="assume_ok_unexpected")
    model = unwrap_model(model)
    if len(model) == 1:
        model[0].load_state_dict(state["model"], strict=True)
    else:
        for i, chunk in enumerate(model):
            chunk.load_state_dict(state[f"model{i}"], strict=True)
    scheduler.load_state_dict(common["opt_param_scheduler"])
    if with_optimizer:
        optimizer.load_state_dict(state["optimizer"])
    else:
        # fresh optimizer: the fp32 master weights must follow the loaded model weights
        optimizer.reload_model_params()
    if with_rng:
        _set_rng_state(state["rng_state"])
    if controller is not None:
        if common.get("controller") is None:
            raise ConfigError(f"{path} has no sparsity-controller state (saved from a run "
                             "without --router relu?); cannot resume a ReLU-routed run from it")
        controller.load_state_dict(common["controller"])
    return common
