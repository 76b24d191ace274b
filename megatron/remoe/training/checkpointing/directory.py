"""The checkpoints of a --save directory: which are complete, the newest one that verifies (for a
resume or an offline tool), and retention (`--keep-last-n-checkpoints`)."""

from __future__ import annotations

import os
import shutil
from typing import Optional

from megatron.remoe.errors import ConfigError
from megatron.remoe.logs import get_logger
from megatron.remoe.training.checkpointing.files import (
    COMMON_PT,
    ITER_DIR_RE,
    TMP_DIR_RE,
    TRACKER,
    iteration_dir,
    this_rank,
    verify_checkpoint,
    verify_checkpoint_distributed,
)

logger = get_logger(__name__)


def complete_iterations(root: str) -> list:
    return sorted(int(m.group(1)) for name in os.listdir(root)
                  if (m := ITER_DIR_RE.match(name)) and os.path.isdir(os.path.join(root, name)))


def _candidates(root: str) -> tuple:
    """(complete checkpoint directories in `root`, newest first; a note when the tracker does not
    name the newest, or None)."""
    if not root or not os.path.isdir(root):
        return [], None
    complete = complete_iterations(root)
    tracker = os.path.join(root, TRACKER)
    note = None
    if os.path.isfile(tracker):
        with open(tracker, encoding="utf-8") as fh:
            text = fh.read().strip()
        if complete and not (text.isdigit() and int(text) == complete[-1]):
            note = (f"checkpoint: tracker {tracker} says {text!r} but the newest complete "
                    f"checkpoint is iter_{complete[-1]:07d}; loading that one")
    elif complete:
        note = (f"checkpoint: no tracker in {root}; loading the newest complete checkpoint "
                f"iter_{complete[-1]:07d}")
    return [iteration_dir(root, it) for it in reversed(complete)], note


def checkpoint_candidates(root: str) -> list:
    """Complete checkpoint directories in `root`, newest first (the loaders below say which one
    they take when the tracker does not name it)."""
    return _candidates(root)[0]


def _warn_corrupt(path: str, reason: str) -> None:
    logger.warning(f"checkpoint: WARNING: {os.path.basename(path)} in {os.path.dirname(path)} "
                   f"is not loadable ({reason}); falling back to the previous checkpoint")


def find_latest_checkpoint(root: str, checksums: bool = False) -> Optional[str]:
    """The newest complete checkpoint directory in `root` that verifies, or None.

    The tracker names the newest; if it is missing or stale (a crash between the rename and the
    tracker update) the newest complete `iter_XXXXXXX` directory is used, and we say so. A
    checkpoint whose files do not match its manifest (sizes; CRC32 too with `checksums`) is
    skipped with a warning.
    """
    candidates, note = _candidates(root)
    if note:
        logger.info(note)
    for path in candidates:
        reason = verify_checkpoint(path, checksums=checksums)
        if reason is None:
            return path
        _warn_corrupt(path, reason)
    return None


def find_loadable_checkpoint(root: str, checksums: bool = True, skip: tuple = ()) -> Optional[str]:
    """find_latest_checkpoint for a running job: the files are verified in parallel by all ranks
    and every rank returns the same directory (rank 0 says why). `skip`: directories known not to
    load."""
    candidates, note = _candidates(root)
    if note and this_rank() == 0:
        logger.info(note)
    for path in candidates:
        if path in skip:
            continue
        reason = verify_checkpoint_distributed(path, checksums)
        if reason is None:
            return path
        if this_rank() == 0:
            _warn_corrupt(path, reason)
    return None


def resolve_checkpoint(load: str, iteration: Optional[int] = None) -> str:
    """The iter_XXXXXXX directory an offline tool reads: `load` itself if it is one, iteration N
    under `load`, or the latest complete checkpoint under `load`."""
    if not load or not os.path.isdir(load):
        raise ConfigError(f"checkpoint {load} not found (no such directory); fix the --load path")
    if os.path.isfile(os.path.join(load, "metadata.json")) or \
            os.path.isfile(os.path.join(load, COMMON_PT)):
        if iteration is not None:
            raise ConfigError(f"{load} is already one checkpoint; drop --iteration or pass its "
                              "parent directory")
        return load
    if iteration is not None:
        path = iteration_dir(load, iteration)
        if not os.path.isdir(path):
            have = [os.path.basename(iteration_dir(load, it)) for it in complete_iterations(load)]
            raise ConfigError(f"no checkpoint for iteration {iteration} in {load} "
                              f"(have: {', '.join(have) or 'none'})")
        return path
    path = find_latest_checkpoint(load)
    if path is None:
        raise ConfigError(f"no checkpoint in {load} (expected iter_XXXXXXX/ directories and "
                          f"{TRACKER})")
    return path


def prune_checkpoints(root: str, keep: int) -> list:
    """Delete complete checkpoints older than the `keep` newest ones that verify (sizes against
    the manifest), plus leftovers of crashed saves/deletions older than the newest checkpoint.
    Never deletes anything when fewer than `keep` checkpoints verify. Returns the deleted paths."""
    if keep < 1 or not os.path.isdir(root):
        return []
    complete = complete_iterations(root)
    kept = []
    for it in reversed(complete):
        if verify_checkpoint(iteration_dir(root, it), checksums=False) is None:
            kept.append(it)
            if len(kept) == keep:
                break
    deleted = []
    if len(kept) == keep:
        oldest_kept = kept[-1]
        for it in complete:
            if it < oldest_kept:
                path = iteration_dir(root, it)
                doomed = path + ".deleting"
                shutil.rmtree(doomed, ignore_errors=True)
                os.replace(path, doomed)  # no longer a complete checkpoint from here on
                shutil.rmtree(doomed, ignore_errors=True)
                deleted.append(path)
    newest = complete[-1] if complete else None
    for name in os.listdir(root):
        m = TMP_DIR_RE.match(name)
        if m and newest is not None and (int(m.group(1)) < newest or m.group(2) == "deleting"):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    if deleted:
        logger.info(f"checkpoint: removed {len(deleted)} old checkpoint(s) "
                    f"({', '.join(os.path.basename(d) for d in deleted)}); keeping the last {keep}")
    return deleted
