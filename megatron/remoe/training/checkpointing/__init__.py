"""Checkpoints in megatron-core's dist_checkpointing `torch_dist` format, saved atomically.

Layout of `--save DIR`:

    DIR/iter_0001000/                     one complete checkpoint (dist_checkpointing files)
    DIR/iter_0001000/config.yaml          the effective training config (loadable with --config)
    DIR/latest_checkpointed_iteration.txt the tracker, written last

Atomicity: every rank writes into `iter_XXXXXXX.tmp`; when all ranks are done, rank 0 adds
`config.yaml` and `checkpoint_manifest.json` (size and CRC32 of every file, hashed in parallel by all
ranks), renames the directory to `iter_XXXXXXX` and only then replaces the tracker (tmp file +
rename, fsync'ed). A crash or kill at any point leaves the previous checkpoint and tracker intact; a
leftover `.tmp` directory is never loaded (and is removed by the next save).

Loading (`find_loadable_checkpoint`): the newest complete directory whose files match its manifest;
a corrupt one (missing/truncated/altered file, unreadable manifest) is skipped with a warning and the
previous complete checkpoint is used. Directories without a manifest (written by earlier versions)
are accepted unverified.

Retention (`--keep-last-n-checkpoints N`): after a successful save, rank 0 deletes complete
checkpoints older than the N newest *verified* ones (renamed to `*.deleting` first, so a crash while
deleting never leaves a half-deleted directory that looks complete). With fewer than N verified
checkpoints nothing is deleted, so the last good one is never removed.

Contents: the model's and the optimizer's sharded state dicts (re-shardable: a checkpoint loads into
another TP/PP/EP/DP layout; the distributed optimizer uses the `fully_sharded_model_space` format) plus
common state saved once: iteration, consumed samples, LR scheduler, the effective config; and
per-rank RNG states (restored when the layout is unchanged). The ReMoE sparsity controller's state
(lambda) is part of the model's sharded state: every ReLURouter's `_extra_state` (checkpoints of
earlier versions hold it in the common state; `load_sharded` still loads those).

Modules: files.py (names, manifest, verification), directory.py (find, resolve, prune), state.py
(the sharded state dict), save.py, load.py. megatron-core's checkpointing and optimizer modules are
imported inside the functions that use them, so offline tools that only find and verify
checkpoints do not load the training stack.
"""

from megatron.remoe.errors import EXIT_SAVE_FAILED
from megatron.remoe.training.checkpointing.directory import (
    checkpoint_candidates,
    find_latest_checkpoint,
    find_loadable_checkpoint,
    prune_checkpoints,
    resolve_checkpoint,
)
from megatron.remoe.training.checkpointing.files import (
    CHECKPOINT_VERSION,
    COMMON_PT,
    MANIFEST,
    TRACKER,
    check_writer_version,
    describe_files,
    iteration_dir,
    verify_checkpoint,
    verify_checkpoint_distributed,
    writer_versions,
)
from megatron.remoe.training.checkpointing.load import (
    MODEL_SHAPE_FIELDS,
    check_checkpoint_matches,
    check_model_shape,
    load_checkpoint,
    load_common_state,
    read_checkpoint_config,
    single_process_config,
)
from megatron.remoe.training.checkpointing.save import CheckpointSaveError, save_checkpoint
from megatron.remoe.training.checkpointing.state import load_sharded, sharded_metadata

__all__ = [
    "CHECKPOINT_VERSION", "COMMON_PT", "EXIT_SAVE_FAILED", "MANIFEST", "MODEL_SHAPE_FIELDS", "TRACKER",
    "CheckpointSaveError", "describe_files", "check_checkpoint_matches", "check_model_shape",
    "check_writer_version", "checkpoint_candidates", "find_latest_checkpoint",
    "find_loadable_checkpoint", "iteration_dir", "load_checkpoint", "load_common_state",
    "load_sharded",
    "prune_checkpoints", "read_checkpoint_config", "resolve_checkpoint", "save_checkpoint",
    "sharded_metadata", "single_process_config", "verify_checkpoint",
    "verify_checkpoint_distributed", "writer_versions",
]
