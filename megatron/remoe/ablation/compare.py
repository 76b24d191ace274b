"""Which finished runs are comparable, and how they compare: time to the TopK run's final
validation loss, and paired tests over seeds between routers and between option axes."""

from __future__ import annotations

from megatron.remoe.ablation.grid import CM, Grid, RunSpec
from megatron.remoe.ablation.stats import paired_comparison, time_to_quality

# Order in which two routers are compared (the first minus the second).
ROUTER_ORDER = ("relu", CM, "topk", "topk-sigmoid-bias", "dense")


def partners(grid: Grid, spec: RunSpec, router: str, names: set) -> list:
    """Finished runs of `router` comparable with `spec`: the same seed and the same value of
    every axis both runs have (an axis that does not apply to a router is absent from its runs,
    e.g. E for dense or lambda_0 for TopK)."""
    out = []
    for other in grid.runs:
        if other.router != router or other.name not in names or other.name == spec.name:
            continue
        if other.axes.get("seed") != spec.axes.get("seed"):
            continue
        shared = (set(other.axes) & set(spec.axes)) - {"router", "seed"}
        if all(other.axes[a] == spec.axes[a] for a in shared):
            out.append(other)
    return out


def add_time_to_quality(grid: Grid, records: list, traces: dict) -> None:
    """For every run other than TopK with one comparable TopK run: when its validation curve
    reaches that TopK run's final validation loss, in tokens and training FLOPs, and as ratios
    to the TopK run's total (< 1: it gets there with fewer tokens/FLOPs)."""
    by_name = {r["name"]: r for r in records}
    for rec in records:
        if rec["router"] == "topk":
            continue
        found = partners(grid, grid.run(rec["name"]), "topk", set(by_name))
        if len(found) != 1:
            continue
        ref = by_name[found[0].name]
        if ref.get("final_valid_loss") is None or not traces[rec["name"]]["valid_step"]:
            continue
        t = traces[rec["name"]]
        got = time_to_quality(t["valid_step"], t["valid_loss"], ref["final_valid_loss"],
                              t["cum_flops"], t["tokens_per_step"], first_step=t["step"][0])
        rec.update(ttq_vs=ref["name"], ttq_target_loss=ref["final_valid_loss"],
                   ttq_reached=int(got is not None),
                   ttq_step=got["step"] if got else None,
                   ttq_tokens=got["tokens"] if got else None,
                   ttq_tokens_ratio=got["tokens"] / ref["tokens"] if got else None,
                   ttq_flops_ratio=got["flops"] / ref["total_train_flops"] if got else None,
                   ttq_first_eval=got["bound"] if got else None)


def option_partners(grid: Grid, spec: RunSpec, names: set) -> list:
    """Finished runs of the same router and seed that differ from `spec` in exactly one
    true/false or text axis (load_balancing, controller, ...) whose value comes later in the
    grid file: the A/B options of a grid. Numeric axes (E, G, k, lambda_0) are sweeps, shown
    by the plots instead."""
    out = []
    for other in grid.runs:
        if other.router != spec.router or other.name not in names or \
                set(other.axes) != set(spec.axes) or \
                other.axes.get("seed") != spec.axes.get("seed"):
            continue
        differ = [a for a in spec.axes if a not in ("router", "seed")
                  and other.axes[a] != spec.axes[a]]
        if len(differ) == 1 and isinstance(spec.axes[differ[0]], (bool, str)):
            values = grid.axes[differ[0]]
            if values.index(spec.axes[differ[0]]) < values.index(other.axes[differ[0]]):
                out.append(other)
    return out


def paired_comparisons(grid: Grid, records: list, key: str = "final_valid_loss") -> list:
    """Paired tests over seeds of `key`, first minus second: per pair of groups with different
    routers (in ROUTER_ORDER; runs matched by seed and shared axes), and per pair of groups of
    one router that differ in one option axis (`option_partners`)."""
    by_name = {r["name"]: r for r in records}
    pairs: dict = {}
    for rec in records:
        if rec["router"] not in ROUTER_ORDER:
            continue
        spec = grid.run(rec["name"])
        found = [f for router in ROUTER_ORDER[ROUTER_ORDER.index(rec["router"]) + 1:]
                 for f in [partners(grid, spec, router, set(by_name))] if len(f) == 1]
        for other_spec in [f[0] for f in found] + option_partners(grid, spec, set(by_name)):
            other = by_name[other_spec.name]
            a, b = pairs.setdefault((rec["group"], other["group"]), ({}, {}))
            a[rec["seed"]], b[rec["seed"]] = rec.get(key), other.get(key)
    out = []
    for (ga, gb), (a, b) in pairs.items():
        test = paired_comparison(a, b)
        if test is not None:
            out.append(dict(a=ga, b=gb, key=key, **test))
    return out
