import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
os.environ.setdefault("OMP_NUM_THREADS", "1")

# The core subset (`pytest -m core`): what proves the product on a megatron-core release. CI runs it
# on the newest release (Python 3.12 lane, .ci/run) and scripts/version_matrix.sh on every minor in
# the supported range. Node ids or their prefixes; kept here, in one place.
CORE_TESTS = (
    "tests/test_compat.py",  # router installation guard, signatures, numbering, layout, noise
    "tests/test_router.py",  # router/regulariser/controller numerics, MoE layer vs dense reference
    "tests/test_router_counts.py",
    "tests/test_moe_parallel.py::test_single_process_matches_dense_reference",
    "tests/test_moe_parallel.py::test_layout_matches_single_process[ep2_alltoall]",
    "tests/test_moe_parallel.py::test_layout_matches_single_process[ep2_allgather]",
    "tests/test_moe_parallel.py::test_layout_matches_single_process[tp2_sp]",
    "tests/test_sparsity_training.py",  # ReLU routers train, sparsity moves toward 1 - k/E
    "tests/test_train_loop.py::test_single_process_trains_and_logs",
    "tests/test_train_loop.py::test_resume_equals_uninterrupted_run",  # save -> resume, bit-exact
    "tests/test_parity.py::test_relu_parity[tp2_ep2]",  # TP2 x EP2 (4 processes) vs 1 process
    "tests/test_parity.py::test_exact_resume[tp2_ep2]",
    "tests/test_hf_cli.py::test_tp2_ep2_checkpoint_convert_verify_evaluate_and_back",  # --verify
    "tests/test_reliability.py::test_unloadable_checkpoints_fall_back_or_stop_with_exit_2",
)


def pytest_configure(config):
    config.addinivalue_line("markers", "core: the core subset (tests/conftest.py CORE_TESTS)")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if any(item.nodeid == t or item.nodeid.startswith(t + "::") or
               (t.endswith(".py") and item.nodeid.startswith(t)) for t in CORE_TESTS):
            item.add_marker(pytest.mark.core)


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
