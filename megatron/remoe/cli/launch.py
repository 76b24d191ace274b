"""Launching a training run from a tool: the `python -m megatron.remoe.pretrain --config FILE`
command (under torchrun for several processes) and running it with its output teed into a log.
Used by `remoe demo` and `remoe ablate`."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from typing import Callable, Optional

from megatron.remoe.logs import get_logger

log = get_logger(__name__)

# the checkout this module belongs to: a trainer started from any working directory imports it
CHECKOUT_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def training_command(config_path: str, nproc: int) -> list:
    """`python -m megatron.remoe.pretrain --config FILE` (under torchrun when nproc > 1)."""
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
               "--master-port", str(free_port()), "-m", "megatron.remoe.pretrain"]
    else:
        cmd = [sys.executable, "-m", "megatron.remoe.pretrain"]
    return cmd + ["--config", config_path]


def checkout_pythonpath() -> str:
    """PYTHONPATH with this checkout first (and the caller's PYTHONPATH after it)."""
    return os.pathsep.join(p for p in (CHECKOUT_ROOT, os.environ.get("PYTHONPATH")) if p)


def run_logged(cmd: list, log_path: str, nproc: int, echo: Optional[Callable[[str], bool]] = None,
               mode: str = "w", extra_env: Optional[dict] = None) -> int:
    """Run a training command, teeing its output into `log_path` and echoing the lines that
    `echo` accepts (default: progress, eval, checkpoint and error lines), indented; returns the
    exit code. OMP threads default to 1 per process under torchrun, all cores for one process."""
    echo = echo or progress_line
    env = dict(os.environ, **(extra_env or {}))
    env.setdefault("OMP_NUM_THREADS", "1" if nproc > 1 else str(os.cpu_count() or 1))
    env["PYTHONWARNINGS"] = "ignore"
    with open(log_path, mode, encoding="utf-8") as log_file:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=env, bufsize=1)
        for line in proc.stdout:
            log_file.write(line)
            log_file.flush()  # the log can be followed with tail -f
            if echo(line):
                log.info("  " + line.rstrip())
        return proc.wait()


def progress_line(line: str) -> bool:
    """The trainer's lines worth echoing: progress, model, checkpoint and error lines."""
    return line.startswith(("[", "model:", "checkpoint:", "error", "Traceback")) or \
        "Error" in line


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
