"""Write failures while a checkpoint is saved (docs/reliability.md): disk full, permission lost and
I/O errors injected into the real save path (REMOE_TEST_HOOK_SAVE_FAIL: inside megatron-core's
shard writers, or where rank 0 writes the manifest or the tracker).

Each one: exit code 4 and one line naming the iteration, the error and the fix; the partial
checkpoint is gone (no iter_XXXXXXX.tmp, no incomplete iter_XXXXXXX); the previous checkpoint
verifies and the run resumes from it to the end with metrics.jsonl holding each iteration once.
With two ranks, a failure on rank 1 stops both ranks (no hang).
"""

import os
import re

import pytest

from tests.helpers.pretrain_utils import run_pretrain
from tools.parity.tiny_gpt import MODEL, read_metrics

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(240)]

ITERS = 6
BASE = MODEL + ["--mock-data", "--vocab-size", "256", "--eval-iters", "0",
                "--train-iters", str(ITERS), "--save-interval", "2"]
ERRORS = {"ENOSPC": "No space left on device", "EACCES": "Permission denied",
          "EIO": "Input/output error"}


def tracker(save):
    with open(os.path.join(save, "latest_checkpointed_iteration.txt")) as fh:
        return int(fh.read())


def check_failed_save(proc, save, code, stage):
    from megatron.remoe.training.checkpointing import verify_checkpoint

    err = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(err) == 1, proc.stderr[-3000:]
    line = err[0]
    assert f"saving checkpoint iteration 4 to {save} failed" in line, line
    assert ERRORS[code] in line and "fix: free space or restore write access" in line, line
    assert not [n for n in os.listdir(save) if n.endswith(".tmp")], os.listdir(save)
    assert tracker(save) == 2
    if stage == "tracker":  # renamed, then the tracker write failed: complete and verifiable
        assert "iter_0000004 is complete but the tracker was not updated" in line
        assert verify_checkpoint(os.path.join(save, "iter_0000004")) is None
    else:
        assert "the previous checkpoint " + os.path.join(save, "iter_0000002") + " is intact" \
            in line
        assert not os.path.exists(os.path.join(save, "iter_0000004"))
    assert verify_checkpoint(os.path.join(save, "iter_0000002"), checksums=True) is None
    return line


def resume_to_the_end(save, expect_from):
    out = run_pretrain(BASE + ["--save", save, "--load", save])
    assert f"resumed from {os.path.join(save, f'iter_{expect_from:07d}')}" in out.stdout
    iterations = [r["iteration"] for r in read_metrics(os.path.join(save, "metrics.jsonl"))]
    assert iterations == list(range(1, ITERS + 1))  # replayed steps not duplicated
    assert tracker(save) == ITERS


@pytest.mark.parametrize("stage,code", [("shards", "ENOSPC"), ("manifest", "EACCES"),
                                        ("tracker", "EIO")])
def test_write_failure_keeps_previous_checkpoint_and_exits_4(tmp_path, stage, code):
    save = str(tmp_path / "ckpt")
    proc = run_pretrain(BASE + ["--save", save, "--load", save], expect_rc=4,
                        env={"REMOE_TEST_HOOK_SAVE_FAIL": f"4:{stage}:{code}"})
    check_failed_save(proc, save, code, stage)
    # the failed save was the last thing done: nothing was logged for later iterations
    assert max(r["iteration"] for r in read_metrics(os.path.join(save, "metrics.jsonl"))) == 4
    resume_to_the_end(save, 4 if stage == "tracker" else 2)


def test_write_failure_on_rank_1_stops_both_ranks(tmp_path):
    save = str(tmp_path / "ckpt")
    proc = run_pretrain(BASE + ["--save", save], nproc=2, expect_rc=None, timeout=150,
                        env={"REMOE_TEST_HOOK_SAVE_FAIL": "4:shards:ENOSPC:1"})
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr
    codes = re.findall(r"exitcode\s+: (-?\d+)", text)
    assert codes and set(codes) <= {"4", "-15"}, text[-3000:]  # torchrun may stop the second
    line = check_failed_save(proc, save, "ENOSPC", "shards")
    assert "rank 1: [Errno 28]" in line, line
