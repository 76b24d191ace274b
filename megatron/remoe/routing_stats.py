"""Routing statistics of one optimizer step: the accumulator row layout, `RoutingStats` (the reduced
host values: global sparsity S of the paper's Eq. 8, per-layer loads and experts-per-token
histograms) and `RoutingWindow` (sums over a logging window). The SparsityController
(controller.py) fills and reduces them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


# Layout of one layer's row in the routing statistics accumulator (int64 counts).
#   [0, E)          tokens routed to expert e
#   [E, 2E + 1)     histogram of experts per token (0..E)
#   2E + 1          valid tokens
#   2E + 2          forward calls counted (micro-batches, per rank)
def stats_width(num_experts: int) -> int:
    return 2 * num_experts + 3


@dataclass
class RoutingStats:
    """Routing statistics of one optimizer step, reduced over all ranks (host values)."""

    sparsity: float  # global: zero entries / all entries of the routing maps
    l1_coeff: float  # lambda used during this step
    l1_reg_loss: float  # mean over MoE layers and micro-batches of the L1 term (paper's L_reg)
    layer_numbers: list  # global 1-based layer numbers of the MoE layers
    tokens_per_expert: torch.Tensor  # [L, E] int64
    experts_per_token_hist: torch.Tensor  # [L, E + 1] int64
    tokens: torch.Tensor  # [L] int64

    @property
    def layer_sparsity(self) -> torch.Tensor:
        E = self.tokens_per_expert.shape[1]
        active = self.tokens_per_expert.sum(dim=1).double()
        return 1.0 - active / (self.tokens.double() * E).clamp(min=1)

    @property
    def mean_experts_per_token(self) -> torch.Tensor:
        return self.tokens_per_expert.sum(dim=1).double() / self.tokens.double().clamp(min=1)

    @property
    def zero_expert_fraction(self) -> torch.Tensor:
        return self.experts_per_token_hist[:, 0].double() / self.tokens.double().clamp(min=1)

    @property
    def max_over_mean_load(self) -> torch.Tensor:
        load = self.tokens_per_expert.double()
        return load.max(dim=1).values / load.mean(dim=1).clamp(min=1e-12)

    def as_dict(self) -> dict:
        """Flat scalars for loggers (JSONL, TensorBoard, W&B)."""
        out = {"moe_relu_sparsity": self.sparsity, "moe_relu_l1_reg_coeff": self.l1_coeff,
               "l1_reg_loss": self.l1_reg_loss}
        for i, layer in enumerate(self.layer_numbers):
            out[f"moe/layer_{layer}/sparsity"] = float(self.layer_sparsity[i])
            out[f"moe/layer_{layer}/experts_per_token"] = float(self.mean_experts_per_token[i])
            out[f"moe/layer_{layer}/zero_expert_tokens"] = float(self.zero_expert_fraction[i])
            out[f"moe/layer_{layer}/max_mean_load"] = float(self.max_over_mean_load[i])
        return out


class RoutingWindow:
    """Sums RoutingStats over a logging window, for metrics that need more than one step
    (dead experts: no token routed to them during the whole window)."""

    def __init__(self):
        self.tokens_per_expert = None
        self.layer_numbers = None
        self.steps = 0

    def add(self, stats: Optional[RoutingStats]) -> None:
        if stats is None:
            return
        if self.tokens_per_expert is None or self.layer_numbers != stats.layer_numbers:
            self.tokens_per_expert = stats.tokens_per_expert.clone()
            self.layer_numbers = list(stats.layer_numbers)
            self.steps = 1
        else:
            self.tokens_per_expert += stats.tokens_per_expert
            self.steps += 1

    def dead_experts(self) -> dict:
        """{layer_number: [expert ids that received no token in the window]}."""
        if self.tokens_per_expert is None:
            return {}
        return {layer: [int(e) for e in torch.nonzero(row == 0).flatten()]
                for layer, row in zip(self.layer_numbers, self.tokens_per_expert)}

    def as_dict(self) -> dict:
        return {f"moe/layer_{layer}/dead_experts": len(dead)
                for layer, dead in self.dead_experts().items()}

    def reset(self) -> None:
        self.__init__()
