"""Figures of a collected grid under <out>/plots/: validation loss per run, ReLU sparsity and
lambda with the three stages, final loss vs E and vs G. matplotlib is an optional dependency
(the `plots` extra), loaded by `analysis.figures.pyplot` when plotting."""

from __future__ import annotations

import os

from megatron.remoe.ablation.grid import Grid
from megatron.remoe.analysis.figures import pyplot

STYLES = ["-", "--", ":", "-."]  # one line style per seed


def make_plots(grid: Grid, records: list, rows: list, traces: dict) -> list:
    """Write the figures; returns their paths."""
    plt = pyplot()
    out = os.path.join(grid.out, "plots")
    os.makedirs(out, exist_ok=True)
    groups = list(dict.fromkeys(r["group"] for r in records))
    colors = {g: plt.cm.tab10(i % 10) for i, g in enumerate(groups)}
    seeds = list(dict.fromkeys(r["seed"] for r in records))
    written = [_plot_valid_loss(grid, records, traces, colors, seeds, out)]
    relu = [r for r in records if r["router"] == "relu" and "sparsity" in traces[r["name"]]]
    if relu:
        written.append(_plot_sparsity_lambda(grid, relu, traces, colors, seeds, out))
    for axis, label in (("num_experts", "E"), ("moe_granularity", "G")):
        if len(grid.axes.get(axis, [])) >= 2:
            written.append(_plot_loss_vs_axis(grid, rows, axis, label, out))
    return written


def _plot_valid_loss(grid: Grid, records: list, traces: dict, colors: dict, seeds: list,
                     out: str) -> str:
    """Validation loss curves, one line per run."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for r in records:
        t = traces[r["name"]]
        if t["valid_step"]:
            ax.plot(t["valid_step"], t["valid_loss"], STYLES[seeds.index(r["seed"]) % 4],
                    marker="o", ms=3, color=colors[r["group"]],
                    label=f"{r['group']} (seed {r['seed']})")
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss")
    ax.set_title(f"{grid.name}: validation loss per run")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, os.path.join(out, "valid_loss.png"))


def _plot_sparsity_lambda(grid: Grid, relu: list, traces: dict, colors: dict, seeds: list,
                          out: str) -> str:
    """Sparsity (smoothed; raw faint) and lambda of the ReLU runs with their stage boundaries."""
    plt = pyplot()
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(7.5, 6), sharex=True)
    for r in relu:
        t = traces[r["name"]]
        c = colors[r["group"]]
        ls = STYLES[seeds.index(r["seed"]) % 4]
        a1.plot(t["step"], t["sparsity"], color=c, alpha=0.2, lw=0.7)
        a1.plot(t["step"], t["sparsity_smooth"], ls, color=c, lw=1.3,
                label=f"{r['group']} (seed {r['seed']})")
        a2.semilogy(t["step"], t["lambda"], ls, color=c, lw=1.2)
        for key in ("stage2", "reach"):
            if t["stages"][key] is not None:
                for a in (a1, a2):
                    a.axvline(t["stages"][key], color=c, ls=":", lw=0.8)
    targets = sorted({r["target_sparsity"] for r in relu})
    for tgt in targets:
        a1.axhline(tgt, color="k", lw=0.8, ls="--")
        a1.axhspan(tgt - grid.settle_tol, tgt + grid.settle_tol, color="k", alpha=0.07)
    if len({r["group"] for r in relu}) == 1:
        _shade_stages(relu, traces, a1, a2)
    a1.set_ylabel(f"sparsity ({grid.settle_window}-step mean; raw faint)")
    a1.set_title(f"{grid.name}: ReLU sparsity and lambda (target ± {grid.settle_tol})")
    a1.legend(fontsize=7)
    a1.grid(alpha=0.3)
    a2.set_ylabel("lambda (L1 coefficient)")
    a2.set_xlabel("step")
    a2.grid(alpha=0.3)
    return _save(fig, os.path.join(out, "sparsity_lambda.png"))


def _shade_stages(relu: list, traces: dict, a1, a2) -> None:
    """One ReLU group: shade Stages I, II and III at the mean boundaries over its seeds."""
    s2 = [traces[r["name"]]["stages"]["stage2"] for r in relu]
    s3 = [traces[r["name"]]["stages"]["reach"] for r in relu]
    end = max(traces[r["name"]]["step"][-1] for r in relu)
    if not all(x is not None for x in s2 + s3):
        return
    b2, b3 = sum(s2) / len(s2), sum(s3) / len(s3)
    for (lo, hi, label, col) in ((1, b2, "I", "tab:blue"), (b2, b3, "II", "tab:orange"),
                                 (b3, end, "III", "tab:green")):
        for a in (a1, a2):
            a.axvspan(lo, hi, color=col, alpha=0.06)
        a1.text((lo + hi) / 2, 0.02, f"Stage {label}", ha="center", fontsize=8,
                transform=a1.get_xaxis_transform())


def _plot_loss_vs_axis(grid: Grid, rows: list, axis: str, label: str, out: str) -> str:
    """Final validation loss (mean ± std over seeds) vs E or G, one line per router; a router
    without that axis (dense) is a horizontal line."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    routers = list(dict.fromkeys(r["router"] for r in rows))
    for router in routers:
        pts = sorted((r[axis], r["final_valid_loss"], r.get("final_valid_loss_std", 0))
                     for r in rows if r["router"] == router and r.get(axis) is not None
                     and r.get("final_valid_loss") is not None)
        flat = [r for r in rows if r["router"] == router and r.get(axis) is None]
        if pts:
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], [p[2] for p in pts],
                        marker="o", capsize=3, label=router)
        elif flat and flat[0].get("final_valid_loss") is not None:
            ax.axhline(flat[0]["final_valid_loss"], ls="--", color="gray", label=router)
    ax.set_xscale("log", base=2)
    ax.set_xlabel(label)
    ax.set_ylabel("final validation loss (mean ± std over seeds)")
    ax.set_title(f"{grid.name}: final loss vs {label}")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, os.path.join(out, f"loss_vs_{label}.png"))


def _save(fig, path: str) -> str:
    plt = pyplot()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
