"""Process-group set-up: torch.distributed + megatron-core parallel state, on CPU (gloo) or GPU (NCCL)."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron.remoe.cpu_backend import apply_cpu_backend, cpu_backend_needed, default_backend


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    expert_model_parallel_size: int = 1
    context_parallel_size: int = 1
    expert_tensor_parallel_size: int | None = None
    virtual_pipeline_model_parallel_size: int | None = None


def init_distributed(parallel: ParallelConfig, seed: int = 1234, backend: str | None = None,
                     timeout_minutes: int = 10) -> torch.device:
    """Initialise torch.distributed from the torchrun environment (or as a single process), then
    megatron-core's model-parallel groups and RNG. Returns the device to use."""
    apply_cpu_backend()
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
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

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
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    if cpu_backend_needed():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def destroy_distributed() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0
