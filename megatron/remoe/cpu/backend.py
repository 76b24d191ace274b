"""CPU (gloo) backend for megatron-core.

megatron-core assumes CUDA in a few dozen places (see the spec, section 4): `torch.cuda.current_device()`
as an allocation device, CUDA streams/events in the alltoall dispatcher, the CUDA RNG tracker,
hard-coded `device='cuda'` tensors, `Tensor.type() == 'torch.cuda.FloatTensor'` checks, list-only
split sizes and equal-size all-gathers in gloo. This module bridges all of them, in one place,
without editing site-packages:

* every `megatron.core.*` module that refers to the global `torch`, loaded before the call or
  imported at any time after it (an import hook: megatron-core imports some CUDA-touching modules
  only inside functions), gets a thin proxy of torch whose
  `torch.cuda` namespace maps devices, streams, events and RNG onto the CPU, whose tensor factories
  map `device='cuda'` to the CPU, and whose `torch.distributed` converts split sizes to lists and
  pads unequal all-gathers for gloo;
* the CUDA RNG state helpers of `megatron.core.tensor_parallel.random` use the CPU generator;
* a handful of functions that test `Tensor.type()` for CUDA type names run with CPU tensors reporting
  their CUDA twin name (scoped to those calls only);
* megatron-core 0.16 without Transformer Engine references an undefined `te_general_gemm` (a
  version difference, fixed by `compat.patch_router_gemm`, applied here at the same moment).
* gradient clipping's fallback scale (`local_multi_tensor_scale`: `src * scale` into a temporary,
  copied back) runs in place, one pass over the gradients instead of two, same values.

Call `apply_cpu_backend()` explicitly (our entry points and tests do) before building models. It is a
no-op when CUDA is available, so the same code runs unchanged on GPUs with NCCL.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.abc
import logging
import sys
import types
from typing import Any

import torch

from megatron.remoe.compat import patch_router_gemm

_APPLIED = False

_CPU = torch.device("cpu")


def _cpu_device(device: Any) -> Any:
    """Map any CUDA device spec to the CPU; leave everything else alone."""
    if isinstance(device, str) and device.startswith("cuda"):
        return _CPU
    if isinstance(device, torch.device) and device.type == "cuda":
        return _CPU
    if isinstance(device, int) and not isinstance(device, bool):
        return _CPU  # an integer device is a CUDA ordinal
    return device


class _NullStream:
    """Stands in for torch.cuda.Stream/Event: CPU ops are synchronous, so waits are no-ops."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def record_event(self, *args, **kwargs):
        return _NullStream()

    def record(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0

    def __eq__(self, other):
        return isinstance(other, _NullStream)

    def __hash__(self):
        return 0


_NULL_STREAM = _NullStream()


class _CpuCuda(types.SimpleNamespace):
    """The `torch.cuda` seen by megatron-core on a CPU-only machine."""

    def __getattr__(self, name):
        return getattr(torch.cuda, name)


def _make_cpu_cuda() -> _CpuCuda:
    nvtx = types.SimpleNamespace(
        range_push=lambda *a, **k: None,
        range_pop=lambda *a, **k: None,
        range=lambda *a, **k: contextlib.nullcontext(),
        mark=lambda *a, **k: None,
    )
    return _CpuCuda(
        is_available=lambda: False,
        current_device=lambda: _CPU,
        device_count=lambda: 0,
        set_device=lambda *a, **k: None,
        synchronize=lambda *a, **k: None,
        empty_cache=lambda: None,
        current_stream=lambda *a, **k: _NULL_STREAM,
        default_stream=lambda *a, **k: _NULL_STREAM,
        Stream=_NullStream,
        Event=_NullStream,
        stream=lambda *a, **k: contextlib.nullcontext(),
        set_stream=lambda *a, **k: None,
        nvtx=nvtx,
        # The CUDA RNG of megatron-core's tracker becomes the CPU default generator.
        get_rng_state=lambda *a, **k: torch.get_rng_state(),
        set_rng_state=lambda state, *a, **k: torch.set_rng_state(state),
        manual_seed=lambda seed: torch.manual_seed(seed),
        manual_seed_all=lambda seed: torch.manual_seed(seed),
        memory_allocated=lambda *a, **k: 0,
        max_memory_allocated=lambda *a, **k: 0,
        memory_reserved=lambda *a, **k: 0,
        reset_peak_memory_stats=lambda *a, **k: None,
        memory_stats=lambda *a, **k: {},
    )


def _list_splits(sizes):
    if sizes is None:
        return None
    if isinstance(sizes, torch.Tensor):
        return [int(s) for s in sizes.tolist()]
    return [int(s) for s in sizes]


def _is_gloo(group) -> bool:
    try:
        return torch.distributed.get_backend(group) == "gloo"
    except Exception:
        return False


class _GlooDistributed(types.SimpleNamespace):
    """`torch.distributed` with the two gloo gaps megatron-core hits closed."""

    def __getattr__(self, name):
        return getattr(torch.distributed, name)


def _all_to_all_single(output, input, output_split_sizes=None, input_split_sizes=None, group=None,
                       async_op=False):
    # gloo accepts split sizes only as Python lists (megatron passes tensors / numpy arrays).
    return torch.distributed.all_to_all_single(
        output, input, _list_splits(output_split_sizes), _list_splits(input_split_sizes),
        group=group, async_op=async_op,
    )


def _all_gather(tensor_list, tensor, group=None, async_op=False):
    sizes = [t.shape[0] if t.dim() else 0 for t in tensor_list]
    uneven = len(set(tuple(t.shape) for t in tensor_list)) > 1
    if not uneven or not _is_gloo(group):
        return torch.distributed.all_gather(tensor_list, tensor, group=group, async_op=async_op)
    # gloo cannot all-gather unequal sizes: pad every piece to the largest along dim 0.
    max_rows = max(sizes)
    padded_in = tensor.new_zeros((max_rows,) + tuple(tensor.shape[1:]))
    padded_in[: tensor.shape[0]].copy_(tensor)
    padded_out = [torch.empty_like(padded_in) for _ in tensor_list]
    torch.distributed.all_gather(padded_out, padded_in, group=group)
    for dst, src, rows in zip(tensor_list, padded_out, sizes):
        dst.copy_(src[:rows])
    return _CompletedWork() if async_op else None


class _CompletedWork:
    def wait(self):
        return True


def _make_distributed() -> _GlooDistributed:
    return _GlooDistributed(all_to_all_single=_all_to_all_single, all_gather=_all_gather)


def _cpu_factory(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _cpu_device(kwargs["device"])
        return fn(*args, **kwargs)

    return wrapper


class _CpuTorch(types.ModuleType):
    """A stand-in for the `torch` module inside megatron-core modules: everything is the real torch
    except `torch.cuda`, `torch.distributed` and the tensor factories' `device=` argument."""

    def __init__(self):
        super().__init__("torch")
        self.cuda = _make_cpu_cuda()
        self.distributed = _make_distributed()
        for name in ("zeros", "ones", "empty", "full", "tensor", "arange", "randn", "rand",
                     "zeros_like", "ones_like", "empty_like", "as_tensor", "randint"):
            setattr(self, name, _cpu_factory(getattr(torch, name)))

    def __getattr__(self, name):
        return getattr(torch, name)


_TORCH_PROXY: _CpuTorch | None = None


@contextlib.contextmanager
def _cpu_tensors_report_cuda_type():
    """Within the block, `cpu_tensor.type()` reports the CUDA twin name ('torch.cuda.FloatTensor'),
    so megatron-core's dtype dispatch by type name accepts CPU parameters."""
    original = torch.Tensor.type

    def type_(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs and self.device.type == "cpu":
            return original(self).replace("torch.", "torch.cuda.", 1)
        return original(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = type_
    try:
        yield
    finally:
        torch.Tensor.type = original


def _with_cuda_type_names(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _cpu_tensors_report_cuda_type():
            return fn(*args, **kwargs)

    wrapper.__remoe_cpu_wrapped__ = True
    return wrapper


def _patch_module(module) -> None:
    if getattr(module, "torch", None) is torch:
        module.torch = _TORCH_PROXY


def _is_mcore(name: str) -> bool:
    return name == "megatron.core" or name.startswith("megatron.core.")


def _patch_loaded_modules() -> None:
    for name, module in list(sys.modules.items()):
        if _is_mcore(name) and module is not None:
            _patch_module(module)


class _PatchingLoader:
    """Runs the real loader, then gives the new megatron.core module the CPU torch proxy."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        _patch_module(module)

    def __getattr__(self, name):  # get_resource_reader, is_package, get_code, ...
        return getattr(self._loader, name)


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Patches every megatron.core module imported after `apply_cpu_backend()` as it loads.

    megatron-core keeps moving imports into functions (0.17+ imports the checkpoint writers
    `filesystem_async` / `state_dict_saver` during a save, and they call torch.cuda): a list of
    modules to import and patch up front goes stale with every release; patching on import
    cannot. It finds nothing itself: it asks the other finders and wraps the loader they return.
    """

    def find_spec(self, fullname, path=None, target=None):
        if not _is_mcore(fullname):
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _PatchingLoader(spec.loader)
        return spec


_IMPORT_HOOK = _PatchOnImport()


def _patch_rng(random_mod) -> None:
    def get_state(device="cuda", clone=False, graph_safe=False):
        return torch.get_rng_state()

    def set_state(new_state, device=-1, graph_safe=False):
        torch.set_rng_state(new_state)

    random_mod._get_cuda_rng_state = get_state
    random_mod._set_cuda_rng_state = set_state
    # The tracker warns when the CPU generator moves inside a "CUDA" fork; on this backend both are
    # the same generator, so the warning is expected and carries no information.
    logging.getLogger(random_mod.__name__).addFilter(
        lambda record: "CPU RNG state changed" not in record.getMessage()
    )


def _patch_type_name_checks() -> None:
    from megatron.core.optimizer import clip_grads, distrib_optimizer, optimizer  # noqa: PLC0415 -- megatron-core is loaded when the backend is applied, not on import

    targets = [
        (clip_grads, "clip_grad_by_total_norm_fp32"),
        (optimizer, "clip_grad_by_total_norm_fp32"),
    ]
    for mod, name in targets:
        fn = getattr(mod, name)
        if not getattr(fn, "__remoe_cpu_wrapped__", False):
            setattr(mod, name, _with_cuda_type_names(fn))
    for cls, name in [
        (distrib_optimizer.DistributedOptimizer, "__init__"),
        (optimizer.Float16OptimizerWithFloat16Params, "__init__"),
    ]:
        fn = cls.__dict__[name]
        if not getattr(fn, "__remoe_cpu_wrapped__", False):
            setattr(cls, name, _with_cuda_type_names(fn))


def _scale_tensors(chunk_size, noop_flag, tensor_lists, scale):
    """amp_C.multi_tensor_scale on CPU: in place where source and destination are one tensor (the
    gradient clipping case). megatron-core's fallback computes `src * scale` into a temporary and
    copies it back: two passes and a gradient-sized allocation per step. The product is the same."""
    for src, dst in zip(tensor_lists[0], tensor_lists[1]):
        if src is dst:
            dst.mul_(scale)
        else:
            dst.copy_(src * scale)


def _patch_grad_clip_scale() -> None:
    from megatron.core import utils  # noqa: PLC0415 -- megatron-core is loaded when the backend is applied, not on import
    from megatron.core.optimizer import clip_grads  # noqa: PLC0415 -- megatron-core is loaded when the backend is applied, not on import

    if getattr(clip_grads, "multi_tensor_scale_impl", None) is \
            getattr(utils, "local_multi_tensor_scale", None):
        clip_grads.multi_tensor_scale_impl = _scale_tensors


def cpu_backend_needed() -> bool:
    return not torch.cuda.is_available()


def apply_cpu_backend(force: bool = False) -> bool:
    """Bridge megatron-core's CUDA assumptions onto the CPU. Returns True when the bridge is active.

    A no-op on machines with CUDA (unless `force`). Idempotent.
    """
    global _APPLIED, _TORCH_PROXY
    patch_router_gemm(on_cpu=_APPLIED or force or cpu_backend_needed())  # GPUs without TE too
    if _APPLIED:
        _patch_loaded_modules()  # pick up megatron.core modules imported since the last call
        return True
    if not force and not cpu_backend_needed():
        return False
    _TORCH_PROXY = _CpuTorch()
    _patch_loaded_modules()
    if _IMPORT_HOOK not in sys.meta_path:
        sys.meta_path.insert(0, _IMPORT_HOOK)  # and every one imported from now on
    from megatron.core.tensor_parallel import random as random_mod  # noqa: PLC0415 -- megatron-core is loaded when the backend is applied, not on import

    _patch_rng(random_mod)
    _patch_type_name_checks()
    _patch_grad_clip_scale()
    _APPLIED = True
    return True


def default_backend() -> str:
    """The torch.distributed backend matching the device: nccl on GPUs, gloo on CPU."""
    return "gloo" if cpu_backend_needed() else "nccl"
