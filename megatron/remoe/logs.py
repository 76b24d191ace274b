"""One logging configuration for the library and its tools.

As a library, megatron.remoe only logs: importing any of its modules installs no handler outside
its own `megatron.remoe` logger (a `NullHandler`, megatron/remoe/__init__.py) and no warning
filter, so an application's (or another trainer's) logging and warnings stay as it configured
them; records propagate to its handlers.

The project's entry points (`remoe`, `python -m megatron.remoe.pretrain`, tools/, bench/) call
`configure()` first: progress lines are their user interface (`remoe demo`, `convert`, `dial`,
`ablate`), so the handler writes the bare message to stdout, as `print` did; data preparation writes
to stderr so that tools which print results on stdout stay pipeable; the known megatron-core / torch
noise is filtered (log_filters.py). Multi-rank code logs on rank 0 only (`info0`). Set
REMOE_LOG_LEVEL=WARNING (or DEBUG) to change how much is shown.
"""
import logging
import os
import sys
from contextlib import contextmanager

from megatron.remoe import log_filters

_ROOT = "megatron.remoe"
_STDERR = ("megatron.remoe.data",)  # loggers under these names write to stderr
_configured = False


class _StreamHandler(logging.StreamHandler):
    """Resolves sys.stdout/sys.stderr at emit time so pytest's capture and redirects still work."""

    def __init__(self, stream_name: str):
        super().__init__()
        self.stream_name = stream_name

    def emit(self, record):
        self.stream = getattr(sys, self.stream_name)
        super().emit(record)
        self.flush()


def configure() -> None:
    """The entry points' console (idempotent): bare-message handlers on stdout (stderr for data
    preparation) and the known-noise filters. Call it before importing megatron-core, which warns
    at import."""
    global _configured
    log_filters.install()
    if _configured:
        return
    level = os.environ.get("REMOE_LOG_LEVEL", "INFO").upper()
    for name, stream in [(_ROOT, "stdout")] + [(n, "stderr") for n in _STDERR]:
        logger = logging.getLogger(name)
        handler = _StreamHandler(stream)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(level)
        logger.propagate = False  # each message prints once, whatever else the process configures
    _configured = True


def get_logger(name: str) -> logging.Logger:
    """`get_logger(__name__)` in every module of megatron.remoe (tools pass 'megatron.remoe.<tool>')."""
    return logging.getLogger(name)


@contextmanager
def quiet(name: str = _ROOT):
    """Drop the INFO/DEBUG records of logger `name` and of its children (those without a level of
    their own) while inside; warnings still show. For a step repeated many times whose progress
    lines were shown once or would drown the rest (the compute dial's forward passes, its reloads
    of one checkpoint). Not thread-safe: it sets the logger's level for the whole process."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(max(logging.WARNING, logger.getEffectiveLevel()))
    try:
        yield
    finally:
        logger.setLevel(level)


def is_rank0() -> bool:
    """True on rank 0 of the default process group, or when there is no process group."""
    import torch.distributed as dist  # noqa: PLC0415 -- torch is heavy; logs.py is imported by the CLI

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def info0(logger: logging.Logger, message: str) -> None:
    """Log on rank 0 only (the trainer's progress lines)."""
    if is_rank0():
        logger.info(message)
