#!/usr/bin/env python3
"""Run the core test subset against every megatron-core minor in the supported range, check that a
checkpoint moves across releases the documented way, and write the results into docs/compat.md.

    python3 scripts/version_matrix.py                       # 0.16.1 0.17.1 0.18.2 0.19.2
    python3 scripts/version_matrix.py 0.18.2 --lock /tmp/remoe-cpu.lock
    python3 scripts/version_matrix.py --cross-checkpoint    # only the checkpoint check
    python3 scripts/version_matrix.py --table               # only rewrite the table

Environments (made on first use, git-ignored):
* 0.16.x: the pinned lane's .venv (Python 3.11; scripts/setup_env.sh);
* 0.17+ (Python >= 3.12): the newest lane's .venv312 (scripts/setup_env.sh with REMOE_LANE=newest);
  another release X is installed without dependencies into .venv-matrix/mcore-X and put first on
  PYTHONPATH (its dependencies are the same: torch, numpy, packaging).

The core subset is `pytest -m core` (the tests marked `core`), run one test file per pytest
process; `--lock FILE` holds flock(FILE) for each version's run (one wait, then ~5 minutes
of CPU) on a machine shared with other work. Results of each
version go to .venv-matrix/results/<version>.json; the table in docs/compat.md is rebuilt from all
results present, so versions can be run one at a time.

Cross-checkpoint check (needs 0.16.x and a >= 0.19 release): a 4-step --mock-data run saved under
0.16.1 resumes under the newest release to step 6 (losses compared with an uninterrupted 0.16.1 run),
and a checkpoint saved under the newest release is refused by 0.16.1 with exit 2 and one line that
names the writer's version.

Widening the range to a new release X.Y.Z: run `python3 scripts/version_matrix.py X.Y.Z`; when it
passes, raise the bound in pyproject.toml to the next minor and the pin in constraints-newest.txt
(docs/compat.md, "Widening the range").
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import fcntl
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MATRIX = os.path.join(ROOT, ".venv-matrix")
RESULTS = os.path.join(MATRIX, "results")
DOC = os.path.join(ROOT, "docs", "compat.md")
BEGIN, END = "<!-- version-matrix:begin -->", "<!-- version-matrix:end -->"
DEFAULT_VERSIONS = ("0.16.1", "0.17.1", "0.18.2", "0.19.2")
PYTEST_FLAGS = ["-q", "-p", "no:cacheprovider", "-W", "ignore::UserWarning",
                "-W", "ignore::DeprecationWarning", "-W", "ignore::FutureWarning"]
MOCK_RUN = ["--mock-data", "--vocab-size", "256", "--num-layers", "2", "--hidden-size", "64",
            "--num-attention-heads", "4", "--num-query-groups", "2", "--seq-length", "32",
            "--num-experts", "4", "--micro-batch-size", "2", "--global-batch-size", "4",
            "--lr", "3e-3", "--lr-warmup-iters", "1", "--log-interval", "1", "--eval-iters", "0",
            "--moe-relu-l1-reg-coeff-init", "1e-3", "--router", "relu"]


def log(message: str) -> None:
    print(f"[matrix] {message}", flush=True)


def minor(version: str) -> tuple:
    return tuple(int(p) for p in version.split(".")[:2])


def environment(version: str) -> tuple[str, dict]:
    """(python, extra env) running megatron-core `version`."""
    if minor(version) < (0, 17):
        if version != "0.16.1":
            raise SystemExit(f"error: {version}: the pinned lane has 0.16.1 only")
        return lane_python("pinned", ".venv", version), {}
    python = lane_python("newest", ".venv312", None)
    if installed_version(python, {}) == version:
        return python, {}
    target = os.path.join(MATRIX, f"mcore-{version}")
    if not os.path.isdir(os.path.join(target, "megatron", "core")):
        log(f"installing megatron-core=={version} into {os.path.relpath(target, ROOT)}")
        shutil.rmtree(target, ignore_errors=True)
        subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--target", target,
                        f"megatron-core=={version}"], check=True)
    extra = {"PYTHONPATH": target + os.pathsep + os.environ.get("PYTHONPATH", "")}
    got = installed_version(python, extra)
    if got != version:
        raise SystemExit(f"error: {target} gives megatron-core {got}, not {version}")
    return python, extra


def lane_python(lane: str, venv: str, version) -> str:
    """The lane's interpreter; the lane is set up (scripts/setup_env.sh) unless its environment
    already runs (with `version` of megatron-core, if given): a re-install would disturb other
    processes using it."""
    python = os.path.join(ROOT, venv, "bin", "python")
    have = installed_version(python, {}) if os.path.exists(python) else ""
    if not have or (version and have != version):
        subprocess.run(["bash", "scripts/setup_env.sh", "test"], cwd=ROOT, check=True,
                       env=dict(os.environ, REMOE_LANE=lane))
    return python


def installed_version(python: str, extra: dict) -> str:
    out = subprocess.run([python, "-c", "import importlib.metadata as m; "
                          "print(m.version('megatron-core'))"], capture_output=True, text=True,
                         env=dict(os.environ, **extra), cwd=ROOT)
    return out.stdout.strip()


@contextlib.contextmanager
def holding(lock):
    """flock(2) on `lock` (the same lock as flock(1)) for a whole version's run: one wait for the
    shared machine instead of one per test file."""
    if not lock:
        yield
        return
    with open(lock, "a") as fh:
        t0 = time.time()
        fcntl.flock(fh, fcntl.LOCK_EX)
        log(f"lock {lock} taken after {time.time() - t0:.0f} s")
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def core_files(python: str, extra: dict) -> list:
    out = subprocess.run([python, "-m", "pytest", "--collect-only", "-q", "-m", "core",
                          "-p", "no:cacheprovider"], capture_output=True, text=True, cwd=ROOT,
                         env=dict(os.environ, **extra))
    ids = [ln.strip() for ln in out.stdout.splitlines() if "::" in ln]
    return sorted({i.split("::")[0] for i in ids})


def parse_summary(text: str) -> dict:
    counts = {}
    for number, word in re.findall(r"(\d+) (passed|failed|skipped|error|errors|deselected)",
                                   text):
        counts[word.rstrip("s") if word == "errors" else word] = int(number)
    took = re.search(r" in ([\d.]+)s", text)
    counts["pytest_seconds"] = float(took.group(1)) if took else 0.0
    return counts


def run_core(version: str, lock) -> dict:
    python, extra = environment(version)
    env = dict(os.environ, OMP_NUM_THREADS="1", **extra)
    with holding(lock):
        return _run_core(version, python, extra, env)


def _run_core(version: str, python: str, extra: dict, env: dict) -> dict:
    pyver = subprocess.run([python, "-c", "import sys, torch; print(sys.version.split()[0], "
                            "torch.__version__)"], capture_output=True, text=True, env=env,
                           cwd=ROOT).stdout.split()
    result = {"version": version, "python": pyver[0] if pyver else "?",
              "torch": pyver[1] if len(pyver) > 1 else "?", "files": {}, "failures": [],
              "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "load_before": os.getloadavg()[0]}
    start = time.time()
    for path in core_files(python, extra):
        t0 = time.time()
        log(f"{version}: {path}")
        proc = subprocess.run([python, "-m", "pytest", "-m", "core", path] + PYTEST_FLAGS,
                              capture_output=True, text=True, cwd=ROOT, env=env)
        counts = parse_summary(proc.stdout.strip().splitlines()[-1] if proc.stdout.strip()
                               else "")
        counts["seconds"] = round(time.time() - t0, 1)
        result["files"][path] = counts
        result["failures"] += [ln for ln in proc.stdout.splitlines()
                               if ln.startswith(("FAILED", "ERROR"))]
        log(f"{version}: {path}: {counts}")
    result["seconds"] = round(time.time() - start, 1)
    result["load_after"] = os.getloadavg()[0]
    for key in ("passed", "failed", "skipped", "error", "pytest_seconds"):
        result[key] = sum(c.get(key, 0) for c in result["files"].values())
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, f"{version}.json"), "w") as fh:
        json.dump(result, fh, indent=1)
    return result


def trainer(python: str, extra: dict, args: list, timeout: int = 300):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", **extra)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([python, "-m", "megatron.remoe.pretrain"] + args,
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout)


def losses(run_dir: str) -> dict:
    out = {}
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        for line in fh:
            rec = json.loads(line)
            if rec.get("split") == "train" and "lm_loss" in rec:
                out[rec["iteration"]] = (rec["lm_loss"], rec.get("moe_relu_sparsity"),
                                         rec.get("moe_relu_l1_reg_coeff"))
    return out


def cross_checkpoint(old: str, new: str) -> dict:
    """0.16.1 checkpoint -> newest resumes; newest checkpoint -> 0.16.1 refused in one line."""
    work = os.path.join(MATRIX, "cross-checkpoint")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    py_old, env_old = environment(old)
    py_new, env_new = environment(new)
    result = {"old": old, "new": new}
    full = os.path.join(work, "old-6")
    proc = trainer(py_old, env_old, MOCK_RUN + ["--train-iters", "6", "--save", full])
    assert proc.returncode == 0, proc.stderr[-2000:]
    half = os.path.join(work, "old-4")  # the same 6-step schedule, stopped after step 4
    proc = trainer(py_old, env_old, MOCK_RUN + ["--train-iters", "6", "--save", half,
                                                "--exit-interval", "4"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = trainer(py_new, env_new, MOCK_RUN + ["--train-iters", "6", "--save", half,
                                                "--load", half])
    resumed = proc.returncode == 0 and "resumed from" in proc.stdout
    result["old_to_new_resumed"] = resumed
    result["old_to_new_stderr"] = proc.stderr.strip()[-500:]
    if resumed:
        a, b = losses(full), losses(half)
        steps = [i for i in (5, 6) if i in a and i in b]
        result["resumed_steps"] = steps
        result["max_abs_dloss"] = max(abs(a[i][0] - b[i][0]) for i in steps) if steps else None
        result["sparsity_lambda_equal"] = all(a[i][1:] == b[i][1:] for i in steps)
    newer = os.path.join(work, "new-2")
    proc = trainer(py_new, env_new, MOCK_RUN + ["--train-iters", "2", "--save", newer])
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = trainer(py_old, env_old, MOCK_RUN + ["--train-iters", "4", "--save", newer,
                                                "--load", newer])
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    result["new_to_old_exit"] = proc.returncode
    result["new_to_old_stderr"] = lines
    result["new_to_old_ok"] = (proc.returncode == 2 and len(lines) == 1 and
                               f"written by megatron-core {new}" in lines[0])
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "cross-checkpoint.json"), "w") as fh:
        json.dump(result, fh, indent=1)
    return result


def table() -> str:
    rows = []
    for name in sorted(os.listdir(RESULTS) if os.path.isdir(RESULTS) else [],
                       key=lambda n: [int(p) if p.isdigit() else 0 for p in n[:-5].split(".")]):
        if not re.match(r"^\d+\.\d+\.\d+\.json$", name):
            continue
        with open(os.path.join(RESULTS, name)) as fh:
            r = json.load(fh)
        status = "pass" if not r["failed"] and not r["error"] and r["passed"] else "FAIL"
        rows.append(f"| {r['version']} | {r['python']} | {r['torch']} | {status} | {r['passed']} | "
                    f"{r['failed']} | {r['skipped']} | {r['error']} | "
                    f"{r.get('pytest_seconds', 0):.0f} s | {r['seconds']:.0f} s | "
                    f"{r['load_before']:.1f} / {r['load_after']:.1f} | {r['date']} |")
        rows += [f"|  | failure: `{f[:120]}` |" + "  |" * 10 for f in r["failures"]]
    lines = [BEGIN, "", f"Machine: {platform.machine()}, {os.cpu_count()} cores. The core subset "
             "runs one test file per pytest process; 'pytest' is the sum of pytest's own "
             "durations, 'wall' adds interpreter start-up and collection (with --lock, the run "
             "of a version holds the shared CPU lock throughout); load = 1-minute load average "
             "before / after.",
             "", "| megatron-core | Python | torch | result | passed | failed | skipped | errors | "
             "pytest | wall | load | run |", "|---|---|---|---|---|---|---|---|---|---|---|---|"] + rows
    cross = os.path.join(RESULTS, "cross-checkpoint.json")
    if os.path.exists(cross):
        with open(cross) as fh:
            c = json.load(fh)
        lines += ["", f"Cross-version checkpoints ({c['old']} <-> {c['new']}):", ""]
        if c.get("old_to_new_resumed"):
            lines.append(f"* saved under {c['old']} at step 4, resumed under {c['new']} to step 6: "
                         f"resumed; steps {c.get('resumed_steps')} vs an uninterrupted {c['old']} "
                         f"run: max |d lm_loss| = {c.get('max_abs_dloss')!r}, sparsity and lambda "
                         f"equal: {c.get('sparsity_lambda_equal')}")
        else:
            lines.append(f"* saved under {c['old']}, resumed under {c['new']}: FAILED "
                         f"({c.get('old_to_new_stderr')!r})")
        lines.append(f"* saved under {c['new']}, loaded by {c['old']}: exit "
                     f"{c['new_to_old_exit']}, stderr {c['new_to_old_stderr']!r} "
                     f"({'as designed' if c['new_to_old_ok'] else 'NOT as designed'})")
    lines += ["", END]
    return "\n".join(lines)


def write_table() -> None:
    with open(DOC, encoding="utf-8") as fh:
        doc = fh.read()
    if BEGIN not in doc or END not in doc:
        raise SystemExit(f"error: {DOC} lacks the markers {BEGIN} / {END}")
    head, rest = doc.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    with open(DOC, "w", encoding="utf-8") as fh:
        fh.write(head + table() + tail)
    log(f"results table written to {os.path.relpath(DOC, ROOT)}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("versions", nargs="*", help=f"default: {' '.join(DEFAULT_VERSIONS)}")
    parser.add_argument("--lock",
                        help="hold flock(FILE) while a version (or the checkpoint check) runs")
    parser.add_argument("--cross-checkpoint", action="store_true",
                        help="only the cross-version checkpoint check (0.16.1 <-> newest)")
    parser.add_argument("--table", action="store_true", help="only rewrite the docs table")
    args = parser.parse_args()
    if args.table:
        write_table()
        return 0
    versions = args.versions or ([] if args.cross_checkpoint else list(DEFAULT_VERSIONS))
    for v in versions:
        if not re.match(r"^\d+\.\d+\.\d+$", v):
            print(f"error: version {v!r} is not X.Y.Z", file=sys.stderr)
            return 2
    failed = False
    for version in versions:
        r = run_core(version, args.lock)
        failed |= bool(r["failed"] or r["error"] or not r["passed"])
    if args.cross_checkpoint or not args.versions:
        newest = sorted(DEFAULT_VERSIONS, key=minor)[-1]
        with holding(args.lock):
            c = cross_checkpoint("0.16.1", newest)
        failed |= not (c.get("old_to_new_resumed") and c.get("new_to_old_ok"))
    write_table()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
