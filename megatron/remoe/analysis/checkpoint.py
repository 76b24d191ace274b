"""The analysis' checkpoint front end: the offline loader (training.checkpointing.offline) with
the analysis' rules (dense models have no routing to analyse) and error type."""

from __future__ import annotations

from typing import Optional

from megatron.remoe.analysis.errors import AnalysisError
from megatron.remoe.logs import get_logger
from megatron.remoe.training.checkpointing import read_checkpoint_config, resolve_checkpoint
from megatron.remoe.training.checkpointing.offline import (
    CheckpointLoadError,
    load_offline_model,
    run_tokenizer,
)

logger = get_logger(__name__)


def load_analysis_tokenizer(cfg, override: Optional[str] = None):
    """The tokenizer of a run (its config's `tokenizer`), or None for mock-data runs."""
    try:
        return run_tokenizer(cfg, override)
    except CheckpointLoadError as e:
        raise AnalysisError(str(e)) from None


def load_checkpoint_model(path: str, tokenizer=None):
    """The checkpoint's model as a single-process fp32 model (TP=PP=EP=CP=1, no DDP, eval mode),
    whatever parallel layout it was saved in. Needs `init_distributed(ParallelConfig())` first.
    Returns (model, TrainConfig, info)."""
    path = resolve_checkpoint(path)
    cfg, _ = read_checkpoint_config(path)
    if not cfg.moe:  # refused before any weight is read
        raise AnalysisError(f"checkpoint {path} is a dense model (router=dense): no routing to "
                            "analyse")
    try:
        ckpt = load_offline_model(path, tokenizer=tokenizer)
    except CheckpointLoadError as e:
        raise AnalysisError(str(e)) from None
    info = {"checkpoint": path, "iteration": ckpt.iteration, "saved_layout": ckpt.saved_layout,
            "router": cfg.router, "bf16_saved": cfg.bf16}
    logger.info(f"analyze: loaded {path} ({cfg.router}, {cfg.num_layers} layers, E={cfg.num_experts}, "
                f"iteration {ckpt.iteration}, saved layout {ckpt.layout_text()}) in "
                f"{ckpt.seconds:.1f} s")
    return ckpt.model, ckpt.cfg, info
