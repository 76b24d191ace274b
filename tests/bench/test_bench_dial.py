"""bench/bench_dial.py in a tiny configuration (no timing assertions): every workload x budget row
is there, the dialled budgets realise fewer experts per token, the HF prefill and the megatron
forward route the same tokens alike, and the FLOP-predicted speed-ups equal a hand computation of
the forward FLOPs at the realised experts per token; `--load` of a Megatron checkpoint saved from
the same random model gives the same dials and counts."""

import csv
import json
import os
import sys

import pytest

from tests.helpers.paths import ROOT

pytest.importorskip("transformers")

sys.path.insert(0, os.path.join(ROOT, "bench"))  # the benchmark and its `machine` helper

import bench_dial  # noqa: E402  (found through the path above)

pytestmark = pytest.mark.timeout(300)

# the tiny model: 2 MoE layers, hidden 32, 4 heads / 2 query groups (head dim 8), 8 experts of
# width 64, vocab 256, seq 32
L, H, HEADS, GROUPS, FFN, E, V, SEQ = 2, 32, 4, 2, 64, 8, 256, 32
SHAPE = (f"num_layers={L},hidden_size={H},num_attention_heads={HEADS},num_query_groups={GROUPS},"
         f"ffn_hidden_size={FFN},seq_length={SEQ},vocab_size={V}")
BATCH, PROMPT, NEW = 2, 8, 4
RUN = ["--batch", str(BATCH), "--prompt", str(PROMPT), "--new-tokens", str(NEW), "--rounds", "1",
       "--calibration-sequences", "4", "--threads", "1"]


def hand_forward_flops(experts_per_token: float, seq: int) -> float:
    """2 x the matmul parameters a token uses + causal attention, written out for SHAPE."""
    hd = H // HEADS
    attention = H * hd * HEADS + 2 * H * hd * GROUPS + HEADS * hd * H  # q, k, v, o
    moe = experts_per_token * 3 * H * FFN + E * H  # SwiGLU experts + the router
    return 2 * (L * attention + L * moe + V * H) + L * 2 * seq * HEADS * hd


def run_bench(tmp_path, name, extra):
    out = tmp_path / f"{name}.json"
    table = tmp_path / f"{name}.csv"
    assert bench_dial.main(RUN + extra + ["--json", str(out), "--csv", str(table)]) == 0
    with open(out, encoding="utf-8") as f:
        results = json.load(f)
    with open(table, encoding="utf-8") as f:
        assert f.readline().startswith("# ")  # the machine line
        rows = list(csv.DictReader(f))
    assert len(rows) == len(results["rows"])
    return results


def check_rows(results):
    rows = results["rows"]
    labels = [b["label"] for b in results["budgets"]]
    assert labels == ["undialled", "0.75", "0.5", "0.25"]
    assert [(r["workload"], r["budget"]) for r in rows] == \
        [(w, b) for w in bench_dial.WORKLOADS for b in labels]
    by = {(r["workload"], r["budget"]): r for r in rows}
    for w in bench_dial.WORKLOADS:
        seq = 2 * PROMPT + NEW + 1 if w == "decode" else SEQ
        base = by[(w, "undialled")]
        assert base["measured_speedup"] == 1.0 and base["predicted_speedup"] == 1.0
        ept = [by[(w, b)]["experts_per_token"] for b in labels]
        assert ept[0] > 2 and all(a >= b for a, b in zip(ept, ept[1:])) and ept[0] > ept[1], ept
        for b in labels:
            r = by[(w, b)]
            assert r["flops_seq_length"] == seq
            want = hand_forward_flops(r["experts_per_token"], seq)
            assert r["forward_flops_per_token"] == pytest.approx(want, rel=1e-12)
            assert r["predicted_speedup"] == pytest.approx(
                hand_forward_flops(base["experts_per_token"], seq) / want, rel=1e-12)
            assert r["measured_over_predicted"] == pytest.approx(
                r["measured_speedup"] / r["predicted_speedup"], rel=1e-12)
            assert r["rounds"] == 1 and r["median_s"] > 0
            assert len(r["experts_per_token_per_layer"]) == L
    # the same tokens through the HF model and the megatron model: the same routing (a token
    # exactly at a threshold could flip between the two fp32 computations: allow one per layer)
    for b in labels:
        for a, m in zip(by[("prefill", b)]["experts_per_token_per_layer"],
                        by[("megatron", b)]["experts_per_token_per_layer"]):
            assert abs(a - m) <= 1 / (BATCH * SEQ) + 1e-12, (b, a, m)
    for b in results["budgets"][1:]:  # calibrated on the held-out tokens to the target
        assert b["calibrated_experts_per_token"] == pytest.approx(float(b["label"]), rel=0.03)
        assert len(b["dial"]["thresholds"]) == L and b["dial"]["form"] == "cut"


def test_random_init_rows_and_predicted_speedups(tmp_path, single_rank):
    results = run_bench(tmp_path, "random", ["--shape", SHAPE])
    check_rows(results)
    assert results["model"] == "random init"
    assert results["machine"]["torch_threads"] == 1 and results["load_start"]


def test_load_megatron_checkpoint_gives_the_same_dials(tmp_path, single_rank):
    """A Megatron checkpoint written from the random model (HF folder -> trainer checkpoint):
    `--load` calibrates the same thresholds and counts the same experts per token."""
    from megatron.remoe.hf.folders import save_hf_folder
    from megatron.remoe.hf.to_hf import megatron_to_hf
    from megatron.remoe.hf.to_megatron import save_megatron_checkpoint_from_hf

    lm = bench_dial.random_model(SHAPE, seed=0)
    hf, _ = megatron_to_hf(lm.model, lm.tcfg, V, SEQ, bench_dial.rotary_base(lm))
    save_hf_folder(hf, str(tmp_path / "hf"))
    save_megatron_checkpoint_from_hf(str(tmp_path / "hf"), str(tmp_path / "ckpt"))
    random = run_bench(tmp_path, "random", ["--shape", SHAPE])
    loaded = run_bench(tmp_path, "loaded", ["--load", str(tmp_path / "ckpt")])
    check_rows(loaded)
    assert loaded["model"] != "random init"
    for a, b in zip(random["budgets"], loaded["budgets"]):
        assert a["dial"] == b["dial"] or a["dial"]["thresholds"] == pytest.approx(
            b["dial"]["thresholds"], rel=1e-6)
    for a, b in zip(random["rows"], loaded["rows"]):
        assert a["experts_per_token"] == b["experts_per_token"], (a["workload"], a["budget"])
    assert loaded["args"]["load"] == str(tmp_path / "ckpt")
