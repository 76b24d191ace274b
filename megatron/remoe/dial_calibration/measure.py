"""Measuring a dial: full forward passes over the held-out tokens give one `DialPoint` (realised
experts per token overall and per layer, validation loss overall and per domain, forward FLOPs)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from megatron.remoe.dial import relu_routers, set_dial
from megatron.remoe.dial_calibration.inputs import LoadedModel
from megatron.remoe.logs import get_logger

logger = get_logger(__name__)


@dataclass
class DialPoint:
    """One evaluated setting of one model on the held-out tokens."""

    model: str  # "ReMoE" | "TopK"
    method: str  # undialled | global | per-layer | thresholds | topk
    form: str  # cut | shift | - (TopK)
    target: Optional[float]
    thresholds: list
    max_experts: Optional[int]
    experts_per_token: float
    experts_per_token_per_layer: list
    valid_loss: float
    domain_loss: dict
    forward_flops_per_token: float
    expert_flops_per_token: float
    zero_expert_token_fraction: float
    tokens: int
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)


def flops_config(tcfg, seq_length: int) -> dict:
    """The model-shape dict of model.flops_per_token, from a megatron config."""
    G = getattr(tcfg, "moe_granularity", 1) or 1
    E, k = tcfg.num_moe_experts or 0, tcfg.moe_router_topk or 0
    return dict(hidden_size=tcfg.hidden_size, num_layers=tcfg.num_layers, seq_length=seq_length,
                num_attention_heads=tcfg.num_attention_heads,
                num_query_groups=tcfg.num_query_groups, kv_channels=tcfg.kv_channels,
                ffn_hidden_size=(tcfg.moe_ffn_hidden_size * G) if E else tcfg.ffn_hidden_size,
                router="relu" if E else "dense", num_experts=E // G, moe_router_topk=k // G,
                moe_granularity=G, moe_layer_freq=tcfg.moe_layer_freq)


def forward_flops(lm: LoadedModel, experts_per_token: float) -> tuple:
    """(forward FLOPs per token, of which the routed experts') at `experts_per_token`."""
    from megatron.remoe.model import flops_per_token

    shape = flops_config(lm.tcfg, lm.seq_length)
    total = flops_per_token(shape, lm.vocab_size, experts_per_token)["train"] / 3
    no_experts = flops_per_token(shape, lm.vocab_size, 0.0)["train"] / 3
    return total, total - no_experts


class Evaluator:
    """Full forward passes over fixed held-out tokens; optionally captures one layer's gates."""

    def __init__(self, lm: LoadedModel, eval_tokens, batch_size: int = 8, log: Callable = logger.info):
        self.lm, self.ev, self.batch_size, self.log = lm, eval_tokens, batch_size, log
        self.passes = 0

    def run(self, capture_layers: Sequence[int] = ()):
        """-> (analysis.RoutingCapture, {layer number: its gates [N, E]} of `capture_layers`)."""
        from megatron.remoe.analysis import capture_routing

        gates: dict = {n: [] for n in capture_layers}
        routers = dict(relu_routers(self.lm.model))

        def hook(n):
            return lambda m, a, out: gates[n].append(
                out[0].detach().float().reshape(-1, out[0].shape[-1]))

        handles = [routers[n].register_forward_hook(hook(n)) for n in capture_layers]
        try:
            cap = capture_routing(self.lm.model, self.ev, batch_size=self.batch_size,
                                  log=lambda m: None)
        finally:
            for h in handles:
                h.remove()
        self.passes += 1
        return cap, {n: torch.cat(g) for n, g in gates.items()}

    def point(self, model: str, method: str, form: str, target=None, dial=None,
              topk: Optional[int] = None, cap=None) -> DialPoint:
        t0 = time.perf_counter()
        if cap is None:
            cap, _ = self.run()
        per_token = cap.routing.sum(axis=2)  # [L, N]
        per_layer = per_token.mean(axis=1).tolist()
        ept = float(np.mean(per_layer))
        loss_sum, loss_tok = sum(cap.loss_sum.values()), sum(cap.loss_tokens.values())
        total, experts = forward_flops(self.lm, ept)
        return DialPoint(
            model=model, method=method, form=form, target=target,
            thresholds=list(dial.thresholds) if dial is not None else [],
            max_experts=dial.max_experts if dial is not None else None,
            experts_per_token=ept, experts_per_token_per_layer=per_layer,
            valid_loss=loss_sum / max(loss_tok, 1), domain_loss=cap.domain_loss(),
            forward_flops_per_token=total, expert_flops_per_token=experts,
            zero_expert_token_fraction=float((per_token == 0).mean()), tokens=cap.num_tokens,
            seconds=time.perf_counter() - t0, extra={"topk": topk} if topk else {})

    def measure(self, dial) -> tuple:
        """(capture, realised experts per token) with `dial` set on the model."""
        set_dial(self.lm.model, dial)
        cap, _ = self.run()
        return cap, float(cap.routing.sum(axis=2).mean())
