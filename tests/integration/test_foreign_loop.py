"""ReMoE in a training loop that is not this project's: the layer spec and `attach` only.

tests/helpers/foreign_loop.py is a loop written from megatron-core's own pieces (see there). It
must give `remoe train`'s losses, gradient norms, lambda trajectory and sparsity bit for bit over
30 steps (4 micro-batches per step on one process, 2 per rank with PP2 or DP2), saving at step 15
and resuming in fresh processes; lambda reaches the resumed loop only through the model's own
checkpoint state (the routers' `_extra_state`), and with PP2 the dense-only first stage gets it
from the MoE stage. With EP2 the optimizer is a ChainedOptimizer of two (dense and expert
parameters) and lambda still moves once per step.
"""

import json
import os
import subprocess
import sys

import pytest

from tests.helpers.foreign_loop import SAVE_AT
from tests.helpers.paths import ROOT
from tests.helpers.pretrain_utils import run_pretrain
from tools.parity.tiny_gpt import free_port, pretrain_env, read_metrics

pytestmark = [pytest.mark.core, pytest.mark.multiprocess, pytest.mark.timeout(400)]

STEPS = 30
BASE = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
        "--num-query-groups", "2", "--seq-length", "32", "--num-experts", "4",
        "--micro-batch-size", "2", "--global-batch-size", "8", "--lr", "3e-3", "--min-lr", "3e-4",
        "--lr-warmup-iters", "1", "--log-interval", "1", "--eval-iters", "0",
        "--moe-relu-l1-reg-coeff-init", "1e-3", "--mock-data", "--vocab-size", "512",
        "--train-iters", str(STEPS)]
LAYOUTS = {
    "one_process": ([], 1),
    # the first stage has no MoE layer: its ranks hold a controller but no router
    "pp2_dense_first_stage": (["--pipeline-model-parallel-size", "2", "--moe-layer-freq", "0,1"],
                              2),
    "ep2": (["--expert-model-parallel-size", "2"], 2),
}
# --full only: what ep2 adds to one_process is megatron-core's ChainedOptimizer of two (dense and
# expert parameters) moving lambda exactly once per step, which
# tests/integration/test_attach.py::test_chained_optimizer_of_two_moves_lambda_once checks exactly;
# the trainer under EP2 against 1 process: tests/training/test_parity.py (ep2_alltoall, ep2_allgather)
FULL_ONLY = ("ep2",)


def run_foreign_loop(argv, nproc, ckpt, stop, out) -> list:
    """The loop in fresh processes (torchrun); each rank's records."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-port", str(free_port()), "-m", "tests.helpers.foreign_loop", ckpt,
           str(stop), out, "--", *argv]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=pretrain_env(), timeout=300,
                          cwd=ROOT)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    records = []
    for rank in range(nproc):
        with open(f"{out}.rank{rank}.json", encoding="utf-8") as fh:
            records.append(json.load(fh))
    return records


@pytest.mark.parametrize("layout", [pytest.param(n, marks=[pytest.mark.full] if n in FULL_ONLY else [])
                                    for n in LAYOUTS])
def test_foreign_loop_matches_remoe_train(layout, tmp_path):
    extra, nproc = LAYOUTS[layout]
    argv = BASE + extra
    metrics = str(tmp_path / "metrics.jsonl")
    run_pretrain(argv + ["--metrics-file", metrics], nproc=nproc, timeout=300)
    reference = read_metrics(metrics)
    ckpt = str(tmp_path / "foreign_ckpt")
    first = run_foreign_loop(argv, nproc, ckpt, SAVE_AT, str(tmp_path / "first"))
    assert os.path.isdir(ckpt)
    second = run_foreign_loop(argv, nproc, ckpt, STEPS, str(tmp_path / "second"))
    for rank in range(nproc):
        steps = first[rank] + second[rank]
        assert [s["iteration"] for s in steps] == list(range(1, STEPS + 1))
        for mine, ref in zip(steps, reference, strict=True):
            where = (layout, rank, mine["iteration"])
            assert mine["lambda"] == ref["moe_relu_l1_reg_coeff"], where
            assert mine["sparsity"] == ref["moe_relu_sparsity"], where
            assert mine["grad_norm"] == ref["grad_norm"], where
            if mine["lm_loss"] is not None:  # last pipeline stage
                assert mine["lm_loss"] == ref["lm_loss"], where
        if layout == "ep2":  # experts have their own optimizer: a ChainedOptimizer of two
            assert {s["optimizers"] for s in steps} == {2}
        # lambda moved once per step (x or / alpha: no step left out or counted twice)
        for before, after in zip(steps, steps[1:]):
            assert after["lambda"] == before["lambda_next"] != before["lambda"]
            ratio = after["lambda"] / before["lambda"]
            assert ratio == pytest.approx(1.2) or ratio == pytest.approx(1 / 1.2)
