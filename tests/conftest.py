import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="module")
def single_rank():
    """A one-process gloo world with megatron-core's parallel state (TP=PP=EP=1)."""
    import torch

    from megatron.remoe.distributed import ParallelConfig, destroy_distributed, init_distributed

    destroy_distributed()
    os.environ.pop("MASTER_PORT", None)
    init_distributed(ParallelConfig(), seed=1234)
    torch.set_num_threads(1)
    yield
    destroy_distributed()
