"""The parity check of a conversion: the same inputs through the megatron and the HF model (fp32,
router fp32) must give the same logits, routing maps, per-layer sparsity and greedy decoding."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Optional

import torch
from megatron.core.transformer.moe.router import Router

from megatron.remoe.hf.configs import dial_dict
from megatron.remoe.hf.errors import ConversionError
from megatron.remoe.hf.key_map import bare_megatron


@dataclass
class ParityReport:
    max_abs_logit_diff: float = math.inf
    mean_abs_logit_diff: float = math.inf
    routing_mismatches: int = 0
    routing_ignored: int = 0
    routing_entries: int = 0
    sparsity_megatron: list = field(default_factory=list)
    sparsity_hf: list = field(default_factory=list)
    greedy_megatron: list = field(default_factory=list)
    greedy_hf: list = field(default_factory=list)
    greedy_hf_cached: list = field(default_factory=list)
    tolerance: float = 1e-4
    dial: Optional[dict] = None
    ok: bool = False
    failures: list = field(default_factory=list)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def summary(self) -> str:
        lines = [f"verify: max |logit diff| = {self.max_abs_logit_diff:.3e} "
                 f"(mean {self.mean_abs_logit_diff:.3e}, tolerance {self.tolerance:g})"]
        if self.dial:
            lines.append(f"verify: compute dial {self.dial['form']} thresholds "
                         f"{[round(t, 6) for t in self.dial['thresholds']]} max_experts "
                         f"{self.dial['max_experts']} (both models)")
        if self.routing_entries:
            lines.append(f"verify: routing maps: {self.routing_mismatches} mismatching of "
                         f"{self.routing_entries} entries ({self.routing_ignored} ignored, "
                         f"|router logit - threshold| < {self.tolerance:g})")
            lines.append("verify: per-layer sparsity megatron " +
                         " ".join(f"{s:.4f}" for s in self.sparsity_megatron) + " | HF " +
                         " ".join(f"{s:.4f}" for s in self.sparsity_hf))
        lines.append(f"verify: greedy {len(self.greedy_megatron)} tokens megatron "
                     f"{self.greedy_megatron} | HF {self.greedy_hf} | HF generate() "
                     f"{self.greedy_hf_cached}")
        lines.append("verify: PASS" if self.ok else "verify: FAIL: " + "; ".join(self.failures))
        return "\n".join(lines)


def _megatron_forward(model, input_ids: torch.Tensor, capture: bool = False):
    """logits [B, S, V] fp32 and (if capture) per-MoE-layer (probs, routing_map) in HF token
    order (row b * S + s)."""
    B, S = input_ids.shape
    routers = sorted(((int(m.layer_number), m) for m in model.modules()
                      if isinstance(m, Router)), key=lambda x: x[0])
    seen = {}
    handles = []
    if capture:
        def hook(n):
            def fn(module, args, output):
                seen[n] = (output[0].detach().float(), output[1].detach())
            return fn
        handles = [m.register_forward_hook(hook(n)) for n, m in routers]
    try:
        pos = torch.arange(S).unsqueeze(0).expand(B, S)
        with torch.no_grad():
            logits = model(input_ids, pos, None).float()
    finally:
        for h in handles:
            h.remove()
    maps = []
    for n, _ in routers:
        if n in seen:
            probs, rmap = seen[n]
            E = rmap.shape[-1]
            maps.append((probs.reshape(S, B, E).transpose(0, 1).reshape(B * S, E),
                         rmap.reshape(S, B, E).transpose(0, 1).reshape(B * S, E)))
    return logits, maps


def greedy_megatron(model, prompt: torch.Tensor, new_tokens: int) -> list:
    ids = prompt.clone()
    for _ in range(new_tokens):
        logits, _ = _megatron_forward(model, ids)
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[0, prompt.shape[1]:].tolist()


def greedy_hf(hf_model, prompt: torch.Tensor, new_tokens: int) -> list:
    ids = prompt.clone()
    with torch.no_grad():
        for _ in range(new_tokens):
            logits = hf_model(input_ids=ids, use_cache=False).logits.float()
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[0, prompt.shape[1]:].tolist()


def greedy_hf_generate(hf_model, prompt: torch.Tensor, new_tokens: int) -> list:
    with torch.no_grad():
        out = hf_model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                                max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                do_sample=False, use_cache=True, pad_token_id=0)
    return out[0, prompt.shape[1]:].tolist()



def _hf_routing(out, hf_config) -> tuple:
    """(router logits [N, E] per layer, routing maps [N, E] per layer) of an HF forward."""
    h_router_logits = getattr(out, "router_logits", None)
    if isinstance(out.router_logits, tuple) and out.router_logits and \
            out.router_logits[0].dim() == 3:  # some HF classes: [B, S, E]
        h_router_logits = tuple(x.reshape(-1, x.shape[-1]) for x in out.router_logits)
    h_maps = getattr(out, "routing_maps", None)
    if h_maps is None:  # Mixtral: top-k of the softmax (same as top-k of the logits)
        k = hf_config.num_experts_per_tok
        h_maps = tuple(torch.zeros_like(lg, dtype=torch.bool).scatter(
            1, lg.float().topk(k, dim=-1).indices, True) for lg in h_router_logits)
    return h_router_logits, h_maps


def _near_boundary(lg: torch.Tensor, layer: int, hf_config, tolerance: float) -> torch.Tensor:
    """[N, E] entries whose routing may legitimately differ between two fp32 implementations:
    ReLU: |router logit - threshold| < tolerance (and near ties at a dial's per-token cap);
    TopK: every entry of a token whose k-th and (k+1)-th router logits are a near tie."""
    if getattr(hf_config, "router_type", "topk") == "relu":
        dial = getattr(hf_config, "router_dial", None)
        tau = float(dial["thresholds"][layer]) if dial else 0.0  # the boundary: logit = tau
        ignore = (lg - tau).abs() < tolerance
        cap = dial.get("max_experts") if dial else None
        if cap is not None and cap < lg.shape[-1]:  # near tie at the cap
            top = lg.topk(cap + 1, dim=-1).values
            ignore = ignore | ((top[:, cap - 1] - top[:, cap]).abs() < tolerance)[:, None]
        return ignore
    k = getattr(hf_config, "num_experts_per_tok", 1)
    E = lg.shape[-1]
    top = lg.topk(min(k + 1, E), dim=-1).values
    near = (top[:, k - 1] - top[:, k]).abs() < tolerance if k < E else \
        torch.zeros(lg.shape[0], dtype=torch.bool)
    return near[:, None].expand_as(lg)


def _compare_routing(rep: ParityReport, m_maps: list, out, hf_config) -> None:
    """Routing maps and per-layer sparsity, megatron vs HF, up to near-boundary entries."""
    h_router_logits, h_maps = _hf_routing(out, hf_config)
    if len(h_maps) != len(m_maps):
        rep.failures.append(f"{len(m_maps)} MoE layers in megatron, {len(h_maps)} in HF")
    for i, ((_, m_map), h_map, lg) in enumerate(zip(m_maps, h_maps, h_router_logits)):
        ignore = _near_boundary(lg.float(), i, hf_config, rep.tolerance)
        mism = (m_map != h_map) & ~ignore
        rep.routing_mismatches += int(mism.sum())
        rep.routing_ignored += int(ignore.sum())
        rep.routing_entries += m_map.numel()
        rep.sparsity_megatron.append(1.0 - m_map.float().mean().item())
        rep.sparsity_hf.append(1.0 - h_map.float().mean().item())
        slack = int(((m_map != h_map) & ignore).sum()) / max(m_map.numel(), 1)
        if abs(rep.sparsity_megatron[-1] - rep.sparsity_hf[-1]) > slack + 1e-12:
            rep.failures.append(f"sparsity differs in MoE layer {len(rep.sparsity_hf)}")
    if rep.routing_mismatches:
        rep.failures.append(f"{rep.routing_mismatches} routing-map entries differ")


def _compare_greedy(rep: ParityReport, megatron_model, hf_model, prompt, new_tokens: int) -> None:
    rep.greedy_megatron = greedy_megatron(megatron_model, prompt, new_tokens)
    rep.greedy_hf = greedy_hf(hf_model, prompt, new_tokens)
    rep.greedy_hf_cached = greedy_hf_generate(hf_model, prompt, new_tokens)
    if rep.greedy_megatron != rep.greedy_hf:
        rep.failures.append("greedy decoding differs (megatron vs HF)")
    if rep.greedy_hf_cached != rep.greedy_hf:
        rep.failures.append("HF generate() with KV cache differs from the uncached loop")


def verify_parity(megatron_model, hf_model, input_ids: Optional[torch.Tensor] = None,
                  prompt: Optional[torch.Tensor] = None, new_tokens: int = 16,
                  tolerance: float = 1e-4, seed: int = 0) -> ParityReport:
    """Same inputs through both models (fp32, router fp32): logits within `tolerance` (max abs
    diff), routing maps equal except entries with |router logit| < tolerance (TopK: tokens whose
    k-th and (k+1)-th router logits are closer than that), per-layer sparsity equal up to those
    ignored entries, identical greedy decoding of `new_tokens` tokens (plain loop and HF
    generate() with KV cache)."""
    megatron_model = bare_megatron(megatron_model)
    megatron_model.eval()
    hf_model.eval()
    if next(hf_model.parameters()).dtype != torch.float32:
        raise ConversionError("verify needs the fp32 HF model (ReLU gates near 0 flip in bf16)")
    g = torch.Generator().manual_seed(seed)
    if input_ids is None:
        input_ids = torch.randint(0, hf_model.config.vocab_size, (2, 32), generator=g)
    if prompt is None:
        prompt = input_ids[:1, :8]
    rep = ParityReport(tolerance=tolerance)
    m_dial = dial_dict(getattr(megatron_model, "config", None))
    h_dial = getattr(hf_model.config, "router_dial", None)
    rep.dial = m_dial
    if m_dial != h_dial:
        rep.failures.append(f"compute dial differs: megatron {m_dial} vs HF {h_dial}")
    m_logits, m_maps = _megatron_forward(megatron_model, input_ids, capture=True)
    with torch.no_grad():
        out = hf_model(input_ids=input_ids, use_cache=False, output_router_logits=True)
    diff = (m_logits - out.logits.float()).abs()
    rep.max_abs_logit_diff = float(diff.max())
    rep.mean_abs_logit_diff = float(diff.mean())
    if not rep.max_abs_logit_diff <= tolerance:
        rep.failures.append(f"max |logit diff| {rep.max_abs_logit_diff:.3e} > {tolerance:g}")
    if m_maps:
        _compare_routing(rep, m_maps, out, hf_model.config)
    if new_tokens:
        _compare_greedy(rep, megatron_model, hf_model, prompt, new_tokens)
    rep.ok = not rep.failures
    return rep
