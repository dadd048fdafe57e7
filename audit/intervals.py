"""Confidence intervals and bounds on proportions: the one home of the audit's interval maths.

* ``wilson_interval``: the Wilson score interval (accuracy, recall, certified and robust accuracy in the report);
* ``clopper_pearson_upper`` / ``clopper_pearson_lower``: one-sided exact (Clopper–Pearson) bounds (the
  membership-inference test's error rates; p_A of randomized smoothing and its stopping rule);
* ``percentile_interval``: the percentile bootstrap interval of a statistic's replicates (the fairness tables).
"""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import Any

import numpy as np


def wilson_interval(successes: float, n: int, confidence: float) -> list[float] | None:
    """Wilson score interval of a binomial proportion ``successes / n`` at two-sided level ``confidence``
    (None when n = 0).

    Chosen over the normal approximation because it stays inside [0, 1] and keeps its coverage near 0 and 1,
    where small audited splits and good models put many of the proportions reported here."""
    if n <= 0:
        return None
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    # The interval contains p; the clamps only undo rounding at p = 0 and p = 1.
    return [min(p, max(0.0, centre - half)), max(p, min(1.0, centre + half))]


def clopper_pearson_upper(successes: Any, trials: Any, confidence: float) -> np.ndarray:
    """One-sided Clopper–Pearson (exact binomial) upper bound on a proportion from ``successes`` in ``trials``
    (numbers or arrays, elementwise): P(p ≤ bound) ≥ ``confidence``; 1 when every trial succeeded."""
    from scipy.stats import beta

    k = np.asarray(successes, dtype=float)
    n = np.asarray(trials, dtype=float)
    with np.errstate(invalid="ignore"):
        bound = beta.ppf(confidence, k + 1, n - k)
    return np.where(k >= n, 1.0, bound)


def clopper_pearson_lower(successes: Any, trials: Any, alpha: float):
    """One-sided Clopper–Pearson (exact binomial) lower bound on a proportion from ``successes`` in ``trials``
    (numbers or arrays, elementwise), at level 1 − ``alpha``: P(p ≥ bound) ≥ 1 − α; 0 when nothing succeeded.
    It is the lower end of the two-sided level-2α interval (statsmodels'
    ``proportion_confint(successes, trials, 2α, method="beta")[0]``). A float for scalar input."""
    from scipy.stats import beta

    k = np.asarray(successes, dtype=float)
    bound = np.where(k > 0, beta.ppf(alpha, np.maximum(k, 1), trials - k + 1), 0.0)
    return float(bound) if bound.ndim == 0 else bound


def percentile_interval(replicates: np.ndarray, confidence: float) -> list[float] | None:
    """Percentile bootstrap interval at two-sided level ``confidence``: the (1 − c)/2 and (1 + c)/2 quantiles of
    a statistic's bootstrap ``replicates``, leaving out those where it is undefined (NaN or infinite); None when
    none is defined."""
    defined = replicates[np.isfinite(replicates)]
    if not defined.size:
        return None
    tail = (1.0 - confidence) / 2.0
    return [float(np.quantile(defined, tail)), float(np.quantile(defined, 1.0 - tail))]
