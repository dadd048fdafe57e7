"""Is the DP noise the sites claim really there, and independent? A check from what the coordinator saw.

Each site's ledger says how much Gaussian noise each of its updates carries: DP-SGD adds N(0, (σ·C/B)²·I_P) to
the mean clipped gradient at each of T steps (B = N·q, Opacus's expected batch size), and SGD with momentum β
carries noise drawn at step s into the update with weight lr·(1 − β^(T−s+1))/(1 − β). So one site's update holds
noise of energy v = lr²·(σC/B)²·P·Σₖ((1 − β^k)/(1 − β))², k = 1…T, in its P trainable parameters.

Two sites' updates of one round with independent noise differ by at least that noise: ‖Δa − Δb‖² ≥ (va + vb)·χ²_P/P
in distribution (the data-dependent parts only add to it, by Anderson's inequality, taking them as independent of
the noise). A shared or reproducible noise (a seed everyone knows, the same stream at every site) cancels in the
difference and leaves only the signal: far below. The test: flag the run when, for some pair and round,

    ‖Δa − Δb‖² / (va + vb)  <  χ²_P⁻¹(α/m) / P,

m the number of pairs tested (Bonferroni), so a run whose noise is what the ledgers say is flagged with
probability at most α. run.json keeps what this needs: each round's pairwise distances of the accepted updates
(``rounds[].updates``), each site's σ, q, steps and N (``rounds[].sites``), lr, momentum and C (``config``), and
P (``trainable_parameters``).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

from fedvision.errors import ConfigError

DEFAULT_ALPHA = 0.01


def noise_energy(*, noise_multiplier: float, max_grad_norm: float, sample_rate: float, num_examples: int,
                 steps: int, lr: float, momentum: float, parameters: int) -> float:
    """Expected squared norm of the DP noise one site's update carries (see the module docstring)."""
    expected_batch = max(int(num_examples * sample_rate), 1)  # Opacus divides the noisy sum by this
    step_std = noise_multiplier * max_grad_norm / expected_batch
    if momentum:
        weights = sum(((1 - momentum ** k) / (1 - momentum)) ** 2 for k in range(1, steps + 1))
    else:
        weights = float(steps)
    return lr ** 2 * step_std ** 2 * parameters * weights


def noise_independence(record: Mapping[str, Any], alpha: float = DEFAULT_ALPHA) -> dict[str, Any]:
    """The test above on a run record (``run.json``); ``assessed`` False (with ``reason``) where it cannot run."""
    from scipy.stats import chi2

    if not 0 < alpha < 1:
        raise ConfigError(f"alpha: must be in (0, 1), got {alpha!r}")
    config = record.get("config", {})
    parameters = record.get("trainable_parameters")
    skip = None
    if not config.get("dp", True):
        skip = "the run trained without DP: there is no noise to check"
    elif not parameters:
        skip = "run.json has no trainable_parameters (recorded since fedvision 0.1 with this check)"
    elif config.get("strategy") == "fedprox":
        skip = "FedProx's proximal step shrinks the noise; the check models plain SGD with momentum"
    if skip:
        return {"assessed": False, "reason": skip}
    tests = []
    for r in record.get("rounds", []):
        sites = r.get("sites", {})
        for pair, geometry in (r.get("updates") or {}).get("pairs", {}).items():
            a, b = pair.split("|")
            try:
                va, vb = (_energy(sites[s], config, parameters) for s in (a, b))
            except (KeyError, TypeError, ValueError):
                continue  # a site that did not report its noise parameters: nothing to compare against
            tests.append({"round": r["round"], "pair": [a, b], "distance": geometry["distance"],
                          "statistic": geometry["distance"] ** 2 / (va + vb), "expected_noise_distance":
                          math.sqrt(va + vb)})
    if not tests:
        return {"assessed": False, "reason": "no round with two or more accepted updates and their noise parameters"}
    threshold = float(chi2.ppf(alpha / len(tests), parameters) / parameters)
    flagged = [t for t in tests if t["statistic"] < threshold]
    lowest = min(tests, key=lambda t: t["statistic"])
    return {
        "assessed": True, "passed": not flagged, "alpha": alpha, "tests": len(tests), "threshold": threshold,
        "min_statistic": lowest["statistic"], "min_pair": lowest["pair"], "min_round": lowest["round"],
        "flagged": flagged, "parameters": int(parameters),
        "method": (f"one-sided test per round and pair of accepted updates: ‖Δa − Δb‖² / (va + vb) against "
                   f"χ²_P⁻¹(α/m)/P = {threshold:.4f} (P = {parameters}, m = {len(tests)}, α = {alpha:g}, Bonferroni), "
                   "where v is the noise energy the site's ledger parameters imply (σ, C, q, N, steps, lr, momentum); "
                   "assumes the data-dependent part of an update is independent of its noise"),
    }


def _energy(site: Mapping[str, Any], config: Mapping[str, Any], parameters: int) -> float:
    return noise_energy(noise_multiplier=float(site["noise-multiplier"]), max_grad_norm=float(config["max-grad-norm"]),
                        sample_rate=float(site["sample-rate"]), num_examples=int(site["num-examples"]),
                        steps=int(site["steps"]), lr=float(config["lr"]), momentum=float(config.get("momentum", 0)),
                        parameters=int(parameters))
