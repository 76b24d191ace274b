"""Config-driven ablations: TopK vs ReLU routing (and dense) over a YAML grid.

A grid file names a base TrainConfig and axes (router, E, G, k, seed, lambda_0, alpha, load
balancing, controller, or any TrainConfig field). `expand_grid` turns it into named runs; `run_grid`
trains them one after another (each run is `python -m megatron.remoe.pretrain --config
<run>/config.yaml`, the demo's launcher) or prints their launch lines, skipping finished runs;
`collect` reads every run's `metrics.jsonl` + `summary.json` and writes a CSV, Markdown tables (mean
and std over seeds; paired differences over seeds; time to TopK's final validation loss; Stage III
steadiness; per-layer allocation), a JSON file with the traces, and PNG plots. The definitions used
below (stages, settling time, FLOPs, compute matching, time to quality) are documented in
docs/results.md.

Grid file keys:

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
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass
from typing import Optional

import yaml

from megatron.remoe.config import ROUTERS, ConfigError

GRID_KEYS = ("name", "description", "out", "config", "base", "demo_data", "axes",
             "compute_match", "checkpoints", "nproc", "settle_window", "settle_tol")
AXIS_ALIASES = {"E": "num_experts", "G": "moe_granularity", "k": "moe_router_topk",
                "lambda_0": "moe_relu_l1_reg_coeff_init",
                "alpha": "moe_relu_l1_reg_coeff_multiplier", "load_balancing": "load_balancing",
                "controller": "moe_relu_l1_reg_coeff_controller"}
SHORT = {"num_experts": "E", "moe_granularity": "G", "moe_router_topk": "k", "seed": "s",
         "moe_relu_l1_reg_coeff_init": "l0_", "moe_relu_l1_reg_coeff_multiplier": "a",
         "moe_relu_l1_reg_coeff_controller": "ctl_"}
# Output-location fields: the grid sets them per run; differences here do not make a new run.
LOCATION_FIELDS = ("save", "load", "metrics_file", "data_cache_path")
CM = "topk-cm"


class GridError(ConfigError):
    """A grid file or CLI value is invalid; the message names the value and the fix."""


# ------------------------------------------------------------------------------------------------
# Grid expansion
# ------------------------------------------------------------------------------------------------
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


def _fields():
    from megatron.remoe.arguments import FIELDS

    return FIELDS


def _canonical_axis(key: str) -> str:
    from megatron.remoe.arguments import _close_match

    if key in AXIS_ALIASES:
        return AXIS_ALIASES[key]
    name = str(key).replace("-", "_")
    if name in _fields():
        return name
    hint = _close_match(name)
    raise GridError(f"axes: unknown axis {key!r}" + (f" (did you mean {hint!r}?)" if hint else "")
                    + "; use router, E, G, k, seed, lambda_0, alpha, load_balancing, controller "
                    "or a TrainConfig field")


def _coerce_axis(axis: str, values) -> list:
    from megatron.remoe.arguments import _coerce

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
            v = _coerce(axis, v)
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
    if axis in ("router", "seed") or _fields()[axis].metadata["group"] != "moe":
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
            ffn = fields.get("ffn_hidden_size") or 4 * fields["hidden_size"]
            fields["ffn_hidden_size"] = k * ffn
        for name in list(fields):
            if name != "router" and _fields()[name].metadata["group"] == "moe":
                fields.pop(name)
    return fields


def load_grid(path: str, out: Optional[str] = None, overrides: Optional[dict] = None) -> Grid:
    """Read and expand a grid file. Raises GridError (one line) on any problem; writes nothing."""
    from megatron.remoe.arguments import _coerce, load_yaml_config, read_yaml_mapping

    raw = read_yaml_mapping(path, what="grid", fix="fix the path", error=GridError)
    unknown = sorted(set(raw) - set(GRID_KEYS))
    if unknown:
        raise GridError(f"grid {path}: unknown key {unknown[0]!r}; allowed: {', '.join(GRID_KEYS)}")
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
        if name not in _fields():
            from megatron.remoe.arguments import _close_match

            hint = _close_match(name)
            raise GridError(f"grid {path}: unknown TrainConfig field {key!r}"
                            + (f" (did you mean {hint!r}?)" if hint else "")
                            + "; fix the spelling")
        base[name] = value
    base = {k: _coerce(k, v) for k, v in base.items()}
    for name in ("save", "load", "metrics_file"):
        base.pop(name, None)  # every run gets its own directory
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
    nproc = raw.get("nproc", 1)
    if not isinstance(nproc, int) or nproc < 1:
        raise GridError(f"grid {path}: nproc={nproc!r} must be an integer >= 1")
    window = raw.get("settle_window", 20)
    if not isinstance(window, int) or window < 1:
        raise GridError(f"grid {path}: settle_window={window!r} must be an integer >= 1")
    tol = float(raw.get("settle_tol", 0.01))
    demo = raw.get("demo_data")
    if demo is not None:
        if demo is True:
            demo = {}
        if not isinstance(demo, dict) or set(demo) - {"dir", "vocab_size"}:
            raise GridError(f"grid {path}: demo_data takes {{dir: DIR, vocab_size: N}}")
        demo = {"dir": demo.get("dir", "runs/demo/data"),
                "vocab_size": int(demo.get("vocab_size", 8192))}
        for name in ("data_path", "valid_data_path", "tokenizer", "mock_data"):
            if base.get(name):
                raise GridError(f"grid {path}: demo_data and base {name} are exclusive; drop one")
    grid = Grid(name=str(raw.get("name") or os.path.splitext(os.path.basename(path))[0]),
                path=path, base=base, axes=axes, runs=[],
                out=out or raw.get("out") or os.path.join("runs", "ablations", str(
                    raw.get("name") or os.path.splitext(os.path.basename(path))[0])),
                demo_data=demo, compute_match=bool(raw.get("compute_match", False)),
                checkpoints=bool(raw.get("checkpoints", True)), nproc=nproc,
                settle_window=window, settle_tol=tol,
                description=str(raw.get("description") or ""))
    grid.runs = expand(grid)
    return grid


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
    return runs


def _check_run(spec: RunSpec) -> None:
    """Contradictions visible without data: k vs E, granularity vs width, lambda/alpha ranges."""
    f = spec.fields
    if spec.router == "dense":
        return
    E, k, G = f.get("num_experts", 8), f.get("moe_router_topk", 1), f.get("moe_granularity", 1)
    if not 1 <= k <= E:
        raise GridError(f"run {spec.name}: k={k} must be in [1, E={E}]; change the k or E axis")
    if G < 1:
        raise GridError(f"run {spec.name}: G={G} must be >= 1; fix the G axis")
    ffn = f.get("ffn_hidden_size") or 4 * (f.get("hidden_size") or 0)
    if ffn and ffn % G:
        raise GridError(f"run {spec.name}: G={G} does not divide the expert width {ffn}; pick "
                        "a divisor")
    if spec.router == "relu":
        if f.get("moe_relu_l1_reg_coeff_init", 1e-8) <= 0:
            raise GridError(f"run {spec.name}: lambda_0 must be > 0 (the update is "
                            "multiplicative); fix the lambda_0 axis")
        if f.get("moe_relu_l1_reg_coeff_multiplier", 1.2) <= 1:
            raise GridError(f"run {spec.name}: alpha must be > 1; fix the alpha axis")


# ------------------------------------------------------------------------------------------------
# Per-run files and status
# ------------------------------------------------------------------------------------------------
def run_dir(grid: Grid, name: str) -> str:
    return os.path.join(grid.out, name)


def read_summary(path: str) -> Optional[dict]:
    try:
        with open(os.path.join(path, "summary.json"), encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


def is_finished(path: str, train_iters: int) -> bool:
    """A finished run: summary.json exists and says iterations == train_iters."""
    summary = read_summary(path)
    return bool(summary) and summary.get("iterations") == train_iters


def read_metrics(path: str) -> tuple[list, list]:
    """(train records, valid records) of a run's metrics.jsonl, one per iteration (the last one
    written wins: a resumed run re-logs the steps after its last checkpoint), sorted."""
    train, valid = {}, {}
    file = os.path.join(path, "metrics.jsonl")
    if os.path.isfile(file):
        with open(file, encoding="utf-8") as fh:
            for line in fh:
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue  # a line cut by a crash
                (valid if rec.get("split") == "valid" else train)[rec["iteration"]] = rec
    return [train[i] for i in sorted(train)], [valid[i] for i in sorted(valid)]


# ------------------------------------------------------------------------------------------------
# Stages, settling, FLOPs, compute matching
# ------------------------------------------------------------------------------------------------
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


def moe_layer_count(num_layers: int, freq) -> int:
    """Megatron's moe_layer_freq: an int N puts MoE in layers 0, N, 2N, ...; a list is a 0/1
    pattern."""
    if isinstance(freq, list):
        return sum(1 for x in freq if int(x))
    freq = int(freq or 1)
    return sum(1 for i in range(num_layers) if i % freq == 0)


def flops_per_token(cfg: dict, vocab_size: int, experts_per_token: Optional[float] = None
                    ) -> dict:
    """Training FLOPs per token (forward + backward = 3 x forward) of a LLaMA-style GPT.

    forward = 2 x (matmul parameters a token uses: attention projections, the experts it is
    routed to, the router, dense MLPs, the output layer) + causal attention 2 x seq x heads x
    head_dim per layer (QK^T and AV, half of the full 4 s d). Norms, softmax, activations and
    the input embedding lookup are not counted. `experts_per_token` (after granularity) defaults
    to k*G; pass the measured E*G*(1 - sparsity) for a ReLU step.
    Returns train FLOPs, the MoE experts' share of them at k*G experts, and the expert FLOPs of
    one expert in all MoE layers (train)."""
    h, L, s = cfg["hidden_size"], cfg["num_layers"], cfg["seq_length"]
    heads = cfg["num_attention_heads"]
    groups = cfg.get("num_query_groups") or heads
    hd = cfg.get("kv_channels") or h // heads
    ffn = cfg.get("ffn_hidden_size") or 4 * h
    glu = 3  # SwiGLU: gate, up, down
    attn = h * hd * (heads + 2 * groups) + heads * hd * h
    core = 2 * s * heads * hd
    router = cfg.get("router", "relu")
    if router == "dense":
        n_moe, e_tot, k_tot, expert = 0, 0, 0, 0
    else:
        G = cfg.get("moe_granularity", 1)
        e_tot = cfg.get("num_experts", 8) * G
        k_tot = cfg.get("moe_router_topk", 1) * G
        expert = glu * h * (ffn // G)
        n_moe = moe_layer_count(L, cfg.get("moe_layer_freq", 1))
    active = k_tot if experts_per_token is None else experts_per_token
    dense_mlp = glu * h * ffn
    matmul = L * attn + n_moe * (active * expert + e_tot * h) + (L - n_moe) * dense_mlp \
        + vocab_size * h
    forward = 2 * matmul + L * core
    at_k = 2 * (matmul - n_moe * (active - k_tot) * expert) + L * core
    return {"train": 3 * forward,
            "moe_share": (3 * 2 * n_moe * k_tot * expert / (3 * at_k)) if n_moe else 0.0,
            "expert_train": 3 * 2 * n_moe * expert}


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


def time_to_quality(valid_steps: list, valid_losses: list, target_loss: float,
                    cum_flops: list, tokens_per_step: int, first_step: int = 1
                    ) -> Optional[dict]:
    """When a run's validation curve first reaches `target_loss` (e.g. TopK's final loss).

    The step is interpolated linearly between the two evaluations that bracket the crossing; if
    the first evaluation is already at or below the target, it is that evaluation's step (an
    upper bound: the curve before it is not measured). Tokens = step x tokens per step; FLOPs =
    the run's cumulative training FLOPs up to that step (`cum_flops[i]` = after step
    first_step + i; Stage I/II included for ReLU), interpolated within the step. None if the
    curve never reaches the target."""
    prev = None
    for step, loss in zip(valid_steps, valid_losses):
        if loss <= target_loss:
            if prev is None or prev[1] == loss:
                at = float(step)
            else:
                at = prev[0] + (prev[1] - target_loss) / (prev[1] - loss) * (step - prev[0])
            done = at - first_step + 1  # steps completed (fractional)
            whole = int(math.floor(done))
            before = cum_flops[whole - 1] if whole >= 1 else 0.0
            after = cum_flops[min(whole, len(cum_flops) - 1)]
            flops = before + (done - whole) * (after - before) if whole < len(cum_flops) \
                else cum_flops[-1]
            return {"step": at, "tokens": at * tokens_per_step, "flops": flops,
                    "bound": prev is None}
        prev = (step, loss)
    return None


def student_t_two_sided_p(t: float, df: int) -> float:
    """Two-sided p-value of Student's t with `df` degrees of freedom (regularised incomplete
    beta, I_x(df/2, 1/2) with x = df / (df + t^2); continued fraction, Numerical Recipes 6.4)."""
    if math.isinf(t):
        return 0.0
    x = df / (df + t * t)
    a, b = df / 2.0, 0.5
    if x <= 0.0:
        return 0.0
    if x >= 1.0:  # t = 0
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                     + a * math.log(x) + b * math.log1p(-x))

    def cf(a, b, x):
        tiny = 1e-300
        c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
        d = 1.0 / (d if abs(d) > tiny else tiny)
        h = d
        for m in range(1, 300):
            m2 = 2 * m
            for num in (m * (b - m) * x / ((a + m2 - 1) * (a + m2)),
                        -(a + m) * (a + b + m) * x / ((a + m2) * (a + m2 + 1))):
                d = 1.0 + num * d
                d = 1.0 / (d if abs(d) > tiny else tiny)
                c = 1.0 + num / c
                c = c if abs(c) > tiny else tiny
                h *= d * c
            if abs(d * c - 1.0) < 1e-15:
                break
        return h

    if x < (a + 1.0) / (a + b + 2.0):
        return front * cf(a, b, x) / a
    return 1.0 - front * cf(b, a, 1.0 - x) / b


def paired_comparison(a: dict, b: dict) -> Optional[dict]:
    """Paired test over seeds of two groups' per-seed values ({seed: value}): differences
    d = a - b on the common seeds, their mean and sample std, t = mean / (std / sqrt(n)), the
    two-sided p (df = n - 1), and how many seeds have the sign of the mean. None below 2 seeds."""
    seeds = sorted(set(a) & set(b), key=str)
    d = [a[s] - b[s] for s in seeds if a[s] is not None and b[s] is not None]
    n = len(d)
    if n < 2:
        return None
    mean = sum(d) / n
    std = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1))
    t = mean / (std / math.sqrt(n)) if std > 0 else math.copysign(math.inf, mean) if mean else 0.0
    p = student_t_two_sided_p(t, n - 1) if mean else 1.0
    same_sign = sum(1 for x in d if x * mean > 0)
    return {"n": n, "mean": mean, "std": std, "t": t, "p": p, "same_sign": same_sign}


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


LAYER_KEY = re.compile(r"^moe/layer_(\d+)/(sparsity|zero_expert_tokens|dead_experts)$")


def layer_allocation(train: list, fraction: float = 0.1) -> dict:
    """Per-layer routing at the end of a run: mean sparsity and zero-expert-token fraction over
    the last `fraction` of the steps (at least 10), and the dead experts of the last logging
    window (experts that got no token during it). Keys layer{N}_sparsity / _zero_tokens /
    _dead_experts."""
    if not train:
        return {}
    tail = train[-max(10, int(len(train) * fraction)):]
    sums: dict = {}
    out: dict = {}
    for rec in tail:
        for key, value in rec.items():
            m = LAYER_KEY.match(key)
            if not m or value is None:
                continue
            layer, what = int(m.group(1)), m.group(2)
            if what == "dead_experts":
                continue
            sums.setdefault((layer, what), []).append(value)
    for (layer, what), vals in sorted(sums.items()):
        name = "sparsity" if what == "sparsity" else "zero_tokens"
        out[f"layer{layer}_{name}"] = sum(vals) / len(vals)
    for rec in reversed(train):
        dead = {int(LAYER_KEY.match(k).group(1)): v for k, v in rec.items()
                if LAYER_KEY.match(k) and k.endswith("/dead_experts")}
        if dead:
            for layer in sorted(dead):
                out[f"layer{layer}_dead_experts"] = dead[layer]
            break
    return out


def vocab_from_params(params: dict, hidden: int) -> int:
    """The padded vocabulary: summary params count 2 x vocab x hidden embedding parameters."""
    return int(round((params["active"] - params["active_non_embedding"]) / (2 * hidden)))


# ------------------------------------------------------------------------------------------------
# Collection
# ------------------------------------------------------------------------------------------------
def _resolved_config(path: str) -> dict:
    """A run's config.yaml with the dataclass defaults filled in (ffn, query groups)."""
    from megatron.remoe.arguments import TrainConfig, _coerce, load_yaml_config

    values = {k: _coerce(k, v) for k, v in load_yaml_config(os.path.join(path, "config.yaml"))
              .items()}
    cfg = TrainConfig(**values).to_dict()
    if cfg["ffn_hidden_size"] is None:
        cfg["ffn_hidden_size"] = 4 * cfg["hidden_size"]
    if cfg["num_query_groups"] is None:
        cfg["num_query_groups"] = cfg["num_attention_heads"]
    return cfg


def collect_run(grid: Grid, spec: RunSpec) -> Optional[dict]:
    """One finished run's record: scalars (for the CSV/table) and traces (for JSON/plots)."""
    path = run_dir(grid, spec.name)
    summary = read_summary(path)
    if not summary:
        return None
    cfg = _resolved_config(path)
    if summary.get("iterations") != cfg["train_iters"]:
        return None
    train, valid = read_metrics(path)
    steps = [r["iteration"] for r in train]
    vocab = vocab_from_params(summary["params"], cfg["hidden_size"])
    tokens_per_step = cfg["global_batch_size"] * cfg["seq_length"]
    nominal = flops_per_token(cfg, vocab)
    rec = {"name": spec.name, "group": spec.group, "router": spec.router,
           "seed": cfg["seed"], "steps": summary["iterations"]}
    for axis, value in spec.axes.items():
        if axis not in ("router", "seed"):
            rec[axis] = value
    losses = [(r["iteration"], r["valid/loss"]) for r in valid if "valid/loss" in r]
    rec["final_valid_loss"] = summary.get("valid/loss")
    if losses:
        best = min(losses, key=lambda x: x[1])
        rec["best_valid_loss"], rec["best_valid_step"] = best[1], best[0]
    domains = sorted({k.split("/")[1] for r in valid for k in r
                      if k.startswith("valid/") and k.endswith("/loss") and k != "valid/loss"})
    for d in domains:
        key = f"valid/{d}/loss"
        rec[f"final_valid_{d}"] = summary.get(key)
        vals = [r[key] for r in valid if key in r]
        rec[f"best_valid_{d}"] = min(vals) if vals else None
    rec["final_train_loss"] = summary.get("final_train_loss")
    rec["tokens_per_s"] = summary.get("tokens_per_s")
    rec["s_per_step"] = summary.get("s_per_step")
    rec["wall_s"] = summary.get("wall_s")
    rec["active_params"] = summary["params"]["active"]
    rec["active_params_non_embedding"] = summary["params"]["active_non_embedding"]
    rec["total_params"] = summary["params"]["total"]
    rec["train_flops_per_token"] = nominal["train"]
    sparsity = [r.get("moe_relu_sparsity") for r in train]
    traces = {"step": steps, "train_loss": [r.get("lm_loss") for r in train],
              "valid_step": [s for s, _ in losses], "valid_loss": [v for _, v in losses]}
    total_flops = nominal["train"] * tokens_per_step * len(train)
    per_step = [nominal["train"]] * len(train)  # train FLOPs per token of each step
    if spec.router == "relu" and sparsity and all(s is not None for s in sparsity):
        target = summary.get("target_sparsity")
        e_tot = cfg["num_experts"] * cfg["moe_granularity"]
        k_tot = cfg["moe_router_topk"] * cfg["moe_granularity"]
        stages = sparsity_stages(sparsity, target, grid.settle_tol, grid.settle_window,
                                 first_step=steps[0])
        per_step = [flops_per_token(cfg, vocab, e_tot * (1 - s))["train"] for s in sparsity]
        total_flops = sum(per_step) * tokens_per_step
        rec.update(target_sparsity=target, sparsity_first=sparsity[0],
                   sparsity_last10=summary.get("sparsity_last10"),
                   final_lambda=summary.get("final_lambda"),
                   stage2_step=stages["stage2"], reach_step=stages["reach"],
                   settle_step=stages["settle"],
                   extra_compute_steps=compute_match_extra_steps(
                       sparsity, e_tot, k_tot, nominal["moe_share"], stages["reach"],
                       steps[0]))
        lambdas = [r.get("moe_relu_l1_reg_coeff") for r in train]
        reach = None if stages["reach"] is None else stages["reach"] - steps[0]
        rec.update(stage3_steadiness(sparsity, lambdas, reach))
        traces.update(sparsity=sparsity, **{"lambda": lambdas},
                      sparsity_smooth=smooth(sparsity, grid.settle_window), stages=stages)
    if spec.router in ("relu", "topk", CM, "topk-sigmoid-bias"):
        rec.update(layer_allocation(train))
    rec["mean_train_flops_per_token"] = total_flops / (tokens_per_step * max(len(train), 1))
    rec["total_train_flops"] = total_flops
    rec["tokens"] = summary["iterations"] * tokens_per_step
    traces["cum_flops"] = list(itertools.accumulate(f * tokens_per_step for f in per_step))
    traces["tokens_per_step"] = tokens_per_step
    if spec.router == CM:
        base = grid.run(spec.topk).fields.get("train_iters")
        rec["extra_steps"] = summary["iterations"] - base
    return {"scalars": rec, "traces": traces}




def aggregate(records: list) -> list:
    """Mean and sample std over the runs of each group (runs that differ only in the seed)."""
    groups: dict = {}
    for rec in records:
        groups.setdefault(rec["group"], []).append(rec)
    out = []
    for group, recs in groups.items():
        row = {"group": group, "router": recs[0]["router"], "seeds": len(recs),
               "seed_list": " ".join(str(r["seed"]) for r in recs)}
        keys = [k for k in recs[0] if k not in ("name", "group", "router", "seed")]
        for key in keys:
            vals = [r.get(key) for r in recs]
            if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
                mean = sum(vals) / len(vals)
                std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) \
                    if len(vals) > 1 else 0.0
                row[key], row[key + "_std"] = mean, std
            elif len({repr(v) for v in vals}) == 1:
                row[key] = vals[0]
            else:
                row[key] = None  # e.g. a settle step that is None for some seeds
                row[key + "_n"] = sum(v is not None for v in vals)
        out.append(row)
    return out


def _write_csv(path: str, rows: list) -> None:
    keys: list = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in keys})


def _pm(row: dict, key: str, fmt: str = "{:.4f}") -> str:
    v = row.get(key)
    if v is None:
        n = row.get(key + "_n")
        return f"- ({n}/{row['seeds']} seeds)" if n else "-"
    text = fmt.format(v)
    if row.get("seeds", 1) > 1 and (key + "_std") in row:
        text += " ± " + fmt.format(row[key + "_std"])
    return text


def markdown_tables(grid: Grid, rows: list) -> str:
    """The main table (validation loss, sparsity, settling, cost) and a per-domain table."""
    head = ["run", "seeds", "steps", "valid loss (final)", "valid loss (best)",
            "sparsity last 10 (target)", "Stage II / III start", "settled at",
            "active params (M)", "train MFLOPs/token (at k / run mean)", "train FLOPs (total)",
            "tokens/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if r["router"] == "relu":
            sp = f"{_pm(r, 'sparsity_last10', '{:.3f}')} ({r.get('target_sparsity', 0):.3f})"
            stages = f"{_pm(r, 'stage2_step', '{:.0f}')} / {_pm(r, 'reach_step', '{:.0f}')}"
            settle = _pm(r, "settle_step", "{:.0f}")
        else:
            sp = stages = settle = "-"
        steps = _pm(r, "steps", "{:.0f}")
        cells = [f"`{r['group']}`", str(r["seeds"]), steps, _pm(r, "final_valid_loss"),
                 _pm(r, "best_valid_loss"), sp, stages, settle,
                 f"{r['active_params'] / 1e6:.2f}",
                 f"{r['train_flops_per_token'] / 1e6:.1f} / "
                 f"{r['mean_train_flops_per_token'] / 1e6:.1f}",
                 f"{r['total_train_flops']:.3g}", f"{r['tokens_per_s']:,.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    domains = sorted({k[len("final_valid_"):] for r in rows for k in r
                      if k.startswith("final_valid_") and not k.endswith(("_std", "_n"))
                      and k != "final_valid_loss"})
    if domains:
        lines += ["", "Per-domain validation loss (final, mean ± std over seeds):", "",
                  "| run | " + " | ".join(domains) + " |", "|---|" + "---|" * len(domains)]
        for r in rows:
            lines.append(f"| `{r['group']}` | " + " | ".join(
                _pm(r, f"final_valid_{d}", "{:.3f}") for d in domains) + " |")
    return "\n".join(lines) + "\n"


def collect(grid: Grid, plots: bool = True, log=print) -> dict:
    """Read every finished run, write results.csv (per run), summary.csv (per group: mean/std),
    results.md (tables), results.json (scalars + traces) and plots/*.png under grid.out."""
    records, traces, missing = [], {}, []
    for spec in grid.runs:
        got = collect_run(grid, spec)
        if got is None:
            missing.append(spec.name)
            continue
        records.append(got["scalars"])
        traces[spec.name] = got["traces"]
    os.makedirs(grid.out, exist_ok=True)
    add_time_to_quality(grid, records, traces)
    rows = aggregate(records)
    comparisons = paired_comparisons(grid, records)
    _write_csv(os.path.join(grid.out, "results.csv"), records)
    _write_csv(os.path.join(grid.out, "summary.csv"), rows)
    with open(os.path.join(grid.out, "results.json"), "w", encoding="utf-8") as fh:
        json.dump({"grid": grid.name, "runs": records, "groups": rows, "traces": traces,
                   "comparisons": comparisons, "missing": missing}, fh, indent=1)
    table = (markdown_tables(grid, rows) + markdown_comparisons(rows, comparisons)) if rows \
        else "(no finished runs)\n"
    with open(os.path.join(grid.out, "results.md"), "w", encoding="utf-8") as fh:
        fh.write(f"# Ablation `{grid.name}`: {len(records)} of {len(grid.runs)} runs finished\n\n")
        if missing:
            fh.write("Not finished: " + ", ".join(f"`{m}`" for m in missing) + "\n\n")
        fh.write(table)
    written = []
    if plots and records:
        written = make_plots(grid, records, rows, traces)
    return {"records": records, "rows": rows, "missing": missing, "table": table,
            "plots": written, "comparisons": comparisons}


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


def markdown_comparisons(rows: list, comparisons: list) -> str:
    """Tables: paired differences over seeds, time-to-quality against TopK, Stage III
    steadiness of ReLU runs, per-layer allocation at the end of the MoE runs."""
    lines = []
    if comparisons:
        lines += ["", "Paired differences over seeds (final validation loss, first minus second; "
                  "t-test on the per-seed differences):", "",
                  "| first | second | seeds | mean difference ± std | t | p (two-sided) | "
                  "seeds with that sign | larger than the seed spread (p < 0.05) |",
                  "|---|---|---|---|---|---|---|---|"]
        for c in comparisons:
            lines.append(f"| `{c['a']}` | `{c['b']}` | {c['n']} | {c['mean']:+.4f} ± "
                         f"{c['std']:.4f} | {c['t']:.2f} | {c['p']:.3g} | {c['same_sign']}/"
                         f"{c['n']} | {'yes' if c['p'] < 0.05 else 'no'} |")
    ttq = [r for r in rows if r.get("ttq_target_loss") is not None]
    if ttq:
        lines += ["", "Time to quality: when the run's validation curve reaches the final "
                  "validation loss of the TopK run with the same seed and axes (ratio to the "
                  "TopK run's total tokens / train FLOPs; < 1 = sooner):", "",
                  "| run | TopK final loss | reached (seeds) | step | tokens ratio | "
                  "FLOPs ratio |", "|---|---|---|---|---|---|"]
        for r in ttq:
            n = round(r.get("ttq_reached", 0) * r["seeds"])  # mean of 1/0 over seeds
            lines.append(f"| `{r['group']}` | {_pm(r, 'ttq_target_loss')} | {n}/{r['seeds']} "
                         f"| {_pm(r, 'ttq_step', '{:.0f}')} | "
                         f"{_pm(r, 'ttq_tokens_ratio', '{:.3f}')} | "
                         f"{_pm(r, 'ttq_flops_ratio', '{:.3f}')} |")
    relu = [r for r in rows if r["router"] == "relu"]
    if relu:
        lines += ["", "ReLU runs, Stage III (from the first step at target to the end):", "",
                  "| run | Stage III from | settled at | std of S | log10 lambda range | "
                  "final lambda | valid loss (final) |", "|---|---|---|---|---|---|---|"]
        for r in relu:
            lines.append(f"| `{r['group']}` | {_pm(r, 'reach_step', '{:.0f}')} | "
                         f"{_pm(r, 'settle_step', '{:.0f}')} | "
                         f"{_pm(r, 'stage3_sparsity_std', '{:.4f}')} | "
                         f"{_pm(r, 'stage3_log10_lambda_range', '{:.2f}')} | "
                         f"{_pm(r, 'final_lambda', '{:.2e}')} | {_pm(r, 'final_valid_loss')} |")
    layered = [r for r in rows if any(k.startswith("layer") and k.endswith("_sparsity")
                                      for k in r)]
    if layered:
        layers = sorted({int(k[5:-len("_sparsity")]) for r in layered for k in r
                         if re.fullmatch(r"layer\d+_sparsity", k)})
        lines += ["", "Per-layer allocation at the end of the run (last 10% of steps: sparsity / "
                  "fraction of tokens with no expert; dead experts in the last logging window):",
                  "", "| run | " + " | ".join(f"layer {n}" for n in layers) + " |",
                  "|---|" + "---|" * len(layers)]
        for r in layered:
            cells = [f"{_pm(r, f'layer{n}_sparsity', '{:.3f}')} / "
                     f"{_pm(r, f'layer{n}_zero_tokens', '{:.3f}')} / "
                     f"{_pm(r, f'layer{n}_dead_experts', '{:.1f}')}" for n in layers]
            lines.append(f"| `{r['group']}` | " + " | ".join(cells) + " |")
    return "\n".join(lines) + ("\n" if lines else "")


# ------------------------------------------------------------------------------------------------
# Plots
# ------------------------------------------------------------------------------------------------
def make_plots(grid: Grid, records: list, rows: list, traces: dict) -> list:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = os.path.join(grid.out, "plots")
    os.makedirs(out, exist_ok=True)
    written = []
    groups = list(dict.fromkeys(r["group"] for r in records))
    colors = {g: plt.cm.tab10(i % 10) for i, g in enumerate(groups)}
    seeds = list(dict.fromkeys(r["seed"] for r in records))
    styles = ["-", "--", ":", "-."]

    # 1. validation loss curves, one line per run
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for r in records:
        t = traces[r["name"]]
        if t["valid_step"]:
            ax.plot(t["valid_step"], t["valid_loss"], styles[seeds.index(r["seed"]) % 4],
                    marker="o", ms=3, color=colors[r["group"]],
                    label=f"{r['group']} (seed {r['seed']})")
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss")
    ax.set_title(f"{grid.name}: validation loss per run")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    written.append(_save(fig, os.path.join(out, "valid_loss.png")))

    # 2. sparsity and lambda with the three stages
    relu = [r for r in records if r["router"] == "relu" and "sparsity" in traces[r["name"]]]
    if relu:
        fig, (a1, a2) = plt.subplots(2, 1, figsize=(7.5, 6), sharex=True)
        for r in relu:
            t = traces[r["name"]]
            c = colors[r["group"]]
            ls = styles[seeds.index(r["seed"]) % 4]
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
        relu_groups = {r["group"] for r in relu}
        if len(relu_groups) == 1:  # shade the stages at the mean boundaries
            s2 = [traces[r["name"]]["stages"]["stage2"] for r in relu]
            s3 = [traces[r["name"]]["stages"]["reach"] for r in relu]
            end = max(traces[r["name"]]["step"][-1] for r in relu)
            if all(x is not None for x in s2 + s3):
                b2, b3 = sum(s2) / len(s2), sum(s3) / len(s3)
                for (lo, hi, label, col) in ((1, b2, "I", "tab:blue"), (b2, b3, "II", "tab:orange"),
                                             (b3, end, "III", "tab:green")):
                    for a in (a1, a2):
                        a.axvspan(lo, hi, color=col, alpha=0.06)
                    a1.text((lo + hi) / 2, 0.02, f"Stage {label}", ha="center", fontsize=8,
                            transform=a1.get_xaxis_transform())
        a1.set_ylabel(f"sparsity ({grid.settle_window}-step mean; raw faint)")
        a1.set_title(f"{grid.name}: ReLU sparsity and lambda (target ± {grid.settle_tol})")
        a1.legend(fontsize=7)
        a1.grid(alpha=0.3)
        a2.set_ylabel("lambda (L1 coefficient)")
        a2.set_xlabel("step")
        a2.grid(alpha=0.3)
        written.append(_save(fig, os.path.join(out, "sparsity_lambda.png")))

    # 3. final loss vs E and vs G, one line per router
    for axis, label in (("num_experts", "E"), ("moe_granularity", "G")):
        if len(grid.axes.get(axis, [])) < 2:
            continue
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
        written.append(_save(fig, os.path.join(out, f"loss_vs_{label}.png")))
    return written


def _save(fig, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------------
# Running
# ------------------------------------------------------------------------------------------------
def data_fields(grid: Grid, log=print) -> dict:
    """Data fields for every run: the demo corpus (built or reused) or nothing (base has them)."""
    if grid.demo_data is None:
        return {}
    from megatron.remoe.data.demo import prepare_demo_data
    from megatron.remoe.demo import demo_data_fields

    log(f"ablate: demo data in {grid.demo_data['dir']} (built on first use, then reused)")
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
    import torch

    from megatron.remoe.arguments import TrainConfig, _coerce, finalize_config

    values = {k: _coerce(k, v) for k, v in fields.items()}
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


def _existing_config(path: str) -> Optional[dict]:
    file = os.path.join(path, "config.yaml")
    if not os.path.isfile(file):
        return None
    with open(file, encoding="utf-8") as fh:
        return yaml.safe_load(fh) or {}


def _cm_extra_steps(grid: Grid, spec: RunSpec) -> Optional[int]:
    """Extra TopK steps for a topk-cm run, from its finished ReLU partner (None: not yet)."""
    got = collect_run(grid, grid.run(spec.partner))
    if got is None:
        return None
    return int(math.ceil(got["scalars"]["extra_compute_steps"]))


def _launch_line(template: str, config: str, name: str, directory: str) -> str:
    return template.format(config=config, name=name, dir=directory)


def run_grid(grid: Grid, mode: str = "run", launcher: Optional[str] = None,
             only: Optional[list] = None, log=print) -> int:
    """mode 'run': train the unfinished runs one after another, then collect. mode 'print':
    write each run's config.yaml and print its launch line (no training). mode 'collect': only
    collect. Returns 0 if every selected run is finished, 1 otherwise."""
    selected = [r for r in grid.runs if not only or any(re.fullmatch(p, r.name) or p == r.name
                                                        for p in only)]
    if only and not selected:
        raise GridError(f"--only {' '.join(only)} matches no run; runs are: "
                        + ", ".join(r.name for r in grid.runs))
    if mode == "collect":
        return _finish(grid, selected, log)
    data = data_fields(grid, log)
    # validate every run and check existing run directories before writing anything
    planned = {}
    for spec in selected:
        fields = run_fields(grid, spec, data)
        validate_fields(fields, grid.nproc, check_data=mode == "run" or bool(data),
                        check_device=mode == "run")
        planned[spec.name] = fields
        old = _existing_config(run_dir(grid, spec.name))
        if old is not None and spec.router != CM:
            why = _diff(old, fields)
            if why:
                raise GridError(f"run {spec.name} in {grid.out} was made with a different config "
                                f"({why}); use another --out or delete {run_dir(grid, spec.name)}")
    os.makedirs(grid.out, exist_ok=True)
    with open(os.path.join(grid.out, "grid.json"), "w", encoding="utf-8") as fh:
        json.dump({"grid": grid.path, "name": grid.name, "base": grid.base, "axes": grid.axes,
                   "runs": [r.name for r in grid.runs]}, fh, indent=1, default=str)
    failed, printed = [], []
    n = len(selected)
    template = launcher or ("torchrun --nproc-per-node {nproc} -m megatron.remoe.pretrain "
                            "--config {config}" if grid.nproc > 1 else
                            "python -m megatron.remoe.pretrain --config {config}")
    template = template.replace("{nproc}", str(grid.nproc))
    from megatron.remoe.metrics_logging import format_duration

    grid_start = time.time()
    for i, spec in enumerate(selected, 1):
        path = run_dir(grid, spec.name)
        tag = f"[{i}/{n}] {spec.name}"
        fields = planned[spec.name]
        if spec.router == CM:
            extra = _cm_extra_steps(grid, spec)
            if extra is None:
                msg = (f"{tag}: waits for {spec.partner} (compute matching needs its sparsity "
                       "trace); rerun after it finishes")
                log(("# " if mode == "print" else "") + msg)
                failed.append(spec.name)
                continue
            fields = run_fields(grid, spec, data, extra)
            old = _existing_config(path)
            why = _diff(old, fields) if old is not None else None
            if why:
                raise GridError(f"run {spec.name} in {grid.out} was made with a different config "
                                f"({why}); use another --out or delete {path}")
        if is_finished(path, fields["train_iters"]):
            log(f"{'# ' if mode == 'print' else ''}{tag}: finished earlier "
                f"({fields['train_iters']} steps), skipped")
            continue
        os.makedirs(path, exist_ok=True)
        config_path = os.path.join(path, "config.yaml")
        with open(config_path, "w", encoding="utf-8") as fh:
            yaml.safe_dump(fields, fh, sort_keys=False)
        if mode == "print":
            log(_launch_line(template, config_path, spec.name, path))
            printed.append(spec.name)
            continue
        if not grid.checkpoints:  # no checkpoint to resume from: a partial run starts over
            for stale in ("metrics.jsonl", "summary.json"):
                if os.path.exists(os.path.join(path, stale)):
                    os.remove(os.path.join(path, stale))
        rc, seconds = _train(spec, config_path, path, grid.nproc, tag, fields, log)
        if rc != 0:
            log(f"{tag}: FAILED (exit code {rc}) after {format_duration(seconds)}; see "
                f"{os.path.join(path, 'train.log')}")
            failed.append(spec.name)
            continue
        got = collect_run(grid, spec)
        if got is None:
            log(f"{tag}: exited 0 but summary.json does not show {fields['train_iters']} steps")
            failed.append(spec.name)
            continue
        log(f"{tag}: done in {format_duration(seconds)} (grid "
            f"{format_duration(time.time() - grid_start)}): " + _one_line(got["scalars"]))
    if mode == "print":
        log(f"# {len(printed)} launch line(s)" + (f", {len(failed)} run(s) waiting" if failed
                                                  else "")
            + "; when the jobs are done, rerun with --print (waiting runs) or --collect")
        return 0
    code = _finish(grid, selected, log)
    return 1 if failed else code


def _one_line(s: dict) -> str:
    parts = [f"valid loss {s['final_valid_loss']:.4f}" if s.get("final_valid_loss") else
             "no validation"]
    if s.get("best_valid_loss") is not None:
        parts[-1] += f" (best {s['best_valid_loss']:.4f})"
    if s.get("sparsity_last10") is not None:
        settle = s.get("settle_step")
        parts.append(f"sparsity {s['sparsity_last10']:.3f}/{s['target_sparsity']:.3f}, "
                     f"stage III from step {s.get('reach_step')}, settled "
                     + (f"at step {settle}" if settle else "never"))
    if s.get("extra_steps") is not None:
        parts.append(f"{s['extra_steps']} extra steps")
    parts.append(f"{s['tokens_per_s']:,.0f} tok/s")
    return "; ".join(parts)


def _train(spec: RunSpec, config_path: str, path: str, nproc: int, tag: str, fields: dict,
           log) -> tuple[int, float]:
    from megatron.remoe.demo import run_logged, training_command

    cmd = training_command(config_path, nproc)
    resume = os.path.isdir(os.path.join(path, "checkpoints"))
    log(f"{tag}: training {fields['train_iters']} steps"
        + (" (resuming from its checkpoints)" if resume else "") + f": {' '.join(cmd)}")
    t0 = time.time()

    def echo(line: str) -> bool:
        return line.startswith(("[eval", "error", "Traceback", "checkpoint: resumed")) or \
            "Error" in line

    # the trainer must import this checkout whatever the working directory
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    pythonpath = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    rc = run_logged(cmd, os.path.join(path, "train.log"), nproc, echo=echo,
                    mode="a" if resume else "w", extra_env={"PYTHONPATH": pythonpath})
    return rc, time.time() - t0


def _finish(grid: Grid, selected: list, log) -> int:
    result = collect(grid, log=log)
    log(f"\nablate: {len(result['records'])} of {len(grid.runs)} runs finished; "
        f"{os.path.join(grid.out, 'results.md')}, results.csv, summary.csv, results.json"
        + (f", plots/ ({len(result['plots'])} PNG)" if result["plots"] else ""))
    log("\n" + result["table"])
    names = {s.name for s in selected}
    return 1 if any(m in names for m in result["missing"]) else 0


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------
def build_parser(prog: str = "remoe ablate"):
    import argparse

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


def main(argv: Optional[list] = None, prog: str = "remoe ablate") -> int:
    import warnings

    warnings.filterwarnings("ignore", category=UserWarning)  # megatron-core "Apex missing"
    args = build_parser(prog).parse_args(argv)
    try:
        grid = load_grid(args.grid, out=args.out, overrides=_parse_sets(args.set))
        if args.list:
            for spec in grid.runs:
                extra = f" (TopK + Stage I/II compute of {spec.partner})" if spec.partner else ""
                summary = read_summary(run_dir(grid, spec.name)) or {}
                done = summary.get("iterations") == spec.fields.get("train_iters") or (
                    spec.router == CM and summary.get("iterations"))
                state = "(finished)" if done else ""
                print(f"{spec.name}{extra} {state}".rstrip())
            print(f"{len(grid.runs)} runs -> {grid.out}")
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


if __name__ == "__main__":
    sys.exit(main())
