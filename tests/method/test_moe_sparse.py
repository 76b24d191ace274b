"""The MoE layer in ReMoE's sparse regime (Stage II/III), on CPU and on a CUDA GPU: tokens routed to
no expert, experts that get no token, a whole EP rank without tokens and an all-zero routing map,
through the alltoall and allgather dispatchers, in fp32 and bf16. Outputs, router gradients (gating
and L1 term), expert gradients and the routing statistics are compared with the float64 dense
reference of tests/helpers/moe_reference.py; every expert weight gets a gradient, finite, and exactly
zero for an expert that received no token.

The regime is made by the weights, not by luck: input feature 0 is a constant c (a bias feature),
router column 0 is -1 for the live experts (so about a third of the gates are positive at c = 1 and
none at c = 50), and a dead expert's router row is -10 on feature 0 only (its gate is never
positive).

One process: the test process itself (gloo on CPU, NCCL on a GPU; the CPU cases skip on a CUDA
machine, since the process's megatron-core state is on CUDA there, and run in CI). EP=2: two gloo
processes on CPU, one micro-batch per rank. scripts/gpu_check.sh runs the cuda cases on the GPU.

Tolerances, as a fraction of each tensor's largest reference entry: fp32 (sums over <= 32 tokens in
another order) 1e-5; bf16 2e-2: the reference uses the bf16-rounded weights, inputs and output
gradients, the layer also rounds its activations and products to bf16 (8 significant bits); the
CPU measured at most 8.2e-3 (REL_TOL). Exact zeros are checked as exact. Counts are integers: exact.
"""

from __future__ import annotations

import pytest
import torch

from megatron.remoe.model import build_controller, build_transformer_config
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
    sparse_router,
)

S, LAMBDA0 = 16, 0.05
# max |got - reference| / max |reference|, per tensor (measured on CPU, 2026-12-03: fp32 <= 4e-7,
# bf16 <= 8.2e-3)
REL_TOL = {"fp32": 1e-5, "bf16": 2e-2}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DISPATCHERS = ("alltoall", "allgather")
# regime: (bias feature of micro-batch 0 and 1, dead experts)
REGIMES = {
    "sparse": ((1.0, 1.0), (3,)),  # 0-expert tokens, 1..3-expert tokens, one 0-token expert
    "idle_rank": ((1.0, 1.0), (2, 3)),  # EP2: rank 1 holds experts 2, 3 and gets no token
    "one_map_empty": ((50.0, 1.0), (3,)),  # micro-batch 0's routing map is all zero
    "all_zero": ((50.0, 50.0), (3,)),  # nothing routed anywhere
}
# one-process backends: device and, on CPU, the expert module (the GPU uses megatron-core's)
BACKENDS = ("cpu-grouped", "cpu-sequential", "cuda")


def sparse_weights(regime: str) -> dict:
    return sparse_router(canonical_weights(), bias=1.0, dead=REGIMES[regime][1])


def micro_batch(regime: str, b: int):
    g = torch.Generator().manual_seed(200 + b)
    x, grad = torch.randn(S, 1, H, generator=g), torch.randn(S, 1, H, generator=g)
    x[..., 0] = REGIMES[regime][0][b]
    return x, grad


def run_layer(device, dispatcher, dtype_name, regime, experts="grouped", rank=0, world=1):
    """Build the ReLU MoE layer (EP = world), run this rank's micro-batches forward and backward
    with the L1 term, step the controller; everything back on the CPU in canonical (unsharded)
    form, reduced over the ranks."""
    import torch.distributed as dist

    dtype = DTYPES[dtype_name]
    cfg = build_transformer_config(
        router="relu", num_experts=E, moe_router_topk=K, num_layers=1, hidden_size=H,
        num_attention_heads=2, ffn_hidden_size=FFN, moe_token_dispatcher_type=dispatcher,
        use_cpu_initialization=True, moe_router_dtype="fp32", expert_model_parallel_size=world,
        moe_relu_l1_reg_coeff_init=LAMBDA0, params_dtype=dtype, bf16=dtype == torch.bfloat16,
        moe_cpu_experts=experts)
    ctrl = build_controller(cfg, device)
    layer = build_moe_layer(cfg, ctrl).to(device)
    load_canonical(layer, sparse_weights(regime), ep_rank=rank, ep_size=world)
    layer.train()
    outputs = {}
    for b in ([0, 1] if world == 1 else [rank]):
        x, g = micro_batch(regime, b)
        out, _ = layer(x.to(device, dtype))
        (out * g.to(device, dtype)).sum().backward()
        outputs[b] = out.detach().double().cpu()
    lam_used = float(ctrl.l1_coeff)
    stats = ctrl.step()
    grads = [e.linear_fc1.weight.grad for e in layer.experts.local_experts] + \
        [e.linear_fc2.weight.grad for e in layer.experts.local_experts]
    assert all(g is not None for g in grads), "an expert weight got no gradient (DDP would hang)"
    gate, up, down = (t.double().cpu() for t in local_expert_grads(layer, FFN))
    router = layer.router.weight.grad.double().cpu()
    if world > 1:
        router = _all_reduce(router)
        gate, up, down = (_all_gather_cat(t, world) for t in (gate, up, down))
        for b in range(world):
            outputs[b] = _broadcast(outputs.get(b, torch.empty(S, 1, H, dtype=torch.double)), b)
        dist.barrier()
    return dict(outputs=[outputs[0], outputs[1]], router=router, gate=gate, up=up, down=down,
                lam_used=lam_used, sparsity=stats.sparsity, l1_reg_loss=stats.l1_reg_loss,
                tokens_per_expert=stats.tokens_per_expert[0].cpu(),
                hist=stats.experts_per_token_hist[0].cpu(),
                param_dtype=layer.experts.local_experts[0].linear_fc1.weight.dtype,
                router_dtype=layer.router.weight.dtype)


def _all_reduce(t):
    import torch.distributed as dist

    dist.all_reduce(t)
    return t


def _all_gather_cat(t, world):
    import torch.distributed as dist

    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts, dim=0)


def _broadcast(t, src):
    import torch.distributed as dist

    dist.broadcast(t, src)
    return t


def check_against_reference(got, dtype_name, regime):
    """got (run_layer's result) equals the float64 dense reference on the same (rounded) numbers."""
    rel = REL_TOL[dtype_name]

    def close(a, b, what):
        torch.testing.assert_close(a, b, rtol=0, atol=rel * max(b.abs().max().item(), 1e-6),
                                   msg=lambda m: f"{what}: {m}")

    def rounded(t, dtype):
        return t.to(dtype).double()

    w = sparse_weights(regime)
    w = {k: rounded(v, got["router_dtype"] if k == "router" else got["param_dtype"])
         for k, v in w.items()}
    dtype = DTYPES[dtype_name]
    mbs = [tuple(rounded(t, dtype) for t in micro_batch(regime, b)) for b in (0, 1)]
    ref = reference_step(w, mbs, got["lam_used"], topk=K)

    gates = torch.cat(ref["gates"])
    per_token = (gates > 0).sum(1)
    counts = (gates > 0).sum(0)
    dead = list(REGIMES[regime][1])
    assert (counts[dead] == 0).all()
    if regime == "all_zero":
        assert per_token.max() == 0
    else:  # the data are what the regime says
        assert (per_token == 0).any() and per_token.max() >= 2, per_token.tolist()
    if regime == "one_map_empty":
        assert (ref["gates"][0] == 0).all() and (ref["gates"][1] > 0).any()

    for b in (0, 1):
        close(got["outputs"][b], ref["outputs"][b], f"output of micro-batch {b}")
    for key in ("router", "gate", "up", "down"):
        assert torch.isfinite(got[key]).all(), key
        close(got[key], ref[key], f"{key} grad")
    for key in ("gate", "up", "down"):  # an expert without tokens: exactly zero, not just small
        assert (got[key][dead] == 0).all(), f"{key} grad of an empty expert is not zero"
    if regime == "all_zero":
        assert (got["router"] == 0).all() and all((o == 0).all() for o in got["outputs"])
    assert torch.equal(got["tokens_per_expert"], counts.to(got["tokens_per_expert"].dtype))
    hist = torch.bincount(per_token, minlength=E + 1)
    assert torch.equal(got["hist"], hist.to(got["hist"].dtype))
    assert got["sparsity"] == 1.0 - counts.sum().item() / (gates.shape[0] * E)
    assert abs(got["l1_reg_loss"] - ref["l1_reg_loss"]) <= rel * max(ref["l1_reg_loss"], 1e-6)


@pytest.mark.parametrize("regime", list(REGIMES))
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("dispatcher", DISPATCHERS)
@pytest.mark.parametrize("backend", [
    pytest.param(b, marks=pytest.mark.gpu if b == "cuda" else pytest.mark.core)
    for b in BACKENDS])
def test_sparse_regime_one_process(single_rank, backend, dispatcher, dtype_name, regime):
    device, _, experts = backend.partition("-")
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (scripts/gpu_check.sh)")
    if device == "cpu" and torch.cuda.is_available():
        pytest.skip("CPU path: runs in CI (this process's megatron-core state is on CUDA)")
    torch.backends.cuda.matmul.allow_tf32 = False
    got = run_layer(torch.device(device), dispatcher, dtype_name, regime, experts or "grouped")
    check_against_reference(got, dtype_name, regime)


def _ep2_worker(rank, world):
    from megatron.remoe.training.distributed import ParallelConfig, init_distributed

    init_distributed(ParallelConfig(expert_model_parallel_size=world), seed=1)
    return {(d, t, r): run_layer(torch.device("cpu"), d, t, r, rank=rank, world=world)
            for d in DISPATCHERS for t in DTYPES for r in REGIMES}


@pytest.fixture(scope="module")
def ep2_results():
    return run_workers(_ep2_worker, 2, timeout=240)


@pytest.mark.core
@pytest.mark.multiprocess
@pytest.mark.timeout(300)
@pytest.mark.skipif(torch.cuda.is_available(), reason="gloo EP2 on CPU: runs in CI")
@pytest.mark.parametrize("regime", list(REGIMES))
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("dispatcher", DISPATCHERS)
def test_sparse_regime_ep2(ep2_results, dispatcher, dtype_name, regime):
    """Two gloo processes, experts 0-1 on rank 0 and 2-3 on rank 1, one micro-batch per rank."""
    for rank_result in ep2_results:
        check_against_reference(rank_result[(dispatcher, dtype_name, regime)], dtype_name, regime)
