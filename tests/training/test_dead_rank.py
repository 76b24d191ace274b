"""A dead or hung rank (docs/reliability.md): two trainer processes started directly (one per rank,
as srun does; no torchrun to clean up after them), gloo. Mid-run, rank 1 is killed (kill -9) or
frozen (SIGSTOP). Rank 0 must exit by itself within a bounded time -- at once when the peer's
sockets close, after --distributed-timeout-minutes when the peer hangs -- with exit code 5 and one
line naming the likely cause and the last checkpoint, which verifies."""

import os
import signal
import subprocess
import time

import pytest

from tests.helpers.paths import ROOT
from tests.helpers.pretrain_utils import pretrain_cmd
from tools.parity.tiny_gpt import MODEL, free_port, pretrain_env, read_metrics

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(180)]

TIMEOUT_MIN = 0.25  # --distributed-timeout-minutes: 15 s


def start_rank(rank, port, args, log_path):
    env = pretrain_env({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
                        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                        "REMOE_TEST_HOOK_STEP_SLEEP_S": "0.3"})
    with open(log_path, "w") as log:
        return subprocess.Popen(pretrain_cmd(1) + args, stdout=log, stderr=subprocess.STDOUT,
                                env=env, cwd=ROOT, start_new_session=True)


@pytest.mark.parametrize("how", ["kill9", "sigstop"])
def test_rank_0_stops_when_rank_1_dies_or_hangs(tmp_path, how):
    from megatron.remoe.training.checkpointing import verify_checkpoint

    save = str(tmp_path / "ckpt")
    args = MODEL + ["--mock-data", "--vocab-size", "256", "--eval-iters", "0",
                    "--train-iters", "200", "--save-interval", "2", "--save", save,
                    "--distributed-timeout-minutes", str(TIMEOUT_MIN)]
    port = free_port()
    logs = [str(tmp_path / f"rank{r}.log") for r in (0, 1)]
    procs = [start_rank(r, port, args, logs[r]) for r in (0, 1)]
    try:
        metrics = os.path.join(save, "metrics.jsonl")
        deadline = time.time() + 120
        while not (os.path.exists(metrics) and len(read_metrics(metrics)) >= 3):
            assert all(p.poll() is None for p in procs), open(logs[0]).read()[-3000:]
            assert time.time() < deadline, "no progress"
            time.sleep(0.05)
        os.kill(procs[1].pid, signal.SIGKILL if how == "kill9" else signal.SIGSTOP)
        bound = 60 + (TIMEOUT_MIN * 60 if how == "sigstop" else 0)
        try:
            rc = procs[0].wait(timeout=bound)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"rank 0 still running {bound:.0f} s after rank 1 {how}")
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=30)
    text = open(logs[0]).read()
    assert rc == 5, text[-3000:]
    errors = [ln for ln in text.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1, text[-3000:]
    line = errors[0]
    assert "rank 0: a collective with the other ranks" in line
    assert "another rank probably died (killed, out of memory, node failure) or hangs" in line
    assert f"--distributed-timeout-minutes {TIMEOUT_MIN:g}" in line
    assert f"fix: check the other ranks' logs, then resume with --load {save}" in line
    if how == "sigstop":  # only the timeout can end this wait
        assert "timed out" in line, line
    with open(os.path.join(save, "latest_checkpointed_iteration.txt")) as fh:
        last = os.path.join(save, f"iter_{int(fh.read()):07d}")
    assert f"the last complete checkpoint is {last}" in line, line
    assert verify_checkpoint(last, checksums=True) is None
    assert not os.path.exists(os.path.join(save, "run.lock"))  # released on the way out
