"""The grouped CPU experts (megatron/remoe/cpu/experts.py) against megatron-core's SequentialMLP on
the same weights and against the dense float64 reference: outputs, input / router / expert
gradients, and gradients accumulated by megatron-core's DDP into `main_grad`; on one process,
under EP=2 and under TP=2 with sequence parallelism (real gloo processes). Plus: identical state
dict and sharded checkpoint keys, and the loud fallback to SequentialMLP for configs it does not
reproduce.

Tolerance: fp32. Grouped and sequential run the same GEMMs on the same rows, so they agree to a few
ulps (rtol 1e-6); the dense reference is float64 (rtol 1e-5 / atol 1e-6 as in test_moe_parallel).
"""

import logging
import os
import subprocess
import sys

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
    dense_reference,
    load_canonical,
)
from tests.helpers.paths import ROOT

pytestmark = pytest.mark.core

S, B = 8, 2
LAYOUTS = {"single": (1, 1), "ep2": (1, 2), "tp2_sp": (2, 1)}  # name: (tp, ep)


def _data(seed=7):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(S, B, H, generator=g), torch.randn(S, B, H, generator=g)


def _config(tp, ep, impl, **extra):
    from megatron.remoe.model import build_transformer_config

    return build_transformer_config(
        router="relu", num_experts=E, moe_router_topk=K, num_layers=1, hidden_size=H,
        num_attention_heads=2, ffn_hidden_size=FFN, use_cpu_initialization=True,
        moe_router_dtype="fp32", tensor_model_parallel_size=tp, expert_model_parallel_size=ep,
        sequence_parallel=tp > 1, moe_cpu_experts=impl, **extra)


def _run(rank, layout, impl, ddp: bool, bf16: bool = False):
    """Forward + backward of one MoE layer on this rank's share of the batch; returns the local
    output, input grad, router grad and expert grads (from `main_grad` under DDP). bf16: bf16
    weights and activations with an fp32 `main_grad` (megatron-core's bf16 default); then also
    whether each expert's fc1 gradient went into `main_grad` past DDP's hook (`fused`)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from megatron.remoe.cpu.experts import GroupedCPUExperts
    from megatron.remoe.model import build_controller

    tp, ep = LAYOUTS[layout]
    cfg = _config(tp, ep, impl, **(dict(bf16=True, params_dtype=torch.bfloat16) if bf16 else {}))
    layer = build_moe_layer(cfg, build_controller(cfg))
    assert isinstance(layer.experts, GroupedCPUExperts) == (impl == "grouped")
    load_canonical(layer, canonical_weights(), rank if tp > 1 else 0, tp, rank if ep > 1 else 0,
                   ep)
    module = layer
    if ddp:
        module = DistributedDataParallel(
            cfg, DistributedDataParallelConfig(grad_reduce_in_fp32=bf16), layer)
        module.zero_grad_buffer()
    X, G = _data()
    x, g = X, G
    if ep > 1:  # EP: each rank routes its own micro-batch
        x, g = X[:, rank:rank + 1], G[:, rank:rank + 1]
    elif tp > 1:  # TP + SP: each rank holds half of the sequence
        rows = slice(rank * S // tp, (rank + 1) * S // tp)
        x, g = X[rows], G[rows]
    x = (x.bfloat16() if bf16 else x.contiguous()).requires_grad_(True)
    out, _ = module(x)
    (out.float() * g).sum().backward()
    grad = (lambda p: p.main_grad) if ddp else (lambda p: p.grad)
    gate, up, down = [], [], []
    for expert in layer.experts.local_experts:
        g1 = grad(expert.linear_fc1.weight)
        gate.append(g1[:FFN // tp].clone())
        up.append(g1[FFN // tp:].clone())
        down.append(grad(expert.linear_fc2.weight).clone())
    res = dict(output=out.detach().float(), x=x.grad.detach().float(),
               router=grad(layer.router.weight).clone(),
               gate=torch.stack(gate), up=torch.stack(up), down=torch.stack(down))
    if bf16:
        res["fused"] = {e.linear_fc1.weight.grad_added_to_main_grad
                        for e in layer.experts.local_experts}
    return res


def _worker(rank, world, layout):
    from megatron.remoe.training.distributed import ParallelConfig, init_distributed

    tp, ep = LAYOUTS[layout]
    init_distributed(ParallelConfig(tensor_model_parallel_size=tp, expert_model_parallel_size=ep),
                     seed=1)
    return {(impl, ddp): _run(rank, layout, impl, ddp)
            for impl in ("grouped", "sequential") for ddp in (False, True)}


def _dense(layout, rank):
    """Float64 reference for this rank's local tensors: under EP its own micro-batch's output and
    input gradient, and its local experts' gradients from every token (the dispatcher brings
    both micro-batches' tokens to them)."""
    tp, ep = LAYOUTS[layout]
    w = {k: v.double().requires_grad_(True) for k, v in canonical_weights().items()}
    X, G = _data()
    x = X.double().requires_grad_(True)
    out, _ = dense_reference(x, w)
    (out * G.double()).sum().backward()
    cols = slice(rank, rank + 1) if ep > 1 else slice(None)
    return dict(output=out.detach()[:, cols], x=x.grad[:, cols], router=w["router"].grad,
                gate=w["gate"].grad, up=w["up"].grad, down=w["down"].grad)


@pytest.mark.multiprocess
@pytest.mark.timeout(300)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_grouped_equals_sequential_mlp_and_dense_reference(layout):
    tp, ep = LAYOUTS[layout]
    world = max(tp, ep)
    per_rank = run_workers(_worker, world, layout, timeout=240)
    for rank, res in enumerate(per_rank):
        for ddp in (False, True):
            got, want = res[("grouped", ddp)], res[("sequential", ddp)]
            for key in want:
                torch.testing.assert_close(got[key], want[key], rtol=1e-6, atol=1e-7,
                                           msg=f"{layout} rank {rank} ddp={ddp} {key}")
        if tp == 1:  # with TP the local tensors are sequence / FFN shards: compared above
            ref = _dense(layout, rank)
            got = res[("grouped", True)]
            torch.testing.assert_close(got["output"].double(), ref["output"], rtol=1e-5,
                                       atol=1e-6)
            torch.testing.assert_close(got["x"].double(), ref["x"], rtol=1e-5, atol=1e-6)
            local = slice(rank * (E // ep), (rank + 1) * (E // ep))
            for key in ("gate", "up", "down"):
                torch.testing.assert_close(got[key].double(), ref[key][local], rtol=1e-5,
                                           atol=1e-6, msg=f"{layout} rank {rank} {key}")
            if ep == 1:  # a sum over all 16 tokens' expert outputs: a few fp32 ulps of O(10)
                torch.testing.assert_close(got["router"].double(), ref["router"], rtol=1e-5,
                                           atol=1e-5)


def _state_worker(rank, world):
    from megatron.remoe.model import build_controller
    from megatron.remoe.training.distributed import ParallelConfig, init_distributed

    init_distributed(ParallelConfig(expert_model_parallel_size=2), seed=1)
    out = {}
    for impl in ("grouped", "sequential"):
        cfg = _config(1, 2, impl)
        layer = build_moe_layer(cfg, build_controller(cfg))
        sharded = layer.sharded_state_dict(prefix="decoder.layers.0.mlp.")
        out[impl] = dict(
            state={k: tuple(v.shape) for k, v in layer.state_dict().items()
                   if isinstance(v, torch.Tensor)},
            sharded={k: (v.key, tuple(v.global_shape), v.global_offset) for k, v in
                     sharded.items() if hasattr(v, "global_shape")})
    return out


@pytest.mark.multiprocess
@pytest.mark.timeout(200)
def test_state_dict_and_sharded_keys_are_sequential_mlps():
    for res in run_workers(_state_worker, 2, timeout=150):
        assert res["grouped"]["state"] == res["sequential"]["state"]
        assert res["grouped"]["sharded"] == res["sequential"]["sharded"]
        assert any(".experts." in v[0] for v in res["grouped"]["sharded"].values())


def test_unsupported_config_keeps_sequential_mlp_loudly(caplog):
    from megatron.core.transformer.moe.experts import SequentialMLP
    from megatron.core.transformer.spec_utils import ModuleSpec

    from megatron.remoe.cpu import experts as cpu_experts

    cfg = _config(1, 1, "grouped", add_bias_linear=True)
    spec = ModuleSpec(module=SequentialMLP, submodules=None)
    cpu_experts._WARNED.clear()
    with caplog.at_level(logging.WARNING, logger=cpu_experts.__name__):
        assert cpu_experts.cpu_experts_spec(spec, cfg) is spec
    assert "add_bias_linear" in caplog.text
    assert cpu_experts.cpu_experts_spec(spec, _config(1, 1, "sequential")) is spec
    chosen = cpu_experts.cpu_experts_spec(spec, _config(1, 1, "grouped"))
    assert chosen.module is cpu_experts.GroupedCPUExperts
    with pytest.raises(ValueError, match="add_bias_linear"):
        cpu_experts.GroupedCPUExperts(E, cfg, None)


def _bf16_worker(rank, world):
    from megatron.remoe.training.distributed import ParallelConfig, init_distributed

    init_distributed(ParallelConfig(), seed=1)
    return {impl: _run(rank, "single", impl, ddp=True, bf16=True)
            for impl in ("grouped", "sequential")}


@pytest.mark.multiprocess
@pytest.mark.timeout(200)
def test_bf16_expert_grads_go_to_fp32_main_grad_as_ddp_would():
    res = run_workers(_bf16_worker, 1, timeout=150)[0]
    got, want = res["grouped"], res["sequential"]
    assert got["gate"].dtype == want["gate"].dtype == torch.float32  # the fp32 main_grad
    assert got["fused"] == {True} and want["fused"] == {False}  # grouped skipped DDP's hook
    assert want["gate"].abs().sum() > 0
    for key in ("output", "x", "gate", "up", "down"):  # the same bf16 GEMMs and fp32 adds: equal bits
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0, msg=key)


def test_expert_benchmark_runs_the_trainers_modules():
    """bench/bench_experts.py end to end on a tiny load (its numbers are not asserted: timings
    belong in benchmarks, not tests); bad arguments exit 2 before anything runs."""
    script = os.path.join(ROOT, "bench", "bench_experts.py")
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    run = subprocess.run([sys.executable, script, "--threads", "1", "--tokens", "64",
                          "--rounds", "1", "--repeats", "1", "--uneven", "--sequential"],
                         capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = {line.split()[0] for line in run.stdout.splitlines() if line.strip()}
    assert {"grouped", "dense", "sequential"} <= rows, run.stdout
    bad = subprocess.run([sys.executable, script, "--rounds", "0"], capture_output=True,
                         text=True, timeout=120, env=env)
    assert bad.returncode == 2 and "--rounds" in bad.stderr
