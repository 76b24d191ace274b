"""CPU training settings in the real trainer (setup + train_step on synthetic data, one process):
torch's fused CPU Adam (megatron/remoe/cpu/settings.py) gives the same losses as the per-tensor
Adam loop megatron-core gets by default; the grouped CPU experts (cpu_experts.py) train like
megatron-core's SequentialMLP within fp32 rounding; bf16 on a CPU with native bf16 keeps the gates
and lambda in fp32 and follows the fp32 losses; the demo's thread / dtype choice."""

import hashlib
import math

import pytest
import torch

from tests.helpers.dist_utils import run_workers

pytestmark = pytest.mark.core

TINY = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
        "--num-query-groups", "2", "--seq-length", "32", "--num-experts", "4",
        "--micro-batch-size", "2", "--global-batch-size", "2", "--lr", "3e-3",
        "--lr-warmup-iters", "1", "--train-iters", "20", "--mock-data", "--vocab-size", "256",
        "--eval-iters", "0", "--eval-interval", "0", "--seed", "7",
        "--moe-relu-l1-reg-coeff-init", "1e-3"]
STEPS = 4


def _train(rank, world, flags, unfused_adam):
    from megatron.remoe.training.arguments import parse_config
    from megatron.remoe.training.data import build_datasets, load_run_tokenizer, make_loader
    from megatron.remoe.training.state import setup
    from megatron.remoe.training.step import train_step

    cfg = parse_config(flags, world_size=1, cuda=False)
    run = setup(cfg)
    groups = [g for opt in getattr(run.optimizer, "chained_optimizers", [run.optimizer])
              for g in opt.optimizer.param_groups]
    fused = [bool(g.get("fused")) for g in groups]
    if unfused_adam:
        for g in groups:
            g["fused"] = False
    router_dtypes = []
    for chunk in run.model:
        for name, module in chunk.named_modules():
            if name.endswith(".router"):
                module.register_forward_hook(
                    lambda m, i, out: router_dtypes.append(out[0].dtype))
    train_ds, _, _ = build_datasets(cfg, load_run_tokenizer(cfg))
    it = iter(make_loader(train_ds, 0, cfg.train_iters * cfg.global_batch_size, cfg, 0, 1))
    losses, sparsity = [], []
    for _ in range(STEPS):
        m = train_step(run, it).metrics
        losses.append(m["lm_loss"])
        sparsity.append(m.get("moe_relu_sparsity"))
    # a digest, not tensors: tensors returned through the result queue race the worker's exit
    digest = hashlib.sha256()
    for chunk in run.model:
        for p in chunk.parameters():
            digest.update(p.detach().float().contiguous().numpy().tobytes())
    param_dtypes = {str(p.dtype) for chunk in run.model for p in chunk.parameters()}
    return dict(losses=losses, sparsity=sparsity, params=digest.hexdigest(), fused=fused,
                router_dtypes={str(d) for d in router_dtypes}, param_dtypes=param_dtypes,
                lam=str(run.controller.l1_coeff.dtype) if run.controller is not None else None,
                experts=type(next(m for chunk in run.model for n, m in chunk.named_modules()
                                  if n.endswith("mlp.experts"))).__name__)


@pytest.mark.multiprocess
@pytest.mark.timeout(300)
def test_fused_cpu_adam_gives_the_adam_loops_losses():
    """Measured: identical losses over the steps; the parameters are NOT bit-identical (they
    differ at float-rounding level), so only the losses are asserted (docs/performance.md)."""
    fused = run_workers(_train, 1, TINY, False, timeout=240)[0]
    loop = run_workers(_train, 1, TINY, True, timeout=240)[0]
    assert all(fused["fused"]) and fused["fused"], "the trainer should use fused Adam on CPU"
    assert fused["losses"] == loop["losses"]


@pytest.mark.multiprocess
@pytest.mark.timeout(300)
def test_grouped_experts_train_like_sequential_mlp():
    grouped = run_workers(_train, 1, TINY, False, timeout=240)[0]
    seq = run_workers(_train, 1, TINY + ["--moe-cpu-experts", "sequential"], False,
                      timeout=240)[0]
    assert grouped["experts"] == "GroupedCPUExperts" and seq["experts"] == "SequentialMLP"
    # the layer is exact to a few ulps (tests/cpu/test_experts.py); Adam's normalised updates can
    # amplify ulps on near-zero gradients, so the steps are compared on the loss and the routing
    assert grouped["losses"][0] == seq["losses"][0]
    for a, b in zip(grouped["losses"], seq["losses"], strict=True):
        assert abs(a - b) <= 1e-4 * abs(b), (grouped["losses"], seq["losses"])
    for a, b in zip(grouped["sparsity"], seq["sparsity"], strict=True):
        assert abs(a - b) <= 0.01, (grouped["sparsity"], seq["sparsity"])


@pytest.mark.multiprocess
@pytest.mark.timeout(300)
def test_bf16_on_cpu_keeps_router_and_lambda_fp32_and_follows_fp32():
    from megatron.remoe.cpu.settings import cpu_bf16_supported

    if torch.cuda.is_available() or not cpu_bf16_supported():
        pytest.skip("needs a CPU with native bf16 (AVX512-BF16 or AMX)")
    bf16 = run_workers(_train, 1, TINY + ["--bf16"], False, timeout=240)[0]
    fp32 = run_workers(_train, 1, TINY, False, timeout=240)[0]
    assert "torch.bfloat16" in bf16["param_dtypes"]
    assert bf16["router_dtypes"] == {"torch.float32"}, "gates must be fp32 (moe_router_dtype)"
    assert bf16["lam"] == "torch.float32"
    assert all(math.isfinite(x) for x in bf16["losses"])
    # bf16 rounding (8 bits of mantissa) moves the loss by well under 1 %
    for a, b in zip(bf16["losses"], fp32["losses"], strict=True):
        assert abs(a - b) <= 1e-2 * abs(b), (bf16["losses"], fp32["losses"])


def test_demo_settings(monkeypatch):
    from megatron.remoe.cpu import settings as cpu_settings

    if torch.cuda.is_available():
        pytest.skip("CPU settings")
    monkeypatch.setattr(cpu_settings, "usable_cores", lambda: 4)
    assert cpu_settings.demo_settings(1)["threads"] == 4
    assert cpu_settings.demo_settings(2)["threads"] == 2
    assert cpu_settings.demo_settings(1, threads=3)["threads"] == 3
    monkeypatch.setattr(cpu_settings, "cpu_bf16_supported", lambda: False)
    assert not cpu_settings.demo_settings(1)["bf16"]
    with pytest.raises(ValueError, match="no native bf16"):
        cpu_settings.demo_settings(1, dtype="bf16")
    monkeypatch.setattr(cpu_settings, "cpu_bf16_supported", lambda: True)
    assert cpu_settings.demo_settings(1, dtype="bf16")["bf16"]
    assert not cpu_settings.demo_settings(1, dtype="fp32")["bf16"]
    auto = cpu_settings.demo_settings(1)
    assert auto["bf16"] == cpu_settings.AUTO_BF16_ON_NATIVE_CPUS
    assert "thread(s)" in cpu_settings.describe_settings(auto)


@pytest.mark.parametrize("threads", [1, 2])
def test_nonfinite_gradient_check_finds_every_nan_and_inf(threads):
    """The trainer's one-pass check (aminmax) against the definition, at every position class:
    first, last, middle of a buffer, in the second buffer, and in bf16 buffers."""
    from types import SimpleNamespace

    from megatron.remoe.training.nonfinite import grads_nonfinite

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for dtype in (torch.float32, torch.bfloat16):
            bufs = [torch.randn(1_000_003).to(dtype), torch.randn(4097).to(dtype)]
            model = [SimpleNamespace(buffers=[SimpleNamespace(grad_data=b) for b in bufs],
                                     expert_parallel_buffers=[])]
            assert grads_nonfinite(model).item() == 0.0
            for value in (float("nan"), float("inf"), -float("inf")):
                for which, pos in ((0, 0), (0, -1), (0, 500_001), (1, 17)):
                    old = bufs[which][pos].clone()
                    bufs[which][pos] = value
                    assert grads_nonfinite(model).item() == 1.0, (dtype, value, which, pos)
                    bufs[which][pos] = old
            bufs[0][3] = torch.finfo(dtype).max  # large but finite: not flagged
            assert grads_nonfinite(model).item() == 0.0
    finally:
        torch.set_num_threads(before)


_ALLOCATION_PATTERN = r"""
import json, resource, sys, torch
from megatron.remoe.cpu.settings import keep_cpu_allocations
kept = keep_cpu_allocations()
n = 40 << 18  # 40 MB of fp32: above glibc's largest mmap threshold
faults = []
for step in range(30):  # a step's pattern: live tensors of several sizes, freed out of order
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    parts = [torch.empty(n // k).fill_(1) for k in (1, 2, 3, 5)]
    big = torch.empty(n).fill_(2)
    del parts, big
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
print(json.dumps({"kept": kept, "faults": sum(faults[15:]) / 15}))  # settled heap
"""


def _allocation_faults(keep: str) -> dict:
    import json
    import os
    import subprocess
    import sys

    env = dict(os.environ, REMOE_KEEP_CPU_ALLOCATIONS=keep)
    out = subprocess.run([sys.executable, "-c", _ALLOCATION_PATTERN], env=env, check=True,
                         capture_output=True, text=True, timeout=120).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_kept_cpu_allocations_stop_per_step_page_faults():
    """With glibc's defaults every step's large tensors are fresh mmaps (each page faulted in
    again); after keep_cpu_allocations the same steps reuse the heap. Faults counted by the
    kernel (ru_minflt) in a fresh process per setting; REMOE_KEEP_CPU_ALLOCATIONS=0 opts out."""
    import platform

    if torch.cuda.is_available() or platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc CPU processes only")
    default, kept = _allocation_faults("0"), _allocation_faults("1")
    assert default["kept"] is False and kept["kept"] is True
    pages_per_step = 2 * (40 << 20) // 4096  # the two 40 MB tensors alone
    assert default["faults"] >= pages_per_step / 2, default
    assert kept["faults"] <= default["faults"] / 20, (kept, default)
