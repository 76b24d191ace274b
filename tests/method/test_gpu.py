"""GPU path: bf16 with the router in fp32, Transformer Engine spec (TE layers, TEGroupedMLP, fused
permutation) with variable-k ReLU routing, and a few training steps on one GPU.

The GPU tests are skipped without CUDA (the TE ones also without Transformer Engine), so the CPU
suite is unaffected; the first section checks, on any machine, that the spec/compat logic never
picks TE where it cannot run. `scripts/gpu_check.sh` runs this file on a single-GPU machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from megatron.remoe.compat import (
    fused_permute_available,
    gpu_fast_path_fields,
    grouped_gemm_available,
    transformer_engine_usable,
)
from megatron.remoe.model import build_controller, build_gpt_model, build_transformer_config
from tests.helpers.moe_reference import (
    build_moe_layer,
    canonical_weights,
    reference_step,
    sparse_router,
)
from tests.helpers.paths import ROOT

# scripts/gpu_check.sh runs this file inside a 600 s command on the lent GPU machine
pytestmark = pytest.mark.timeout(240)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
needs_te = pytest.mark.skipif(not (torch.cuda.is_available() and transformer_engine_usable()),
                              reason="needs a CUDA GPU and Transformer Engine")

H, FFN, E, K = 64, 96, 8, 1


# ---- any machine: TE is chosen only where it can run ------------------------------------------

def _local_only_names(block):
    return {getattr(s.submodules, "pre_mlp_layernorm", None).__name__
            for s in block.layer_specs}


def test_default_spec_is_local_without_cuda(monkeypatch, single_rank):
    """Even if TE imports (simulated), a machine without CUDA gets the local spec by default."""
    from megatron.remoe import spec as spec_mod

    monkeypatch.setattr(spec_mod, "have_transformer_engine", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert spec_mod.default_use_transformer_engine() is False
    cfg = _relu_config(use_cpu_initialization=True)
    block = spec_mod.get_block_spec(cfg)
    assert _local_only_names(block) == {"RMSNorm"}  # our CPU RMSNorm, not TENorm


def test_explicit_te_without_te_is_a_clear_error():
    if transformer_engine_usable():
        pytest.skip("Transformer Engine is installed here")
    from megatron.remoe.spec import get_block_spec

    with pytest.raises(RuntimeError, match="Transformer Engine"):
        get_block_spec(_relu_config(use_cpu_initialization=True), use_transformer_engine=True)


def test_gpu_fast_path_fields_follow_what_is_installed():
    fields = gpu_fast_path_fields(num_experts=8)
    assert fields["bf16"] and fields["params_dtype"] == torch.bfloat16
    assert fields["moe_router_dtype"] == "fp32"
    assert fields["moe_grouped_gemm"] == grouped_gemm_available()
    assert fields["moe_permute_fusion"] == fused_permute_available()
    assert "moe_router_dtype" not in gpu_fast_path_fields(num_experts=None)


def test_call_with_supported_kwargs_drops_unknown_keywords():
    from megatron.remoe.compat import call_with_supported_kwargs

    def old_api(a, b=1):
        return a, b

    def new_api(a, **kwargs):
        return a, kwargs

    assert call_with_supported_kwargs(old_api, 1, b=2, pp_rank=3) == (1, 2)
    assert call_with_supported_kwargs(new_api, 1, pp_rank=3) == (1, {"pp_rank": 3})


@pytest.fixture(scope="module")
def gpu_rank():
    """A one-process NCCL world with megatron-core's parallel state on cuda:0."""
    from megatron.remoe.training.distributed import ParallelConfig, destroy_distributed, init_distributed

    destroy_distributed()
    os.environ.pop("MASTER_PORT", None)
    device = init_distributed(ParallelConfig(), seed=1234)
    assert device.type == "cuda"
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield device
    destroy_distributed()


def _relu_config(**kw):
    fields = dict(num_layers=1, hidden_size=H, num_attention_heads=4, ffn_hidden_size=FFN,
                  moe_router_dtype="fp32")
    fields.update(kw)
    return build_transformer_config(router="relu", num_experts=E, moe_router_topk=K, **fields)


# ---- router precision ---------------------------------------------------------------------------

@pytest.mark.gpu
@needs_cuda
def test_relu_router_bf16_model_routes_like_fp32(gpu_rank):
    """bf16 model, router math in fp32: the routing map equals the fp32 model's on the same
    (bf16-representable) weights and inputs, except for gates within rounding of zero."""
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

    from megatron.remoe.router import ReLURouter

    torch.manual_seed(0)
    routers = {}
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        cfg = _relu_config(params_dtype=dtype, bf16=dtype == torch.bfloat16)
        r = ReLURouter(config=cfg, pg_collection=get_default_pg_collection()).cuda()
        r.set_layer_number(1)
        r.eval()
        routers[name] = r
    with torch.no_grad():
        w = routers["bf16"].weight
        assert w.dtype == torch.bfloat16
        routers["fp32"].weight.copy_(w.float())
    x16 = torch.randn(2048, 2, H, device="cuda", dtype=torch.bfloat16)
    probs16, map16 = routers["bf16"](x16)
    probs32, map32 = routers["fp32"](x16.float())
    assert probs16.dtype == torch.float32, "moe_router_dtype=fp32 must give fp32 gates"
    ref = torch.relu(x16.double().reshape(-1, H) @ w.double().T)
    logits = x16.double().reshape(-1, H) @ w.double().T
    near_zero = logits.abs() < 1e-5 * logits.abs().max()
    assert torch.equal(map16 | near_zero, map32 | near_zero)
    assert torch.equal(map16 | near_zero, (ref > 0) | near_zero)
    torch.testing.assert_close(probs16.double(), ref, rtol=1e-5, atol=1e-6)
    flips = (map16 != map32).float().mean().item()
    assert flips < 1e-3, f"{flips:.2e} of the routing entries differ between bf16 and fp32"


@pytest.mark.gpu
@needs_cuda
def test_controller_and_regulariser_stay_fp32_in_bf16(gpu_rank):
    cfg = _relu_config(params_dtype=torch.bfloat16, bf16=True, moe_relu_l1_reg_coeff_init=0.5)
    ctrl = build_controller(cfg, gpu_rank)
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

    from megatron.remoe.router import ReLURouter

    r = ReLURouter(config=cfg, pg_collection=get_default_pg_collection(), controller=ctrl).cuda()
    r.set_layer_number(1)
    r.train()
    x = torch.randn(256, 2, H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    probs, routing_map = r(x)
    probs.sum().backward()
    assert ctrl.l1_coeff.dtype == torch.float32 and ctrl.l1_coeff.device.type == "cuda"
    assert r.weight.grad is not None and torch.isfinite(r.weight.grad).all()
    stats = ctrl.step()
    assert stats is not None and stats.l1_reg_loss > 0
    assert stats.sparsity == pytest.approx(1.0 - routing_map.float().mean().item(), abs=1e-6)


# ---- Transformer Engine spec, variable k --------------------------------------------------------

def _te_moe_layer(cfg, ctrl=None):
    layer = build_moe_layer(cfg, ctrl, use_transformer_engine=True).cuda()
    return layer


def _load_weights(layer, w):
    """Canonical weights into TEGroupedMLP (weight{i}) or a SequentialMLP (local_experts)."""
    experts = layer.experts
    with torch.no_grad():
        layer.router.weight.copy_(w["router"])
        if hasattr(experts, "local_experts"):
            for e, expert in enumerate(experts.local_experts):
                expert.linear_fc1.weight.copy_(torch.cat([w["gate"][e], w["up"][e]]))
                expert.linear_fc2.weight.copy_(w["down"][e])
        else:
            for e in range(w["router"].shape[0]):
                getattr(experts.linear_fc1, f"weight{e}").copy_(
                    torch.cat([w["gate"][e], w["up"][e]]))
                getattr(experts.linear_fc2, f"weight{e}").copy_(w["down"][e])


def _expert_grads(layer):
    """Gradients of (gate, up, down) per expert, [E, ...] each, from either expert layout."""
    experts, gate, up, down = layer.experts, [], [], []
    for e in range(layer.config.num_moe_experts):
        if hasattr(experts, "local_experts"):
            fc1, fc2 = experts.local_experts[e].linear_fc1.weight, experts.local_experts[e].linear_fc2.weight
        else:
            fc1 = getattr(experts.linear_fc1, f"weight{e}")
            fc2 = getattr(experts.linear_fc2, f"weight{e}")
        assert fc1.grad is not None and fc2.grad is not None, f"expert {e} got no gradient"
        gate.append(fc1.grad[:FFN])
        up.append(fc1.grad[FFN:])
        down.append(fc2.grad)
    return torch.stack(gate), torch.stack(up), torch.stack(down)


def _te_cases():
    cases = [("alltoall", False, False), ("allgather", False, False)]
    if grouped_gemm_available():
        cases += [("alltoall", True, False), ("allgather", True, False)]
    if fused_permute_available():
        cases += [("alltoall", False, True)]
        if grouped_gemm_available():
            cases += [("alltoall", True, True)]
    return cases


@pytest.mark.gpu
@needs_te
@pytest.mark.parametrize("regime", ["dense", "sparse"])
@pytest.mark.parametrize("dispatcher,grouped,fused", _te_cases())
def test_te_moe_layer_is_exact_with_variable_k(gpu_rank, dispatcher, grouped, fused, regime):
    """Tokens with 0..E experts: the TE MoE layer (grouped GEMM / fused permutation) equals the
    dense reference sum_e ReLU(x W)_e FFN_e(x), forward and gradients; with fused permutation
    this needs the capacity factor E/topk that the config sets (megatron-core sizes the buffer as
    tokens * topk). "sparse": a bias feature makes about a third of the tokens route nowhere and
    the last expert get no token (tests/method/test_moe_sparse.py has the CPU and local-spec GPU cases)."""
    cfg = _relu_config(moe_token_dispatcher_type=dispatcher, moe_grouped_gemm=grouped,
                       moe_permute_fusion=fused, params_dtype=torch.float32)
    if fused and dispatcher == "alltoall":
        assert cfg.moe_expert_capacity_factor == E / K
    layer = _te_moe_layer(cfg)
    w = canonical_weights(num_experts=E, hidden=H, ffn=FFN)
    gen = torch.Generator().manual_seed(3)
    x, g = torch.randn(64, 4, H, generator=gen), torch.randn(64, 4, H, generator=gen)
    if regime == "sparse":
        w = sparse_router(w, bias=4.0, dead=(E - 1,))
        x[..., 0] = 1.0
    _load_weights(layer, {k: v.cuda() for k, v in w.items()})
    out, _ = layer(x.cuda())
    (out * g.cuda()).sum().backward()
    ref = reference_step(w, [(x, g)], lam=0.0, topk=K)
    per_token = (ref["gates"][0] > 0).sum(1)
    assert per_token.max() > K, "test data should give some tokens several experts"
    if regime == "sparse":
        assert (per_token == 0).sum() > 10 and (ref["gates"][0][:, E - 1] == 0).all()
    got = dict(zip(("gate", "up", "down"), _expert_grads(layer), strict=True), output=out,
               router=layer.router.weight.grad)
    ref["output"] = ref["outputs"][0]
    for key in ("output", "router", "gate", "up", "down"):
        scale = ref[key].abs().max().item()
        torch.testing.assert_close(got[key].double().cpu(), ref[key], rtol=0, atol=2e-3 * scale,
                                   msg=lambda m: f"{key}: {m}")
    if regime == "sparse":  # the empty expert's gradient: exactly zero (TE zero-fills empty GEMMs)
        assert all((got[k][E - 1] == 0).all() for k in ("gate", "up", "down"))


@pytest.mark.gpu
@needs_te
def test_te_spec_gpt_forward_backward_bf16(gpu_rank):
    from megatron.core.transformer.module import Float16Module

    fields = gpu_fast_path_fields(num_experts=E)
    cfg = build_transformer_config(
        router="relu", num_experts=E, moe_router_topk=K, num_layers=2, hidden_size=128,
        num_attention_heads=4, num_query_groups=2, ffn_hidden_size=256,
        moe_token_dispatcher_type="alltoall", moe_relu_l1_reg_coeff_init=1e-2, **fields)
    ctrl = build_controller(cfg, gpu_rank)
    model = build_gpt_model(cfg, vocab_size=1024, max_sequence_length=64, controller=ctrl,
                            use_transformer_engine=True).cuda()
    names = {type(m).__name__ for m in model.modules()}
    assert "TELayerNormColumnParallelLinear" in names and "ReLURouter" in names
    if fields["moe_grouped_gemm"]:
        assert "TEGroupedMLP" in names
    model = Float16Module(cfg, model)
    model.train()
    ids = torch.randint(0, 1024, (2, 64), device="cuda")
    pos = torch.arange(64, device="cuda").unsqueeze(0).expand(2, -1)
    loss = model(ids, pos, None, labels=ids).float().mean()
    assert torch.isfinite(loss)
    loss.backward()
    router_grads = [p.grad for n, p in model.named_parameters() if n.endswith("router.weight")]
    assert router_grads and all(g is not None and g.abs().sum() > 0 for g in router_grads)
    stats = ctrl.step()
    assert stats is not None and len(stats.layer_numbers) == 2
    assert 0.0 < stats.sparsity < 1.0


# ---- a few training steps with the trainer (TP1, 1 GPU) -----------------------------------------

@pytest.mark.multiprocess
@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("impl", ["local", "transformer_engine"])
def test_train_steps_single_gpu(tmp_path, impl):
    if impl == "transformer_engine" and not transformer_engine_usable():
        pytest.skip("needs Transformer Engine")
    flags = ["--num-layers", "2", "--hidden-size", "256", "--num-attention-heads", "4",
             "--num-query-groups", "2", "--ffn-hidden-size", "512", "--seq-length", "256",
             "--micro-batch-size", "4", "--global-batch-size", "8", "--num-experts", "8",
             "--moe-router-topk", "1", "--mock-data", "--vocab-size", "4096", "--lr", "1e-3",
             "--train-iters", "8", "--eval-iters", "0", "--log-interval", "1", "--bf16",
             "--transformer-impl", impl, "--moe-relu-l1-reg-coeff-init", "1e-3",
             "--metrics-file", str(tmp_path / "metrics.jsonl")]
    if impl == "transformer_engine" and grouped_gemm_available():
        flags.append("--moe-grouped-gemm")
    env = dict(os.environ, WORLD_SIZE="1", RANK="0", LOCAL_RANK="0")
    proc = subprocess.run([sys.executable, "-m", "megatron.remoe.pretrain", *flags], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(tmp_path / "metrics.jsonl", encoding="utf-8") as f:
        records = [r for r in map(json.loads, f) if r.get("split") == "train"]
    assert len(records) == 8
    losses = [r["lm_loss"] for r in records]
    assert all(x == x for x in losses) and min(losses[-3:]) < losses[0]
    for r in records:  # per layer: zero entries = 1 - experts per token / E; global: their mean
        layers = [r[f"moe/layer_{n}/sparsity"] for n in (1, 2)]
        for n, s in zip((1, 2), layers, strict=True):
            assert s == pytest.approx(1 - r[f"moe/layer_{n}/experts_per_token"] / 8, abs=1e-6), r
        assert r["moe_relu_sparsity"] == pytest.approx(sum(layers) / 2, abs=1e-6), r
        assert 0.0 < r["moe_relu_sparsity"] < 1.0, r
    assert records[-1]["memory_gb"] > 0
