"""Stages of a ReLU-routed run, read from its per-step sparsity: smoothing, the Stage II and III
boundaries, the settling time, Stage III steadiness, and the TopK steps that match the extra
compute of Stages I and II (definitions in docs/results.md)."""

from __future__ import annotations

import math
from typing import Optional


def smooth(values: list, window: int) -> list:
    """Centred moving average; the window shrinks at both ends (window 1: unchanged)."""
    h = window // 2
    n = len(values)
    out = []
    for t in range(n):
        lo, hi = max(0, t - h), min(n, t + h + 1)
        out.append(sum(values[lo:hi]) / (hi - lo))
    return out


def sparsity_stages(sparsity: list, target: float, tol: float = 0.01, window: int = 20,
                    first_step: int = 1) -> dict:
    """Stage boundaries of a ReLU run from its per-step sparsity (steps numbered from first_step).

    With m = the centred moving average of the sparsity over `window` steps:
      * reach  = first step with |m - target| <= tol: Stage III starts here;
      * settle = first step from which |m - target| <= tol holds until the end of the trace
                 (the settling time); None if the last step is outside the band;
      * stage2 = Stage II start, read from a short centred mean m' (min(window, 5) steps: the
                 Stage I dip lasts only a few steps): after the lowest m' before `reach` (lo),
                 the last step before `reach` with m' <= lo + 0.1 * (target - lo), plus one (the
                 rise begins); Stage I is [first_step, stage2).
    Without `reach`, stage2 is computed over the whole trace and Stage III is absent.
    """
    if not sparsity:
        return {"stage2": None, "reach": None, "settle": None}
    m = smooth(list(sparsity), window)
    inside = [abs(x - target) <= tol + 1e-12 for x in m]  # 1e-12: float rounding at the edge
    reach = next((t for t, ok in enumerate(inside) if ok), None)
    settle = None
    if inside[-1]:
        settle = len(m) - 1
        while settle > 0 and inside[settle - 1]:
            settle -= 1
    end = reach if reach is not None else len(m)
    stage2 = None
    if end > 0:
        short = smooth(list(sparsity), min(window, 5))
        lo_at = min(range(end), key=lambda t: short[t])
        lo = short[lo_at]
        level = lo + 0.1 * (target - lo)
        below = [t for t in range(lo_at, end) if short[t] <= level]
        stage2 = (below[-1] + 1) if below else lo_at
        stage2 = min(stage2, end)
    shift = lambda t: None if t is None else t + first_step  # noqa: E731
    return {"stage2": shift(stage2), "reach": shift(reach), "settle": shift(settle)}


def stage3_steadiness(sparsity: list, lambdas: list, reach_index: Optional[int]) -> dict:
    """Std of the per-step sparsity and range of log10 lambda from the start of Stage III
    (index into the traces) to the end; None without Stage III."""
    if reach_index is None or reach_index >= len(sparsity) - 1:
        return {"stage3_sparsity_std": None, "stage3_log10_lambda_range": None}
    tail = sparsity[reach_index:]
    mean = sum(tail) / len(tail)
    std = math.sqrt(sum((x - mean) ** 2 for x in tail) / (len(tail) - 1))
    logs = [math.log10(x) for x in lambdas[reach_index:] if x]
    return {"stage3_sparsity_std": std,
            "stage3_log10_lambda_range": (max(logs) - min(logs)) if logs else None}



def compute_match_extra_steps(sparsity: list, num_experts_total: int, k_total: int,
                              moe_share: float, stage3_start: Optional[int],
                              first_step: int = 1) -> float:
    """TopK steps that equal ReMoE's extra compute in Stages I and II.

    extra = sum over steps t < stage3_start of max(a_t - k, 0) / k * moe_share, with
    a_t = E*G * (1 - S_t) the measured active experts per token, k = k*G, and moe_share the
    experts' share of a TopK step's training FLOPs. One TopK step costs 1 in these units (the
    router and everything else cost the same in both models). Without Stage III, every step
    counts."""
    end = len(sparsity) if stage3_start is None else max(stage3_start - first_step, 0)
    total = 0.0
    for s in sparsity[:end]:
        a = num_experts_total * (1.0 - s)
        total += max(a - k_total, 0.0) / k_total
    return total * moe_share
