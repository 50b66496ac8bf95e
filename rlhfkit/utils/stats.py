"""Small-sample statistics without scipy: Student's t quantile and the t-interval of a mean."""

from __future__ import annotations

import math
from typing import Sequence


def student_t_cdf(t: float, df: int, intervals: int = 2000) -> float:
    """P(T <= t) for Student's t with `df` degrees of freedom: Simpson's rule on the density over [0, |t|]
    (error < 1e-7 for the |t| < 15 that intervals use)."""
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def density(x: float) -> float:
        return math.exp(log_norm - (df + 1) / 2 * math.log1p(x * x / df))

    b = abs(t)
    h = b / intervals
    area = density(0.0) + density(b) + sum((4 if k % 2 else 2) * density(k * h) for k in range(1, intervals))
    half = area * h / 3
    return 0.5 + half if t >= 0 else 0.5 - half


def student_t_quantile(p: float, df: int) -> float:
    """The t with P(T <= t) = p (0.5 < p < 1), by bisection on student_t_cdf."""
    if not 0.5 < p < 1 or df < 1:
        raise ValueError(f"need 0.5 < p < 1 and df >= 1, got p={p}, df={df}")
    low, high = 0.0, 1.0
    while student_t_cdf(high, df) < p:
        low, high = high, 2 * high
    for _ in range(50):
        mid = (low + high) / 2
        low, high = (mid, high) if student_t_cdf(mid, df) < p else (low, mid)
    return (low + high) / 2


def t_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): the mean ± t(confidence, n-1) · stderr (ddof=1); needs at least two values."""
    n = len(values)
    if n < 2:
        raise ValueError(f"a t-interval needs at least two values, got {n}")
    mean = sum(values) / n
    stderr = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)
    half = student_t_quantile(0.5 + confidence / 2, n - 1) * stderr
    return mean, mean - half, mean + half
