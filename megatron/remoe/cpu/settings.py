"""What trains fastest on this CPU: native bf16 support, the thread count, torch's fused Adam and
glibc keeping freed tensor memory (used by the trainer, the demo and the benchmarks; measurements
in docs/performance.md)."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from typing import Optional

import torch


def cpu_bf16_supported() -> bool:
    """The CPU has native bf16 arithmetic (AVX512-BF16 or AMX tiles), so bf16 GEMMs run at about
    twice the fp32 rate instead of being emulated."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, p, lambda: False)() for p in probes)


def usable_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


# What `dtype="auto"` picks on a CPU with native bf16. Measured (docs/performance.md, "bf16 on
# CPU"): the demo trains 1.2-1.3x faster in bf16 on a 2-core Zen 4 (GEMMs 2.2x; casts, fp32 master
# weights and bf16 elementwise ops eat the rest), not enough to reach its throughput target, so
# auto keeps the demo's fp32 numerics; --dtype bf16 opts in.
AUTO_BF16_ON_NATIVE_CPUS = False


def demo_settings(nproc: int, threads: Optional[int] = None, dtype: str = "auto") -> dict:
    """Threads per process and dtype for CPU training runs of the demo: all usable cores split
    over the processes (GEMMs scale with threads; 1 process x 2 threads beats 2 x 1 here), and bf16
    where `dtype` asks for it or ("auto") where the CPU has native bf16 and
    AUTO_BF16_ON_NATIVE_CPUS.
    GPUs: the thread count is irrelevant and bf16 follows `dtype` ("auto": fp32, as before)."""
    if dtype not in ("auto", "fp32", "bf16"):
        raise ValueError(f"dtype={dtype!r}: use auto, fp32 or bf16")
    cuda = torch.cuda.is_available()
    native = cuda or cpu_bf16_supported()
    if dtype == "bf16" and not native:
        raise ValueError("--dtype bf16: this CPU has no native bf16 arithmetic (AVX512-BF16 or "
                         "AMX); use --dtype fp32")
    if dtype == "auto":
        bf16 = (not cuda) and native and AUTO_BF16_ON_NATIVE_CPUS
        why = "auto: " + ("native bf16 on this CPU" if bf16 else
                          "fp32; --dtype bf16 was 1.2-1.3x faster on a 2-core Zen 4" if native else
                          "fp32 (no native bf16 on this CPU)")
    else:
        bf16, why = dtype == "bf16", "asked for"
    return {"threads": threads or max(1, usable_cores() // max(nproc, 1)), "nproc": nproc,
            "bf16": bf16, "why": why, "cores": usable_cores()}


def describe_settings(settings: dict) -> str:
    return (f"{settings['nproc']} process(es) x {settings['threads']} thread(s) on "
            f"{settings['cores']} usable cores, {'bf16' if settings['bf16'] else 'fp32'} "
            f"({settings['why']})")


def use_fused_cpu_adam(optimizer) -> int:
    """Run the torch Adam/AdamW inside a megatron-core optimizer with torch's fused CPU kernel.

    Without Apex or Transformer Engine megatron-core builds a plain torch AdamW, whose default on
    CPU is the per-tensor loop: about ten passes over every parameter per step, 4x slower than
    the fused kernel (one pass) on the demo's 30M-parameter MoE, where it was a large share of
    the step. The fused kernel computes the same update (bit-identical to the loop on plain
    tensors; in the trainer the same losses, parameters equal up to float rounding:
    tests/cpu/test_settings.py). A no-op on GPUs and for other optimizers. Returns the number of
    parameter groups switched."""
    if torch.cuda.is_available():
        return 0
    switched = 0
    for opt in getattr(optimizer, "chained_optimizers", None) or [optimizer]:
        inner = getattr(opt, "optimizer", None)
        if not isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
            continue
        for group in inner.param_groups:
            if group.get("foreach") or group.get("capturable") or group.get("differentiable"):
                continue
            if all(p.device.type == "cpu" and p.is_floating_point() for p in group["params"]):
                group["fused"] = True
                switched += 1
    return switched


# glibc malloc parameters (mallopt(3)); torch has no caching allocator for CPU tensors.
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -2, -3, -4
_TOP_PAD = 256 << 20         # grow the heap in 256 MB steps (untouched pages cost nothing)
_TRIM_THRESHOLD = 2**31 - 1  # the largest int mallopt takes: keep freed heap mid-run


def keep_cpu_allocations() -> bool:
    """Make glibc malloc keep the memory of freed CPU tensors for the next step instead of
    handing it back to the kernel: by default every tensor above glibc's (adaptive, at most 32 MB)
    mmap threshold is a fresh mmap and the heap is trimmed after peaks, so each training step
    re-faults part of its activations and gradients page by page (8,000-15,000 minor faults per
    demo step, fp32-bf16; docs/performance.md). With every allocation from a heap that is not
    trimmed the process keeps its peak memory resident, as torch's CUDA caching allocator does on
    GPUs; values are unaffected.
    A no-op (False) where CUDA is available, the C library is not glibc, or the environment sets
    REMOE_KEEP_CPU_ALLOCATIONS=0 (glibc's defaults: the heap shrinks after peaks)."""
    if torch.cuda.is_available() or os.environ.get("REMOE_KEEP_CPU_ALLOCATIONS", "1") == "0":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # glibc's mallopt constants below; musl has none
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # every tensor from the heap (no mmap), which grows in large steps and is not trimmed
    settings = ((_M_MMAP_MAX, 0), (_M_MMAP_THRESHOLD, 32 << 20), (_M_TOP_PAD, _TOP_PAD),
                (_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
    return all([mallopt(param, value) == 1 for param, value in settings])
