"""bench/bench_dtype.py on two finished runs (`--runs`): the last-N sparsity against the target, the
Stage III statistics and the per-step CSVs against values computed by hand from the metrics it
read; a swapped pair is refused."""

import csv
import json
import math
import os
import statistics
import sys

import pytest

from tests.helpers.paths import ROOT

sys.path.insert(0, os.path.join(ROOT, "bench"))  # the benchmark and its `machine` helper

import bench_dtype  # noqa: E402  (found through the path above)

pytestmark = pytest.mark.slow

TARGET = 0.875


def fake_run(path, bf16: bool, sparsity: list, lambdas: list) -> str:
    """A finished demo run directory as `remoe demo` leaves it (metrics, summary, config)."""
    os.makedirs(path)
    with open(os.path.join(path, "metrics.jsonl"), "w", encoding="utf-8") as f:
        for i, (s, lam) in enumerate(zip(sparsity, lambdas, strict=True), start=1):
            f.write(json.dumps({"iteration": i, "split": "train", "lm_loss": 9.0 - 0.01 * i,
                                "moe_relu_sparsity": s, "moe_relu_l1_reg_coeff": lam,
                                "l1_reg_loss": 1.0, "lr": 1e-3, "grad_norm": 1.0}) + "\n")
        f.write(json.dumps({"iteration": len(sparsity), "split": "valid", "valid/loss": 7.5}) + "\n")
    with open(os.path.join(path, "summary.json"), "w", encoding="utf-8") as f:
        json.dump({"target_sparsity": TARGET, "s_per_step": 1.0, "tokens_per_s": 1024.0,
                   "valid/loss": 7.5, "final_train_loss": 8.0, "sparsity_last10": 0.87,
                   "final_lambda": lambdas[-1], "memory_gb": 1.0}, f)
    with open(os.path.join(path, "config.yaml"), "w", encoding="utf-8") as f:
        f.write(f"router: relu\nbf16: {'true' if bf16 else 'false'}\n")
    return path


def test_finished_runs_give_last_n_sparsity_stage3_and_csvs(tmp_path, capsys):
    steps = 120
    # Stage I ramp for 20 steps, then an oscillation around the target
    sparsity = [0.5 + 0.018 * i for i in range(20)] + \
        [TARGET + 0.02 * math.sin(i / 3.0) for i in range(steps - 20)]
    lambdas = [1e-8 * 1.2 ** i for i in range(steps)]
    fp32 = fake_run(str(tmp_path / "fp32"), False, sparsity, lambdas)
    bf16 = fake_run(str(tmp_path / "bf16"), True, [s - 0.004 for s in sparsity], lambdas)
    prefix = str(tmp_path / "out" / "demo")
    args = ["--runs", fp32, bf16, "--csv-prefix", prefix, "--last", "50"]
    assert bench_dtype.main(args) == 0
    out = capsys.readouterr().out

    last50 = statistics.fmean(sparsity[-50:])
    assert f"fp32: sparsity over the last 50 steps {last50:.4f}" in out
    assert f"bf16: sparsity over the last 50 steps {last50 - 0.004:.4f}" in out
    record = bench_dtype.run_record(json.load(open(os.path.join(fp32, "summary.json"))),
                                    os.path.join(fp32, "metrics.jsonl"), 25, 50)
    first = next(i for i, s in enumerate(sparsity) if s >= TARGET)
    stage3 = sparsity[first:]
    assert record["stage3"]["from_step"] == first + 1
    assert record["stage3"]["std"] == pytest.approx(statistics.pstdev(stage3), rel=1e-9)
    assert record["stage3"]["log10_lambda_range"] == pytest.approx(
        (steps - 1 - first) * math.log10(1.2), rel=1e-9)
    assert record["valid"] == [(steps, 7.5)]

    with open(prefix + "-bf16.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == steps and tuple(rows[0]) == bench_dtype.CSV_COLUMNS
    assert [float(r["moe_relu_sparsity"]) for r in rows] == [s - 0.004 for s in sparsity]

    with pytest.raises(SystemExit, match="not the fp32 run"):
        bench_dtype.main(["--runs", bf16, fp32])


def test_plot_is_written(tmp_path):
    pytest.importorskip("matplotlib")
    sparsity = [TARGET] * 30
    runs = {d: bench_dtype.run_record(
        {"target_sparsity": TARGET},
        os.path.join(fake_run(str(tmp_path / d), d == "bf16", sparsity, [1e-3] * 30),
                     "metrics.jsonl"), 10, 20) for d in bench_dtype.DTYPES}
    path = bench_dtype.plot(runs, str(tmp_path / "fig" / "demo.png"), 10, 20)
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
