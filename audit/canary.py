"""One-run canary audit: Steinke, Nasr & Jagielski, "Privacy Auditing with One (1) Training Run" (NeurIPS 2023).

The protocol, as in the paper:

1. ``make_canaries``: m canaries (uniform-noise images with uniformly random labels), and for each one a secret
   fair coin drawn from the OS's CSPRNG (``secrets``, never a config seed). Canaries whose coin says "in" are
   added to one site's training data (simulation only; ``fedvision.data.canaries``, used by ``fedvision.site.site_data``); the others are not used.
2. ``score``: after the run, the auditor scores every canary on the released model (score = −cross-entropy
   loss on the canary's label, calibrated per label: a canary the model was trained on tends to have a lower loss).
3. ``guesses``: guess "in" for the k₊ highest scores, "out" for the k₋ lowest, abstain on the rest; the number
   of guesses r = k₊ + k₋ is fixed before the coins are looked at.
4. ``epsilon_lower_bound``: if the training run is (ε, δ)-DP with respect to each canary, the number W of
   correct guesses satisfies (the paper's Theorem 5.2, with δ; Theorem 3.1 when δ = 0), for every v,

       P[W ≥ v] ≤ f(v) + 2·m·δ · max_{i = 1..m} (f(v − i) − f(v)) / i,   f(v) = P[Binomial(r, e^ε/(1 + e^ε)) ≥ v].

   The right-hand side is a p-value for "the run is (ε, δ)-DP"; ε_lb is the largest ε this test rejects at
   confidence 1 − β.

Where this module is more conservative than the paper's own code (which bisects on ε), it says so:

* the p-value is made non-increasing in v (the largest bound over v' ≥ v), so each test's rejection region is
  {W ≥ v*} and the theorem's tail bound applies to it exactly;
* ε is scanned upward on a grid of step ``EPSILON_STEP`` and ε_lb is the last grid point before the first one
  not rejected (so a non-monotone p-value in ε cannot inflate it; the result is rounded down to the grid);
* k₊, k₋ are chosen on a fixed grid (``K_GRID``) and every choice pays a Bonferroni share: each is tested at
  β / |grid|, so the reported maximum holds at confidence 1 − β overall.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from audit.findings import contradicts_claim
from fedvision.data.canaries import CANARY_FILE, CANARY_SITE, load_canaries
from fedvision.errors import ConfigError, DataError

EPSILON_STEP = 0.01
EPSILON_MAX = 50.0
# (k₊, k₋) as fractions of m, fixed in advance. "In" guesses come first: a trained-on canary's low loss is the
# strong signal; "out" guesses (highest losses) are weaker, since an unlearned "in" canary also has a high loss.
K_GRID: tuple[tuple[float, float], ...] = ((0.02, 0.0), (0.05, 0.0), (0.1, 0.0), (0.2, 0.0),
                                           (0.05, 0.05), (0.1, 0.1), (0.2, 0.2), (0.5, 0.5))


# ---------------------------------------------------------------------------------------------------------
# Scores and guesses
# ---------------------------------------------------------------------------------------------------------
SCORE = "−cross-entropy on the canary's label, minus the median of that over the canaries with the same label"


def score(model: torch.nn.Module, canaries: dict[str, torch.Tensor], batch_size: int = 256,
          device: str | None = None) -> np.ndarray:
    """Higher = more likely trained on: −cross-entropy of ``model`` on each canary's own label, calibrated per
    label (minus the median over all canaries with that label). Noise images all look alike to the model, so the
    raw loss mostly says which label the model prefers for noise; the per-label median removes that. It uses the
    model and the canaries only, never the coins, so the guesses stay a function of the released model."""
    from audit.privacy import per_sample_loss
    from fedvision.data.dataset import ImageDataset

    raw = -per_sample_loss(model, ImageDataset(canaries["images"], canaries["labels"]), batch_size, device)
    labels = canaries["labels"].numpy()
    calibrated = raw.copy()
    for label in np.unique(labels):
        calibrated[labels == label] -= np.median(raw[labels == label])
    return calibrated


def guesses(scores: Any, k_in: int, k_out: int) -> np.ndarray:
    """+1 ("in") for the ``k_in`` highest scores, −1 ("out") for the ``k_out`` lowest, 0 (abstain) elsewhere.
    Ties are broken by position, independently of the coins."""
    scores = np.asarray(scores, dtype=float)
    if not (0 <= k_in and 0 <= k_out and k_in + k_out <= len(scores)):
        raise ConfigError(f"guesses: need 0 ≤ k_in, k_out and k_in + k_out ≤ m = {len(scores)}, "
                          f"got {k_in}, {k_out}")
    order = np.argsort(-scores, kind="stable")
    out = np.zeros(len(scores), dtype=int)
    out[order[:k_in]] = 1
    if k_out:
        out[order[len(scores) - k_out:]] = -1
    return out


# ---------------------------------------------------------------------------------------------------------
# The bound
# ---------------------------------------------------------------------------------------------------------
def p_value(epsilon: float, correct: int, guesses: int, m: int, delta: float) -> float:
    """The paper's bound on P[W ≥ v] for an (ε, δ)-DP run, at v = ``correct`` out of r = ``guesses``, capped at 1
    and made non-increasing in v (the largest value over v' ≥ v; see the module docstring)."""
    from scipy.stats import binom

    r, v = guesses, np.arange(correct, guesses + 1)
    q = 1.0 / (1.0 + math.exp(-epsilon))  # accuracy of ε-DP randomized response
    p = binom.sf(v - 1, r, q)  # f(v') = P[B ≥ v'] for v' = correct..r
    if delta > 0 and r > 0:
        below = np.r_[0.0, np.cumsum(binom.pmf(np.arange(r + 1), r, q))]  # below[j] = P[B < j]
        i = np.arange(1, r + 1)
        # (f(v' − i) − f(v'))/i = P[v' − i ≤ B < v']/i; for i ≥ v' the numerator stops growing, so i ≤ r suffices.
        ratio = (below[v][:, None] - below[np.maximum(v[:, None] - i[None, :], 0)]) / i[None, :]
        p = p + 2 * m * delta * ratio.max(axis=1)
    return float(np.max(np.minimum(p, 1.0)))


def epsilon_lower_bound(correct: int, guesses: int, m: int, delta: float, confidence: float = 0.95) -> float:
    """The largest ε (on a grid of ``EPSILON_STEP``) such that every grid ε' ≤ ε is rejected: an (ε', δ)-DP run
    gives ``correct`` or more right guesses out of ``guesses`` with probability < 1 − ``confidence``.
    0 when nothing is rejected (ε = 0 is always possible)."""
    for name, value in (("correct", correct), ("guesses", guesses), ("m", m)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ConfigError(f"{name}: must be an integer, got {value!r}")
    if not 0 <= correct <= guesses <= m:
        raise ConfigError(f"need 0 ≤ correct ≤ guesses ≤ m, got {correct}, {guesses}, {m}")
    if not 0 <= delta < 1:
        raise ConfigError(f"delta: must be in [0, 1), got {delta!r}")
    if not 0 < confidence < 1:
        raise ConfigError(f"confidence: must be in (0, 1), got {confidence!r}")
    beta = 1.0 - confidence
    bound = 0.0
    for step in range(0, int(round(EPSILON_MAX / EPSILON_STEP)) + 1):
        epsilon = round(step * EPSILON_STEP, 6)
        if not p_value(epsilon, int(correct), int(guesses), int(m), delta) < beta:
            break
        bound = epsilon
    return bound


# ---------------------------------------------------------------------------------------------------------
# The audit
# ---------------------------------------------------------------------------------------------------------
def canary_audit(scores: Any, coins: Any, *, delta: float, claimed_epsilon: float | None = None,
                 confidence: float = 0.95, score_name: str = SCORE,
                 k_grid: Sequence[tuple[float, float]] = K_GRID) -> dict[str, Any]:
    """The audit on given scores (higher = more likely "in") and the secret coins (True = "in").

    Every (k₊, k₋) of ``k_grid`` (fractions of m, fixed in advance) is tested at confidence
    1 − (1 − ``confidence``)/|grid| (Bonferroni); the largest bound is reported, valid at ``confidence``."""
    scores = np.asarray(scores, dtype=float).ravel()
    coins = np.asarray(coins, dtype=bool).ravel()
    m = len(scores)
    if m < 1 or len(coins) != m:
        raise DataError(f"canary audit: need one score per coin, got {m} scores and {len(coins)} coins")
    if not np.all(np.isfinite(scores)):
        raise DataError("canary audit: scores must be finite (a loss overflowed?)")
    truth = np.where(coins, 1, -1)
    per_test = 1.0 - (1.0 - confidence) / len(k_grid)
    tried = []
    for k_in_fraction, k_out_fraction in k_grid:
        k_in, k_out = int(round(k_in_fraction * m)), int(round(k_out_fraction * m))
        if k_in + k_out == 0 or k_in + k_out > m:
            tried.append({"k_in": k_in, "k_out": k_out, "guesses": 0, "correct": 0, "epsilon_lower_bound": 0.0})
            continue
        guess = guesses(scores, k_in, k_out)
        made = int(np.count_nonzero(guess))
        correct = int(np.sum(guess == truth))
        tried.append({"k_in": k_in, "k_out": k_out, "guesses": made, "correct": correct,
                      "epsilon_lower_bound": epsilon_lower_bound(correct, made, m, delta, per_test)})
    best = max(tried, key=lambda t: (t["epsilon_lower_bound"], -t["guesses"]))
    bound = best["epsilon_lower_bound"]
    red_flag = contradicts_claim(bound, claimed_epsilon)
    if claimed_epsilon is None:
        reason = f"no ε claimed (trained without DP): the canaries show leakage of at least ε = {bound:.2f}"
    elif red_flag:
        reason = (f"canary ε lower bound {bound:.2f} exceeds the claimed ε = {claimed_epsilon:.2f}: the accounting "
                  "understates the leakage or DP-SGD was not applied as accounted")
    else:
        reason = (f"canary ε lower bound {bound:.2f} ≤ claimed ε = {claimed_epsilon:.2f}: consistent with the claim "
                  "(an audit that finds nothing cannot confirm it)")
    return {
        "method": (f"one-run canary audit (Steinke, Nasr & Jagielski 2023, Thm 5.2 with δ): {m} canaries, each in "
                   f"by a secret fair coin; score = {score_name}; best of {len(k_grid)} (k₊, k₋) fixed in advance, "
                   f"each at β/{len(k_grid)} (Bonferroni); ε grid {EPSILON_STEP:g}, rounded down"),
        "m": m,
        "canaries_in": int(coins.sum()),
        "k_in": best["k_in"],
        "k_out": best["k_out"],
        "guesses": best["guesses"],
        "correct": best["correct"],
        "score": score_name,
        "confidence": confidence,
        "delta": delta,
        "epsilon_lower_bound": bound,
        "claimed_epsilon": claimed_epsilon,
        "red_flag": bool(red_flag),
        "reason": reason,
        "tried": tried,
    }


def run_canary_audit(model: torch.nn.Module, run_dir: str | Path, *, claimed_epsilon: float | None,
                     delta: float, confidence: float = 0.95) -> dict[str, Any]:
    """Score the run's canaries (``RUN_DIR/canaries.pt``) on ``model`` and audit them against the claim of the
    site that trained on them (``CANARY_SITE``)."""
    canaries = load_canaries(Path(run_dir) / CANARY_FILE)
    result = canary_audit(score(model, canaries), canaries["coins"].numpy(), delta=delta,
                          claimed_epsilon=claimed_epsilon, confidence=confidence)
    result["site"] = CANARY_SITE
    return result
