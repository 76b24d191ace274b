"""One logging configuration for the library and its tools.

As a library, megatron.remoe only logs: importing any of its modules installs no handler outside
its own `megatron.remoe` logger (a `NullHandler`, megatron/remoe/__init__.py) and no warning
filter, so an application's (or another trainer's) logging and warnings stay as it configured
them; records propagate to its handlers.

The project's entry points (`remoe`, `python -m megatron.remoe.pretrain`, tools/, bench/) call
`configure()` first: progress lines are their user interface (`remoe demo`, `convert`, `dial`,
`ablate`), so the handler writes the bare message to stdout, as `print` did; data preparation writes
to stderr so that tools which print results on stdout stay pipeable; the known megatron-core / torch
noise is filtered (below). Multi-rank code logs on rank 0 only (`info0`). Set
REMOE_LOG_LEVEL=WARNING (or DEBUG) to change how much is shown.

The known noise: a 3-step CPU run used to start with 14 warning lines, none of them actionable:
megatron-core warns from several modules at import that Transformer Engine / Apex are missing
(expected on CPU, where their kernels cannot run), newer releases log deprecations of APIs we use on
purpose, and the CUDA build of torch (the only torch 2.13 for Python 3.12 on the index) logs that it
finds no CUDA runtime. Only the exact messages in KNOWN_WARNINGS / KNOWN_LOG_RECORDS are dropped;
every other warning and log record still shows. On a GPU machine without Transformer Engine the
fallback is worth knowing: the trainer says it in one line (`fallback_note`). The filters are the
entry points' (`configure()`, before they import megatron-core), never an import's: inside someone
else's program they would hide their warnings. Stdlib only at import: importing this module must
not import torch.
"""
from __future__ import annotations

import logging
import os
import sys
import warnings
from contextlib import contextmanager
from typing import Optional

from megatron.remoe.compat import transformer_engine_usable  # stdlib-only at import, like this module

_ROOT = "megatron.remoe"
_STDERR = ("megatron.remoe.data",)  # loggers under these names write to stderr
_configured = False


# (message regex at the start of the warning, category): warnings.warn(...) at import time
KNOWN_WARNINGS = (
    # from megatron.core.optimizer(.optimizer, .clip_grads) and megatron_fsdp (0.16-0.19)
    (r"Transformer Engine and Apex are not installed", UserWarning),
    (r"Apex is not installed", UserWarning),
    (r"Transformer Engine is not installed", UserWarning),
    # 0.19: TransformerConfig's own default cuda_graph_modules="full" triggers its deprecation
    (r"full scope is deprecated", UserWarning),
)

# logger name -> message substrings of its records that are dropped
KNOWN_LOG_RECORDS = {
    # CUDA build of torch on a machine without CUDA; we build no C++/CUDA extensions
    "torch.utils.cpp_extension": ("No CUDA runtime is found",),
    # 0.19: GPTModel is frozen in favour of HybridModel; GPTModel is what we build, on purpose
    "megatron.core.models.gpt.gpt_model": ("GPTModel IS DEPRECATED",),
    # 0.19: logged by the synchronous torch_dist save path itself (we do not save asynchronously)
    "megatron.core.dist_checkpointing.strategies.torch": ("async save is deprecated",),
    # 0.19 reading a checkpoint written by 0.16-0.18 (common.pt layout), once per rank and load:
    # the supported upgrade path (docs/compat.md), nothing for the user to do
    "megatron.core.dist_checkpointing.strategies.common": ("load_common is deprecated",),
    # --mock-data without --data-cache-path: mock indexes are regenerated in moments, nothing is
    # lost (for a real GPTDataset the same warning stays: its indexes are worth caching)
    "megatron.core.datasets.gpt_dataset": ("Unable to save MockGPTDataset indexes",),
    # 0.18+: megatron-core's own local layer spec still gives dense MLPs as ModuleSpec
    "megatron.core.transformer.transformer_layer": ("Rewrapping ModuleSpec",),
}


class _DropKnown(logging.Filter):
    def __init__(self, needles):
        super().__init__()
        self.needles = tuple(needles)

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed record is not ours to judge
            return True
        return not any(needle in message for needle in self.needles)


_INSTALLED = False


def install_filters() -> None:
    """Drop the known noise (idempotent)."""
    global _INSTALLED
    if _INSTALLED:
        return
    for pattern, category in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern, category=category)
    for name, needles in KNOWN_LOG_RECORDS.items():
        logging.getLogger(name).addFilter(_DropKnown(needles))
    _INSTALLED = True


def fallback_note() -> Optional[str]:
    """One informational line when megatron-core runs its torch fallbacks on a GPU (Transformer
    Engine not usable); None on CPU, where the fallbacks are the only option."""
    import torch  # noqa: PLC0415 -- logs.py is imported by the CLI; torch is heavy

    if not torch.cuda.is_available() or transformer_engine_usable():
        return None
    return ("note: Transformer Engine is not usable here, so megatron-core runs its torch "
            "fallbacks (slower on GPUs); fix: pip install 'megatron-remoe[gpu]'")


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
    install_filters()
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
