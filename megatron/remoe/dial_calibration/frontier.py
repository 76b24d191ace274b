"""The dial across models and seeds: dialled ReMoE sweeps, models trained from scratch at lower
targets (the reference frontier) and TopK at k' = 1..E, gathered from `remoe dial` outputs into one
table and one figure (`tools/dial_frontier.py`, docs/compute-dial.md).

Inputs are `remoe dial` output folders named `GROUP-sSEED`: a sweep folder (sweep.json: every point
of the sweep, the TopK points included) or a single-dial folder (dial.json: one point; with
`--thresholds 0` it is the model as trained). TopK points form the group `topk` whichever folder
they come from; a folder named `topk-sSEED` contributes only its TopK points (a sweep run for them).
Points of one group and one setting (model, method, form, target) are averaged over seeds; a sweep's
loss change is paired with its own undialled point.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import statistics
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

from megatron.remoe.dial_calibration.sweep import finish_loss_figure
from megatron.remoe.errors import ConfigError

TOPK_GROUP = "topk"
RUN_NAME = re.compile(r"^(?P<group>.+)-s(?P<seed>\d+)$")


class FrontierError(ConfigError):
    """A missing or malformed `remoe dial` output; the message names the folder."""


@dataclass(frozen=True)
class Point:
    """One evaluated setting of one seed's model on the held-out tokens."""

    group: str  # e.g. relu, elastic, frontier-0.5 (the folder name without -sSEED)
    seed: int
    model: str  # ReMoE | TopK
    method: str  # undialled | global | per-layer | thresholds | topk
    form: str  # cut | shift | -
    target: Optional[float]  # experts/token asked for (None: undialled, thresholds, TopK)
    topk: Optional[int]  # TopK's k' (None for ReMoE)
    experts_per_token: float
    valid_loss: float
    forward_mflops: float
    expert_mflops: float
    base_loss: Optional[float]  # the same seed's undialled loss (paired changes); None for TopK

    @property
    def setting(self) -> tuple:
        return (self.group, self.model, self.method, self.form, self.target, self.topk)


def parse_run_name(name: str) -> tuple:
    m = RUN_NAME.match(name)
    if not m:
        raise FrontierError(f"run name {name!r}: expected GROUP-sSEED, e.g. relu-s1 or frontier-0.5-s2")
    return m["group"], int(m["seed"])


def _point(group: str, seed: int, d: dict, base_loss: Optional[float]) -> Point:
    topk = d.get("topk") if d.get("model") == "TopK" else None
    if d.get("model") == "TopK" and topk is None:
        topk = round(d["experts_per_token"])
    return Point(group, seed, d.get("model", "ReMoE"), d["method"], d.get("form", "-"),
                 d.get("target"), topk, float(d["experts_per_token"]), float(d["valid_loss"]),
                 float(d["forward_flops_per_token"]) / 1e6, float(d["expert_flops_per_token"]) / 1e6,
                 None if d.get("model") == "TopK" else base_loss)


def load_run(name: str, folder: str) -> list:
    """The points of one `remoe dial` output folder (sweep.json or dial.json)."""
    group, seed = parse_run_name(name)
    sweep, single = os.path.join(folder, "sweep.json"), os.path.join(folder, "dial.json")
    if os.path.exists(sweep):
        with open(sweep, encoding="utf-8") as fh:
            data = json.load(fh)
        raw = data["points"]
        for p in raw:  # targets as asked (multiple x trained k): the same across seeds, where the
            mult = p.get("extra", {}).get("multiple")  # clipped target is each model's own maximum
            if mult not in (None, ""):
                p["target"] = float(mult) * data.get("trained_topk", 1)
        base = [p for p in raw if p["method"] == "undialled"]
        if len(base) != 1:
            raise FrontierError(f"{sweep}: expected one undialled point, found {len(base)}")
        return [_point(TOPK_GROUP if p.get("model") == "TopK" else group, seed, p, base[0]["valid_loss"])
                for p in raw if group != TOPK_GROUP or p.get("model") == "TopK"]
    if os.path.exists(single):
        with open(single, encoding="utf-8") as fh:
            d = json.load(fh)
        und = d["undialled"]
        point = dict(d, model="ReMoE", target=d.get("target_experts_per_token"),
                     expert_flops_per_token=d["expert_flops_per_token"])
        if not any(d["thresholds"]):  # tau = 0 everywhere: the model as trained
            point.update(method="undialled", form="-", target=None)
        return [_point(group, seed, point, und["valid_loss"])]
    raise FrontierError(f"{folder}: no sweep.json or dial.json (a `remoe dial` output folder)")


def mean_std(values: Sequence[float]) -> tuple:
    """(mean, sample std); std is nan for one value."""
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else float("nan"))


@dataclass(frozen=True)
class Row:
    """One setting averaged over seeds."""

    group: str
    model: str
    method: str
    form: str
    target: Optional[float]
    topk: Optional[int]
    seeds: tuple
    experts_per_token: tuple  # (mean, std)
    valid_loss: tuple
    loss_change: tuple  # paired with each seed's undialled loss; (nan, nan) for TopK
    forward_mflops: tuple
    expert_mflops: tuple

    @property
    def label(self) -> str:
        if self.model == "TopK":
            return f"TopK k'={self.topk}"
        if self.method == "undialled":
            return f"{self.group} as trained"
        return f"{self.group} {self.method} {self.form}"


def summarise(points: Iterable[Point]) -> list:
    """Average every setting over its seeds (settings keep the order of first appearance)."""
    by_setting: dict = {}
    for p in points:
        by_setting.setdefault(p.setting, []).append(p)
    rows = []
    for (group, model, method, form, target, topk), ps in by_setting.items():
        seeds = tuple(p.seed for p in ps)
        if len(set(seeds)) != len(seeds):
            raise FrontierError(f"{group}: seed given twice for {model} {method} {form} {target}")
        change = ([p.valid_loss - p.base_loss for p in ps] if all(p.base_loss is not None for p in ps)
                  else [float("nan")])
        rows.append(Row(group, model, method, form, target, topk, seeds,
                        mean_std([p.experts_per_token for p in ps]),
                        mean_std([p.valid_loss for p in ps]), mean_std(change),
                        mean_std([p.forward_mflops for p in ps]),
                        mean_std([p.expert_mflops for p in ps])))
    return rows


def crossing(curve: Sequence[tuple], level: float) -> Optional[float]:
    """The smallest x at which a loss curve [(x, loss)] reaches `level` (loss <= level), linearly
    interpolated between neighbouring points; None if no point reaches it. Loss falls with x on a
    dial curve, so scanning from the smallest x finds the first point at or below the level."""
    pts = sorted(curve)
    for i, (x, loss) in enumerate(pts):
        if loss <= level:
            if i == 0:
                return x
            x0, l0 = pts[i - 1]
            return x0 + (x - x0) * (l0 - level) / (l0 - loss)
    return None


def match_topk(points: Sequence[Point], group: str, method: str, form: str, topk: int = 1) -> dict:
    """Per seed: the experts per token at which `group`'s dialled curve (method, form, with its
    undialled point) reaches the same seed's TopK loss at k' = `topk`, as a fraction of TopK's
    expert compute. {seed: ratio, or None if the curve never reaches it}; a ratio equal to the
    curve's lowest point means it is at or below TopK already there (an upper bound)."""
    out = {}
    for seed in sorted({p.seed for p in points if p.group == group}):
        ps = [p for p in points if p.seed == seed]
        ref = [p for p in ps if p.model == "TopK" and p.topk == topk]
        if len(ref) != 1:
            continue
        curve = [(p.expert_mflops, p.valid_loss) for p in ps if p.group == group and p.model == "ReMoE"
                 and (p.method == "undialled" or (p.method == method and p.form == form))]
        x = crossing(curve, ref[0].valid_loss)
        out[seed] = None if x is None else x / ref[0].expert_mflops
    return out


@dataclass(frozen=True)
class Selector:
    """One ReMoE setting of a group: the model as trained (method `undialled`) or a dialled point."""

    group: str
    method: str = "undialled"
    form: str = "-"
    target: Optional[float] = None

    @classmethod
    def parse(cls, text: str) -> "Selector":
        """GROUP (as trained) or GROUP:METHOD:FORM:TARGET, e.g. elastic:per-layer:cut:0.5."""
        parts = text.split(":")
        if len(parts) == 1 and parts[0]:
            return cls(parts[0])
        if len(parts) == 4 and parts[1] in ("global", "per-layer") and parts[2] in ("cut", "shift"):
            try:
                return cls(parts[0], parts[1], parts[2], float(parts[3]))
            except ValueError:
                pass
        raise FrontierError(f"{text!r}: expected GROUP (as trained) or GROUP:METHOD:FORM:TARGET, "
                            "e.g. relu:per-layer:cut:0.5")

    def __str__(self) -> str:
        if self.method == "undialled":
            return f"{self.group} as trained"
        return f"{self.group} {self.method} {self.form} {self.target:g}"

    def pick(self, points: Sequence[Point], seed: int) -> Optional[Point]:
        found = [p for p in points if p.seed == seed and p.group == self.group and p.model == "ReMoE"
                 and p.method == self.method and p.form == self.form
                 and (self.target is None or (p.target is not None and math.isclose(p.target, self.target)))]
        return found[0] if len(found) == 1 else None


def paired_difference(points: Sequence[Point], a: Selector, b: Selector) -> dict:
    """{seed: loss(a) - loss(b)} over the seeds that have both settings (paired by seed)."""
    out = {}
    for seed in sorted({p.seed for p in points}):
        pa, pb = a.pick(points, seed), b.pick(points, seed)
        if pa is not None and pb is not None:
            out[seed] = pa.valid_loss - pb.valid_loss
    return out


def _fmt(ms: tuple, digits: int = 4, sign: bool = False) -> str:
    mean, std = ms
    if math.isnan(mean):
        return "-"
    text = f"{mean:+.{digits}f}" if sign else f"{mean:.{digits}f}"
    return text if math.isnan(std) else f"{text} ± {std:.{digits}f}"


def markdown_table(rows: Sequence[Row]) -> str:
    lines = ["| setting | target | seeds | experts/token | valid loss | change vs as trained | "
             "forward MFLOPs/token |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        target = "-" if r.target is None else f"{r.target:g}"
        lines.append(f"| {r.label} | {target} | {len(r.seeds)} | {_fmt(r.experts_per_token, 3)} | "
                     f"{_fmt(r.valid_loss)} | {_fmt(r.loss_change, sign=True)} | "
                     f"{_fmt(r.forward_mflops, 2)} |")
    return "\n".join(lines)


CSV_FIELDS = ("group", "seed", "model", "method", "form", "target", "topk", "experts_per_token",
              "valid_loss", "loss_change", "forward_mflops_per_token", "expert_mflops_per_token")


def write_points_csv(path: str, points: Sequence[Point]) -> None:
    with open(path + ".tmp", "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(CSV_FIELDS)
        for p in points:
            change = "" if p.base_loss is None else f"{p.valid_loss - p.base_loss:.6g}"
            w.writerow([p.group, p.seed, p.model, p.method, p.form,
                        "" if p.target is None else f"{p.target:.6g}", "" if p.topk is None else p.topk,
                        f"{p.experts_per_token:.6g}", f"{p.valid_loss:.6g}", change,
                        f"{p.forward_mflops:.6g}", f"{p.expert_mflops:.6g}"])
    os.replace(path + ".tmp", path)


def _series(rows: Sequence[Row], methods: Sequence[tuple]) -> dict:
    """{label: sorted rows} for the figure: each swept group's dialled curve per (method, form),
    its as-trained point included; single points (frontier models); TopK over k'."""
    swept = {r.group for r in rows if r.model == "ReMoE" and r.method not in ("undialled", "thresholds")}
    series: dict = {}
    for r in rows:
        if r.model == "TopK":
            series.setdefault("TopK k' = 1..E", []).append(r)
        elif r.group not in swept:
            series.setdefault(f"{r.group} (trained at its budget)", []).append(r)
        else:
            for method, form in methods:
                if r.method == "undialled" or (r.method, r.form) == (method, form):
                    series.setdefault(f"{r.group} dialled ({method} {form})", []).append(r)
    # a group swept without this method has only its as-trained point: no curve to draw
    return {label: rs for label, rs in series.items()
            if "dialled" not in label or any(r.method != "undialled" for r in rs)}


def frontier_figure(rows: Sequence[Row], pyplot, title: str,
                    methods: Sequence[tuple] = (("per-layer", "cut"),), ymax: Optional[float] = None):
    """Loss vs experts per token and vs forward MFLOPs per token, mean ± std over seeds."""
    fig, axes = pyplot.subplots(1, 2, figsize=(11, 4.4))
    series = _series(rows, methods)
    for ax, key, xlabel in ((axes[0], "experts_per_token", "active experts per token (mean over MoE layers)"),
                            (axes[1], "forward_mflops", "forward MFLOPs per token")):
        for label, rs in series.items():
            rs = sorted(rs, key=lambda r: getattr(r, key)[0])
            xs = [getattr(r, key)[0] for r in rs]
            ys = [r.valid_loss[0] for r in rs]
            err = [0.0 if math.isnan(r.valid_loss[1]) else r.valid_loss[1] for r in rs]
            style = "k^-" if label.startswith("TopK") else ("D" if "trained at" in label else "o-")
            ax.errorbar(xs, ys, yerr=err, fmt=style, markersize=4, capsize=2, label=label)
        ax.set_xlabel(xlabel)
    return finish_loss_figure(fig, axes, title, ymax)
