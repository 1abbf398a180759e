"""Small statistics for the eval tables: rates with confidence intervals, perplexity.

Pure functions on numbers, so each one is checked against a naive reference in the tests.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

#: Two-sided 95% normal quantile.
Z95 = 1.959963984540054


def wilson_interval(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion ``successes / n``.

    Chosen over the normal ("Wald") interval because it stays inside [0, 1] and keeps its coverage
    near 0 and 1 and at the small n an eval on CPU affords. ``successes`` may be fractional (a tie
    counts half a win); with n = 0 nothing is known, so the interval is [0, 1]."""
    if n <= 0:
        return 0.0, 1.0
    p = min(max(successes / n, 0.0), 1.0)
    z2 = z * z
    denominator = 1.0 + z2 / n
    centre = (p + z2 / (2 * n)) / denominator
    half = z / denominator * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    # At p = 0 (p = 1) the bound is exactly 0 (1); rounding would leave it a hair inside.
    low = 0.0 if p == 0.0 else max(0.0, centre - half)
    high = 1.0 if p == 1.0 else min(1.0, centre + half)
    return low, high


def rate_with_ci(successes: float, n: int) -> tuple[float, tuple[float, float]]:
    """(successes / n, its 95% Wilson interval); the rate of nothing is 0."""
    return (successes / n if n else 0.0), wilson_interval(successes, n)


def perplexity(total_logprob: float, tokens: int) -> float:
    """exp of the mean negative log-likelihood per token (natural log)."""
    if tokens <= 0:
        raise ValueError("perplexity needs at least one token")
    return math.exp(-total_logprob / tokens)


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0
