"""ReMoE in any megatron-core trainer: the layer spec plus one call.

    from megatron.remoe.integration import remoe_layer_spec, attach

    spec = remoe_layer_spec(config)              # Megatron-LM's --spec, Bridge's transformer_layer_spec
    model = ...                                  # the trainer builds GPTModel(config, spec, ...)
    optimizer = get_megatron_optimizer(...)
    controller = attach(model, optimizer)        # lambda moves once per applied optimizer step
    ...
    controller.last_stats.as_dict()              # the last step's routing statistics, for loggers

`config` is a `ReMoETransformerConfig` (megatron.remoe.config), or a wrapper holding one as
`.transformer` (megatron-core >= 0.19's GPTModelConfig). Lambda and the controller's state travel
in the model's own dist-checkpoint state (every ReLURouter's `_extra_state`), so whatever saves and
loads the model's sharded_state_dict saves and loads lambda too. The project's own trainer
(run_state.py, step.py) goes through the same two functions.
"""

from __future__ import annotations

import functools
import weakref
from typing import Optional

import torch
from megatron.core.utils import unwrap_model

from megatron.remoe.config import ReMoETransformerConfig, is_relu_routed, validate_relu_routing
from megatron.remoe.controller import SparsityController
from megatron.remoe.errors import ConfigError
from megatron.remoe.model import build_controller
from megatron.remoe.router import ReLURouter
from megatron.remoe.spec import check_routers, default_use_transformer_engine, get_block_spec

__all__ = ["attach", "controller_for", "remoe_layer_spec", "transformer_config_of"]

# one controller per config object and process: the spec function runs once per virtual-pipeline
# chunk and on every pipeline stage (dense-only ones included), and all of them share it
_CONTROLLERS: dict = {}


def transformer_config_of(config) -> ReMoETransformerConfig:
    """The ReMoETransformerConfig of `config` (itself, or a wrapper's `.transformer`)."""
    tcfg = getattr(config, "transformer", config)
    if not isinstance(tcfg, ReMoETransformerConfig):
        raise ConfigError(
            f"{type(tcfg).__name__} has no ReMoE fields; fix: build the model config as "
            "megatron.remoe.config.ReMoETransformerConfig(..., moe_relu_routing=True) (with "
            "megatron-core >= 0.19: GPTModelConfig(transformer=ReMoETransformerConfig(...)))")
    return tcfg


def _default_device() -> torch.device:
    # a controller on a rank without MoE layers never sees a routing map, but its all-reduce
    # must be on the backend's device (NCCL: the current GPU)
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def controller_for(config, device: Optional[torch.device] = None
                   ) -> Optional[SparsityController]:
    """The sparsity controller of `config` in this process (created on first use; None unless
    the config routes with ReLU)."""
    tcfg = transformer_config_of(config)
    if not is_relu_routed(tcfg):
        return None
    key = id(tcfg)
    entry = _CONTROLLERS.get(key)
    if entry is not None and entry[0]() is tcfg:
        return entry[1]
    controller = build_controller(tcfg, device or _default_device())

    def forget(ref, key=key):
        if _CONTROLLERS.get(key, (None,))[0] is ref:
            del _CONTROLLERS[key]

    _CONTROLLERS[key] = (weakref.ref(tcfg, forget), controller)
    return controller


def _use_transformer_engine(tcfg) -> bool:
    impl = getattr(tcfg, "transformer_impl", "transformer_engine")
    if impl == "local":
        return False
    if impl != "transformer_engine":
        raise ConfigError(f"transformer_impl={impl!r} is not supported by the ReMoE layer spec; "
                          "fix: use 'transformer_engine' or 'local'")
    # megatron-core's default: TE where it can run (TE imports and a GPU is present), local
    # layers otherwise (same model, megatron-core's unfused modules)
    return default_use_transformer_engine()


def remoe_layer_spec(config, vp_stage: Optional[int] = None):
    """megatron-core's GPT decoder block spec with ReLURouter in every MoE layer.

    Usable as Megatron-LM's `--spec` (a spec object up to megatron-core 0.18: call it in the
    entry script; 0.19 calls it with the config) and as Megatron-Bridge's
    `transformer_layer_spec` callable. `config`: a ReMoETransformerConfig or a wrapper with
    `.transformer`. The routers share the process's controller of that config (`controller_for`),
    the same for every virtual-pipeline chunk and pipeline stage.
    """
    tcfg = transformer_config_of(config)
    if is_relu_routed(tcfg):
        validate_relu_routing(tcfg)  # fields may have changed since construction (recipes)
    return get_block_spec(tcfg, controller_for(tcfg),
                          use_transformer_engine=_use_transformer_engine(tcfg), vp_stage=vp_stage)


def _chunks(model) -> list:
    return [unwrap_model(chunk) for chunk in (model if isinstance(model, (list, tuple))
                                              else [model])]


def _applied(result) -> bool:
    """megatron-core's optimizer.step() returns (update_successful, grad_norm, num_zeros)."""
    return bool(result[0]) if isinstance(result, tuple) else True


def attach(model, optimizer) -> Optional[SparsityController]:
    """Make lambda move exactly once per optimizer step: after `optimizer.step()` returns, on
    every rank (all ranks call the optimizer's step), after all micro-batches.

    `model`: a module or the list of chunks (DDP / Float16Module wrapped or bare) built with
    `remoe_layer_spec`; `optimizer`: megatron-core's MegatronOptimizer, ChainedOptimizer (dense +
    expert: one update) or distributed optimizer. A step the optimizer skips (inf/NaN gradients,
    fp16 loss-scale overflow: `step()` returns success False on any rank) reduces the routing
    statistics but leaves lambda, its step count and rule state unchanged. Before the first
    update the controller's state is synced over ranks (`SparsityController.sync_state`), so a
    checkpoint loaded before it reaches dense-only pipeline stages too; a trainer that loads a
    checkpoint later in the run calls `controller.sync_state()` on every rank after the load.

    Returns the SparsityController (None for a model that does not route with ReLU); its
    `last_stats` (a RoutingStats, or None) holds the last step's statistics for logging.
    Attaching the same controller again is a no-op.
    """
    chunks = _chunks(model)
    configs = {id(chunk.config): chunk.config for chunk in chunks}
    if len(configs) != 1:
        raise ConfigError("attach: the model chunks were built from different config objects; "
                          "fix: build every chunk from one ReMoETransformerConfig")
    tcfg = transformer_config_of(next(iter(configs.values())))
    check_routers(chunks, tcfg)
    controller = controller_for(tcfg)
    if controller is None:
        return None
    for chunk in chunks:
        for module in chunk.modules():
            if isinstance(module, ReLURouter) and module.controller is not controller:
                raise ConfigError("attach: the model's ReLU routers hold another controller "
                                  "than its config's; fix: build the model with "
                                  "remoe_layer_spec(config) (or controller_for(config))")
    _hook_optimizer_step(optimizer, controller)
    return controller


def _hook_optimizer_step(optimizer, controller: SparsityController) -> None:
    attached = getattr(optimizer, "_remoe_controller", None)
    if attached is controller:
        return
    if attached is not None:
        raise ConfigError("attach: this optimizer already moves another controller's lambda")
    step = optimizer.step

    @functools.wraps(step)
    def step_then_update_lambda(*args, **kwargs):
        result = step(*args, **kwargs)
        controller.optimizer_stepped(applied=_applied(result))
        return result

    optimizer.step = step_then_update_lambda
    optimizer._remoe_controller = controller
