"""Non-finite losses and gradients: the one-pass check, the per-layer report and --nan-policy.

`train_step` asks `grads_nonfinite` before the optimizer step; all ranks agree on the answer in the
step's one all-reduce, so a step is skipped (or the run stopped) everywhere or nowhere. The loop
then calls `apply_nan_policy` on every rank: count the step as skipped, or raise NonFiniteError
with `nonfinite_report` (which parameters, by transformer layer, with the layer's routing).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core.utils import unwrap_model

from megatron.remoe.logs import get_logger, info0

log = get_logger(__name__)


class NonFiniteError(RuntimeError):
    """A non-finite loss or gradient under --nan-policy stop (or too many skipped steps): the run
    stops without saving; the message names the iteration and the per-layer statistics."""



def _grad_buffers(model: list):
    for chunk in model:
        for buffer in getattr(chunk, "buffers", []) + getattr(chunk, "expert_parallel_buffers",
                                                               []):
            yield buffer.grad_data


def grads_nonfinite(model: list) -> torch.Tensor:
    """1.0 (a device scalar, no host sync) if any local gradient is NaN or inf, else 0.0.

    One reduction pass per buffer: min and max propagate NaN and are -inf / +inf when any element
    is. (`isfinite` + `any` took 3 passes and, on CPU, 15 % of an MoE step: docs/performance.md.)"""
    flags = [~torch.isfinite(torch.stack(torch.aminmax(g))).all() for g in _grad_buffers(model)
             if g.numel()]
    if not flags:
        return torch.zeros((), dtype=torch.float32)
    return torch.stack(flags).any().float()


def apply_nan_policy(run, metrics: dict, last_saved) -> None:
    """--nan-policy for a step whose loss or gradients were non-finite on some rank (every rank
    calls this together): count it as skipped, or raise NonFiniteError (nothing is saved)."""
    cfg = run.cfg
    step = run.iteration + 1
    applied = not metrics.get("update_skipped")  # grad norm overflow found after the update
    if cfg.nan_policy == "skip-step" and not applied and \
            run.skipped_steps < cfg.max_skipped_steps:
        run.skipped_steps += 1
        info0(log, f"warning: non-finite loss or gradient at iteration {step} (lm_loss "
                   f"{metrics['lm_loss']:.4g}); step skipped (no update), {run.skipped_steps} of "
                   f"at most {cfg.max_skipped_steps} skipped (--max-skipped-steps)")
        return
    report = nonfinite_report(run, metrics)
    if cfg.nan_policy == "skip-step" and not applied:
        why = (f"a step would be skipped beyond --max-skipped-steps {cfg.max_skipped_steps} "
               f"({run.skipped_steps} skipped already)")
        fix = "find the cause (data, --lr, --clip-grad) or raise --max-skipped-steps"
    else:
        why = "--nan-policy stop" if not applied else "the gradient norm overflowed"
        fix = ("lower --lr or --clip-grad, check the data, or resume with --nan-policy skip-step")
    saved = f"last checkpoint {last_saved}" if last_saved else (
        f"resume from {run.loaded_from}" if run.loaded_from else "no checkpoint of this run")
    grad_norm = metrics.get("grad_norm", float("nan"))
    raise NonFiniteError(
        f"non-finite loss or gradient at iteration {step} (lm_loss {metrics['lm_loss']:.4g}, "
        f"grad_norm {grad_norm:.4g}); stopped: {why}; nothing saved for this iteration "
        f"({saved}); fix: {fix}\nlayer statistics at iteration {step}:\n  "
        + report.replace("\n", "\n  "))


def _nonfinite_params(model: list) -> tuple:
    """({parameter name: layer number or None} with non-finite gradients on this rank, the layer
    numbers of this rank's model chunks)."""
    local, numbers = {}, set()
    for chunk in unwrap_model(model):
        layer_of = {id(p): layer.layer_number
                    for layer in getattr(getattr(chunk, "decoder", None), "layers", [])
                    for p in layer.parameters()}
        numbers.update(layer_of.values())
        for name, param in chunk.named_parameters():
            grad = getattr(param, "main_grad", None)
            grad = grad if grad is not None else param.grad
            if grad is not None and not bool(torch.isfinite(grad).all()):
                local[name] = layer_of.get(id(param))
    return local, numbers


def _ranks(names: dict) -> str:
    return ", ".join(f"{n} (rank {','.join(map(str, r))})" for n, r in sorted(names.items()))


def nonfinite_report(run, metrics: dict) -> str:
    """Where the non-finite values are: parameters with NaN/inf gradients (over all ranks), by
    transformer layer, with the layer's routing statistics. A collective: call on every rank."""
    local = _nonfinite_params(run.model)
    parts = [local]
    if dist.get_world_size() > 1:
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, local)
    by_layer: dict = {}
    layers = set()
    for rank, (part, part_layers) in enumerate(parts):
        layers.update(part_layers)
        for name, layer in part.items():
            by_layer.setdefault(layer, {}).setdefault(name, []).append(rank)
    layers = sorted(layers | {k for k in by_layer if k is not None})
    lines = []
    for layer in layers:
        stats = [f"{key} {metrics[f'moe/layer_{layer}/{key}']:.3g}"
                 for key in ("sparsity", "experts_per_token", "zero_expert_tokens",
                             "max_mean_load") if f"moe/layer_{layer}/{key}" in metrics]
        bad = by_layer.get(layer, {})
        grads = "non-finite grads in " + _ranks(bad) if bad else "grads finite"
        lines.append(f"layer {layer}: {grads}" + (f"; {', '.join(stats)}" if stats else ""))
    if None in by_layer:
        lines.append("outside the layers: non-finite grads in " + _ranks(by_layer[None]))
    return "\n".join(lines)
