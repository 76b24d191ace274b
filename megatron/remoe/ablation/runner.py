"""Running a grid: validate every run before anything is written, then train the unfinished runs
one after another (a run with checkpoints resumes) or print their launch lines, then collect.

Each run is `python -m megatron.remoe.pretrain --config <out>/<run>/config.yaml`
(megatron.remoe.cli.launch); a finished run (summary.json at train_iters) is skipped, so rerunning
the same command continues an interrupted grid."""

from __future__ import annotations

import json
import math
import os
import re
import time
from typing import Optional

import torch
import yaml

from megatron.remoe.ablation.collect import collect, collect_run
from megatron.remoe.ablation.grid import CM, Grid, GridError, RunSpec, run_dir
from megatron.remoe.ablation.report import one_line
from megatron.remoe.ablation.rundir import existing_config, is_finished
from megatron.remoe.cli.demo import demo_data_fields
from megatron.remoe.cli.launch import checkout_pythonpath, run_logged, training_command
from megatron.remoe.data.demo import prepare_demo_data
from megatron.remoe.logs import get_logger
from megatron.remoe.training.arguments import coerce_field_value
from megatron.remoe.training.config import TrainConfig
from megatron.remoe.training.metrics import format_duration
from megatron.remoe.training.validation import finalize_config

log = get_logger(__name__)

# Output-location fields: the grid sets them per run; differences here do not make a new run.
LOCATION_FIELDS = ("save", "load", "metrics_file", "data_cache_path")


# ------------------------------------------------------------------------------------------------
# Each run's config
# ------------------------------------------------------------------------------------------------
def data_fields(grid: Grid) -> dict:
    """Data fields for every run: the demo corpus (built or reused) or nothing (base has them)."""
    if grid.demo_data is None:
        return {}

    log.info(f"ablate: demo data in {grid.demo_data['dir']} (built on first use, then reused)")
    data = prepare_demo_data(grid.demo_data["dir"], tokenizer="bpe",
                             vocab_size=grid.demo_data["vocab_size"])
    return demo_data_fields(data, os.path.join(grid.demo_data["dir"], "index-cache"))


def run_fields(grid: Grid, spec: RunSpec, data: dict, extra_steps: int = 0) -> dict:
    path = run_dir(grid, spec.name)
    fields = dict(spec.fields)
    fields.update(data)
    if spec.router == CM:
        fields["router"] = "topk"
        fields["train_iters"] = fields["train_iters"] + extra_steps
    fields["metrics_file"] = os.path.join(path, "metrics.jsonl")
    if grid.checkpoints:
        fields["save"] = fields["load"] = os.path.join(path, "checkpoints")
    return fields


def validate_fields(fields: dict, nproc: int, check_data: bool = True,
                    check_device: bool = True) -> None:
    """The trainer's own validation (one-line ConfigError), before anything is launched.
    Without check_data / check_device (printing launch lines for another machine) the data files
    and the GPU-only options (bf16, Transformer Engine, grouped GEMM) are left to that machine."""
    values = {k: coerce_field_value(k, v) for k, v in fields.items()}
    if not check_data:
        values.update(data_path=[], valid_data_path=[], tokenizer=None, mock_data=True,
                      vocab_size=values.get("vocab_size") or 1024, split=None)
    if not check_device:
        values.update(bf16=False, transformer_impl="local", moe_grouped_gemm=False,
                      context_parallel_size=1)
    finalize_config(TrainConfig(**values), world_size=nproc, cuda=torch.cuda.is_available())


def _diff(old: dict, new: dict) -> Optional[str]:
    for key in sorted(set(old) | set(new)):
        if key in LOCATION_FIELDS:
            continue
        if old.get(key) != new.get(key):
            return f"{key}: {old.get(key)!r} -> {new.get(key)!r}"
    return None


def _check_unchanged(grid: Grid, spec: RunSpec, fields: dict) -> None:
    """Refuse to reuse a run directory made with a different config."""
    path = run_dir(grid, spec.name)
    old = existing_config(path)
    why = _diff(old, fields) if old is not None else None
    if why:
        raise GridError(f"run {spec.name} in {grid.out} was made with a different config "
                        f"({why}); use another --out or delete {path}")


def _cm_extra_steps(grid: Grid, spec: RunSpec) -> Optional[int]:
    """Extra TopK steps for a topk-cm run, from its finished ReLU partner (None: not yet)."""
    got = collect_run(grid, grid.run(spec.partner))
    if got is None:
        return None
    return int(math.ceil(got["scalars"]["extra_compute_steps"]))


# ------------------------------------------------------------------------------------------------
# The grid
# ------------------------------------------------------------------------------------------------
def select_runs(grid: Grid, only: Optional[list]) -> list:
    """The runs named by --only (names or regular expressions); all runs without it."""
    selected = [r for r in grid.runs if not only or any(re.fullmatch(p, r.name) or p == r.name
                                                        for p in only)]
    if only and not selected:
        raise GridError(f"--only {' '.join(only)} matches no run; runs are: "
                        + ", ".join(r.name for r in grid.runs))
    return selected


def _plan(grid: Grid, selected: list, data: dict, mode: str) -> dict:
    """Validate every run and check existing run directories before writing anything."""
    planned = {}
    for spec in selected:
        fields = run_fields(grid, spec, data)
        validate_fields(fields, grid.nproc, check_data=mode == "run" or bool(data),
                        check_device=mode == "run")
        planned[spec.name] = fields
        if spec.router != CM:  # a topk-cm run's steps are known once its partner finished
            _check_unchanged(grid, spec, fields)
    return planned


def _launch_template(grid: Grid, launcher: Optional[str]) -> str:
    template = launcher or ("torchrun --nproc-per-node {nproc} -m megatron.remoe.pretrain "
                            "--config {config}" if grid.nproc > 1 else
                            "python -m megatron.remoe.pretrain --config {config}")
    return template.replace("{nproc}", str(grid.nproc))


def run_grid(grid: Grid, mode: str = "run", launcher: Optional[str] = None,
             only: Optional[list] = None) -> int:
    """mode 'run': train the unfinished runs one after another, then collect. mode 'print':
    write each run's config.yaml and print its launch line (no training). mode 'collect': only
    collect. Returns 0 if every selected run is finished, 1 otherwise."""
    selected = select_runs(grid, only)
    if mode == "collect":
        return _finish(grid, selected)
    data = data_fields(grid)
    planned = _plan(grid, selected, data, mode)
    os.makedirs(grid.out, exist_ok=True)
    with open(os.path.join(grid.out, "grid.json"), "w", encoding="utf-8") as fh:
        json.dump({"grid": grid.path, "name": grid.name, "base": grid.base, "axes": grid.axes,
                   "runs": [r.name for r in grid.runs]}, fh, indent=1, default=str)
    template = _launch_template(grid, launcher)
    grid_start = time.time()
    outcomes = [_run_one(grid, spec, f"[{i}/{len(selected)}] {spec.name}", planned[spec.name],
                         data, mode, template, grid_start)
                for i, spec in enumerate(selected, 1)]
    failed = outcomes.count("failed") + outcomes.count("waiting")
    if mode == "print":
        log.info(f"# {outcomes.count('printed')} launch line(s)"
                 + (f", {failed} run(s) waiting" if failed else "")
                 + "; when the jobs are done, rerun with --print (waiting runs) or --collect")
        return 0
    code = _finish(grid, selected)
    return 1 if failed else code


def _run_one(grid: Grid, spec: RunSpec, tag: str, fields: dict, data: dict, mode: str,
             template: str, grid_start: float) -> str:
    """Train (mode 'run') or print the launch line of one run unless it is finished. Returns
    'done', 'skipped', 'printed', 'waiting' (a topk-cm run before its partner) or 'failed'."""
    path = run_dir(grid, spec.name)
    comment = "# " if mode == "print" else ""
    if spec.router == CM:
        extra = _cm_extra_steps(grid, spec)
        if extra is None:
            log.info(f"{comment}{tag}: waits for {spec.partner} (compute matching needs its "
                     "sparsity trace); rerun after it finishes")
            return "waiting"
        fields = run_fields(grid, spec, data, extra)
        _check_unchanged(grid, spec, fields)
    if is_finished(path, fields["train_iters"]):
        log.info(f"{comment}{tag}: finished earlier ({fields['train_iters']} steps), skipped")
        return "skipped"
    os.makedirs(path, exist_ok=True)
    config_path = os.path.join(path, "config.yaml")
    with open(config_path, "w", encoding="utf-8") as fh:
        yaml.safe_dump(fields, fh, sort_keys=False)
    if mode == "print":
        log.info(template.format(config=config_path, name=spec.name, dir=path))
        return "printed"
    if not grid.checkpoints:  # no checkpoint to resume from: a partial run starts over
        for stale in ("metrics.jsonl", "summary.json"):
            if os.path.exists(os.path.join(path, stale)):
                os.remove(os.path.join(path, stale))
    rc, seconds = _train(config_path, path, grid.nproc, tag, fields)
    if rc != 0:
        log.info(f"{tag}: FAILED (exit code {rc}) after {format_duration(seconds)}; see "
                 f"{os.path.join(path, 'train.log')}")
        return "failed"
    got = collect_run(grid, spec)
    if got is None:
        log.info(f"{tag}: exited 0 but summary.json does not show {fields['train_iters']} steps")
        return "failed"
    log.info(f"{tag}: done in {format_duration(seconds)} (grid "
             f"{format_duration(time.time() - grid_start)}): " + one_line(got["scalars"]))
    return "done"


def _echo(line: str) -> bool:
    """The trainer's lines shown while a grid runs (the rest is in the run's train.log)."""
    return line.startswith(("[eval", "error", "Traceback", "checkpoint: resumed")) or \
        "Error" in line


def _train(config_path: str, path: str, nproc: int, tag: str, fields: dict) -> tuple[int, float]:
    cmd = training_command(config_path, nproc)
    resume = os.path.isdir(os.path.join(path, "checkpoints"))
    log.info(f"{tag}: training {fields['train_iters']} steps"
             + (" (resuming from its checkpoints)" if resume else "") + f": {' '.join(cmd)}")
    t0 = time.time()
    rc = run_logged(cmd, os.path.join(path, "train.log"), nproc, echo=_echo,
                    mode="a" if resume else "w", extra_env={"PYTHONPATH": checkout_pythonpath()})
    return rc, time.time() - t0


def _finish(grid: Grid, selected: list) -> int:
    result = collect(grid)
    log.info(f"\nablate: {len(result['records'])} of {len(grid.runs)} runs finished; "
             f"{os.path.join(grid.out, 'results.md')}, results.csv, summary.csv, results.json"
             + (f", plots/ ({len(result['plots'])} PNG)" if result["plots"] else ""))
    log.info("\n" + result["table"])
    names = {s.name for s in selected}
    return 1 if any(m in names for m in result["missing"]) else 0
