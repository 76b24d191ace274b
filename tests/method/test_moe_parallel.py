"""ReLU-routed MoE layer under real gloo process groups: TP=2 (sequence parallel), EP=2 (alltoall and
allgather) and DP=2 give the same outputs, losses, gradients, sparsity and lambda as one process, and
both match an independent dense float64 computation.

The batch is two micro-batches (batch columns). One process and TP=2 run both micro-batches one after
the other (TP=2 splits each along the sequence); DP=2 and EP=2 give one micro-batch to each rank.
That is the same computation: the regulariser is defined per micro-batch.

Tolerance: fp32 with sums over <= 16 tokens in a different order on each layout: outputs and
gradients agree to rtol 1e-5 / atol 1e-6 (a few ulps of values of order 1). Sparsity counts are
integers and lambda is updated from them on every rank: both must match exactly.
"""

import pytest
import torch

from tests.helpers.dist_utils import run_workers
from tests.helpers.moe_reference import (
    FFN,
    E,
    H,
    K,
    build_moe_layer,
    canonical_weights,
    load_canonical,
    local_expert_grads,
    reference_step,
)

pytestmark = pytest.mark.multiprocess

S, B, STEPS, LAMBDA0 = 8, 2, 3, 0.05

LAYOUTS = {  # name: (tp, ep, dispatcher)
    "single": (1, 1, "alltoall"),
    "dp2": (1, 1, "alltoall"),
    "tp2_sp": (2, 1, "alltoall"),
    "tp2_sp_allgather": (2, 1, "allgather"),
    "ep2_alltoall": (1, 2, "alltoall"),
    "ep2_allgather": (1, 2, "allgather"),
}


def step_data(step):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(S, B, H, generator=g), torch.randn(S, B, H, generator=g)


def _worker(rank, world, layout):
    import torch.distributed as dist

    from megatron.remoe.model import build_controller, build_transformer_config
    from megatron.remoe.training.distributed import ParallelConfig, init_distributed

    tp, ep, dispatcher = LAYOUTS[layout]
    init_distributed(ParallelConfig(tensor_model_parallel_size=tp, expert_model_parallel_size=ep),
                     seed=1)
    cfg = build_transformer_config(
        router="relu", num_experts=E, moe_router_topk=K, num_layers=1, hidden_size=H,
        num_attention_heads=2, ffn_hidden_size=FFN, moe_token_dispatcher_type=dispatcher,
        use_cpu_initialization=True, moe_router_dtype="fp32", tensor_model_parallel_size=tp,
        expert_model_parallel_size=ep, sequence_parallel=tp > 1,
        moe_relu_l1_reg_coeff_init=LAMBDA0)
    ctrl = build_controller(cfg)
    layer = build_moe_layer(cfg, ctrl)
    tp_rank = rank if tp > 1 else 0
    ep_rank = rank if ep > 1 else 0
    load_canonical(layer, canonical_weights(), tp_rank, tp, ep_rank, ep)
    layer.train()
    micro_batches = [0, 1] if (world == 1 or tp > 1) else [rank]

    results = []
    for step in range(STEPS):
        X, G = step_data(step)
        layer.zero_grad()
        outs = {}
        for b in micro_batches:
            x, g = X[:, b:b + 1], G[:, b:b + 1]
            if tp > 1:
                rows = slice(rank * S // tp, (rank + 1) * S // tp)
                x, g = x[rows], g[rows]
            out, _ = layer(x.contiguous())
            (out * g).sum().backward()
            outs[b] = out.detach()
        lam_used = ctrl.l1_coeff.clone()
        stats = ctrl.step()

        # ---- gather everything back to the canonical, unsharded form ----
        if world == 1:
            output = torch.cat([outs[0], outs[1]], dim=1)
        elif tp > 1:
            cols = []
            for b in (0, 1):
                parts = [torch.empty_like(outs[b]) for _ in range(world)]
                dist.all_gather(parts, outs[b])
                cols.append(torch.cat(parts, dim=0))
            output = torch.cat(cols, dim=1)
        else:
            parts = [torch.empty_like(outs[rank]) for _ in range(world)]
            dist.all_gather(parts, outs[rank])
            output = torch.cat(parts, dim=1)

        router_grad = layer.router.weight.grad.clone()
        if world > 1:
            dist.all_reduce(router_grad)  # every layout splits the tokens over all ranks
        gate, up, down = local_expert_grads(layer, FFN // tp)
        if world > 1 and ep > 1:
            gate, up, down = [_gather_cat(t, 0, world) for t in (gate, up, down)]
        elif world > 1 and tp > 1:
            gate, up = _gather_cat(gate, 1, world), _gather_cat(up, 1, world)
            down = _gather_cat(down, 2, world)
        elif world > 1:
            for t in (gate, up, down):
                dist.all_reduce(t)
        coeffs = [torch.empty_like(ctrl.l1_coeff) for _ in range(world)]
        if world > 1:
            dist.all_gather(coeffs, ctrl.l1_coeff)
        else:
            coeffs = [ctrl.l1_coeff]
        results.append(dict(output=output, router=router_grad, gate=gate, up=up, down=down,
                            sparsity=stats.sparsity, l1_reg_loss=stats.l1_reg_loss,
                            lam_used=lam_used, lam_after=[c.clone() for c in coeffs],
                            tokens_per_expert=stats.tokens_per_expert))
    return results


def _gather_cat(t, dim, world):
    import torch.distributed as dist

    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts, dim=dim)


def dense_expectation(step, lam):
    """Outputs and gradients of sum_b [sum(out_b * g_b) + lam * L_reg(b)] in float64."""
    X, G = step_data(step)
    ref = reference_step(canonical_weights(), [(X[:, b:b + 1], G[:, b:b + 1]) for b in (0, 1)],
                         lam, topk=K)
    ref["output"] = torch.cat(ref["outputs"], dim=1)
    return ref


@pytest.fixture(scope="module")
def single():
    return run_workers(_worker, 1, "single", timeout=120)[0]


@pytest.mark.core
def test_single_process_matches_dense_reference(single):
    for step, res in enumerate(single):
        ref = dense_expectation(step, float(res["lam_used"]))
        for key in ("output", "router", "gate", "up", "down"):
            torch.testing.assert_close(res[key].double(), ref[key], rtol=1e-5, atol=1e-6,
                                       msg=f"step {step} {key}")
        assert abs(res["l1_reg_loss"] - ref["l1_reg_loss"]) < 1e-6


CORE_LAYOUTS = ("tp2_sp", "ep2_alltoall", "ep2_allgather")  # in the core subset (pytest -m core)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("layout", [pytest.param(n, marks=[pytest.mark.core] if n in CORE_LAYOUTS else [])
                                    for n in LAYOUTS if n != "single"])
def test_layout_matches_single_process(single, layout):
    per_rank = run_workers(_worker, 2, layout, timeout=180)
    res = per_rank[0]
    for step in range(STEPS):
        got, want = res[step], single[step]
        for key in ("output", "router", "gate", "up", "down"):
            torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6,
                                       msg=f"{layout} step {step} {key}")
        assert torch.equal(got["tokens_per_expert"], want["tokens_per_expert"]), layout
        assert got["sparsity"] == want["sparsity"], layout
        assert abs(got["l1_reg_loss"] - want["l1_reg_loss"]) < 1e-6, layout
        # lambda: the same value as one process, and bit-identical on every rank
        assert torch.equal(got["lam_used"], want["lam_used"]), layout
        for rank_res in per_rank:
            for c in rank_res[step]["lam_after"]:
                assert torch.equal(c, want["lam_after"][0]), layout
