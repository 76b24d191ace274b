"""The training loop's per-step bookkeeping stays the same size however long the run (issue 25
item 6): `StepHistory` keeps what the run summary reads, and the summary equals the one computed
from every step's metrics, as the loop did before. bench/bench_history_rss.py measures the RSS."""

import gc
import os
import random
import subprocess
import sys
import weakref
from types import SimpleNamespace

import pytest

from megatron.remoe.training.loop import StepHistory, summarize_run
from tests.helpers.paths import ROOT


class Metrics(dict):
    """A step's metrics dict that can be watched with a weak reference."""


def step_metrics(rng: random.Random, step: int, layers: int = 3) -> Metrics:
    m = Metrics(lm_loss=rng.uniform(2, 6), lr=1e-3, grad_norm=rng.uniform(0, 2),
                memory_gb=rng.uniform(0.5, 1.0), load_balancing_loss=rng.uniform(0, 1))
    if step % 7 != 3:  # some steps carry no routing statistics (e.g. a skipped non-finite step)
        m["moe_relu_sparsity"] = rng.uniform(0, 1)
        m.update({f"moe/layer_{i}/sparsity": rng.uniform(0, 1) for i in range(layers)})
    return m


def every_step_summary(records: list, times: list, gbs_x_seq: int) -> dict:
    """The summary fields as the loop computed them when it kept every step (hand-written)."""
    steady = times[1:] or times
    s_per_step = sum(steady) / len(steady) if steady else float("nan")
    last = records[-1] if records else {}
    tail = [h["moe_relu_sparsity"] for h in records[-10:] if "moe_relu_sparsity" in h]
    return {"steps_this_run": len(records), "final_train_loss": last.get("lm_loss"),
            "train_loss_first": records[0]["lm_loss"] if records else None,
            "s_per_step": s_per_step, "tokens_per_s": gbs_x_seq / s_per_step if steady else None,
            "memory_gb": last.get("memory_gb"), "final_sparsity": last.get("moe_relu_sparsity"),
            "sparsity_last10": sum(tail) / len(tail) if tail else None,
            "sparsity_first": records[0].get("moe_relu_sparsity") if records else None,
            "final_load_balancing_loss": last.get("load_balancing_loss")}


def fake_run(steps: int) -> SimpleNamespace:
    cfg = SimpleNamespace(router="relu", global_batch_size=4, seq_length=16, metrics_file=None)
    return SimpleNamespace(cfg=cfg, iteration=steps, loaded_from=None, params={},
                           controller=SimpleNamespace(l1_coeff=1e-8),
                           tcfg=SimpleNamespace(target_sparsity=0.75))


@pytest.mark.parametrize("steps", [1, 2, 9, 10, 11, 53])
def test_summary_equals_the_every_step_computation(steps):
    rng = random.Random(steps)
    history, records, times = StepHistory(log_interval=5), [], []
    for step in range(steps):
        metrics, seconds = step_metrics(rng, step), rng.uniform(0.01, 0.5)
        history.add(metrics, seconds)
        records.append(metrics)
        times.append(seconds)
    summary = summarize_run(fake_run(steps), history, {}, None, wall_s=1.0)
    want = every_step_summary(records, times, 4 * 16)
    for key in ("s_per_step", "tokens_per_s"):  # a running total vs sum(): the last bits differ
        assert summary.pop(key) == pytest.approx(want.pop(key), rel=1e-12), key
    assert {k: summary.get(k) for k in want} == want
    assert list(history.recent_times) == times[-5:]  # the ETA's window


def test_no_steps_gives_the_empty_summary():
    summary = summarize_run(fake_run(0), StepHistory(log_interval=5), {}, None, wall_s=1.0)
    assert summary["steps_this_run"] == 0 and summary["final_train_loss"] is None
    assert summary["train_loss_first"] is None and summary["tokens_per_s"] is None
    assert "final_sparsity" not in summary


def test_only_the_first_and_last_step_metrics_stay_alive():
    rng = random.Random(0)
    history, watched = StepHistory(log_interval=25), []
    for step in range(1000):
        metrics = step_metrics(rng, step)
        watched.append(weakref.ref(metrics))
        history.add(metrics, 0.1)
        del metrics
    gc.collect()
    alive = [i for i, ref in enumerate(watched) if ref() is not None]
    assert alive == [0, 999]
    assert len(history.sparsity_tail) == StepHistory.SPARSITY_TAIL
    assert len(history.recent_times) == 25


@pytest.mark.multiprocess
def test_rss_benchmark_smoke():
    """bench/bench_history_rss.py end to end on a few steps (a smoke test: its RSS numbers are
    the benchmark's to print, not asserted here)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "bench_history_rss.py"),
                           "--steps", "40", "--every", "10", "--layers", "2"],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [ln.split() for ln in proc.stdout.splitlines()]
    rows = [r for r in rows if len(r) == 3 and r[0].isdigit()]  # step, RSS bounded, RSS before
    assert [int(r[0]) for r in rows] == [0, 10, 20, 30, 40], proc.stdout[-2000:]
    assert "RSS growth per 1k steps, bounded:" in proc.stdout
    assert "RSS growth per 1k steps, every step kept (before):" in proc.stdout
