#!/usr/bin/env python
"""Parallel-layout parity table: the same tiny GPT, seed and data trained under every layout and
compared with the 1-process run (LM loss, grad norm, global sparsity, lambda per step), lambda
across the ranks of each run, re-sharded checkpoints and exact resume.

    OMP_NUM_THREADS=1 python tools/parity_table.py              # the reduced matrix (what CI runs)
    OMP_NUM_THREADS=1 python tools/parity_table.py --full       # everything (long: see --help)

Every job is the real trainer in real processes (torchrun + gloo on CPU); the harness and the
tolerances are in tools/parity/harness.py, the method in docs/parity.md. Progress goes to stderr,
the table (Markdown) to stdout and, with --out, to a file. Exit code 1 if any check fails (the
negative-control rows are expected to fail their parity checks and count as passing if they do).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from megatron.remoe.logs import configure  # noqa: E402
from tools.parity import harness as P  # noqa: E402
from tools.parity.tiny_gpt import build_corpus  # noqa: E402

# the reduced matrix = the CI set of tests/training/test_parity.py
REDUCED = {
    "parity": {"relu": [n for n in P.LAYOUTS if n not in P.REFERENCES + P.FULL_ONLY],
               "topk": ["tp2_sp", "pp2_ep2"]},
    "reshard": {"relu": [("tp2_sp", "pp2"), ("pp2_ep2", "ep2_allgather"), ("1proc", "tp2_ep2")],
                "topk": []},
    "resume": {"relu": ["tp2_ep2", "dp2_distopt", "pp2_vp2"], "topk": []},
    "negative": [("relu", "tp2_sp", "tp")],
}


def full_matrix() -> dict:
    names = list(P.LAYOUTS)
    others = [n for n in names if n not in P.REFERENCES]
    same_model = [(a, b) for a in names for b in names
                  if a != b and P.reference(a) == P.reference(b)]
    return {
        "parity": {"relu": others, "topk": others},
        # ReLU: every ordered pair of layouts of one model; TopK: 1 process -> every layout and back
        "reshard": {"relu": same_model,
                    "topk": [(P.reference(b), b) for b in others] +
                            [(a, P.reference(a)) for a in others]},
        "resume": {"relu": names, "topk": names},
        "negative": [("relu", "tp2_sp", "tp"), ("relu", "pp2", "pp"), ("relu", "dp2", "dp"),
                     ("relu", "tp2_ep2", "dp"), ("relu", "pp2_ep2", "pp"),
                     ("relu", "pp2_vp2", "pp"), ("relu", "ep2_dp2_distopt", "dp")],
    }


def fmt(x, spec=".1e"):
    if x is None:
        return "-"
    if x == 0:
        return "0"
    return format(x, spec)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true",
                        help="all layouts for both routers, every re-sharding pair of one model "
                             "for ReLU (and 1 process <-> every layout for TopK), resume for every "
                             "layout, seven negative controls: 245 trainer jobs, roughly an hour "
                             "on 2 cores (default: the reduced CI matrix, 27 jobs)")
    parser.add_argument("--routers", default="relu,topk", help="comma list (default relu,topk)")
    parser.add_argument("--work-dir", help="keep the runs here (default: a temporary directory, "
                                           "deleted at the end)")
    parser.add_argument("--out", help="also write the table (Markdown) to this file")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per trainer job")
    return parser


def parse_routers(parser, args) -> list:
    routers = [r.strip() for r in args.routers.split(",") if r.strip()]
    for r in routers:
        if r not in P.ROUTERS:
            parser.error(f"--routers: unknown router {r!r} (choose from {', '.join(P.ROUTERS)})")
    return routers


def work_directory(args) -> tuple:
    """(work dir, the TemporaryDirectory to clean up at the end or None with --work-dir)."""
    if args.work_dir:
        work = os.path.abspath(args.work_dir)
        os.makedirs(work, exist_ok=True)
        return work, None
    tmp = tempfile.TemporaryDirectory(prefix="parity_")
    return tmp.name, tmp


def corpus(work: str, progress) -> dict:
    """The test corpus under `work`/data, built once (a kept --work-dir reuses it)."""
    data_dir = os.path.join(work, "data")
    if os.path.isfile(os.path.join(data_dir, "train.idx")):
        return {"tokenizer": os.path.join(data_dir, "tokenizer"),
                "train": os.path.join(data_dir, "train"), "valid": os.path.join(data_dir, "valid")}
    progress("building the test corpus (stdlib .py files, 512-token BPE)")
    return build_corpus(data_dir)


def parity_rows(runs, router: str, layouts: list) -> list:
    """One table row per layout: its deviations from the 1-process run."""
    rows = []
    for layout in layouts:
        row = {"router": router, "layout": layout, "procs": procs(layout)}
        par = P.parity(runs, router, layout)
        row.update(dev=par["dev"], lambda_same=par["lambda_same"],
                   eval_init=par["eval_init_delta"], ok=not par["violations"],
                   notes=list(par["violations"]))
        rows.append(row)
    return rows


def add_reshard_and_resume(runs, router: str, matrix: dict, by_layout: dict) -> None:
    """Re-sharding into each target layout and exact resume, added to the layouts' rows."""
    for source, target in matrix["reshard"][router]:
        res = P.reshard(runs, router, source, target)
        row = by_layout.setdefault(target, {"router": router, "layout": target,
                                            "procs": procs(target), "notes": [],
                                            "ok": True})
        row.setdefault("reshard", []).append((source, res))
        if res["violations"]:
            row["ok"] = False
            row["notes"].append(f"from {source}: " + "; ".join(res["violations"]))
    for layout in matrix["resume"][router]:
        res = P.resume(runs, router, layout)
        row = by_layout[layout] if layout in by_layout else None
        if row is None:
            continue
        row["resume"] = res["bitwise"]
        if not res["bitwise"]:
            row["ok"] = False
            row["notes"].append("resume: " + "; ".join(res["violations"]))


def run_matrix(runs, matrix: dict, routers: list) -> tuple:
    """-> (rows, negative controls): every job of `matrix` for `routers`."""
    rows = []
    for router in routers:
        references = [n for n in P.REFERENCES
                      if any(P.reference(layout) == n for layout in matrix["parity"][router])]
        rows += parity_rows(runs, router, references + matrix["parity"][router])
        by_layout = {r["layout"]: r for r in rows if r["router"] == router}
        add_reshard_and_resume(runs, router, matrix, by_layout)
    negatives = []
    for router, layout, dim in matrix["negative"]:
        if router not in routers:
            continue
        neg = P.negative_control(runs, router, layout, dim)
        negatives.append((router, layout, dim, neg))
    return rows, negatives


TABLE_HEADER = ["| router | layout | procs | max abs dloss | max rel dgrad_norm | max abs dsparsity "
                "| max rel dlambda | lambda same on all ranks | re-shard: max abs deval at load "
                "| re-shard: next step ok | resume bitwise | result |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|"]


def row_line(row: dict) -> str:
    dev = row.get("dev")
    shard = row.get("reshard", [])
    evals = [row["eval_init"]] + [res["eval_delta"] for _, res in shard]
    next_ok = sum(1 for _, res in shard if not res["violations"])
    lam = row.get("lambda_same")
    return (
        f"| {row['router']} | {row['layout']} | {row['procs']} | "
        f"{fmt(dev['loss'])} | {fmt(dev['grad_norm_rel'])} | "
        f"{fmt(dev['sparsity']) if row['router'] == 'relu' else '-'} | "
        f"{fmt(dev['lambda_rel']) if row['router'] == 'relu' else '-'} | "
        f"{'-' if lam is None else ('yes' if lam else 'NO')} | "
        f"{fmt(max(evals))} ({len(evals)} load{'s' if len(evals) > 1 else ''}) | "
        f"{f'{next_ok}/{len(shard)}' if shard else '-'} | "
        f"{'-' if 'resume' not in row else ('yes' if row['resume'] else 'NO')} | "
        f"{'pass' if row['ok'] else 'FAIL'} |")


def negative_line(router: str, layout: str, dim: str, neg: dict) -> str:
    dev = neg["dev"]
    return (
        f"| {router} | {layout}, controller all-reduce without {dim.upper()} peers "
        f"(negative control) | {procs(layout)} | {fmt(dev['loss'])} | "
        f"{fmt(dev['grad_norm_rel'])} | {fmt(dev['sparsity'])} | {fmt(dev['lambda_rel'])} | "
        f"{'-' if neg['lambda_same'] is None else ('yes' if neg['lambda_same'] else 'NO')} "
        f"| - | - | - | {'caught' if neg['violations'] else 'NOT CAUGHT'} |")


def table_and_failures(rows: list, negatives: list) -> tuple:
    """-> (the Markdown table, the failed checks: a failing row, an uncaught negative control)."""
    lines, failures = list(TABLE_HEADER), []
    for row in rows:
        lines.append(row_line(row))
        if not row["ok"]:
            failures.append(f"{row['router']} {row['layout']}: " + "; ".join(row["notes"]))
    for router, layout, dim, neg in negatives:
        lines.append(negative_line(router, layout, dim, neg))
        if not neg["violations"]:
            failures.append(f"negative control {router} {layout} without {dim}: not caught")
    return "\n".join(lines), failures


def summary_text(runs, seconds: float) -> str:
    return (f"{runs.jobs} trainer jobs, {runs.job_seconds:.0f} s in jobs, "
            f"{seconds:.0f} s in all. Tolerances vs 1 process: |dloss| <= "
            f"{P.TOL_LOSS}, rel dgrad_norm <= {P.TOL_GRAD_NORM}, dsparsity <= "
            f"{P.TOL_SPARSITY}, rel dlambda <= {P.TOL_LAMBDA_REL}, |deval| <= {P.TOL_EVAL}. "
            f"deval at load: the initial checkpoint (1 process, iteration 0) and the step-"
            f"{P.HALF} checkpoints re-sharded into this layout.")


def main(argv=None) -> int:
    configure()  # the console: progress lines, known noise filtered
    parser = build_parser()
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")  # megatron-core's 'no Transformer Engine' notes
    matrix = full_matrix() if args.full else REDUCED
    routers = parse_routers(parser, args)
    t_start = time.time()

    def progress(message):
        print(f"[{time.time() - t_start:6.0f} s] {message}", file=sys.stderr, flush=True)

    work, tmp = work_directory(args)
    progress(f"{'full' if args.full else 'reduced'} matrix, routers {','.join(routers)}, "
             f"work dir {work}")
    runs = P.Runs(corpus(work, progress), os.path.join(work, "runs"), timeout=args.timeout,
                  progress=progress)
    rows, negatives = run_matrix(runs, matrix, routers)
    table, failures = table_and_failures(rows, negatives)
    summary = summary_text(runs, time.time() - t_start)
    print(table)
    print()
    print(summary)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as fh:
            fh.write(table + "\n\n" + summary + "\n")
    if failures:
        print("\nFAILED:\n  " + "\n  ".join(failures), file=sys.stderr)
    if tmp is not None:
        tmp.cleanup()
    return 1 if failures else 0


def procs(layout: str) -> int:
    return P.LAYOUTS[layout][0]


if __name__ == "__main__":
    sys.exit(main())
