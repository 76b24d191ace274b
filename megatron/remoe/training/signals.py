"""Preemption signals and step-boundary decisions that every rank takes together.

A signal handler only sets a local flag (SIGTERM from a scheduler or `kill`, SIGUSR1 from SLURM's
`--signal=USR1@<seconds>` pre-timeout warning). At each step boundary the trainer all-reduces
(MAX, over the whole world) one small vector of such local flags -- signal received, wall-clock
budget used up, non-finite loss or gradient -- so that all ranks take the same branch (save and
exit, skip the step, stop) even when only one of them got the signal or saw the NaN. That is one
extra all-reduce of a few floats per step.

A second delivery of the same signal while the first is still pending restores the default action
and re-raises it: a stuck job can still be terminated the usual way.
"""

from __future__ import annotations

import os
import signal
from typing import Optional, Sequence

import torch
import torch.distributed as dist

EXIT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class ExitSignalHandler:
    """Record SIGTERM / SIGUSR1 instead of dying; `received` names the first one seen."""

    def __init__(self, signals: Sequence[int] = EXIT_SIGNALS):
        self.signals = tuple(signals)
        self.received: Optional[str] = None
        self._previous: dict = {}

    def __enter__(self) -> "ExitSignalHandler":
        self.install()
        return self

    def __exit__(self, *exc) -> None:
        self.restore()

    def install(self) -> None:
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.received == name:  # asked twice: give up on the graceful path
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        if self.received is None:
            self.received = name

    @property
    def pending(self) -> bool:
        return self.received is not None


def agree(flags: Sequence, device: torch.device) -> list:
    """Element-wise MAX of `flags` (floats or scalar tensors) over all ranks; one all-reduce, one
    host sync. Without a process group: the flags themselves."""
    values = torch.stack([torch.as_tensor(f, dtype=torch.float32).to(device).reshape(())
                          for f in flags])
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return [float(v) for v in values.cpu()]
