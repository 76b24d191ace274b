"""Inference-time compute dial for ReLU-routed MoE models: gate thresholds and a per-token cap.

A ReLU router's gates are continuous and a token uses 0..E experts, so a trained ReMoE model can
run with fewer active experts, without retraining, by dropping small gates. Per MoE layer l
(in layer order) a threshold tau_l >= 0, in one of two forms:

* ``cut``:   g = relu(x W) * [relu(x W) > tau_l]   (gates above tau_l keep their trained value)
* ``shift``: g = relu(x W - tau_l)                 (every gate is lowered by tau_l)

Both send a token to exactly the experts whose router logit exceeds tau_l; they differ in the
weights of the kept experts. Optionally ``max_experts`` m keeps at most the m largest gates of a
token. tau = 0 everywhere and no cap is the trained model, bit for bit.

Inference only: a router in training mode with a dial set raises `DialError` (the regulariser and
the sparsity controller are defined on the undialled gates). The megatron-core side reads the
dial from `ReMoETransformerConfig.moe_relu_dial` (set it with `megatron.remoe.router.set_dial`;
`megatron.remoe.config.check_config_dial` binds it to the config's MoE layers); the exported HF model
from `config.json`'s ``router_dial`` (``ComputeDial.to_dict()``). Calibration to a target number
of experts per token and the quality/compute sweep live in `megatron.remoe.dial_calibration`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from megatron.remoe.errors import ConfigError

FORMS = ("cut", "shift")


class DialError(ConfigError):
    """A bad dial (threshold, form, cap) or a dial used in training; the message is one line."""


@dataclass(frozen=True)
class ComputeDial:
    """Thresholds of the MoE layers (one per MoE layer, in layer order), their form and cap."""

    thresholds: tuple
    form: str = "cut"
    max_experts: Optional[int] = None
    layer_numbers: tuple = ()
    """Global 1-based numbers of the MoE layers the thresholds belong to (bound by `make_dial`)."""

    def threshold_of(self, layer_number: int) -> float:
        try:
            return self.thresholds[self.layer_numbers.index(int(layer_number))]
        except ValueError:
            raise DialError(f"the compute dial has no threshold for layer {layer_number} (it "
                            f"covers MoE layers {list(self.layer_numbers)}); rebuild it with "
                            "make_dial for this model") from None

    @property
    def is_identity(self) -> bool:
        return all(t == 0 for t in self.thresholds) and self.max_experts is None

    def to_dict(self) -> dict:
        """The JSON form (HF config.json `router_dial`, dial.json)."""
        return {"thresholds": [float(t) for t in self.thresholds], "form": self.form,
                "max_experts": self.max_experts}


def check_thresholds(values, num_moe_layers: int) -> tuple:
    """Validated thresholds: one number (global, broadcast to every MoE layer) or one per MoE
    layer; each finite and >= 0."""
    if isinstance(values, (int, float)) and not isinstance(values, bool):
        values = [values] * num_moe_layers
    values = list(values)
    if len(values) == 1 and num_moe_layers > 1:
        values = values * num_moe_layers
    if len(values) != num_moe_layers:
        raise DialError(f"{len(values)} thresholds for {num_moe_layers} MoE layers; give one "
                        f"global value or exactly {num_moe_layers}")
    out = []
    for i, v in enumerate(values):
        try:
            f = float(v)
        except (TypeError, ValueError):
            raise DialError(f"threshold {i} = {v!r} is not a number") from None
        if math.isnan(f) or math.isinf(f):
            raise DialError(f"threshold {i} = {f} is not finite; use a value >= 0")
        if f < 0:
            raise DialError(f"threshold {i} = {f:g} is negative; thresholds are >= 0 "
                            "(0 = the trained model)")
        out.append(f)
    return tuple(out)


def make_dial(thresholds, layer_numbers: Sequence[int], form: str = "cut",
              max_experts: Optional[int] = None, num_experts: Optional[int] = None
              ) -> ComputeDial:
    """A validated dial for the MoE layers `layer_numbers` (global, 1-based)."""
    layer_numbers = tuple(int(n) for n in layer_numbers)
    if not layer_numbers:
        raise DialError("the model has no MoE layer: nothing to dial")
    if form not in FORMS:
        raise DialError(f"dial form {form!r} is not one of {', '.join(FORMS)}")
    if max_experts is not None:
        if isinstance(max_experts, bool) or not isinstance(max_experts, int) or \
                max_experts < 1 or (num_experts is not None and max_experts > num_experts):
            raise DialError(f"max_experts={max_experts!r} must be an integer in "
                            f"[1, {num_experts or 'E'}] (or unset)")
    return ComputeDial(check_thresholds(thresholds, len(layer_numbers)), form, max_experts,
                       layer_numbers)


def dial_from_dict(d: dict, layer_numbers: Sequence[int], num_experts: Optional[int] = None
                   ) -> ComputeDial:
    """`ComputeDial.to_dict()` (or a dial.json) -> a dial bound to `layer_numbers`."""
    if not isinstance(d, dict) or "thresholds" not in d:
        raise DialError("a dial needs a 'thresholds' entry (one number or one per MoE layer)")
    return make_dial(d["thresholds"], layer_numbers, d.get("form", "cut"), d.get("max_experts"),
                     num_experts)


def keep_largest(gates: torch.Tensor, m: int) -> torch.Tensor:
    """`gates` [N, E] with all but each row's m largest entries set to 0."""
    if m >= gates.shape[-1]:
        return gates
    top = gates.topk(m, dim=-1).indices
    keep = torch.zeros_like(gates, dtype=torch.bool).scatter_(1, top, True)
    return gates.masked_fill(~keep, 0)


def dialled_gates(logits: torch.Tensor, gates: torch.Tensor, dial: ComputeDial,
                  layer_number: int, training: bool) -> torch.Tensor:
    """The router hook: ReLU gates [N, E] of the trained model -> dialled gates [N, E]."""
    if training:
        raise DialError("the compute dial (moe_relu_dial) is inference-only but the router is "
                        "in training mode; call model.eval() or clear it (set_dial(model, None))")
    tau = dial.threshold_of(layer_number)
    if dial.form == "shift":
        gates = torch.relu(logits - tau)
    elif tau > 0:
        gates = gates.masked_fill(gates <= tau, 0)
    if dial.max_experts is not None:
        gates = keep_largest(gates, dial.max_experts)
    return gates
