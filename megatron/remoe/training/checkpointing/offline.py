"""The one offline checkpoint loader: a trainer checkpoint -> the same model in this one CPU process.

Routing analysis (`analysis.checkpoint`), HF conversion and the compute dial (both through
`hf.to_hf.load_megatron_checkpoint`) and their tools all read checkpoints with
`load_offline_model`: it rebuilds the saved model as a single-process fp32 model (TP=PP=EP=CP=1,
local layers, no DDP) from the config stored in the checkpoint and lets dist_checkpointing
re-shard the weights of whatever layout was saved into it.
bf16 checkpoints are read into the fp32 model (exact: every bf16 value is an fp32 value); offline
work runs in fp32 because ReLU gates near zero flip sign in bf16.

Needs megatron-core's parallel state first (`init_distributed(ParallelConfig())`).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any, Optional

from megatron.core import dist_checkpointing, tensor_parallel

from megatron.remoe.data.tokenizer import load_tokenizer
from megatron.remoe.errors import ConfigError
from megatron.remoe.model import build_gpt_model
from megatron.remoe.training.checkpointing import (
    load_sharded,
    read_checkpoint_config,
    resolve_checkpoint,
    sharded_metadata,
    single_process_config,
)
from megatron.remoe.training.config import TrainConfig, transformer_config
from megatron.remoe.training.data import padded_vocab_size


class CheckpointLoadError(ConfigError):
    """The checkpoint cannot be rebuilt offline; the message is one line and names the fix.
    Front ends re-raise it as their own error type (AnalysisError, ConversionError)."""


@dataclass
class OfflineCheckpoint:
    """A checkpoint loaded for offline use."""

    model: Any  # megatron GPTModel, fp32, eval mode, on the CPU
    tcfg: Any  # its TransformerConfig (single-process layout, overrides applied)
    cfg: TrainConfig  # the training config stored in the checkpoint (as saved)
    path: str  # the iter_XXXXXXX directory read
    common: dict  # the checkpoint's common state (iteration, layout, controller, ...)
    tokenizer: Any  # the run's tokenizer (None for mock-data runs without one)
    vocab_size: int  # padded vocabulary of the training layout
    seconds: float = 0.0  # time to build and load the model

    @property
    def iteration(self) -> Optional[int]:
        return self.common.get("iteration")

    @property
    def saved_layout(self) -> dict:
        return self.common.get("layout") or {}

    def layout_text(self) -> str:
        """'TP2 PP1 EP2' of the saved layout, for progress lines."""
        lay = self.saved_layout
        return f"TP{lay.get('tp', '?')} PP{lay.get('pp', '?')} EP{lay.get('ep', '?')}"


def _one_line(error: BaseException, limit: int) -> str:
    return " ".join(str(error).split())[:limit]


def run_tokenizer(cfg: TrainConfig, override=None):
    """The tokenizer of a run: `override` (a name/directory, or an already loaded tokenizer), else
    the config's `tokenizer`; None for mock-data runs without one."""
    if override is not None and not isinstance(override, str):
        return override
    name = override or cfg.tokenizer
    if not name:
        return None
    try:
        return load_tokenizer(name)
    except Exception as e:  # noqa: BLE001 - any unreadable tokenizer is one line
        raise CheckpointLoadError(f"tokenizer {name}: {_one_line(e, 10_000)}") from None


def _model_vocab_size(path: str, cfg: TrainConfig, tokenizer) -> int:
    base_vocab = tokenizer.vocab_size if tokenizer is not None else cfg.vocab_size
    if not base_vocab:
        raise CheckpointLoadError(f"checkpoint {path}: unknown vocabulary size (no tokenizer in "
                                  "its config); pass --tokenizer")
    return padded_vocab_size(base_vocab, cfg)  # padding of the TRAINING layout (depends on TP)


def _build_model(path: str, cfg: TrainConfig, vocab: int, overrides: Optional[dict]):
    single = single_process_config(cfg)
    if overrides:
        single = dataclasses.replace(single, **overrides)
    try:
        tcfg = transformer_config(single, use_cpu_initialization=True)
    except Exception as e:  # noqa: BLE001
        raise CheckpointLoadError(f"{path}: cannot rebuild the model config: {e}") from None
    return build_single_process_model(tcfg, vocab, cfg.seq_length, cfg.rotary_base), tcfg


def build_single_process_model(tcfg, vocab_size: int, max_sequence_length: int,
                               rotary_base: float):
    """A GPTModel of `tcfg` for this one process (local layers, no controller, no DDP) whose
    parameters carry megatron's tensor-parallel attributes (sharded_state_dict needs them)."""
    model = build_gpt_model(tcfg, vocab_size=vocab_size, max_sequence_length=max_sequence_length,
                            controller=None, use_transformer_engine=False,
                            rotary_base=rotary_base)
    for p in model.parameters():
        tensor_parallel.set_defaults_if_not_set_tensor_model_parallel_attributes(p)
    return model


def _load_weights(model, path: str, common: dict) -> None:
    """dist_checkpointing re-shards the saved layout into the single-process model; bf16 tensors
    are read into the fp32 parameters."""
    metadata = dist_checkpointing.load_content_metadata(path) or sharded_metadata()
    try:
        state = load_sharded({"model": model.sharded_state_dict(metadata=metadata)}, path,
                             common)
        model.load_state_dict(state["model"], strict=True)
    except Exception as e:  # noqa: BLE001
        raise CheckpointLoadError(f"cannot load the model weights of {path}: "
                                  f"{_one_line(e, 400)}") from None


def load_offline_model(load: str, iteration: Optional[int] = None, tokenizer=None,
                       overrides: Optional[dict] = None) -> OfflineCheckpoint:
    """Load checkpoint `load` (a --save directory: its latest checkpoint or iteration
    `iteration`; or one iter_XXXXXXX directory) as a single-process fp32 model in eval mode.

    `tokenizer`: a name/directory or a loaded tokenizer overriding the run's; `overrides`:
    TrainConfig fields that do not change the weights' shapes (e.g. the TopK `moe_router_topk`
    or the token dispatcher, for inference). Missing checkpoints raise ConfigError, everything
    else that stops the load CheckpointLoadError (both one line)."""
    path = resolve_checkpoint(load, iteration)
    cfg, common = read_checkpoint_config(path)
    if cfg.virtual_pipeline_model_parallel_size:
        raise CheckpointLoadError(f"{path}: virtual-pipeline checkpoints are not supported by the "
                                  "converter; re-save without interleaving")
    tok = run_tokenizer(cfg, tokenizer)
    vocab = _model_vocab_size(path, cfg, tok)
    t0 = time.perf_counter()
    model, tcfg = _build_model(path, cfg, vocab, overrides)
    _load_weights(model, path, common)
    model.eval()
    return OfflineCheckpoint(model, tcfg, cfg, path, common, tok, vocab,
                             seconds=time.perf_counter() - t0)

