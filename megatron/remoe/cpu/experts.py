"""Expert computation for CPU training: SequentialMLP's parameters, one grouped pass over experts.

`SequentialMLP` (the only megatron-core expert module that runs without CUDA) calls a full `MLP`
module per local expert: two parallel-linear autograd functions, the activation and the prob
scaling, each once per expert, and every expert weight gradient goes through autograd's
AccumulateGrad and then megatron-core DDP's `main_grad.add_` hook, a second full pass over E times
the MLP's weights. `GroupedCPUExperts` keeps SequentialMLP's modules and parameters (hence its
state dict, its sharded checkpoint keys, its initialisation and the HF conversion) and only
replaces `forward`:

* fc1 and fc2 each run as one autograd function over all local experts (`GroupedLinear`: one
  GEMM per expert into slices of one output; backward likewise), and the activation and prob
  scaling run once over all tokens;
* under megatron-core DDP the expert weight gradients are accumulated straight into `main_grad`
  (`addmm_`; with bf16 weights and an fp32 `main_grad`, the bf16 GEMM then the same `add_` DDP's
  hook does), as megatron-core's `gradient_accumulation_fusion` does on GPUs, so autograd's
  gradient accumulation and DDP's per-parameter hook pass disappear.

The computation is the expert MLP's local computation: with expert tensor parallelism
(`explicit_expert_comm`) megatron-core's expert linears are plain local GEMMs and the token
dispatcher does all communication; with TP = EP = 1 their communication is the identity. Configs
it does not reproduce (biases, fused or TE activations, FP8/FP4, latent experts, activation
recompute or offloading, delayed weight gradients) keep `SequentialMLP`, with a log line saying
why (`unsupported_reason`). GPUs keep megatron-core's modules (TE grouped GEMM).
"""

from __future__ import annotations

import functools
import logging
from typing import List, Optional

import torch
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.spec_utils import ModuleSpec

log = logging.getLogger(__name__)


def unsupported_reason(config) -> Optional[str]:
    """Why `GroupedCPUExperts` cannot reproduce `SequentialMLP` for this config (None: it can)."""
    checks = [
        (torch.cuda.is_available(), "CUDA is available (GPUs use megatron-core's experts)"),
        (getattr(config, "add_bias_linear", False), "add_bias_linear=True (expert biases)"),
        (getattr(config, "bias_activation_fusion", False), "bias_activation_fusion=True"),
        (getattr(config, "use_te_activation_func", False), "use_te_activation_func=True"),
        (getattr(config, "fp8", None) or getattr(config, "fp4", None), "FP8/FP4 experts"),
        (getattr(config, "moe_latent_size", None) is not None, "moe_latent_size is set"),
        (getattr(config, "use_kitchen", False), "use_kitchen=True"),
        (getattr(config, "delay_wgrad_compute", False), "delay_wgrad_compute=True"),
        (getattr(config, "fine_grained_activation_offloading", False),
         "fine_grained_activation_offloading=True"),
        (getattr(config, "cpu_offloading", False), "cpu_offloading=True"),
        (config.recompute_granularity == "selective"
         and "moe_act" in (getattr(config, "recompute_modules", None) or []),
         "recompute_modules contains moe_act"),
    ]
    for failed, why in checks:
        if failed:
            return why
    return None


def _group_slices(counts: List[int]):
    start = 0
    for n in counts:
        yield slice(start, start + n)
        start += n


def _accumulates_into_main_grad(weight: torch.Tensor) -> bool:
    """megatron-core DDP gave the weight a `main_grad` buffer to accumulate its gradient into."""
    return getattr(weight, "main_grad", None) is not None and \
        hasattr(weight, "grad_added_to_main_grad")


class GroupedLinear(torch.autograd.Function):
    """y[s_e] = x[s_e] W_e^T for the row groups s_e given by `counts`, W_e = weights[e] ([out, in],
    torch.nn.Linear layout). Backward: dx[s_e] = dy[s_e] W_e; dW_e = dy[s_e]^T x[s_e], added to
    W_e.main_grad when megatron-core DDP owns the weight (then a placeholder gradient is returned
    and `grad_added_to_main_grad` tells DDP's hook not to add it again, as megatron-core's
    linear layers do with gradient_accumulation_fusion)."""

    @staticmethod
    def forward(ctx, x, counts, *weights):
        ctx.counts = counts
        ctx.save_for_backward(x, *weights)
        out = x.new_empty(x.shape[0], weights[0].shape[0])
        for n, rows, w in zip(counts, _group_slices(counts), weights):
            if n:  # an expert without tokens has no rows to write (a dialled model has many)
                torch.mm(x[rows], w.t(), out=out[rows])
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, *weights = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out.new_empty(x.shape)
            for n, rows, w in zip(ctx.counts, _group_slices(ctx.counts), weights):
                if n:
                    torch.mm(grad_out[rows], w, out=grad_x[rows])
        grad_ws = []
        for i, (rows, w) in enumerate(zip(_group_slices(ctx.counts), weights)):
            g, xe = grad_out[rows], x[rows]
            if not ctx.needs_input_grad[2 + i]:
                grad_ws.append(None)
            elif _accumulates_into_main_grad(w):
                if w.main_grad.dtype == g.dtype:
                    w.main_grad.addmm_(g.t(), xe)
                else:  # bf16 GEMM, fp32 main_grad: the add_ DDP's hook would do
                    w.main_grad.add_(g.t().mm(xe))
                if getattr(w, "zero_out_wgrad", False):
                    grad_ws.append(torch.zeros(w.shape, dtype=w.dtype))
                else:
                    grad_ws.append(torch.empty(w.shape, dtype=w.dtype))
                w.grad_added_to_main_grad = True
            else:
                grad_ws.append(g.t().mm(xe))
        return (grad_x, None, *grad_ws)


class GroupedCPUExperts(SequentialMLP):
    """`SequentialMLP` (same submodules, parameters and checkpoints) whose forward computes all
    local experts with two `GroupedLinear` calls and one activation over all tokens."""

    def __init__(self, num_local_experts, config, submodules, pg_collection=None, **kwargs):
        reason = unsupported_reason(config)
        if reason is not None:
            raise ValueError(f"GroupedCPUExperts cannot run this config: {reason}; use "
                             "megatron-core's SequentialMLP")
        super().__init__(num_local_experts, config, submodules, pg_collection=pg_collection,
                         **kwargs)

    def _activation(self, h: torch.Tensor) -> torch.Tensor:
        """The expert MLP's activation (megatron-core MLP.forward, unfused path)."""
        cfg = self.config
        if not cfg.gated_linear_unit:
            return cfg.activation_func(h)
        x_glu, x_linear = torch.chunk(h, 2, dim=-1)
        if (val := cfg.activation_func_clamp_value) is not None:
            x_glu = x_glu.clamp(min=None, max=val)
            x_linear = x_linear.clamp(min=-val, max=val)
        return cfg.activation_func(x_glu) * (x_linear + cfg.glu_linear_offset)

    def forward(self, permuted_local_hidden_states: torch.Tensor,
                tokens_per_expert: torch.Tensor, permuted_probs: torch.Tensor):
        hidden, probs = permuted_local_hidden_states, permuted_probs
        if self.config.moe_apply_probs_on_input:
            assert self.config.moe_router_topk == 1, \
                "`moe_apply_probs_on_input` only works with `moe_router_topk`=1."
            hidden = (probs.unsqueeze(-1) * hidden).to(hidden.dtype)
            probs = torch.ones_like(probs)
        counts = [int(n) for n in tokens_per_expert.tolist()] if \
            isinstance(tokens_per_expert, torch.Tensor) else [int(n) for n in tokens_per_expert]
        if sum(counts) != hidden.shape[0] or len(counts) != self.num_local_experts:
            raise ValueError(f"tokens_per_expert {counts} does not cover the {hidden.shape[0]} "
                             f"permuted tokens of {self.num_local_experts} local experts")
        fc1 = [expert.linear_fc1.weight for expert in self.local_experts]
        fc2 = [expert.linear_fc2.weight for expert in self.local_experts]
        h = GroupedLinear.apply(hidden, counts, *fc1)
        dtype = h.dtype
        h = (self._activation(h) * probs.unsqueeze(-1)).to(dtype)
        return GroupedLinear.apply(h, counts, *fc2), None


CPU_EXPERT_IMPLS = ("grouped", "sequential")


def cpu_experts_spec(experts_spec, config):
    """The experts entry of a local (non-TE) MoE layer spec for this machine: `GroupedCPUExperts`
    in place of megatron-core's `SequentialMLP` when `config.moe_cpu_experts` is "grouped" (the
    default) and it reproduces SequentialMLP for this config; otherwise the spec unchanged, with a
    warning naming the reason when grouped experts were asked for on a CPU machine."""
    impl = getattr(config, "moe_cpu_experts", "grouped")
    if impl not in CPU_EXPERT_IMPLS:
        raise ValueError(f"moe_cpu_experts={impl!r}: use one of {', '.join(CPU_EXPERT_IMPLS)}")
    if impl == "sequential" or torch.cuda.is_available():
        return experts_spec
    module = experts_spec.module if isinstance(experts_spec, ModuleSpec) else \
        getattr(experts_spec, "func", experts_spec)
    if module is GroupedCPUExperts:  # layers of a block can share one spec object
        return experts_spec
    reason = unsupported_reason(config)
    if isinstance(experts_spec, ModuleSpec) and experts_spec.module is SequentialMLP:
        if reason is None:
            return ModuleSpec(module=GroupedCPUExperts, params=dict(experts_spec.params),
                              submodules=experts_spec.submodules)
    elif isinstance(experts_spec, functools.partial) and experts_spec.func is SequentialMLP:
        if reason is None:
            return functools.partial(GroupedCPUExperts, *experts_spec.args,
                                     **experts_spec.keywords)
    else:
        reason = f"the layer spec's experts are {experts_spec!r}, not SequentialMLP"
    if reason not in _WARNED:
        _WARNED.add(reason)
        log.warning("CPU experts: keeping megatron-core's experts (a loop over experts), not the "
                    "grouped CPU experts: %s", reason)
    return experts_spec


_WARNED: set = set()
