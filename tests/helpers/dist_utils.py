"""Run a test body in N real processes with gloo, with a hard timeout.

Each worker gets (rank, world_size, *args) and returns a picklable result; `run_workers` returns the
list of results by rank. A worker exception or a hang (distributed deadlock) fails the test fast.
"""

from __future__ import annotations

import os
import pickle
import traceback

import torch.multiprocessing as mp

from tools.parity.tiny_gpt import free_port


def _entry(fn, rank, world_size, port, queue, args):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    import torch

    torch.set_num_threads(1)
    try:
        # Plain pickle, not the queue's ForkingPickler: torch would pass tensors as shared-memory file
        # descriptors, which vanish if this process exits before the parent reads them (flaky CI).
        queue.put((rank, "ok", pickle.dumps(fn(rank, world_size, *args))))
    except BaseException:  # report everything, including assertion errors, to the parent
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        try:
            from megatron.remoe.training.distributed import destroy_distributed

            destroy_distributed()
        except Exception:
            pass


def run_workers(fn, world_size: int, *args, timeout: float = 180.0):
    """Spawn `world_size` processes running fn(rank, world_size, *args); return results by rank."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(fn, r, world_size, port, queue, args), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    results, errors = {}, []
    import queue as queue_mod

    try:
        for _ in range(world_size):
            try:
                rank, status, payload = queue.get(timeout=timeout)
            except queue_mod.Empty:
                raise TimeoutError(f"distributed workers did not finish within {timeout:.0f}s "
                                   f"(deadlock?); finished ranks: {sorted(results)}")
            if status == "error":
                errors.append(f"rank {rank}:\n{payload}")
                break
            results[rank] = pickle.loads(payload)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    if errors:
        raise AssertionError("worker failed:\n" + "\n".join(errors))
    return [results[r] for r in range(world_size)]
