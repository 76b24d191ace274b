"""tools/dial_frontier.py and dial_calibration.frontier: points of `remoe dial` outputs averaged over
seeds, paired loss changes, the TopK-match ratio, against hand computations on synthetic outputs."""

import json
import math
import os
import subprocess
import sys

import pytest

from megatron.remoe.dial_calibration import frontier as F
from tests.helpers.paths import ROOT

TOOL = os.path.join(ROOT, "tools", "dial_frontier.py")


def _p(model, method, form, target, ept, loss, topk=None):
    expert = 2.0 * ept  # MFLOPs per token of the routed experts: 2 per expert in these fixtures
    d = {"model": model, "method": method, "form": form, "target": target, "experts_per_token": ept,
         "valid_loss": loss, "forward_flops_per_token": (10.0 + expert) * 1e6,
         "expert_flops_per_token": expert * 1e6}
    if topk is not None:
        d["topk"] = topk
    return d


def _sweep(folder, base_loss, curve, topk_losses):
    """A sweep.json: undialled at 1.0 experts/token, per-layer cut points [(ept, loss)], TopK k'."""
    os.makedirs(folder)
    points = [_p("ReMoE", "undialled", "-", None, 1.0, base_loss)]
    points += [dict(_p("ReMoE", "per-layer", "cut", ept, ept, loss), extra={"multiple": ept})
               for ept, loss in curve]
    # the sweep's 1x k point: the target clipped to this model's own experts/token
    points += [dict(_p("ReMoE", "per-layer", "cut", 0.99 - base_loss / 100, 0.99, base_loss),
                    extra={"multiple": 1.0})]
    points += [_p("TopK", "topk", "-", None, float(k), loss, topk=k) for k, loss in topk_losses]
    with open(os.path.join(folder, "sweep.json"), "w") as fh:
        json.dump({"points": points, "trained_topk": 1}, fh)


def _single(folder, thresholds, ept, loss, base_loss):
    os.makedirs(folder)
    d = {"thresholds": thresholds, "form": "cut", "method": "thresholds", "target_experts_per_token": None,
         "experts_per_token": ept, "valid_loss": loss, "forward_flops_per_token": (10 + 2 * ept) * 1e6,
         "expert_flops_per_token": 2 * ept * 1e6, "undialled": {"valid_loss": base_loss}}
    with open(os.path.join(folder, "dial.json"), "w") as fh:
        json.dump(d, fh)


@pytest.fixture
def runs(tmp_path):
    _sweep(tmp_path / "relu-s1", 5.0, [(0.5, 5.10), (0.25, 5.40)], [(1, 5.20), (2, 5.30)])
    _sweep(tmp_path / "relu-s2", 5.2, [(0.5, 5.26), (0.25, 5.70)], [(1, 5.30), (2, 5.50)])
    _single(tmp_path / "frontier-0.5-s1", [0.0, 0.0], 0.51, 5.05, 5.05)
    return tmp_path


def test_summary_matches_hand_computation(runs):
    points = F.load_run("relu-s1", runs / "relu-s1") + F.load_run("relu-s2", runs / "relu-s2")
    points += F.load_run("frontier-0.5-s1", runs / "frontier-0.5-s1")
    rows = {r.label + (f" {r.target}" if r.target else ""): r for r in F.summarise(points)}
    half = rows["relu per-layer cut 0.5"]
    assert half.seeds == (1, 2)
    assert half.valid_loss[0] == pytest.approx((5.10 + 5.26) / 2)
    assert half.valid_loss[1] == pytest.approx(math.sqrt(((5.10 - 5.18) ** 2 + (5.26 - 5.18) ** 2) / 1))
    # paired with each seed's own undialled loss: +0.10 and +0.06
    assert half.loss_change[0] == pytest.approx(0.08)
    assert half.loss_change[1] == pytest.approx(math.sqrt(2 * 0.02 ** 2))
    full = rows["relu per-layer cut 1.0"]  # clipped targets 0.94 and 0.938 meet under 1x k
    assert full.seeds == (1, 2) and full.experts_per_token[0] == pytest.approx(0.99)
    assert rows["TopK k'=2"].valid_loss[0] == pytest.approx(5.40) and rows["TopK k'=2"].group == "topk"
    assert math.isnan(rows["TopK k'=2"].loss_change[0])
    trained = rows["frontier-0.5 as trained"]  # thresholds all 0: the model as trained
    assert trained.method == "undialled" and trained.seeds == (1,)
    assert trained.experts_per_token[0] == pytest.approx(0.51) and math.isnan(trained.valid_loss[1])


def test_crossing_interpolates_the_first_point_below_the_level():
    curve = [(0.25, 5.4), (0.5, 5.1), (1.0, 5.0)]
    assert F.crossing(curve, 5.2) == pytest.approx(0.25 + 0.25 * (5.4 - 5.2) / (5.4 - 5.1))
    assert F.crossing(curve, 5.5) == 0.25  # below the level already at the lowest point
    assert F.crossing(curve, 4.9) is None


def test_match_topk_per_seed(runs):
    points = F.load_run("relu-s1", runs / "relu-s1") + F.load_run("relu-s2", runs / "relu-s2")
    ratios = F.match_topk(points, "relu", "per-layer", "cut")
    # seed 1: TopK k'=1 loss 5.20 at 2 expert MFLOPs; curve crosses 5.20 between 0.25 and 0.5 experts
    x1 = 0.25 + 0.25 * (5.40 - 5.20) / (5.40 - 5.10)
    x2 = 0.25 + 0.25 * (5.70 - 5.30) / (5.70 - 5.26)  # seed 2: TopK 5.30, first below at 0.5
    assert ratios[1] == pytest.approx(2 * x1 / 2.0)
    assert ratios[2] == pytest.approx(2 * x2 / 2.0)


@pytest.mark.multiprocess  # the tool as a subprocess
def test_cli_writes_table_and_refuses_bad_names(runs, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, TOOL, "--out", str(out), "--no-figures", "--match", "relu:per-layer:cut",
           "--run", f"relu-s1={runs / 'relu-s1'}", "--run", f"relu-s2={runs / 'relu-s2'}"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    summary = (out / "summary.md").read_text()
    assert "| relu per-layer cut | 0.5 | 2 | 0.500 ± 0.000 | 5.1800 ± 0.1131 | +0.0800 ± 0.0283 |" in summary
    assert "s1: 0." in summary and "s2: 0." in summary
    lines = (out / "points.csv").read_text().splitlines()
    assert len(lines) == 1 + 2 * 6
    bad = tmp_path / "bad"
    r = subprocess.run([sys.executable, TOOL, "--out", str(bad), "--run", f"relu={runs / 'relu-s1'}"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "GROUP-sSEED" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not bad.exists()


def test_a_topk_run_contributes_only_its_topk_points(runs):
    points = F.load_run("topk-s1", runs / "relu-s1")
    assert {p.model for p in points} == {"TopK"} and {p.group for p in points} == {"topk"}
    assert [p.topk for p in points] == [1, 2]
    with pytest.raises(F.FrontierError, match="seed given twice"):
        F.summarise(points + F.load_run("relu-s1", runs / "relu-s1"))


def test_paired_difference_by_seed(runs):
    _sweep(runs / "elastic-s1", 5.03, [(0.5, 5.07)], [])
    _sweep(runs / "elastic-s2", 5.21, [(0.5, 5.20)], [])
    points = [p for name in ("relu-s1", "relu-s2", "elastic-s1", "elastic-s2", "frontier-0.5-s1")
              for p in F.load_run(name, runs / name)]
    as_trained = F.paired_difference(points, F.Selector.parse("elastic"), F.Selector.parse("relu"))
    assert as_trained == pytest.approx({1: 5.03 - 5.0, 2: 5.21 - 5.2})
    half = F.paired_difference(points, F.Selector.parse("elastic:per-layer:cut:0.5"),
                               F.Selector.parse("relu:per-layer:cut:0.5"))
    assert half == pytest.approx({1: 5.07 - 5.10, 2: 5.20 - 5.26})
    # only seed 1 has a frontier model: the pair covers seed 1 alone
    vs_frontier = F.paired_difference(points, F.Selector.parse("elastic:per-layer:cut:0.5"),
                                      F.Selector.parse("frontier-0.5"))
    assert vs_frontier == pytest.approx({1: 5.07 - 5.05})
    assert F.paired_difference(points, F.Selector.parse("relu:per-layer:cut:0.375"),
                               F.Selector.parse("relu")) == {}
    for bad in ("relu:per-layer:cut", "relu:top:cut:0.5", "relu:per-layer:cut:half", ""):
        with pytest.raises(F.FrontierError, match="GROUP:METHOD:FORM:TARGET"):
            F.Selector.parse(bad)


@pytest.mark.multiprocess  # the tool as a subprocess
def test_cli_prints_pairs(runs, tmp_path):
    _sweep(runs / "elastic-s1", 5.03, [(0.5, 5.07)], [])
    out = tmp_path / "pairs"
    r = subprocess.run([sys.executable, TOOL, "--out", str(out), "--no-figures",
                        "--run", f"relu-s1={runs / 'relu-s1'}", "--run", f"relu-s2={runs / 'relu-s2'}",
                        "--run", f"elastic-s1={runs / 'elastic-s1'}", "--pair", "elastic=relu",
                        "--pair", "relu:per-layer:cut:0.5=relu"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    summary = (out / "summary.md").read_text()
    assert ("- elastic as trained - relu as trained, paired by seed: s1: +0.0300; mean +0.0300 "
            "(1 seed)") in summary
    assert ("- relu per-layer cut 0.5 - relu as trained, paired by seed: s1: +0.1000, s2: +0.0600; "
            "mean +0.0800 ± 0.0283 (2 seeds)") in summary
    r = subprocess.run([sys.executable, TOOL, "--out", str(tmp_path / "bad"), "--run",
                        f"relu-s1={runs / 'relu-s1'}", "--pair", "elastic"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and "A=B" in r.stderr and not (tmp_path / "bad").exists()
