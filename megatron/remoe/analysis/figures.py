"""The analysis figures (matplotlib, Agg backend): each `fig_*` returns a Figure with titles, axis
labels and legends or colorbars; `figure_problems` checks that. matplotlib is an optional dependency
(the `plots` extra), imported by `pyplot` on first use."""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np

from megatron.remoe.analysis.errors import AnalysisError


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401, PLC0415 -- optional extra (plots)
    except ImportError:
        return False
    return True


def pyplot():
    try:
        import matplotlib  # noqa: PLC0415 -- optional extra (plots)
    except ImportError:
        raise AnalysisError("figures need matplotlib: pip install 'megatron-remoe[plots]' "
                            "(or run with --no-figures)") from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt  # noqa: PLC0415 -- optional extra (plots), after matplotlib.use('Agg')

    return plt


def figure_problems(fig) -> list:
    """What a figure lacks: a title (figure or every plotted axes), axis labels, a legend or a
    colorbar. Empty when complete."""
    problems = []
    sup = fig.get_suptitle() if hasattr(fig, "get_suptitle") else \
        (fig._suptitle.get_text() if fig._suptitle is not None else "")
    has_suptitle = bool(sup)
    data_axes = [ax for ax in fig.axes if ax.get_label() != "<colorbar>" and ax.has_data()]
    if not data_axes:
        problems.append("no plotted axes")
    for i, ax in enumerate(data_axes):
        name = ax.get_title() or f"axes {i}"
        if not (ax.get_title() or has_suptitle):
            problems.append(f"{name}: no title")
        if not ax.get_xlabel():
            problems.append(f"{name}: no x label")
        if not ax.get_ylabel():
            problems.append(f"{name}: no y label")
        if ax.images and not any(getattr(im, "colorbar", None) for im in ax.images):
            problems.append(f"{name}: image without colorbar")
        if len(ax.lines) + len(ax.containers) > 1 and ax.get_legend() is None \
                and fig.legends == []:
            problems.append(f"{name}: several series but no legend")
    return problems


def _grid(n: int, max_cols: int = 4) -> tuple:
    cols = min(n, max_cols)
    return math.ceil(n / cols), cols


def fig_experts_vs_frequency(results: list, k_ref: Optional[float] = None):
    """Fig. 7: mean experts per token by frequency-rank bucket; one panel per model, a thin line
    per layer and a bold line for the mean over layers. results: [(label, experts_by_frequency
    dict, layer_numbers)]."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4.2), squeeze=False,
                             sharey=True)
    for ax, (label, r, layers) in zip(axes[0], results):
        x = np.sqrt(r["rank_lo"] * np.maximum(r["rank_hi"], r["rank_lo"]))  # geometric centre
        ok = r["occurrences"] > 0
        for l, layer in enumerate(layers):
            ax.plot(x[ok], r["per_layer"][ok, l], lw=1, alpha=0.6, marker=".",
                    label=f"layer {layer}")
        ax.plot(x[ok], r["mean"][ok], lw=2.5, color="black", marker="o", label="mean over layers")
        if k_ref is not None:
            ax.axhline(k_ref, ls="--", color="grey", lw=1, label=f"k = {k_ref:g}")
        ax.set_xscale("log")
        ax.set_xlabel("token frequency rank in training data (1 = most frequent, log)")
        ax.set_ylabel("mean experts per token")
        ax.set_title(f"{label}: experts per token vs token frequency")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def fig_domain_share(label: str, share: np.ndarray, layer_numbers: Sequence[int],
                     domain_names: Sequence[str], vmax: Optional[float] = None):
    """Fig. 9: per layer, heatmap of the share of each domain's assignments going to each expert
    (one colour scale for all layers; pass `vmax` to share it between models)."""
    plt = pyplot()
    L, D, E = share.shape
    rows, cols = _grid(L, 2)
    fig, axes = plt.subplots(rows, cols, figsize=(max(3.2, 0.45 * E + 1.8) * cols,
                                                  (0.4 * D + 1.4) * rows), squeeze=False)
    vmax = max(float(vmax if vmax is not None else share.max()), 1e-9)
    for i, ax in enumerate(axes.flat):
        if i >= L:
            ax.set_visible(False)
            continue
        im = ax.imshow(share[i], aspect="auto", cmap="viridis", vmin=0.0, vmax=vmax)
        ax.set_title(f"layer {layer_numbers[i]}")
        ax.set_xlabel("expert")
        ax.set_ylabel("domain")
        ax.set_xticks(range(E))
        ax.set_xticklabels([str(e) for e in range(E)], fontsize=7)
        ax.set_yticks(range(D))
        ax.set_yticklabels(domain_names, fontsize=8)
        fig.colorbar(im, ax=ax, label="share of domain's assignments")
    fig.suptitle(f"{label}: share of each domain's routed (token, expert) assignments per expert")
    fig.tight_layout()
    return fig


def fig_active_experts(results: list, domain_names: Sequence[str], k_ref: Optional[float] = None):
    """Fig. 12: mean experts per token per layer, one line per domain, one panel per model.
    results: [(label, mean [L, D], layer_numbers)]."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4.2), squeeze=False,
                             sharey=True)
    for ax, (label, mean, layers) in zip(axes[0], results):
        for d, name in enumerate(domain_names):
            ax.plot(layers, mean[:, d], marker="o", label=name)
        if k_ref is not None:
            ax.axhline(k_ref, ls="--", color="grey", lw=1, label=f"k = {k_ref:g}")
        ax.set_xticks(list(layers))
        ax.set_xlabel("layer")
        ax.set_ylabel("mean experts per token")
        ax.set_title(f"{label}: active experts per layer and domain")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def fig_flip_rate(rows_by_pair: list):
    """Routing flips per layer between two checkpoints; one bar group per compared pair.
    rows_by_pair: [(pair label, flip_rates rows)]."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), squeeze=False)
    n = len(rows_by_pair)
    width = 0.8 / max(n, 1)
    for col, (key, title) in enumerate((("set_flip_rate", "expert set changes"),
                                        ("top1_flip_rate", "top-1 expert changes"))):
        ax = axes[0, col]
        for p, (pair, rows) in enumerate(rows_by_pair):
            x = np.arange(len(rows)) + (p - (n - 1) / 2) * width
            ax.bar(x, [r[key] for r in rows], width=width, label=pair)
        if rows_by_pair:
            ax.set_xticks(range(len(rows_by_pair[0][1])))
            ax.set_xticklabels([str(r["layer"]) for r in rows_by_pair[0][1]])
        ax.set_xlabel("layer")
        ax.set_ylabel("fraction of tokens")
        ax.set_title(f"routing flip rate: {title}")
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def fig_expert_load(results: list):
    """Expert load per layer (share of the layer's assignments per expert), one panel per model.
    results: [(label, counts [L, E], layer_numbers)]."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4.0), squeeze=False)
    for ax, (label, counts, layers) in zip(axes[0], results):
        share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
        im = ax.imshow(share, aspect="auto", cmap="magma", vmin=0.0)
        ax.set_yticks(range(len(layers)))
        ax.set_yticklabels([str(x) for x in layers])
        ax.set_xticks(range(counts.shape[1]))
        ax.set_xlabel("expert")
        ax.set_ylabel("layer")
        ax.set_title(f"{label}: expert load (share of assignments)")
        fig.colorbar(im, ax=ax, label="share of the layer's assignments")
    fig.tight_layout()
    return fig

