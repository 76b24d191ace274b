"""The L1 regulariser of ReMoE: plain L1 (paper Sec. 3.3, Eq. 9) and its load-balanced form (Sec. 3.4,
Eqs. 10-11). Its adaptive coefficient lambda (Eqs. 6-8) is the SparsityController (controller.py).

Conventions (documented in docs/method.md):
* `l1_reg_loss(...)` is one layer's term on one micro-batch,
  `1/T * sum_t sum_e f_e * R_{t,e}` with `f_e = E/(k*T) * #{t : R_{t,e} > 0}` (load-balanced,
  Eq. 11) or `f_e = 1` (plain L1). T counts every valid token of the micro-batch (all-reduced over
  the TP*CP group when sequence/context parallelism splits the tokens, as megatron-core's switch
  loss does).
* The training loss adds `lambda * term` for every MoE layer, without the 1/L of the paper's 1/(LT)
  (Eqs. 9 and 10), exactly like the reference implementation; so our lambda equals lambda_paper / L
  and the paper's lambda_0 = 1e-8, alpha = 1.2 and settling times carry over. The logged
  `l1_reg_loss` is the mean over layers, i.e. the paper's L_reg.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist


def l1_reg_loss(
    probs: torch.Tensor,
    routing_map: torch.Tensor,
    topk: int,
    load_balancing: bool = True,
    valid_mask: Optional[torch.Tensor] = None,
    reduce_group: Optional[dist.ProcessGroup] = None,
    local_counts: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """One layer's (load-balanced) L1 term for the local tokens.

    Args:
        probs: [T_local, E] ReLU router outputs (>= 0). Gradients flow through these.
        routing_map: [T_local, E] bool, probs > 0.
        topk: k of the equivalent TopK model (f is normalised so that perfect balance at k
            experts per token gives f_e = 1).
        load_balancing: Eq. 10-11 when True, plain L1 (Eq. 9) when False.
        valid_mask: [T_local] bool, False for padding tokens (they are excluded from T and f).
        reduce_group: group over which tokens are split (TP*CP with sequence/context parallel).
        local_counts: [E] active tokens per expert on this rank, when the caller already has them;
            it requires that `probs`/`routing_map` are already zero for padding tokens (the router
            masks them), so neither the mask nor the counts are recomputed here.

    Returns a scalar whose sum over `reduce_group` is the term for the whole micro-batch.
    """
    num_experts = probs.shape[-1]
    if valid_mask is None or local_counts is not None:
        # torch.full is a device fill; torch.tensor(..., device=cuda) would be a synchronous
        # host-to-device copy, i.e. one host-device sync per layer and micro-batch.
        local_tokens = (torch.full((), float(probs.shape[0]), dtype=torch.float32,
                                   device=probs.device) if valid_mask is None
                        else valid_mask.sum().to(torch.float32))
        active = routing_map
    else:
        local_tokens = valid_mask.sum().to(torch.float32)
        active = routing_map & valid_mask.unsqueeze(-1)
        probs = probs * valid_mask.unsqueeze(-1)
    with torch.no_grad():
        per_expert_local = active.sum(dim=0) if local_counts is None else local_counts
        counts = torch.cat([per_expert_local.to(torch.float32), local_tokens.reshape(1)])
        if reduce_group is not None and dist.get_world_size(reduce_group) > 1:
            dist.all_reduce(counts, group=reduce_group)
        tokens_per_expert, total_tokens = counts[:num_experts], counts[num_experts]
        total_tokens = total_tokens.clamp(min=1.0)  # an all-padding micro-batch contributes 0
    per_expert = probs.sum(dim=0, dtype=torch.float32)
    if load_balancing:
        f = tokens_per_expert * (num_experts / (topk * total_tokens))
        return (f * per_expert).sum() / total_tokens
    return per_expert.sum() / total_tokens
