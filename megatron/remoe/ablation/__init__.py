"""Config-driven ablations: TopK vs ReLU routing (and dense) over a YAML grid.

A grid file names a base TrainConfig and axes (router, E, G, k, seed, lambda_0, alpha, load
balancing, controller, or any TrainConfig field). The package, in the order a grid goes through it:

    grid.py     the grid file and its expansion into named runs (`load_grid`, `expand`)
    runner.py   validating, training (or printing launch lines for) the unfinished runs
    rundir.py   one run's directory: config.yaml, metrics.jsonl, summary.json
    collect.py  one record per finished run, and `collect`, which writes every output
    stages.py   ReLU stages, settling, Stage III steadiness, compute matching
    stats.py    time to quality, paired t-tests over seeds
    compare.py  which runs are comparable; time to TopK's loss and paired tests over a grid
    report.py   mean/std over seeds, CSV files, Markdown tables
    plots.py    PNG figures
    cli.py      `remoe ablate` / tools/ablate.py

Outputs under the grid's `out`: <run>/ (config, log, metrics, summary), results.csv, summary.csv,
results.md, results.json and plots/*.png. The definitions (stages, settling time, FLOPs, compute
matching, time to quality) are documented in docs/results.md; FLOPs are counted by
megatron.remoe.model (`flops_per_token`).
"""

from megatron.remoe.ablation.cli import build_parser, main
from megatron.remoe.ablation.collect import collect, collect_run, layer_allocation, vocab_from_params
from megatron.remoe.ablation.compare import (
    ROUTER_ORDER,
    add_time_to_quality,
    option_partners,
    paired_comparisons,
    partners,
)
from megatron.remoe.ablation.grid import CM, Grid, GridError, RunSpec, expand, load_grid, run_dir
from megatron.remoe.ablation.plots import make_plots
from megatron.remoe.ablation.report import aggregate, markdown_comparisons, markdown_tables
from megatron.remoe.ablation.rundir import is_finished, read_metrics, read_summary
from megatron.remoe.ablation.runner import data_fields, run_fields, run_grid, validate_fields
from megatron.remoe.ablation.stages import (
    compute_match_extra_steps,
    smooth,
    sparsity_stages,
    stage3_steadiness,
)
from megatron.remoe.ablation.stats import paired_comparison, student_t_two_sided_p, time_to_quality
from megatron.remoe.config import moe_layer_pattern_of
from megatron.remoe.model import flops_per_token


def moe_layer_count(num_layers: int, freq) -> int:
    """MoE layers of a model with megatron-core's `moe_layer_freq` (spec.moe_layer_pattern_of)."""
    return sum(moe_layer_pattern_of(num_layers, 1, freq))


__all__ = [
    "CM", "ROUTER_ORDER", "Grid", "GridError", "RunSpec", "add_time_to_quality", "aggregate",
    "build_parser", "collect", "collect_run", "compute_match_extra_steps", "data_fields", "expand",
    "flops_per_token", "is_finished", "layer_allocation", "load_grid", "main", "make_plots",
    "markdown_comparisons", "markdown_tables", "moe_layer_count", "option_partners",
    "paired_comparison", "paired_comparisons", "partners", "read_metrics", "read_summary",
    "run_dir", "run_fields", "run_grid", "smooth", "sparsity_stages", "stage3_steadiness",
    "student_t_two_sided_p", "time_to_quality", "validate_fields", "vocab_from_params",
]
