"""One optimizer step of the trainer: `train_step` returns a `StepResult`.

    forward/backward over the micro-batches (megatron-core pipeline schedule; it calls
    finalize_model_grads = DP/TP/PP gradient reductions) -> optimizer.step() (clips inside)
    (its `attach` hook updates lambda: once per applied step, on every rank) -> scheduler.step()

Between the backward pass and the optimizer step, one all-reduce (MAX over all ranks) of a few flags
makes every rank take the same decision: a non-finite loss or gradient on any rank (the loop then
applies `--nan-policy`, see nonfinite.py), a preemption signal received by any rank, the wall-clock
budget (`--exit-duration-in-mins`) used up on any rank, the --save lock lost on any rank.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.utils import get_batch_on_this_cp_rank, get_model_config

from megatron.remoe.compat import report_moe_metrics
from megatron.remoe.config import is_relu_routed, moe_layer_numbers
from megatron.remoe.elastic import elastic_options, fraction_of
from megatron.remoe.router import set_elastic_budget
from megatron.remoe.routing_stats import RoutingStats
from megatron.remoe.training.nonfinite import grads_nonfinite
from megatron.remoe.training.signals import agree


@dataclass
class StopVote:
    """Reasons to stop, agreed by all ranks (MAX) in the step's all-reduce."""

    signum: int = 0  # a signal received on some rank (0: none)
    time_up: bool = False  # --exit-duration-in-mins used up on some rank
    lock_lost: bool = False  # another run took the --save directory's lock over

    @classmethod
    def from_flags(cls, flags: list) -> "StopVote":
        if not flags:
            return cls()
        signum, time_up, lock_lost = flags
        return cls(int(signum), bool(time_up), bool(lock_lost))


@dataclass
class StepResult:
    """What one step returns to the loop: the metrics to log and the decisions beside them."""

    metrics: dict  # scalars for the loggers (lm_loss, lr, grad_norm, sparsity, ...)
    routing: Optional[RoutingStats] = None  # ReLU routing statistics (None for other routers)
    stop: StopVote = field(default_factory=StopVote)

    @property
    def nonfinite(self) -> bool:
        """The loss or a gradient (or the gradient norm) was NaN/inf on some rank."""
        return bool(self.metrics.get("nonfinite"))


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Sum of masked token losses, the token count, and [sum, count] for reporting. The schedule
    divides by the count and the number of micro-batches (calculate_per_token_loss=False)."""
    losses = output_tensor.float().view(-1)
    mask = loss_mask.float().view(-1)
    loss = torch.sum(losses * mask)
    num_tokens = mask.sum().to(torch.int)
    return loss, num_tokens, {"lm loss": torch.stack([loss.detach(), mask.sum().detach()])}


def make_forward_step(device: torch.device, cp_size: int):
    def forward_step(data_iterator, model):
        batch = {k: v.to(device, non_blocking=True) for k, v in next(data_iterator).items()
                 if torch.is_tensor(v)}
        if cp_size > 1:
            batch = get_batch_on_this_cp_rank(batch)
        # causal attention without an explicit mask; non-first pipeline stages ignore the tokens
        output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
        return output, partial(loss_func, batch["loss_mask"])

    return forward_step


def reduce_lm_loss(losses_reduced: list, device) -> float:
    """Mean token loss of the global batch, on every rank (computed on the last stage)."""
    total = torch.zeros(2, dtype=torch.float64, device=device)
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        for item in losses_reduced:
            total += item["lm loss"].to(torch.float64)
        dist.all_reduce(total, group=parallel_state.get_data_parallel_group(
            with_context_parallel=True))
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        dist.broadcast(total, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                       group=parallel_state.get_pipeline_model_parallel_group())
    return float(total[0] / total[1].clamp(min=1))


def forward_backward(run, data_iterator, forward_only: bool = False) -> list:
    """The pipeline schedule over `num_micro_batches` micro-batches; the losses it reduced."""
    cfg = run.cfg
    return run.forward_backward(
        forward_step_func=make_forward_step(run.device, cfg.context_parallel_size),
        data_iterator=data_iterator, model=run.model, num_microbatches=run.num_micro_batches,
        seq_length=cfg.seq_length, micro_batch_size=cfg.micro_batch_size,
        forward_only=forward_only)


def draw_elastic_budget(run) -> tuple:
    """Elastic training (elastic.py): this step's cut, drawn from (seed, iteration), and the
    metrics to log; (None, {}) when --moe-relu-elastic-budgets is not set."""
    options = elastic_options(run.cfg)
    if options is None:
        return None, {}
    layers = moe_layer_numbers(run.tcfg)
    budget = options.draw(run.iteration + 1, layers)
    fractions = [fraction_of(budget, n) or 1.0 for n in layers]
    return budget, {"elastic_budget": sum(fractions) / len(fractions)}


def begin_elastic_step(run) -> dict:
    """Draw this step's cut and hand it to the routers (the dialled-only form of elastic
    training); the metrics to log ({} when --moe-relu-elastic-budgets is not set)."""
    budget, metrics = draw_elastic_budget(run)
    if metrics:
        set_elastic_budget(run.model, budget)
    return metrics


class _RecordedIterator:
    """Yields what `source` yields and keeps it, so that a second schedule can see the same
    micro-batches (`replay()`) without consuming more of the data."""

    def __init__(self, source):
        self.source, self.items = source, []

    def __iter__(self):
        return self

    def __next__(self):
        item = next(self.source)
        self.items.append(item)
        return item

    def replay(self):
        return iter(self.items)


@contextlib.contextmanager
def _no_gradient_reduction(model: list):
    """A schedule inside this accumulates gradients only: megatron-core's schedule hooks (grad
    sync on the last micro-batch, finalize_model_grads = DP all-reduce / reduce-scatter, TP/PP
    shared grads) are switched off, and every chunk stays in DDP's no_sync (with
    --overlap-grad-reduce the backward hooks would otherwise start the reduce)."""
    config = get_model_config(model[0])
    saved = (config.no_sync_func, config.grad_sync_func, config.finalize_model_grads_func)
    config.no_sync_func = config.grad_sync_func = config.finalize_model_grads_func = None
    try:
        with contextlib.ExitStack() as stack:
            for chunk in model:
                stack.enter_context(chunk.no_sync())
            yield
    finally:
        config.no_sync_func, config.grad_sync_func, config.finalize_model_grads_func = saved


def full_and_dialled_passes(run, data_iterator, budget) -> tuple:
    """A drawn step of elastic training with --moe-relu-elastic-full-pass: the plain step's
    forward/backward (undialled, L1 term and controller statistics as the paper's step), then
    the dialled forward/backward (LM loss only) on the same micro-batches. Each schedule runs
    over num_micro_batches, so each pass is scaled as a plain step; the gradients add up in the
    gradient buffers and only the second schedule reduces them (once, over the sum). Each
    schedule keeps one budget throughout, so a recomputed forward sees its pass's budget.
    Returns (full pass losses, dialled pass losses)."""
    iterators = data_iterator if isinstance(data_iterator, list) else [data_iterator]
    recorded = [_RecordedIterator(it) for it in iterators]
    set_elastic_budget(run.model, None)
    with _no_gradient_reduction(run.model):
        full = forward_backward(run, recorded if len(recorded) > 1 else recorded[0])
    replays = [r.replay() for r in recorded]
    set_elastic_budget(run.model, budget, lm_only=True)
    try:
        dialled = forward_backward(run, replays if len(replays) > 1 else replays[0])
    finally:
        set_elastic_budget(run.model, None)
    return full, dialled


def train_step(run, data_iterator, stop_flags: Optional[Callable[[], list]] = None) -> StepResult:
    """One optimizer step over `num_micro_batches` micro-batches.

    Before the optimizer step all ranks agree (one all-reduce, MAX) on whether the loss or any
    gradient is non-finite anywhere, together with the local `stop_flags()` (signal number, wall-
    clock budget used up, --save lock lost); the agreed flags come back as `StepResult.stop`. On a
    non-finite step nothing is updated (no optimizer, scheduler or lambda step) and
    `StepResult.nonfinite` is True; the caller applies --nan-policy.
    """
    for chunk in run.model:
        chunk.zero_grad_buffer()
    run.optimizer.zero_grad()
    dialled_loss = None
    if run.cfg.moe_relu_elastic_full_pass:
        budget, elastic = draw_elastic_budget(run)
        if budget is None:  # not drawn: a plain step
            set_elastic_budget(run.model, None)
            losses = forward_backward(run, data_iterator)
        else:
            losses, dialled = full_and_dialled_passes(run, data_iterator, budget)
            dialled_loss = reduce_lm_loss(dialled, run.device)
            elastic["elastic_dialled_lm_loss"] = dialled_loss
    else:
        elastic = begin_elastic_step(run)  # {} unless --moe-relu-elastic-budgets
        losses = forward_backward(run, data_iterator)
    # finalize_model_grads (DP all-reduce / reduce-scatter, TP/PP shared grads) ran in the schedule
    run.hooks.inject_nan(run)
    lm_loss = reduce_lm_loss(losses, run.device)  # the full pass's loss, as on plain steps
    local_bad = grads_nonfinite(run.model)
    if not math.isfinite(lm_loss) or (dialled_loss is not None and not math.isfinite(dialled_loss)):
        local_bad = torch.ones_like(local_bad)
    bad, *stop = agree([local_bad, *(stop_flags() if stop_flags else [])], run.device)
    stop = StopVote.from_flags(stop)
    if bad:
        return _not_applied(run, lm_loss, stop)
    # gradient clipping happens inside; so does the lambda update (integration.attach)
    update_ok, grad_norm, _ = run.optimizer.step()
    if update_ok:
        run.scheduler.step(increment=1)
    routing = run.controller.last_stats if run.controller is not None else None
    metrics = {"lm_loss": lm_loss,
               "lr": run.optimizer.param_groups[0]["lr"],
               "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
               "update_skipped": not update_ok}
    if routing is not None:
        metrics.update(routing.as_dict())
    metrics.update(topk_aux_losses(run))
    metrics.update(elastic)
    # finite gradients can still overflow the norm (fp32 sum of squares): that is reported too
    if update_ok and grad_norm is not None and not math.isfinite(float(grad_norm)):
        metrics["nonfinite"] = True
    return StepResult(metrics, routing, stop)


def _not_applied(run, lm_loss: float, stop: StopVote) -> StepResult:
    """A step with a non-finite loss or gradient: the routing statistics are reduced (all ranks,
    as usual) but lambda keeps its value; neither the optimizer nor the scheduler advances."""
    routing = run.controller.report() if run.controller is not None else None
    metrics = {"lm_loss": lm_loss, "lr": run.optimizer.param_groups[0]["lr"],
               "grad_norm": float("nan"), "update_skipped": True, "nonfinite": True}
    if routing is not None:
        metrics.update(routing.as_dict())
    metrics.update(topk_aux_losses(run))
    return StepResult(metrics, routing, stop)


def topk_aux_losses(run) -> dict:
    """TopK routers log their aux loss through megatron-core's tracker: reduce and clear it."""
    tcfg = run.tcfg
    if not tcfg.num_moe_experts or is_relu_routed(tcfg):
        return {}
    if tcfg.moe_router_load_balancing_type != "aux_loss":
        return {}
    out: dict = {}
    report_moe_metrics(loss_scale=1.0 / run.num_micro_batches, iteration=run.iteration,
                       total_loss_dict=out, force_initialize=True,
                       track_names=["load_balancing_loss"], num_layers=tcfg.num_layers,
                       moe_layer_freq=tcfg.moe_layer_freq)
    return {k: float(v) for k, v in out.items()}
