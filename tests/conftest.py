import os
import sys

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")

# Kinds of tests are marked at the test (`@pytest.mark.multiprocess`) or for a whole file
# (`pytestmark`); the markers are registered in pyproject.toml ([tool.pytest.ini_options], with
# --strict-markers). The fast unit tests are the unmarked ones:
# `pytest -m "not multiprocess and not slow and not gpu"`.


def pytest_addoption(parser):
    parser.addoption("--full", action="store_true",
                     help="also run the tests marked `full` (heavy duplicates of cheaper checks)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--full"):
        return
    skip = pytest.mark.skip(reason="a heavy duplicate of a cheaper check; runs with --full")
    for item in items:
        if item.get_closest_marker("full"):
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def fresh_moe_aux_loss_scale():
    """megatron-core keeps the aux-loss gradient scale in a class attribute that a pipeline
    schedule sets in place (`copy_`) and a bare forward/backward initialises: its shape then
    depends on which test ran before (per-token mode passes a [1] tensor; 0.16 starts from a []
    one). Every test starts from the value it had before the previous test."""
    moe_utils = sys.modules.get("megatron.core.transformer.moe.moe_utils")
    scaler = getattr(moe_utils, "MoEAuxLossAutoScaler", None)
    saved = getattr(scaler, "main_loss_backward_scale", None)
    saved = saved.clone() if saved is not None else None
    yield
    if scaler is not None:
        scaler.main_loss_backward_scale = saved


@pytest.fixture(scope="module")
def single_rank():
    """A one-process gloo world with megatron-core's parallel state (TP=PP=EP=1)."""
    import torch

    from megatron.remoe.training.distributed import ParallelConfig, destroy_distributed, init_distributed

    destroy_distributed()
    os.environ.pop("MASTER_PORT", None)
    init_distributed(ParallelConfig(), seed=1234)
    torch.set_num_threads(1)
    yield
    destroy_distributed()


# ------------------------------------------------------------------------------------------------
# No process left behind: every process this test session starts inherits REMOE_TEST_SESSION (the
# trainer subprocesses, their torchrun workers, megatron-core's checkpoint writers, multiprocessing
# helpers). After each test module, any such process still alive that is not a multiprocessing
# helper owned by this pytest process itself (those end with it) fails the module, and is killed.
# ------------------------------------------------------------------------------------------------
SESSION_TOKEN = f"{os.getpid()}-{os.urandom(4).hex()}"
os.environ["REMOE_TEST_SESSION"] = SESSION_TOKEN
_OWN_HELPERS = ("multiprocessing.resource_tracker", "multiprocessing.spawn",
                "multiprocessing.forkserver")


def processes_left_behind() -> list:
    """psutil.Process objects started by this session that are still alive (see above)."""
    import psutil

    me, left = os.getpid(), []
    for proc in psutil.process_iter():
        if proc.pid == me:
            continue
        try:
            if proc.environ().get("REMOE_TEST_SESSION") != SESSION_TOKEN:
                continue
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            if proc.ppid() == me and any(h in " ".join(proc.cmdline()) for h in _OWN_HELPERS):
                continue
        except (psutil.Error, OSError):
            continue
        left.append(proc)
    return left


@pytest.fixture(scope="module", autouse=True)
def no_process_left_behind(request):
    yield
    import time

    import psutil

    deadline = time.time() + 10.0  # a killed trainer's workers take a moment to go
    left = processes_left_behind()
    while left and time.time() < deadline:
        time.sleep(0.2)
        left = processes_left_behind()
    if not left:
        return
    described = []
    for proc in left:
        try:
            described.append(f"pid {proc.pid} (parent {proc.ppid()}): "
                             f"{' '.join(proc.cmdline())[:160]}")
            proc.kill()
        except psutil.Error:
            pass
    pytest.fail(f"{request.module.__name__} left {len(left)} process(es) behind:\n  "
                + "\n  ".join(described), pytrace=False)
