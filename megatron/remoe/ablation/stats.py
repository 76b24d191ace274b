"""Comparisons over seeds: time to a target validation loss, and paired t-tests (no SciPy)."""

from __future__ import annotations

import math
from typing import Optional


def time_to_quality(valid_steps: list, valid_losses: list, target_loss: float,
                    cum_flops: list, tokens_per_step: int, first_step: int = 1
                    ) -> Optional[dict]:
    """When a run's validation curve first reaches `target_loss` (e.g. TopK's final loss).

    The step is interpolated linearly between the two evaluations that bracket the crossing; if
    the first evaluation is already at or below the target, it is that evaluation's step (an
    upper bound: the curve before it is not measured). Tokens = step x tokens per step; FLOPs =
    the run's cumulative training FLOPs up to that step (`cum_flops[i]` = after step
    first_step + i; Stage I/II included for ReLU), interpolated within the step. None if the
    curve never reaches the target."""
    prev = None
    for step, loss in zip(valid_steps, valid_losses):
        if loss <= target_loss:
            if prev is None or prev[1] == loss:
                at = float(step)
            else:
                at = prev[0] + (prev[1] - target_loss) / (prev[1] - loss) * (step - prev[0])
            done = at - first_step + 1  # steps completed (fractional)
            whole = int(math.floor(done))
            before = cum_flops[whole - 1] if whole >= 1 else 0.0
            after = cum_flops[min(whole, len(cum_flops) - 1)]
            flops = before + (done - whole) * (after - before) if whole < len(cum_flops) \
                else cum_flops[-1]
            return {"step": at, "tokens": at * tokens_per_step, "flops": flops,
                    "bound": prev is None}
        prev = (step, loss)
    return None


def student_t_two_sided_p(t: float, df: int) -> float:
    """Two-sided p-value of Student's t with `df` degrees of freedom (regularised incomplete
    beta, I_x(df/2, 1/2) with x = df / (df + t^2); continued fraction, Numerical Recipes 6.4)."""
    if math.isinf(t):
        return 0.0
    x = df / (df + t * t)
    a, b = df / 2.0, 0.5
    if x <= 0.0:
        return 0.0
    if x >= 1.0:  # t = 0
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                     + a * math.log(x) + b * math.log1p(-x))

    def cf(a, b, x):
        tiny = 1e-300
        c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
        d = 1.0 / (d if abs(d) > tiny else tiny)
        h = d
        for m in range(1, 300):
            m2 = 2 * m
            for num in (m * (b - m) * x / ((a + m2 - 1) * (a + m2)),
                        -(a + m) * (a + b + m) * x / ((a + m2) * (a + m2 + 1))):
                d = 1.0 + num * d
                d = 1.0 / (d if abs(d) > tiny else tiny)
                c = 1.0 + num / c
                c = c if abs(c) > tiny else tiny
                h *= d * c
            if abs(d * c - 1.0) < 1e-15:
                break
        return h

    if x < (a + 1.0) / (a + b + 2.0):
        return front * cf(a, b, x) / a
    return 1.0 - front * cf(b, a, 1.0 - x) / b


def paired_comparison(a: dict, b: dict) -> Optional[dict]:
    """Paired test over seeds of two groups' per-seed values ({seed: value}): differences
    d = a - b on the common seeds, their mean and sample std, t = mean / (std / sqrt(n)), the
    two-sided p (df = n - 1), and how many seeds have the sign of the mean. None below 2 seeds."""
    seeds = sorted(set(a) & set(b), key=str)
    d = [a[s] - b[s] for s in seeds if a[s] is not None and b[s] is not None]
    n = len(d)
    if n < 2:
        return None
    mean = sum(d) / n
    std = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1))
    t = mean / (std / math.sqrt(n)) if std > 0 else math.copysign(math.inf, mean) if mean else 0.0
    p = student_t_two_sided_p(t, n - 1) if mean else 1.0
    same_sign = sum(1 for x in d if x * mean > 0)
    return {"n": n, "mean": mean, "std": std, "t": t, "p": p, "same_sign": same_sign}
