"""Ablation grids (`tools/ablate.py`, megatron.remoe.ablation): grid expansion and its errors,
stage/settling detection, FLOPs and compute matching against hand-computed values, and the whole
tool on real tiny runs (collector, tables, plots, resume-skip)."""

import glob
import json
import math
import os
import subprocess
import sys

import pytest
import yaml

from megatron.remoe import ablation as ab
from megatron.remoe.training.config import TrainConfig
from tests.helpers.paths import ROOT
from tools.parity.tiny_gpt import build_corpus, pretrain_env

pytestmark = pytest.mark.timeout(150)


def write_grid(tmp_path, **grid) -> str:
    path = tmp_path / "grid.yaml"
    grid.setdefault("base", {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
                             "seq_length": 32, "train_iters": 4})
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    return str(path)


# ------------------------------------------------------------------------------------------------
# Expansion
# ------------------------------------------------------------------------------------------------
def test_expansion_names_products_and_collapsing(tmp_path):
    path = write_grid(tmp_path, axes={"router": ["relu", "topk", "dense"], "E": [4, 8],
                                      "lambda_0": [1e-8], "seed": [1, 2]},
                      compute_match=True)
    grid = ab.load_grid(path, out=str(tmp_path / "out"))
    names = [r.name for r in grid.runs]
    # seeds outermost; lambda_0 only names ReLU runs; dense does not depend on E (collapsed);
    # each topk-cm run follows its TopK run and its ReLU partner
    per_seed = ["relu-E4-l0_1e-08-s{s}", "relu-E8-l0_1e-08-s{s}", "topk-E4-s{s}",
                "topk-cm-E4-s{s}", "topk-E8-s{s}", "topk-cm-E8-s{s}", "dense-s{s}"]
    assert names == [n.format(s=s) for s in (1, 2) for n in per_seed]
    relu = grid.run("relu-E8-l0_1e-08-s2")
    assert relu.group == "relu-E8-l0_1e-08"
    assert relu.fields["num_experts"] == 8 and relu.fields["seed"] == 2
    assert relu.fields["moe_relu_l1_reg_coeff_init"] == 1e-8 and relu.fields["router"] == "relu"
    assert "moe_relu_l1_reg_coeff_init" not in grid.run("topk-E8-s1").fields
    dense = grid.run("dense-s1").fields
    assert dense["router"] == "dense" and "num_experts" not in dense
    cm = grid.run("topk-cm-E4-s1")
    assert (cm.partner, cm.topk, cm.fields["router"]) == ("relu-E4-l0_1e-08-s1", "topk-E4-s1",
                                                         "topk")
    assert len(names) == len(set(names)) == 14


def test_expansion_load_balancing_k_and_granularity(tmp_path):
    path = write_grid(tmp_path, axes={"router": ["relu", "topk", "dense"], "k": [2],
                                      "G": [1, 4], "load_balancing": [True, False]})
    grid = ab.load_grid(path)
    names = [r.name for r in grid.runs]
    assert names == ["relu-k2-G1-lb", "relu-k2-G1-nolb", "relu-k2-G4-lb", "relu-k2-G4-nolb",
                     "topk-k2-G1-lb", "topk-k2-G1-nolb", "topk-k2-G4-lb", "topk-k2-G4-nolb",
                     "dense-k2"]
    assert grid.run("relu-k2-G4-nolb").fields["moe_relu_no_load_balancing"] is True
    assert grid.run("relu-k2-G4-lb").fields["moe_relu_no_load_balancing"] is False
    assert grid.run("topk-k2-G1-nolb").fields["moe_aux_loss_coeff"] == 0.0
    assert "moe_aux_loss_coeff" not in grid.run("topk-k2-G1-lb").fields
    # dense at matched active parameters: one MLP as wide as k experts
    assert grid.run("dense-k2").fields["ffn_hidden_size"] == 2 * 4 * 64
    assert grid.out == os.path.join("runs", "ablations", "grid")


BAD_GRIDS = [
    ({"axes": {"experts": [4, 8]}}, "unknown axis 'experts'"),
    ({"axes": {"router": []}}, "non-empty list"),
    ({"axes": {"router": ["relu", "softmax"]}}, "router 'softmax'"),
    ({"axes": {"seed": ["one"]}}, "seed='one'"),
    ({"axes": {"seed": [1, 1]}}, "twice"),
    ({"axes": {"k": [9], "E": [8]}}, "k=9 must be in [1, E=8]"),
    ({"axes": {"router": ["relu"], "G": [3]}}, "G=3 does not divide"),
    ({"axes": {"router": ["relu"]}, "compute_match": True}, "needs TopK runs"),
    ({"axes": {"router": ["topk"]}, "compute_match": True}, "has no ReLU run"),
    ({"axes": {"router": ["relu"]}, "lr_rate": 1}, "unknown key 'lr_rate'"),
    ({"axes": {"router": ["relu"]}, "base": {"hiden_size": 64}}, "did you mean 'hidden_size'"),
    ({"axes": {"lambda_0": [0.0]}}, "lambda_0 must be > 0"),
    ({"axes": {"load_balancing": ["yes"]}}, "is not true/false"),
]


@pytest.mark.parametrize("grid,needle", BAD_GRIDS, ids=[b[1][:24] for b in BAD_GRIDS])
def test_grid_errors(tmp_path, grid, needle):
    path = write_grid(tmp_path, **grid)
    with pytest.raises(ab.GridError) as err:
        ab.load_grid(path)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_cli_error_exit_2_and_nothing_written(tmp_path, capsys):
    path = write_grid(tmp_path, axes={"router": ["relu", "topk"], "E": [2, 4], "k": [3]})
    out = tmp_path / "out"
    assert ab.main([path, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: run relu-E2-k3: k=3 must be in [1, E=2]") and "\n" not in err
    assert not out.exists()
    assert ab.main([path, "--out", str(out), "--set", "nonsense"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err
    assert not out.exists()


# ------------------------------------------------------------------------------------------------
# Stages, settling, FLOPs, compute matching
# ------------------------------------------------------------------------------------------------
def test_stages_and_settling_hand_computed():
    target = 0.75
    #          1    2    3    4    5    6     7     8     9    10    11
    trace = [0.5, 0.3, 0.2, 0.2, 0.4, 0.6, 0.745, 0.70, 0.755, 0.75, 0.76]
    st = ab.sparsity_stages(trace, target, tol=0.01, window=1)
    # lo = 0.2 (step 3); level = 0.2 + 0.1 * 0.55 = 0.255; last step <= level before step 7 is
    # step 4, so Stage II starts at 5; first within 0.01 at step 7; stays within from step 9
    assert st == {"stage2": 5, "reach": 7, "settle": 9}
    assert ab.sparsity_stages(trace[:8], target, window=1)["settle"] is None
    # never near the target: no Stage III, Stage II from the lowest point
    assert ab.sparsity_stages([0.9, 0.8, 0.85], 0.5, window=1) == {"stage2": 2, "reach": None,
                                                                  "settle": None}
    # smoothing: a centred 3-step mean
    assert ab.smooth([0.0, 3.0, 6.0, 9.0], 3) == [1.5, 3.0, 6.0, 7.5]
    noisy = [0.75 + (0.02 if i % 2 else -0.02) for i in range(20)]
    assert ab.sparsity_stages(noisy, target, window=1)["settle"] is None
    assert ab.sparsity_stages(noisy, target, window=5)["settle"] == 1


# a run's fields as config.yaml holds them: all of TrainConfig's
TINY = TrainConfig(router="topk", num_layers=2, hidden_size=64, num_attention_heads=4,
                   num_query_groups=2, ffn_hidden_size=256, seq_length=32, num_experts=4,
                   moe_router_topk=1, moe_granularity=1).to_dict()


def test_flops_hand_computed():
    f = ab.flops_per_token(TINY, vocab_size=512)
    # attention projections 64*16*(4+2*2) + 4*16*64 = 12,288; one SwiGLU expert 3*64*256 =
    # 49,152; router 4*64 = 256; output layer 512*64 = 32,768
    # matmul = 2*12,288 + 2*(49,152 + 256) + 32,768 = 156,160
    # forward = 2*156,160 + 2 layers * 2*32*4*16 = 320,512; train = 3x = 961,536
    assert f["train"] == 961_536
    assert f["moe_share"] == pytest.approx(6 * 2 * 49_152 / 961_536)
    # a ReLU step with 2.5 experts per token costs 1.5 extra experts in both layers
    relu = ab.flops_per_token(dict(TINY, router="relu"), 512, experts_per_token=2.5)
    assert relu["train"] == 961_536 + 3 * 2 * 2 * 1.5 * 49_152
    # dense: one MLP of width 256 and no router
    assert ab.flops_per_token(dict(TINY, router="dense"), 512)["train"] == \
        961_536 - 3 * 2 * 2 * 256
    # granularity 4: 16 experts of width 64, 4 active: the same expert FLOPs, a wider router
    g4 = ab.flops_per_token(dict(TINY, moe_granularity=4), 512)
    assert g4["train"] == 961_536 + 3 * 2 * 2 * (16 - 4) * 64
    # moe_layer_freq 2 on 2 layers: layer 0 MoE, layer 1 dense
    assert ab.moe_layer_count(2, 2) == 1 and ab.moe_layer_count(4, [1, 0, 1, 1]) == 3


def test_flops_agree_with_parameter_count():
    from megatron.remoe.model import build_transformer_config, count_parameters

    tc = build_transformer_config(router="topk", num_experts=4, moe_router_topk=1,
                                  num_layers=2, hidden_size=64, num_attention_heads=4,
                                  num_query_groups=2, ffn_hidden_size=256)
    p = count_parameters(tc, 512)
    assert ab.vocab_from_params(p, 64) == 512
    norms = 2 * 64 * 2 + 64
    matmul = p["active"] - 512 * 64 - norms  # the input embedding is a lookup
    f = ab.flops_per_token(TINY, 512)
    assert f["train"] == 3 * (2 * matmul + 2 * 2 * 32 * 4 * 16)


def test_compute_match_extra_steps_hand_computed():
    share = 0.6
    # E = 4, k = 1: a = 4 * (1 - S) = 2, 3, 1, 0.8 active experts; Stage III from step 3
    extra = ab.compute_match_extra_steps([0.5, 0.25, 0.75, 0.8], 4, 1, share, stage3_start=3)
    assert extra == pytest.approx((1 + 2) * share)
    # without Stage III every step counts; steps under k experts add nothing
    assert ab.compute_match_extra_steps([0.5, 0.25, 0.75, 0.8], 4, 1, share, None) == \
        pytest.approx(3 * share)
    # granularity: E*G = 16, k*G = 2: a = 16 * 0.75 = 4 -> (4 - 2) / 2 = 1 per step
    assert ab.compute_match_extra_steps([0.75, 0.75], 16, 2, share, None) == \
        pytest.approx(2 * share)


def test_aggregate_mean_std():
    recs = [{"name": f"relu-s{s}", "group": "relu", "router": "relu", "seed": s,
             "final_valid_loss": v, "settle_step": st, "tag": "x"}
            for s, v, st in ((1, 5.0, 100), (2, 5.2, None), (3, 5.4, 120))]
    (row,) = ab.aggregate(recs)
    assert row["seeds"] == 3 and row["final_valid_loss"] == pytest.approx(5.2)
    assert row["final_valid_loss_std"] == pytest.approx(0.2)  # sample std
    assert row["settle_step"] is None and row["settle_step_n"] == 2 and row["tag"] == "x"


# ------------------------------------------------------------------------------------------------
# Time to quality, paired tests over seeds, Stage III steadiness, per-layer allocation
# ------------------------------------------------------------------------------------------------
def test_time_to_quality_on_synthetic_curves():
    # 400 steps of 10 tokens; the first 50 steps cost 2 FLOP units per token, the rest 1
    per_step = [2.0] * 50 + [1.0] * 350
    cum = [sum(per_step[:i + 1]) * 10 for i in range(400)]
    steps, losses = [100, 200, 300, 400], [5.0, 4.0, 3.0, 2.5]
    got = ab.time_to_quality(steps, losses, 3.5, cum, 10)
    # crossing halfway between the evaluations at 200 (4.0) and 300 (3.0)
    assert got["step"] == 250 and got["tokens"] == 2500 and not got["bound"]
    assert got["flops"] == pytest.approx((50 * 2 + 200 * 1) * 10)
    # 3.2 is reached at step 280: 50 steps at 2 units, 230 at 1
    assert ab.time_to_quality(steps, losses, 3.2, cum, 10)["flops"] == pytest.approx(
        (50 * 2 + 230) * 10)
    assert ab.time_to_quality(steps, losses, 2.4, cum, 10) is None  # never reached
    first = ab.time_to_quality(steps, losses, 6.0, cum, 10)  # already at the first evaluation
    assert first["step"] == 100 and first["bound"] and first["flops"] == (50 * 2 + 50) * 10
    # exactly on an evaluation
    assert ab.time_to_quality(steps, losses, 3.0, cum, 10)["step"] == 300


@pytest.mark.parametrize("t", [0.0, 0.3, 1.0, 2.5, 4.303, 12.7, -3.0])
def test_student_t_p_against_closed_forms(t):
    assert ab.student_t_two_sided_p(t, 1) == pytest.approx(1 - 2 / math.pi * math.atan(abs(t)),
                                                           abs=1e-10)
    assert ab.student_t_two_sided_p(t, 2) == pytest.approx(1 - abs(t) / math.sqrt(t * t + 2),
                                                           abs=1e-10)
    # many degrees of freedom: the normal distribution
    assert ab.student_t_two_sided_p(t, 100000) == pytest.approx(
        math.erfc(abs(t) / math.sqrt(2)), abs=1e-4)


def test_paired_comparison_hand_computed():
    a = {1: 6.00, 2: 6.10, 3: 6.05}
    b = {1: 6.30, 2: 6.35, 3: 6.20, 4: 9.0}  # seed 4 has no pair
    got = ab.paired_comparison(a, b)
    d = [-0.30, -0.25, -0.15]
    mean = sum(d) / 3
    std = math.sqrt(sum((x - mean) ** 2 for x in d) / 2)
    t = mean / (std / math.sqrt(3))
    assert got["n"] == 3 and got["same_sign"] == 3
    assert got["mean"] == pytest.approx(mean) and got["std"] == pytest.approx(std)
    assert got["t"] == pytest.approx(t)
    assert got["p"] == pytest.approx(1 - abs(t) / math.sqrt(t * t + 2))  # df = 2
    assert ab.paired_comparison({1: 1.0}, {1: 2.0}) is None


def test_stage3_steadiness_and_layer_allocation():
    sparsity = [0.5, 0.7, 0.88, 0.86, 0.89, 0.87]
    lambdas = [1e-8, 1e-4, 1e-2, 1e-3, 1e-1, 1e-2]
    got = ab.stage3_steadiness(sparsity, lambdas, 2)
    tail = [0.88, 0.86, 0.89, 0.87]
    m = sum(tail) / 4
    assert got["stage3_sparsity_std"] == pytest.approx(
        math.sqrt(sum((x - m) ** 2 for x in tail) / 3))
    assert got["stage3_log10_lambda_range"] == pytest.approx(2.0)  # 1e-3 .. 1e-1
    assert ab.stage3_steadiness(sparsity, lambdas, None)["stage3_sparsity_std"] is None
    train = [{"iteration": i, "moe/layer_1/sparsity": 0.6 + 0.01 * (i % 2),
              "moe/layer_3/sparsity": 0.95, "moe/layer_3/zero_expert_tokens": 0.7 + 0.001 * i}
             for i in range(1, 101)]
    train[49]["moe/layer_3/dead_experts"] = 5
    train[99]["moe/layer_3/dead_experts"] = 2  # the last logging window wins
    got = ab.layer_allocation(train)
    assert got["layer1_sparsity"] == pytest.approx(0.605)  # last 10 steps: 5 odd, 5 even
    assert got["layer3_sparsity"] == pytest.approx(0.95)
    assert got["layer3_zero_tokens"] == pytest.approx(0.7 + 0.001 * 95.5)
    assert got["layer3_dead_experts"] == 2 and "layer1_dead_experts" not in got


def test_comparisons_and_time_to_quality_over_a_synthetic_grid(tmp_path):
    """relu / topk / dense x 3 seeds with made-up curves: the pairs, the t-test and time to
    quality come out per seed and aggregated into the results table."""
    path = write_grid(tmp_path, axes={"router": ["relu", "topk", "dense"], "seed": [1, 2, 3]})
    grid = ab.load_grid(path, out=str(tmp_path / "out"))
    final = {"relu": [5.0, 5.1, 5.05], "topk": [5.3, 5.35, 5.2], "dense": [5.4, 5.3, 5.5]}
    records, traces = [], {}
    for spec in grid.runs:
        seed = spec.axes["seed"]
        loss = final[spec.router][seed - 1]
        curve = [loss + 0.6, loss + 0.2, loss]  # evaluations at steps 10, 20, 30
        records.append({"name": spec.name, "group": spec.group, "router": spec.router,
                        "seed": seed, "final_valid_loss": loss, "tokens": 300,
                        "total_train_flops": 3000.0})
        traces[spec.name] = {"step": list(range(1, 31)), "valid_step": [10, 20, 30],
                             "valid_loss": curve, "cum_flops": [100.0 * i for i in range(1, 31)],
                             "tokens_per_step": 10}
    ab.add_time_to_quality(grid, records, traces)
    relu1 = next(r for r in records if r["name"] == "relu-s1")
    # TopK seed 1 ends at 5.3: ReLU's curve 5.6 (10), 5.2 (20) -> 5.3 at step 17.5
    assert relu1["ttq_vs"] == "topk-s1" and relu1["ttq_step"] == pytest.approx(17.5)
    assert relu1["ttq_tokens_ratio"] == pytest.approx(175 / 300)
    assert relu1["ttq_flops_ratio"] == pytest.approx(1750 / 3000)
    dense2 = next(r for r in records if r["name"] == "dense-s2")
    # TopK seed 2 ends at 5.35: dense's 5.5 (20), 5.3 (30) -> step 27.5
    assert dense2["ttq_reached"] == 1 and dense2["ttq_step"] == pytest.approx(27.5)
    dense3 = next(r for r in records if r["name"] == "dense-s3")
    assert dense3["ttq_reached"] == 0 and dense3["ttq_tokens_ratio"] is None
    assert "ttq_vs" not in next(r for r in records if r["router"] == "topk")
    comps = {(c["a"], c["b"]): c for c in ab.paired_comparisons(grid, records)}
    assert set(comps) == {("relu", "topk"), ("relu", "dense"), ("topk", "dense")}
    assert comps[("relu", "topk")]["mean"] == pytest.approx(-0.7 / 3)
    assert comps[("relu", "topk")]["p"] == ab.paired_comparison(
        dict(enumerate(final["relu"])), dict(enumerate(final["topk"])))["p"]
    md = ab.markdown_comparisons(ab.aggregate(records), list(comps.values()))
    assert "| `relu` | `topk` | 3 | -0.2333 ± " in md
    assert "| `dense` | 5.2833 ± 0.0764 | 1/3 | - (1/3 seeds) |" in md


# ------------------------------------------------------------------------------------------------
# The tool end to end on real tiny runs
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return build_corpus(tmp_path_factory.mktemp("data"), num_files=30, chars_per_file=6000)


def run_tool(args, timeout=120):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "ablate.py")] + args,
                          capture_output=True, text=True, env=pretrain_env(), timeout=timeout,
                          cwd=ROOT)
    return proc


@pytest.mark.multiprocess
@pytest.mark.timeout(240)
def test_tool_collects_real_runs_and_skips_finished(corpus, tmp_path):
    out = tmp_path / "abl"
    grid = write_grid(
        tmp_path, name="tiny", checkpoints=False, compute_match=True, settle_window=1,
        base={"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
              "num_query_groups": 2, "seq_length": 32, "num_experts": 4,
              "micro_batch_size": 4, "global_batch_size": 4, "lr": 3e-3, "min_lr": 3e-4,
              "lr_warmup_iters": 1, "log_interval": 2, "eval_iters": 1, "eval_interval": 3,
              "train_iters": 6, "moe_relu_l1_reg_coeff_init": 1e-3,
              "data_path": [corpus["train"]],
              # two "domains" (the same held-out files twice): per-domain columns
              "valid_data_path": ["0.5", corpus["valid"], "0.5", corpus["valid"] + "2"],
              "tokenizer": corpus["tokenizer"],
              "data_cache_path": os.path.join(str(tmp_path), "cache")},
        axes={"router": ["relu", "topk", "dense"]})
    for ext in (".bin", ".idx"):
        os.link(corpus["valid"] + ext, corpus["valid"] + "2" + ext) \
            if not os.path.exists(corpus["valid"] + "2" + ext) else None
    proc = run_tool([grid, "--out", str(out)], timeout=200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[1/4] relu: done" in proc.stdout and "[4/4] dense: done" in proc.stdout

    results = json.load(open(out / "results.json"))
    runs = {r["name"]: r for r in results["runs"]}
    assert list(runs) == ["relu", "topk", "topk-cm", "dense"] and not results["missing"]
    relu, topk, cm = runs["relu"], runs["topk"], runs["topk-cm"]
    trace = results["traces"]["relu"]
    metrics = [json.loads(x) for x in open(out / "relu" / "metrics.jsonl")]
    train = [m for m in metrics if m["split"] == "train"]
    valid = [m for m in metrics if m["split"] == "valid"]
    assert trace["sparsity"] == [m["moe_relu_sparsity"] for m in train]
    assert trace["lambda"][1] == pytest.approx(trace["lambda"][0] * 1.2, rel=1e-6) or \
        trace["lambda"][1] == pytest.approx(trace["lambda"][0] / 1.2, rel=1e-6)
    assert relu["final_valid_loss"] == valid[-1]["valid/loss"]
    assert relu["best_valid_loss"] == min(v["valid/loss"] for v in valid)
    assert relu["final_valid_valid"] == valid[-1]["valid/valid/loss"]
    assert relu["steps"] == 6 and relu["target_sparsity"] == 0.75
    stages = ab.sparsity_stages(trace["sparsity"], 0.75, 0.01, 1)
    assert relu["reach_step"] == stages["reach"] and relu["settle_step"] == stages["settle"]
    # FLOPs from the run's own config and summary; ReLU's run mean from its measured sparsity
    summary = json.load(open(out / "topk" / "summary.json"))
    vocab = ab.vocab_from_params(summary["params"], 64)
    cfg = dict(TINY, ffn_hidden_size=256)
    assert topk["train_flops_per_token"] == ab.flops_per_token(cfg, vocab)["train"]
    assert topk["active_params"] == summary["params"]["active"] == relu["active_params"]
    assert topk["tokens_per_s"] == summary["tokens_per_s"] > 0
    mean_relu = sum(ab.flops_per_token(dict(cfg, router="relu"), vocab, 4 * (1 - s))["train"]
                    for s in trace["sparsity"]) / 6
    assert relu["mean_train_flops_per_token"] == pytest.approx(mean_relu)
    # compute matching: TopK got ceil(ReLU's Stage I/II extra compute) extra steps
    extra = ab.compute_match_extra_steps(trace["sparsity"], 4, 1,
                                         ab.flops_per_token(cfg, vocab)["moe_share"],
                                         stages["reach"])
    assert cm["extra_steps"] == math.ceil(extra) and cm["steps"] == 6 + math.ceil(extra)
    assert math.ceil(extra) >= 1
    # tokens, time to TopK's final loss (from the real curves) and per-layer allocation
    assert relu["tokens"] == topk["tokens"] == 6 * 4 * 32
    assert relu["ttq_vs"] == "topk" and relu["ttq_target_loss"] == topk["final_valid_loss"]
    got = ab.time_to_quality(trace["valid_step"], trace["valid_loss"], topk["final_valid_loss"],
                             trace["cum_flops"], 4 * 32)
    assert relu["ttq_reached"] == int(got is not None)
    if got is not None:
        assert relu["ttq_tokens_ratio"] == pytest.approx(got["tokens"] / topk["tokens"])
    assert trace["cum_flops"][-1] == pytest.approx(relu["total_train_flops"])
    last = train[-1]
    assert relu["layer2_sparsity"] == pytest.approx(
        sum(m["moe/layer_2/sparsity"] for m in train[-6:]) / 6)  # at least 10 steps: all 6
    assert relu["layer1_dead_experts"] == last["moe/layer_1/dead_experts"]
    # outputs
    md = (out / "results.md").read_text()
    for needle in ("`relu`", "`topk-cm`", "`dense`", "Per-domain", "valid2", "Time to quality",
                   "Per-layer allocation", "Stage III"):
        assert needle in md, needle
    assert (out / "results.csv").read_text().count("\n") == 5
    assert "final_valid_loss_std" in (out / "summary.csv").read_text()
    for png in ("valid_loss.png", "sparsity_lambda.png"):
        assert (out / "plots" / png).stat().st_size > 5000

    # rerun: nothing retrains (summary files untouched); a deleted summary retrains that run only
    mtimes = {n: os.stat(out / n / "summary.json").st_mtime_ns for n in runs}
    os.remove(out / "dense" / "summary.json")
    proc = run_tool([grid, "--out", str(out)], timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for n in ("relu", "topk", "topk-cm"):
        assert f"{n}: finished earlier" in proc.stdout
        assert os.stat(out / n / "summary.json").st_mtime_ns == mtimes[n]
    assert "[4/4] dense: training 6 steps" in proc.stdout
    assert proc.stdout.count("training ") == 1

    # a changed grid does not overwrite finished runs: one-line error, exit 2
    proc = run_tool([grid, "--out", str(out), "--set", "train_iters=7"], timeout=60)
    assert proc.returncode == 2 and "train_iters: 6 -> 7" in proc.stderr
    assert os.stat(out / "relu" / "summary.json").st_mtime_ns == mtimes["relu"]


@pytest.mark.slow
@pytest.mark.smoke  # file names and sizes only
def test_plots_vs_E_and_G(tmp_path):
    """The loss-vs-E / vs-G figures from collected rows (no training needed)."""
    path = write_grid(tmp_path, axes={"router": ["relu", "topk", "dense"], "E": [4, 8],
                                      "G": [1, 2]})
    grid = ab.load_grid(path, out=str(tmp_path / "out"))
    records, traces = [], {}
    for i, spec in enumerate(grid.runs):
        rec = {"name": spec.name, "group": spec.group, "router": spec.router, "seed": 1,
               "final_valid_loss": 5.0 - 0.01 * i}
        rec.update({k: v for k, v in spec.axes.items() if k != "router"})
        records.append(rec)
        traces[spec.name] = {"valid_step": [1, 2], "valid_loss": [6.0, 5.0], "step": [1, 2]}
    written = ab.make_plots(grid, records, ab.aggregate(records), traces)
    names = sorted(os.path.basename(p) for p in written)
    assert names == ["loss_vs_E.png", "loss_vs_G.png", "valid_loss.png"]
    assert all(os.path.getsize(p) > 5000 for p in written)



@pytest.mark.smoke  # every shipped grid expands to unique run names
@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "examples", "remoe",
                                                              "ablations", "*.yaml"))))
def test_shipped_grids_expand(path):
    """Every shipped grid loads and expands into uniquely named, validated runs."""
    runs = ab.expand(ab.load_grid(path))
    assert runs and len({r.name for r in runs}) == len(runs)


def test_cpu_converge_grids_expand_to_the_planned_runs():
    """cpu-converge: 4 routers x 3 seeds at >= 3M tokens per run; the E sweep: E = 4..32, k = 1,
    ReLU and TopK, 2 seeds; the allocation grid: ReLU with/without load balancing and two lambda
    rules (issue 16)."""
    folder = os.path.join(ROOT, "examples", "remoe", "ablations")
    grid = ab.load_grid(os.path.join(folder, "cpu-converge.yaml"))
    assert sorted({r.router for r in grid.runs}) == ["dense", "relu", "topk", "topk-cm"]
    assert len(grid.runs) == 12 and {r.axes["seed"] for r in grid.runs} == {1, 2, 3}
    for r in grid.runs:
        f = r.fields
        assert f["train_iters"] * f["global_batch_size"] * f["seq_length"] >= 3_000_000, r.name
    experts = ab.load_grid(os.path.join(folder, "cpu-converge-experts.yaml"))
    assert sorted((r.router, r.fields["num_experts"], r.axes["seed"]) for r in experts.runs) == \
        sorted((router, E, s) for router in ("relu", "topk") for E in (4, 8, 16, 32)
               for s in (1, 2))
    assert all(r.fields["moe_router_topk"] == 1 and r.fields == dict(
        grid.run("relu-s1").fields, router=r.router, num_experts=r.fields["num_experts"],
        seed=r.axes["seed"], moe_router_topk=1) for r in experts.runs)
    alloc = ab.load_grid(os.path.join(folder, "cpu-converge-allocation.yaml"))
    assert "relu-nolb-ctl_pi-s2" in {r.name for r in alloc.runs}
    nolb = alloc.run("relu-nolb-ctl_pi-s2").fields
    assert nolb["moe_relu_no_load_balancing"] is True
    assert nolb["moe_relu_l1_reg_coeff_controller"] == "pi"


def test_option_axes_are_compared_within_a_router(tmp_path):
    """load_balancing x controller for ReLU: each option is paired with the run that differs only
    in it (first value in the file minus the later one); numeric axes are not paired."""
    path = write_grid(tmp_path, axes={"router": ["relu"], "load_balancing": [True, False],
                                      "controller": ["paper", "pi"], "E": [4, 8],
                                      "seed": [1, 2]})
    grid = ab.load_grid(path, out=str(tmp_path / "out"))
    records = [{"name": r.name, "group": r.group, "router": r.router, "seed": r.axes["seed"],
                "final_valid_loss": 5.0 + 0.1 * (not r.axes["load_balancing"])
                + 0.01 * (r.axes["moe_relu_l1_reg_coeff_controller"] == "pi")
                + 0.001 * r.axes["seed"]} for r in grid.runs]
    comps = {(c["a"], c["b"]): c for c in ab.paired_comparisons(grid, records)}
    want = set()
    for e in (4, 8):
        want |= {(f"relu-lb-ctl_paper-E{e}", f"relu-nolb-ctl_paper-E{e}"),
                 (f"relu-lb-ctl_pi-E{e}", f"relu-nolb-ctl_pi-E{e}"),
                 (f"relu-lb-ctl_paper-E{e}", f"relu-lb-ctl_pi-E{e}"),
                 (f"relu-nolb-ctl_paper-E{e}", f"relu-nolb-ctl_pi-E{e}")}
    assert set(comps) == want
    c = comps[("relu-lb-ctl_paper-E8", "relu-nolb-ctl_paper-E8")]
    assert c["n"] == 2 and c["mean"] == pytest.approx(-0.1)
    assert c["std"] == pytest.approx(0, abs=1e-12) and c["p"] < 1e-6
