"""The pretraining loop: megatron-core GPT with ReMoE routers, on CPU (gloo) or GPUs (NCCL).

Read `train_step` first: one optimizer step is

    forward/backward over the micro-batches (megatron-core pipeline schedule; it calls
    finalize_model_grads = DP/TP/PP gradient reductions) -> optimizer.step() (clips inside)
    -> scheduler.step() -> controller.step() (lambda update, once per step on every rank)

Between the backward pass and the optimizer step, one all-reduce (MAX over all ranks) of a few flags
makes every rank take the same decision: a non-finite loss or gradient on any rank (policy
`--nan-policy stop|skip-step`), a preemption signal received by any rank, the wall-clock budget
(`--exit-duration-in-mins`) used up on any rank (see `megatron.remoe.signals`).

Everything else is set-up (`setup`), evaluation (`evaluate`), logging and checkpoints (`pretrain`).
"""

from __future__ import annotations

import json
import math
import os
import random
import threading
import time
from dataclasses import dataclass
from functools import partial
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron.remoe.arguments import TrainConfig, config_to_yaml, num_micro_batches, transformer_config
from megatron.remoe.checkpointing import (
    CheckpointSaveError,
    check_checkpoint_matches,
    check_writer_version,
    checkpoint_candidates,
    find_loadable_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from megatron.remoe.compat import clear_moe_metrics, report_moe_metrics
from megatron.remoe.config import ConfigError
from megatron.remoe.datasets import (
    build_datasets,
    check_data_matches_tokenizer,
    load_run_tokenizer,
    make_loader,
    padded_vocab_size,
)
from megatron.remoe.distributed import (
    ParallelConfig,
    collective_failure,
    init_distributed,
    is_collective_failure,
    is_rank0,
)
from megatron.remoe.log_filters import fallback_note
from megatron.remoe.metrics_logging import MetricsLogger, check_logging_backends, format_train_line, memory_gb
from megatron.remoe.model import build_controller, build_gpt_model, count_parameters
from megatron.remoe.regularizer import RoutingWindow
from megatron.remoe.run_lock import RunLock, check_not_held
from megatron.remoe.signals import ExitSignalHandler, agree


class NonFiniteError(RuntimeError):
    """A non-finite loss or gradient under --nan-policy stop (or too many skipped steps): the run
    stops without saving; the message names the iteration and the per-layer statistics."""


EXIT_NONFINITE = 3  # process exit code for NonFiniteError (2 is configuration errors)


@dataclass
class Run:
    """Everything the loop needs, built once by `setup`."""

    cfg: TrainConfig
    tcfg: object  # ReMoETransformerConfig
    device: torch.device
    model: list  # model chunks (DDP-wrapped); >1 with interleaved pipelining
    optimizer: object
    scheduler: object
    controller: object  # SparsityController, or None unless --router relu
    forward_backward: object
    num_micro_batches: int
    dp_rank: int
    dp_size: int
    vocab_size: int
    params: dict
    iteration: int = 0
    consumed_train_samples: int = 0
    loaded_from: Optional[str] = None
    skipped_steps: int = 0  # steps skipped for a non-finite loss/gradient (kept across resumes)
    eval_pending: bool = False  # the checkpoint was saved on a preemption before its evaluation


# ------------------------------------------------------------------------------------------------
# Set-up
# ------------------------------------------------------------------------------------------------
def _seed_everything(seed: int) -> None:
    """Megatron-LM's seeding: a different stream per pipeline stage (so stages do not initialise
    identical layers), the same across TP/DP ranks (CPU init then splits identical weights)."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def build_model(cfg: TrainConfig, tcfg, vocab_size: int, controller, device) -> list:
    """GPT model chunk(s) of this pipeline rank, in bf16 if asked, wrapped in megatron DDP."""
    from megatron.core import tensor_parallel
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.transformer.module import Float16Module

    vp = cfg.virtual_pipeline_model_parallel_size
    chunks = []
    for vp_stage in range(vp or 1):
        chunk = build_gpt_model(
            tcfg, vocab_size=vocab_size, max_sequence_length=cfg.seq_length,
            controller=controller, use_transformer_engine=cfg.transformer_impl ==
            "transformer_engine", vp_stage=vp_stage if vp else None, rotary_base=cfg.rotary_base)
        for param in chunk.parameters():
            tensor_parallel.set_defaults_if_not_set_tensor_model_parallel_attributes(param)
        chunk.to(device)
        if cfg.bf16:
            chunk = Float16Module(tcfg, chunk)
        chunks.append(chunk)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=cfg.overlap_grad_reduce,
        use_distributed_optimizer=cfg.use_distributed_optimizer,
        # megatron-core's check raises on the one rank that sees a NaN (the others then hang in
        # the next collective); train_step checks after the reduction and all ranks agree
        check_for_nan_in_grad=False)
    # only the first chunk gets bucketed grad reduction (Megatron-LM does the same)
    return [DistributedDataParallel(config=tcfg, ddp_config=ddp_config, module=chunk,
                                    disable_bucketing=i > 0) for i, chunk in enumerate(chunks)]


def build_optimizer(cfg: TrainConfig, model: list):
    """Adam (decoupled weight decay, none on norms/biases) + warm-up/decay schedule."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from megatron.remoe.cpu_settings import use_fused_cpu_adam

    opt_config = OptimizerConfig(
        optimizer="adam", lr=cfg.lr, min_lr=cfg.min_lr, weight_decay=cfg.weight_decay,
        adam_beta1=cfg.adam_beta1, adam_beta2=cfg.adam_beta2, adam_eps=cfg.adam_eps,
        clip_grad=cfg.clip_grad, bf16=cfg.bf16,
        params_dtype=torch.bfloat16 if cfg.bf16 else torch.float32,
        use_distributed_optimizer=cfg.use_distributed_optimizer)
    optimizer = get_megatron_optimizer(opt_config, model)
    use_fused_cpu_adam(optimizer)  # CPU: torch's fused Adam kernel, same update, 4x faster
    decay_iters = cfg.lr_decay_iters or cfg.train_iters
    if cfg.lr_warmup_fraction is not None:
        warmup = int(cfg.lr_warmup_fraction * decay_iters)
    else:
        warmup = cfg.lr_warmup_iters
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=cfg.lr_warmup_init, max_lr=cfg.lr, min_lr=cfg.min_lr,
        lr_warmup_steps=warmup, lr_decay_steps=decay_iters, lr_decay_style=cfg.lr_decay_style,
        start_wd=cfg.weight_decay, end_wd=cfg.weight_decay, wd_incr_steps=cfg.train_iters,
        wd_incr_style="constant")
    return optimizer, scheduler


def setup(cfg: TrainConfig) -> Run:
    """Process groups, model, optimizer, schedule, controller; resume from --load if possible."""
    from megatron.core import parallel_state
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func

    check_logging_backends(cfg.tensorboard_dir, cfg.wandb_project)
    tokenizer = _load_tokenizer(cfg)
    check_data_matches_tokenizer(cfg, tokenizer)
    if cfg.load:  # a checkpoint of another model shape: say so before any process group exists
        _check_resume_target(cfg, padded_vocab_size(tokenizer.vocab_size, cfg))
    if cfg.save:  # another live run writes there: every rank reads the lock, nothing is written
        check_not_held(cfg.save)
    device = init_distributed(ParallelConfig(
        tensor_model_parallel_size=cfg.tensor_model_parallel_size,
        pipeline_model_parallel_size=cfg.pipeline_model_parallel_size,
        expert_model_parallel_size=cfg.expert_model_parallel_size,
        context_parallel_size=cfg.context_parallel_size,
        expert_tensor_parallel_size=cfg.expert_tensor_parallel_size,
        virtual_pipeline_model_parallel_size=cfg.virtual_pipeline_model_parallel_size),
        seed=cfg.seed, timeout_minutes=cfg.distributed_timeout_minutes)
    _seed_everything(cfg.seed)
    world = dist.get_world_size()
    tcfg = transformer_config(cfg, use_cpu_initialization=device.type == "cpu")
    controller = build_controller(tcfg, device)
    vocab = padded_vocab_size(tokenizer.vocab_size, cfg)
    model = build_model(cfg, tcfg, vocab, controller, device)
    optimizer, scheduler = build_optimizer(cfg, model)

    # hooks the pipeline schedules call
    tcfg.grad_scale_func = optimizer.scale_loss
    tcfg.finalize_model_grads_func = finalize_model_grads
    if cfg.overlap_grad_reduce:
        no_sync = [chunk.no_sync for chunk in model]
        tcfg.no_sync_func = no_sync[0] if len(model) == 1 else no_sync
        grad_sync = [chunk.start_grad_sync for chunk in model]
        tcfg.grad_sync_func = grad_sync[0] if len(model) == 1 else grad_sync

    run = Run(cfg=cfg, tcfg=tcfg, device=device, model=model, optimizer=optimizer,
              scheduler=scheduler, controller=controller,
              forward_backward=get_forward_backward_func(),
              num_micro_batches=num_micro_batches(cfg, world),
              dp_rank=parallel_state.get_data_parallel_rank(),
              dp_size=parallel_state.get_data_parallel_world_size(), vocab_size=vocab,
              params=count_parameters(tcfg, vocab))
    if cfg.load:
        _resume(run)
    return run


def _load_tokenizer(cfg: TrainConfig):
    from megatron.remoe.data.errors import DataError
    from megatron.remoe.datasets import MockTokenizer

    try:
        tokenizer = load_run_tokenizer(cfg)
    except DataError as e:  # missing / unreadable tokenizer directory
        raise ConfigError(f"--tokenizer: {e}") from None
    if cfg.vocab_size and not isinstance(tokenizer, MockTokenizer) and \
            cfg.vocab_size != tokenizer.vocab_size:
        raise ConfigError(f"vocab_size={cfg.vocab_size} does not match the tokenizer "
                          f"{cfg.tokenizer!r} ({tokenizer.vocab_size} tokens); fix: drop "
                          "--vocab-size (it comes from the tokenizer) or use the matching "
                          "tokenizer")
    return tokenizer


def _check_resume_target(cfg: TrainConfig, vocab_size: int) -> None:
    """Model shape and vocabulary of the newest checkpoint in --load against this run (from its
    small common state; an unreadable one is left to the verified load, which falls back)."""
    from megatron.core import dist_checkpointing

    candidates = checkpoint_candidates(cfg.load, log=lambda message: None)
    if not candidates:
        return
    check_writer_version(candidates[0])  # a newer megatron-core's layout is not "corrupt"
    try:
        common = dist_checkpointing.load_common_state_dict(candidates[0])
    except Exception:  # noqa: BLE001 -- corrupt: _resume warns and falls back
        return
    check_checkpoint_matches(candidates[0], common, cfg, vocab_size)


def _load_errors() -> tuple:
    # torch.distributed.checkpoint wraps the per-rank errors of a load in CheckpointException,
    # which derives from BaseException
    try:
        from torch.distributed.checkpoint.api import CheckpointException
    except ImportError:  # pragma: no cover
        return (Exception,)
    return (Exception, CheckpointException)


_LOAD_ERRORS = _load_errors()


def _last_line(error: BaseException) -> str:
    """The innermost message of a (possibly multi-line, multi-rank) exception, on one line."""
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    return (lines[-1] if lines else type(error).__name__)[:300]


def _resume(run: Run) -> None:
    """Load the newest loadable checkpoint of --load. Corrupt ones (files not matching their
    manifest) and ones whose loading fails on any rank are skipped with a warning, falling back to
    the previous one; a checkpoint of another model shape is a ConfigError (no fallback)."""
    cfg = run.cfg
    failed: list = []
    while True:
        path = find_loadable_checkpoint(cfg.load, log=_print0, checksums=cfg.checkpoint_checksums,
                                        skip=tuple(failed))
        if path is None:
            break
        error = None
        try:
            common = load_checkpoint(path, run.model, run.optimizer, run.scheduler,
                                     run.controller, cfg, log=_print0, vocab_size=run.vocab_size)
        except ConfigError:
            raise
        except _LOAD_ERRORS as e:  # unreadable file: fall back, all ranks together
            error = f"{type(e).__name__}: {_last_line(e)}"
        errors = [error]
        if dist.get_world_size() > 1:
            errors = [None] * dist.get_world_size()
            dist.all_gather_object(errors, error)
        error = next((e for e in errors if e), None)
        if error is None:
            run.iteration = common["iteration"]
            run.consumed_train_samples = common["consumed_train_samples"]
            run.skipped_steps = int(common.get("skipped_steps") or 0)
            run.eval_pending = bool(common.get("eval_pending"))
            run.loaded_from = path
            _print0(f"checkpoint: resumed from {path} (iteration {run.iteration}, "
                    f"{run.consumed_train_samples:,} samples consumed)")
            return
        _print0(f"checkpoint: WARNING: loading {path} failed ({error}); falling back to the "
                "previous checkpoint")
        failed.append(path)
    if checkpoint_candidates(cfg.load, log=lambda message: None):
        raise ConfigError(f"--load {cfg.load}: no checkpoint there is loadable (see the warnings "
                          "above); fix: move the corrupt iter_* directories away or point --load "
                          "at another directory")
    _print0(f"checkpoint: nothing to resume in {cfg.load}; starting from scratch")


def _print0(message: str) -> None:
    if is_rank0():
        print(message, flush=True)


# ------------------------------------------------------------------------------------------------
# One step
# ------------------------------------------------------------------------------------------------
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
            from megatron.core.utils import get_batch_on_this_cp_rank

            batch = get_batch_on_this_cp_rank(batch)
        # causal attention without an explicit mask; non-first pipeline stages ignore the tokens
        output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
        return output, partial(loss_func, batch["loss_mask"])

    return forward_step


def reduce_lm_loss(losses_reduced: list, device) -> float:
    """Mean token loss of the global batch, on every rank (computed on the last stage)."""
    from megatron.core import parallel_state

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


def train_step(run: Run, data_iterator, stop_flags=None) -> dict:
    """One optimizer step over `num_micro_batches` micro-batches; returns this step's metrics.

    Before the optimizer step all ranks agree (one all-reduce, MAX) on whether the loss or any
    gradient is non-finite anywhere, together with the local `stop_flags()` (preemption signal
    number, wall-clock budget used up); the agreed stop flags come back as `metrics["_stop"]`.
    On a non-finite step nothing is updated (no optimizer, scheduler or lambda step) and the
    metrics say `nonfinite: True`; the caller applies --nan-policy.
    """
    for chunk in run.model:
        chunk.zero_grad_buffer()
    run.optimizer.zero_grad()
    losses = run.forward_backward(
        forward_step_func=make_forward_step(run.device, run.cfg.context_parallel_size),
        data_iterator=data_iterator, model=run.model, num_microbatches=run.num_micro_batches,
        seq_length=run.cfg.seq_length, micro_batch_size=run.cfg.micro_batch_size,
        forward_only=False)
    # finalize_model_grads (DP all-reduce / reduce-scatter, TP/PP shared grads) ran in the schedule
    _test_hook_inject_nan(run)
    lm_loss = reduce_lm_loss(losses, run.device)
    local_bad = _grads_nonfinite(run.model)
    if not math.isfinite(lm_loss):
        local_bad = torch.ones_like(local_bad)
    bad, *stop = agree([local_bad, *(stop_flags() if stop_flags else [])], run.device)
    if bad:
        return _nonfinite_metrics(run, lm_loss, stop)
    update_ok, grad_norm, _ = run.optimizer.step()  # gradient clipping happens inside
    if update_ok:
        run.scheduler.step(increment=1)
    stats = run.controller.step() if run.controller is not None else None  # on EVERY rank
    metrics = {"lm_loss": lm_loss,
               "lr": run.optimizer.param_groups[0]["lr"],
               "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
               "update_skipped": not update_ok}
    if stats is not None:
        metrics["_routing"] = stats
        metrics.update(stats.as_dict())
    metrics.update(topk_aux_losses(run))
    # finite gradients can still overflow the norm (fp32 sum of squares): that is reported too
    if update_ok and grad_norm is not None and not math.isfinite(float(grad_norm)):
        metrics["nonfinite"] = True
    metrics["_stop"] = stop
    return metrics


def _grad_buffers(model: list):
    for chunk in model:
        for buffer in getattr(chunk, "buffers", []) + getattr(chunk, "expert_parallel_buffers",
                                                               []):
            yield buffer.grad_data


def _grads_nonfinite(model: list) -> torch.Tensor:
    """1.0 (a device scalar, no host sync) if any local gradient is NaN or inf, else 0.0.

    One reduction pass per buffer: min and max propagate NaN and are -inf / +inf when any element
    is. (`isfinite` + `any` took 3 passes and, on CPU, 15 % of an MoE step: docs/performance.md.)"""
    flags = [~torch.isfinite(torch.stack(torch.aminmax(g))).all() for g in _grad_buffers(model)
             if g.numel()]
    if not flags:
        return torch.zeros((), dtype=torch.float32)
    return torch.stack(flags).any().float()


def _nonfinite_metrics(run: Run, lm_loss: float, stop: list) -> dict:
    """Metrics of a step that is not applied: the routing statistics are reduced (all ranks, as
    usual) but lambda keeps its value; the scheduler does not advance."""
    stats = None
    if run.controller is not None:
        kept = run.controller.state_dict()
        stats = run.controller.step()
        run.controller.load_state_dict(kept)
    metrics = {"lm_loss": lm_loss, "lr": run.optimizer.param_groups[0]["lr"],
               "grad_norm": float("nan"), "update_skipped": True, "nonfinite": True}
    if stats is not None:
        metrics["_routing"] = stats
        metrics.update(stats.as_dict())
    metrics.update(topk_aux_losses(run))
    metrics["_stop"] = stop
    return metrics


def _test_hook_inject_nan(run: Run) -> None:
    """TEST ONLY. REMOE_TEST_HOOK_NAN_AT=3,5 puts a NaN into one gradient (the first router
    weight, else the first parameter) at those iterations, after the data-parallel reduction;
    REMOE_TEST_HOOK_NAN_RANK=r restricts it to global rank r."""
    steps = os.environ.get("REMOE_TEST_HOOK_NAN_AT")
    if not steps or run.iteration + 1 not in {int(x) for x in steps.split(",") if x.strip()}:
        return
    rank = os.environ.get("REMOE_TEST_HOOK_NAN_RANK")
    if rank is not None and int(rank) != dist.get_rank():
        return
    from megatron.core.utils import unwrap_model

    params = list(unwrap_model(run.model)[0].named_parameters())
    name, param = next(((n, p) for n, p in params if "router" in n), params[0])
    grad = getattr(param, "main_grad", None)
    (grad if grad is not None else param.grad).view(-1)[0] = float("nan")


def nonfinite_report(run: Run, metrics: dict) -> str:
    """Where the non-finite values are: parameters with NaN/inf gradients (over all ranks), by
    transformer layer, with the layer's routing statistics. A collective: call on every rank."""
    from megatron.core.utils import unwrap_model

    local, numbers = {}, set()
    for chunk in unwrap_model(run.model):
        layer_of = {id(p): layer.layer_number
                    for layer in getattr(getattr(chunk, "decoder", None), "layers", [])
                    for p in layer.parameters()}
        numbers.update(layer_of.values())
        for name, param in chunk.named_parameters():
            grad = getattr(param, "main_grad", None)
            grad = grad if grad is not None else param.grad
            if grad is not None and not bool(torch.isfinite(grad).all()):
                local[name] = layer_of.get(id(param))
    parts = [(local, numbers)]
    if dist.get_world_size() > 1:
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, (local, numbers))
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
        grads = ("non-finite grads in " + ", ".join(
            f"{n} (rank {','.join(map(str, r))})" for n, r in sorted(bad.items()))
                 if bad else "grads finite")
        lines.append(f"layer {layer}: {grads}" + (f"; {', '.join(stats)}" if stats else ""))
    if None in by_layer:
        lines.append("outside the layers: non-finite grads in " + ", ".join(
            f"{n} (rank {','.join(map(str, r))})" for n, r in sorted(by_layer[None].items())))
    return "\n".join(lines)


def topk_aux_losses(run: Run) -> dict:
    """TopK routers log their aux loss through megatron-core's tracker: reduce and clear it."""
    tcfg = run.tcfg
    if not tcfg.num_moe_experts or getattr(tcfg, "moe_relu_routing", False):
        return {}
    if tcfg.moe_router_load_balancing_type != "aux_loss":
        return {}
    out: dict = {}
    report_moe_metrics(loss_scale=1.0 / run.num_micro_batches, iteration=run.iteration,
                       total_loss_dict=out, force_initialize=True,
                       track_names=["load_balancing_loss"], num_layers=tcfg.num_layers,
                       moe_layer_freq=tcfg.moe_layer_freq)
    return {k: float(v) for k, v in out.items()}


# ------------------------------------------------------------------------------------------------
# Evaluation
# ------------------------------------------------------------------------------------------------
def evaluate(run: Run, valid_sets: dict, weights: dict) -> dict:
    """Mean token loss on the first eval_iters global batches of each validation set."""
    cfg = run.cfg
    samples = cfg.eval_iters * cfg.global_batch_size
    for chunk in run.model:
        chunk.eval()
    results = {}
    with torch.no_grad():
        for name, dataset in valid_sets.items():
            iterators = [iter(make_loader(dataset, 0, samples, cfg, run.dp_rank, run.dp_size))
                         for _ in run.model]
            total, count = 0.0, 0
            for _ in range(cfg.eval_iters):
                losses = run.forward_backward(
                    forward_step_func=make_forward_step(run.device, cfg.context_parallel_size),
                    data_iterator=iterators if len(iterators) > 1 else iterators[0],
                    model=run.model, num_microbatches=run.num_micro_batches,
                    seq_length=cfg.seq_length, micro_batch_size=cfg.micro_batch_size,
                    forward_only=True)
                total += reduce_lm_loss(losses, run.device)
                count += 1
            results[name] = total / count
    for chunk in run.model:
        chunk.train()
    if run.tcfg.num_moe_experts:
        clear_moe_metrics()
    out = {}
    if len(results) == 1:
        out["valid/loss"] = next(iter(results.values()))
    elif results:
        out["valid/loss"] = sum(weights[n] * loss for n, loss in results.items())
        for name, loss in results.items():
            out[f"valid/{name}/loss"] = loss
    if "valid/loss" in out:
        out["valid/ppl"] = float(np.exp(min(out["valid/loss"], 50.0)))
    return out


# ------------------------------------------------------------------------------------------------
# The loop
# ------------------------------------------------------------------------------------------------
def pretrain(cfg: TrainConfig) -> dict:
    """Train for cfg.train_iters steps (resuming from --load); returns the run summary (rank 0
    also writes it as summary.json next to the metrics file).

    Stops early, after saving, at --exit-interval, after --exit-duration-in-mins, or on SIGTERM /
    SIGUSR1 (with --exit-signal-handler, the default). Raises NonFiniteError (nothing saved) on a
    non-finite loss or gradient under --nan-policy stop, or after more than --max-skipped-steps
    skipped steps under --nan-policy skip-step.
    """
    wall_start = time.time()
    handler = None
    if cfg.exit_signal_handler and threading.current_thread() is threading.main_thread():
        handler = ExitSignalHandler()
        handler.install()  # before set-up: a signal during loading is acted on at step 1
    try:
        return _pretrain(cfg, wall_start, handler)
    finally:
        if handler is not None:
            handler.restore()


def _pretrain(cfg: TrainConfig, wall_start: float, handler) -> dict:
    run = setup(cfg)
    if is_rank0():
        print("effective config:\n" + config_to_yaml(cfg), flush=True)
        p = run.params
        print(f"model: {cfg.router} router, {p['total'] / 1e6:.2f}M parameters, "
              f"{p['active'] / 1e6:.2f}M active per token; world {dist.get_world_size()} = "
              f"TP{cfg.tensor_model_parallel_size} x PP{cfg.pipeline_model_parallel_size} x "
              f"CP{cfg.context_parallel_size} x DP{run.dp_size} (EP"
              f"{cfg.expert_model_parallel_size}); {run.num_micro_batches} micro-batches of "
              f"{cfg.micro_batch_size} per step; device {run.device}", flush=True)
        note = fallback_note()
        if note:
            print(note, flush=True)
    train_ds, valid_sets, weights = build_datasets(cfg, load_run_tokenizer(cfg))
    if not valid_sets and cfg.eval_iters > 0:
        _print0("evaluation: off (no --valid-data-path and no --split)")
    lock = _take_run_lock(cfg)  # the first write into --save happens after this
    try:
        return _train(run, cfg, wall_start, handler, lock, train_ds, valid_sets, weights)
    finally:
        if lock is not None:
            lock.release()


def _take_run_lock(cfg: TrainConfig) -> Optional[RunLock]:
    """Rank 0 takes the --save directory's lock; every rank raises ConfigError if it could not."""
    lock, error = None, None
    if cfg.save and is_rank0():
        try:
            lock = RunLock(cfg.save, log=_print0).acquire()
        except ConfigError as e:
            error = str(e)
    if dist.get_world_size() > 1:
        shared = [error]
        dist.broadcast_object_list(shared, src=0)
        error = shared[0]
    if error:
        raise ConfigError(error)
    return lock


def _train(run: Run, cfg: TrainConfig, wall_start: float, handler, lock, train_ds, valid_sets,
           weights) -> dict:
    import signal

    logger = MetricsLogger(is_rank0(), cfg.metrics_file, cfg.tensorboard_dir, cfg.wandb_project,
                           cfg.wandb_exp_name, cfg.wandb_save_dir, config=cfg.to_dict(),
                           resume_iteration=run.iteration if cfg.load else None)
    total_samples = cfg.train_iters * cfg.global_batch_size
    loaders = [make_loader(train_ds, run.consumed_train_samples, total_samples, cfg,
                           run.dp_rank, run.dp_size) for _ in run.model]
    iterators = [_test_hook_phases(iter(loader), run) for loader in loaders]
    data_iterator = iterators if len(iterators) > 1 else iterators[0]
    tokens_per_step = cfg.global_batch_size * cfg.seq_length
    window = RoutingWindow()
    target = run.tcfg.target_sparsity if run.controller is not None else None
    history, last_eval, last_saved = [], {}, None
    step_times: list = []
    config_yaml = config_to_yaml(cfg)
    exit_reason = None
    step_delay = float(os.environ.get("REMOE_TEST_HOOK_STEP_SLEEP_S", "0"))  # TEST ONLY

    def stop_flags():
        """Local reasons to stop now: signal number received, wall-clock budget used up, the
        --save lock lost (seen by its heartbeat thread)."""
        signum = float(signal.Signals[handler.received]) if handler and handler.pending else 0.0
        budget = cfg.exit_duration_in_mins
        return [signum, float(bool(budget) and time.time() - wall_start > 60.0 * budget),
                float(lock is not None and lock.lost is not None)]

    try:
        if run.eval_pending and valid_sets:  # so the metrics match an uninterrupted run
            _test_hook_phase("eval", run.iteration)
            last_eval = evaluate(run, valid_sets, weights)
            last_eval["eval_iteration"] = run.iteration
            logger.log(run.iteration, last_eval, split="valid")
            logger.console(_format_eval(run.iteration, last_eval))
        while run.iteration < cfg.train_iters:
            _test_hook_phase("step", run.iteration + 1)
            t0 = time.perf_counter()
            metrics = train_step(run, data_iterator, stop_flags)
            if run.device.type == "cuda":
                torch.cuda.synchronize()
            if step_delay:
                time.sleep(step_delay)
            dt = time.perf_counter() - t0
            signum, time_up, lock_lost = metrics.pop("_stop")
            if lock_lost:  # another run took --save over: write nothing more
                if lock is not None:
                    lock.check()
                raise ConfigError(f"save={cfg.save}: this run lost its lock (see rank 0)")
            if metrics.get("nonfinite"):
                _apply_nan_policy(run, metrics, last_saved)
            run.iteration += 1
            run.consumed_train_samples += cfg.global_batch_size
            step_times.append(dt)
            window.add(metrics.pop("_routing", None))
            metrics.update(step_time_s=dt, tokens_per_s=tokens_per_step / dt,
                           consumed_samples=run.consumed_train_samples,
                           consumed_tokens=run.consumed_train_samples * cfg.seq_length,
                           memory_gb=memory_gb(run.device))
            if metrics.get("nonfinite"):
                metrics["skipped_steps"] = run.skipped_steps
            history.append(metrics)
            if run.iteration % cfg.log_interval == 0 or run.iteration == cfg.train_iters:
                metrics.update(window.as_dict())  # dead experts over the log window
                window.reset()
                recent = step_times[-cfg.log_interval:]
                eta = (cfg.train_iters - run.iteration) * sum(recent) / len(recent)
                logger.console(format_train_line(run.iteration, cfg.train_iters, metrics, target,
                                                 eta))
            logger.log(run.iteration, metrics)

            if signum:
                exit_reason = signal.Signals(int(signum)).name
                where = "" if handler and handler.received == exit_reason else " (on another rank)"
                logger.console(f"exit: {exit_reason} received{where}; saving and stopping after "
                               f"iteration {run.iteration}")
            elif time_up:
                exit_reason = "exit_duration_in_mins"
                logger.console(f"exit: --exit-duration-in-mins {cfg.exit_duration_in_mins} "
                               f"reached after iteration {run.iteration}")
            preempted = exit_reason is not None
            eval_due = bool(valid_sets and cfg.eval_interval and
                            run.iteration % cfg.eval_interval == 0)
            if not preempted and eval_due:
                _test_hook_phase("eval", run.iteration)
                last_eval = evaluate(run, valid_sets, weights)
                last_eval["eval_iteration"] = run.iteration
                logger.log(run.iteration, last_eval, split="valid")
                logger.console(_format_eval(run.iteration, last_eval))
            if not preempted and cfg.exit_interval and run.iteration % cfg.exit_interval == 0:
                exit_reason = "exit_interval"
            stop = exit_reason is not None
            if cfg.save and ((cfg.save_interval and run.iteration % cfg.save_interval == 0)
                             or run.iteration == cfg.train_iters or stop):
                if lock is not None:
                    lock.check()  # rank 0 only: the heartbeat flag above covers the others
                _test_hook_phase("save", run.iteration)
                last_saved = save_checkpoint(
                    cfg.save, run.iteration, run.model, run.optimizer, run.scheduler,
                    run.controller, run.consumed_train_samples, cfg, config_yaml,
                    extra_common={"padded_vocab_size": run.vocab_size,
                                  "skipped_steps": run.skipped_steps,
                                  # skipped for the grace period: the resumed run does it first
                                  "eval_pending": preempted and eval_due},
                    log=logger.console)
                logger.console(f"checkpoint: saved {last_saved}")
                _test_hook_phase("saved", run.iteration)
            if stop:
                if exit_reason == "exit_interval":
                    logger.console(f"exit: iteration {run.iteration} is a multiple of "
                                   "--exit-interval")
                elif not cfg.save:
                    logger.console("exit: no --save directory, nothing saved")
                break

        if exit_reason in (None, "exit_interval") and valid_sets and \
                last_eval.get("eval_iteration") != run.iteration:
            last_eval = evaluate(run, valid_sets, weights)
            last_eval["eval_iteration"] = run.iteration
            logger.log(run.iteration, last_eval, split="valid")
            logger.console(_format_eval(run.iteration, last_eval))
        summary = _summary(run, history, last_eval, last_saved, step_times,
                           time.time() - wall_start)
        summary.update(exit_reason=exit_reason or "train_iters", skipped_steps=run.skipped_steps)
        if is_rank0() and cfg.metrics_file:
            path = os.path.join(os.path.dirname(os.path.abspath(cfg.metrics_file)),
                                "summary.json")
            with open(path, "w", encoding="utf-8") as fh:
                json.dump(summary, fh, indent=2)
    except (ConfigError, NonFiniteError, CheckpointSaveError):
        raise
    except Exception as e:  # noqa: BLE001 -- a collective failed: a peer died or hangs
        if not is_collective_failure(e):
            raise
        raise collective_failure(e, f"at iteration {run.iteration + 1}",
                                 last_saved or run.loaded_from,
                                 f"--load {cfg.save or cfg.load}" if cfg.save or cfg.load
                                 else "a --save directory", cfg.distributed_timeout_minutes
                                 ) from None
    finally:
        logger.close()
    _test_hook_phase("done", run.iteration)
    return summary


_PHASE_FILE = os.environ.get("REMOE_TEST_HOOK_PHASE_FILE")


def _test_hook_phase(phase: str, iteration: int) -> None:
    """TEST ONLY. REMOE_TEST_HOOK_PHASE_FILE=path: rank 0 writes what it is doing ('step N',
    'microbatch K N', 'eval N', 'save N', 'saved N', 'done N') there, so that the chaos harness
    (tools/chaos_resume.py) can kill the run during a save, an evaluation or a step."""
    if _PHASE_FILE and is_rank0():
        with open(_PHASE_FILE, "w", encoding="utf-8") as fh:
            fh.write(f"{phase} {iteration}\n")


def _test_hook_phases(iterator, run: Run):
    """TEST ONLY (see _test_hook_phase): 'microbatch K N' before each training micro-batch."""
    if not _PHASE_FILE:
        return iterator

    def phases():
        count = 0
        for item in iterator:
            _test_hook_phase(f"microbatch {count % run.num_micro_batches}", run.iteration + 1)
            count += 1
            yield item

    return phases()


def _apply_nan_policy(run: Run, metrics: dict, last_saved) -> None:
    """--nan-policy for a step whose loss or gradients were non-finite on some rank (every rank
    calls this together): count it as skipped, or raise NonFiniteError (nothing is saved)."""
    cfg = run.cfg
    step = run.iteration + 1
    applied = not metrics.get("update_skipped")  # grad norm overflow found after the update
    if cfg.nan_policy == "skip-step" and not applied and \
            run.skipped_steps < cfg.max_skipped_steps:
        run.skipped_steps += 1
        _print0(f"warning: non-finite loss or gradient at iteration {step} (lm_loss "
                f"{metrics['lm_loss']:.4g}); step skipped (no update), {run.skipped_steps} of at "
                f"most {cfg.max_skipped_steps} skipped (--max-skipped-steps)")
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


def _format_eval(iteration: int, ev: dict) -> str:
    parts = [f"[eval @ {iteration}] valid loss {ev['valid/loss']:.4f} (ppl {ev['valid/ppl']:.1f})"]
    parts += [f"{k.split('/')[1]} {v:.3f}" for k, v in ev.items()
              if k.startswith("valid/") and k.endswith("/loss") and k != "valid/loss"]
    return " | ".join(parts)


def _summary(run: Run, history: list, last_eval: dict, last_saved, step_times: list,
             wall_s: float) -> dict:
    cfg = run.cfg
    steady = step_times[1:] or step_times  # the first step includes one-off warm-up work
    s_per_step = sum(steady) / len(steady) if steady else float("nan")
    last = history[-1] if history else {}
    out = {"router": cfg.router, "iterations": run.iteration,
           "steps_this_run": len(history), "resumed_from": run.loaded_from,
           "final_train_loss": last.get("lm_loss"),
           "train_loss_first": history[0]["lm_loss"] if history else None,
           "s_per_step": s_per_step,
           "tokens_per_s": cfg.global_batch_size * cfg.seq_length / s_per_step if steady else None,
           "wall_s": wall_s, "params": run.params,
           "memory_gb": last.get("memory_gb"),
           "checkpoint": last_saved, "metrics_file": cfg.metrics_file}
    out.update({k: v for k, v in last_eval.items()})
    if run.controller is not None and history:
        tail = [h["moe_relu_sparsity"] for h in history[-10:] if "moe_relu_sparsity" in h]
        out.update(final_sparsity=last.get("moe_relu_sparsity"),
                   sparsity_last10=sum(tail) / len(tail) if tail else None,
                   sparsity_first=history[0].get("moe_relu_sparsity"),
                   target_sparsity=run.tcfg.target_sparsity,
                   final_lambda=float(run.controller.l1_coeff))
    if "load_balancing_loss" in last:
        out["final_load_balancing_loss"] = last["load_balancing_loss"]
    return out
