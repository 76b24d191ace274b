"""The quality-vs-compute sweep: ReMoE at multiples of its trained k (every method and form) and a
TopK checkpoint at k' = 1..E on the same tokens; its CSV and figure."""

from __future__ import annotations

import csv
import os
import time
from typing import Optional, Sequence

from megatron.remoe.analysis import pyplot
from megatron.remoe.dial_calibration.calibrate import calibrate_global, check_reached, greedy_per_layer
from megatron.remoe.dial_calibration.inputs import DialUsageError, load_model
from megatron.remoe.dial_calibration.measure import DialPoint, Evaluator
from megatron.remoe.logs import get_logger, quiet
from megatron.remoe.router import set_dial

logger = get_logger(__name__)


def sweep_relu(ev: Evaluator, base_point: DialPoint, base_cap, base_gates: dict,
               multiples: Sequence[float], methods: Sequence[str], forms: Sequence[str],
               tolerance: float, max_experts: Optional[int] = None) -> tuple:
    """ReMoE points at `multiples` x trained k for every method and form (per-layer: one greedy
    path per form through all targets); returns (points, skipped)."""
    k = ev.lm.tcfg.moe_router_topk
    base = base_point.experts_per_token
    points, skipped, targets = [], [], []
    for mult in multiples:
        target = mult * k
        if target > base * (1 + tolerance):
            skipped.append(f"{mult:g}x k = {target:g} experts/token: above the undialled "
                           f"{base:.4f}; thresholds >= 0 can only remove experts")
        else:
            targets.append((mult, min(target, base)))
    for method in methods:
        for form in forms:
            t0 = time.perf_counter()
            logger.info(f"dial: sweep {method} {form}: targets "
                        f"{', '.join(f'{t:.4g}' for _, t in targets)} experts/token")
            if method == "per-layer":
                path = greedy_per_layer(ev, [t for _, t in targets], form, max_experts,
                                        base_cap, base_gates, step=k / 16)
            for mult, target in targets:
                if method == "global":
                    dial, cap, got = calibrate_global(ev, target, form, max_experts, tolerance,
                                                      base_gates)
                    extra = {}
                else:
                    dial, cap, got, extra = path[target]
                check_reached(got, target, tolerance, method, form)
                p = ev.point("ReMoE", method, form, target, dial, cap=cap)
                p.extra.update(multiple=mult, **extra)
                logger.info(f"dial:   {mult:g}x k: {p.experts_per_token:.4f} experts/token, valid "
                            f"loss {p.valid_loss:.4f} ({p.valid_loss - base_point.valid_loss:+.4f})")
                points.append(p)
            logger.info(f"dial: sweep {method} {form} done in {time.perf_counter() - t0:.0f} s")
    set_dial(ev.lm.model, None)
    return points, skipped


def sweep_topk(path: str, eval_tokens, batch_size: int, tokenizer: Optional[str]) -> list:
    """A TopK checkpoint evaluated at k' = 1..E on the same tokens (rebuilt per k')."""
    first = load_model(path, tokenizer)
    if first.router not in ("topk", "topk-sigmoid-bias"):
        raise DialUsageError(f"--topk-load {path} is a {first.router} model, not TopK")
    E = first.tcfg.num_moe_experts
    points = []
    for k in range(1, E + 1):
        if k == first.tcfg.moe_router_topk:
            lm = first
        else:
            with quiet():  # the same checkpoint again: its loading lines were shown once
                lm = load_model(path, tokenizer, overrides={"moe_router_topk": k})
        p = Evaluator(lm, eval_tokens, batch_size).point("TopK", "topk", "-", topk=k)
        p.extra["trained_k"] = first.tcfg.moe_router_topk
        logger.info(f"dial: TopK k'={k}: {p.experts_per_token:.3f} experts/token, valid loss "
                    f"{p.valid_loss:.4f}")
        points.append(p)
    return points


CSV_FIELDS = ("model", "method", "form", "multiple", "target", "experts_per_token",
              "valid_loss", "forward_mflops_per_token", "expert_mflops_per_token",
              "zero_expert_token_fraction", "thresholds", "experts_per_token_per_layer")


def write_csv(path: str, points: Sequence[DialPoint]) -> None:
    domains = sorted({d for p in points for d in p.domain_loss})
    with open(path + ".tmp", "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(list(CSV_FIELDS) + [f"loss_{d}" for d in domains])
        for p in points:
            mult = p.extra.get("multiple", "")
            w.writerow([p.model, p.method, p.form, mult,
                        "" if p.target is None else f"{p.target:.6g}",
                        f"{p.experts_per_token:.6g}", f"{p.valid_loss:.6g}",
                        f"{p.forward_flops_per_token / 1e6:.6g}",
                        f"{p.expert_flops_per_token / 1e6:.6g}",
                        f"{p.zero_expert_token_fraction:.6g}",
                        ";".join(f"{t:.6g}" for t in p.thresholds),
                        ";".join(f"{x:.4g}" for x in p.experts_per_token_per_layer)]
                       + [f"{p.domain_loss[d]:.6g}" if d in p.domain_loss else ""
                          for d in domains])
    os.replace(path + ".tmp", path)


def sweep_figure(points: Sequence[DialPoint], title: str):
    """Validation loss vs active experts per token and vs forward FLOPs per token."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    series: dict = {}
    for p in points:
        if p.method == "undialled":
            continue
        key = "TopK (k' = 1..E)" if p.model == "TopK" else f"ReMoE {p.method} {p.form}"
        series.setdefault(key, []).append(p)
    undialled = [p for p in points if p.method == "undialled"]
    styles = {"ReMoE global cut": "o-", "ReMoE global shift": "o--",
              "ReMoE per-layer cut": "s-", "ReMoE per-layer shift": "s--"}
    for ax, xkey, xlabel in ((axes[0], "experts_per_token", "active experts per token "
                              "(mean over MoE layers)"),
                             (axes[1], "forward_flops_per_token", "forward MFLOPs per token")):
        scale = 1e6 if xkey == "forward_flops_per_token" else 1.0
        for key, ps in series.items():
            ps = sorted(ps + ([] if key.startswith("TopK") else undialled),
                        key=lambda p: getattr(p, xkey))
            ax.plot([getattr(p, xkey) / scale for p in ps], [p.valid_loss for p in ps],
                    "k^-" if key.startswith("TopK") else styles.get(key, "o-"),
                    label=key, markersize=4)
        for p in undialled:
            ax.plot([getattr(p, xkey) / scale], [p.valid_loss], "r*", markersize=12,
                    label="ReMoE as trained (tau = 0)")
        ax.set_xlabel(xlabel)
    return finish_loss_figure(fig, axes, title)


def finish_loss_figure(fig, axes, title: str, ymax: Optional[float] = None):
    """The two panels' common frame: loss axis, grid, legend, titles (this figure and the
    frontier's across models)."""
    for ax in axes:
        ax.set_ylabel("validation loss (nats/token)")
        if ymax is not None:  # deep cuts of the weaker forms would squash the curves that matter
            ax.set_ylim(top=ymax)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_title("loss vs active experts")
    axes[1].set_title("loss vs forward compute")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig
