"""Measuring a dial: full forward passes over the held-out tokens give one `DialPoint` (realised
experts per token overall and per layer, validation loss overall and per domain, forward FLOPs)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch

from megatron.remoe.analysis import capture_routing
from megatron.remoe.dial_calibration.inputs import LoadedModel
from megatron.remoe.logs import quiet
from megatron.remoe.model import ModelShape, train_flops_per_token
from megatron.remoe.router import relu_routers, set_dial


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


def forward_flops(lm: LoadedModel, experts_per_token: float) -> tuple:
    """(forward FLOPs per token, of which the routed experts') at `experts_per_token`."""
    shape = ModelShape.of_transformer_config(lm.tcfg)
    total = train_flops_per_token(shape, lm.seq_length, lm.vocab_size, experts_per_token)["train"] / 3
    no_experts = train_flops_per_token(shape, lm.seq_length, lm.vocab_size, 0.0)["train"] / 3
    return total, total - no_experts


class Evaluator:
    """Full forward passes over fixed held-out tokens; optionally captures one layer's gates."""

    def __init__(self, lm: LoadedModel, eval_tokens, batch_size: int = 8):
        self.lm, self.ev, self.batch_size = lm, eval_tokens, batch_size
        self.passes = 0

    def run(self, capture_layers: Sequence[int] = ()):
        """-> (analysis.RoutingCapture, {layer number: its gates [N, E]} of `capture_layers`)."""
        gates: dict = {n: [] for n in capture_layers}
        routers = dict(relu_routers(self.lm.model))

        def hook(n):
            return lambda m, a, out: gates[n].append(
                out[0].detach().float().reshape(-1, out[0].shape[-1]))

        handles = [routers[n].register_forward_hook(hook(n)) for n in capture_layers]
        try:
            # hundreds of passes: the routing capture's own progress lines would drown the dial's
            with quiet("megatron.remoe.analysis"):
                cap = capture_routing(self.lm.model, self.ev, batch_size=self.batch_size)
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
