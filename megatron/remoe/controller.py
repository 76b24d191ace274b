"""The adaptive coefficient of ReMoE's L1 regulariser (paper Sec. 3.3, Eqs. 6-8): the
SparsityController.

* The training loss is `L_lm + lambda * L_reg` (Eq. 6); the routers add `lambda * term` through
  megatron-core's aux-loss autoscaler (router.py, the term: regularizer.py).
* lambda follows `lambda <- lambda * alpha^sign(target - S)` (Eq. 7) once per optimizer step, where
  S (Eq. 8) is ONE global sparsity: all MoE layers, all micro-batches, all ranks (DP, TP/SP, CP, PP,
  EP). At S == target, where sign(0) = 0 would keep lambda, lambda is divided, as in the reference
  implementation. That is the default; steadier rules for small batches are options in
  lambda_rules.py.
"""

from __future__ import annotations

import numbers
from typing import Optional

import torch
import torch.distributed as dist

from megatron.remoe.errors import ConfigError
from megatron.remoe.lambda_rules import (
    PAPER_L1_COEFF_INIT,
    PAPER_L1_COEFF_MULTIPLIER,
    ControllerOptions,
    build_rule,
)
from megatron.remoe.routing_stats import RoutingStats, stats_width


class SparsityController:
    """One fp32 lambda shared by every MoE layer, adapted once per step towards a target sparsity.

    Routers call `record(...)` on every training forward (on-device accumulation, no host sync);
    once per optimizer step `optimizer_stepped(applied)` (installed on the optimizer by
    `megatron.remoe.integration.attach`, the one owner of when lambda moves) reduces the counts over
    all ranks with a single all-reduce, updates lambda identically on every rank if the step was
    applied everywhere, and keeps the statistics in `last_stats`.

    The controller is not a module (Float16Module would cast lambda to bf16); its state travels in
    checkpoints as the `_extra_state` of every ReLURouter (router.py), so any megatron-core
    dist-checkpoint carries it. `sync_state()` gives ranks without routers (a dense-only pipeline
    stage) the state the routers loaded.
    """

    def __init__(self, num_layers: int, num_experts: int, target_sparsity: float,
                 l1_coeff_init: float = PAPER_L1_COEFF_INIT,
                 multiplier: float = PAPER_L1_COEFF_MULTIPLIER,
                 device: Optional[torch.device] = None,
                 group: Optional[dist.ProcessGroup] = None,
                 options: Optional[ControllerOptions] = None):
        self.num_layers = num_layers
        self.num_experts = num_experts
        self.target_sparsity = float(target_sparsity)
        self.multiplier = float(multiplier)
        self.device = device or torch.device("cpu")
        self.group = group  # None = the default (world) group
        self.l1_coeff = torch.tensor(l1_coeff_init, dtype=torch.float32, device=self.device)
        # the update rule (lambda_rules.py): the paper's unless --moe-relu-l1-reg-coeff-controller
        self.rule = build_rule(self.target_sparsity, self.multiplier, options)
        self.counts = torch.zeros(num_layers, stats_width(num_experts), dtype=torch.int64,
                                  device=self.device)
        self.reg_sum = torch.zeros(num_layers, dtype=torch.float64, device=self.device)
        self.reg_group_size = 1  # tokens of one micro-batch are split over this many ranks
        self.steps = 0
        # True once the global sparsity has reached the target (end of Stage II); ends the optional
        # Stage I dispatch bound.
        self.reached_target = False
        self.last_stats: Optional[RoutingStats] = None  # of the last step() / report()
        self.local_routers = 0  # ReLURouters of this rank counting into this controller
        self.synced = False  # sync_state() ran (the attach hook runs it before the first update)

    # ---- called by the routers -------------------------------------------------------------
    def register_router(self) -> None:
        """A ReLURouter of this rank counts into this controller (and carries its state)."""
        self.local_routers += 1

    def layer_row(self, layer_number) -> int:
        """The row of the statistics that a router with `layer_number` counts into.

        megatron-core numbers layers from 1, globally (pipeline and virtual-stage offsets
        included): layer n counts into row n - 1, the same row on every rank. A one-layer
        controller also takes an unset number or 0 (a standalone MoELayer, as in megatron-core's
        own unit tests). Anything else is refused with the fix, never counted into another row."""
        if self.num_layers == 1 and layer_number in (None, 0, 1):
            return 0
        if layer_number is None:
            raise ConfigError(
                f"a ReLURouter has no layer number, so its routing cannot be counted in the "
                f"{self.num_layers}-layer sparsity controller; fix: call "
                f"moe_layer.set_layer_number(n) with its 1-based layer number n "
                f"(1..{self.num_layers}) before the first forward (megatron-core's "
                f"TransformerLayer does this)")
        if isinstance(layer_number, bool) or not isinstance(layer_number, numbers.Integral) or \
                not 1 <= layer_number <= self.num_layers:
            hint = " (megatron-core numbers layers from 1)" if layer_number == 0 else ""
            raise ConfigError(
                f"layer_number={layer_number!r} is outside the sparsity controller's layers "
                f"1..{self.num_layers}{hint}; fix: number MoE layers 1..num_layers globally, with "
                f"pipeline offsets, as megatron-core's TransformerLayer does, or build the "
                f"controller with num_layers >= {layer_number!r}")
        return int(layer_number) - 1

    def record(self, layer_number: int, routing_map: torch.Tensor,
               valid_mask: Optional[torch.Tensor], reg_term: Optional[torch.Tensor],
               reg_group_size: int = 1,
               tokens_per_expert: Optional[torch.Tensor] = None) -> None:
        """Accumulate one layer's routing on one micro-batch (layer_number is 1-based, global).

        `tokens_per_expert` ([E], this rank's counts) may be passed when the caller computed it;
        `routing_map` must then already be False for padding tokens."""
        E = self.num_experts
        if routing_map.device != self.device:  # built before the model moved to its device
            self.to(routing_map.device)
        # Only fixed-shape device ops here (no bincount, no boolean indexing): both would force a
        # host-device synchronisation per layer on GPUs.
        with torch.no_grad():
            premasked = valid_mask is None or tokens_per_expert is not None
            active = routing_map if premasked else routing_map & valid_mask.unsqueeze(-1)
            per_token = active.sum(dim=1)
            index = self.layer_row(layer_number)
            row = self.counts[index]
            if valid_mask is None:
                row[E:2 * E + 1].scatter_add_(0, per_token, torch.ones_like(per_token))
                row[2 * E + 1] += per_token.shape[0]
            else:
                # padding tokens add 0 to bin 0
                row[E:2 * E + 1].scatter_add_(0, per_token, valid_mask.to(per_token.dtype))
                row[2 * E + 1] += valid_mask.sum()
            row[:E] += active.sum(dim=0) if tokens_per_expert is None else tokens_per_expert
            row[2 * E + 2] += 1
            if reg_term is not None:
                self.reg_sum[index] += reg_term.detach().to(torch.float64)
        self.reg_group_size = reg_group_size

    # ---- called by the trainer -------------------------------------------------------------
    def optimizer_stepped(self, applied: bool) -> Optional[RoutingStats]:
        """The attach hook, once per optimizer step on every rank: `step()` if the optimizer
        applied the step on every rank (agreed in the same all-reduce), else `report()`. The
        first call syncs the state over ranks first (`sync_state`)."""
        if not self.synced:
            self.sync_state()
        return self._reduce(update=True, applied=applied)

    def step(self) -> Optional[RoutingStats]:
        """Reduce this step's counts over all ranks, update lambda, reset. None if nothing ran."""
        return self._reduce(update=True)

    def report(self) -> Optional[RoutingStats]:
        """`step()` without the lambda update (a step that is not applied): the counts are reduced
        over all ranks and reset as usual; lambda, the step count and the rule's state stay."""
        return self._reduce(update=False)

    def sync_state(self) -> None:
        """Every rank takes the state of the lowest rank that has ReLU routers. After a checkpoint
        load, ranks whose pipeline stage has no MoE layer never saw the routers' `_extra_state`;
        every rank must call this (one all-gather of a few numbers)."""
        self.synced = True
        if not (dist.is_available() and dist.is_initialized()) or \
                dist.get_world_size(self.group) == 1:
            return
        mine = (self.local_routers > 0, self.plain_state(self.state_dict()))
        gathered = [None] * dist.get_world_size(self.group)
        dist.all_gather_object(gathered, mine, group=self.group)
        source = next((state for has_routers, state in gathered if has_routers), None)
        if source is not None:
            self.load_state_dict(source)

    def to(self, device) -> "SparsityController":
        """Move lambda and the accumulators (empty between steps) to `device`."""
        self.device = torch.device(device)
        self.l1_coeff = self.l1_coeff.to(self.device)
        self.counts = self.counts.to(self.device)
        self.reg_sum = self.reg_sum.to(self.device)
        return self

    def _reduce(self, update: bool, applied: bool = True) -> Optional[RoutingStats]:
        # the last entry counts the ranks whose optimizer skipped the step
        skipped = torch.full((1,), float(not applied), dtype=torch.float64, device=self.device)
        counts = torch.cat([self.counts.flatten().to(torch.float64), self.reg_sum, skipped])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size(self.group) > 1:
            # Counts are integers < 2^53: the float64 sum is exact and identical on every rank.
            dist.all_reduce(counts, group=self.group)
        L, W, E = self.num_layers, stats_width(self.num_experts), self.num_experts
        table = counts[: L * W].round().to(torch.int64).view(L, W).cpu()
        reg_sum = counts[L * W:-1].cpu()
        update = update and not float(counts[-1])
        self.counts.zero_()
        self.reg_sum.zero_()
        layers = [i for i in range(L) if table[i, 2 * E + 2] > 0]
        self.last_stats = None
        if not layers:
            return None
        table = table[layers]
        total_active = int(table[:, :E].sum())
        total_entries = int(table[:, 2 * E + 1].sum()) * E
        sparsity = 1.0 - total_active / max(total_entries, 1)
        # Forward calls were counted on every rank that shares a micro-batch's tokens.
        calls = table[:, 2 * E + 2].double() / self.reg_group_size
        l1_reg = float((reg_sum[layers] / calls.clamp(min=1)).mean())
        used = float(self.l1_coeff)
        if update:
            self.update(sparsity, tokens=float(table[:, 2 * E + 1].double().mean()))
        self.last_stats = RoutingStats(
            sparsity=sparsity, l1_coeff=used, l1_reg_loss=l1_reg,
            layer_numbers=[i + 1 for i in layers], tokens_per_expert=table[:, :E],
            experts_per_token_hist=table[:, E:2 * E + 1], tokens=table[:, 2 * E + 1])
        return self.last_stats

    def update(self, sparsity: float, tokens: Optional[float] = None) -> None:
        """One lambda update from the step's global sparsity and its tokens per MoE layer. The
        paper's rule: lambda <- lambda * alpha if S < target else lambda / alpha (equality
        divides); the other rules are in lambda_rules.py."""
        self.l1_coeff = self.rule.update(self.l1_coeff, sparsity, tokens, self.reached_target)
        self.reached_target = self.reached_target or sparsity >= self.target_sparsity
        self.steps += 1

    # ---- checkpointing ---------------------------------------------------------------------
    # The controller's state is saved as every ReLURouter's `_extra_state`; checkpoints of
    # earlier versions hold it in their common state under CHECKPOINT_KEY (an HF export's
    # conversion metadata uses the same key); lambda is its L1_COEFF_KEY entry.
    CHECKPOINT_KEY = "controller"
    L1_COEFF_KEY = "l1_coeff"

    def state_dict(self) -> dict:
        return {self.L1_COEFF_KEY: self.l1_coeff.detach().cpu().clone(), "steps": self.steps,
                "target_sparsity": self.target_sparsity, "multiplier": self.multiplier,
                "reached_target": self.reached_target,
                "rule": {"kind": self.rule.kind, **self.rule.state_dict()}}

    def load_state_dict(self, state: dict) -> None:
        """Restore from `state_dict()`, or from its `plain_state` form (lambda as a float)."""
        l1_coeff = torch.as_tensor(state[self.L1_COEFF_KEY])
        self.l1_coeff = l1_coeff.to(device=self.device, dtype=torch.float32).clone()
        self.steps = int(state["steps"])
        self.reached_target = bool(state.get("reached_target", False))
        # The configured rule decides; its state resumes only from a checkpoint of the same rule
        # (switching rules on resume starts the new rule's state afresh, see docs/training.md).
        rule = state.get("rule") or {"kind": "paper"}
        self.rule.load_state_dict(rule if rule.get("kind") == self.rule.kind else {})

    @classmethod
    def plain_state(cls, state: Optional[dict]) -> dict:
        """A saved `state_dict()` with tensors as floats (JSON-serialisable; {} for None)."""
        return {key: float(value) if isinstance(value, torch.Tensor) else value
                for key, value in (state or {}).items()}

    @classmethod
    def saved_l1_coeff(cls, state: Optional[dict]) -> Optional[float]:
        """lambda of a saved (or plain) controller state, None if there is none."""
        value = (state or {}).get(cls.L1_COEFF_KEY)
        return None if value is None else float(value)
