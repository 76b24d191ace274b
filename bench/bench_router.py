"""Router forward+backward time, ReLU (with regulariser and statistics) vs megatron-core's TopK (with
its aux loss), measured side by side in one run, alternating the variants.

    .venv/bin/python bench/bench_router.py [--tokens 8192] [--hidden 768] [--experts 8] [--topk 1]

Prints the configuration, the machine, median times and the ReLU/TopK ratio. The ReLU side is
what a training step pays: ReLU gating in fp32, the load-balanced L1 term attached through
MoEAuxLossAutoScaler, on-device statistics (`controller.record`) and the once-per-step reduction
and lambda update (`controller.step()`); the TopK side is megatron-core's TopKRouter with its
aux loss and loss tracking.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from machine import format_machine, machine_info

from megatron.remoe.logs import configure  # noqa: E402  (after the sys.path lines; stdlib only)
from megatron.remoe.model import build_controller, build_transformer_config
from megatron.remoe.spec import make_router_builder
from megatron.remoe.training.distributed import ParallelConfig, init_distributed


def main():
    configure()  # the console: progress lines, known noise filtered
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--topk", type=int, default=1)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    args = p.parse_args()

    device = init_distributed(ParallelConfig(), seed=0)
    common = dict(num_experts=args.experts, moe_router_topk=args.topk, num_layers=1,
                  hidden_size=args.hidden, num_attention_heads=max(1, args.hidden // 64),
                  ffn_hidden_size=4 * args.hidden, moe_router_dtype="fp32")
    routers = {}
    for name in ("relu", "topk"):
        cfg = build_transformer_config(router=name, **common)
        ctrl = build_controller(cfg, device)
        router = make_router_builder(cfg, ctrl)(
            config=cfg, pg_collection=get_default_pg_collection()).to(device)
        router.set_layer_number(1)
        router.train()
        routers[name] = (router, ctrl)

    x = torch.randn(args.tokens, 1, args.hidden, device=device, requires_grad=True)
    grad = torch.randn(args.tokens, args.experts, device=device)

    def run(name):
        router, ctrl = routers[name]
        probs, _ = router(x)
        probs.backward(grad)
        if ctrl is not None:
            ctrl.step()  # the once-per-step reduction is part of the ReLU router's cost

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    times = {n: [] for n in routers}
    for i in range(args.warmup + args.repeats):
        for name in routers:  # alternate so drift affects both equally
            sync()
            t0 = time.perf_counter()
            run(name)
            sync()
            if i >= args.warmup:
                times[name].append(time.perf_counter() - t0)

    med = {n: statistics.median(t) for n, t in times.items()}

    print(f"machine: {format_machine(machine_info(device))}")
    print(f"config: tokens={args.tokens} hidden={args.hidden} experts={args.experts} "
          f"topk={args.topk} repeats={args.repeats}")
    print(f"{'router':<8}{'median fwd+bwd (ms)':>22}{'min (ms)':>12}")
    for name in routers:
        print(f"{name:<8}{med[name] * 1e3:>22.3f}{min(times[name]) * 1e3:>12.3f}")
    ratios = sorted(a / b for a, b in zip(times["relu"], times["topk"]))
    q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    print(f"ratio relu/topk: {med['relu'] / med['topk']:.3f} (median of per-round ratios "
          f"{q[1]:.3f}, IQR {q[0]:.3f}-{q[2]:.3f})")


if __name__ == "__main__":
    main()
