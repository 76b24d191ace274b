"""Calibration of the compute dial and the quality-vs-compute sweep: `remoe dial`.

The command line (usage: the package docstring, docs/compute-dial.md): argument checks, the
undialled pass every mode starts from, then one dial (`--thresholds`, `--target-experts-per-token`)
written to dial.json or the sweep written to sweep.csv, sweep.json and compute_dial.png.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Optional

import torch

from megatron.remoe.analysis import AnalysisError
from megatron.remoe.data.errors import DataError
from megatron.remoe.dial import make_dial
from megatron.remoe.dial_calibration.calibrate import calibrate
from megatron.remoe.dial_calibration.inputs import (
    DialUsageError,
    LoadedModel,
    held_out_tokens,
    is_hf_folder,
    load_model,
)
from megatron.remoe.dial_calibration.measure import DialPoint, Evaluator
from megatron.remoe.dial_calibration.sweep import sweep_figure, sweep_relu, sweep_topk, write_csv
from megatron.remoe.errors import ConfigError
from megatron.remoe.evaluation import EvaluationError
from megatron.remoe.hf.errors import ConversionError
from megatron.remoe.logs import configure, get_logger
from megatron.remoe.router import relu_routers
from megatron.remoe.training.distributed import ParallelConfig, destroy_distributed, init_distributed

logger = get_logger(__name__)

DEFAULT_MULTIPLES = (0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0, 1.5, 2.0)


def build_parser(prog: str = "remoe dial") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="See docs/compute-dial.md.")
    p.add_argument("--load", required=True, metavar="CKPT",
                   help="ReLU-routed model: Megatron checkpoint dir (latest, or one iter_* dir) "
                        "or exported HF folder")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--target-experts-per-token", type=float, metavar="X",
                      help="calibrate thresholds to X realised experts per token (mean over MoE "
                           "layers and tokens)")
    what.add_argument("--thresholds", metavar="T[,T...]",
                      help="evaluate these thresholds (one global value or one per MoE layer)")
    what.add_argument("--sweep", action="store_true",
                      help="quality vs compute: ReMoE over --sweep-multiples x k (both methods, "
                           "both forms) and the TopK model at k' = 1..E")
    p.add_argument("--method", choices=["global", "per-layer"], default="global",
                   help="one tau for all layers, or per-layer budgets chosen greedily by measured loss "
                        "[global]")
    p.add_argument("--form", choices=["cut", "shift"], default="cut",
                   help="cut: g*[g > tau]; shift: relu(xW - tau) [cut]")
    p.add_argument("--max-experts", type=int, metavar="M",
                   help="also keep at most the M largest gates per token")
    p.add_argument("--tolerance", type=float, default=0.02,
                   help="relative calibration tolerance on experts/token [0.02]")
    p.add_argument("--topk-load", metavar="CKPT",
                   help="TopK checkpoint for --sweep (default: ../../topk/checkpoints next to "
                        "a demo run's checkpoints, when present)")
    p.add_argument("--sweep-multiples", default=",".join(f"{m:g}" for m in DEFAULT_MULTIPLES),
                   help="targets of --sweep as multiples of the trained k [%(default)s]")
    p.add_argument("--sweep-methods", default="global,per-layer")
    p.add_argument("--sweep-forms", default="cut,shift")
    p.add_argument("--demo-corpus", metavar="DIR",
                   help="demo corpus (or demo data root holding corpus/): its --split texts")
    p.add_argument("--split", choices=["valid", "test"], default="valid",
                   help="held-out split of --demo-corpus / the run's data [valid]")
    p.add_argument("--text", action="append", metavar="DOMAIN=FILE",
                   help=".txt (one document) or .jsonl ({'text': ...} per line)")
    p.add_argument("--data", action="append", metavar="DOMAIN=PREFIX",
                   help="tokenized Megatron prefix (.bin/.idx)")
    p.add_argument("--tokens-per-domain", type=int, default=4096,
                   help="held-out tokens per domain (first documents in order) [4096]")
    p.add_argument("--seq-length", type=int, help="window length (default: the model's)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--tokenizer", help="override the run's tokenizer ('gpt2' or a directory)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--no-figures", action="store_true", help="--sweep without the PNG")
    p.add_argument("--out", metavar="DIR",
                   help="output folder (default: dial/ or dial-sweep/ beside the run's "
                        "checkpoint directory; <HF folder>-dial[-sweep] for an HF folder)")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    return p


def default_out(load: str, sweep: bool) -> str:
    """runs/demo/relu/checkpoints[/iter_*] -> runs/demo/relu/dial[-sweep]; HF folder F ->
    F-dial[-sweep]."""
    name = "dial-sweep" if sweep else "dial"
    path = os.path.abspath(load)
    if is_hf_folder(path):
        return f"{path}-{name}"
    if os.path.basename(path).startswith("iter_"):
        path = os.path.dirname(path)
    return os.path.join(os.path.dirname(path), name)


def _check_args(args) -> None:
    if not os.path.exists(args.load):
        raise DialUsageError(f"--load {args.load}: no such checkpoint or folder")
    if args.out is None:
        args.out = default_out(args.load, args.sweep)
    t = args.target_experts_per_token
    if t is not None and not (math.isfinite(t) and t > 0):
        raise DialUsageError(f"--target-experts-per-token {t} must be > 0")
    if args.max_experts is not None and args.max_experts < 1:
        raise DialUsageError(f"--max-experts {args.max_experts} must be >= 1")
    if not 0 < args.tolerance < 1:
        raise DialUsageError(f"--tolerance {args.tolerance} must be in (0, 1)")
    for name in ("tokens_per_domain", "batch_size"):
        if getattr(args, name) < (2 if name == "tokens_per_domain" else 1):
            raise DialUsageError(f"--{name.replace('_', '-')} {getattr(args, name)} is too small")
    if args.seq_length is not None and args.seq_length < 2:
        raise DialUsageError(f"--seq-length {args.seq_length} must be >= 2")
    if args.thresholds is not None:
        try:
            args.threshold_values = [float(x) for x in args.thresholds.split(",")]
        except ValueError:
            raise DialUsageError(f"--thresholds {args.thresholds!r}: expected numbers separated "
                                 "by commas") from None
    if args.sweep:
        try:
            args.multiples = [float(x) for x in args.sweep_multiples.split(",")]
        except ValueError:
            raise DialUsageError(f"--sweep-multiples {args.sweep_multiples!r}: expected numbers "
                                 "separated by commas") from None
        if not args.multiples or any(not (m > 0 and math.isfinite(m)) for m in args.multiples):
            raise DialUsageError(f"--sweep-multiples {args.sweep_multiples}: each must be > 0")
        args.methods = args.sweep_methods.split(",")
        args.forms = args.sweep_forms.split(",")
        for v, allowed, flag in ((args.methods, ("global", "per-layer"), "--sweep-methods"),
                                 (args.forms, ("cut", "shift"), "--sweep-forms")):
            bad = [x for x in v if x not in allowed]
            if bad or not v:
                raise DialUsageError(f"{flag} {','.join(v)}: each must be one of "
                                     f"{', '.join(allowed)}")
    out = os.path.abspath(args.out)
    if os.path.exists(out) and (not os.path.isdir(out) or (os.listdir(out) and
                                                          not args.overwrite)):
        raise DialUsageError(f"--out {args.out} exists and is not an empty directory; choose a "
                             "new path or pass --overwrite")


def _check_against_model(args, lm: LoadedModel) -> None:
    """Input checks that need the model's shape (before any forward pass)."""
    if lm.router != "relu":
        raise DialUsageError(f"--load {args.load} is a {lm.router} model; the compute dial is "
                             "for ReLU-routed (ReMoE) models (TopK: evaluate it at another k "
                             "with --sweep --topk-load)")
    E = lm.tcfg.num_moe_experts
    layers = [n for n, _ in relu_routers(lm.model)]
    t = args.target_experts_per_token
    if t is not None and t > E:
        raise DialUsageError(f"--target-experts-per-token {t:g} is above the number of experts "
                             f"E = {E}")
    if args.max_experts is not None and args.max_experts > E:
        raise DialUsageError(f"--max-experts {args.max_experts} is above E = {E}")
    if args.thresholds is not None:
        make_dial(args.threshold_values, layers, args.form, args.max_experts, E)


def _default_topk(load: str) -> Optional[str]:
    """runs/demo/relu/checkpoints -> runs/demo/topk/checkpoints, when that exists."""
    path = os.path.abspath(load)
    if os.path.basename(path).startswith("iter_"):
        path = os.path.dirname(path)
    run_dir = os.path.dirname(path)
    cand = os.path.join(os.path.dirname(run_dir), "topk", os.path.basename(path))
    return cand if os.path.isdir(cand) and cand != path else None


def _write_json(path: str, obj) -> None:
    with open(path + ".tmp", "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=2, default=str)
        fh.write("\n")
    os.replace(path + ".tmp", path)


def point_dict(p: DialPoint) -> dict:
    return asdict(p)


@dataclass
class Undialled:
    """What every mode starts from: the model, its evaluator on the held-out tokens and the
    undialled pass (capture, gates of every MoE layer, its point)."""

    lm: LoadedModel
    ev: Evaluator
    eval_tokens: object  # analysis.EvalTokens
    layers: list  # MoE layer numbers
    cap: object  # analysis.RoutingCapture
    gates: dict  # {layer: gates [N, E]}
    point: DialPoint
    meta: dict  # what dial.json and sweep.json record about the model and the tokens


def undialled(args) -> Undialled:
    """Load the model, check the arguments against it, pick the held-out tokens and measure the
    model as trained (tau = 0)."""
    try:
        lm = load_model(args.load, args.tokenizer)
    except ConversionError as e:
        raise DialUsageError(str(e)) from None
    logger.info(f"dial: {lm.router} model, MoE layers {[n for n, _ in relu_routers(lm.model)]}, "
                f"E = {lm.tcfg.num_moe_experts}, trained k = {lm.tcfg.moe_router_topk}")
    _check_against_model(args, lm)
    eval_tokens = held_out_tokens(args, lm)
    ev = Evaluator(lm, eval_tokens, args.batch_size)
    logger.info(f"dial: {eval_tokens.tokens_per_domain()} held-out tokens per domain, windows of "
                f"{eval_tokens.seq_length}")
    layers = [n for n, _ in relu_routers(lm.model)]
    base_cap, base_gates = ev.run(capture_layers=layers)
    base = ev.point("ReMoE", "undialled", "-", None, None, cap=base_cap)
    logger.info(f"dial: undialled: {base.experts_per_token:.4f} experts/token (per layer "
                f"{', '.join(f'{x:.3f}' for x in base.experts_per_token_per_layer)}), valid loss "
                f"{base.valid_loss:.4f}")
    meta = {"checkpoint": lm.source, "layer_numbers": layers, "num_experts": lm.tcfg.num_moe_experts,
            "trained_topk": lm.tcfg.moe_router_topk,
            "held_out_tokens": eval_tokens.tokens_per_domain(), "seq_length": eval_tokens.seq_length}
    return Undialled(lm, ev, eval_tokens, layers, base_cap, base_gates, base, meta)


def run(args) -> dict:
    t_start = time.perf_counter()
    u = undialled(args)
    if args.sweep:
        return run_sweep(args, u, t_start)
    return run_dial(args, u, t_start)


def _choose_dial(args, u: Undialled) -> tuple:
    """-> (dial, its capture, method, calibration info): the given thresholds or a calibration."""
    E = u.lm.tcfg.num_moe_experts
    if args.thresholds is not None:
        dial = make_dial(args.threshold_values, u.layers, args.form, args.max_experts, E)
        cap, _ = u.ev.measure(dial)
        return dial, cap, "thresholds", {}
    target = args.target_experts_per_token
    if target > u.point.experts_per_token * (1 + args.tolerance):
        raise DialUsageError(
            f"--target-experts-per-token {target:g} is above the undialled model's "
            f"{u.point.experts_per_token:.4f}: thresholds >= 0 only remove experts; pick a "
            "lower target")
    dial, cap, _, extra = calibrate(u.ev, target, args.method, args.form, args.max_experts,
                                    args.tolerance, u.cap, u.gates)
    return dial, cap, args.method, extra


def run_dial(args, u: Undialled, t_start: float) -> dict:
    """One dial: evaluate it, write dial.json."""
    dial, cap, method, extra = _choose_dial(args, u)
    base = u.point
    p = u.ev.point("ReMoE", method, args.form, args.target_experts_per_token, dial, cap=cap)
    result = {"thresholds": list(dial.thresholds), "form": dial.form,
              "max_experts": dial.max_experts, "method": method,
              "target_experts_per_token": args.target_experts_per_token,
              "experts_per_token": p.experts_per_token,
              "experts_per_token_per_layer": p.experts_per_token_per_layer,
              "valid_loss": p.valid_loss, "domain_loss": p.domain_loss,
              "forward_flops_per_token": p.forward_flops_per_token,
              "expert_flops_per_token": p.expert_flops_per_token,
              "zero_expert_token_fraction": p.zero_expert_token_fraction,
              "undialled": {"experts_per_token": base.experts_per_token,
                            "experts_per_token_per_layer": base.experts_per_token_per_layer,
                            "valid_loss": base.valid_loss, "domain_loss": base.domain_loss,
                            "forward_flops_per_token": base.forward_flops_per_token},
              "calibration": extra, "forward_passes": u.ev.passes,
              "seconds": round(time.perf_counter() - t_start, 1), **u.meta}
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    _write_json(os.path.join(out, "dial.json"), result)
    logger.info(f"dial: {method} {dial.form} thresholds "
                f"{', '.join(f'{t:.5g}' for t in dial.thresholds)}: {p.experts_per_token:.4f} "
                f"experts/token (undialled {base.experts_per_token:.4f}), valid loss "
                f"{p.valid_loss:.4f} ({p.valid_loss - base.valid_loss:+.4f})")
    logger.info(f"dial: wrote {os.path.join(out, 'dial.json')}")
    return result


def run_sweep(args, u: Undialled, t_start: float) -> dict:
    """The sweep: ReMoE at every multiple, method and form, then TopK; sweep.csv, sweep.json and
    compute_dial.png."""
    topk_path = args.topk_load or _default_topk(args.load)
    if args.topk_load and not os.path.exists(args.topk_load):
        raise DialUsageError(f"--topk-load {args.topk_load}: no such checkpoint or folder")
    points, skipped = sweep_relu(u.ev, u.point, u.cap, u.gates, args.multiples, args.methods,
                                 args.forms, args.tolerance, args.max_experts)
    points.insert(0, u.point)
    if topk_path:
        points += sweep_topk(topk_path, u.eval_tokens, args.batch_size, args.tokenizer)
    else:
        skipped.append("TopK: no --topk-load given and no ../topk/checkpoints next to --load")
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    write_csv(os.path.join(out, "sweep.csv"), points)
    result = {"points": [point_dict(p) for p in points], "skipped": skipped,
              "topk_checkpoint": topk_path, "forward_passes": u.ev.passes,
              "seconds": round(time.perf_counter() - t_start, 1), **u.meta}
    _write_json(os.path.join(out, "sweep.json"), result)
    if not args.no_figures:
        fig = sweep_figure(points, f"compute dial: {os.path.relpath(u.lm.source)} "
                                   f"({sum(u.eval_tokens.tokens_per_domain().values()):,} held-out "
                                   "tokens)")
        fig.savefig(os.path.join(out, "compute_dial.png"), dpi=90)
    for s in skipped:
        logger.info(f"dial: skipped {s}")
    logger.info(f"dial: wrote {out}/sweep.csv, sweep.json"
                f"{'' if args.no_figures else ', compute_dial.png'} ({u.ev.passes} forward passes, "
                f"{time.perf_counter() - t_start:.0f} s)")
    return result


def _quiet() -> None:
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.getLogger("megatron").setLevel(logging.ERROR)


def main(argv: Optional[list] = None, prog: str = "remoe dial") -> int:
    configure()  # the console: progress lines, known noise filtered
    parser = build_parser(prog)

    def error(message):
        raise DialUsageError(message)

    parser.error = error

    try:
        args = parser.parse_args(argv)
        _check_args(args)
        _quiet()
        if args.threads:
            torch.set_num_threads(args.threads)

        if "WORLD_SIZE" not in os.environ:
            os.environ.pop("MASTER_PORT", None)
        init_distributed(ParallelConfig(), seed=1234)
        try:
            run(args)
        finally:
            destroy_distributed()
        return 0
    except (DialUsageError, ConfigError, AnalysisError, DataError, EvaluationError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
