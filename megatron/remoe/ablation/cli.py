"""`remoe ablate GRID.yaml` (and tools/ablate.py): list, run, print or collect a grid."""

from __future__ import annotations

import argparse
import sys
import warnings
from typing import Optional

import yaml

from megatron.remoe.ablation.grid import CM, Grid, GridError, load_grid, run_dir
from megatron.remoe.ablation.rundir import read_summary
from megatron.remoe.ablation.runner import run_grid
from megatron.remoe.errors import ConfigError
from megatron.remoe.logs import configure


def build_parser(prog: str = "remoe ablate") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Expand a YAML ablation grid into named "
                                "runs, train them (skipping finished ones) or print their launch "
                                "lines, and collect tables and plots.")
    p.add_argument("grid", help="grid YAML, e.g. examples/remoe/ablations/cpu-small.yaml")
    p.add_argument("--out", help="output directory (default: the grid's `out`)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--print", dest="print_only", action="store_true",
                      help="write each unfinished run's config.yaml and print its launch line "
                           "instead of training (for a cluster); rerun later to collect")
    mode.add_argument("--collect", action="store_true",
                      help="only collect finished runs into tables and plots")
    mode.add_argument("--list", action="store_true", help="list the expanded runs and exit")
    p.add_argument("--launcher", help="launch-line template for --print, with {config}, {name}, "
                   "{dir}, {nproc}, e.g. 'sbatch scripts/train_slurm.sbatch {config}'")
    p.add_argument("--only", nargs="+", metavar="NAME",
                   help="only these runs (names or regular expressions)")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                   help="override TrainConfig fields of every run (YAML values), e.g. "
                        "--set train_iters=100 'data_path=[/data/pile_text_document]'")
    return p


def _parse_sets(items: list) -> dict:
    out = {}
    for item in items:
        if "=" not in item:
            raise GridError(f"--set {item!r}: expected KEY=VALUE, e.g. train_iters=100")
        key, value = item.split("=", 1)
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise GridError(f"--set {item!r}: the value is not valid YAML; quote it") from None
    return out


def list_runs(grid: Grid) -> None:
    """The expanded runs, `(finished)` after those done, and where they go (the output of
    --list)."""
    for spec in grid.runs:
        extra = f" (TopK + Stage I/II compute of {spec.partner})" if spec.partner else ""
        summary = read_summary(run_dir(grid, spec.name)) or {}
        done = summary.get("iterations") == spec.fields.get("train_iters") or (
            spec.router == CM and summary.get("iterations"))
        state = "(finished)" if done else ""
        print(f"{spec.name}{extra} {state}".rstrip())
    print(f"{len(grid.runs)} runs -> {grid.out}")


def main(argv: Optional[list] = None, prog: str = "remoe ablate") -> int:
    configure()  # the console: progress lines, known noise filtered
    warnings.filterwarnings("ignore", category=UserWarning)  # megatron-core "Apex missing"
    args = build_parser(prog).parse_args(argv)
    try:
        grid = load_grid(args.grid, out=args.out, overrides=_parse_sets(args.set))
        if args.list:
            list_runs(grid)
            return 0
        mode = "print" if args.print_only else "collect" if args.collect else "run"
        return run_grid(grid, mode=mode, launcher=args.launcher, only=args.only)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("\nablate: interrupted; rerun the same command to continue (finished runs are "
              "skipped)", file=sys.stderr)
        return 130
