"""Experts that receive no tokens (a dialled or sparse ReLU router leaves many) cost nothing: the HF
MoE MLP (megatron/remoe/hf/modeling_remoe.py) does not call them, the grouped CPU experts
(megatron/remoe/cpu/experts.py) run no GEMM for them, and both outputs equal the dense float64
reference, which runs every expert on every token (fp32 tolerance: rtol 1e-5 / atol 1e-6, as in
test_cpu_experts). The HF MLP is also bit-identical in fp32 to one gather, MLP, weighting and
index_add_ per routed expert (its previous formulation)."""

import pytest
import torch

from tests.helpers.moe_reference import (
    FFN,
    E,
    H,
    build_moe_layer,
    canonical_weights,
    dense_reference,
    load_canonical,
)

pytestmark = pytest.mark.timeout(120)
EMPTY = 2  # the expert no token is routed to: its router row is 0, so its gate is ReLU(0) = 0


def weights():
    w = canonical_weights()
    w["router"][EMPTY].zero_()
    return w


def tokens(n=24, seed=3):
    return torch.randn(n, H, generator=torch.Generator().manual_seed(seed))


def hf_moe(w, dial=None):
    pytest.importorskip("transformers")
    from megatron.remoe.hf.configuration_remoe import ReMoEConfig
    from megatron.remoe.hf.modeling_remoe import ReMoESparseMoE

    cfg = ReMoEConfig(hidden_size=H, moe_intermediate_size=FFN, num_experts=E,
                      num_hidden_layers=1, num_attention_heads=2, router_type="relu",
                      router_dial=dial)
    moe = ReMoESparseMoE(cfg).eval()
    with torch.no_grad():
        moe.router.weight.copy_(w["router"])
        for e, expert in enumerate(moe.experts):
            expert.gate_proj.weight.copy_(w["gate"][e])
            expert.up_proj.weight.copy_(w["up"][e])
            expert.down_proj.weight.copy_(w["down"][e])
    return moe


def per_expert_loop(moe, flat):
    """One index op, MLP, weighting and index_add_ per routed expert, in expert order."""
    gates, routing_map = moe.router.route(moe.router.logits(flat))
    out = torch.zeros_like(flat)
    for e in range(moe.num_experts):
        idx = routing_map[:, e].nonzero().squeeze(1)
        if idx.numel():
            y = moe.experts[e](flat.index_select(0, idx))
            out.index_add_(0, idx, (y.float() * gates[idx, e:e + 1]).to(out.dtype))
    return out


@pytest.mark.parametrize("threads", [1, 2])
def test_hf_moe_skips_empty_experts_and_equals_dense_reference(threads):
    w = weights()
    moe = hf_moe(w)
    x = tokens().reshape(2, 12, H)
    calls = []
    for e, expert in enumerate(moe.experts):
        expert.register_forward_hook(lambda m, a, o, e=e: calls.append((e, a[0].shape[0])))
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            out, logits, routing_map = moe(x)
            called = list(calls)
            loop = per_expert_loop(moe, x.reshape(-1, H))
    finally:
        torch.set_num_threads(1)
    counts = routing_map.sum(0).tolist()
    assert counts[EMPTY] == 0 and sum(n > 0 for n in counts) >= 3, counts
    # every expert with tokens is called once on exactly its tokens; the empty one never
    assert called == [(e, n) for e, n in enumerate(counts) if n], (called, counts)
    assert torch.equal(out.reshape(-1, H), loop)
    ref, gates = dense_reference(x, w)
    assert torch.equal(routing_map, (gates > 0).reshape(-1, E))
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("hidden", [16, 33])  # 33: expert rows not 64-byte aligned
@pytest.mark.parametrize("threads", [1, 2])
def test_hf_moe_is_bit_identical_to_one_index_add_per_expert(hidden, threads):
    pytest.importorskip("transformers")
    from megatron.remoe.hf.configuration_remoe import ReMoEConfig
    from megatron.remoe.hf.modeling_remoe import ReMoESparseMoE

    torch.set_num_threads(threads)
    try:
        for n, tau in ((1, None), (7, None), (300, None), (300, 0.05)):
            cfg = ReMoEConfig(hidden_size=hidden, moe_intermediate_size=2 * hidden + 3,
                              num_experts=8, num_hidden_layers=1, num_attention_heads=1,
                              router_type="relu", router_dial=None if tau is None else
                              {"thresholds": [tau], "form": "cut", "max_experts": None})
            torch.manual_seed(n + hidden)
            moe = ReMoESparseMoE(cfg).eval()
            with torch.no_grad():
                for p in moe.parameters():
                    p.normal_(0, 0.1)
                moe.router.weight[3].zero_()  # expert 3 gets no token (gate ReLU(0) = 0)
                x = torch.randn(n, hidden)
                out, _, routing_map = moe(x)
                assert not routing_map[:, 3].any()
                assert torch.equal(out, per_expert_loop(moe, x)), (n, tau)
    finally:
        torch.set_num_threads(1)


def test_hf_moe_with_no_routed_token_returns_zeros():
    """A dial above every gate: no expert runs and the MLP's output is exactly 0."""
    moe = hf_moe(weights(), dial={"thresholds": [1e9], "form": "cut", "max_experts": None})
    calls = []
    for expert in moe.experts:
        expert.register_forward_hook(lambda m, a, o: calls.append(1))
    with torch.no_grad():
        out, _, routing_map = moe(tokens().reshape(2, 12, H))
    assert not routing_map.any() and not calls
    assert torch.equal(out, torch.zeros_like(out))


class GemmCounter(torch.overrides.TorchFunctionMode):
    """Counts torch.mm calls per expert weight (identified by storage), forward and backward."""

    def __init__(self, weights_by_expert):
        super().__init__()
        self.owner = {w.data_ptr(): e for e, ws in weights_by_expert.items() for w in ws}
        self.calls = {e: 0 for e in weights_by_expert}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.mm:
            for a in args:
                e = self.owner.get(a.data_ptr()) if isinstance(a, torch.Tensor) else None
                if e is not None:
                    self.calls[e] += 1
        return func(*args, **(kwargs or {}))


def test_grouped_cpu_experts_run_no_gemm_for_an_empty_expert(single_rank):
    from megatron.remoe.cpu.experts import GroupedCPUExperts
    from megatron.remoe.model import build_controller, build_transformer_config

    cfg = build_transformer_config(
        router="relu", num_experts=E, moe_router_topk=1, num_layers=1, hidden_size=H,
        num_attention_heads=2, ffn_hidden_size=FFN, use_cpu_initialization=True,
        moe_router_dtype="fp32", moe_token_dispatcher_type="alltoall")
    layer = build_moe_layer(cfg, build_controller(cfg))
    assert isinstance(layer.experts, GroupedCPUExperts)
    w = weights()
    load_canonical(layer, w)
    experts = {e: (m.linear_fc1.weight, m.linear_fc2.weight)
               for e, m in enumerate(layer.experts.local_experts)}
    x = tokens().reshape(12, 2, H).requires_grad_(True)
    g = torch.randn(12, 2, H, generator=torch.Generator().manual_seed(5))
    counter = GemmCounter(experts)
    with counter:
        out, _ = layer(x)
    forward_calls = dict(counter.calls)
    ref_w = {k: v.double().requires_grad_(True) for k, v in w.items()}
    xd = x.detach().double().requires_grad_(True)
    ref, gates = dense_reference(xd, ref_w)
    counts = (gates > 0).reshape(-1, E).sum(0).tolist()
    assert counts[EMPTY] == 0 and sum(n > 0 for n in counts) >= 3, counts
    # one fc1 and one fc2 GEMM per expert with tokens, none for the empty one
    assert forward_calls == {e: 2 if n else 0 for e, n in enumerate(counts)}, forward_calls
    torch.testing.assert_close(out.detach().double(), ref, rtol=1e-5, atol=1e-6)
    (out * g).sum().backward()
    (ref * g.double()).sum().backward()
    torch.testing.assert_close(x.grad.double(), xd.grad, rtol=1e-5, atol=1e-6)
    fc1, fc2 = experts[EMPTY]
    assert torch.equal(fc1.grad, torch.zeros_like(fc1)) and \
        torch.equal(fc2.grad, torch.zeros_like(fc2))
    for e, (f1, f2) in experts.items():
        torch.testing.assert_close(f2.grad.double(), ref_w["down"].grad[e], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(f1.grad.double(), torch.cat(
            [ref_w["gate"].grad[e], ref_w["up"].grad[e]]), rtol=1e-5, atol=1e-6)
