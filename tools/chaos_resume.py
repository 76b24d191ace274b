#!/usr/bin/env python
"""Chaos resume: kill a 2-process (gloo) training run at random moments, restart it with the same
command each time, and check that the run which finally finishes is bit-identical to an
uninterrupted one (docs/reliability.md, "Chaos resume").

    python tools/chaos_resume.py --kills 20 --seed 0 --workdir /tmp/chaos [--cpu-lock FILE]

Each attempt runs `torchrun --nproc-per-node 2 -m megatron.remoe.pretrain ... --save D --load D`
(a tiny ReLU-routed MoE on mock data; a checkpoint every --save-interval steps, an evaluation every
--eval-interval steps). The trainer reports what rank 0 is doing through the test hook
REMOE_TEST_HOOK_PHASE_FILE ('step N', 'microbatch K N', 'eval N', 'save N', 'saved N'); the
harness waits for the phase it chose for this kill and then sends

* `kill9`: SIGKILL to every process of the job (a lost node),
* `kill9-rank`: SIGKILL to one worker (torchrun then stops the other one),
* `sigterm`: SIGTERM to the launcher (preemption: torchrun forwards it, the ranks save and exit 0),

at one of: during a checkpoint save, during an evaluation, between two micro-batches of a step, or
after a random delay. At the end it compares the final checkpoint (model, optimizer, RNG, lambda,
scheduler, iteration and data position) and metrics.jsonl (every key except timings) with the
uninterrupted reference run, and prints the steps lost by each kill.

Exit code 0 when everything is bit-identical, 1 otherwise. `--json FILE` writes the report.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import psutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from megatron.remoe.logs import configure, get_logger  # noqa: E402  (after the sys.path line; stdlib only)

logger = get_logger("megatron.remoe.chaos_resume")
MODEL = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
         "--num-query-groups", "2", "--seq-length", "32", "--num-experts", "4",
         "--micro-batch-size", "2", "--global-batch-size", "8", "--lr", "3e-3", "--min-lr", "3e-4",
         "--lr-warmup-iters", "1", "--log-interval", "1", "--moe-relu-l1-reg-coeff-init", "1e-3",
         "--mock-data", "--vocab-size", "256", "--eval-iters", "1"]
TARGETS = ("save", "eval", "microbatch", "random")
SIGNALS = ("kill9", "kill9-rank", "sigterm")
TIMING_KEYS = ("time", "step_time_s", "tokens_per_s", "memory_gb")
RUN_CONFIG_KEYS = ("save", "load", "metrics_file")  # differ between the two runs by design


def train_args(save: str, iters: int, save_interval: int, eval_interval: int) -> list:
    return MODEL + ["--train-iters", str(iters), "--save-interval", str(save_interval),
                    "--eval-interval", str(eval_interval), "--save", save, "--load", save]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(phase_file: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore",
               REMOE_TEST_HOOK_PHASE_FILE=phase_file,
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for key in ("RANK", "WORLD_SIZE", "MASTER_PORT", "LOCAL_RANK", "MASTER_ADDR"):
        env.pop(key, None)
    return env


def start(args: list, log_path: str, phase_file: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-port", str(_free_port()), "-m", "megatron.remoe.pretrain"] + args
    with open(log_path, "w", encoding="utf-8") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                env=_env(phase_file), start_new_session=True)


def read_phase(path: str):
    """(phase, iteration) that rank 0 last reported, or (None, 0)."""
    try:
        with open(path, encoding="utf-8") as fh:
            words = fh.read().split()
        return " ".join(words[:-1]), int(words[-1])
    except (OSError, ValueError, IndexError):
        return None, 0


def completed_iterations(phase: str, iteration: int) -> int:
    """Steps finished when rank 0 was in `phase` of `iteration`."""
    if phase is None:
        return 0
    return iteration - 1 if phase.startswith(("step", "microbatch")) else iteration


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher and every process below it (torchrun starts its workers in their own
    sessions, so a kill of its process group alone would leave them running)."""
    try:
        victims = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        victims = []
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    for victim in victims:
        with contextlib.suppress(psutil.Error):
            victim.kill()


def _workers(proc: subprocess.Popen) -> list:
    try:
        return [p for p in psutil.Process(proc.pid).children(recursive=True)
                if "megatron.remoe.pretrain" in " ".join(p.cmdline())]
    except psutil.Error:
        return []


def wait_exit(proc: subprocess.Popen, timeout: float) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        proc.wait()
        raise RuntimeError(f"the run did not exit within {timeout:.0f} s (hang?)")


def resumed_iteration(log_path: str) -> int:
    with open(log_path, encoding="utf-8", errors="replace") as fh:
        text = fh.read()
    marker = "checkpoint: resumed from "
    if marker not in text:
        return 0
    line = text[text.index(marker):].splitlines()[0]
    return int(line.split("(iteration ")[1].split(",")[0])


class CpuLock:
    """The shared CPU lock (flock on `path`; nothing when None), held for `chunk` attempts at a
    time and then released and taken again, so that other work on the machine gets its turn."""

    def __init__(self, path, chunk: int = 6):
        self.path, self.chunk, self.used, self.fh = path, chunk, 0, None

    @contextlib.contextmanager
    def attempt(self):
        if self.path and self.fh is None:
            self.fh = open(self.path, "a")
            fcntl.flock(self.fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            self.used += 1
            if self.fh is not None and self.used % self.chunk == 0:
                self.release()

    def release(self):
        if self.fh is not None:
            fcntl.flock(self.fh, fcntl.LOCK_UN)
            self.fh.close()
            self.fh = None


def run_once(args: list, workdir: str, name: str, timeout: float, lock=None) -> tuple:
    log, phase = os.path.join(workdir, f"{name}.log"), os.path.join(workdir, f"{name}.phase")
    with (lock or CpuLock(None)).attempt():
        proc = start(args, log, phase)
        rc = wait_exit(proc, timeout)
    return rc, log


def attempt_with_kill(args: list, workdir: str, name: str, target: str, how: str,
                      rng: random.Random, start_iter: int, timeout: float, lock=None) -> dict:
    """Start the run, wait for `target` (at an iteration past `start_iter`), send `how`; returns
    what happened. If the run ends before the target comes, nothing is sent."""
    log, phase_file = os.path.join(workdir, f"{name}.log"), os.path.join(workdir, f"{name}.phase")
    with contextlib.suppress(FileNotFoundError):
        os.remove(phase_file)
    with (lock or CpuLock(None)).attempt():
        proc = start(args, log, phase_file)
        deadline, sent = time.time() + timeout, None
        min_iter = start_iter + 1 + rng.randrange(2)
        delay_until = None
        try:
            while time.time() < deadline and proc.poll() is None:
                phase, it = read_phase(phase_file)
                ready = phase is not None and it >= min_iter and not phase.startswith("done")
                if target == "random":
                    if phase is not None and delay_until is None:
                        delay_until = time.time() + rng.uniform(0.0, 3.0)
                    ready = delay_until is not None and time.time() >= delay_until
                    phase, it = read_phase(phase_file)
                elif ready:
                    ready = phase.startswith(target) and (
                        target != "microbatch" or not phase.endswith(" 0"))  # between two
                if ready:
                    sent = (phase, it)
                    if how == "kill9":
                        _kill_group(proc)
                    elif how == "kill9-rank":
                        workers = _workers(proc)
                        (rng.choice(workers).kill() if workers else _kill_group(proc))
                    else:
                        proc.send_signal(signal.SIGTERM)  # torchrun forwards it to the ranks
                    break
                time.sleep(0.003)
            rc = wait_exit(proc, max(deadline - time.time(), 30.0))
        finally:
            if proc.poll() is None:
                _kill_group(proc)
                proc.wait()
        _kill_group(proc)  # torchrun's workers, should any outlive it
    done = completed_iterations(*sent) if sent else None
    return {"name": name, "target": target, "signal": how, "rc": rc,
            "at": f"{sent[0]} {sent[1]}" if sent else None, "completed": done,
            "resumed_from": start_iter}


# ------------------------------------------------------------------------------------------------
# Comparison
# ------------------------------------------------------------------------------------------------
def _checkpoint_state(path: str) -> tuple:
    import torch  # noqa: PLC0415 -- keeps torch/megatron-core out of --help
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save  # noqa: PLC0415 -- keeps torch/megatron-core out of --help

    flat = path.rstrip("/") + ".compare.pt"
    dcp_to_torch_save(path, flat)
    try:
        sharded = torch.load(flat, weights_only=False)
    finally:
        os.remove(flat)
    common = torch.load(os.path.join(path, "common.pt"), weights_only=False)
    common["config"] = {k: v for k, v in common.get("config", {}).items()
                        if k not in RUN_CONFIG_KEYS}
    return sharded, common


def _diff(a, b, where: str, out: list) -> None:
    import torch  # noqa: PLC0415 -- keeps torch/megatron-core out of --help

    if len(out) > 20:
        return
    if torch.is_tensor(a) or torch.is_tensor(b):
        if not (torch.is_tensor(a) and torch.is_tensor(b) and a.dtype == b.dtype
                and a.shape == b.shape and torch.equal(a, b)):
            out.append(where)
    elif isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            out.append(f"{where}: keys {sorted(set(a) ^ set(b))[:5]}")
        for k in set(a) & set(b):
            _diff(a[k], b[k], f"{where}.{k}", out)
    elif isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            out.append(f"{where}: length {len(a)} != {len(b)}")
        for i, (x, y) in enumerate(zip(a, b)):
            _diff(x, y, f"{where}[{i}]", out)
    elif hasattr(a, "getvalue") and hasattr(b, "getvalue"):  # BytesIO (sharded objects)
        if a.getvalue() != b.getvalue():
            out.append(where)
    elif type(a).__module__ == "numpy" or type(b).__module__ == "numpy":
        if not (type(a) is type(b) and np.array_equal(a, b)):
            out.append(where)
    elif a != b and not (isinstance(a, float) and a != a and b != b):
        out.append(f"{where}: {a!r} != {b!r}"[:200])


def _metrics(path: str) -> list:
    with open(path, encoding="utf-8") as fh:
        lines = fh.read().splitlines()
    return [{k: v for k, v in json.loads(ln).items() if k not in TIMING_KEYS} for ln in lines]


def compare_runs(reference: str, chaos: str) -> list:
    """Differences between the final checkpoints and metrics of two --save directories."""
    out: list = []
    with open(os.path.join(reference, "latest_checkpointed_iteration.txt")) as fh:
        iteration = int(fh.read())
    name = f"iter_{iteration:07d}"
    if not os.path.isdir(os.path.join(chaos, name)):
        return [f"{chaos} has no {name}"]
    ref_sharded, ref_common = _checkpoint_state(os.path.join(reference, name))
    got_sharded, got_common = _checkpoint_state(os.path.join(chaos, name))
    _diff(ref_sharded, got_sharded, "checkpoint", out)
    _diff(ref_common, got_common, "common", out)
    ref_m = _metrics(os.path.join(reference, "metrics.jsonl"))
    got_m = _metrics(os.path.join(chaos, "metrics.jsonl"))
    keys = [(r["split"], r["iteration"]) for r in got_m]
    if len(keys) != len(set(keys)):
        out.append("metrics.jsonl has duplicated records")
    if len(ref_m) != len(got_m):
        out.append(f"metrics.jsonl: {len(got_m)} records, the reference has {len(ref_m)}")
    for i, (r, g) in enumerate(zip(ref_m, got_m)):
        if r != g:
            bad = sorted(k for k in set(r) | set(g) if r.get(k) != g.get(k))
            out.append(f"metrics.jsonl line {i + 1} (iteration {g.get('iteration')}): {bad[:5]}")
            break
    return out


# ------------------------------------------------------------------------------------------------
def chaos(workdir: str, kills: list, iters: int, save_interval: int = 2, eval_interval: int = 3,
          seed: int = 0, timeout: float = 240.0, lock=None) -> dict:
    """Run the reference, then the chaos run with `kills` [(target, signal), ...]; return the
    report (kills, steps lost, differences). `lock`: a CpuLock, or None."""
    try:
        return _chaos(workdir, kills, iters, save_interval, eval_interval, seed, timeout, lock)
    finally:
        if lock is not None:
            lock.release()


def _chaos(workdir, kills, iters, save_interval, eval_interval, seed, timeout, lock):
    os.makedirs(workdir, exist_ok=True)
    rng = random.Random(seed)
    t0 = time.time()
    ref_save = os.path.join(workdir, "reference")
    rc, ref_log = run_once(train_args(ref_save, iters, save_interval, eval_interval), workdir,
                           "reference", timeout, lock)
    if rc != 0:
        raise RuntimeError(f"the reference run failed (exit {rc}); see {ref_log}")
    logger.info(f"chaos: reference run done ({time.time() - t0:.0f} s)")
    save = os.path.join(workdir, "chaos")
    args = train_args(save, iters, save_interval, eval_interval)
    events, resumed, attempt = [], 0, 0
    for target, how in kills:
        attempt += 1
        event = attempt_with_kill(args, workdir, f"attempt{attempt:02d}", target, how, rng,
                                  resumed, timeout, lock)
        events.append(event)
        if event["at"] is None:  # finished before the target came
            logger.info(f"chaos: attempt {attempt}: ran to the end (exit {event['rc']}) before "
                        f"{target}")
            break
        # the next attempt's start tells how much was kept
        logger.info(f"chaos: attempt {attempt}: {how} during {event['at']} (exit {event['rc']})")
        resumed = _peek_resume(save)
    attempt += 1
    final_rc, final_log = run_once(args, workdir, f"attempt{attempt:02d}", timeout, lock)
    if final_rc != 0:
        raise RuntimeError(f"the final run failed (exit {final_rc}); see {final_log}")
    # steps lost: completed before the kill minus where the next attempt resumed
    for i, event in enumerate(events):
        if event["at"] is None:
            continue
        nxt = os.path.join(workdir, f"attempt{i + 2:02d}.log")
        event["next_resumed_from"] = resumed_iteration(nxt)
        event["steps_lost"] = max(event["completed"] - event["next_resumed_from"], 0)
    differences = compare_runs(ref_save, save)
    killed = [e for e in events if e["at"] is not None]
    report = {"iterations": iters, "kills": len(killed), "events": events,
              "steps_lost_total": sum(e["steps_lost"] for e in killed),
              "identical": not differences, "differences": differences,
              "wall_s": round(time.time() - t0, 1)}
    return report


def _peek_resume(save: str) -> int:
    """The iteration the next attempt will resume from: the newest complete checkpoint."""
    try:
        done = [int(n[5:]) for n in os.listdir(save) if n.startswith("iter_") and n[5:].isdigit()]
    except FileNotFoundError:
        return 0
    return max(done, default=0)


def plan_kills(count: int, seed: int) -> list:
    """`count` (target, signal) pairs covering every target and signal, then random ones."""
    rng = random.Random(seed)
    base = [(t, s) for t in TARGETS for s in SIGNALS]
    rng.shuffle(base)
    plan = base[:count]
    while len(plan) < count:
        plan.append((rng.choice(TARGETS), rng.choice(SIGNALS)))
    return plan


def main(argv=None) -> int:
    configure()  # the console: the progress lines
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=20, help="number of kills (default 20)")
    parser.add_argument("--iters", type=int, default=None,
                        help="training iterations (default 3 per kill, at least 12)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", required=True, help="directory for runs and logs")
    parser.add_argument("--cpu-lock", default=None,
                        help="flock this file while attempts run (released every 6 attempts)")
    parser.add_argument("--json", default=None, help="write the report here")
    a = parser.parse_args(argv)
    iters = a.iters or max(12, 3 * a.kills)
    report = chaos(a.workdir, plan_kills(a.kills, a.seed), iters, seed=a.seed,
                   lock=CpuLock(a.cpu_lock) if a.cpu_lock else None)
    print(f"{'attempt':8} {'signal':11} {'at':16} {'exit':>5} {'done':>5} {'resumed':>8} "
          f"{'lost':>5}")
    for e in report["events"]:
        print(f"{e['name'][7:]:8} {e['signal']:11} {str(e['at']):16} {e['rc']:>5} "
              f"{str(e['completed']):>5} {str(e.get('next_resumed_from', '-')):>8} "
              f"{str(e.get('steps_lost', '-')):>5}")
    print(f"kills {report['kills']}, steps lost {report['steps_lost_total']} of "
          f"{report['iterations']}, wall {report['wall_s']} s, bit-identical to the "
          f"uninterrupted run: {report['identical']}")
    for d in report["differences"]:
        print(f"  differs: {d}")
    if a.json:
        with open(a.json, "w", encoding="utf-8") as fh:
            json.dump(report, fh, indent=1)
    return 0 if report["identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
