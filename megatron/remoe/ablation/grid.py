"""Grid files: a base TrainConfig and axes in YAML, expanded into named runs (`load_grid`).

Keys of a grid file:

    name: cpu-small                 # used in headings
    out: runs/ablations/cpu-small   # output directory (--out overrides)
    config: ../cpu-demo.yaml        # optional base TrainConfig YAML (relative to the grid file)
    base: {train_iters: 300, ...}   # TrainConfig fields for every run (override `config`)
    demo_data: {dir: runs/demo/data, vocab_size: 8192}   # optional: train on the demo corpus
    axes: {router: [relu, topk, dense], seed: [1, 2, 3]}
    compute_match: false            # true: add a `topk-cm` run per TopK run (extra steps)
    checkpoints: true               # save checkpoints (a partial run resumes); false: no --save
    nproc: 1                        # processes per run (torchrun when > 1)
    settle_window: 20               # centred moving average for settling/stage detection
    settle_tol: 0.01

Axes are router, E, G, k, seed, lambda_0, alpha, load_balancing, controller or any TrainConfig
field. An axis that does not change a router's runs is dropped for that router (dense is trained
once per seed however many E values the grid has).
"""

from __future__ import annotations

import itertools
import os
import re
from dataclasses import dataclass
from typing import Optional

from megatron.remoe.config import (
    ROUTERS,
    check_granularity,
    check_l1_coeff_init,
    check_l1_multiplier,
    check_topk_range,
    default_ffn_hidden_size,
)
from megatron.remoe.errors import ConfigError
from megatron.remoe.training.arguments import (
    closest_field_name,
    coerce_field_value,
    load_yaml_config,
    read_yaml_mapping,
)
from megatron.remoe.training.config import FIELDS

GRID_KEYS = ("name", "description", "out", "config", "base", "demo_data", "axes",
             "compute_match", "checkpoints", "nproc", "settle_window", "settle_tol")
AXIS_ALIASES = {"E": "num_experts", "G": "moe_granularity", "k": "moe_router_topk",
                "lambda_0": "moe_relu_l1_reg_coeff_init",
                "alpha": "moe_relu_l1_reg_coeff_multiplier", "load_balancing": "load_balancing",
                "controller": "moe_relu_l1_reg_coeff_controller"}
SHORT = {"num_experts": "E", "moe_granularity": "G", "moe_router_topk": "k", "seed": "s",
         "moe_relu_l1_reg_coeff_init": "l0_", "moe_relu_l1_reg_coeff_multiplier": "a",
         "moe_relu_l1_reg_coeff_controller": "ctl_"}
CM = "topk-cm"  # TopK with extra steps that match a ReLU run's Stage I/II compute


class GridError(ConfigError):
    """A grid file or CLI value is invalid; the message names the value and the fix."""


@dataclass
class RunSpec:
    name: str
    group: str  # the name without the seed: runs that differ only in seed
    router: str  # relu | topk | topk-sigmoid-bias | dense | topk-cm (TopK with extra steps)
    axes: dict  # canonical axis name -> value (only the axes that apply to this router)
    fields: dict  # TrainConfig fields (before data and output paths)
    partner: Optional[str] = None  # topk-cm: the ReLU run whose Stage I/II compute is matched
    topk: Optional[str] = None  # topk-cm: the TopK run it extends


@dataclass
class Grid:
    name: str
    path: str
    base: dict
    axes: dict  # canonical name -> list of values (YAML order)
    runs: list
    out: str
    demo_data: Optional[dict] = None
    compute_match: bool = False
    checkpoints: bool = True
    nproc: int = 1
    settle_window: int = 20
    settle_tol: float = 0.01
    description: str = ""

    def run(self, name: str) -> RunSpec:
        return next(r for r in self.runs if r.name == name)


def run_dir(grid: Grid, name: str) -> str:
    return os.path.join(grid.out, name)


# ------------------------------------------------------------------------------------------------
# Axes
# ------------------------------------------------------------------------------------------------
def _did_you_mean(name: str) -> str:
    hint = closest_field_name(name)
    return f" (did you mean {hint!r}?)" if hint else ""


def _canonical_axis(key: str) -> str:
    if key in AXIS_ALIASES:
        return AXIS_ALIASES[key]
    name = str(key).replace("-", "_")
    if name in FIELDS:
        return name
    raise GridError(f"axes: unknown axis {key!r}" + _did_you_mean(name)
                    + "; use router, E, G, k, seed, lambda_0, alpha, load_balancing, controller "
                    "or a TrainConfig field")


def _coerce_axis(axis: str, values) -> list:
    if not isinstance(values, list) or not values:
        raise GridError(f"axes: {axis} must be a non-empty list of values, got {values!r}; "
                        f"write e.g. `{axis}: [1, 2]`")
    out = []
    for v in values:
        if axis == "load_balancing":
            if not isinstance(v, bool):
                raise GridError(f"axes: load_balancing value {v!r} is not true/false; fix it")
            out.append(v)
            continue
        try:
            v = coerce_field_value(axis, v)
        except ConfigError as e:
            raise GridError(f"axes: {e}") from None
        if axis == "router" and v not in ROUTERS:
            raise GridError(f"axes: router {v!r} is not one of {', '.join(ROUTERS)}; fix the "
                            "router axis")
        out.append(v)
    if len(set(map(repr, out))) != len(out):
        raise GridError(f"axes: {axis} lists a value twice ({values}); remove the duplicate")
    return out


def _axis_applies(axis: str, router: str) -> bool:
    """Which axes change a run of this router (the others are collapsed, so e.g. dense is
    trained once per seed however many E values the grid has)."""
    if axis == "load_balancing":
        return router != "dense"
    if axis in ("router", "seed") or FIELDS[axis].metadata["group"] != "moe":
        return True
    if router == "dense":
        return axis == "moe_router_topk"  # the dense MLP is k experts wide (matched active params)
    if axis.startswith("moe_relu_"):
        return router == "relu"
    if axis == "moe_aux_loss_coeff":
        return router == "topk"
    return True


def _label(axis: str, value) -> str:
    if axis == "router":
        return str(value)
    if axis == "load_balancing":
        return "lb" if value else "nolb"
    if axis in SHORT:
        text = f"{value:g}" if isinstance(value, float) else str(value)
        return SHORT[axis] + text
    if isinstance(value, bool):
        return axis if value else f"no_{axis}"
    text = f"{value:g}" if isinstance(value, float) else str(value)
    return re.sub(r"[^A-Za-z0-9._+-]", "_", f"{axis}{text}")


def _run_name(router: str, axes: dict, order: list) -> tuple[str, str]:
    parts = [router] + [_label(a, axes[a]) for a in order if a not in ("router", "seed")
                        and a in axes]
    group = "-".join(parts)
    name = group + (f"-{_label('seed', axes['seed'])}" if "seed" in axes else "")
    return name, group


def _apply_axes(base: dict, router: str, axes: dict) -> dict:
    fields = dict(base)
    fields["router"] = router
    for axis, value in axes.items():
        if axis == "router":
            continue
        if axis == "load_balancing":
            if router == "relu":
                fields["moe_relu_no_load_balancing"] = not value
            elif not value:
                fields["moe_aux_loss_coeff"] = 0.0
            continue
        fields[axis] = value
    fields.pop("moe_relu_routing", None)
    if router == "dense":
        k = fields.get("moe_router_topk", 1) or 1
        if k > 1:  # matched active parameters: a dense MLP as wide as k experts
            ffn = fields.get("ffn_hidden_size") or default_ffn_hidden_size(fields["hidden_size"])
            fields["ffn_hidden_size"] = k * ffn
        for name in list(fields):
            if name != "router" and FIELDS[name].metadata["group"] == "moe":
                fields.pop(name)
    return fields


# ------------------------------------------------------------------------------------------------
# Reading a grid file
# ------------------------------------------------------------------------------------------------
def _base_fields(raw: dict, path: str, overrides: Optional[dict]) -> dict:
    """TrainConfig fields of every run: `config`, then `base`, then --set overrides."""
    base: dict = {}
    if raw.get("config"):
        cfg_path = raw["config"]
        if not os.path.isabs(cfg_path):
            cfg_path = os.path.join(os.path.dirname(path), cfg_path)
        base.update(load_yaml_config(cfg_path))
    extra = raw.get("base") or {}
    if not isinstance(extra, dict):
        raise GridError(f"grid {path}: `base` must be a mapping of TrainConfig fields")
    for key, value in list(extra.items()) + list((overrides or {}).items()):
        name = str(key).replace("-", "_")
        if name not in FIELDS:
            raise GridError(f"grid {path}: unknown TrainConfig field {key!r}"
                            + _did_you_mean(name) + "; fix the spelling")
        base[name] = value
    base = {k: coerce_field_value(k, v) for k, v in base.items()}
    for name in ("save", "load", "metrics_file"):
        base.pop(name, None)  # every run gets its own directory
    return base


def _grid_axes(raw: dict, path: str) -> dict:
    axes_raw = raw.get("axes") or {}
    if not isinstance(axes_raw, dict) or not axes_raw:
        raise GridError(f"grid {path}: `axes` must map axis names to lists of values, e.g. "
                        "`axes: {router: [relu, topk]}`")
    axes: dict = {}
    for key, values in axes_raw.items():
        axis = _canonical_axis(key)
        if axis in axes:
            raise GridError(f"axes: {key!r} repeats axis {axis}; keep one")
        axes[axis] = _coerce_axis(axis, values)
    return axes


def _positive_int(raw: dict, key: str, default: int, path: str) -> int:
    value = raw.get(key, default)
    if not isinstance(value, int) or value < 1:
        raise GridError(f"grid {path}: {key}={value!r} must be an integer >= 1")
    return value


def _demo_data(raw: dict, path: str, base: dict) -> Optional[dict]:
    demo = raw.get("demo_data")
    if demo is None:
        return None
    if demo is True:
        demo = {}
    if not isinstance(demo, dict) or set(demo) - {"dir", "vocab_size"}:
        raise GridError(f"grid {path}: demo_data takes {{dir: DIR, vocab_size: N}}")
    for name in ("data_path", "valid_data_path", "tokenizer", "mock_data"):
        if base.get(name):
            raise GridError(f"grid {path}: demo_data and base {name} are exclusive; drop one")
    return {"dir": demo.get("dir", "runs/demo/data"),
            "vocab_size": int(demo.get("vocab_size", 8192))}


def load_grid(path: str, out: Optional[str] = None, overrides: Optional[dict] = None) -> Grid:
    """Read and expand a grid file. Raises GridError (one line) on any problem; writes nothing."""
    raw = read_yaml_mapping(path, what="grid", fix="fix the path", error=GridError)
    unknown = sorted(set(raw) - set(GRID_KEYS))
    if unknown:
        raise GridError(f"grid {path}: unknown key {unknown[0]!r}; allowed: {', '.join(GRID_KEYS)}")
    base = _base_fields(raw, path, overrides)
    axes = _grid_axes(raw, path)
    nproc = _positive_int(raw, "nproc", 1, path)
    window = _positive_int(raw, "settle_window", 20, path)
    tol = float(raw.get("settle_tol", 0.01))
    demo = _demo_data(raw, path, base)
    name = str(raw.get("name") or os.path.splitext(os.path.basename(path))[0])
    grid = Grid(name=name, path=path, base=base, axes=axes, runs=[],
                out=out or raw.get("out") or os.path.join("runs", "ablations", name),
                demo_data=demo, compute_match=bool(raw.get("compute_match", False)),
                checkpoints=bool(raw.get("checkpoints", True)), nproc=nproc,
                settle_window=window, settle_tol=tol,
                description=str(raw.get("description") or ""))
    grid.runs = expand(grid)
    return grid


# ------------------------------------------------------------------------------------------------
# Expansion
# ------------------------------------------------------------------------------------------------
def expand(grid: Grid) -> list:
    """The named runs of a grid, in execution order: seeds outermost (so a partial grid has
    complete comparisons for the first seeds), then the other axes in file order; a `topk-cm`
    run comes right after both its TopK run and its ReLU partner."""
    order = list(grid.axes)
    loop = (["seed"] if "seed" in order else []) + [a for a in order if a != "seed"]
    default_router = grid.base.get("router", "relu")
    runs, seen = [], {}
    for combo in itertools.product(*(grid.axes[a] for a in loop)):
        values = dict(zip(loop, combo))
        router = values.get("router", default_router)
        applied = {a: v for a, v in values.items() if _axis_applies(a, router)}
        name, group = _run_name(router, applied, order)
        if name in seen:
            continue
        spec = RunSpec(name=name, group=group, router=router, axes=applied,
                       fields=_apply_axes(grid.base, router, applied))
        _check_run(spec)
        seen[name] = spec
        runs.append(spec)
    if grid.compute_match:
        _add_compute_matched(runs)
    return runs


def _add_compute_matched(runs: list) -> None:
    """Insert a `topk-cm` run after each TopK run and its ReLU partner (same axes)."""
    topks = [r for r in runs if r.router == "topk"]
    if not topks:
        raise GridError("compute_match: true needs TopK runs in the grid; add topk to the "
                        "router axis or set compute_match: false")
    for spec in topks:
        partners = [r for r in runs if r.router == "relu" and all(
            r.axes.get(a) == v for a, v in spec.axes.items() if a != "router")]
        if not partners:
            raise GridError(f"compute_match: TopK run {spec.name} has no ReLU run with the "
                            "same axes; add relu to the router axis or set compute_match: "
                            "false")
        partner = partners[0]  # several (e.g. a lambda_0 axis): the first in grid order
        name = CM + spec.name[len("topk"):]
        cm = RunSpec(name=name, group=CM + spec.group[len("topk"):], router=CM,
                     axes=dict(spec.axes, router=CM), fields=dict(spec.fields),
                     partner=partner.name, topk=spec.name)
        at = max(runs.index(spec), runs.index(partner)) + 1
        while at < len(runs) and runs[at].router == CM:
            at += 1
        runs.insert(at, cm)


def _default(f: dict, name: str):
    return f[name] if name in f else FIELDS[name].default


def _check_run(spec: RunSpec) -> None:
    """Contradictions visible without data, worded with the grid's axes: k vs E, granularity vs
    width, lambda/alpha ranges. The rules are config.py's; the trainer's own validation of the
    whole run follows before anything is launched (runner.validate_fields)."""
    f = spec.fields
    if spec.router == "dense":
        return
    E, k = _default(f, "num_experts"), _default(f, "moe_router_topk")
    G = _default(f, "moe_granularity")
    try:
        check_topk_range(k, E, names=("k", "E"), tail="; change the k or E axis")
        check_granularity(G, f.get("ffn_hidden_size") or default_ffn_hidden_size(f.get("hidden_size") or 0),
                          name="G", range_tail="; fix the G axis", divides="does not divide",
                          divide_tail="; pick a divisor")
        if spec.router == "relu":
            check_l1_coeff_init(_default(f, "moe_relu_l1_reg_coeff_init"), what="lambda_0",
                                tail="; fix the lambda_0 axis")
            check_l1_multiplier(_default(f, "moe_relu_l1_reg_coeff_multiplier"), what="alpha",
                                tail="; fix the alpha axis")
    except ConfigError as e:
        raise GridError(f"run {spec.name}: {e}") from None
