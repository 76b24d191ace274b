"""Shared pieces of the MoE-layer tests: a canonical (unsharded) set of weights, loading it into any
TP/EP layout of megatron-core's MoELayer, gathering gradients back, and an independent dense
reference of ReLU routing written with plain torch ops."""

from __future__ import annotations

import torch
import torch.nn.functional as F

H, FFN, E, K = 16, 24, 4, 1


def canonical_weights(seed: int = 0, num_experts: int = E, hidden: int = H, ffn: int = FFN):
    g = torch.Generator().manual_seed(seed)
    return {
        "router": torch.randn(num_experts, hidden, generator=g) * 0.5,
        "gate": torch.randn(num_experts, ffn, hidden, generator=g) * 0.2,
        "up": torch.randn(num_experts, ffn, hidden, generator=g) * 0.2,
        "down": torch.randn(num_experts, hidden, ffn, generator=g) * 0.2,
    }


def dense_reference(x, w, valid=None):
    """y_t = sum_e ReLU(x_t W_r)_e * FFN_e(x_t) with SwiGLU experts, every expert on every token."""
    tokens = x.reshape(-1, x.shape[-1]).double()
    gates = torch.relu(tokens @ w["router"].double().T)
    if valid is not None:
        gates = gates * valid.reshape(-1, 1).double()
    out = torch.zeros_like(tokens)
    for e in range(w["router"].shape[0]):
        hidden = F.silu(tokens @ w["gate"][e].double().T) * (tokens @ w["up"][e].double().T)
        out += gates[:, e:e + 1] * (hidden @ w["down"][e].double().T)
    return out.reshape(x.shape), gates


def reference_l1(gates, topk, load_balancing=True):
    """Hand-written Eqs. 10-11 for one layer and one micro-batch (float64, explicit loops)."""
    T, num_experts = gates.shape
    total = 0.0
    for e in range(num_experts):
        count = sum(1 for t in range(T) if gates[t, e] > 0)
        f = num_experts / (topk * T) * count if load_balancing else 1.0
        for t in range(T):
            total = total + f * gates[t, e]
    return total / T


def reference_step(w, micro_batches, lam, topk=K):
    """float64 outputs and gradients of sum_b [sum(out_b * g_b) + lam * L_reg(b)] over the
    micro-batches [(x_b, g_b), ...] (the regulariser is defined per micro-batch)."""
    w = {k: v.double().requires_grad_(True) for k, v in w.items()}
    total, outs, gates_per_mb, regs = 0.0, [], [], []
    for x, g in micro_batches:
        out, gates = dense_reference(x, w)
        reg = reference_l1(gates, topk=topk)
        total = total + (out * g.double()).sum() + lam * reg
        outs.append(out.detach())
        gates_per_mb.append(gates.detach())
        regs.append(float(reg))
    total.backward()
    return dict(outputs=outs, gates=gates_per_mb, router=w["router"].grad, gate=w["gate"].grad,
                up=w["up"].grad, down=w["down"].grad, l1_reg_loss=sum(regs) / len(regs))


def sparse_router(w, bias, dead=()):
    """Weights for the sparse regime with inputs whose feature 0 is a positive constant c (a bias
    feature): the live experts' router column 0 becomes -bias (fewer positive gates, some tokens
    with none), a dead expert's router row becomes -10 on feature 0 only (never a positive gate:
    an expert without tokens)."""
    w = dict(w, router=w["router"].clone())
    w["router"][:, 0] = -bias
    for e in dead:
        w["router"][e] = 0.0
        w["router"][e, 0] = -10.0
    return w


def build_moe_layer(config, controller=None, use_transformer_engine=False):
    """The MoE block of a one-layer spec of this config, from the project's own block spec (either
    spec form: ModuleSpec, or functools.partial on megatron-core >= 0.18)."""
    from megatron.remoe.compat import build_from_spec
    from megatron.remoe.spec import get_block_spec

    spec = get_block_spec(config, controller, use_transformer_engine=use_transformer_engine)
    layer = build_from_spec(spec.layer_specs[0].submodules.mlp, config=config)
    layer.set_layer_number(1)
    return layer


def load_canonical(layer, w, tp_rank=0, tp_size=1, ep_rank=0, ep_size=1):
    num_experts, ffn = w["gate"].shape[0], w["gate"].shape[1]
    local = num_experts // ep_size
    f = ffn // tp_size
    rows = slice(tp_rank * f, (tp_rank + 1) * f)
    with torch.no_grad():
        layer.router.weight.copy_(w["router"])
        for i, expert in enumerate(layer.experts.local_experts):
            e = ep_rank * local + i
            expert.linear_fc1.weight.copy_(torch.cat([w["gate"][e][rows], w["up"][e][rows]]))
            expert.linear_fc2.weight.copy_(w["down"][e][:, rows])


def local_expert_grads(layer, ffn_local):
    gates, ups, downs = [], [], []
    for expert in layer.experts.local_experts:
        g1 = expert.linear_fc1.weight.grad
        gates.append(g1[:ffn_local])
        ups.append(g1[ffn_local:])
        downs.append(expert.linear_fc2.weight.grad)
    return torch.stack(gates), torch.stack(ups), torch.stack(downs)
