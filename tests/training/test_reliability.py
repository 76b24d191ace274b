"""Reliability of the trainer, with real processes and real signals (docs/reliability.md):

* kill -9 while a checkpoint is being saved (before and after the directory rename), then resume;
* SIGTERM mid-run -> checkpoint + exit 0 -> resume; SIGUSR1 to one rank of two -> both stop;
* the newest checkpoint corrupted -> --load falls back to the previous one with a warning;
* NaN gradients (test hook): --nan-policy stop exits 3 naming the iteration and the layers, saves
  nothing; skip-step skips and continues; the skip count is bounded; one rank's NaN stops all;
* --exit-duration-in-mins; keep-last-N retention never deletes the last good checkpoint.

Every resumed run is compared with one uninterrupted reference run: identical losses, lambda and
gradient norms at every iteration (CPU is bit-exact).
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers.log_lines import log_lines
from tests.helpers.paths import ROOT
from tests.helpers.pretrain_utils import run_pretrain, start_pretrain
from tools.parity.tiny_gpt import MODEL, read_metrics

pytestmark = pytest.mark.timeout(300)

ITERS = 8
BASE = MODEL + ["--mock-data", "--vocab-size", "256", "--eval-iters", "0",
                "--train-iters", str(ITERS), "--save-interval", "2"]
COMPARED = ("lm_loss", "moe_relu_l1_reg_coeff", "moe_relu_sparsity", "lr", "grad_norm")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run (keeping the last 2 checkpoints): {iteration: metrics}, save dir."""
    save = str(tmp_path_factory.mktemp("reference") / "ckpt")
    run_pretrain(BASE + ["--save", save, "--keep-last-n-checkpoints", "2"])
    return {"save": save, "metrics": by_iteration(os.path.join(save, "metrics.jsonl"))}


def by_iteration(path):
    """The last record of every iteration (a resumed run appends the iterations it redoes)."""
    return {r["iteration"]: r for r in read_metrics(path)}


def assert_same_as_reference(save, reference, iterations=range(1, ITERS + 1)):
    got = by_iteration(os.path.join(save, "metrics.jsonl"))
    assert sorted(got) == list(range(1, ITERS + 1))
    for it in iterations:
        for key in COMPARED:
            assert got[it][key] == reference["metrics"][it][key], (it, key)


def tracker(save):
    with open(os.path.join(save, "latest_checkpointed_iteration.txt")) as fh:
        return int(fh.read())


def wait_for(predicate, proc, timeout=150.0, what="condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"process exited ({proc.returncode}) before {what}")
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def finish(proc, timeout=150.0) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise AssertionError("process did not exit in time (deadlock?)")


def log_text(path):
    with open(path, encoding="utf-8", errors="replace") as fh:
        return fh.read()


def train_records(save):
    path = os.path.join(save, "metrics.jsonl")
    return read_metrics(path) if os.path.exists(path) else []


# ------------------------------------------------------------------------------------------------
@pytest.mark.multiprocess
def test_reference_keeps_last_two_verified_checkpoints(reference):
    from megatron.remoe.training.checkpointing import MANIFEST, verify_checkpoint

    save = reference["save"]
    dirs = sorted(n for n in os.listdir(save) if n.startswith("iter_"))
    assert dirs == ["iter_0000006", "iter_0000008"], dirs
    assert tracker(save) == 8
    for d in dirs:
        assert os.path.isfile(os.path.join(save, d, MANIFEST))
        assert verify_checkpoint(os.path.join(save, d), checksums=True) is None
    summary = json.load(open(os.path.join(save, "summary.json")))
    assert summary["exit_reason"] == "train_iters" and summary["skipped_steps"] == 0


@pytest.mark.multiprocess
@pytest.mark.parametrize("stage", ["shards", "rename"])
def test_kill9_during_save_then_resume(reference, tmp_path, stage):
    """SIGKILL while iteration 4 is being saved: before the manifest/rename (a .tmp directory is
    left) or after the rename but before the tracker update. Resuming loads the newest complete
    checkpoint and continues exactly like the uninterrupted run."""
    save, log = str(tmp_path / "ckpt"), str(tmp_path / "killed.log")
    proc = start_pretrain(BASE + ["--save", save], log,
                          env={"REMOE_TEST_HOOK_SAVE_PAUSE": f"4:{stage}"})
    try:
        wait_for(lambda: "save of iteration 4 paused" in log_text(log), proc,
                 what="the save of iteration 4")
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        rc = finish(proc)
    assert rc == -signal.SIGKILL
    assert tracker(save) == 2
    if stage == "shards":
        assert os.path.isdir(os.path.join(save, "iter_0000004.tmp"))
        assert not os.path.exists(os.path.join(save, "iter_0000004"))
        resumed_at = 2
    else:
        assert os.path.isdir(os.path.join(save, "iter_0000004"))
        resumed_at = 4
    out = run_pretrain(BASE + ["--save", save, "--load", save])
    assert f"resumed from {os.path.join(save, f'iter_{resumed_at:07d}')}" in out.stdout
    assert_same_as_reference(save, reference)
    assert not [n for n in os.listdir(save) if n.endswith((".tmp", ".deleting"))]
    assert tracker(save) == ITERS


@pytest.mark.multiprocess
def test_sigterm_mid_run_saves_exits_0_and_resumes_identically(reference, tmp_path):
    save, log = str(tmp_path / "ckpt"), str(tmp_path / "term.log")
    proc = start_pretrain(BASE + ["--save", save], log,
                          env={"REMOE_TEST_HOOK_STEP_SLEEP_S": "0.4"})
    try:
        wait_for(lambda: len(train_records(save)) >= 2, proc, what="two training steps")
        os.kill(proc.pid, signal.SIGTERM)
    finally:
        rc = finish(proc)
    text = log_text(log)
    assert rc == 0, text[-3000:]
    stopped = tracker(save)
    assert 2 <= stopped < ITERS, text[-2000:]
    assert f"exit: SIGTERM received; saving and stopping after iteration {stopped}" in text
    assert max(r["iteration"] for r in train_records(save)) == stopped
    summary = json.load(open(os.path.join(save, "summary.json")))
    assert summary["exit_reason"] == "SIGTERM" and summary["iterations"] == stopped
    out = run_pretrain(BASE + ["--save", save, "--load", save])
    assert f"iteration {stopped}," in out.stdout
    assert_same_as_reference(save, reference)


@pytest.mark.multiprocess
def test_sigusr1_on_one_rank_stops_both_ranks(tmp_path):
    """SLURM's pre-timeout signal reaching only rank 1 of 2: the flag is all-reduced at the step
    boundary, both ranks save the same iteration and exit 0."""
    import psutil

    from megatron.remoe.training.checkpointing import verify_checkpoint

    save, log = str(tmp_path / "ckpt"), str(tmp_path / "usr1.log")
    proc = start_pretrain(BASE + ["--save", save, "--use-distributed-optimizer"], log, nproc=2,
                          env={"REMOE_TEST_HOOK_STEP_SLEEP_S": "0.4"})
    try:
        wait_for(lambda: len(train_records(save)) >= 1, proc, timeout=120, what="a step")
        workers = [p for p in psutil.Process(proc.pid).children(recursive=True)
                   if p.environ().get("RANK") == "1"]
        assert len(workers) == 1
        workers[0].send_signal(signal.SIGUSR1)
    finally:
        rc = finish(proc, timeout=120)
    text = log_text(log)
    assert rc == 0, text[-3000:]
    stopped = tracker(save)
    assert stopped < ITERS
    assert f"exit: SIGUSR1 received (on another rank); saving and stopping after iteration " \
           f"{stopped}" in text
    assert verify_checkpoint(os.path.join(save, f"iter_{stopped:07d}")) is None


@pytest.mark.multiprocess
def test_corrupt_newest_checkpoint_falls_back_with_warning(reference, tmp_path):
    """Bytes of the newest checkpoint altered (same size: only the CRC32 can tell): --load warns,
    resumes from the previous checkpoint and reproduces the uninterrupted run."""
    save = str(tmp_path / "ckpt")
    shutil.copytree(reference["save"], save)
    newest = os.path.join(save, "iter_0000008")
    victim = max((os.path.join(newest, n) for n in os.listdir(newest)), key=os.path.getsize)
    with open(victim, "r+b") as fh:
        fh.seek(os.path.getsize(victim) // 2)
        block = fh.read(64)
        fh.seek(os.path.getsize(victim) // 2)
        fh.write(bytes(b ^ 0xFF for b in block))
    out = run_pretrain(BASE + ["--save", save, "--load", save, "--keep-last-n-checkpoints", "2"])
    assert "WARNING: iter_0000008" in out.stdout and "CRC32" in out.stdout, out.stdout[-2000:]
    assert "falling back to the previous checkpoint" in out.stdout
    assert f"resumed from {os.path.join(save, 'iter_0000006')}" in out.stdout
    assert_same_as_reference(save, reference)
    from megatron.remoe.training.checkpointing import verify_checkpoint

    assert verify_checkpoint(newest) is None  # saved again, whole


@pytest.mark.core
@pytest.mark.multiprocess
def test_unloadable_checkpoints_fall_back_or_stop_with_exit_2(reference, tmp_path):
    """A checkpoint without manifest (older format) whose load fails is skipped like a corrupt
    one; when no checkpoint is loadable the run stops with exit 2 and touches nothing (it does not
    silently start from scratch over them)."""
    from megatron.remoe.training.checkpointing import MANIFEST

    save = str(tmp_path / "ckpt")
    shutil.copytree(reference["save"], save)
    newest, previous = (os.path.join(save, f"iter_{i:07d}") for i in (8, 6))
    os.remove(os.path.join(newest, MANIFEST))  # unverifiable: only loading can tell
    shard = max((os.path.join(newest, n) for n in os.listdir(newest) if n.endswith(".distcp")),
                key=os.path.getsize)
    with open(shard, "r+b") as fh:
        fh.truncate(os.path.getsize(shard) // 2)
    os.rename(previous, previous + ".bak")
    shutil.copytree(previous + ".bak", previous)
    with open(common_state_file(previous), "r+b") as fh:
        fh.truncate(100)

    def state():
        return sorted((base, n, os.path.getsize(os.path.join(base, n)))
                      for base, _, files in os.walk(save) for n in files)

    before = state()
    proc = run_pretrain(BASE + ["--save", save, "--load", save], expect_rc=2)
    assert "loading " + newest + " failed" in proc.stdout, proc.stdout[-2000:]
    assert "WARNING: iter_0000006" in proc.stdout and "has 100 bytes" in proc.stdout
    err = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(err) == 1 and "no checkpoint there is loadable" in err[0], proc.stderr[-2000:]
    assert state() == before
    shutil.rmtree(previous)
    os.rename(previous + ".bak", previous)  # the previous checkpoint intact again
    out = run_pretrain(BASE + ["--save", save, "--load", save])
    assert "loading " + newest + " failed" in out.stdout
    assert f"resumed from {previous}" in out.stdout
    assert_same_as_reference(save, reference)


@pytest.mark.multiprocess
def test_nan_stop_policy_exits_3_naming_step_and_layers(tmp_path):
    save = str(tmp_path / "ckpt")
    proc = run_pretrain(BASE + ["--save", save, "--save-interval", "1"], expect_rc=3,
                        env={"REMOE_TEST_HOOK_NAN_AT": "3"})
    err = proc.stderr
    assert "error: non-finite loss or gradient at iteration 3" in err, err[-2000:]
    assert "--nan-policy stop" in err and "nothing saved for this iteration" in err
    assert "layer 1: non-finite grads in decoder.layers.0.mlp.router.weight (rank 0)" in err
    assert "layer 2: grads finite; sparsity" in err
    assert sorted(n for n in os.listdir(save) if n.startswith("iter_")) == \
        ["iter_0000001", "iter_0000002"]
    assert tracker(save) == 2
    assert max(r["iteration"] for r in train_records(save)) == 2
    assert not os.path.exists(os.path.join(save, "summary.json"))


@pytest.mark.multiprocess
def test_nan_skip_step_skips_and_continues(reference, tmp_path):
    save = str(tmp_path / "ckpt")
    proc = run_pretrain(BASE + ["--save", save, "--nan-policy", "skip-step"],
                        env={"REMOE_TEST_HOOK_NAN_AT": "3"})
    assert "iteration 3 (lm_loss" in proc.stdout and "step skipped" in proc.stdout
    got, ref = by_iteration(os.path.join(save, "metrics.jsonl")), reference["metrics"]
    assert sorted(got) == list(range(1, ITERS + 1))
    for it in (1, 2, 3):  # the forward pass of step 3 is unaffected by the injected gradient
        assert got[it]["lm_loss"] == ref[it]["lm_loss"]
    assert got[3]["update_skipped"] is True and got[3]["nonfinite"] is True
    assert got[3]["skipped_steps"] == 1
    # no scheduler and no lambda step at the skipped iteration
    assert got[3]["lr"] == ref[2]["lr"] and got[4]["lr"] == ref[3]["lr"]
    assert got[4]["moe_relu_l1_reg_coeff"] == got[3]["moe_relu_l1_reg_coeff"]
    assert all(got[it]["update_skipped"] is False for it in got if it != 3)
    summary = json.load(open(os.path.join(save, "summary.json")))
    assert summary["skipped_steps"] == 1 and summary["iterations"] == ITERS


@pytest.mark.multiprocess
def test_nan_on_one_rank_is_seen_by_all_and_skips_are_bounded(tmp_path):
    """NaN gradients on rank 1 only (after the DP reduction, so rank 0's are finite): both ranks
    skip iteration 2 together; at iteration 4 the bound (--max-skipped-steps 1) stops both
    (rank 0 reports it), without a hang and without saving."""
    save, log = str(tmp_path / "ckpt"), str(tmp_path / "nan2.log")
    proc = start_pretrain(BASE + ["--save", save, "--nan-policy", "skip-step",
                                  "--max-skipped-steps", "1"], log, nproc=2,
                          env={"REMOE_TEST_HOOK_NAN_AT": "2,4", "REMOE_TEST_HOOK_NAN_RANK": "1"})
    rc = finish(proc, timeout=120)
    text = log_text(log)
    assert rc != 0
    assert "non-finite loss or gradient at iteration 2" in text and "step skipped" in text
    assert "error: non-finite loss or gradient at iteration 4" in text, text[-3000:]
    assert "beyond --max-skipped-steps 1 (1 skipped already)" in text
    assert "non-finite grads in decoder.layers.0.mlp.router.weight (rank 1)" in text
    # rank 0 (finite gradients of its own) skipped iteration 2 and stopped at 4 with rank 1: it
    # printed both lines above. torchrun reports the first worker to exit (code 3) and then
    # terminates the other one, which may still be tearing down (SIGTERM, -15).
    codes = re.findall(r"exitcode\s+: (-?\d+)", text)
    assert "3" in codes and set(codes) <= {"3", "-15"}, text[-3000:]
    got = by_iteration(os.path.join(save, "metrics.jsonl"))
    assert sorted(got) == [1, 2, 3] and got[2]["nonfinite"] is True
    assert tracker(save) == 2


@pytest.mark.multiprocess
def test_exit_duration_in_mins_saves_and_exits_0(tmp_path):
    save = str(tmp_path / "ckpt")
    out = run_pretrain(BASE + ["--save", save, "--exit-duration-in-mins", "0.0001"])
    assert "exit: --exit-duration-in-mins 0.0001 reached after iteration 1" in out.stdout
    assert tracker(save) == 1
    assert json.load(open(os.path.join(save, "summary.json")))["exit_reason"] == \
        "exit_duration_in_mins"


# ------------------------------------------------------------------------------------------------
# In-process: manifest verification, fallback and retention on synthetic checkpoint directories
# ------------------------------------------------------------------------------------------------
def common_state_file(path):
    """The file of a real checkpoint that holds its common state: common.pt up to megatron-core
    0.18, a .distcp file from 0.19 on (the largest: it holds the common state too)."""
    from megatron.remoe.training.checkpointing import COMMON_PT

    if os.path.isfile(os.path.join(path, COMMON_PT)):
        return os.path.join(path, COMMON_PT)
    return max((os.path.join(path, n) for n in os.listdir(path) if n.endswith(".distcp")),
               key=os.path.getsize)


FAKE_FILES = (".metadata", "__0_0.distcp")  # torch_dist files of every megatron-core release


def fake_checkpoint(root, iteration, payload=b"x" * 100):
    """A directory with files and a manifest, as save_checkpoint writes them."""
    from megatron.remoe.training.checkpointing import MANIFEST, describe_files, iteration_dir

    path = iteration_dir(str(root), iteration)
    os.makedirs(path)
    for name in FAKE_FILES:
        with open(os.path.join(path, name), "wb") as fh:
            fh.write(payload)
    files = describe_files(path, list(FAKE_FILES), checksums=True)
    with open(os.path.join(path, MANIFEST), "w") as fh:
        json.dump({"iteration": iteration, "files": files}, fh)
    with open(os.path.join(str(root), "latest_checkpointed_iteration.txt"), "w") as fh:
        fh.write(f"{iteration}\n")
    return path


def truncate(path):
    with open(os.path.join(path, "__0_0.distcp"), "r+b") as fh:
        fh.truncate(10)


def test_find_latest_skips_truncated_and_altered_checkpoints(tmp_path):
    from megatron.remoe.training.checkpointing import MANIFEST, find_latest_checkpoint

    fake_checkpoint(tmp_path, 2)
    p4 = fake_checkpoint(tmp_path, 4)
    p6 = fake_checkpoint(tmp_path, 6)
    truncate(p6)
    with log_lines() as notes:
        assert find_latest_checkpoint(str(tmp_path)) == p4
        assert len(notes) == 1 and "iter_0000006" in notes[0] and "has 10 bytes" in notes[0]
        with open(os.path.join(p4, FAKE_FILES[0]), "r+b") as fh:  # same size, other bytes
            fh.write(b"y")
        assert find_latest_checkpoint(str(tmp_path)) == p4  # sizes only
        assert find_latest_checkpoint(str(tmp_path),
                                      checksums=True) == os.path.join(str(tmp_path), "iter_0000002")
        assert "CRC32" in notes[-1]
        with open(os.path.join(tmp_path, "iter_0000002", MANIFEST), "w") as fh:
            fh.write("{not json")
        assert find_latest_checkpoint(str(tmp_path), checksums=True) is None
        assert "unreadable" in notes[-1]


def test_checkpoint_without_manifest_is_accepted(tmp_path):
    """Directories written before manifests existed still load (unverified)."""
    from megatron.remoe.training.checkpointing import find_latest_checkpoint

    (tmp_path / "iter_0000003").mkdir()
    assert find_latest_checkpoint(str(tmp_path)) == str(tmp_path / "iter_0000003")


def test_retention_never_deletes_the_last_good_checkpoint(tmp_path):
    from megatron.remoe.training.checkpointing import prune_checkpoints

    p2 = fake_checkpoint(tmp_path, 2)
    p4 = fake_checkpoint(tmp_path, 4)
    p6 = fake_checkpoint(tmp_path, 6)
    truncate(p4)
    truncate(p6)
    (tmp_path / "iter_0000005.tmp").mkdir()  # a crashed save
    # only iter 2 verifies: keeping 1 keeps it, keeping 2 cannot be satisfied -> delete nothing
    assert prune_checkpoints(str(tmp_path), 1) == []
    assert prune_checkpoints(str(tmp_path), 2) == []
    assert os.path.isdir(p2) and os.path.isdir(p4) and os.path.isdir(p6)
    assert not (tmp_path / "iter_0000005.tmp").exists()  # leftovers of crashes are removed
    p8 = fake_checkpoint(tmp_path, 8)
    assert prune_checkpoints(str(tmp_path), 2) == []  # keeps 8 and 2
    p10 = fake_checkpoint(tmp_path, 10)
    deleted = prune_checkpoints(str(tmp_path), 2)
    assert deleted == [p2, p4, p6]  # older than the 2 newest good ones (10, 8)
    assert sorted(os.listdir(tmp_path)) == ["iter_0000008", "iter_0000010",
                                            "latest_checkpointed_iteration.txt"]
    assert os.path.isdir(p8) and os.path.isdir(p10)


@pytest.mark.multiprocess
def test_signal_handler_defers_then_second_signal_kills():
    """First SIGTERM only sets the flag; a second one restores the default action."""
    code = ("import os, signal, sys\n"
            "from megatron.remoe.training.signals import ExitSignalHandler, agree\n"
            "h = ExitSignalHandler(); h.install()\n"
            "os.kill(os.getpid(), signal.SIGTERM)\n"
            "assert h.received == 'SIGTERM' and agree([15.0, 0.0], 'cpu') == [15.0, 0.0]\n"
            "print('deferred', flush=True)\n"
            "os.kill(os.getpid(), signal.SIGTERM)\n"
            "print('survived', flush=True)\n")
    env = dict(os.environ, PYTHONPATH=ROOT, PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=60, cwd=ROOT)
    assert proc.stdout.strip() == "deferred", proc.stderr[-2000:]
    assert proc.returncode == -signal.SIGTERM


def test_metrics_file_is_truncated_to_the_resumed_iteration(tmp_path):
    """A resumed run drops the records it will replay (iterations > the checkpoint's) and a
    half-written last line, then does not repeat records it already has."""
    from megatron.remoe.training.metrics import MetricsLogger

    path = tmp_path / "metrics.jsonl"
    lines = [{"iteration": i, "split": "train", "lm_loss": 1.0 / i} for i in range(1, 6)]
    lines.insert(3, {"iteration": 3, "split": "valid", "valid/loss": 2.0})
    text = "".join(json.dumps(r) + "\n" for r in lines) + '{"iteration": 6, "spl'
    path.write_text(text)
    with log_lines() as notes:
        logger = MetricsLogger(True, str(path), resume_iteration=3)
    assert notes == [f"metrics: {path}: dropped 2 record(s) after iteration 3 (replayed by this run) "
                     "and 1 half-written line(s)"]
    logger.log(3, {"valid/loss": 2.0}, split="valid")  # already on file: not repeated
    logger.log(4, {"lm_loss": 0.3})
    logger.close()
    got = [json.loads(ln) for ln in path.read_text().splitlines()]
    assert [(r["split"], r["iteration"]) for r in got] == \
        [("train", 1), ("train", 2), ("train", 3), ("valid", 3), ("train", 4)]
    assert got[-1]["lm_loss"] == 0.3
    untouched = path.read_text()
    MetricsLogger(True, str(path), resume_iteration=None).close()  # no --load: append only
    assert path.read_text() == untouched
