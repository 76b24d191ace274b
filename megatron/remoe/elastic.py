"""Elastic training: one ReMoE model that serves many compute budgets through the compute dial.

The compute dial (dial.py) removes small ReLU gates at inference; a model trained the paper's way
never saw such a cut and loses loss when dialled. Elastic training shows it the cut: on a seeded
share of training steps every MoE layer keeps only the largest `fraction` of its positive gates
(form `cut`: the kept gates keep their value and their gradient), so the LM loss of those steps
trains the model to work at that budget.

* Budgets are fractions in (0, 1) of a layer's undialled experts per token, measured on the
  current micro-batch: the layer keeps the round(fraction * P) largest of its P positive gates
  (exact count, ties broken by position), so the dialled pass realises the budget whatever the
  model's current sparsity (Stage I included).
* The L1 regulariser and the sparsity controller stay on the undialled gates (paper Eqs. 6-11):
  the cut applies after the router attached the L1 term and recorded its statistics, so lambda
  drives the full-budget model to the paper's target.
* Draws are a pure function of (seed, iteration): identical on every rank without communication,
  and a resumed run draws what the uninterrupted one would (no state in checkpoints).
* Modes: `step` cuts every MoE layer of a drawn step by the same fraction; `layer` draws whether
  and how much to cut for each MoE layer separately.
* Full pass (`moe_relu_elastic_full_pass`, the "sandwich rule" of slimmable networks): a drawn
  step trains the full model too. Its gradient is the plain step's (LM loss + L1 term, controller
  statistics from this pass only) plus the LM-loss gradient of the dialled forward on the same
  micro-batches (no L1 term, no statistics); one optimizer step. The trainer runs megatron-core's
  schedule twice (training/step.py): the full pass without gradient reduction, then the dialled
  pass on the recorded micro-batches, whose finalize reduces the summed gradient once. Off, a
  drawn step trains only the dialled model.
* Off (no budgets, the default) nothing here runs and the trainer is the paper's, bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np
import torch

from megatron.remoe.errors import ConfigError

MODES = ("step", "layer")
DEFAULT_PROB = 0.5
DEFAULT_MODE = "step"
# first word of the numpy SeedSequence: the elastic draws never share a stream with another use of
# the run's seed (weights, data order)
_STREAM = 0xE1A5

Budget = Union[None, float, dict]  # None: undialled; float: every MoE layer; {layer_number: f}


@dataclass(frozen=True)
class ElasticOptions:
    """The elastic settings of a run (TrainConfig `moe_relu_elastic_*`)."""

    budgets: tuple  # fractions in (0, 1) of the undialled experts per token
    prob: float = DEFAULT_PROB  # share of steps (mode step) or of layers per step (mode layer)
    mode: str = DEFAULT_MODE
    seed: int = 0

    def draw(self, iteration: int, layer_numbers: Sequence[int]) -> Budget:
        """The budget of training step `iteration` (1-based): the same on every rank and on
        every run with the same seed, whatever ran before."""
        rng = np.random.default_rng([_STREAM, self.seed % 2**32, int(iteration)])
        if self.mode == "step":
            if rng.random() >= self.prob:
                return None
            return float(self.budgets[rng.integers(len(self.budgets))])
        drawn = {}
        for layer in layer_numbers:
            dialled = rng.random() < self.prob
            fraction = float(self.budgets[rng.integers(len(self.budgets))])
            if dialled:
                drawn[int(layer)] = fraction
        return drawn or None


def parse_budgets(values) -> tuple:
    """`moe_relu_elastic_budgets` (numbers or their strings, as flags and YAML give them) ->
    a tuple of fractions, each in (0, 1), no repeats."""
    out = []
    for v in values or ():
        try:
            f = float(v)
        except (TypeError, ValueError):
            raise ConfigError(f"moe_relu_elastic_budgets: {v!r} is not a number; give fractions "
                              "of the undialled experts per token, e.g. 0.5 0.25") from None
        if not (math.isfinite(f) and 0.0 < f < 1.0):
            raise ConfigError(f"moe_relu_elastic_budgets: {v!r} must be in (0, 1) (a fraction of "
                              "the undialled experts per token; 1 is the undialled model, which "
                              "the steps without a cut train)")
        if f in out:
            raise ConfigError(f"moe_relu_elastic_budgets lists {f:g} twice; remove the repeat")
        out.append(f)
    return tuple(out)


def elastic_options(cfg) -> Optional[ElasticOptions]:
    """The run's ElasticOptions from a TrainConfig; None when elastic training is off."""
    budgets = parse_budgets(cfg.moe_relu_elastic_budgets)
    if not budgets:
        return None
    return ElasticOptions(budgets, float(cfg.moe_relu_elastic_prob), cfg.moe_relu_elastic_mode,
                          int(cfg.seed))


def check_elastic(cfg) -> None:
    """TrainConfig validation of the `moe_relu_elastic_*` fields (one-line ConfigErrors)."""
    budgets = parse_budgets(cfg.moe_relu_elastic_budgets)
    prob, mode = cfg.moe_relu_elastic_prob, cfg.moe_relu_elastic_mode
    if not budgets and cfg.moe_relu_elastic_full_pass:
        raise ConfigError("moe_relu_elastic_full_pass has no effect without "
                          "moe_relu_elastic_budgets; set the budgets (e.g. 0.5 0.25) or drop it")
    if not budgets:
        if prob != DEFAULT_PROB or mode != DEFAULT_MODE:
            raise ConfigError(f"moe_relu_elastic_prob={prob} / moe_relu_elastic_mode={mode} have "
                              "no effect without moe_relu_elastic_budgets; set the budgets "
                              "(e.g. 0.5 0.25) or drop them")
        return
    if cfg.router != "relu":
        raise ConfigError(f"moe_relu_elastic_budgets applies to ReLU routing (--router relu), "
                          f"not router {cfg.router}; drop it")
    if cfg.moe_relu_elastic_full_pass and cfg.virtual_pipeline_model_parallel_size:
        raise ConfigError("moe_relu_elastic_full_pass is not tested with the interleaved pipeline "
                          f"schedule (virtual_pipeline_model_parallel_size="
                          f"{cfg.virtual_pipeline_model_parallel_size}); unset one of them")
    if mode not in MODES:
        raise ConfigError(f"moe_relu_elastic_mode={mode!r} is not one of {', '.join(MODES)}")
    if not (isinstance(prob, (int, float)) and 0.0 < prob <= 1.0):
        raise ConfigError(f"moe_relu_elastic_prob={prob} must be in (0, 1]: the share of steps "
                          "(mode step) or layers (mode layer) trained dialled")


def fraction_of(budget: Budget, layer_number) -> Optional[float]:
    """The fraction a router with `layer_number` keeps under `budget` (None: no cut)."""
    if budget is None or isinstance(budget, float):
        return budget
    return budget.get(int(layer_number)) if layer_number is not None else None


def elastic_cut(probs: torch.Tensor, routing_map: torch.Tensor, fraction: float):
    """Keep the round(fraction * P) largest of the P positive gates of `probs` [N, E] (all
    tokens of the micro-batch together), zero the rest; returns (probs, routing_map).

    Exact count without a host sync: the gates are ranked once (a stable sort: ties go to the
    earlier entry, the same in a recomputed forward), the first n ranks kept. Kept gates keep
    their value and gradient (the dial's `cut` form)."""
    with torch.no_grad():
        flat = probs.detach().reshape(-1)
        keep_count = torch.round(routing_map.sum().to(torch.float64) * fraction)
        order = torch.sort(flat, descending=True, stable=True).indices
        ranks = torch.empty_like(order)
        ranks[order] = torch.arange(flat.numel(), device=flat.device)
        keep = (ranks < keep_count).view_as(routing_map) & routing_map
    return probs * keep.to(probs.dtype), keep
