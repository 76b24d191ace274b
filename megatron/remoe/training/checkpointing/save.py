"""Saving atomically: shards into `iter_XXXXXXX.tmp`, manifest, rename, then the tracker; a write
error on any rank fails the save on every rank together (CheckpointSaveError, exit code 4)."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import queue
import re
import shutil
import signal
import sys
import time
from typing import Optional

import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
from megatron.core.dist_checkpointing.strategies import filesystem_async

from megatron.remoe.logs import get_logger
from megatron.remoe.training.checkpointing.directory import complete_iterations, prune_checkpoints
from megatron.remoe.training.checkpointing.files import (
    CHECKPOINT_VERSION,
    MANIFEST,
    TRACKER,
    all_gather_dicts,
    barrier,
    describe_files,
    fsync_dir,
    iteration_dir,
    list_files,
    my_share,
    this_rank,
    writer_versions,
)
from megatron.remoe.training.checkpointing.state import build_state_dict, parallel_layout, sharded_metadata
from megatron.remoe.training.distributed import set_parent_death_signal

logger = get_logger(__name__)


class CheckpointSaveError(RuntimeError):
    """Writing a checkpoint failed on some rank (disk full, permission lost, I/O error). Raised on
    every rank together; the partial directory was removed (never renamed to iter_XXXXXXX) and
    the previous checkpoint and the tracker are untouched."""



def _error_text(error: BaseException) -> str:
    """One line for a save error: the innermost OSError if there is one (torch's distributed
    checkpoint wraps the writers' errors of every rank in a CheckpointException)."""
    seen, stack, from_rank = [], [(error, "")], None
    while stack:
        e, where = stack.pop(0)
        if e is None or any(e is s for s in seen):
            continue
        seen.append(e)
        if isinstance(e, OSError) and e.errno is not None:
            return where + " ".join(str(e).split())[:300]
        if where and from_rank is None:  # a writer's error sent to rank 0 (its cause is lost)
            text = " ".join(str(e).split())
            errno_text = re.search(r"\[Errno \d+\].*", text)
            from_rank = where + (errno_text.group(0) if errno_text else text)[:300]
        stack += [(e.__cause__, where), (e.__context__, where)]
        for rank, failure in (getattr(e, "failures", None) or {}).items():  # CheckpointException
            stack.append((failure[0] if isinstance(failure, tuple) else failure,
                          f"rank {rank}: "))
    if from_rank:
        return from_rank
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    return f"{type(error).__name__}: {lines[-1] if lines else ''}"[:300]


def _first_error(mine: Optional[str]) -> Optional[str]:
    """Every rank's error of a save phase (None: fine), agreed over all ranks in one all-gather;
    errors that name an OS error (errno) are preferred over the echoes on other ranks."""
    errors = [mine]
    if dist.is_initialized() and dist.get_world_size() > 1:
        errors = [None] * dist.get_world_size()
        dist.all_gather_object(errors, mine)
    found = [(r, e) for r, e in enumerate(errors) if e]
    if not found:
        return None
    rank, error = next(((r, e) for r, e in found if "Errno" in e), found[0])
    return f"rank {rank}: {error}" if len(errors) > 1 and not error.startswith("rank ") else error


def _save_failed(root: str, iteration: int, tmp: str, error: str) -> CheckpointSaveError:
    if this_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            os.remove(os.path.join(root, TRACKER + ".tmp"))
        except OSError:
            pass
    done = complete_iterations(root) if os.path.isdir(root) else []
    if iteration in done:  # renamed before the tracker update failed: complete and verifiable
        state = (f"{iteration_dir(root, iteration)} is complete but the tracker was not "
                 "updated (--load finds it)")
    else:
        previous = [it for it in done if it < iteration]
        state = "the partial checkpoint was removed and " + (
            f"the previous checkpoint {iteration_dir(root, previous[-1])} is intact"
            if previous else "no earlier checkpoint exists")
    return CheckpointSaveError(
        f"saving checkpoint iteration {iteration} to {root} failed ({error}); {state}; fix: free "
        f"space or restore write access to {root} (or point --save elsewhere), then resume "
        f"with --load {root}")


def _fail_together(error: Optional[str], root: str, iteration: int, tmp: str) -> None:
    """End of a save phase: the ranks agree on their errors (one all-gather) and, if any rank
    failed, every rank raises the same CheckpointSaveError."""
    error = _first_error(error)
    if error:
        raise _save_failed(root, iteration, tmp, error)


_SAVE_ERRORS = (Exception,)
try:  # torch's distributed checkpoint raises CheckpointException (a BaseException)
    from torch.distributed.checkpoint.api import CheckpointException

    _SAVE_ERRORS = (Exception, CheckpointException)
except ImportError:  # pragma: no cover
    pass


def _in_process_write_results() -> None:
    """megatron-core's file writer passes the write results of a synchronous save through a queue
    served by a `multiprocessing` Manager: a spawned server process (plus a resource tracker)
    that outlives a killed trainer as an orphan (~275 MB each). Writer and reader are this
    process in a synchronous save, so a plain in-process queue does the same job."""
    try:
        from megatron.core.dist_checkpointing.strategies import filesystem_async  # noqa: PLC0415 -- guarded: not in every megatron-core version
    except ImportError:  # pragma: no cover
        return
    if getattr(filesystem_async, "_results_queue", 0) is None:
        filesystem_async._results_queue = queue.Queue()


_DIE_WITH_PARENT_REGISTERED = False


def _children_die_with_parent() -> None:
    """Processes forked by this one (megatron-core forks one writer per shard file during a save)
    get SIGKILL when their parent dies, instead of living on as orphans after a kill -9 of the
    trainer (Linux PR_SET_PDEATHSIG; elsewhere nothing changes)."""
    global _DIE_WITH_PARENT_REGISTERED
    if _DIE_WITH_PARENT_REGISTERED or not sys.platform.startswith("linux"):
        return

    forking = [os.getpid()]

    def before() -> None:
        forking[0] = os.getpid()

    def in_child() -> None:
        set_parent_death_signal(signal.SIGKILL)
        if os.getppid() != forking[0]:  # the parent died before the signal was set
            os._exit(1)

    os.register_at_fork(before=before, after_in_child=in_child)
    _DIE_WITH_PARENT_REGISTERED = True


def _test_hook_pause(iteration: int, stage: str) -> None:
    """TEST ONLY. REMOE_TEST_HOOK_SAVE_PAUSE=<iteration>:<stage> stops rank 0 inside the save of
    that iteration (stage 'shards': shards written into .tmp, no manifest yet; 'rename': directory
    renamed, tracker not yet updated) so that a test can kill -9 it there."""
    want = os.environ.get("REMOE_TEST_HOOK_SAVE_PAUSE")
    if not want or want != f"{iteration}:{stage}" or this_rank() != 0:
        return
    logger.info(f"test-hook: save of iteration {iteration} paused at stage {stage}")
    time.sleep(600)


@contextlib.contextmanager
def _test_hook_fail(iteration: int, stage: str):
    """TEST ONLY. REMOE_TEST_HOOK_SAVE_FAIL=<iteration>:<stage>:<ENOSPC|EACCES|EIO>[:<rank>]
    makes a write of that save fail on that rank (default 0) with that OS error: stage 'shards'
    inside megatron-core's shard writers (the forked writer processes of torch_dist), 'manifest'
    and 'tracker' where rank 0 writes those files."""
    want = (os.environ.get("REMOE_TEST_HOOK_SAVE_FAIL") or "").split(":")
    if len(want) < 3 or want[:2] != [str(iteration), stage] or \
            this_rank() != int(want[3] if len(want) > 3 else 0):
        yield
        return
    code = getattr(errno, want[2])

    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code), "(injected by REMOE_TEST_HOOK_SAVE_FAIL)")

    if stage != "shards":
        fail()

    real = filesystem_async._write_item
    filesystem_async._write_item = fail
    try:
        yield
    finally:
        filesystem_async._write_item = real


def save_checkpoint(root: str, iteration: int, model, optimizer, scheduler,
                    consumed_train_samples: int, cfg, config_yaml: str,
                    extra_common: Optional[dict] = None) -> str:
    """Save atomically into root/iter_XXXXXXX; every rank must call this.

    The sparsity controller's state (lambda) is in the model's sharded state: every ReLURouter's
    `_extra_state`.
    `extra_common`: more common (non-sharded) state, e.g. the padded vocabulary size and the number
    of skipped steps. With cfg.keep_last_n_checkpoints, older checkpoints are pruned afterwards.
    A write error on any rank (disk full, permission, I/O) raises CheckpointSaveError on every
    rank after the ranks agreed on it (no rank is left waiting in a collective); the partial
    checkpoint is removed and the previous one stays the newest.
    """
    final, tmp = iteration_dir(root, iteration), iteration_dir(root, iteration) + ".tmp"
    error = None
    if this_rank() == 0:
        try:
            os.makedirs(root, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)  # a crashed earlier attempt
            os.makedirs(tmp)
        except OSError as e:
            error = _error_text(e)
    _fail_together(error, root, iteration, tmp)
    metadata = sharded_metadata()
    sd = build_state_dict(model, optimizer, is_loading=False, with_optimizer=True,
                          with_rng=True, metadata=metadata)
    # common (non-sharded) state: written once by rank 0, identical on every rank
    sd.update(iteration=iteration, consumed_train_samples=consumed_train_samples,
              opt_param_scheduler=scheduler.state_dict(),
              checkpoint_version=CHECKPOINT_VERSION, writer=writer_versions(),
              layout=parallel_layout(cfg), config=cfg.to_dict())
    sd.update(extra_common or {})
    _in_process_write_results()
    _children_die_with_parent()
    try:
        with _test_hook_fail(iteration, "shards"):
            dist_checkpointing.save(sd, tmp, get_default_save_sharded_strategy("torch_dist"),
                                    content_metadata=metadata)
    except _SAVE_ERRORS as e:  # every rank raises when any writer failed (torch DCP)
        error = _error_text(e)
    _fail_together(error, root, iteration, tmp)
    _test_hook_pause(iteration, "shards")
    # every rank describes (size, CRC32) its share of the files; rank 0 writes the manifest
    try:
        if this_rank() == 0:
            with open(os.path.join(tmp, "config.yaml"), "w", encoding="utf-8") as fh:
                fh.write(config_yaml)
        barrier()
        names = [n for n in list_files(tmp) if n != MANIFEST]
        checksums = getattr(cfg, "checkpoint_checksums", True)
        files = describe_files(tmp, my_share(names), checksums)
    except OSError as e:
        files, error = {}, _error_text(e)
    _fail_together(error, root, iteration, tmp)
    files = all_gather_dicts(files)
    if this_rank() == 0:
        try:
            _publish(root, iteration, tmp, final, files)
        except OSError as e:
            error = _error_text(e)
    _fail_together(error, root, iteration, tmp)
    keep = getattr(cfg, "keep_last_n_checkpoints", None)
    if keep and this_rank() == 0:
        try:
            prune_checkpoints(root, keep)
        except OSError as e:  # the new checkpoint is complete: retention can wait for the next save
            logger.warning(f"checkpoint: WARNING: removing old checkpoints failed "
                           f"({_error_text(e)}); they are kept")
    barrier()
    return final


def _publish(root: str, iteration: int, tmp: str, final: str, files: dict) -> None:
    """Rank 0: manifest into tmp, tmp renamed to final, then the tracker (each step fsync'ed)."""
    manifest = {"iteration": iteration, "checkpoint_version": CHECKPOINT_VERSION,
                "writer": writer_versions(), "files": {n: files[n] for n in sorted(files)}}
    with _test_hook_fail(iteration, "manifest"):
        with open(os.path.join(tmp, MANIFEST), "w", encoding="utf-8") as fh:
            json.dump(manifest, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
    fsync_dir(tmp)
    old = None
    if os.path.exists(final):  # re-saving the same iteration: move the old one out first
        old = final + ".deleting"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(root)
    _test_hook_pause(iteration, "rename")
    tracker_tmp = os.path.join(root, TRACKER + ".tmp")
    with _test_hook_fail(iteration, "tracker"):
        with open(tracker_tmp, "w", encoding="utf-8") as fh:
            fh.write(f"{iteration}\n")
            fh.flush()
            os.fsync(fh.fileno())
    os.replace(tracker_tmp, os.path.join(root, TRACKER))
    fsync_dir(root)
    if old:
        shutil.rmtree(old, ignore_errors=True)
