"""TEST ONLY: the fault-injection hooks of the trainer, read from the environment in one place.

The reliability tests and the chaos harness (tools/chaos_resume.py) start real training processes
and steer them with these variables; unset, every hook does nothing:

* REMOE_TEST_HOOK_PHASE_FILE=path: rank 0 writes what it is doing ('step N', 'microbatch K N',
  'eval N', 'save N', 'saved N', 'done N') there, so the harness can kill the run during a save,
  an evaluation or a step.
* REMOE_TEST_HOOK_STEP_SLEEP_S=s: sleep s seconds after each step (a slow step to signal into).
* REMOE_TEST_HOOK_NAN_AT=3,5: put a NaN into one gradient (the first router weight, else the first
  parameter) at those iterations, after the data-parallel reduction;
  REMOE_TEST_HOOK_NAN_RANK=r restricts it to global rank r.

(The checkpoint writer's own hooks, REMOE_TEST_HOOK_SAVE_*, live in checkpointing.py.)
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Optional

import torch.distributed as dist
from megatron.core.utils import unwrap_model  # megatron-core after cpu_backend (lazy)

from megatron.remoe.logs import is_rank0


@dataclass
class TestHooks:
    phase_file: Optional[str] = None
    step_sleep_s: float = 0.0
    nan_at: frozenset = field(default_factory=frozenset)
    nan_rank: Optional[int] = None

    __test__ = False  # not a pytest test class

    @classmethod
    def from_env(cls) -> "TestHooks":
        env = os.environ
        rank = env.get("REMOE_TEST_HOOK_NAN_RANK")
        return cls(phase_file=env.get("REMOE_TEST_HOOK_PHASE_FILE") or None,
                   step_sleep_s=float(env.get("REMOE_TEST_HOOK_STEP_SLEEP_S", "0")),
                   nan_at=frozenset(int(x) for x in env.get("REMOE_TEST_HOOK_NAN_AT", "").split(",")
                                    if x.strip()),
                   nan_rank=int(rank) if rank is not None else None)

    def phase(self, phase: str, iteration: int) -> None:
        if self.phase_file and is_rank0():
            with open(self.phase_file, "w", encoding="utf-8") as fh:
                fh.write(f"{phase} {iteration}\n")

    def micro_batch_phases(self, iterator, run):
        """'microbatch K N' before each training micro-batch (when a phase file is set)."""
        if not self.phase_file:
            return iterator

        def phases():
            count = 0
            for item in iterator:
                self.phase(f"microbatch {count % run.num_micro_batches}", run.iteration + 1)
                count += 1
                yield item

        return phases()

    def after_step(self) -> None:
        if self.step_sleep_s:
            time.sleep(self.step_sleep_s)

    def inject_nan(self, run) -> None:
        if run.iteration + 1 not in self.nan_at:
            return
        if self.nan_rank is not None and self.nan_rank != dist.get_rank():
            return

        params = list(unwrap_model(run.model)[0].named_parameters())
        name, param = next(((n, p) for n, p in params if "router" in n), params[0])
        grad = getattr(param, "main_grad", None)
        (grad if grad is not None else param.grad).view(-1)[0] = float("nan")
