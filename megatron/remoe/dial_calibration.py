"""Calibration of the compute dial and the quality-vs-compute sweep: `remoe dial`.

    remoe dial --load CKPT --target-experts-per-token X [--out DIR] [--method global|per-layer]
               [--form cut|shift] [--max-experts M] [--demo-corpus DIR | --text D=FILE | --data D=PREFIX]
    remoe dial --load CKPT --thresholds T[,T...] [--out DIR]        (evaluate given thresholds)
    remoe dial --load CKPT --sweep [--out DIR] [--topk-load CKPT]

CKPT is a Megatron checkpoint directory (any saved layout; rebuilt in this process by the
converter's loader) or an exported HF folder (converted in memory to the same megatron model).
Held-out tokens: the demo corpus's valid split, text files, tokenized prefixes, or by default the
run's own --valid-data-path. Every number comes from full forward passes of the dialled model
over those tokens (`analysis.capture_routing`): realised experts per token (mean over MoE layers
and tokens), next-token loss overall and per domain.

Calibration (hits the target within `--tolerance`, default 2%, or fails with one line):

* ``global``: one tau for every MoE layer, found by regula falsi (Illinois) on the realised mean,
  one forward pass per step. A layer's dial changes the inputs of the later layers, so the
  realised count is measured, never predicted.
* ``per-layer``: per-layer budgets b_l by measured marginal loss sensitivity, greedily: from the
  undialled model, remove a step of experts/token from the one layer where the measured loss
  increase per removed expert is smallest (one pass per candidate layer), then re-hit every
  budget; repeat down to the target. Budgets become thresholds in layer order: layer l's gates
  depend only on tau_1..tau_{l-1}, so one pass captures them and tau_l is the gate value that
  leaves b_l experts per token (exact up to ties).

Thresholds are >= 0, so a dial can only remove experts: targets above the undialled model's
experts per token are refused. The sweep runs both methods and both forms over
--sweep-multiples x the trained k, and a TopK checkpoint at k' = 1..E; it writes sweep.csv,
compute_dial.png and sweep.json. Exit codes: 0 done, 2 bad input (one line, nothing written).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from megatron.remoe.dial import DialError, make_dial, relu_routers, set_dial

DEFAULT_MULTIPLES = (0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0, 1.5, 2.0)


class DialUsageError(ValueError):
    """Bad command-line input; one line, exit 2."""


def _log(msg: str) -> None:
    print(msg, flush=True)


# ------------------------------------------------------------------------------------------------
# Models and held-out tokens
# ------------------------------------------------------------------------------------------------
@dataclass
class LoadedModel:
    model: object
    tcfg: object
    router: str  # relu | topk | ...
    seq_length: int
    vocab_size: int
    tokenizer: object
    source: str
    train_config: object = None  # TrainConfig of a Megatron checkpoint (None for HF folders)


def is_hf_folder(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json"))


def load_model(path: str, tokenizer: Optional[str] = None, overrides: Optional[dict] = None,
               log: Callable = _log) -> LoadedModel:
    """A Megatron checkpoint (converter's loader) or an HF folder (hf_to_megatron), fp32, eval,
    undialled."""
    from megatron.remoe.hf.convert import (
        hf_to_megatron,
        load_hf_folder,
        load_megatron_checkpoint,
        transformer_config_from_hf,
    )

    if is_hf_folder(path):
        hf, _ = load_hf_folder(path, torch.float32)
        if overrides and "moe_router_topk" in overrides:
            hf.config.num_experts_per_tok = overrides["moe_router_topk"]
        tcfg = transformer_config_from_hf(hf.config, moe_relu_dial=None)
        model, tcfg = hf_to_megatron(hf, tcfg)
        from megatron.remoe.data.tokenizer import load_tokenizer

        tok = load_tokenizer(tokenizer or path) if (
            tokenizer or os.path.isfile(os.path.join(path, "tokenizer.json"))) else None
        router = "relu" if tcfg.moe_relu_routing else ("topk" if tcfg.num_moe_experts else "dense")
        log(f"dial: loaded HF folder {path} ({router}, {tcfg.num_layers} layers)")
        return LoadedModel(model, tcfg, router, hf.config.max_position_embeddings,
                           hf.config.vocab_size, tok, os.path.abspath(path))
    model, tcfg, cfg, info = load_megatron_checkpoint(path, tokenizer=tokenizer, log=log,
                                                      overrides=overrides)
    if cfg.router == "relu":
        set_dial(model, None)
    return LoadedModel(model, tcfg, cfg.router, cfg.seq_length, info["vocab_size"],
                       info["tokenizer"], info["checkpoint"], cfg)


def eval_tokens_from_texts(domain_docs: dict, tokenizer, tokens_per_domain: int,
                           seq_length: int):
    """analysis.EvalTokens from {domain: [documents]}: each document's tokens plus the
    end-of-document token, the first `tokens_per_domain` per domain, cut into windows."""
    from megatron.remoe.analysis import EvalTokens

    names, seqs, seq_dom = [], [], []
    for d, (name, docs) in enumerate(sorted(domain_docs.items())):
        stream: list = []
        for doc in docs:
            if len(stream) >= tokens_per_domain:
                break
            stream += tokenizer.encode(doc) + [tokenizer.eod]
        stream = np.asarray(stream[:tokens_per_domain], dtype=np.int64)
        if len(stream) < 2:
            continue
        names.append(name)
        for start in range(0, len(stream), seq_length):
            if len(stream) - start >= 2:
                seqs.append(stream[start:start + seq_length])
                seq_dom.append(len(names) - 1)
    if not seqs:
        raise DialUsageError("the held-out text is empty")
    return EvalTokens(names, seqs, seq_dom, seq_length)


def held_out_tokens(args, lm: LoadedModel, log: Callable = _log):
    """The evaluation tokens named on the command line (or the run's own validation prefixes)."""
    from megatron.remoe import analysis as A
    from megatron.remoe import evaluation as ev

    seq = args.seq_length or lm.seq_length
    texts = _pairs(args.text, "--text")
    prefixes = _pairs(args.data, "--data")
    if (args.demo_corpus or texts) and lm.tokenizer is None:
        raise DialUsageError("the model has no tokenizer to encode text with; pass --tokenizer")
    domain_docs: dict = {}
    try:
        if args.demo_corpus:
            domain_docs.update(ev.demo_corpus_texts(args.demo_corpus, args.split))
        for domain, files in texts.items():
            domain_docs[domain] = [d for f in files for d in ev.read_text_file(f)]
    except ev.EvaluationError as e:
        raise DialUsageError(str(e)) from None
    if domain_docs:
        if prefixes:
            raise DialUsageError("give text (--demo-corpus / --text) or --data prefixes, not both")
        return eval_tokens_from_texts(domain_docs, lm.tokenizer, args.tokens_per_domain, seq)
    if not prefixes:
        if lm.train_config is None:
            raise DialUsageError("an HF folder has no run data: pass --demo-corpus DIR, --text "
                                 "DOMAIN=FILE or --data DOMAIN=PREFIX")
        prefixes, _ = A.default_data(lm.train_config, args.split)
    else:
        prefixes = {d: p[0] for d, p in prefixes.items()}
    return A.make_eval_tokens(prefixes, args.tokens_per_domain, seq, lm.tokenizer, log=log)


def _pairs(items, flag) -> dict:
    out: dict = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise DialUsageError(f"{flag} {item!r}: expected DOMAIN=PATH")
        out.setdefault(name, []).append(value)
    return out


# ------------------------------------------------------------------------------------------------
# Measurement
# ------------------------------------------------------------------------------------------------
@dataclass
class DialPoint:
    """One evaluated setting of one model on the held-out tokens."""

    model: str  # "ReMoE" | "TopK"
    method: str  # undialled | global | per-layer | thresholds | topk
    form: str  # cut | shift | - (TopK)
    target: Optional[float]
    thresholds: list
    max_experts: Optional[int]
    experts_per_token: float
    experts_per_token_per_layer: list
    valid_loss: float
    domain_loss: dict
    forward_flops_per_token: float
    expert_flops_per_token: float
    zero_expert_token_fraction: float
    tokens: int
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)


def flops_config(tcfg, seq_length: int) -> dict:
    """The model-shape dict of ablation.flops_per_token, from a megatron config."""
    G = getattr(tcfg, "moe_granularity", 1) or 1
    E, k = tcfg.num_moe_experts or 0, tcfg.moe_router_topk or 0
    return dict(hidden_size=tcfg.hidden_size, num_layers=tcfg.num_layers, seq_length=seq_length,
                num_attention_heads=tcfg.num_attention_heads,
                num_query_groups=tcfg.num_query_groups, kv_channels=tcfg.kv_channels,
                ffn_hidden_size=(tcfg.moe_ffn_hidden_size * G) if E else tcfg.ffn_hidden_size,
                router="relu" if E else "dense", num_experts=E // G, moe_router_topk=k // G,
                moe_granularity=G, moe_layer_freq=tcfg.moe_layer_freq)


def forward_flops(lm: LoadedModel, experts_per_token: float) -> tuple:
    """(forward FLOPs per token, of which the routed experts') at `experts_per_token`."""
    from megatron.remoe.ablation import flops_per_token

    shape = flops_config(lm.tcfg, lm.seq_length)
    total = flops_per_token(shape, lm.vocab_size, experts_per_token)["train"] / 3
    no_experts = flops_per_token(shape, lm.vocab_size, 0.0)["train"] / 3
    return total, total - no_experts


class Evaluator:
    """Full forward passes over fixed held-out tokens; optionally captures one layer's gates."""

    def __init__(self, lm: LoadedModel, eval_tokens, batch_size: int = 8, log: Callable = _log):
        self.lm, self.ev, self.batch_size, self.log = lm, eval_tokens, batch_size, log
        self.passes = 0

    def run(self, capture_layers: Sequence[int] = ()):
        """-> (analysis.RoutingCapture, {layer number: its gates [N, E]} of `capture_layers`)."""
        from megatron.remoe.analysis import capture_routing

        gates: dict = {n: [] for n in capture_layers}
        routers = dict(relu_routers(self.lm.model))

        def hook(n):
            return lambda m, a, out: gates[n].append(
                out[0].detach().float().reshape(-1, out[0].shape[-1]))

        handles = [routers[n].register_forward_hook(hook(n)) for n in capture_layers]
        try:
            cap = capture_routing(self.lm.model, self.ev, batch_size=self.batch_size,
                                  log=lambda m: None)
        finally:
            for h in handles:
                h.remove()
        self.passes += 1
        return cap, {n: torch.cat(g) for n, g in gates.items()}

    def point(self, model: str, method: str, form: str, target=None, dial=None,
              topk: Optional[int] = None, cap=None) -> DialPoint:
        t0 = time.perf_counter()
        if cap is None:
            cap, _ = self.run()
        per_token = cap.routing.sum(axis=2)  # [L, N]
        per_layer = per_token.mean(axis=1).tolist()
        ept = float(np.mean(per_layer))
        loss_sum, loss_tok = sum(cap.loss_sum.values()), sum(cap.loss_tokens.values())
        total, experts = forward_flops(self.lm, ept)
        return DialPoint(
            model=model, method=method, form=form, target=target,
            thresholds=list(dial.thresholds) if dial is not None else [],
            max_experts=dial.max_experts if dial is not None else None,
            experts_per_token=ept, experts_per_token_per_layer=per_layer,
            valid_loss=loss_sum / max(loss_tok, 1), domain_loss=cap.domain_loss(),
            forward_flops_per_token=total, expert_flops_per_token=experts,
            zero_expert_token_fraction=float((per_token == 0).mean()), tokens=cap.num_tokens,
            seconds=time.perf_counter() - t0, extra={"topk": topk} if topk else {})

    def measure(self, dial) -> tuple:
        """(capture, realised experts per token) with `dial` set on the model."""
        set_dial(self.lm.model, dial)
        cap, _ = self.run()
        return cap, float(cap.routing.sum(axis=2).mean())


# ------------------------------------------------------------------------------------------------
# Calibration
# ------------------------------------------------------------------------------------------------
def count_at(gates: torch.Tensor, tau: float, cap: Optional[int]) -> float:
    """Mean experts per token of gates [N, E] under threshold tau (and cap)."""
    n = (gates > tau).sum(dim=-1)
    if cap is not None:
        n = n.clamp(max=cap)
    return float(n.float().mean())


def threshold_for(gates: torch.Tensor, budget: float, cap: Optional[int]) -> float:
    """The smallest-error tau >= 0 leaving `budget` experts per token in gates [N, E]: the
    midpoint between the two gate values the count steps across (exact up to ties)."""
    if count_at(gates, 0.0, cap) <= budget:
        return 0.0
    values = torch.unique(gates[gates > 0])  # ascending
    lo, hi = 0, len(values) - 1  # count_at(values[i]) decreases with i
    while lo < hi:  # first index whose count is <= budget
        mid = (lo + hi) // 2
        if count_at(gates, float(values[mid]), cap) <= budget:
            hi = mid
        else:
            lo = mid + 1
    above = float(values[lo])
    below = float(values[lo - 1]) if lo > 0 else 0.0
    c_above, c_below = count_at(gates, above, cap), count_at(gates, below, cap)
    # pick the side closer to the budget; between two gate values any tau gives the same count
    tau = above if abs(c_above - budget) <= abs(c_below - budget) else below
    nxt = float(values[lo + 1]) if tau == above and lo + 1 < len(values) else None
    if tau == above:
        return (above + nxt) / 2 if nxt is not None else above
    return (below + above) / 2


def calibrate_global(ev: Evaluator, target: float, form: str, max_experts: Optional[int],
                     tolerance: float, base_gates: dict, max_steps: int = 30):
    """One tau for every MoE layer: Illinois regula falsi on the realised experts per token,
    started from the tau that would hit the target if no layer changed the next one's input."""
    layers = [n for n, _ in relu_routers(ev.lm.model)]
    E = ev.lm.tcfg.num_moe_experts
    steps = []

    def f(tau):
        dial = make_dial(tau, layers, form, max_experts, E)
        cap, got = ev.measure(dial)
        ev.log(f"dial:   global {form} tau {tau:.5g}: {got:.4f} experts/token")
        steps.append((abs(got - target), dial, cap, got))
        return got - target

    def done():
        return min(steps, key=lambda x: x[0])[0] <= tolerance * target / 4

    guess = threshold_for(torch.cat([base_gates[n] for n in layers]), target, max_experts)
    g = f(guess)
    if not done():
        # bracket [lo, hi] with f(lo) > 0 > f(hi), stepping from the guess
        if g > 0:
            lo, f_lo, hi = guess, g, max(guess * 1.5, 1e-3)
            while not done():
                f_hi = f(hi)
                if f_hi <= 0 or hi > 1e6:
                    break
                lo, f_lo, hi = hi, f_hi, hi * 1.5
        else:
            hi, f_hi, lo, f_lo = guess, g, guess / 1.5, g
            while guess > 0 and not done():
                f_lo = f(lo)
                if f_lo >= 0 or lo == 0.0:
                    break
                hi, f_hi, lo = lo, f_lo, (lo / 1.5 if lo > 1e-6 * guess else 0.0)
        side = 0
        for _ in range(max_steps):
            if done() or f_lo <= 0 or f_hi >= 0:
                break
            tau = hi - f_hi * (hi - lo) / (f_hi - f_lo)
            if not lo < tau < hi:
                tau = (lo + hi) / 2
            g = f(tau)
            if g > 0:
                lo, f_lo = tau, g
                if side == 1:
                    f_hi /= 2
                side = 1
            else:
                hi, f_hi = tau, g
                if side == -1:
                    f_lo /= 2
                side = -1
            if hi - lo <= 1e-9 * hi:
                break
    _, dial, cap, got = min(steps, key=lambda x: x[0])
    return dial, cap, got


def _loss(cap) -> float:
    return sum(cap.loss_sum.values()) / max(sum(cap.loss_tokens.values()), 1)


def calibrate_layers(ev: Evaluator, budgets: Sequence[float], form: str,
                     max_experts: Optional[int], taus: Optional[list] = None, start: int = 0,
                     gates: Optional[dict] = None, quiet: bool = False) -> tuple:
    """tau_l hitting budget b_l in each MoE layer from index `start` on, in layer order (layers
    before `start` keep `taus`, their `gates` are reused). Layer l's gates depend only on the
    earlier layers' thresholds, so one pass per layer captures them (with tau_l = 0: ReLU(logits),
    and tau_l selects logits > tau_l in both forms). A layer that cannot reach its budget passes
    the shortfall on to the next. Returns (dial, {layer: gates under the earlier thresholds})."""
    layers = [n for n, _ in relu_routers(ev.lm.model)]
    E = ev.lm.tcfg.num_moe_experts
    taus = list(taus) if taus is not None else [0.0] * len(layers)
    gates = dict(gates or {})
    carry = 0.0
    for i in range(start, len(layers)):
        n = layers[i]
        trial = taus[:i] + [0.0] * (len(layers) - i)
        set_dial(ev.lm.model, make_dial(trial, layers, form, max_experts, E))
        _, captured = ev.run(capture_layers=[n])
        gates[n] = captured[n]
        want = budgets[i] + carry
        taus[i] = threshold_for(gates[n], want, max_experts)
        got = count_at(gates[n], taus[i], max_experts)
        carry = want - got
        if not quiet:
            ev.log(f"dial:   layer {n}: budget {want:.4f} -> tau {taus[i]:.5g} ({got:.4f} "
                   f"experts/token)")
    return make_dial(taus, layers, form, max_experts, E), gates


def greedy_per_layer(ev: Evaluator, targets: Sequence[float], form: str,
                     max_experts: Optional[int], base_cap, base_gates: dict,
                     step: float) -> dict:
    """Per-layer budgets by measured marginal loss: starting from the undialled model, remove
    `step` experts/token (mean over layers) at a time from the one layer where the measured loss
    increase per removed expert is smallest, re-calibrating the later layers to their budgets
    after each move; the state at each target (descending) is its dial.
    Returns {target: (dial, capture, realised experts/token, info)}."""
    layers = [n for n, _ in relu_routers(ev.lm.model)]
    E = ev.lm.tcfg.num_moe_experts
    L = len(layers)
    budgets = [float(x) for x in base_cap.routing.sum(axis=2).mean(axis=1)]
    taus, gates, loss = [0.0] * L, dict(base_gates), _loss(base_cap)
    state = (make_dial(taus, layers, form, max_experts, E), base_cap, sum(budgets) / L)
    if max_experts is not None:  # the cap alone already removes experts
        dial, gates = calibrate_layers(ev, [min(b, max_experts) for b in budgets], form,
                                       max_experts, quiet=True)
        taus = list(dial.thresholds)
        budgets = [count_at(gates[n], t, max_experts) for n, t in zip(layers, taus)]
        cap, got = ev.measure(dial)
        loss, state = _loss(cap), (dial, cap, got)
    out: dict = {}
    moves = []
    for target in sorted(targets, reverse=True):
        while sum(budgets) / L > target + 1e-9:
            total = min(step, sum(budgets) / L - target) * L
            best = None
            for i, n in enumerate(layers):
                d = min(total, budgets[i])
                if d <= 1e-9:
                    continue
                trial = list(taus)
                trial[i] = threshold_for(gates[n], budgets[i] - d, max_experts)
                cap, _ = ev.measure(make_dial(trial, layers, form, max_experts, E))
                cost = (_loss(cap) - loss) / d
                if best is None or cost < best[0]:
                    best = (cost, i, d)
            cost, i, d = best
            budgets[i] -= d
            dial, gates = calibrate_layers(ev, budgets, form, max_experts, taus, i, gates,
                                           quiet=True)
            taus = list(dial.thresholds)
            cap, got = ev.measure(dial)
            loss, state = _loss(cap), (dial, cap, got)
            moves.append({"layer": layers[i], "removed": d, "nats_per_expert": cost})
            ev.log(f"dial:   greedy {form}: -{d / L:.4f} experts/token from layer {layers[i]} "
                   f"({cost:+.4f} nats per expert/token): budgets "
                   f"{', '.join(f'{b:.3f}' for b in budgets)}, loss {loss:.4f}")
        out[target] = (*state, {"budgets": list(budgets), "moves": list(moves)})
    return out


def calibrate(ev: Evaluator, target: float, method: str, form: str,
              max_experts: Optional[int], tolerance: float, base_cap, base_gates: dict,
              step: Optional[float] = None) -> tuple:
    """-> (ComputeDial, capture at that dial, realised experts/token, extra info).
    `base_cap`, `base_gates`: the undialled pass (capture, {layer: gates})."""
    if method == "global":
        dial, cap, got = calibrate_global(ev, target, form, max_experts, tolerance, base_gates)
        extra = {}
    else:
        base = float(base_cap.routing.sum(axis=2).mean())
        step = step or max((base - target) / 8, 1e-3)
        dial, cap, got, extra = greedy_per_layer(ev, [target], form, max_experts, base_cap,
                                                 base_gates, step)[target]
    check_reached(got, target, tolerance, method, form)
    return dial, cap, got, extra


def check_reached(got: float, target: float, tolerance: float, method: str, form: str) -> None:
    if abs(got - target) > tolerance * target:
        raise DialError(f"calibration reached {got:.4f} experts/token, not {target:g} within "
                        f"{tolerance:.0%} ({method}, {form}); use more --tokens-per-domain")


# ------------------------------------------------------------------------------------------------
# Sweep
# ------------------------------------------------------------------------------------------------
def sweep_relu(ev: Evaluator, base_point: DialPoint, base_cap, base_gates: dict,
               multiples: Sequence[float], methods: Sequence[str], forms: Sequence[str],
               tolerance: float, max_experts: Optional[int] = None) -> tuple:
    """ReMoE points at `multiples` x trained k for every method and form (per-layer: one greedy
    path per form through all targets); returns (points, skipped)."""
    k = ev.lm.tcfg.moe_router_topk
    base = base_point.experts_per_token
    points, skipped, targets = [], [], []
    for mult in multiples:
        target = mult * k
        if target > base * (1 + tolerance):
            skipped.append(f"{mult:g}x k = {target:g} experts/token: above the undialled "
                           f"{base:.4f}; thresholds >= 0 can only remove experts")
        else:
            targets.append((mult, min(target, base)))
    for method in methods:
        for form in forms:
            t0 = time.perf_counter()
            ev.log(f"dial: sweep {method} {form}: targets "
                   f"{', '.join(f'{t:.4g}' for _, t in targets)} experts/token")
            if method == "per-layer":
                path = greedy_per_layer(ev, [t for _, t in targets], form, max_experts,
                                        base_cap, base_gates, step=k / 16)
            for mult, target in targets:
                if method == "global":
                    dial, cap, got = calibrate_global(ev, target, form, max_experts, tolerance,
                                                      base_gates)
                    extra = {}
                else:
                    dial, cap, got, extra = path[target]
                check_reached(got, target, tolerance, method, form)
                p = ev.point("ReMoE", method, form, target, dial, cap=cap)
                p.extra.update(multiple=mult, **extra)
                ev.log(f"dial:   {mult:g}x k: {p.experts_per_token:.4f} experts/token, valid "
                       f"loss {p.valid_loss:.4f} ({p.valid_loss - base_point.valid_loss:+.4f})")
                points.append(p)
            ev.log(f"dial: sweep {method} {form} done in {time.perf_counter() - t0:.0f} s")
    set_dial(ev.lm.model, None)
    return points, skipped


def sweep_topk(path: str, eval_tokens, batch_size: int, tokenizer: Optional[str],
               log: Callable = _log) -> list:
    """A TopK checkpoint evaluated at k' = 1..E on the same tokens (rebuilt per k')."""
    first = load_model(path, tokenizer, log=log)
    if first.router not in ("topk", "topk-sigmoid-bias"):
        raise DialUsageError(f"--topk-load {path} is a {first.router} model, not TopK")
    E = first.tcfg.num_moe_experts
    points = []
    for k in range(1, E + 1):
        lm = first if k == first.tcfg.moe_router_topk else load_model(
            path, tokenizer, overrides={"moe_router_topk": k}, log=lambda m: None)
        p = Evaluator(lm, eval_tokens, batch_size, log).point("TopK", "topk", "-", topk=k)
        p.extra["trained_k"] = first.tcfg.moe_router_topk
        log(f"dial: TopK k'={k}: {p.experts_per_token:.3f} experts/token, valid loss "
            f"{p.valid_loss:.4f}")
        points.append(p)
    return points


CSV_FIELDS = ("model", "method", "form", "multiple", "target", "experts_per_token",
              "valid_loss", "forward_mflops_per_token", "expert_mflops_per_token",
              "zero_expert_token_fraction", "thresholds", "experts_per_token_per_layer")


def write_csv(path: str, points: Sequence[DialPoint]) -> None:
    domains = sorted({d for p in points for d in p.domain_loss})
    with open(path + ".tmp", "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(list(CSV_FIELDS) + [f"loss_{d}" for d in domains])
        for p in points:
            mult = p.extra.get("multiple", "")
            w.writerow([p.model, p.method, p.form, mult,
                        "" if p.target is None else f"{p.target:.6g}",
                        f"{p.experts_per_token:.6g}", f"{p.valid_loss:.6g}",
                        f"{p.forward_flops_per_token / 1e6:.6g}",
                        f"{p.expert_flops_per_token / 1e6:.6g}",
                        f"{p.zero_expert_token_fraction:.6g}",
                        ";".join(f"{t:.6g}" for t in p.thresholds),
                        ";".join(f"{x:.4g}" for x in p.experts_per_token_per_layer)]
                       + [f"{p.domain_loss[d]:.6g}" if d in p.domain_loss else ""
                          for d in domains])
    os.replace(path + ".tmp", path)


def sweep_figure(points: Sequence[DialPoint], title: str):
    """Validation loss vs active experts per token and vs forward FLOPs per token."""
    from megatron.remoe.analysis import _plt

    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    series: dict = {}
    for p in points:
        if p.method == "undialled":
            continue
        key = "TopK (k' = 1..E)" if p.model == "TopK" else f"ReMoE {p.method} {p.form}"
        series.setdefault(key, []).append(p)
    undialled = [p for p in points if p.method == "undialled"]
    styles = {"ReMoE global cut": "o-", "ReMoE global shift": "o--",
              "ReMoE per-layer cut": "s-", "ReMoE per-layer shift": "s--"}
    for ax, xkey, xlabel in ((axes[0], "experts_per_token", "active experts per token "
                              "(mean over MoE layers)"),
                             (axes[1], "forward_flops_per_token", "forward MFLOPs per token")):
        scale = 1e6 if xkey == "forward_flops_per_token" else 1.0
        for key, ps in series.items():
            ps = sorted(ps + ([] if key.startswith("TopK") else undialled),
                        key=lambda p: getattr(p, xkey))
            ax.plot([getattr(p, xkey) / scale for p in ps], [p.valid_loss for p in ps],
                    "k^-" if key.startswith("TopK") else styles.get(key, "o-"),
                    label=key, markersize=4)
        for p in undialled:
            ax.plot([getattr(p, xkey) / scale], [p.valid_loss], "r*", markersize=12,
                    label="ReMoE as trained (tau = 0)")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_title("loss vs active experts")
    axes[1].set_title("loss vs forward compute")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------
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


def run(args, log: Callable = _log) -> dict:
    from megatron.remoe.hf.convert import ConversionError

    t_start = time.perf_counter()
    try:
        lm = load_model(args.load, args.tokenizer, log=log)
    except ConversionError as e:
        raise DialUsageError(str(e)) from None
    log(f"dial: {lm.router} model, MoE layers {[n for n, _ in relu_routers(lm.model)]}, "
        f"E = {lm.tcfg.num_moe_experts}, trained k = {lm.tcfg.moe_router_topk}")
    _check_against_model(args, lm)
    eval_tokens = held_out_tokens(args, lm, log)
    ev = Evaluator(lm, eval_tokens, args.batch_size, log)
    log(f"dial: {eval_tokens.tokens_per_domain()} held-out tokens per domain, windows of "
        f"{eval_tokens.seq_length}")
    layers = [n for n, _ in relu_routers(lm.model)]
    base_cap, base_gates = ev.run(capture_layers=layers)
    base = ev.point("ReMoE", "undialled", "-", None, None, cap=base_cap)
    log(f"dial: undialled: {base.experts_per_token:.4f} experts/token (per layer "
        f"{', '.join(f'{x:.3f}' for x in base.experts_per_token_per_layer)}), valid loss "
        f"{base.valid_loss:.4f}")
    E = lm.tcfg.num_moe_experts
    meta = {"checkpoint": lm.source, "layer_numbers": layers, "num_experts": E,
            "trained_topk": lm.tcfg.moe_router_topk,
            "held_out_tokens": eval_tokens.tokens_per_domain(), "seq_length": eval_tokens.seq_length}
    out = os.path.abspath(args.out)
    if not args.sweep:
        if args.thresholds is not None:
            dial = make_dial(args.threshold_values, layers, args.form, args.max_experts, E)
            cap, _ = ev.measure(dial)
            method, extra = "thresholds", {}
        else:
            target = args.target_experts_per_token
            if target > base.experts_per_token * (1 + args.tolerance):
                raise DialUsageError(
                    f"--target-experts-per-token {target:g} is above the undialled model's "
                    f"{base.experts_per_token:.4f}: thresholds >= 0 only remove experts; pick a "
                    "lower target")
            dial, cap, _, extra = calibrate(ev, target, args.method, args.form,
                                            args.max_experts, args.tolerance, base_cap,
                                            base_gates)
            method = args.method
        p = ev.point("ReMoE", method, args.form, args.target_experts_per_token, dial, cap=cap)
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
                  "calibration": extra, "forward_passes": ev.passes,
                  "seconds": round(time.perf_counter() - t_start, 1), **meta}
        os.makedirs(out, exist_ok=True)
        _write_json(os.path.join(out, "dial.json"), result)
        log(f"dial: {method} {dial.form} thresholds "
            f"{', '.join(f'{t:.5g}' for t in dial.thresholds)}: {p.experts_per_token:.4f} "
            f"experts/token (undialled {base.experts_per_token:.4f}), valid loss "
            f"{p.valid_loss:.4f} ({p.valid_loss - base.valid_loss:+.4f})")
        log(f"dial: wrote {os.path.join(out, 'dial.json')}")
        return result
    # the sweep
    topk_path = args.topk_load or _default_topk(args.load)
    if args.topk_load and not os.path.exists(args.topk_load):
        raise DialUsageError(f"--topk-load {args.topk_load}: no such checkpoint or folder")
    points, skipped = sweep_relu(ev, base, base_cap, base_gates, args.multiples, args.methods,
                                 args.forms, args.tolerance, args.max_experts)
    points.insert(0, base)
    if topk_path:
        points += sweep_topk(topk_path, eval_tokens, args.batch_size, args.tokenizer, log)
    else:
        skipped.append("TopK: no --topk-load given and no ../topk/checkpoints next to --load")
    os.makedirs(out, exist_ok=True)
    write_csv(os.path.join(out, "sweep.csv"), points)
    result = {"points": [point_dict(p) for p in points], "skipped": skipped,
              "topk_checkpoint": topk_path, "forward_passes": ev.passes,
              "seconds": round(time.perf_counter() - t_start, 1), **meta}
    _write_json(os.path.join(out, "sweep.json"), result)
    if not args.no_figures:
        fig = sweep_figure(points, f"compute dial: {os.path.relpath(lm.source)} "
                                   f"({sum(eval_tokens.tokens_per_domain().values()):,} held-out "
                                   "tokens)")
        fig.savefig(os.path.join(out, "compute_dial.png"), dpi=90)
    for s in skipped:
        log(f"dial: skipped {s}")
    log(f"dial: wrote {out}/sweep.csv, sweep.json"
        f"{'' if args.no_figures else ', compute_dial.png'} ({ev.passes} forward passes, "
        f"{time.perf_counter() - t_start:.0f} s)")
    return result


def _quiet() -> None:
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.getLogger("megatron").setLevel(logging.ERROR)


def main(argv: Optional[list] = None, prog: str = "remoe dial") -> int:
    parser = build_parser(prog)

    def error(message):
        raise DialUsageError(message)

    parser.error = error
    from megatron.remoe.analysis import AnalysisError
    from megatron.remoe.config import ConfigError
    from megatron.remoe.data.errors import DataError
    from megatron.remoe.evaluation import EvaluationError

    try:
        args = parser.parse_args(argv)
        _check_args(args)
        _quiet()
        if args.threads:
            torch.set_num_threads(args.threads)
        from megatron.remoe.distributed import ParallelConfig, destroy_distributed, init_distributed

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


if __name__ == "__main__":  # checkpoint loading may spawn processes: keep this guard
    sys.exit(main())
