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
common state saved once: iteration, consumed samples, LR scheduler, the ReMoE sparsity controller
(lambda), the effective config; and per-rank RNG states (restored when the layout is unchanged).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import random
import re
import shutil
import sys
import time
import zlib
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron.remoe.compat import mcore_version_string, reads_checkpoint_of, writes_common_pt
from megatron.remoe.config import ConfigError

TRACKER = "latest_checkpointed_iteration.txt"
MANIFEST = "checkpoint_manifest.json"
COMMON_PT = "common.pt"  # megatron-core < 0.19's file of the common state (compat.writes_common_pt)
CHECKPOINT_VERSION = 1
_ITER_DIR = re.compile(r"^iter_(\d{7})$")
_TMP_DIR = re.compile(r"^iter_(\d{7})\.(tmp|deleting)$")
# Config fields that fix the shapes of the saved tensors (compared before loading).
MODEL_SHAPE_FIELDS = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
                      "ffn_hidden_size", "kv_channels", "router", "num_experts",
                      "moe_granularity", "moe_layer_freq")
_MOE_ONLY_FIELDS = ("num_experts", "moe_granularity", "moe_layer_freq")

def sharded_metadata() -> dict:
    """Passed to sharded_state_dict() on save and recorded in the checkpoint (content metadata), so
    a load builds the matching structure.

    Distributed-optimizer state: 'fully_reshardable' (canonical per-parameter layout: loads into any
    TP/PP/EP/DP layout) when megatron-core runs with Transformer Engine or Apex Adam. With torch Adam
    (CPU, or GPUs without TE) megatron-core 0.16 cannot load that format (its gathered state lacks
    torch Adam's per-parameter 'step') and its 'fully_sharded_model_space' is unsupported, so we use
    'dp_reshardable' there: re-shardable across DP only (model weights always re-shard).
    """
    from megatron.core.optimizer import distrib_optimizer

    kind = "fully_reshardable" if distrib_optimizer.HAVE_APEX_OR_TE else "dp_reshardable"
    return {"distrib_optim_sharding_type": kind, "singleton_local_shards": False,
            "chained_optim_avoid_prefix": True}


def iteration_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _layout(cfg) -> dict:
    world = dist.get_world_size() if dist.is_initialized() else 1
    return {"world_size": world, "tp": cfg.tensor_model_parallel_size,
            "pp": cfg.pipeline_model_parallel_size, "vp": cfg.virtual_pipeline_model_parallel_size,
            "ep": cfg.expert_model_parallel_size, "cp": cfg.context_parallel_size}


def _rng_state() -> dict:
    from megatron.core import tensor_parallel

    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state(),
             "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
    try:
        state["tracker"] = tensor_parallel.get_cuda_rng_tracker().get_states()
    except Exception:  # tracker not initialised (no model-parallel RNG in use)
        state["tracker"] = None
    return state


def _set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    if state.get("tracker") is not None:
        tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _rng_sharded(rng: Optional[dict]):
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    world = dist.get_world_size() if dist.is_initialized() else 1
    return ShardedObject("rng_state", rng, (world,), (_rank(),), replica_id=0)


def _prime_empty_optimizer_state(optimizer) -> None:
    """Without Transformer Engine / Apex, megatron-core's DistributedOptimizer wraps torch Adam,
    whose state is empty until the first step, and `state_dict()` (called while building the
    loading state dict) asserts on a missing 'step'. Allocate zero state with step 0 first; the
    load then overwrites all of it (step included) from the checkpoint."""
    from megatron.core.optimizer import distrib_optimizer

    if distrib_optimizer.HAVE_APEX_OR_TE:
        return
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if not isinstance(opt, distrib_optimizer.DistributedOptimizer) or opt.optimizer.state:
            continue
        for group in opt.optimizer.param_groups:
            for p in group["params"]:
                opt.optimizer.state[p] = {"exp_avg": torch.zeros_like(p.data),
                                          "exp_avg_sq": torch.zeros_like(p.data),
                                          "step": torch.tensor(0.0)}


def _restore_torch_adam_steps(optimizer, loaded) -> None:
    """Without Transformer Engine / Apex, megatron-core 0.16's DistributedOptimizer loads torch
    Adam's 'step' as ONE tensor shared by every parameter and leaves it at a stale value (0 after
    loading a step-3 checkpoint), so the updates after a resume used the wrong Adam bias
    correction (found by tests/test_parity.py, exact resume). Give every parameter its own step
    tensor holding the saved count."""
    from megatron.core.optimizer import distrib_optimizer

    if distrib_optimizer.HAVE_APEX_OR_TE:
        return
    opts = getattr(optimizer, "chained_optimizers", [optimizer])
    states = [loaded] if len(opts) == 1 else [loaded[i] for i in range(len(opts))]
    for opt, saved in zip(opts, states):
        if not isinstance(opt, distrib_optimizer.DistributedOptimizer):
            continue
        steps = {float(g["step"]) for g in saved["optimizer"]["param_groups"] if "step" in g}
        if len(steps) != 1:
            continue
        step = steps.pop()
        for param_state in opt.optimizer.state.values():
            param_state["step"] = torch.tensor(step, dtype=torch.float32)


def _state_dict(model, optimizer, is_loading: bool, with_optimizer: bool,
                with_rng: bool, metadata: dict) -> dict:
    """The sharded state dict of this rank (model chunk(s), optimizer, RNG)."""
    from megatron.core.utils import unwrap_model

    model = unwrap_model(model)  # keys of the bare GPTModel, without DDP/Float16Module prefixes
    sd = {}
    if len(model) == 1:
        sd["model"] = model[0].sharded_state_dict(metadata=metadata)
    else:
        for i, chunk in enumerate(model):
            sd[f"model{i}"] = chunk.sharded_state_dict(metadata=metadata)
    if with_optimizer:
        if is_loading:
            _prime_empty_optimizer_state(optimizer)
        sd["optimizer"] = optimizer.sharded_state_dict(sd, is_loading=is_loading,
                                                       metadata=metadata)
    if with_rng:
        sd["rng_state"] = _rng_sharded(None if is_loading else _rng_state())
    return sd


# ------------------------------------------------------------------------------------------------
# Manifest: sizes and CRC32 of every file of a checkpoint
# ------------------------------------------------------------------------------------------------
def _list_files(directory: str) -> list:
    """Relative paths of the regular files under `directory`, sorted."""
    out = []
    for base, _, files in os.walk(directory):
        for name in files:
            out.append(os.path.relpath(os.path.join(base, name), directory))
    return sorted(out)


def _crc32(path: str, chunk: int = 1 << 24) -> str:
    crc = 0
    with open(path, "rb") as fh:
        while True:
            block = fh.read(chunk)
            if not block:
                break
            crc = zlib.crc32(block, crc)
    return f"{crc & 0xFFFFFFFF:08x}"


def _my_share(names: list) -> list:
    """This rank's part of a file list (round robin): ranks hash/verify in parallel."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    return names[_rank()::world]


def _describe_files(directory: str, names: list, checksums: bool) -> dict:
    out = {}
    for name in names:
        path = os.path.join(directory, name)
        out[name] = {"size": os.path.getsize(path)}
        if checksums:
            out[name]["crc32"] = _crc32(path)
    return out


def _all_gather_dicts(mine: dict) -> dict:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return mine
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, mine)
    merged: dict = {}
    for part in parts:
        merged.update(part)
    return merged


def verify_checkpoint(path: str, checksums: bool = True, names: Optional[list] = None
                      ) -> Optional[str]:
    """None if the files of checkpoint `path` match its manifest, else what is wrong.

    `names`: verify only these manifest entries (a rank's share); the manifest itself is always
    read. Without a manifest (a checkpoint from an earlier version) nothing can be checked: None.
    """
    manifest_path = os.path.join(path, MANIFEST)
    if not os.path.exists(manifest_path):
        return None
    try:
        with open(manifest_path, encoding="utf-8") as fh:
            manifest = json.load(fh)
        files = manifest["files"]
        assert isinstance(files, dict) and files
    except (OSError, ValueError, KeyError, TypeError, AssertionError) as e:
        return f"{manifest_path} is unreadable ({type(e).__name__})"
    for name in (sorted(files) if names is None else names):
        want = files[name]
        full = os.path.join(path, name)
        if not os.path.isfile(full):
            return f"{full} is missing"
        size = os.path.getsize(full)
        if size != want.get("size"):
            return f"{full} has {size} bytes, {want.get('size')} were written"
        if checksums and want.get("crc32") and _crc32(full) != want["crc32"]:
            return f"{full} does not match its CRC32 recorded at save time"
    return None


def _manifest_names(path: str) -> list:
    try:
        with open(os.path.join(path, MANIFEST), encoding="utf-8") as fh:
            return sorted(json.load(fh)["files"])
    except Exception:  # noqa: BLE001 -- verify_checkpoint reports it
        return []


def verify_checkpoint_distributed(path: str, checksums: bool = True) -> Optional[str]:
    """verify_checkpoint with the files split over all ranks; every rank gets the same answer."""
    names = _manifest_names(path)
    reason = verify_checkpoint(path, checksums, _my_share(names)) if names else \
        verify_checkpoint(path, checksums)
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return reason
    reasons = [None] * dist.get_world_size()
    dist.all_gather_object(reasons, reason)
    return next((r for r in reasons if r), None)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _test_hook_pause(iteration: int, stage: str) -> None:
    """TEST ONLY. REMOE_TEST_HOOK_SAVE_PAUSE=<iteration>:<stage> stops rank 0 inside the save of
    that iteration (stage 'shards': shards written into .tmp, no manifest yet; 'rename': directory
    renamed, tracker not yet updated) so that a test can kill -9 it there."""
    want = os.environ.get("REMOE_TEST_HOOK_SAVE_PAUSE")
    if not want or want != f"{iteration}:{stage}" or _rank() != 0:
        return
    print(f"test-hook: save of iteration {iteration} paused at stage {stage}", flush=True)
    time.sleep(600)


@contextlib.contextmanager
def _test_hook_fail(iteration: int, stage: str):
    """TEST ONLY. REMOE_TEST_HOOK_SAVE_FAIL=<iteration>:<stage>:<ENOSPC|EACCES|EIO>[:<rank>]
    makes a write of that save fail on that rank (default 0) with that OS error: stage 'shards'
    inside megatron-core's shard writers (the forked writer processes of torch_dist), 'manifest'
    and 'tracker' where rank 0 writes those files."""
    want = (os.environ.get("REMOE_TEST_HOOK_SAVE_FAIL") or "").split(":")
    if len(want) < 3 or want[:2] != [str(iteration), stage] or \
            _rank() != int(want[3] if len(want) > 3 else 0):
        yield
        return
    code = getattr(errno, want[2])

    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code), "(injected by REMOE_TEST_HOOK_SAVE_FAIL)")

    if stage != "shards":
        fail()
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    real = filesystem_async._write_item
    filesystem_async._write_item = fail
    try:
        yield
    finally:
        filesystem_async._write_item = real


# ------------------------------------------------------------------------------------------------
# Save
# ------------------------------------------------------------------------------------------------
class CheckpointSaveError(RuntimeError):
    """Writing a checkpoint failed on some rank (disk full, permission lost, I/O error). Raised on
    every rank together; the partial directory was removed (never renamed to iter_XXXXXXX) and
    the previous checkpoint and the tracker are untouched."""


EXIT_SAVE_FAILED = 4  # process exit code for CheckpointSaveError


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
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            os.remove(os.path.join(root, TRACKER + ".tmp"))
        except OSError:
            pass
    done = _complete_iterations(root) if os.path.isdir(root) else []
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
    import queue

    try:
        from megatron.core.dist_checkpointing.strategies import filesystem_async
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
    import signal

    from megatron.remoe.distributed import set_parent_death_signal

    forking = [os.getpid()]

    def before() -> None:
        forking[0] = os.getpid()

    def in_child() -> None:
        set_parent_death_signal(signal.SIGKILL)
        if os.getppid() != forking[0]:  # the parent died before the signal was set
            os._exit(1)

    os.register_at_fork(before=before, after_in_child=in_child)
    _DIE_WITH_PARENT_REGISTERED = True


def save_checkpoint(root: str, iteration: int, model, optimizer, scheduler, controller,
                    consumed_train_samples: int, cfg, config_yaml: str,
                    extra_common: Optional[dict] = None, log=None) -> str:
    """Save atomically into root/iter_XXXXXXX; every rank must call this.

    `extra_common`: more common (non-sharded) state, e.g. the padded vocabulary size and the number
    of skipped steps. With cfg.keep_last_n_checkpoints, older checkpoints are pruned afterwards.
    A write error on any rank (disk full, permission, I/O) raises CheckpointSaveError on every
    rank after the ranks agreed on it (no rank is left waiting in a collective); the partial
    checkpoint is removed and the previous one stays the newest.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy

    final, tmp = iteration_dir(root, iteration), iteration_dir(root, iteration) + ".tmp"
    error = None
    if _rank() == 0:
        try:
            os.makedirs(root, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)  # a crashed earlier attempt
            os.makedirs(tmp)
        except OSError as e:
            error = _error_text(e)
    error = _first_error(error)
    if error:
        raise _save_failed(root, iteration, tmp, error)
    metadata = sharded_metadata()
    sd = _state_dict(model, optimizer, is_loading=False, with_optimizer=True,
                     with_rng=True, metadata=metadata)
    # common (non-sharded) state: written once by rank 0, identical on every rank
    sd.update(iteration=iteration, consumed_train_samples=consumed_train_samples,
              opt_param_scheduler=scheduler.state_dict(),
              checkpoint_version=CHECKPOINT_VERSION, writer=writer_versions(),
              layout=_layout(cfg), config=cfg.to_dict(),
              controller=controller.state_dict() if controller is not None else None)
    sd.update(extra_common or {})
    _in_process_write_results()
    _children_die_with_parent()
    try:
        with _test_hook_fail(iteration, "shards"):
            dist_checkpointing.save(sd, tmp, get_default_save_sharded_strategy("torch_dist"),
                                    content_metadata=metadata)
    except _SAVE_ERRORS as e:  # every rank raises when any writer failed (torch DCP)
        error = _error_text(e)
    error = _first_error(error)
    if error:
        raise _save_failed(root, iteration, tmp, error)
    _test_hook_pause(iteration, "shards")
    # every rank describes (size, CRC32) its share of the files; rank 0 writes the manifest
    try:
        if _rank() == 0:
            with open(os.path.join(tmp, "config.yaml"), "w", encoding="utf-8") as fh:
                fh.write(config_yaml)
        _barrier()
        names = [n for n in _list_files(tmp) if n != MANIFEST]
        checksums = getattr(cfg, "checkpoint_checksums", True)
        files = _describe_files(tmp, _my_share(names), checksums)
    except OSError as e:
        files, error = {}, _error_text(e)
    error = _first_error(error)
    if error:
        raise _save_failed(root, iteration, tmp, error)
    files = _all_gather_dicts(files)
    if _rank() == 0:
        try:
            _publish(root, iteration, tmp, final, files)
        except OSError as e:
            error = _error_text(e)
    error = _first_error(error)
    if error:
        raise _save_failed(root, iteration, tmp, error)
    keep = getattr(cfg, "keep_last_n_checkpoints", None)
    if keep and _rank() == 0:
        try:
            prune_checkpoints(root, keep, log=log or (lambda m: None))
        except OSError as e:  # the new checkpoint is complete: retention can wait for the next save
            (log or print)(f"checkpoint: WARNING: removing old checkpoints failed "
                           f"({_error_text(e)}); they are kept")
    _barrier()
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
    _fsync_dir(tmp)
    old = None
    if os.path.exists(final):  # re-saving the same iteration: move the old one out first
        old = final + ".deleting"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(root)
    _test_hook_pause(iteration, "rename")
    tracker_tmp = os.path.join(root, TRACKER + ".tmp")
    with _test_hook_fail(iteration, "tracker"):
        with open(tracker_tmp, "w", encoding="utf-8") as fh:
            fh.write(f"{iteration}\n")
            fh.flush()
            os.fsync(fh.fileno())
    os.replace(tracker_tmp, os.path.join(root, TRACKER))
    _fsync_dir(root)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def prune_checkpoints(root: str, keep: int, log=print) -> list:
    """Delete complete checkpoints older than the `keep` newest ones that verify (sizes against
    the manifest), plus leftovers of crashed saves/deletions older than the newest checkpoint.
    Never deletes anything when fewer than `keep` checkpoints verify. Returns the deleted paths."""
    if keep < 1 or not os.path.isdir(root):
        return []
    complete = _complete_iterations(root)
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
        m = _TMP_DIR.match(name)
        if m and newest is not None and (int(m.group(1)) < newest or m.group(2) == "deleting"):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    if deleted:
        log(f"checkpoint: removed {len(deleted)} old checkpoint(s) "
            f"({', '.join(os.path.basename(d) for d in deleted)}); keeping the last {keep}")
    return deleted


# ------------------------------------------------------------------------------------------------
# Find
# ------------------------------------------------------------------------------------------------
def _complete_iterations(root: str) -> list:
    return sorted(int(m.group(1)) for name in os.listdir(root)
                  if (m := _ITER_DIR.match(name)) and os.path.isdir(os.path.join(root, name)))


def checkpoint_candidates(root: str, log=print) -> list:
    """Complete checkpoint directories in `root`, newest first (tracker inconsistencies noted)."""
    if not root or not os.path.isdir(root):
        return []
    complete = _complete_iterations(root)
    tracker = os.path.join(root, TRACKER)
    if os.path.isfile(tracker):
        with open(tracker, encoding="utf-8") as fh:
            text = fh.read().strip()
        if complete and not (text.isdigit() and int(text) == complete[-1]):
            log(f"checkpoint: tracker {tracker} says {text!r} but the newest complete checkpoint "
                f"is iter_{complete[-1]:07d}; loading that one")
    elif complete:
        log(f"checkpoint: no tracker in {root}; loading the newest complete checkpoint "
            f"iter_{complete[-1]:07d}")
    return [iteration_dir(root, it) for it in reversed(complete)]


def _warn_corrupt(log, path: str, reason: str) -> None:
    log(f"checkpoint: WARNING: {os.path.basename(path)} in {os.path.dirname(path)} is not "
        f"loadable ({reason}); falling back to the previous checkpoint")


def find_latest_checkpoint(root: str, log=print, checksums: bool = False) -> Optional[str]:
    """The newest complete checkpoint directory in `root` that verifies, or None.

    The tracker names the newest; if it is missing or stale (a crash between the rename and the
    tracker update) the newest complete `iter_XXXXXXX` directory is used, and we say so. A
    checkpoint whose files do not match its manifest (sizes; CRC32 too with `checksums`) is
    skipped with a warning.
    """
    for path in checkpoint_candidates(root, log):
        reason = verify_checkpoint(path, checksums=checksums)
        if reason is None:
            return path
        _warn_corrupt(log, path, reason)
    return None


def resolve_checkpoint(load: str, iteration: Optional[int] = None, log=print) -> str:
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
            have = [os.path.basename(iteration_dir(load, it)) for it in _complete_iterations(load)]
            raise ConfigError(f"no checkpoint for iteration {iteration} in {load} "
                              f"(have: {', '.join(have) or 'none'})")
        return path
    path = find_latest_checkpoint(load, log=log)
    if path is None:
        raise ConfigError(f"no checkpoint in {load} (expected iter_XXXXXXX/ directories and "
                          f"{TRACKER})")
    return path


def writer_versions() -> dict:
    """What wrote a checkpoint, recorded in its manifest (plain JSON, readable by any version)."""
    from megatron.remoe import __version__

    return {"megatron_core": mcore_version_string(), "torch": torch.__version__.split("+")[0],
            "megatron_remoe": __version__}


def check_writer_version(path: str) -> None:
    """ConfigError (one line) when checkpoint `path` was written by a newer megatron-core release
    than the installed one, which may not read its layout (0.19 moved the common state out of
    common.pt): say so, instead of failing to read it and calling it corrupt."""
    writer = None
    try:
        with open(os.path.join(path, MANIFEST), encoding="utf-8") as fh:
            writer = (json.load(fh).get("writer") or {}).get("megatron_core")
    except (OSError, ValueError, AttributeError):
        pass  # no or unreadable manifest: verify_checkpoint reports it
    if writer is None and writes_common_pt() and \
            os.path.isfile(os.path.join(path, "metadata.json")) and \
            not os.path.isfile(os.path.join(path, COMMON_PT)):
        writer = ">= 0.19"  # written before versions were recorded, in 0.19's layout
    if writer is None or (writer[0].isdigit() and reads_checkpoint_of(writer)):
        return
    raise ConfigError(
        f"checkpoint {path} was written by megatron-core {writer}, newer than the installed "
        f"{mcore_version_string()}, which cannot read its layout; fix: install megatron-core "
        f"{writer.lstrip('>= ')} or newer (within megatron-remoe's supported range), or load a "
        f"checkpoint written by {mcore_version_string()} or older")


def load_common_state(path: str) -> dict:
    """The common (non-sharded) state of checkpoint `path`, after the writer-version check."""
    from megatron.core import dist_checkpointing

    check_writer_version(path)
    return dist_checkpointing.load_common_state_dict(path)


def read_checkpoint_config(path: str):
    """(TrainConfig saved with checkpoint directory `path`, its common state dict)."""
    from megatron.remoe.arguments import FIELDS, TrainConfig

    try:
        common = load_common_state(path)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is one line
        raise ConfigError(f"cannot read checkpoint {path}: "
                          f"{' '.join(str(e).split())[:300] or type(e).__name__}") from None
    saved = common.get("config")
    if not saved:
        raise ConfigError(f"checkpoint {path} holds no training config (not written by "
                          "megatron.remoe?)")
    return TrainConfig(**{k: v for k, v in saved.items() if k in FIELDS}), common


def single_process_config(cfg):
    """The TrainConfig of the same model on one process (no model parallelism, fp32, local):
    what offline tools (conversion, analysis) rebuild a checkpoint's model with."""
    return dataclasses.replace(
        cfg, tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
        virtual_pipeline_model_parallel_size=None, expert_model_parallel_size=1,
        expert_tensor_parallel_size=None, context_parallel_size=1, sequence_parallel=False,
        recompute_granularity=None, recompute_modules=[], transformer_impl="local",
        moe_grouped_gemm=False, bf16=False, use_distributed_optimizer=False)


def find_loadable_checkpoint(root: str, log=print, checksums: bool = True,
                             skip: tuple = ()) -> Optional[str]:
    """find_latest_checkpoint for a running job: the files are verified in parallel by all ranks
    and every rank returns the same directory. `skip`: directories known not to load."""
    for path in checkpoint_candidates(root, log if _rank() == 0 else (lambda m: None)):
        if path in skip:
            continue
        reason = verify_checkpoint_distributed(path, checksums)
        if reason is None:
            return path
        if _rank() == 0:
            _warn_corrupt(log, path, reason)
    return None


def _norm_freq(value):
    if isinstance(value, str):
        value = [int(x) for x in value.strip("[]").split(",") if x.strip()] if "," in value \
            else int(value)
    return value


def check_checkpoint_matches(path: str, common: dict, cfg, vocab_size: Optional[int]) -> None:
    """ConfigError (one line, with the fix) when the common state of checkpoint `path` belongs to
    another model shape or padded vocabulary than this run's."""
    check_model_shape(path, common.get("config") or {}, cfg)
    saved_vocab = common.get("padded_vocab_size")
    if vocab_size is not None and saved_vocab is not None and saved_vocab != vocab_size:
        raise ConfigError(
            f"--load checkpoint {path} has a padded vocabulary of {saved_vocab}, this run "
            f"{vocab_size} (tokenizer, --vocab-size, --make-vocab-size-divisible-by or TP "
            f"differ); fix: use the tokenizer/vocabulary of the saved run, or another --load "
            f"directory")


def check_model_shape(path: str, saved: dict, cfg) -> None:
    """ConfigError (one line, with the fix) when checkpoint `path` holds another model shape."""
    fields = [f for f in MODEL_SHAPE_FIELDS
              if not (f in _MOE_ONLY_FIELDS and "dense" in (saved.get("router"), cfg.router))]
    for name in fields:
        if name not in saved:
            continue
        then, now = saved[name], getattr(cfg, name)
        if name == "moe_layer_freq":
            then, now = _norm_freq(then), _norm_freq(now)
        elif name == "kv_channels":  # None means hidden / heads: compare the head widths
            then = then or saved.get("hidden_size", 0) // max(saved.get("num_attention_heads")
                                                                or 1, 1)
            now = now or cfg.hidden_size // max(cfg.num_attention_heads or 1, 1)
        if then != now:
            flag_value = ",".join(map(str, then)) if isinstance(then, list) else then
            raise ConfigError(
                f"--load checkpoint {path} holds a different model: {name}={then!r} there, "
                f"{now!r} in this run; fix: set --{name.replace('_', '-')} {flag_value} (or "
                f"--config {os.path.join(path, 'config.yaml')}), or use another --load directory")


def _check_optimizer_reshardable(path, saved: dict, now: dict, saved_cfg: dict, cfg,
                                 metadata: dict) -> None:
    """Refuse (with the fix) the layout changes whose optimizer state megatron-core cannot map."""
    fix = (f"resume with --no-load-optim (weights, lambda, scheduler position and data position "
           f"are still restored; Adam moments restart), or use the saved layout {saved}")
    model_dims = ("tp", "pp", "vp", "ep", "cp")
    if bool(saved_cfg.get("use_distributed_optimizer")) != cfg.use_distributed_optimizer:
        raise ConfigError(f"{path}: saved with use_distributed_optimizer="
                         f"{saved_cfg.get('use_distributed_optimizer')}, now "
                         f"{cfg.use_distributed_optimizer}; {fix}")
    changed = [d for d in model_dims if saved.get(d) != now.get(d)]
    if (cfg.use_distributed_optimizer and changed
            and metadata.get("distrib_optim_sharding_type") == "dp_reshardable"):
        raise ConfigError(f"{path}: distributed-optimizer state in 'dp_reshardable' format (saved "
                         f"without Transformer Engine/Apex) cannot move to another "
                         f"{'/'.join(changed).upper()} layout; {fix}")
    # expert parameters get their own optimizer only with EP > 1 (megatron-core's chained optimizer)
    if saved_cfg.get("router", "dense") != "dense" and \
            (saved.get("ep", 1) > 1) != (now.get("ep", 1) > 1):
        raise ConfigError(f"{path}: EP={saved.get('ep')} -> EP={now.get('ep')} changes the number of "
                         f"optimizers (experts get their own with EP > 1); {fix}")


def load_checkpoint(path: str, model, optimizer, scheduler, controller, cfg, log=print,
                    vocab_size: Optional[int] = None) -> dict:
    """Load `path` (a checkpoint directory) into the current layout; returns the common state
    (iteration, consumed_train_samples, layout, config, ...). A checkpoint of another model shape
    (or padded vocabulary, `vocab_size`) raises ConfigError before any tensor is read."""
    from megatron.core import dist_checkpointing
    from megatron.core.utils import unwrap_model

    common = load_common_state(path)
    check_checkpoint_matches(path, common, cfg, vocab_size)
    metadata = dist_checkpointing.load_content_metadata(path) or sharded_metadata()
    saved, now = common.get("layout") or {}, _layout(cfg)
    same_layout = saved == now
    if not cfg.no_load_optim:
        _check_optimizer_reshardable(path, saved, now, common.get("config") or {}, cfg, metadata)
    with_rng = same_layout and not cfg.no_load_rng
    if not same_layout and not cfg.no_load_rng:
        log(f"checkpoint: parallel layout changed ({common.get('layout')} -> {_layout(cfg)}): "
            "the state is re-sharded, RNG states are not restored")
    with_optimizer = not cfg.no_load_optim
    sd = _state_dict(model, optimizer, is_loading=True, with_optimizer=with_optimizer,
                     with_rng=with_rng, metadata=metadata)
    state = dist_checkpointing.load(sd, path, strict="assume_ok_unexpected")
    model = unwrap_model(model)
    if len(model) == 1:
        model[0].load_state_dict(state["model"], strict=True)
    else:
        for i, chunk in enumerate(model):
            chunk.load_state_dict(state[f"model{i}"], strict=True)
    scheduler.load_state_dict(common["opt_param_scheduler"])
    if with_optimizer:
        # no_grad: megatron-core's distributed optimizer copies into fp32 main params that are views
        # of the (grad-requiring) model params; autograd refuses that in-place copy otherwise
        with torch.no_grad():
            optimizer.load_state_dict(state["optimizer"])
        _restore_torch_adam_steps(optimizer, state["optimizer"])
    else:
        # fresh optimizer: the fp32 master weights must follow the loaded model weights
        optimizer.reload_model_params()
    if with_rng:
        _set_rng_state(state["rng_state"])
    if controller is not None:
        if common.get("controller") is None:
            raise ConfigError(f"{path} has no sparsity-controller state (saved from a run "
                             "without --router relu?); cannot resume a ReLU-routed run from it")
        controller.load_state_dict(common["controller"])
    return common
