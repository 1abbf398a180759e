"""The eval's statistics against naive references."""

from __future__ import annotations

import math

import pytest

from sipstream.eval.stats import Z95, perplexity, rate_with_ci, wilson_interval


def naive_wilson(successes: float, n: int, steps: int = 200_000) -> tuple[float, float]:
    """The Wilson interval by its definition: every p whose score test |p̂ - p| / sqrt(p(1-p)/n)
    does not reject at the 95% level, found on a fine grid (no closed form involved)."""
    p_hat = successes / n
    accepted = [i / steps for i in range(1, steps)
                if abs(p_hat - i / steps) <= Z95 * math.sqrt((i / steps) * (1 - i / steps) / n)]
    return (accepted[0] if p_hat > 0 else 0.0), (accepted[-1] if p_hat < 1 else 1.0)


@pytest.mark.parametrize(("successes", "n"), [(0, 10), (10, 10), (12, 24), (3.5, 8), (7, 20), (97, 100), (1, 1)])
def test_wilson_matches_inverting_the_score_test(successes: float, n: int) -> None:
    low, high = wilson_interval(successes, n)
    ref_low, ref_high = naive_wilson(successes, n)
    assert low == pytest.approx(ref_low, abs=2e-5)
    assert high == pytest.approx(ref_high, abs=2e-5)
    assert 0.0 <= low <= successes / n <= high <= 1.0


def test_wilson_known_value_and_edges() -> None:
    # Textbook value: 0 successes of 10 -> upper bound z²/(n + z²) = 0.2775.
    assert wilson_interval(0, 10)[1] == pytest.approx(Z95**2 / (10 + Z95**2))
    assert wilson_interval(0, 0) == (0.0, 1.0)
    rate, (low, high) = rate_with_ci(12, 24)
    assert rate == 0.5 and low == pytest.approx(1 - high)  # symmetric around 0.5


def test_perplexity_is_exp_of_mean_nll() -> None:
    token_logprobs = [-1.0, -2.5, -0.25, -4.0]
    naive = math.exp(sum(-lp for lp in token_logprobs) / len(token_logprobs))
    assert perplexity(sum(token_logprobs), len(token_logprobs)) == pytest.approx(naive)
    with pytest.raises(ValueError):
        perplexity(-1.0, 0)
