"""The pretraining loop: megatron-core GPT with ReMoE routers, on CPU (gloo) or GPUs (NCCL).

Read `TrainLoop.train` first; it is the whole loop:

    for each step: train_step (step.py) -> --nan-policy (nonfinite.py) -> log
                   -> stop decision (signal, wall-clock budget, --exit-interval)
                   -> evaluation (every --eval-interval) -> checkpoint (every --save-interval)

The run state (model, optimizer, controller, tokenizer, counters) is built once by `setup`
(state.py); the loop's own state (what the summary reads of the steps, last evaluation, last
checkpoint) is `TrainLoop`'s; it stays the same size however long the run.
Fault-injection hooks for the reliability tests are read once, in fault_injection.py.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron.remoe.compat import clear_moe_metrics
from megatron.remoe.errors import ConfigError
from megatron.remoe.logs import fallback_note, get_logger, info0, is_rank0
from megatron.remoe.routing_stats import RoutingWindow
from megatron.remoe.training.arguments import config_to_yaml
from megatron.remoe.training.checkpointing import CheckpointSaveError, save_checkpoint
from megatron.remoe.training.config import TrainConfig
from megatron.remoe.training.data import build_datasets, make_loader
from megatron.remoe.training.distributed import collective_failure, is_collective_failure
from megatron.remoe.training.metrics import MetricsLogger, format_train_line, memory_gb
from megatron.remoe.training.nonfinite import NonFiniteError, apply_nan_policy
from megatron.remoe.training.run_lock import RunLock
from megatron.remoe.training.signals import ExitSignalHandler
from megatron.remoe.training.state import Run, setup
from megatron.remoe.training.step import StepResult, StopVote, forward_backward, reduce_lm_loss, train_step

log = get_logger(__name__)


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
                losses = forward_backward(
                    run, iterators if len(iterators) > 1 else iterators[0], forward_only=True)
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


@dataclass(frozen=True)
class LoopParts:
    """What the loop calls to build the run, take a step and evaluate: the trainer's own functions
    by default. A caller that observes a run (the parity harness records every step) passes
    wrappers of them here."""

    setup: Callable[[TrainConfig], Run] = setup
    train_step: Callable[..., StepResult] = train_step
    evaluate: Callable[[Run, dict, dict], dict] = evaluate


# ------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------
def pretrain(cfg: TrainConfig, parts: LoopParts = LoopParts()) -> dict:
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
        return _pretrain(cfg, wall_start, handler, parts)
    finally:
        if handler is not None:
            handler.restore()


def _pretrain(cfg: TrainConfig, wall_start: float, handler, parts: LoopParts) -> dict:
    run = parts.setup(cfg)
    if is_rank0():
        _print_run(run)
    train_ds, valid_sets, weights = build_datasets(cfg, run.tokenizer)
    if not valid_sets and cfg.eval_iters > 0:
        info0(log, "evaluation: off (no --valid-data-path and no --split)")
    lock = _take_run_lock(cfg)  # the first write into --save happens after this
    try:
        loop = TrainLoop(run, wall_start, handler, lock, valid_sets, weights, parts)
        return loop.run_guarded(train_ds)
    finally:
        if lock is not None:
            lock.release()


def _print_run(run: Run) -> None:
    """Rank 0's opening lines: the effective config, the model and the parallel layout."""
    cfg, p = run.cfg, run.params
    log.info("effective config:\n" + config_to_yaml(cfg))
    log.info(f"model: {cfg.router} router, {p['total'] / 1e6:.2f}M parameters, "
             f"{p['active'] / 1e6:.2f}M active per token; world {dist.get_world_size()} = "
             f"TP{cfg.tensor_model_parallel_size} x PP{cfg.pipeline_model_parallel_size} x "
             f"CP{cfg.context_parallel_size} x DP{run.dp_size} (EP"
             f"{cfg.expert_model_parallel_size}); {run.num_micro_batches} micro-batches of "
             f"{cfg.micro_batch_size} per step; device {run.device}"
             + (" (freed tensor memory kept across steps; REMOE_KEEP_CPU_ALLOCATIONS=0 "
                "turns it off)" if run.cpu_allocations_kept else ""))
    note = fallback_note()
    if note:
        log.info(note)


def _take_run_lock(cfg: TrainConfig) -> Optional[RunLock]:
    """Rank 0 takes the --save directory's lock; every rank raises ConfigError if it could not."""
    lock, error = None, None
    if cfg.save and is_rank0():
        try:
            lock = RunLock(cfg.save).acquire()
        except ConfigError as e:
            error = str(e)
    if dist.get_world_size() > 1:
        shared = [error]
        dist.broadcast_object_list(shared, src=0)
        error = shared[0]
    if error:
        raise ConfigError(error)
    return lock


# ------------------------------------------------------------------------------------------------
# The loop
# ------------------------------------------------------------------------------------------------
class TrainLoop:
    """The outer loop and the state it carries between steps; `train` reads top to bottom."""

    def __init__(self, run: Run, wall_start: float, handler, lock, valid_sets: dict, weights,
                 parts: LoopParts = LoopParts()):
        cfg = run.cfg
        self.run, self.cfg, self.hooks, self.parts = run, cfg, run.hooks, parts
        self.wall_start, self.handler, self.lock = wall_start, handler, lock
        self.valid_sets, self.weights = valid_sets, weights
        self.logger = MetricsLogger(is_rank0(), cfg.metrics_file, cfg.tensorboard_dir,
                                    cfg.wandb_project, cfg.wandb_exp_name, cfg.wandb_save_dir,
                                    config=cfg.to_dict(),
                                    resume_iteration=run.iteration if cfg.load else None)
        self.window = RoutingWindow()  # routing over the log interval (dead experts)
        self.history = StepHistory(cfg.log_interval)  # what the summary reads of the steps
        self.last_eval: dict = {}
        self.last_saved: Optional[str] = None
        self.exit_reason: Optional[str] = None  # why the loop stopped before train_iters
        self.config_yaml = config_to_yaml(cfg)
        # lambda when this run's first step starts (lambda_0, or the resumed checkpoint's)
        self.start_lambda = float(run.controller.l1_coeff) if run.controller is not None else None

    def run_guarded(self, train_ds) -> dict:
        """`train`, with a failed collective (a peer died or hangs) turned into one clear error."""
        run, cfg = self.run, self.cfg
        try:
            summary = self.train(self.data_iterator(train_ds))
        except (ConfigError, NonFiniteError, CheckpointSaveError):
            raise
        except Exception as e:  # noqa: BLE001 -- a collective failed: a peer died or hangs
            if not is_collective_failure(e):
                raise
            raise collective_failure(e, f"at iteration {run.iteration + 1}",
                                     self.last_saved or run.loaded_from,
                                     f"--load {cfg.save or cfg.load}" if cfg.save or cfg.load
                                     else "a --save directory", cfg.distributed_timeout_minutes
                                     ) from None
        finally:
            self.logger.close()
        self.hooks.phase("done", run.iteration)
        return summary

    def train(self, data_iterator) -> dict:
        run, cfg = self.run, self.cfg
        if run.eval_pending and self.valid_sets:  # so the metrics match an uninterrupted run
            self.evaluate()
        while run.iteration < cfg.train_iters:
            result, seconds = self.timed_step(data_iterator)
            if result.stop.lock_lost:  # another run took --save over: write nothing more
                self.give_up_save_dir()
            if result.nonfinite:
                apply_nan_policy(run, result.metrics, self.last_saved)
            run.iteration += 1
            run.consumed_train_samples += cfg.global_batch_size
            self.log_step(result, seconds)
            self.exit_reason = self.preemption(result.stop)
            preempted = self.exit_reason is not None
            eval_due = bool(self.valid_sets and cfg.eval_interval and
                            run.iteration % cfg.eval_interval == 0)
            if not preempted and eval_due:
                self.evaluate()
            if not preempted and cfg.exit_interval and run.iteration % cfg.exit_interval == 0:
                self.exit_reason = "exit_interval"
            stop = self.exit_reason is not None
            if self.save_due(stop):
                # skipped for the grace period: the resumed run evaluates first
                self.save(eval_pending=preempted and eval_due)
            if stop:
                self.say_why_stopped()
                break
        if self.exit_reason in (None, "exit_interval") and self.valid_sets and \
                self.last_eval.get("eval_iteration") != run.iteration:
            self.evaluate(phase=False)
        return self.write_summary()

    # ---- the steps of `train` ----------------------------------------------------------------
    def data_iterator(self, train_ds):
        run, cfg = self.run, self.cfg
        total_samples = cfg.train_iters * cfg.global_batch_size
        loaders = [make_loader(train_ds, run.consumed_train_samples, total_samples, cfg,
                               run.dp_rank, run.dp_size) for _ in run.model]
        iterators = [self.hooks.micro_batch_phases(iter(loader), run) for loader in loaders]
        return iterators if len(iterators) > 1 else iterators[0]

    def local_stop_flags(self) -> list:
        """Local reasons to stop now (agreed over ranks in the step): the signal number received,
        the wall-clock budget used up, the --save lock lost (seen by its heartbeat thread)."""
        handler, budget = self.handler, self.cfg.exit_duration_in_mins
        signum = float(signal.Signals[handler.received]) if handler and handler.pending else 0.0
        return [signum, float(bool(budget) and time.time() - self.wall_start > 60.0 * budget),
                float(self.lock is not None and self.lock.lost is not None)]

    def timed_step(self, data_iterator) -> tuple:
        self.hooks.phase("step", self.run.iteration + 1)
        t0 = time.perf_counter()
        result = self.parts.train_step(self.run, data_iterator, self.local_stop_flags)
        if self.run.device.type == "cuda":
            torch.cuda.synchronize()
        self.hooks.after_step()
        return result, time.perf_counter() - t0

    def give_up_save_dir(self) -> None:
        if self.lock is not None:
            self.lock.check()  # rank 0 raises with the details
        raise ConfigError(f"save={self.cfg.save}: this run lost its lock (see rank 0)")

    def log_step(self, result: StepResult, seconds: float) -> None:
        run, cfg, metrics = self.run, self.cfg, result.metrics
        self.window.add(result.routing)
        metrics.update(step_time_s=seconds, tokens_per_s=cfg.global_batch_size * cfg.seq_length
                       / seconds, consumed_samples=run.consumed_train_samples,
                       consumed_tokens=run.consumed_train_samples * cfg.seq_length,
                       memory_gb=memory_gb(run.device))
        if result.nonfinite:
            metrics["skipped_steps"] = run.skipped_steps
        self.history.add(metrics, seconds)
        if run.iteration % cfg.log_interval == 0 or run.iteration == cfg.train_iters:
            metrics.update(self.window.as_dict())  # dead experts over the log window
            self.window.reset()
            recent = self.history.recent_times
            eta = (cfg.train_iters - run.iteration) * sum(recent) / len(recent)
            target = run.tcfg.target_sparsity if run.controller is not None else None
            info0(log, format_train_line(run.iteration, cfg.train_iters, metrics, target, eta))
        self.logger.log(run.iteration, metrics)

    def preemption(self, stop: StopVote) -> Optional[str]:
        """The exit reason when a signal or the wall-clock budget says stop (after saving)."""
        iteration = self.run.iteration
        if stop.signum:
            reason = signal.Signals(stop.signum).name
            where = "" if self.handler and self.handler.received == reason else \
                " (on another rank)"
            info0(log, f"exit: {reason} received{where}; saving and stopping after "
                       f"iteration {iteration}")
            return reason
        if stop.time_up:
            info0(log, f"exit: --exit-duration-in-mins {self.cfg.exit_duration_in_mins} "
                       f"reached after iteration {iteration}")
            return "exit_duration_in_mins"
        return None

    def evaluate(self, phase: bool = True) -> None:
        iteration = self.run.iteration
        if phase:
            self.hooks.phase("eval", iteration)
        self.last_eval = self.parts.evaluate(self.run, self.valid_sets, self.weights)
        self.last_eval["eval_iteration"] = iteration
        self.logger.log(iteration, self.last_eval, split="valid")
        info0(log, _format_eval(iteration, self.last_eval))

    def save_due(self, stop: bool) -> bool:
        cfg, iteration = self.cfg, self.run.iteration
        return bool(cfg.save) and bool((cfg.save_interval and iteration % cfg.save_interval == 0)
                                       or iteration == cfg.train_iters or stop)

    def save(self, eval_pending: bool) -> None:
        run, cfg = self.run, self.cfg
        if self.lock is not None:
            self.lock.check()  # rank 0 only: the heartbeat flag in the step covers the others
        self.hooks.phase("save", run.iteration)
        self.last_saved = save_checkpoint(
            cfg.save, run.iteration, run.model, run.optimizer, run.scheduler,
            run.consumed_train_samples, cfg, self.config_yaml,
            extra_common={"padded_vocab_size": run.vocab_size, "skipped_steps": run.skipped_steps,
                          "eval_pending": eval_pending})
        info0(log, f"checkpoint: saved {self.last_saved}")
        self.hooks.phase("saved", run.iteration)

    def say_why_stopped(self) -> None:
        if self.exit_reason == "exit_interval":
            info0(log, f"exit: iteration {self.run.iteration} is a multiple of --exit-interval")
        elif not self.cfg.save:
            info0(log, "exit: no --save directory, nothing saved")

    def write_summary(self) -> dict:
        """The run summary; rank 0 also writes it as summary.json next to the metrics file."""
        run, cfg = self.run, self.cfg
        summary = summarize_run(run, self.history, self.last_eval, self.last_saved,
                                time.time() - self.wall_start)
        summary.update(exit_reason=self.exit_reason or "train_iters",
                       skipped_steps=run.skipped_steps)
        if "final_lambda" in summary:
            summary["start_lambda"] = self.start_lambda
        if is_rank0() and cfg.metrics_file:
            path = os.path.join(os.path.dirname(os.path.abspath(cfg.metrics_file)),
                                "summary.json")
            with open(path, "w", encoding="utf-8") as fh:
                json.dump(summary, fh, indent=2)
        return summary


def _format_eval(iteration: int, ev: dict) -> str:
    parts = [f"[eval @ {iteration}] valid loss {ev['valid/loss']:.4f} (ppl {ev['valid/ppl']:.1f})"]
    parts += [f"{k.split('/')[1]} {v:.3f}" for k, v in ev.items()
              if k.startswith("valid/") and k.endswith("/loss") and k != "valid/loss"]
    return " | ".join(parts)


class StepHistory:
    """What the run summary reads of this run's steps, in constant memory: the first and the last
    step's metrics, the last SPARSITY_TAIL steps' sparsities, step-time totals (the first step
    apart: it includes one-off warm-up work) and the last `log_interval` step times (the ETA)."""

    SPARSITY_TAIL = 10

    def __init__(self, log_interval: int):
        self.steps = 0
        self.first: dict = {}
        self.last: dict = {}
        self.sparsity_tail = deque(maxlen=self.SPARSITY_TAIL)  # None: a step without routing
        self.first_time = 0.0
        self.steady_time, self.steady_steps = 0.0, 0  # the steps after the first
        self.recent_times = deque(maxlen=max(1, log_interval))

    def add(self, metrics: dict, seconds: float) -> None:
        if not self.steps:
            self.first, self.first_time = metrics, seconds
        else:
            self.steady_time += seconds
            self.steady_steps += 1
        self.steps += 1
        self.last = metrics
        self.sparsity_tail.append(metrics.get("moe_relu_sparsity"))
        self.recent_times.append(seconds)

    def s_per_step(self) -> float:
        if self.steady_steps:
            return self.steady_time / self.steady_steps
        return self.first_time if self.steps else float("nan")


def summarize_run(run: Run, history: StepHistory, last_eval: dict, last_saved,
                  wall_s: float) -> dict:
    """The run summary (summary.json) from what `history` kept of this run's steps."""
    cfg = run.cfg
    s_per_step = history.s_per_step()
    last = history.last
    out = {"router": cfg.router, "iterations": run.iteration,
           "steps_this_run": history.steps, "resumed_from": run.loaded_from,
           "final_train_loss": last.get("lm_loss"),
           "train_loss_first": history.first["lm_loss"] if history.steps else None,
           "s_per_step": s_per_step,
           "tokens_per_s": cfg.global_batch_size * cfg.seq_length / s_per_step
           if history.steps else None,
           "wall_s": wall_s, "params": run.params,
           "memory_gb": last.get("memory_gb"),
           "checkpoint": last_saved, "metrics_file": cfg.metrics_file}
    out.update({k: v for k, v in last_eval.items()})
    if run.controller is not None and history.steps:
        tail = [s for s in history.sparsity_tail if s is not None]
        out.update(final_sparsity=last.get("moe_relu_sparsity"),
                   sparsity_last10=sum(tail) / len(tail) if tail else None,
                   sparsity_first=history.first.get("moe_relu_sparsity"),
                   target_sparsity=run.tcfg.target_sparsity,
                   final_lambda=float(run.controller.l1_coeff))
    if "load_balancing_loss" in last:
        out["final_load_balancing_loss"] = last["load_balancing_loss"]
    return out
