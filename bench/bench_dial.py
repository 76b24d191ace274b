"""Wall-clock of the compute dial: a ReMoE model run with fewer experts per token (thresholds on its
gates) against the undialled model, measured side by side in one run, next to the speed-up its
forward FLOPs predict.

    .venv/bin/python bench/bench_dial.py                          # random-init cpu-converge shape
    .venv/bin/python bench/bench_dial.py --load runs/ablations/cpu-converge/relu-seed1/checkpoints
    .venv/bin/python bench/bench_dial.py --targets 0.75 0.5 0.25 --threads 2 --json out.json

Workloads (each at every budget: undialled, then each `--targets` value in realised experts per
token, mean over MoE layers and tokens):

* `prefill`: the exported HF model (megatron/remoe/hf/modeling_remoe.py, converted in memory by
  the converter, fp32) on `--batch` x `--seq` tokens, no KV cache, logits at every position;
* `decode`: the same HF model generating `--new-tokens` greedy tokens per sequence with its KV
  cache after a `--prompt`-token prompt (the prompt's prefill is not timed); tokens/s;
* `megatron`: the megatron-core model (megatron/remoe/model.py, the trainer's build, eval mode,
  dialled with `router.set_dial`) forward on the same `--batch` x `--seq` tokens on CPU.

Thresholds: calibrated by the project's `remoe dial` code (`dial_calibration.calibrate`, `--method
global` one tau for all MoE layers, or `per-layer`) on held-out tokens that the timed inputs do
not contain: with `--load`, every other sequence of the run's validation data (the others are the
timed inputs); otherwise (or without data on disk) random token ids from separate seeds.

For each workload and budget: median time per call over `--rounds` rounds (budgets in rotated
order per round, so load drift hits all alike), the measured speed-up vs undialled (ratio of
medians, and the median of per-round ratios with its IQR), the realised experts per token of that
very workload (counted on its own inputs by router hooks in one untimed pass; routing is
deterministic), the FLOP-predicted speed-up (`model.train_flops_per_token` / 3 at the undialled
vs the dialled realised count; decode at the mean attention context of its steps, see
`flops_seq_length`) and measured / predicted.

With no `--load` the model is randomly initialised in the cpu-converge shape
(examples/remoe/ablations/cpu-converge.yaml: 4 layers, hidden 128, ffn 512, 4 heads / 2 query
groups, E = 8, k = 1, seq 256, vocab 8192); it routes about E/2 experts per token undialled.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import statistics
import sys
import time
from typing import Callable, Optional

import numpy as np
import torch
from transformers.cache_utils import DynamicCache

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from machine import finish, format_machine, load_average, machine_info

from megatron.remoe.analysis import EvalTokens
from megatron.remoe.analysis.errors import AnalysisError
from megatron.remoe.analysis.tokens import default_data, make_eval_tokens
from megatron.remoe.cpu.settings import keep_cpu_allocations, usable_cores
from megatron.remoe.dial import DialError
from megatron.remoe.dial_calibration.calibrate import calibrate
from megatron.remoe.dial_calibration.inputs import LoadedModel, load_model
from megatron.remoe.dial_calibration.measure import Evaluator
from megatron.remoe.hf.modeling_remoe import ReMoESparseMoE
from megatron.remoe.hf.to_hf import megatron_to_hf
from megatron.remoe.logs import configure, get_logger, quiet  # noqa: E402  (after the sys.path lines; stdlib only)
from megatron.remoe.model import ModelShape, train_flops_per_token
from megatron.remoe.router import relu_routers, set_dial
from megatron.remoe.training.checkpointing.offline import build_single_process_model
from megatron.remoe.training.config import TrainConfig, transformer_config
from megatron.remoe.training.distributed import ParallelConfig, init_distributed

logger = get_logger("megatron.remoe.bench_dial")

WORKLOADS = ("prefill", "decode", "megatron")
# examples/remoe/ablations/cpu-converge.yaml (its base over examples/remoe/cpu-demo.yaml)
CPU_CONVERGE = dict(num_layers=4, hidden_size=128, num_attention_heads=4, num_query_groups=2,
                    ffn_hidden_size=512, seq_length=256, num_experts=8, moe_router_topk=1)


@dataclasses.dataclass
class Budget:
    """One dial setting: `target` experts per token (None: undialled) and its calibrated dial."""

    label: str
    target: Optional[float]
    dial: object  # megatron.remoe.dial.ComputeDial or None
    calibrated_experts_per_token: float


@dataclasses.dataclass
class Bench:
    """The model under test: megatron (`lm`, a dial_calibration LoadedModel) and its HF export."""

    lm: object
    hf: object
    source: str


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--load", default=None,
                   help="Megatron checkpoint (a --save dir or iter_* dir) or exported HF folder "
                        "[random init in the cpu-converge shape]")
    p.add_argument("--targets", type=float, nargs="+", default=[0.75, 0.5, 0.25],
                   help="realised experts per token of the dialled budgets [0.75 0.5 0.25]")
    p.add_argument("--method", choices=("global", "per-layer"), default="global",
                   help="calibration (dial_calibration.calibrate) [global]")
    p.add_argument("--form", choices=("cut", "shift"), default="cut")
    p.add_argument("--tolerance", type=float, default=0.03,
                   help="relative tolerance of the calibrated experts/token [0.03]")
    p.add_argument("--calibration-sequences", type=int, default=16,
                   help="held-out sequences of --seq tokens to calibrate on [16]")
    p.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=list(WORKLOADS))
    p.add_argument("--batch", type=int, default=8, help="sequences per call [8]")
    p.add_argument("--seq", type=int, default=None,
                   help="prefill / megatron tokens per sequence [the model's seq length]")
    p.add_argument("--prompt", type=int, default=64, help="decode prompt tokens [64]")
    p.add_argument("--new-tokens", type=int, default=64, help="decode tokens per sequence [64]")
    p.add_argument("--rounds", type=int, default=7, help="timed rounds (one warm-up round more)")
    p.add_argument("--threads", type=int, default=None, help="torch threads [usable cores]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shape", default=None,
                   help="random init only: comma list of FIELD=VALUE overriding the cpu-converge "
                        "shape, e.g. num_layers=2,hidden_size=32 (fields of CPU_CONVERGE and "
                        "vocab_size)")
    p.add_argument("--csv", default=None, help="write the table here")
    p.add_argument("--json", default=None, help="write all results here")
    args = p.parse_args(argv)
    for flag in ("calibration_sequences", "batch", "prompt", "new_tokens", "rounds"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be >= 1")
    if any(t <= 0 for t in args.targets):
        p.error(f"--targets {args.targets}: every target must be > 0 experts per token")
    if args.load and args.shape:
        p.error("--shape applies to the random-init model only; drop it with --load")
    return args


# ------------------------------------------------------------------------------------------------
# Model
# ------------------------------------------------------------------------------------------------
def random_model(shape: str | None, seed: int):
    """A LoadedModel (the trainer's single-process build) of the cpu-converge shape, random init."""
    fields = dict(CPU_CONVERGE, vocab_size=8192)
    for item in (shape.split(",") if shape else []):
        key, _, value = item.partition("=")
        if key not in fields:
            raise SystemExit(f"error: --shape {item!r}: unknown field; use one of "
                             f"{', '.join(fields)}")
        fields[key] = int(value)
    vocab = fields.pop("vocab_size")
    cfg = TrainConfig(router="relu", **fields)
    torch.manual_seed(seed)
    tcfg = transformer_config(cfg, use_cpu_initialization=True)
    model = build_single_process_model(tcfg, vocab, cfg.seq_length, cfg.rotary_base).eval()
    return LoadedModel(model, tcfg, "relu", cfg.seq_length, vocab, None, "random init", cfg)


def rotary_base(lm) -> float:
    if lm.train_config is not None:
        return float(lm.train_config.rotary_base)
    with open(os.path.join(lm.source, "config.json"), encoding="utf-8") as f:
        return float(json.load(f)["rope_theta"])


def build(args) -> Bench:
    lm = load_model(args.load) if args.load else random_model(args.shape, args.seed)
    if lm.router != "relu":
        raise SystemExit(f"error: {args.load} is a {lm.router} model; the compute dial needs a "
                         "ReLU-routed (ReMoE) model")
    hf, kind = megatron_to_hf(lm.model, lm.tcfg, lm.vocab_size, lm.seq_length, rotary_base(lm))
    if kind != "remoe":
        raise SystemExit(f"error: the model exports as {kind}, not remoe")
    return Bench(lm, hf.eval(), lm.source)


# ------------------------------------------------------------------------------------------------
# Tokens
# ------------------------------------------------------------------------------------------------
def random_tokens(n: int, length: int, vocab: int, seed: int) -> list:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (length,), generator=g).numpy() for _ in range(n)]


def spread(items: list, n: int) -> list:
    """`n` of `items` (all if fewer) evenly spaced from first to last: every domain of a
    domain-ordered list, not the first domains only."""
    if len(items) <= n:
        return list(items)
    return [items[round(i * (len(items) - 1) / max(n - 1, 1))] for i in range(n)]


def token_sets(args, lm, seq: int):
    """(calibration EvalTokens, timed sequences [>= batch of length seq], data description).
    Run data: the validation sequences alternate between the two (disjoint); random ids
    otherwise."""
    need = 2 * max(args.calibration_sequences, args.batch)
    if lm.train_config is not None and args.load:
        try:
            prefixes, _ = default_data(lm.train_config, "valid")
            per_domain = -(-need * seq // len(prefixes)) + seq
            with quiet("megatron.remoe.analysis"):  # a short domain is no news here
                ev = make_eval_tokens(prefixes, per_domain, seq, lm.tokenizer)
            full = [s for s in ev.sequences if len(s) == seq]  # in domain order
            if len(full) >= 2 * args.batch:
                calib = spread(full[0::2], args.calibration_sequences)
                timed = spread(full[1::2], args.batch)
                return (EvalTokens(["valid"], calib, [0] * len(calib), seq), timed,
                        f"the run's validation data ({', '.join(prefixes)}): "
                        f"{len(calib)} calibration / {len(timed)} timed sequences, disjoint")
            logger.info(f"bench_dial: only {len(full)} full validation sequences; using random ids")
        except (AnalysisError, OSError, ValueError) as e:
            logger.info(f"bench_dial: no validation data ({e}); using random token ids")
    calib = random_tokens(args.calibration_sequences, seq, lm.vocab_size, args.seed + 1)
    timed = random_tokens(args.batch, seq, lm.vocab_size, args.seed + 2)
    return (EvalTokens(["random"], calib, [0] * len(calib), seq), timed,
            f"random token ids ({len(calib)} calibration sequences, seed {args.seed + 1}; "
            f"timed inputs seed {args.seed + 2})")


# ------------------------------------------------------------------------------------------------
# Calibration (the project's remoe dial code)
# ------------------------------------------------------------------------------------------------
def calibrate_budgets(lm, calib_tokens, targets, method: str, form: str,
                      tolerance: float) -> list:
    ev = Evaluator(lm, calib_tokens, batch_size=8)
    layers = [n for n, _ in relu_routers(lm.model)]
    set_dial(lm.model, None)
    base_cap, base_gates = ev.run(capture_layers=layers)
    base = float(base_cap.routing.sum(axis=2).mean())
    budgets = [Budget("undialled", None, None, base)]
    for target in targets:
        if target >= base:
            logger.info(f"bench_dial: target {target:g} experts/token is not below the undialled "
                        f"{base:.3f} on the calibration tokens: skipped (thresholds only remove experts)")
            continue
        try:
            with quiet("megatron.remoe.dial_calibration"):  # the calibration's steps: not the bench's
                dial, _, got, _ = calibrate(ev, target, method, form, None, tolerance, base_cap,
                                            base_gates)
        except DialError as e:
            logger.info(f"bench_dial: target {target:g}: {e}; skipped")
            continue
        budgets.append(Budget(f"{target:g}", target, dial, got))
    set_dial(lm.model, None)
    return budgets


# ------------------------------------------------------------------------------------------------
# Workloads
# ------------------------------------------------------------------------------------------------
def set_budget(bench: Bench, budget: Budget) -> None:
    set_dial(bench.lm.model, budget.dial)
    bench.hf.config.router_dial = budget.dial.to_dict() if budget.dial is not None else None


def flops_seq_length(workload: str, seq: int, prompt: int, new_tokens: int) -> int:
    """The sequence length at which `train_flops_per_token` counts this workload's attention.
    It counts 2 x seq x heads x head_dim per layer and token: causal attention over seq tokens,
    seq / 2 keys on average. Decode step i (0-based) attends to prompt + i + 1 keys, on average
    prompt + (new_tokens + 1) / 2, i.e. the count's seq = 2 prompt + new_tokens + 1."""
    return 2 * prompt + new_tokens + 1 if workload == "decode" else seq


def forward_flops_per_token(lm, seq_length: int, experts_per_token: float) -> float:
    """Forward FLOPs per token: the project's count (model.train_flops_per_token, train = 3 x
    forward) at `experts_per_token` realised experts per MoE layer."""
    shape = ModelShape.of_transformer_config(lm.tcfg)
    return train_flops_per_token(shape, seq_length, lm.vocab_size, experts_per_token)["train"] / 3


class Workload:
    """One timed call at the current dial (`run`) and its realised experts/token (`count`)."""

    def __init__(self, name: str, bench: Bench, timed, args, seq: int):
        self.name, self.bench, self.args = name, bench, args
        self.ids = torch.as_tensor(np.stack(timed[:args.batch])).long()[:, :seq]
        self.prompt = self.ids[:, :args.prompt]
        self.seq = flops_seq_length(name, seq, args.prompt, args.new_tokens)
        self.tokens = args.batch * (args.new_tokens if name == "decode" else seq)

    def run(self) -> float:
        """Seconds of one call."""
        with torch.inference_mode():
            if self.name == "prefill":
                t0 = time.perf_counter()
                self.bench.hf(input_ids=self.ids, use_cache=False)
                return time.perf_counter() - t0
            if self.name == "megatron":
                pos = torch.arange(self.ids.shape[1]).unsqueeze(0).expand_as(self.ids)
                t0 = time.perf_counter()
                self.bench.lm.model(self.ids, pos, None)
                return time.perf_counter() - t0
            return self._decode()

    def _decode(self, on_step: Optional[Callable] = None) -> float:
        """Greedy decoding with the KV cache; the timed part is the `new_tokens` one-token steps
        (tokens/s = batch x new_tokens / seconds)."""
        hf = self.bench.hf
        try:
            cache = DynamicCache(config=hf.config)
        except TypeError:  # transformers < 4.5x
            cache = DynamicCache()
        # the modeling file's forward takes the cache as `cache` under every transformers release
        tok = hf(input_ids=self.prompt, cache=cache, use_cache=True).logits[:, -1].argmax(
            -1, keepdim=True)
        t0 = time.perf_counter()
        for _ in range(self.args.new_tokens):
            if on_step is not None:
                on_step(True)
            logits = hf(input_ids=tok, cache=cache, use_cache=True).logits
            tok = logits[:, -1].argmax(-1, keepdim=True)
        seconds = time.perf_counter() - t0
        if on_step is not None:
            on_step(False)
        return seconds

    def count(self) -> tuple:
        """(realised experts/token: mean over MoE layers and this workload's tokens, per layer)."""
        per_layer: dict = {}
        counting = [self.name != "decode"]  # decode: only the timed one-token steps

        def record(key, routing_map):
            if counting[0]:
                s = per_layer.setdefault(key, [0, 0])
                s[0] += int(routing_map.sum())
                s[1] += routing_map.shape[0]

        if self.name == "megatron":
            modules = [r for _, r in relu_routers(self.bench.lm.model)]
            hooks = [m.register_forward_hook(lambda m, a, o, i=i: record(i, o[1].reshape(
                -1, o[1].shape[-1]))) for i, m in enumerate(modules)]
        else:
            modules = [m for m in self.bench.hf.modules() if isinstance(m, ReMoESparseMoE)]
            hooks = [m.register_forward_hook(lambda m, a, o, i=i: record(i, o[2]))
                     for i, m in enumerate(modules)]
        try:
            with torch.inference_mode():
                if self.name == "decode":
                    self._decode(on_step=lambda on: counting.__setitem__(0, on))
                else:
                    self.run()
        finally:
            for h in hooks:
                h.remove()
        layers = [per_layer[i][0] / per_layer[i][1] for i in sorted(per_layer)]
        return float(np.mean(layers)), layers


def measure(workloads: list, budgets: list, rounds: int) -> dict:
    """{workload: {budget label: [seconds per round]}}; per round the budgets run in rotated
    order, one warm-up round first (not kept)."""
    times = {w.name: {b.label: [] for b in budgets} for w in workloads}
    for w in workloads:
        for rnd in range(rounds + 1):
            shift = rnd % len(budgets)
            for b in budgets[shift:] + budgets[:shift]:
                set_budget(w.bench, b)
                seconds = w.run()
                if rnd:
                    times[w.name][b.label].append(seconds)
        logger.info(f"bench_dial: {w.name}: {rounds} rounds x {len(budgets)} budgets done")
    return times


def quartiles(values: list) -> tuple:
    if len(values) < 2:
        return (values[0],) * 3
    q = statistics.quantiles(values, n=4, method="inclusive")  # within the data for few rounds
    return q[0], statistics.median(values), q[2]


def results_table(bench: Bench, workloads: list, budgets: list, times: dict,
                  counts: dict) -> list:
    """One row per (workload, budget)."""
    rows = []
    for w in workloads:
        base = budgets[0].label
        t_base = statistics.median(times[w.name][base])
        ept_base = counts[w.name][base][0]
        flops_base = forward_flops_per_token(bench.lm, w.seq, ept_base)
        for b in budgets:
            t = times[w.name][b.label]
            ept, per_layer = counts[w.name][b.label]
            flops = forward_flops_per_token(bench.lm, w.seq, ept)
            ratios = [a / c for a, c in zip(times[w.name][base], t)]
            q1, qm, q3 = quartiles(ratios)
            measured = t_base / statistics.median(t)
            predicted = flops_base / flops
            rows.append({
                "workload": w.name, "budget": b.label, "target": b.target,
                "thresholds": list(b.dial.thresholds) if b.dial is not None else [],
                "calibrated_experts_per_token": b.calibrated_experts_per_token,
                "experts_per_token": ept, "experts_per_token_per_layer": per_layer,
                "median_s": statistics.median(t), "q1_s": quartiles(t)[0],
                "q3_s": quartiles(t)[2], "tokens_per_s": w.tokens / statistics.median(t),
                "flops_seq_length": w.seq, "forward_flops_per_token": flops,
                "measured_speedup": measured, "per_round_speedup": qm,
                "per_round_speedup_q1": q1, "per_round_speedup_q3": q3,
                "predicted_speedup": predicted, "measured_over_predicted": measured / predicted,
                "rounds": len(t)})
    return rows


def print_table(rows: list) -> None:
    head = (f"{'workload':<9}{'budget':>10}{'exp/tok':>9}{'median ms':>11}{'tok/s':>10}"
            f"{'MFLOP/tok':>11}{'speed-up':>10}{'per-round (IQR)':>24}{'predicted':>11}"
            f"{'meas/pred':>11}")
    print(head)
    for r in rows:
        print(f"{r['workload']:<9}{r['budget']:>10}{r['experts_per_token']:>9.3f}"
              f"{r['median_s'] * 1e3:>11.1f}{r['tokens_per_s']:>10,.0f}"
              f"{r['forward_flops_per_token'] / 1e6:>11.3f}{r['measured_speedup']:>10.3f}"
              f"{r['per_round_speedup']:>9.3f} ({r['per_round_speedup_q1']:.3f}-"
              f"{r['per_round_speedup_q3']:.3f}){r['predicted_speedup']:>11.3f}"
              f"{r['measured_over_predicted']:>11.3f}")


CSV_FIELDS = ("workload", "budget", "target", "thresholds", "calibrated_experts_per_token",
              "experts_per_token", "experts_per_token_per_layer", "median_s", "q1_s", "q3_s",
              "tokens_per_s", "flops_seq_length", "forward_flops_per_token", "measured_speedup",
              "per_round_speedup", "per_round_speedup_q1", "per_round_speedup_q3",
              "predicted_speedup", "measured_over_predicted", "rounds")


def write_csv(path: str, rows: list, machine: dict) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        f.write(f"# {machine['format']}\n")
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS + ("threads", "load_start", "load_end"))
        w.writeheader()
        for r in rows:
            w.writerow({**{k: r[k] for k in CSV_FIELDS},
                        "thresholds": " ".join(f"{t:.6g}" for t in r["thresholds"]),
                        "experts_per_token_per_layer": " ".join(
                            f"{x:.4f}" for x in r["experts_per_token_per_layer"]),
                        "threads": machine["torch_threads"], "load_start": machine["load_start"],
                        "load_end": machine["load_end"]})


def main(argv=None) -> int:
    configure()  # the console: progress lines, known noise filtered
    args = parse_args(argv)
    torch.set_num_threads(args.threads or usable_cores())
    device = init_distributed(ParallelConfig(), seed=args.seed)
    if device.type != "cpu":
        print("error: this benchmark measures CPU inference; run it on a CPU machine",
              file=sys.stderr)
        return 2
    # as the trainer does on CPU: freed tensor memory stays in the heap, so the 8 x 256 x vocab
    # logits of every call are not page-faulted in afresh (a cost that is the same at every
    # budget and would dilute the speed-up); REMOE_KEEP_CPU_ALLOCATIONS=0 restores glibc's
    kept = keep_cpu_allocations()
    load_start = load_average()
    bench = build(args)
    lm = bench.lm
    seq = args.seq or lm.seq_length
    if args.prompt > seq:
        print(f"error: --prompt {args.prompt} is longer than the timed sequences ({seq})",
              file=sys.stderr)
        return 2
    calib, timed, data = token_sets(args, lm, seq)
    t0 = time.perf_counter()
    budgets = calibrate_budgets(lm, calib, args.targets, args.method, args.form, args.tolerance)
    print(f"bench_dial: calibrated {len(budgets) - 1} dials in {time.perf_counter() - t0:.1f} s")
    workloads = [Workload(name, bench, timed, args, seq) for name in args.workloads]
    counts = {}
    for w in workloads:
        counts[w.name] = {}
        for b in budgets:
            set_budget(bench, b)
            counts[w.name][b.label] = w.count()
    times = measure(workloads, budgets, args.rounds)
    set_budget(bench, budgets[0])
    rows = results_table(bench, workloads, budgets, times, counts)

    info = machine_info(device)
    info.update(load_start=load_start, load_end=load_average(), format=format_machine(info))
    t = lm.tcfg
    print(f"\nmachine: {info['format']}")
    print(f"model: {bench.source}: {t.num_layers} layers, hidden {t.hidden_size}, "
          f"{t.num_moe_experts} experts of width {t.moe_ffn_hidden_size}, k {t.moe_router_topk}, "
          f"vocab {lm.vocab_size}; fp32")
    print(f"data: {data}")
    print(f"dials ({args.method} {args.form}): " + "; ".join(
        f"{b.label}: {b.calibrated_experts_per_token:.3f} experts/token on the calibration "
        f"tokens" + (f", thresholds {' '.join(f'{x:.4g}' for x in b.dial.thresholds)}"
                     if b.dial is not None else "") for b in budgets))
    print(f"workloads: prefill/megatron {args.batch} x {seq} tokens; decode batch {args.batch}, "
          f"prompt {args.prompt}, {args.new_tokens} new tokens (FLOPs at seq "
          f"{flops_seq_length('decode', seq, args.prompt, args.new_tokens)}); "
          f"{args.rounds} rounds; threads {torch.get_num_threads()}; freed CPU memory kept "
          f"(cpu.settings.keep_cpu_allocations): {kept}")
    print()
    print_table(rows)
    if args.csv:
        write_csv(args.csv, rows, info)
        print(f"csv: {args.csv}")
    results = {"machine": info, "args": vars(args), "model": bench.source, "data": data,
               "budgets": [{"label": b.label, "target": b.target,
                            "dial": b.dial.to_dict() if b.dial is not None else None,
                            "calibrated_experts_per_token": b.calibrated_experts_per_token}
                           for b in budgets],
               "keep_cpu_allocations": kept, "rows": rows, "times": times,
               "load_start": load_start,
               "load_end": info["load_end"]}
    finish(results, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
