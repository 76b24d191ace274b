"""Metrics sinks: JSONL (one JSON object per step, every key), TensorBoard, W&B; and the console
lines the loop logs (`format_train_line`).

Only rank 0 writes; the trainer reduces everything it logs to rank 0 first. Keys (see
docs/training.md): `lm_loss`, `lr`, `grad_norm`, `tokens_per_s`, `step_time_s`, `memory_gb`, the
ReMoE keys of `RoutingStats.as_dict()` (`moe_relu_sparsity`, `moe_relu_l1_reg_coeff`,
`l1_reg_loss`, `moe/layer_{n}/...`), `load_balancing_loss` for TopK, and `valid/...` for evaluations.

Across resumes the JSONL file stays one consistent history: a run started with --load that begins
at iteration N (the checkpoint it resumed from; 0 when there was none yet) first rewrites the file
without the records of iterations > N (the steps it replays; a crash left them behind) and without
a half-written last line (a kill in the middle of a write), atomically (temporary file + rename); records of
iterations <= N that it would write again (an evaluation at N) are not repeated. A crash therefore
never leaves duplicated or broken lines once the next run has started. Without --load the file
is appended to as before (it may be shared by several runs on purpose).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import time
from typing import Optional

import psutil
import torch

from megatron.remoe.errors import ConfigError
from megatron.remoe.logs import get_logger

log = get_logger(__name__)


def check_logging_backends(tensorboard_dir: Optional[str], wandb_project: Optional[str]) -> None:
    """Fail at start (not after an hour of training) when a requested backend is missing."""
    if tensorboard_dir and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("--tensorboard-dir needs the tensorboard package; pip install "
                          "tensorboard (or the [logging] extra), or drop the flag")
    if wandb_project and importlib.util.find_spec("wandb") is None:
        raise ConfigError("--wandb-project needs the wandb package; pip install wandb (or the "
                          "[logging] extra), or drop the flag")


def _jsonable(value):
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf
    return value


class MetricsLogger:
    def __init__(self, enabled: bool, metrics_file: Optional[str] = None,
                 tensorboard_dir: Optional[str] = None, wandb_project: Optional[str] = None,
                 wandb_exp_name: Optional[str] = None, wandb_save_dir: Optional[str] = None,
                 config: Optional[dict] = None, resume_iteration: Optional[int] = None):
        self.enabled = enabled
        self.jsonl = self.tb = self.wandb = None
        self.kept: set = set()  # (split, iteration) already on file from earlier runs
        if not enabled:
            return
        if metrics_file:
            os.makedirs(os.path.dirname(os.path.abspath(metrics_file)), exist_ok=True)
            if resume_iteration is not None:
                self.kept = truncate_metrics(metrics_file, resume_iteration)
            # append: a resumed run continues the same file
            self.jsonl = open(metrics_file, "a", encoding="utf-8")
        if tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415 -- optional extra (logging)

            self.tb = SummaryWriter(log_dir=tensorboard_dir)
        if wandb_project:
            import wandb  # noqa: PLC0415 -- optional extra (logging)

            self.wandb = wandb.init(project=wandb_project, name=wandb_exp_name,
                                    dir=wandb_save_dir, config=config, resume="allow")

    def log(self, iteration: int, metrics: dict, split: str = "train") -> None:
        """One record: JSONL line + TensorBoard scalars + W&B row."""
        if not self.enabled:
            return
        record = {"iteration": iteration, "split": split, "time": round(time.time(), 3)}
        record.update({k: _jsonable(v) for k, v in metrics.items()})
        if self.jsonl and (split, iteration) not in self.kept:
            self.jsonl.write(json.dumps(record) + "\n")  # one write per line, flushed at once
            self.jsonl.flush()
        scalars = {k: v for k, v in record.items()
                   if isinstance(v, (int, float)) and k not in ("iteration", "time")}
        if self.tb:
            for key, value in scalars.items():  # valid keys already start with "valid/"
                self.tb.add_scalar(key, value, iteration)
        if self.wandb:
            self.wandb.log(scalars, step=iteration)

    def close(self) -> None:
        if self.jsonl:
            self.jsonl.close()
        if self.tb:
            self.tb.close()
        if self.wandb:
            self.wandb.finish()


def truncate_metrics(path: str, resume_iteration: int) -> set:
    """Make the JSONL file at `path` the history of iterations <= `resume_iteration`: drop later
    records and a half-written last line (atomic rewrite, only when something must go). Returns
    the (split, iteration) pairs kept."""
    if not os.path.isfile(path):
        return set()
    with open(path, "rb") as fh:
        data = fh.read()
    kept_lines, kept, dropped, broken = [], set(), 0, 0
    for line in data.split(b"\n"):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            iteration, split = int(record["iteration"]), record.get("split", "train")
        except (ValueError, KeyError, TypeError):
            broken += 1  # a line cut by a kill (only the last one can be)
            continue
        if iteration > resume_iteration:
            dropped += 1
            continue
        kept_lines.append(line)
        kept.add((split, iteration))
    if dropped or broken or (data and not data.endswith(b"\n")):
        tmp = path + ".tmp"
        with open(tmp, "wb") as fh:
            fh.write(b"".join(line + b"\n" for line in kept_lines))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        log.info(f"metrics: {path}: dropped {dropped} record(s) after iteration {resume_iteration} "
                 f"(replayed by this run)" + (f" and {broken} half-written line(s)" if broken else ""))
    return kept


def format_train_line(it: int, total: int, m: dict, target_sparsity: Optional[float],
                      eta_s: Optional[float]) -> str:
    """`[  120/1000  12%] loss 5.123 | lr 4.9e-04 | gnorm 0.85 | sparsity 0.81->0.875 | ...`"""
    width = len(str(total))
    parts = [f"[{it:>{width}}/{total} {100.0 * it / total:5.1f}%] loss {m['lm_loss']:.4f}",
             f"lr {m['lr']:.2e}", f"gnorm {m['grad_norm']:.3f}"]
    if "moe_relu_sparsity" in m:
        parts.append(f"sparsity {m['moe_relu_sparsity']:.3f}/{target_sparsity:.3f}")
        parts.append(f"lambda {m['moe_relu_l1_reg_coeff']:.2e}")
    if "load_balancing_loss" in m:
        parts.append(f"aux {m['load_balancing_loss']:.4f}")
    parts.append(f"{m['tokens_per_s']:,.0f} tok/s")
    parts.append(f"{m['step_time_s']:.3f} s/it")
    parts.append(f"mem {m['memory_gb']:.2f} GB")
    if eta_s is not None:
        parts.append(f"eta {format_duration(eta_s)}")
    return " | ".join(parts)


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def memory_gb(device) -> float:
    """Peak CUDA memory on GPU; resident set size of this process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30

    return psutil.Process().memory_info().rss / 2**30
