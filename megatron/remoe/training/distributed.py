"""Process-group set-up: torch.distributed + megatron-core parallel state, on CPU (gloo) or GPU (NCCL)."""

from __future__ import annotations

import ctypes
import datetime
import os
import random
import signal
import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

from megatron.remoe.cpu.backend import apply_cpu_backend, cpu_backend_needed, default_backend


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    expert_model_parallel_size: int = 1
    context_parallel_size: int = 1
    expert_tensor_parallel_size: int | None = None
    virtual_pipeline_model_parallel_size: int | None = None


def set_parent_death_signal(signum: int) -> bool:
    """Ask the kernel to send `signum` to this process when its parent dies (Linux
    PR_SET_PDEATHSIG; False elsewhere). Used so that no trainer worker or checkpoint writer lives
    on as an orphan after its launcher or trainer was killed."""
    if not sys.platform.startswith("linux"):
        return False

    try:
        return ctypes.CDLL(None, use_errno=True).prctl(1, int(signum), 0, 0, 0) == 0
    except (OSError, AttributeError):  # pragma: no cover
        return False


def init_distributed(parallel: ParallelConfig, seed: int = 1234, backend: str | None = None,
                     timeout_minutes: int = 10) -> torch.device:
    """Initialise torch.distributed from the torchrun environment (or as a single process), then
    megatron-core's model-parallel groups, and seed every RNG (`seed_everything`). Returns the
    device to use."""
    apply_cpu_backend()
    if os.environ.get("TORCHELASTIC_RUN_ID") and set_parent_death_signal(signal.SIGTERM) and \
            os.getppid() == 1:  # a torchrun worker: stop (saving) if torchrun is killed
        os.kill(os.getpid(), signal.SIGTERM)
    if not dist.is_initialized():
        rank = int(os.environ.get("RANK", "0"))
        world = int(os.environ.get("WORLD_SIZE", "1"))
        backend = backend or default_backend()
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        # A lone process needs no rendezvous: an in-memory store, so no port is picked and none can
        # collide with a MASTER_PORT inherited from a parent still listening on it.
        store = dist.HashStore() if world == 1 else None
        dist.init_process_group(backend=backend, rank=rank, world_size=world, store=store,
                                timeout=datetime.timedelta(minutes=timeout_minutes))
    world = dist.get_world_size()
    model_parallel = (parallel.tensor_model_parallel_size * parallel.pipeline_model_parallel_size
                      * parallel.context_parallel_size)
    if world % model_parallel:
        raise ValueError(
            f"world size {world} is not divisible by TP*PP*CP = {model_parallel}; "
            "change the parallel sizes or the number of processes")

    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=parallel.tensor_model_parallel_size,
            pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
            virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_model_parallel_size,
            context_parallel_size=parallel.context_parallel_size,
            expert_model_parallel_size=parallel.expert_model_parallel_size,
            expert_tensor_parallel_size=parallel.expert_tensor_parallel_size,
            distributed_timeout_minutes=timeout_minutes,
        )
    apply_cpu_backend()  # patch megatron.core modules imported during initialisation
    seed_everything(seed)
    if cpu_backend_needed():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def seed_everything(seed: int) -> None:
    """Megatron-LM's seeding (python, numpy, torch, megatron-core's model-parallel RNG tracker): a
    different stream per pipeline stage (so stages do not initialise identical layers), the same
    across TP/DP ranks (CPU init then splits identical weights). Called by `init_distributed`."""
    seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def destroy_distributed() -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


class CollectiveFailure(RuntimeError):
    """A collective with the other ranks failed or timed out (--distributed-timeout-minutes):
    another rank most likely died (killed, out of memory, node lost) or hangs. This rank stops
    instead of waiting until the job's wall-clock limit; the message names the last checkpoint."""


# What gloo / NCCL / the TCP store say when a peer is gone or a collective timed out.
_PEER_GONE = ("connection closed by peer", "connection reset by peer", "broken pipe",
              "timed out", "timeout", "connection refused", "socket", "nccl communicator was "
              "aborted", "watchdog caught collective operation", "unhandled system error")


def is_collective_failure(error: BaseException) -> bool:
    """Does `error` (raised inside a collective) mean a peer died, hung or is unreachable?"""
    dist_error = getattr(dist, "DistError", None)
    if dist_error is not None and isinstance(error, dist_error):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and any(p in text for p in _PEER_GONE)


def collective_failure(error: BaseException, where: str, last_checkpoint, load_hint,
                       timeout_minutes: float) -> CollectiveFailure:
    """The one-line CollectiveFailure for a peer failure seen `where` (e.g. 'at iteration 5')."""
    detail = next((ln.strip() for ln in reversed(str(error).splitlines()) if ln.strip()),
                  type(error).__name__)[:200]
    rank = dist.get_rank() if dist.is_initialized() else 0
    kind = "timed out" if "time" in detail.lower() else "failed"
    saved = (f"the last complete checkpoint is {last_checkpoint}" if last_checkpoint
             else "no checkpoint of this run yet")
    return CollectiveFailure(
        f"rank {rank}: a collective with the other ranks {kind} {where} ({detail}); another rank "
        f"probably died (killed, out of memory, node failure) or hangs (--distributed-timeout-"
        f"minutes {timeout_minutes:g}); {saved}; fix: check the other ranks' logs, then resume "
        f"with {load_hint}")
