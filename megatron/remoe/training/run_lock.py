"""One writer per `--save` directory: a lock file with a heartbeat.

`DIR/run.lock` holds JSON {host, pid, started (unix time), token}. The run that holds it refreshes
the file's mtime every `heartbeat_s` seconds from a daemon thread (rank 0 only). Another trainer
pointed at DIR reads it and

* refuses to start (ConfigError: one line naming host and pid, exit 2, nothing written) while the
  lock is live;
* takes it over, with a warning, when it is stale:
  - the holder is on this host and its pid is gone (or is another process: pid reused), or
  - the heartbeat is older than `stale_after_s`, whatever the host. This is the rule that works on
    a shared filesystem, where a process on another node cannot be checked: a holder that stopped
    refreshing for that long is dead (kill -9, node lost) or frozen.

The rule assumes the hosts' clocks agree to well within `stale_after_s` (NTP). A holder frozen
longer than that (SIGSTOP, swapped out) loses the lock; it notices at its next check
(`RunLock.check`, called before each save) and stops instead of writing over the new holder.

Taking a lock is O_CREAT|O_EXCL (atomic on local disks and NFSv3+); a stale lock is first renamed
to a unique name, so of two trainers racing for the same stale lock only one wins.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from typing import Optional

import psutil

from megatron.remoe.errors import ConfigError
from megatron.remoe.logs import get_logger

logger = get_logger(__name__)

LOCK_FILE = "run.lock"
HEARTBEAT_S = 10.0  # how often the holder refreshes the lock's mtime
STALE_AFTER_S = 120.0  # a heartbeat older than this marks the lock stale, on any host


def lock_path(save_dir: str) -> str:
    return os.path.join(save_dir, LOCK_FILE)


def read_lock(save_dir: str) -> Optional[dict]:
    """The holder recorded in DIR/run.lock plus `age_s` (seconds since its last heartbeat), or
    None when there is no lock. An unreadable lock (a holder killed while writing it) counts as
    a holder of unknown identity."""
    path = lock_path(save_dir)
    try:
        mtime = os.stat(path).st_mtime
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except FileNotFoundError:
        return None
    try:
        info = json.loads(text)
        assert isinstance(info, dict)
    except (ValueError, AssertionError):
        info = {}
    info["age_s"] = max(time.time() - mtime, 0.0)
    return info


def _pid_matches(pid: int, started: Optional[float]) -> bool:
    """Is process `pid` on this host alive and the one that took the lock (pid not reused)?"""
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return started is None or proc.create_time() <= started + 2.0
    except ImportError:  # pragma: no cover
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
    except Exception:  # noqa: BLE001 -- NoSuchProcess, AccessDenied on a vanished pid
        return False


def stale_reason(info: dict, stale_after_s: float = STALE_AFTER_S) -> Optional[str]:
    """Why the lock described by `info` (read_lock) is stale, or None while it is live."""
    if info["age_s"] > stale_after_s:
        return f"no heartbeat for {info['age_s']:.0f} s (> {stale_after_s:.0f} s)"
    if info.get("host") == socket.gethostname() and isinstance(info.get("pid"), int):
        if not _pid_matches(info["pid"], info.get("started")):
            return f"process {info['pid']} on this host is gone"
    return None


def _describe(info: dict) -> str:
    started = info.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if started else "?"
    return (f"host {info.get('host', '?')}, pid {info.get('pid', '?')}, started {when}, last "
            f"heartbeat {info['age_s']:.0f} s ago")


def check_not_held(save_dir: str, stale_after_s: float = STALE_AFTER_S) -> Optional[str]:
    """ConfigError if a live run holds `save_dir`; returns the stale reason if there is a stale
    lock (taken over later by RunLock.acquire), else None. Reads only: safe on every rank before
    anything is written."""
    info = read_lock(save_dir) if save_dir else None
    if info is None:
        return None
    reason = stale_reason(info, stale_after_s)
    if reason is None:
        raise ConfigError(
            f"save={save_dir} is in use by another run ({_describe(info)}; lock "
            f"{lock_path(save_dir)}); fix: stop that run or use another --save directory (a "
            f"lock without heartbeat for {stale_after_s:.0f} s is taken over automatically)")
    return reason


class RunLock:
    """The lock of one `--save` directory, held by this process (rank 0) for the whole run."""

    def __init__(self, save_dir: str, heartbeat_s: float = HEARTBEAT_S,
                 stale_after_s: float = STALE_AFTER_S):
        self.save_dir, self.path = save_dir, lock_path(save_dir)
        self.heartbeat_s, self.stale_after_s = heartbeat_s, stale_after_s
        self.token = uuid.uuid4().hex
        self.info = {"host": socket.gethostname(), "pid": os.getpid(),
                     "started": round(time.time(), 3), "token": self.token}
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.lost: Optional[str] = None

    # -- taking and releasing ------------------------------------------------------------------
    def acquire(self) -> "RunLock":
        """Create the lock (taking over a stale one, with a warning) or raise ConfigError."""
        os.makedirs(self.save_dir, exist_ok=True)
        for _ in range(3):
            if self._create():
                self._start_heartbeat()
                return self
            reason = check_not_held(self.save_dir, self.stale_after_s)  # raises while live
            if reason is None:
                continue  # released meanwhile: try again
            info = read_lock(self.save_dir) or {"age_s": 0.0}
            aside = f"{self.path}.stale-{self.token}"
            try:
                os.rename(self.path, aside)  # atomic: of two racing trainers, one wins
            except FileNotFoundError:
                continue
            os.remove(aside)
            logger.warning(f"run-lock: WARNING: took over the stale lock of {self.save_dir} "
                           f"({_describe(info)}: {reason})")
        raise ConfigError(f"save={self.save_dir}: could not take the lock {self.path} (another "
                          "trainer keeps taking it); fix: make sure one run uses this directory")

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(self.info, fh)
            fh.flush()
            os.fsync(fh.fileno())
        return True

    def release(self) -> None:
        """Stop the heartbeat and remove the lock if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._ours():
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    # -- heartbeat -----------------------------------------------------------------------------
    def _ours(self) -> bool:
        try:
            with open(self.path, encoding="utf-8") as fh:
                return json.load(fh).get("token") == self.token
        except (OSError, ValueError, AttributeError):
            return False

    def _start_heartbeat(self) -> None:
        self._thread = threading.Thread(target=self._beat, name="remoe-run-lock", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            self.beat()

    def beat(self) -> None:
        """Refresh the heartbeat (mtime); note if the lock was taken over by another run."""
        if not self._ours():
            self.lost = self.lost or "the lock file was removed or taken over by another run"
            return
        try:
            os.utime(self.path)
        except OSError as e:  # e.g. the filesystem went read-only: next check() reports it
            self.lost = f"cannot refresh the heartbeat ({e.strerror})"

    def check(self) -> None:
        """ConfigError if this run no longer holds the lock (call before writing a checkpoint)."""
        if self.lost is None and not self._ours():
            self.lost = "the lock file was removed or taken over by another run"
        if self.lost:
            other = read_lock(self.save_dir)
            holder = f" (now {_describe(other)})" if other and other.get("token") else ""
            raise ConfigError(f"save={self.save_dir}: this run lost its lock: {self.lost}"
                              f"{holder}; stopped without saving to avoid two writers; fix: "
                              "make sure one run uses this directory, then resume with --load")
