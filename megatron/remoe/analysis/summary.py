"""Per-layer routing statistics of routing maps (numpy): the trainer's RoutingStats, the per-layer
summary table, and routing flips between two checkpoints."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from megatron.remoe.analysis.capture import RoutingCapture
from megatron.remoe.analysis.errors import AnalysisError
from megatron.remoe.routing_stats import RoutingStats


def routing_stats(routing: np.ndarray, layer_numbers: Sequence[int]):
    """The trainer's `RoutingStats` of a routing map [L, N, E] (same derived metrics/names)."""
    L, N, E = routing.shape
    tpe = routing.sum(axis=1).astype(np.int64)  # [L, E]
    k = routing.sum(axis=2)  # [L, N]
    hist = np.stack([np.bincount(k[l], minlength=E + 1) for l in range(L)]) if L else \
        np.zeros((0, E + 1), np.int64)
    sparsity = 1.0 - float(tpe.sum()) / max(L * N * E, 1)
    return RoutingStats(sparsity=sparsity, l1_coeff=float("nan"), l1_reg_loss=float("nan"),
                        layer_numbers=list(layer_numbers),
                        tokens_per_expert=torch.from_numpy(tpe),
                        experts_per_token_hist=torch.from_numpy(hist.astype(np.int64)),
                        tokens=torch.full((L,), N, dtype=torch.int64))


def layer_summary(routing: np.ndarray, layer_numbers: Sequence[int]) -> list:
    """Per MoE layer: sparsity, mean experts per token, zero-expert-token fraction, dead experts
    (no analysed token routed to them), max/mean expert load and the experts-per-token
    histogram."""
    stats = routing_stats(routing, layer_numbers)
    rows = []
    for i, layer in enumerate(layer_numbers):
        load = stats.tokens_per_expert[i]
        dead = [int(e) for e in np.flatnonzero(load.numpy() == 0)]
        rows.append({
            "layer": int(layer), "tokens": int(stats.tokens[i]),
            "sparsity": float(stats.layer_sparsity[i]),
            "experts_per_token": float(stats.mean_experts_per_token[i]),
            "zero_expert_fraction": float(stats.zero_expert_fraction[i]),
            "dead_experts": len(dead), "dead_expert_ids": " ".join(map(str, dead)),
            "max_over_mean_load": float(stats.max_over_mean_load[i]),
            "experts_per_token_hist": " ".join(str(int(x))
                                               for x in stats.experts_per_token_hist[i]),
        })
    return rows



def flip_rates(a: RoutingCapture, b: RoutingCapture) -> list:
    """Per layer, on the same tokens: the fraction whose routed expert SET differs between the
    two captures, and the fraction whose top-1 expert (largest gate; 'none' for zero experts)
    differs. For a TopK k=1 model both numbers are the same."""
    if a.routing.shape != b.routing.shape or a.layer_numbers != b.layer_numbers:
        raise AnalysisError(
            f"cannot compare routing of {a.label} ({len(a.layer_numbers)} MoE layers x "
            f"{a.num_experts} experts, {a.num_tokens:,} tokens) with {b.label} "
            f"({len(b.layer_numbers)} x {b.num_experts}, {b.num_tokens:,} tokens): the models "
            "must have the same MoE layers and experts")
    if not np.array_equal(a.token_ids, b.token_ids):
        raise AnalysisError(f"{a.label} and {b.label} were not run on the same tokens")
    rows = []
    for l, layer in enumerate(a.layer_numbers):
        changed = (a.routing[l] != b.routing[l]).any(axis=1)
        rows.append({"layer": int(layer), "tokens": int(a.num_tokens),
                     "set_flip_rate": float(changed.mean()) if a.num_tokens else float("nan"),
                     "top1_flip_rate": float((a.top1[l] != b.top1[l]).mean())
                     if a.num_tokens else float("nan")})
    return rows

