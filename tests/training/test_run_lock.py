"""One writer per --save directory (megatron/remoe/training/run_lock.py, docs/reliability.md):

* in-process: a live lock refuses (one line naming host and pid), a lock whose pid is gone on this
  host or whose heartbeat is older than the stale limit (any host: the shared-filesystem rule) is
  taken over with a warning, the heartbeat refreshes the mtime, a holder notices a takeover;
* real processes: a second trainer on the directory of a running one exits 2 with one line and
  touches nothing; after kill -9 of the first, the next trainer takes the stale lock over, warns,
  resumes and finishes.
"""

import json
import os
import signal
import socket
import time

import pytest

from tests.helpers.log_lines import log_lines
from tests.helpers.pretrain_utils import run_pretrain, start_pretrain
from tools.parity.tiny_gpt import MODEL

pytestmark = pytest.mark.timeout(180)

BASE = MODEL + ["--mock-data", "--vocab-size", "256", "--eval-iters", "0", "--train-iters", "6",
                "--save-interval", "2"]


def write_lock(directory, host, pid, age_s, started=None):
    from megatron.remoe.training.run_lock import lock_path

    os.makedirs(directory, exist_ok=True)
    path = lock_path(str(directory))
    with open(path, "w") as fh:
        json.dump({"host": host, "pid": pid, "started": started or time.time() - age_s,
                   "token": "other"}, fh)
    then = time.time() - age_s
    os.utime(path, (then, then))
    return path


def test_live_lock_refuses_with_one_line_naming_the_holder(tmp_path):
    from megatron.remoe.errors import ConfigError
    from megatron.remoe.training.run_lock import RunLock, check_not_held

    path = write_lock(tmp_path, "node-7", 4242, age_s=3)  # another host, fresh heartbeat
    before = open(path).read(), os.stat(path).st_mtime_ns
    for attempt in (lambda: check_not_held(str(tmp_path)), lambda: RunLock(str(tmp_path)).acquire()):
        with pytest.raises(ConfigError) as e:
            attempt()
        msg = str(e.value)
        assert "\n" not in msg and "host node-7, pid 4242" in msg, msg
        assert "in use by another run" in msg and "fix: stop that run or use another --save" in msg
    assert (open(path).read(), os.stat(path).st_mtime_ns) == before  # untouched


def test_lock_of_a_dead_pid_on_this_host_is_taken_over(tmp_path):
    import subprocess
    import sys

    from megatron.remoe.training.run_lock import RunLock, read_lock

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # a pid that existed and is gone now
    write_lock(tmp_path, socket.gethostname(), child.pid, age_s=1)
    with log_lines() as notes:
        lock = RunLock(str(tmp_path), heartbeat_s=0.05).acquire()
    try:
        assert len(notes) == 1 and "took over the stale lock" in notes[0]
        assert f"process {child.pid} on this host is gone" in notes[0]
        info = read_lock(str(tmp_path))
        assert info["pid"] == os.getpid() and info["token"] == lock.token
    finally:
        lock.release()
    assert read_lock(str(tmp_path)) is None


def test_stale_heartbeat_on_another_host_is_taken_over(tmp_path):
    """Shared filesystem: the holder is on another node (its pid cannot be checked here); only
    the age of the heartbeat decides."""
    from megatron.remoe.errors import ConfigError
    from megatron.remoe.training.run_lock import RunLock

    write_lock(tmp_path, "node-7", 4242, age_s=30)
    with pytest.raises(ConfigError):  # 30 s old, limit 60 s: live
        RunLock(str(tmp_path), stale_after_s=60).acquire()
    with log_lines() as notes:
        lock = RunLock(str(tmp_path), stale_after_s=20).acquire()
    lock.release()
    assert "no heartbeat for 30 s (> 20 s)" in notes[0] and "host node-7, pid 4242" in notes[0]


def test_heartbeat_refreshes_and_a_takeover_is_noticed(tmp_path):
    from megatron.remoe.errors import ConfigError
    from megatron.remoe.training.run_lock import RunLock, lock_path

    lock = RunLock(str(tmp_path), heartbeat_s=0.05).acquire()
    try:
        path = lock_path(str(tmp_path))
        os.utime(path, (time.time() - 100, time.time() - 100))
        deadline = time.time() + 10
        while time.time() - os.stat(path).st_mtime > 50 and time.time() < deadline:
            time.sleep(0.02)
        assert time.time() - os.stat(path).st_mtime < 50  # refreshed by the thread
        lock.check()  # still ours
        write_lock(tmp_path, "node-9", 99, age_s=0)  # someone else took it (we were frozen)
        with pytest.raises(ConfigError, match="lost its lock.*host node-9, pid 99"):
            lock.check()
        assert lock.lost
    finally:
        lock.release()
    assert os.path.exists(lock_path(str(tmp_path)))  # not ours any more: left alone


# ------------------------------------------------------------------------------------------------
def snapshot(path):
    out = {}
    for base, dirs, files in os.walk(path):
        for name in dirs + files:
            full = os.path.join(base, name)
            st = os.stat(full)
            out[os.path.relpath(full, path)] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.mark.multiprocess
def test_second_trainer_refused_then_stale_lock_taken_over(tmp_path):
    save, log = str(tmp_path / "ckpt"), str(tmp_path / "first.log")
    first = start_pretrain(BASE + ["--save", save], log,
                           env={"REMOE_TEST_HOOK_STEP_SLEEP_S": "1.0"})
    try:
        deadline = time.time() + 120
        while not os.path.isdir(os.path.join(save, "iter_0000002")):
            assert first.poll() is None and time.time() < deadline, open(log).read()[-3000:]
            time.sleep(0.1)
        os.kill(first.pid, signal.SIGSTOP)  # frozen: any change below is the second trainer's
        before = snapshot(save)
        second = run_pretrain(BASE + ["--save", save, "--load", save], expect_rc=2, timeout=90)
        err = [ln for ln in second.stderr.splitlines() if ln.strip()]
        assert len(err) == 1, second.stderr
        assert f"host {socket.gethostname()}, pid {first.pid}" in err[0], err[0]
        assert "in use by another run" in err[0]
        assert snapshot(save) == before
        os.kill(first.pid, signal.SIGKILL)
    finally:
        if first.poll() is None:
            first.kill()
        first.wait(timeout=30)
    assert os.path.exists(os.path.join(save, "run.lock"))  # left behind by kill -9
    out = run_pretrain(BASE + ["--save", save, "--load", save])
    assert "run-lock: WARNING: took over the stale lock" in out.stdout, out.stdout[-3000:]
    assert f"process {first.pid} on this host is gone" in out.stdout
    assert "resumed from" in out.stdout
    assert not os.path.exists(os.path.join(save, "run.lock"))  # released at the end
