"""Known console noise of megatron-core and torch, filtered so that progress lines and one-line
errors stay readable.

A 3-step CPU run used to start with 14 warning lines, none of them actionable: megatron-core warns
from several modules at import that Transformer Engine / Apex are missing (expected on CPU, where
their kernels cannot run), newer releases log deprecations of APIs we use on purpose, and the CUDA
build of torch (the only torch 2.13 for Python 3.12 on the index) logs that it finds no CUDA
runtime. Only the exact messages below are dropped; every other warning and log record still shows.
On a GPU machine without Transformer Engine the fallback is worth knowing: the trainer says it in
one line (`fallback_note`).

`install()` is the entry points' (through `logs.configure()`, before they import megatron-core),
never an import's: inside someone else's program these filters would hide their warnings. Stdlib
only: importing this module must not import torch.
"""

from __future__ import annotations

import logging
import warnings
from typing import Optional

from megatron.remoe.compat import transformer_engine_usable  # stdlib-only at import, like this module

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


def install() -> None:
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
    import torch  # noqa: PLC0415 -- this module is stdlib-only at import

    if not torch.cuda.is_available() or transformer_engine_usable():
        return None
    return ("note: Transformer Engine is not usable here, so megatron-core runs its torch "
            "fallbacks (slower on GPUs); fix: pip install 'megatron-remoe[gpu]'")
