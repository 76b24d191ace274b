"""Loading: the saved config and common state, the checks that refuse another model shape or an
optimizer layout megatron-core cannot map (one line, with the fix), then the state itself."""

from __future__ import annotations

import dataclasses
import os
from typing import Optional

import torch
from megatron.core import dist_checkpointing
from megatron.core.utils import unwrap_model

from megatron.remoe.errors import ConfigError
from megatron.remoe.logs import get_logger, info0
from megatron.remoe.training.checkpointing.files import check_writer_version
from megatron.remoe.training.checkpointing.state import (
    build_state_dict,
    load_sharded,
    parallel_layout,
    restore_rng_state,
    restore_torch_adam_steps,
    sharded_metadata,
)
from megatron.remoe.training.config import FIELDS, TrainConfig

logger = get_logger(__name__)

# Config fields that fix the shapes of the saved tensors (compared before loading).
MODEL_SHAPE_FIELDS = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
                      "ffn_hidden_size", "kv_channels", "router", "num_experts",
                      "moe_granularity", "moe_layer_freq")


_MOE_ONLY_FIELDS = ("num_experts", "moe_granularity", "moe_layer_freq")


def load_common_state(path: str) -> dict:
    """The common (non-sharded) state of checkpoint `path`, after the writer-version check."""
    check_writer_version(path)
    return dist_checkpointing.load_common_state_dict(path)


def read_checkpoint_config(path: str):
    """(TrainConfig saved with checkpoint directory `path`, its common state dict)."""
    try:
        common = load_common_state(path)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is one line
        raise ConfigError(f"cannot read checkpoint {path}: "
                          f"{' '.join(str(e).split())[:300] or type(e).__name__}") from None
    saved = common.get("config")
    if not saved:
        raise ConfigError(f"checkpoint {path} holds no training config (not written by "
                          "megatron.remoe?)")
    return TrainConfig(**{k: v for k, v in saved.items() if k in FIELDS}), common


def single_process_config(cfg):
    """The TrainConfig of the same model on one process (no model parallelism, fp32, local):
    what offline tools (conversion, analysis) rebuild a checkpoint's model with."""
    return dataclasses.replace(
        cfg, tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
        virtual_pipeline_model_parallel_size=None, expert_model_parallel_size=1,
        expert_tensor_parallel_size=None, context_parallel_size=1, sequence_parallel=False,
        recompute_granularity=None, recompute_modules=[], transformer_impl="local",
        moe_grouped_gemm=False, bf16=False, use_distributed_optimizer=False)


def _norm_freq(value):
    if isinstance(value, str):
        value = [int(x) for x in value.strip("[]").split(",") if x.strip()] if "," in value \
            else int(value)
    return value


def check_checkpoint_matches(path: str, common: dict, cfg, vocab_size: Optional[int]) -> None:
    """ConfigError (one line, with the fix) when the common state of checkpoint `path` belongs to
    another model shape or padded vocabulary than this run's."""
    check_model_shape(path, common.get("config") or {}, cfg)
    saved_vocab = common.get("padded_vocab_size")
    if vocab_size is not None and saved_vocab is not None and saved_vocab != vocab_size:
        raise ConfigError(
            f"--load checkpoint {path} has a padded vocabulary of {saved_vocab}, this run "
            f"{vocab_size} (tokenizer, --vocab-size, --make-vocab-size-divisible-by or TP "
            f"differ); fix: use the tokenizer/vocabulary of the saved run, or another --load "
            f"directory")


def check_model_shape(path: str, saved: dict, cfg) -> None:
    """ConfigError (one line, with the fix) when checkpoint `path` holds another model shape."""
    fields = [f for f in MODEL_SHAPE_FIELDS
              if not (f in _MOE_ONLY_FIELDS and "dense" in (saved.get("router"), cfg.router))]
    for name in fields:
        if name not in saved:
            continue
        then, now = saved[name], getattr(cfg, name)
        if name == "moe_layer_freq":
            then, now = _norm_freq(then), _norm_freq(now)
        elif name == "kv_channels":  # None means hidden / heads: compare the head widths
            then = then or saved.get("hidden_size", 0) // max(saved.get("num_attention_heads")
                                                                or 1, 1)
            now = now or cfg.hidden_size // max(cfg.num_attention_heads or 1, 1)
        if then != now:
            flag_value = ",".join(map(str, then)) if isinstance(then, list) else then
            raise ConfigError(
                f"--load checkpoint {path} holds a different model: {name}={then!r} there, "
                f"{now!r} in this run; fix: set --{name.replace('_', '-')} {flag_value} (or "
                f"--config {os.path.join(path, 'config.yaml')}), or use another --load directory")


def check_optimizer_reshardable(path, saved: dict, now: dict, saved_cfg: dict, cfg,
                                metadata: dict) -> None:
    """Refuse (with the fix) the layout changes whose optimizer state megatron-core cannot map."""
    fix = (f"resume with --no-load-optim (weights, lambda, scheduler position and data position "
           f"are still restored; Adam moments restart), or use the saved layout {saved}")
    model_dims = ("tp", "pp", "vp", "ep", "cp")
    if bool(saved_cfg.get("use_distributed_optimizer")) != cfg.use_distributed_optimizer:
        raise ConfigError(f"{path}: saved with use_distributed_optimizer="
                         f"{saved_cfg.get('use_distributed_optimizer')}, now "
                         f"{cfg.use_distributed_optimizer}; {fix}")
    saved_impl = saved_cfg.get("transformer_impl") or "local"
    if (cfg.use_distributed_optimizer and saved_impl != cfg.transformer_impl
            and metadata.get("distrib_optim_sharding_type") == "dp_reshardable"):
        # that format stores flat buckets in parameter order, which differs between the two
        # implementations (e.g. TEGroupedMLP vs SequentialMLP experts): never map it by position
        raise ConfigError(f"{path}: distributed-optimizer state in 'dp_reshardable' format saved "
                         f"with transformer_impl={saved_impl} cannot load into transformer_impl="
                         f"{cfg.transformer_impl} (parameter order differs); resume with "
                         f"--no-load-optim (weights, lambda, scheduler and data position are "
                         f"still restored; Adam moments restart) or with --transformer-impl "
                         f"{saved_impl}")
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


def load_checkpoint(path: str, model, optimizer, scheduler, controller, cfg,
                    vocab_size: Optional[int] = None) -> dict:
    """Load `path` (a checkpoint directory) into the current layout; returns the common state
    (iteration, consumed_train_samples, layout, config, ...). A checkpoint of another model shape
    (or padded vocabulary, `vocab_size`) raises ConfigError before any tensor is read. The
    sparsity controller's state comes with the model (its routers' `_extra_state`) and is then
    synced to every rank."""
    common = load_common_state(path)
    check_checkpoint_matches(path, common, cfg, vocab_size)
    metadata = dist_checkpointing.load_content_metadata(path) or sharded_metadata()
    saved, now = common.get("layout") or {}, parallel_layout(cfg)
    same_layout = saved == now
    if not cfg.no_load_optim:
        check_optimizer_reshardable(path, saved, now, common.get("config") or {}, cfg, metadata)
    with_rng = same_layout and not cfg.no_load_rng
    if not same_layout and not cfg.no_load_rng:
        info0(logger, f"checkpoint: parallel layout changed ({common.get('layout')} -> "
                      f"{parallel_layout(cfg)}): the state is re-sharded, RNG states are not restored")
    with_optimizer = not cfg.no_load_optim
    sd = build_state_dict(model, optimizer, is_loading=True, with_optimizer=with_optimizer,
                          with_rng=with_rng, metadata=metadata)
    state = load_sharded(sd, path, common)
    model = unwrap_model(model)
    if len(model) == 1:
        model[0].load_state_dict(state["model"], strict=True)
    else:
        for i, chunk in enumerate(model):
            chunk.load_state_dict(state[f"model{i}"], strict=True)
    scheduler.load_state_dict(common["opt_param_scheduler"])
    if with_optimizer:
        # no_grad: megatron-core's distributed optimizer copies into fp32 main params that are views
        # of the (grad-requiring) model params; autograd refuses that in-place copy otherwise
        with torch.no_grad():
            optimizer.load_state_dict(state["optimizer"])
        restore_torch_adam_steps(optimizer, state["optimizer"])
    else:
        # fresh optimizer: the fp32 master weights must follow the loaded model weights
        optimizer.reload_model_params()
    if with_rng:
        restore_rng_state(state["rng_state"])
    if controller is not None:  # the routers loaded its state; ranks without routers get it too
        controller.sync_state()
    return common
