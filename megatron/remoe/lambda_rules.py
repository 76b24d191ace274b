"""Update rules for the L1 coefficient lambda: the paper's rule and steadier options for small
batches.

The paper (Sec. 3.3, Eq. 7) updates lambda once per optimizer step by
`lambda *= alpha^sign(target - S)`; at S == target, where sign(0) = 0 would keep lambda, the code
divides (as the reference implementation does).
With its 0.5M-token batches the sign of (target - S) is signal; with ~1k-token batches (CPU,
fine-tuning, few GPUs) it is mostly noise once the sparsity is at target, and lambda random-walks
over orders of magnitude in Stage III. The options below are measured against the paper's rule in
docs/results.md; the paper's rule is the default and is bit for bit the original update:

* `paper`    lambda <- lambda * alpha if S < target else lambda / alpha (fp32 tensor ops).
* `ema`      the paper's rule on an exponential moving average of S (beta = `ema_beta`).
* `deadband` the paper's rule, but lambda is held while |S - target| <= z * sigma, where
             sigma = sqrt(target * (1 - target) / n) is the sampling noise of a sparsity measured
             on the step's n tokens per layer (independent tokens; tokens of one sequence are
             correlated, so the real noise is larger and z > 1).
* `pi`       a proportional-integral update of log lambda on e = target - S:
             log lambda += clip(ki * e + kp * (e - e_prev), -log alpha, +log alpha), i.e. the
             velocity form of log lambda = kp * e + ki * sum(e); never faster than the paper's rule.

Every option follows the paper's rule until the sparsity first reaches the target (Stages I and II:
there the sign is not in doubt), so they differ only in Stage III, and `reached_target` (which ends
the optional Stage I dispatch bound) means the same for all of them.

Each rule is a pure function of (lambda, S, n) and its own small state: given the all-reduced S
and n, which are identical on every rank, every rank computes the same lambda. The state is plain
Python floats, saved and restored with the controller (`state_dict` / `load_state_dict`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from megatron.remoe.errors import ConfigError

# The paper's lambda_0 and alpha (its settings, with 0.5M-token batches); the defaults of
# ReMoETransformerConfig, TrainConfig and SparsityController.
PAPER_L1_COEFF_INIT = 1e-8
PAPER_L1_COEFF_MULTIPLIER = 1.2

# Every rule clamps lambda to this range, so that a long stretch on one side of the target can
# neither underflow it to 0 (the controller could never recover) nor overflow it to inf.
L1_COEFF_MIN = 1e-30
L1_COEFF_MAX = 1e4


@dataclass
class ControllerOptions:
    """Which lambda update rule and its parameters; the one owner of their defaults
    (ReMoETransformerConfig's and TrainConfig's `moe_relu_l1_reg_coeff_*` fields take them)."""

    kind: str = "paper"
    ema_beta: float = 0.9
    deadband_z: float = 2.0
    pi_kp: float = 2.0
    pi_ki: float = 1.0

    def validate(self) -> None:
        if self.kind not in CONTROLLERS:
            raise ConfigError(f"moe_relu_l1_reg_coeff_controller={self.kind!r} is not one of "
                              f"{', '.join(CONTROLLERS)}; paper is the paper's rule")
        if not 0.0 <= self.ema_beta < 1.0:
            raise ConfigError(f"moe_relu_l1_reg_coeff_ema_beta={self.ema_beta} must be in [0, 1)"
                              " (0 = no averaging); e.g. 0.9")
        if not self.deadband_z >= 0.0:
            raise ConfigError(f"moe_relu_l1_reg_coeff_deadband_z={self.deadband_z} must be >= 0 "
                              "(0 = the paper's rule); e.g. 2")
        if not (self.pi_kp >= 0.0 and self.pi_ki > 0.0):
            raise ConfigError(f"moe_relu_l1_reg_coeff_pi_kp={self.pi_kp} / _pi_ki={self.pi_ki}: "
                              "need kp >= 0 and ki > 0 (ki is the integral action); e.g. 2 and 1")


def sparsity_noise(target: float, tokens: float) -> float:
    """Standard deviation of a sparsity measured on `tokens` independent tokens at the target."""
    return math.sqrt(target * (1.0 - target) / max(tokens, 1.0))


class LambdaRule:
    """lambda_{t+1} from lambda_t (fp32 tensor), this step's global sparsity S and tokens per layer.

    `update` is called once per optimizer step, on every rank, with identical arguments."""

    kind = "paper"

    def __init__(self, target: float, multiplier: float, options: ControllerOptions):
        self.target = float(target)
        self.multiplier = float(multiplier)
        self.options = options

    def update(self, l1_coeff: torch.Tensor, sparsity: float, tokens: float,
               reached_target: bool) -> torch.Tensor:
        if not reached_target:  # Stages I/II: the paper's rule for every option
            return self.paper(l1_coeff, sparsity)
        return self.steady(l1_coeff, sparsity, tokens)

    def paper(self, l1_coeff: torch.Tensor, sparsity: float) -> torch.Tensor:
        """lambda * alpha if S < target else lambda / alpha (equality divides), clamped."""
        new = l1_coeff * self.multiplier if sparsity < self.target else l1_coeff / self.multiplier
        return new.clamp(L1_COEFF_MIN, L1_COEFF_MAX)

    def steady(self, l1_coeff: torch.Tensor, sparsity: float, tokens: float) -> torch.Tensor:
        return self.paper(l1_coeff, sparsity)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class EMARule(LambdaRule):
    """The paper's rule on m_t = beta * m_{t-1} + (1 - beta) * S_t, started with the first S after
    the target is reached (an average started in Stage I would lag far below the target)."""

    kind = "ema"

    def __init__(self, *args):
        super().__init__(*args)
        self.mean: Optional[float] = None

    def steady(self, l1_coeff, sparsity, tokens):
        beta = self.options.ema_beta
        self.mean = sparsity if self.mean is None else beta * self.mean + (1.0 - beta) * sparsity
        return self.paper(l1_coeff, self.mean)

    def state_dict(self) -> dict:
        return {"mean": self.mean}

    def load_state_dict(self, state: dict) -> None:
        self.mean = state.get("mean")


class DeadbandRule(LambdaRule):
    """Hold lambda while S is within z sampling-noise standard deviations of the target."""

    kind = "deadband"

    def steady(self, l1_coeff, sparsity, tokens):
        if tokens is None:
            raise ValueError("the deadband rule needs the step's tokens per layer")
        band = self.options.deadband_z * sparsity_noise(self.target, tokens)
        if abs(sparsity - self.target) <= band:
            return l1_coeff.clone()
        return self.paper(l1_coeff, sparsity)


class PIRule(LambdaRule):
    """Velocity-form PI on log lambda; the step is clipped to the paper's +-log(alpha)."""

    kind = "pi"

    def __init__(self, *args):
        super().__init__(*args)
        self.prev_error: Optional[float] = None

    def steady(self, l1_coeff, sparsity, tokens):
        error = self.target - sparsity
        prev = error if self.prev_error is None else self.prev_error
        self.prev_error = error
        bound = math.log(self.multiplier)
        step = self.options.pi_ki * error + self.options.pi_kp * (error - prev)
        step = min(max(step, -bound), bound)
        # float64 on the host, one rounding to fp32: the same bits on every rank
        new = torch.tensor(float(l1_coeff) * math.exp(step), dtype=torch.float32,
                           device=l1_coeff.device)
        return new.clamp(L1_COEFF_MIN, L1_COEFF_MAX)

    def state_dict(self) -> dict:
        return {"prev_error": self.prev_error}

    def load_state_dict(self, state: dict) -> None:
        self.prev_error = state.get("prev_error")


RULES = {rule.kind: rule for rule in (LambdaRule, EMARule, DeadbandRule, PIRule)}
CONTROLLERS = tuple(RULES)  # the rule names: paper, ema, deadband, pi


def build_rule(target: float, multiplier: float,
               options: Optional[ControllerOptions] = None) -> LambdaRule:
    options = options or ControllerOptions()
    options.validate()
    return RULES[options.kind](target, multiplier, options)
