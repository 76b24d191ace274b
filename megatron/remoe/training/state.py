"""The run state: everything the training loop needs, built once by `setup`.

`setup` loads the tokenizer (once: the data sets are built from `Run.tokenizer`), checks a resume
target and the --save lock before any process group exists, initialises the process groups (which
also seeds every RNG, distributed.seed_everything), builds the model, optimizer, schedule and the
sparsity controller, and resumes from --load (falling back over corrupt checkpoints).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.module import Float16Module

from megatron.remoe.cpu.settings import keep_cpu_allocations, use_fused_cpu_adam
from megatron.remoe.data.errors import DataError
from megatron.remoe.errors import ConfigError
from megatron.remoe.integration import attach, controller_for
from megatron.remoe.logs import get_logger, info0
from megatron.remoe.model import build_gpt_model, count_parameters
from megatron.remoe.training.checkpointing import (
    check_checkpoint_matches,
    check_writer_version,
    checkpoint_candidates,
    find_loadable_checkpoint,
    load_checkpoint,
)
from megatron.remoe.training.config import TrainConfig, num_micro_batches, transformer_config
from megatron.remoe.training.data import (
    MockTokenizer,
    check_data_matches_tokenizer,
    load_run_tokenizer,
    padded_vocab_size,
)
from megatron.remoe.training.distributed import ParallelConfig, init_distributed
from megatron.remoe.training.fault_injection import TestHooks
from megatron.remoe.training.metrics import check_logging_backends
from megatron.remoe.training.run_lock import check_not_held

log = get_logger(__name__)


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
    vocab_size: int  # padded (a multiple of --make-vocab-size-divisible-by x TP)
    params: dict
    tokenizer: object = None  # loaded once by setup; the data sets are built from it
    cpu_allocations_kept: bool = False  # cpu_settings.keep_cpu_allocations took effect
    iteration: int = 0
    consumed_train_samples: int = 0
    loaded_from: Optional[str] = None
    skipped_steps: int = 0  # steps skipped for a non-finite loss/gradient (kept across resumes)
    eval_pending: bool = False  # the checkpoint was saved on a preemption before its evaluation
    hooks: TestHooks = field(default_factory=TestHooks.from_env)  # TEST ONLY fault injection


def build_model(cfg: TrainConfig, tcfg, vocab_size: int, controller, device) -> list:
    """GPT model chunk(s) of this pipeline rank, in bf16 if asked, wrapped in megatron DDP."""
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
    check_logging_backends(cfg.tensorboard_dir, cfg.wandb_project)
    tokenizer = _load_tokenizer(cfg)
    check_data_matches_tokenizer(cfg, tokenizer)
    vocab = padded_vocab_size(tokenizer.vocab_size, cfg)
    if cfg.load:  # a checkpoint of another model shape: say so before any process group exists
        _check_resume_target(cfg, vocab)
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
    # CPU: reuse freed tensor memory across steps (no per-step page faults)
    allocations_kept = device.type == "cpu" and keep_cpu_allocations()
    tcfg = transformer_config(cfg, use_cpu_initialization=device.type == "cpu")
    controller = controller_for(tcfg, device)
    model = build_model(cfg, tcfg, vocab, controller, device)
    optimizer, scheduler = build_optimizer(cfg, model)
    attach(model, optimizer)  # lambda moves in optimizer.step(), as in any other trainer
    _install_schedule_hooks(cfg, tcfg, model, optimizer)
    run = Run(cfg=cfg, tcfg=tcfg, device=device, model=model, optimizer=optimizer,
              scheduler=scheduler, controller=controller,
              forward_backward=get_forward_backward_func(),
              num_micro_batches=num_micro_batches(cfg, dist.get_world_size()),
              dp_rank=parallel_state.get_data_parallel_rank(),
              dp_size=parallel_state.get_data_parallel_world_size(), vocab_size=vocab,
              params=count_parameters(tcfg, vocab), tokenizer=tokenizer,
              cpu_allocations_kept=allocations_kept)
    if cfg.load:
        _resume(run)
    return run


def _install_schedule_hooks(cfg: TrainConfig, tcfg, model: list, optimizer) -> None:
    """The hooks megatron-core's pipeline schedules call (loss scaling, gradient reduction)."""
    tcfg.grad_scale_func = optimizer.scale_loss
    tcfg.finalize_model_grads_func = finalize_model_grads
    if cfg.overlap_grad_reduce:
        no_sync = [chunk.no_sync for chunk in model]
        tcfg.no_sync_func = no_sync[0] if len(model) == 1 else no_sync
        grad_sync = [chunk.start_grad_sync for chunk in model]
        tcfg.grad_sync_func = grad_sync[0] if len(model) == 1 else grad_sync


def _load_tokenizer(cfg: TrainConfig):
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
    candidates = checkpoint_candidates(cfg.load)
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
        from torch.distributed.checkpoint.api import CheckpointException  # noqa: PLC0415 -- guarded: not in every torch version
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
        path = find_loadable_checkpoint(cfg.load, checksums=cfg.checkpoint_checksums,
                                        skip=tuple(failed))
        if path is None:
            break
        error = None
        try:
            common = load_checkpoint(path, run.model, run.optimizer, run.scheduler,
                                     run.controller, cfg, vocab_size=run.vocab_size)
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
            info0(log, f"checkpoint: resumed from {path} (iteration {run.iteration}, "
                       f"{run.consumed_train_samples:,} samples consumed)")
            return
        info0(log, f"checkpoint: WARNING: loading {path} failed ({error}); falling back to "
                   "the previous checkpoint")
        failed.append(path)
    if checkpoint_candidates(cfg.load):
        raise ConfigError(f"--load {cfg.load}: no checkpoint there is loadable (see the warnings "
                          "above); fix: move the corrupt iter_* directories away or point --load "
                          "at another directory")
    info0(log, f"checkpoint: nothing to resume in {cfg.load}; starting from scratch")
