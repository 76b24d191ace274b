"""ReLU router (ReMoE): R(x) = ReLU(x W), variable number of experts per token.

Plugs into megatron-core's MoELayer through the layer spec's router slot (`MoESubmodules.router`).
Weight init, gating GEMM (with `moe_router_dtype`), TP gradient handling and checkpointing come from
megatron-core's `Router` base class.
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler, get_default_pg_collection
from megatron.core.transformer.moe.router import Router

from megatron.remoe.compat import call_with_supported_kwargs
from megatron.remoe.config import check_variable_k_dispatch
from megatron.remoe.controller import SparsityController
from megatron.remoe.dial import ComputeDial, DialError, dial_from_dict, dialled_gates, make_dial
from megatron.remoe.elastic import elastic_cut, fraction_of
from megatron.remoe.errors import ConfigError
from megatron.remoe.regularizer import l1_reg_loss


class ReLURouter(Router):
    """Routes each token to every expert whose ReLU gate is positive (0..E experts).

    No softmax, no top-k, no renormalisation: the raw ReLU value multiplies the expert output, so a
    token with no active expert gets an MoE output of exactly zero. Training adds
    `lambda * l1_reg_loss` through megatron-core's MoEAuxLossAutoScaler, so its gradient is scaled
    like any megatron aux loss (micro-batches, loss scale).
    """

    def __init__(self, config, pg_collection=None, controller: Optional[SparsityController] = None,
                 layer_number: Optional[int] = None, **kwargs):
        # megatron-core passes more with each release (0.17+: is_mtp_layer=; main: layer_number=);
        # the base class gets what its signature takes
        if pg_collection is None:
            pg_collection = get_default_pg_collection()
        if kwargs.get("is_mtp_layer"):
            raise ConfigError("ReLU routing in multi-token-prediction layers is not supported (the "
                              "sparsity controller counts the decoder's layers); drop "
                              "--mtp-num-layers or use a TopK router")
        check_variable_k_dispatch(config)  # the config may have changed since its construction
        call_with_supported_kwargs(super().__init__, config=config, pg_collection=pg_collection,
                                   **kwargs)
        self.topk = config.moe_router_topk
        self.load_balancing = getattr(config, "moe_relu_load_balancing", True)
        self.warmup_max_experts = getattr(config, "moe_relu_warmup_max_experts", None)
        # Held as a plain attribute list so it is neither a submodule nor cast by Float16Module.
        self._controller = [controller]
        self._loaded_controller_state: Optional[dict] = None  # without a controller (offline)
        if controller is not None:
            controller.register_router()
        if layer_number is not None:
            self.set_layer_number(layer_number)

    @property
    def controller(self) -> Optional[SparsityController]:
        return self._controller[0]

    # The controller's state (lambda, step count, rule state) is every ReLURouter's `_extra_state`:
    # megatron-core's sharded_state_dict makes it a ShardedObject per layer (replica 0 on TP/DP
    # rank 0), so any dist-checkpoint saves and loads it, whoever writes it.
    def get_extra_state(self) -> Optional[dict]:
        if self.controller is not None:
            return self.controller.state_dict()
        return self._loaded_controller_state

    def set_extra_state(self, state) -> None:
        if not isinstance(state, dict) or SparsityController.L1_COEFF_KEY not in state:
            return  # nothing saved (a model built without a controller)
        self._loaded_controller_state = state
        if self.controller is not None:
            self.controller.load_state_dict(state)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # A weights-only state dict (tensors copied from another model, as conversions and tests
        # do) leaves the controller as it is, as before its state moved into the routers.
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if prefix + "_extra_state" in missing_keys:
            missing_keys.remove(prefix + "_extra_state")

    def set_layer_number(self, layer_number: int) -> None:
        """Called by megatron-core's MoELayer/TransformerLayer while the model is built: a number
        the controller cannot place is refused here, not in the middle of a forward."""
        if self.controller is not None:
            self.controller.layer_row(layer_number)
        super().set_layer_number(layer_number)

    def routing(self, logits: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        """logits [S, B, E] -> probs [S*B, E] (ReLU values) and routing_map [S*B, E] (bool).

        padding_mask follows megatron-core's convention: True marks padding tokens, which get no
        expert and are excluded from the regulariser and the statistics.
        """
        logits = logits.view(-1, self.config.num_moe_experts)
        probs = torch.relu(logits)
        dial = getattr(self.config, "moe_relu_dial", None)
        if dial is not None:  # inference-time compute dial (megatron/remoe/dial.py)
            probs = dialled_gates(logits, probs, dial, self.layer_number, self.training)
        valid = None
        if padding_mask is not None:
            valid = ~padding_mask.reshape(-1).bool()
            probs = probs * valid.unsqueeze(-1).to(probs.dtype)
        routing_map = probs > 0

        controller = self.controller
        # Count each layer once per micro-batch: with activation recomputation the first forward
        # runs without grad and the recomputation with grad, so count only when grad is enabled.
        # The dialled pass of an elastic step with a full pass (elastic.py) adds neither the L1
        # term nor statistics: its step's full pass did.
        lm_only = getattr(self.config, "moe_relu_elastic_lm_only", False)
        if self.training and torch.is_grad_enabled() and not lm_only:
            tp_cp = self.tp_cp_group
            # One count per expert, shared by the regulariser and the statistics; probs and the
            # map already exclude padding tokens, so neither recomputes a mask.
            with torch.no_grad():
                local_counts = routing_map.sum(dim=0)
            reg = l1_reg_loss(probs, routing_map, self.topk, self.load_balancing, valid,
                              reduce_group=tp_cp, local_counts=local_counts)
            if controller is not None:
                l1_term = controller.l1_coeff.to(reg.dtype) * reg
                if self.config.calculate_per_token_loss:
                    # megatron-core then sets the aux-loss scale without 1/micro-batches and
                    # divides every gradient by the global token count. Its TopK router restores
                    # the default mode's aux gradient by the local tokens x TP*CP (0.19; 0.16
                    # omitted TP*CP, though its schedule and finalize divide the same way): so
                    # does the L1 term, whose sum over TP*CP is the micro-batch term.
                    local_tokens = valid.sum() if valid is not None else probs.shape[0]
                    l1_term = l1_term * (local_tokens * (tp_cp.size() if tp_cp is not None else 1))
                probs = MoEAuxLossAutoScaler.apply(probs, l1_term)
                controller.record(self.layer_number, routing_map, valid, reg,
                                  reg_group_size=tp_cp.size() if tp_cp is not None else 1,
                                  tokens_per_expert=local_counts)
        # Elastic training: after the L1 term and the statistics (both on the undialled gates),
        # the step's cut decides what is dispatched; deterministic, so a recomputed forward
        # dispatches the same experts.
        elastic = getattr(self.config, "moe_relu_elastic_budget", None)
        if elastic is not None and self.training:
            fraction = fraction_of(elastic, self.layer_number)
            if fraction is not None:
                probs, routing_map = elastic_cut(probs, routing_map, fraction)
        # The bound, unlike the count, applies in both passes of a recomputed forward: the no-grad
        # first pass produces the output the loss sees, the recomputation the one the backward
        # differentiates; they must dispatch the same experts. `reached_target` moves only in the
        # controller's once-per-step update, after the backward: both passes see the same value.
        if self.training and controller is not None and self.warmup_max_experts is not None \
                and not controller.reached_target:
            probs, routing_map = self._bound_experts(probs, routing_map)
        return probs, routing_map

    def _bound_experts(self, probs, routing_map):
        """Keep each token's `warmup_max_experts` largest gates for dispatch (Stage I memory)."""
        top = probs.detach().topk(self.warmup_max_experts, dim=-1).indices
        keep = torch.zeros_like(routing_map).scatter_(1, top, True) & routing_map
        return probs * keep.to(probs.dtype), keep

    def forward(self, input: torch.Tensor, padding_mask: Optional[torch.Tensor] = None,
                *args, **kwargs):
        # newer megatron-core also passes input_ids / packed_seq_params: routing does not use them
        logits = self.gating(input)
        return self.routing(logits, padding_mask=padding_mask)


def saved_controller_state(model) -> Optional[dict]:
    """The sparsity controller's state that a model's ReLU routers carry (their controller's, or
    what a checkpoint loaded into them); None for a model without ReLU routers."""
    chunks = model if isinstance(model, (list, tuple)) else [model]
    for chunk in chunks:
        for module in chunk.modules():
            if isinstance(module, ReLURouter):
                return module.get_extra_state()
    return None


def relu_routers(model) -> list:
    """[(layer_number, ReLURouter)] of a (possibly wrapped) megatron model, in layer order."""
    return sorted(((int(m.layer_number), m) for m in model.modules()
                   if isinstance(m, ReLURouter)), key=lambda x: x[0])


def set_dial(model, dial) -> Optional[ComputeDial]:
    """Dial a megatron model (None: undial). `dial`: a ComputeDial, its dict form, one global
    threshold or a list of per-MoE-layer thresholds. Returns the bound dial."""
    routers = relu_routers(model)
    if not routers:
        raise DialError("the model has no ReLU router: the compute dial applies to ReLU-routed "
                        "(ReMoE) models; for TopK change moe_router_topk")
    layer_numbers = [n for n, _ in routers]
    E = routers[0][1].config.num_moe_experts
    if dial is not None:
        if isinstance(dial, ComputeDial):
            dial = make_dial(dial.thresholds, layer_numbers, dial.form, dial.max_experts, E)
        elif isinstance(dial, dict):
            dial = dial_from_dict(dial, layer_numbers, E)
        else:
            dial = make_dial(dial, layer_numbers, num_experts=E)
    configs = {id(r.config): r.config for _, r in routers}
    model_config = getattr(model, "config", None)
    if model_config is not None and hasattr(model_config, "moe_relu_dial"):
        configs[id(model_config)] = model_config
    for cfg in configs.values():
        cfg.moe_relu_dial = dial
    return dial


def set_elastic_budget(model, budget, lm_only: bool = False) -> None:
    """The elastic cut the ReLU routers of `model` (chunks or one module) apply in training
    forwards: a fraction, {layer_number: fraction} or None (undialled); see elastic.py.
    `lm_only`: the forwards add no L1 term and no controller statistics (the dialled pass of a
    step with a full pass)."""
    chunks = model if isinstance(model, (list, tuple)) else [model]
    configs = {id(r.config): r.config for chunk in chunks for _, r in relu_routers(chunk)}
    for cfg in configs.values():
        cfg.moe_relu_elastic_budget = budget
        cfg.moe_relu_elastic_lm_only = lm_only
