"""The expert MLP alone, forward + backward: the grouped CPU experts and megatron-core's
SequentialMLP against a dense MLP of the same active size, side by side in one run.

    .venv/bin/python bench/bench_experts.py [--threads 2] [--tokens 1024] [--experts 8]

The modules are the trainer's (built from `spec.get_block_spec` of the demo shape: hidden 256,
expert width 1024, SwiGLU), wrapped in megatron-core DDP so expert weight gradients go to
`main_grad` as in training; the dense side is the MoE layer spec of `--router dense` (one MLP of
the expert width). Tokens are split evenly over the experts (k = 1) unless `--uneven`. Rounds
alternate the variants; printed: median ms per forward + backward, the ratio of medians and the
median of per-round ratios, the load average. No router, permutation or optimizer: those are in
`bench_step.py` / `profile_step.py`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.transformer.mlp import MLP

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from machine import format_machine, machine_info

from megatron.remoe.compat import build_from_spec
from megatron.remoe.cpu.settings import keep_cpu_allocations, usable_cores
from megatron.remoe.logs import configure  # noqa: E402  (after the sys.path lines; stdlib only)
from megatron.remoe.model import build_transformer_config
from megatron.remoe.spec import get_block_spec
from megatron.remoe.training.distributed import ParallelConfig, init_distributed

HIDDEN, FFN = 256, 1024  # the demo model (examples/remoe/cpu-demo.yaml)


def build(router: str, experts: int, impl: str = "grouped"):
    """The MLP slot of one transformer layer of the demo shape, in megatron-core DDP."""
    moe = router != "dense"
    cfg = build_transformer_config(
        router=router, num_experts=experts if moe else None, num_layers=1, hidden_size=HIDDEN,
        num_attention_heads=4, ffn_hidden_size=FFN, use_cpu_initialization=True,
        moe_router_dtype="fp32", **({"moe_cpu_experts": impl} if moe else {}))
    spec = get_block_spec(cfg, None, use_transformer_engine=False).layer_specs[0].submodules.mlp
    if moe:
        module = build_from_spec(spec, config=cfg).experts
    else:  # megatron-core's MLP on the spec's linears (>= 0.19 builds it through a classmethod
        # that wants a transformer layer's process groups)

        submodules = getattr(spec, "submodules", None) or spec.keywords["submodules"]
        module = MLP(config=cfg, submodules=submodules)
    return DistributedDataParallel(cfg, DistributedDataParallelConfig(), module)


def main(argv=None) -> int:
    configure()  # the console: progress lines, known noise filtered
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=None, help="torch threads [usable cores]")
    p.add_argument("--tokens", type=int, default=1024, help="tokens routed [1024: the demo]")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--uneven", action="store_true",
                   help="expert loads from 0.7x to 1.3x the mean instead of equal")
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--repeats", type=int, default=8, help="forward+backward per variant per round")
    p.add_argument("--sequential", action="store_true", help="add megatron-core's SequentialMLP")
    args = p.parse_args(argv)
    for flag in ("threads", "tokens", "experts", "rounds", "repeats"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            print(f"error: --{flag} {value}: must be >= 1", file=sys.stderr)
            return 2

    torch.set_num_threads(args.threads or usable_cores())
    device = init_distributed(ParallelConfig(), seed=0)
    if device.type != "cpu":
        print("error: this benchmark measures the CPU expert path; run it on a CPU machine",
              file=sys.stderr)
        return 2
    keep_cpu_allocations()  # as the trainer does
    variants = {"grouped": build("relu", args.experts, "grouped"), "dense": build("dense", 0)}
    if args.sequential:
        variants["sequential"] = build("relu", args.experts, "sequential")

    gen = torch.Generator().manual_seed(0)
    n, e = args.tokens, args.experts
    weights = torch.linspace(0.7, 1.3, e) if args.uneven else torch.ones(e)
    counts = (weights / weights.sum() * n).floor().long()
    counts[-1] += n - int(counts.sum())
    hidden = torch.randn(n, HIDDEN, generator=gen).requires_grad_(True)
    probs = torch.rand(n, generator=gen)
    grad_out = torch.randn(n, HIDDEN, generator=gen)

    def step(name):
        module = variants[name]
        module.zero_grad_buffer()
        if name == "dense":
            out, _ = module(hidden.unsqueeze(1))
            out = out.squeeze(1)
        else:
            out, _ = module(hidden, counts, probs)
        out.backward(grad_out)
        hidden.grad = None

    names = list(variants)
    times = {name: [] for name in names}
    load_start = os.getloadavg()
    for rnd in range(args.rounds + 1):  # round 0 warms up
        shift = rnd % len(names)
        for name in names[shift:] + names[:shift]:
            ts = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                step(name)
                ts.append(time.perf_counter() - t0)
            if rnd:
                times[name].append(statistics.median(ts))

    print(f"machine: {format_machine(machine_info(device))}")
    print(f"config: tokens={n} experts={e} hidden={HIDDEN} expert width={FFN} (dense: one MLP "
          f"of width {FFN}) counts={counts.tolist()} threads={torch.get_num_threads()} "
          f"rounds={args.rounds} x {args.repeats}")
    print(f"{'variant':<12}{'median ms':>11}{'vs dense':>10}{'per-round (IQR)':>24}")
    dense = times["dense"]
    for name in names:
        ratios = sorted(a / b for a, b in zip(times[name], dense))
        q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
        print(f"{name:<12}{statistics.median(times[name]) * 1e3:>11.2f}"
              f"{statistics.median(times[name]) / statistics.median(dense):>10.3f}"
              f"{q[1]:>9.3f} ({q[0]:.3f}-{q[2]:.3f})")
    end = os.getloadavg()
    print(f"load average: {' '.join(f'{x:.2f}' for x in load_start)} at the start, "
          f"{' '.join(f'{x:.2f}' for x in end)} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
