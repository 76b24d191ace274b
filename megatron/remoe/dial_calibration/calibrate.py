"""Calibration: thresholds that hit a target number of realised experts per token, with one tau for
every MoE layer (`global`) or per-layer budgets chosen greedily by measured loss (`per-layer`)."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from megatron.remoe.dial import DialError, make_dial
from megatron.remoe.dial_calibration.measure import Evaluator
from megatron.remoe.logs import get_logger
from megatron.remoe.router import relu_routers, set_dial

logger = get_logger(__name__)


def count_at(gates: torch.Tensor, tau: float, cap: Optional[int]) -> float:
    """Mean experts per token of gates [N, E] under threshold tau (and cap)."""
    n = (gates > tau).sum(dim=-1)
    if cap is not None:
        n = n.clamp(max=cap)
    return float(n.float().mean())


def threshold_for(gates: torch.Tensor, budget: float, cap: Optional[int]) -> float:
    """The smallest-error tau >= 0 leaving `budget` experts per token in gates [N, E]: the
    midpoint between the two gate values the count steps across (exact up to ties)."""
    if count_at(gates, 0.0, cap) <= budget:
        return 0.0
    values = torch.unique(gates[gates > 0])  # ascending
    lo, hi = 0, len(values) - 1  # count_at(values[i]) decreases with i
    while lo < hi:  # first index whose count is <= budget
        mid = (lo + hi) // 2
        if count_at(gates, float(values[mid]), cap) <= budget:
            hi = mid
        else:
            lo = mid + 1
    above = float(values[lo])
    below = float(values[lo - 1]) if lo > 0 else 0.0
    c_above, c_below = count_at(gates, above, cap), count_at(gates, below, cap)
    # pick the side closer to the budget; between two gate values any tau gives the same count
    tau = above if abs(c_above - budget) <= abs(c_below - budget) else below
    nxt = float(values[lo + 1]) if tau == above and lo + 1 < len(values) else None
    if tau == above:
        return (above + nxt) / 2 if nxt is not None else above
    return (below + above) / 2


def calibrate_global(ev: Evaluator, target: float, form: str, max_experts: Optional[int],
                     tolerance: float, base_gates: dict, max_steps: int = 30):
    """One tau for every MoE layer: Illinois regula falsi on the realised experts per token,
    started from the tau that would hit the target if no layer changed the next one's input."""
    layers = [n for n, _ in relu_routers(ev.lm.model)]
    E = ev.lm.tcfg.num_moe_experts
    steps = []

    def f(tau):
        dial = make_dial(tau, layers, form, max_experts, E)
        cap, got = ev.measure(dial)
        logger.info(f"dial:   global {form} tau {tau:.5g}: {got:.4f} experts/token")
        steps.append((abs(got - target), dial, cap, got))
        return got - target

    def done():
        return min(steps, key=lambda x: x[0])[0] <= tolerance * target / 4

    guess = threshold_for(torch.cat([base_gates[n] for n in layers]), target, max_experts)
    g = f(guess)
    if not done():
        # bracket [lo, hi] with f(lo) > 0 > f(hi), stepping from the guess
        if g > 0:
            lo, f_lo, hi = guess, g, max(guess * 1.5, 1e-3)
            while not done():
                f_hi = f(hi)
                if f_hi <= 0 or hi > 1e6:
                    break
                lo, f_lo, hi = hi, f_hi, hi * 1.5
        else:
            hi, f_hi, lo, f_lo = guess, g, guess / 1.5, g
            while guess > 0 and not done():
                f_lo = f(lo)
                if f_lo >= 0 or lo == 0.0:
                    break
                hi, f_hi, lo = lo, f_lo, (lo / 1.5 if lo > 1e-6 * guess else 0.0)
        side = 0
        for _ in range(max_steps):
            if done() or f_lo <= 0 or f_hi >= 0:
                break
            tau = hi - f_hi * (hi - lo) / (f_hi - f_lo)
            if not lo < tau < hi:
                tau = (lo + hi) / 2
            g = f(tau)
            if g > 0:
                lo, f_lo = tau, g
                if side == 1:
                    f_hi /= 2
                side = 1
            else:
                hi, f_hi = tau, g
                if side == -1:
                    f_lo /= 2
                side = -1
            if hi - lo <= 1e-9 * hi:
                break
    _, dial, cap, got = min(steps, key=lambda x: x[0])
    return dial, cap, got


def _loss(cap) -> float:
    return sum(cap.loss_sum.values()) / max(sum(cap.loss_tokens.values()), 1)


def calibrate_layers(ev: Evaluator, budgets: Sequence[float], form: str,
                     max_experts: Optional[int], taus: Optional[list] = None, start: int = 0,
                     gates: Optional[dict] = None, quiet: bool = False) -> tuple:
    """tau_l hitting budget b_l in each MoE layer from index `start` on, in layer order (layers
    before `start` keep `taus`, their `gates` are reused). Layer l's gates depend only on the
    earlier layers' thresholds, so one pass per layer captures them (with tau_l = 0: ReLU(logits),
    and tau_l selects logits > tau_l in both forms). A layer that cannot reach its budget passes
    the shortfall on to the next. Returns (dial, {layer: gates under the earlier thresholds})."""
    layers = [n for n, _ in relu_routers(ev.lm.model)]
    E = ev.lm.tcfg.num_moe_experts
    taus = list(taus) if taus is not None else [0.0] * len(layers)
    gates = dict(gates or {})
    carry = 0.0
    for i in range(start, len(layers)):
        n = layers[i]
        trial = taus[:i] + [0.0] * (len(layers) - i)
        set_dial(ev.lm.model, make_dial(trial, layers, form, max_experts, E))
        _, captured = ev.run(capture_layers=[n])
        gates[n] = captured[n]
        want = budgets[i] + carry
        taus[i] = threshold_for(gates[n], want, max_experts)
        got = count_at(gates[n], taus[i], max_experts)
        carry = want - got
        if not quiet:
            logger.info(f"dial:   layer {n}: budget {want:.4f} -> tau {taus[i]:.5g} ({got:.4f} "
                        f"experts/token)")
    return make_dial(taus, layers, form, max_experts, E), gates


def greedy_per_layer(ev: Evaluator, targets: Sequence[float], form: str,
                     max_experts: Optional[int], base_cap, base_gates: dict,
                     step: float) -> dict:
    """Per-layer budgets by measured marginal loss: starting from the undialled model, remove
    `step` experts/token (mean over layers) at a time from the one layer where the measured loss
    increase per removed expert is smallest, re-calibrating the later layers to their budgets
    after each move; the state at each target (descending) is its dial.
    Returns {target: (dial, capture, realised experts/token, info)}."""
    layers = [n for n, _ in relu_routers(ev.lm.model)]
    E = ev.lm.tcfg.num_moe_experts
    L = len(layers)
    budgets = [float(x) for x in base_cap.routing.sum(axis=2).mean(axis=1)]
    taus, gates, loss = [0.0] * L, dict(base_gates), _loss(base_cap)
    state = (make_dial(taus, layers, form, max_experts, E), base_cap, sum(budgets) / L)
    if max_experts is not None:  # the cap alone already removes experts
        dial, gates = calibrate_layers(ev, [min(b, max_experts) for b in budgets], form,
                                       max_experts, quiet=True)
        taus = list(dial.thresholds)
        budgets = [count_at(gates[n], t, max_experts) for n, t in zip(layers, taus)]
        cap, got = ev.measure(dial)
        loss, state = _loss(cap), (dial, cap, got)
    out: dict = {}
    moves = []
    for target in sorted(targets, reverse=True):
        while sum(budgets) / L > target + 1e-9:
            total = min(step, sum(budgets) / L - target) * L
            best = None
            for i, n in enumerate(layers):
                d = min(total, budgets[i])
                if d <= 1e-9:
                    continue
                trial = list(taus)
                trial[i] = threshold_for(gates[n], budgets[i] - d, max_experts)
                cap, _ = ev.measure(make_dial(trial, layers, form, max_experts, E))
                cost = (_loss(cap) - loss) / d
                if best is None or cost < best[0]:
                    best = (cost, i, d)
            cost, i, d = best
            budgets[i] -= d
            dial, gates = calibrate_layers(ev, budgets, form, max_experts, taus, i, gates,
                                           quiet=True)
            taus = list(dial.thresholds)
            cap, got = ev.measure(dial)
            loss, state = _loss(cap), (dial, cap, got)
            moves.append({"layer": layers[i], "removed": d, "nats_per_expert": cost})
            logger.info(f"dial:   greedy {form}: -{d / L:.4f} experts/token from layer {layers[i]} "
                        f"({cost:+.4f} nats per expert/token): budgets "
                        f"{', '.join(f'{b:.3f}' for b in budgets)}, loss {loss:.4f}")
        out[target] = (*state, {"budgets": list(budgets), "moves": list(moves)})
    return out


def calibrate(ev: Evaluator, target: float, method: str, form: str,
              max_experts: Optional[int], tolerance: float, base_cap, base_gates: dict,
              step: Optional[float] = None) -> tuple:
    """-> (ComputeDial, capture at that dial, realised experts/token, extra info).
    `base_cap`, `base_gates`: the undialled pass (capture, {layer: gates})."""
    if method == "global":
        dial, cap, got = calibrate_global(ev, target, form, max_experts, tolerance, base_gates)
        extra = {}
    else:
        base = float(base_cap.routing.sum(axis=2).mean())
        step = step or max((base - target) / 8, 1e-3)
        dial, cap, got, extra = greedy_per_layer(ev, [target], form, max_experts, base_cap,
                                                 base_gates, step)[target]
    check_reached(got, target, tolerance, method, form)
    return dial, cap, got, extra


def check_reached(got: float, target: float, tolerance: float, method: str, form: str) -> None:
    if abs(got - target) > tolerance * target:
        raise DialError(f"calibration reached {got:.4f} experts/token, not {target:g} within "
                        f"{tolerance:.0%} ({method}, {form}); use more --tokens-per-domain")
