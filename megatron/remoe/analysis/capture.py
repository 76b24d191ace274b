"""Routing capture: every MoE router's routing map for every analysed token (forward hooks, eval mode,
no grad), plus the next-token loss per domain."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
from megatron.core.transformer.moe.router import Router

from megatron.remoe.analysis.errors import AnalysisError
from megatron.remoe.analysis.tokens import EvalTokens
from megatron.remoe.config import is_relu_routed
from megatron.remoe.logs import get_logger

logger = get_logger(__name__)


@dataclass
class RoutingCapture:
    """Routing of every analysed token in every MoE layer of one model."""

    label: str
    layer_numbers: list  # global 1-based layer numbers of the MoE layers
    num_experts: int
    routing: np.ndarray  # [L, N, E] bool
    top1: np.ndarray  # [L, N] int16: expert with the largest gate, -1 when no expert is active
    token_ids: np.ndarray  # [N] int64
    domains: np.ndarray  # [N] int64 (index into domain_names)
    domain_names: list
    loss_sum: dict = field(default_factory=dict)  # domain -> summed LM loss (next-token)
    loss_tokens: dict = field(default_factory=dict)  # domain -> predicted tokens
    router: str = ""  # "relu", "topk", ...
    topk: Optional[int] = None
    info: dict = field(default_factory=dict)  # checkpoint, iteration, ...

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.shape[0])

    def domain_loss(self) -> dict:
        return {d: self.loss_sum[d] / self.loss_tokens[d] for d in self.loss_sum
                if self.loss_tokens.get(d)}


def moe_routers(model) -> list:
    """[(layer_number, router module)] of the MoE layers of a (possibly wrapped) GPT model."""
    routers = [(int(m.layer_number), m) for m in model.modules() if isinstance(m, Router)]
    if not routers:
        raise AnalysisError("the model has no MoE layer (a dense model): nothing to analyse")
    return sorted(routers, key=lambda x: x[0])


def _router_kind(model) -> tuple:
    config = getattr(model, "config", None)
    if is_relu_routed(config):
        return "relu", getattr(config, "moe_router_topk", None)
    return ("topk", getattr(config, "moe_router_topk", None)) if config is not None else ("", None)


def _equal_length_batches(seqs: list, batch_size: int):
    """(i, j) slices of consecutive sequences of equal length, at most `batch_size` each."""
    i = 0
    while i < len(seqs):
        j = i + 1
        while j < len(seqs) and j - i < batch_size and len(seqs[j]) == len(seqs[i]):
            j += 1
        yield i, j
        i = j


def _router_hooks(routers: list, seen: dict) -> list:
    """Forward hooks storing each router's (probs, routing_map) in `seen[layer_number]`."""
    def hook(layer_number):
        def fn(module, args, output):
            probs, routing_map = output[0], output[1]
            seen[layer_number] = (probs.detach(), routing_map.detach())
        return fn

    return [m.register_forward_hook(hook(n)) for n, m in routers]


def _record_routing(seen: dict, layer_numbers: list, routing: np.ndarray, top1: np.ndarray,
                    start: int, B: int, S: int, E: int) -> None:
    """Copy one batch's routing maps and top-1 experts into rows start .. start + B * S."""
    for li, n in enumerate(layer_numbers):
        if n not in seen:
            raise RuntimeError(f"router of layer {n} did not run")
        probs, rmap = seen[n]
        # megatron routes [S, B, H] hidden states: row s * B + b -> token (b, s)
        rmap = rmap.reshape(S, B, E).transpose(0, 1).reshape(B * S, E)
        probs = probs.float().reshape(S, B, E).transpose(0, 1).reshape(B * S, E)
        routing[li, start:start + B * S] = rmap.cpu().numpy()
        best = probs.argmax(dim=1)
        best[~rmap.any(dim=1)] = -1
        top1[li, start:start + B * S] = best.cpu().numpy().astype(np.int16)


def capture_routing(model, eval_tokens: EvalTokens, label: str = "model", batch_size: int = 8,
                    device=None) -> RoutingCapture:
    """Run `model` (eval mode, no grad) over the evaluation tokens and record every MoE router's
    routing map (forward hooks). Also sums the next-token loss per domain."""
    routers = moe_routers(model)
    layer_numbers = [n for n, _ in routers]
    E = int(routers[0][1].config.num_moe_experts)
    if device is None:
        device = next(model.parameters()).device
    seen: dict = {}
    handles = _router_hooks(routers, seen)
    seqs = eval_tokens.sequences
    N = sum(len(s) for s in seqs)
    routing = np.zeros((len(routers), N, E), dtype=bool)
    top1 = np.full((len(routers), N), -1, dtype=np.int16)
    loss_sum = {d: 0.0 for d in eval_tokens.domain_names}
    loss_tokens = {d: 0 for d in eval_tokens.domain_names}
    was_training = model.training
    model.eval()
    start, t0, last_log = 0, time.perf_counter(), time.perf_counter()
    try:
        with torch.no_grad():
            for i, j in _equal_length_batches(seqs, batch_size):
                batch = torch.from_numpy(np.stack(seqs[i:j])).to(device)
                B, S = batch.shape
                pos = torch.arange(S, device=device).unsqueeze(0).expand(B, S)
                labels = torch.roll(batch, -1, dims=1)
                seen.clear()
                loss = model(batch, pos, None, labels=labels)  # [B, S]
                _record_routing(seen, layer_numbers, routing, top1, start, B, S, E)
                if loss is not None and S > 1:
                    per_seq = loss.float()[:, :-1].sum(dim=1).cpu().numpy()
                    for b in range(B):
                        d = eval_tokens.domain_names[eval_tokens.seq_domain[i + b]]
                        loss_sum[d] += float(per_seq[b])
                        loss_tokens[d] += S - 1
                start += B * S
                if time.perf_counter() - last_log > 10:
                    last_log = time.perf_counter()
                    logger.info(f"analyze: [{label}] {start:,}/{N:,} tokens "
                                f"({start / (last_log - t0):,.0f} tok/s)")
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    router, topk = _router_kind(model)
    cap = RoutingCapture(label, layer_numbers, E, routing, top1, eval_tokens.token_ids,
                         eval_tokens.domains, list(eval_tokens.domain_names), loss_sum,
                         loss_tokens, router, topk)
    logger.info(f"analyze: [{label}] routed {N:,} tokens through {len(layer_numbers)} MoE layers in "
                f"{time.perf_counter() - t0:.1f} s")
    return cap
