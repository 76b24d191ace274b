#!/usr/bin/env python
"""The compute dial across models and seeds: one table and one figure from `remoe dial` outputs.

    python tools/dial_frontier.py --out docs/compute-dial/converged \
        --run relu-s1=runs/dial/relu-s1 --run relu-s2=runs/dial/relu-s2 ... \
        --run frontier-0.5-s1=runs/dial/frontier-0.5-s1 ... --run elastic-s1=runs/dial/elastic-s1

Each --run is NAME=FOLDER with NAME = GROUP-sSEED and FOLDER a `remoe dial --sweep` output (sweep.json)
or a single `remoe dial` output (dial.json; `--thresholds 0` = the model as trained). Writes
points.csv (every point), summary.md (mean ± std over seeds per setting, TopK-match ratios) and
frontier.png (loss vs experts/token and vs forward FLOPs); `--pair A=B` adds paired-by-seed loss
differences (e.g. the elastic model vs plain ReMoE, each as trained). See docs/compute-dial.md.
Exit codes: 0 success, 2 bad input (one-line error, nothing written).
"""

from __future__ import annotations

import argparse
import math
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from megatron.remoe.logs import configure  # noqa: E402

if __name__ == "__main__":
    configure()  # the console, before megatron-core (imported by the package below) warns at import

from megatron.remoe.dial_calibration import frontier as F  # noqa: E402
from megatron.remoe.errors import ConfigError  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dial_frontier.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--run", action="append", required=True, metavar="GROUP-sSEED=FOLDER",
                   help="a `remoe dial` output folder (sweep or single dial); repeat")
    p.add_argument("--out", required=True, help="output folder (created; files replaced)")
    p.add_argument("--plot-methods", default="per-layer:cut",
                   help="dialled curves in the figure, METHOD:FORM[,...] [%(default)s]")
    p.add_argument("--match", action="append", default=[], metavar="GROUP:METHOD:FORM",
                   help="report at which fraction of TopK k'=1's expert compute the group's dialled "
                        "curve reaches TopK k'=1's loss, per seed (repeatable)")
    p.add_argument("--pair", action="append", default=[], metavar="A=B",
                   help="paired loss difference A - B per seed and its mean ± std; A and B are GROUP "
                        "(as trained) or GROUP:METHOD:FORM:TARGET, e.g. elastic=relu or "
                        "elastic:per-layer:cut:0.5=frontier-0.5 (repeatable)")
    p.add_argument("--title", default="compute dial across seeds")
    p.add_argument("--ymax", type=float, help="upper limit of the loss axis (points above are cut off)")
    p.add_argument("--no-figures", action="store_true")
    return p


def parse(argv) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    args.runs = []
    for item in args.run:
        name, sep, folder = item.partition("=")
        if not sep or not folder:
            raise F.FrontierError(f"--run {item!r}: expected GROUP-sSEED=FOLDER")
        F.parse_run_name(name)
        args.runs.append((name, folder))
    args.methods = []
    for item in args.plot_methods.split(","):
        method, sep, form = item.partition(":")
        if not sep or method not in ("global", "per-layer") or form not in ("cut", "shift"):
            raise F.FrontierError(f"--plot-methods {item!r}: expected global|per-layer:cut|shift")
        args.methods.append((method, form))
    args.matches = []
    for item in args.match:
        parts = item.split(":")
        if len(parts) != 3:
            raise F.FrontierError(f"--match {item!r}: expected GROUP:METHOD:FORM, e.g. relu:per-layer:cut")
        args.matches.append(tuple(parts))
    args.pairs = []
    for item in args.pair:
        a, sep, b = item.partition("=")
        if not sep:
            raise F.FrontierError(f"--pair {item!r}: expected A=B, e.g. elastic=relu")
        args.pairs.append((F.Selector.parse(a), F.Selector.parse(b)))
    return args


def match_lines(points, matches) -> list:
    lines = []
    for group, method, form in matches:
        ratios = F.match_topk(points, group, method, form)
        shown = ", ".join(f"s{s}: {'not reached' if r is None else f'{r:.3f}'}" for s, r in ratios.items())
        lines.append(f"- {group} dialled ({method} {form}) reaches TopK k'=1's loss at this fraction of "
                     f"TopK's expert compute: {shown or 'no seed has both curves'}")
    return lines


def pair_lines(points, pairs) -> list:
    lines = []
    for a, b in pairs:
        diffs = F.paired_difference(points, a, b)
        if not diffs:
            lines.append(f"- {a} - {b}: no seed has both")
            continue
        mean, std = F.mean_std(list(diffs.values()))
        shown = ", ".join(f"s{s}: {d:+.4f}" for s, d in diffs.items())
        spread = "" if math.isnan(std) else f" ± {std:.4f}"
        lines.append(f"- {a} - {b}, paired by seed: {shown}; mean {mean:+.4f}{spread} "
                     f"({len(diffs)} seed{'s' if len(diffs) > 1 else ''})")
    return lines


def main(argv=None) -> int:
    try:
        args = parse(argv)
        points = [p for name, folder in args.runs for p in F.load_run(name, folder)]
    except ConfigError as e:
        print(f"dial_frontier.py: error: {e}", file=sys.stderr)
        return 2
    rows = F.summarise(points)
    os.makedirs(args.out, exist_ok=True)
    F.write_points_csv(os.path.join(args.out, "points.csv"), points)
    text = F.markdown_table(rows) + "\n"
    lines = match_lines(points, args.matches) + pair_lines(points, args.pairs)
    if lines:
        text += "\n" + "\n".join(lines) + "\n"
    with open(os.path.join(args.out, "summary.md"), "w", encoding="utf-8") as fh:
        fh.write(text)
    print(text)
    if not args.no_figures:
        from megatron.remoe.analysis.figures import pyplot  # noqa: PLC0415 matplotlib is an optional extra

        fig = F.frontier_figure(rows, pyplot(), args.title, args.methods, args.ymax)
        fig.savefig(os.path.join(args.out, "frontier.png"), dpi=90)
    print(f"wrote {args.out}/points.csv, summary.md{'' if args.no_figures else ', frontier.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
