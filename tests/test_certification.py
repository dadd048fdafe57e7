"""Adaptive certification (``audit.smoothing.Adaptive``), the paired sanity checks and the robustness findings.

The soundness tests use linear classifiers: for f(x) = [w·x + b > 0] the smoothed classifier's true robust
radius is |w·x + b| / ||w|| in closed form, so every certificate can be checked, and a thousand of them cost
about a second.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from scipy.stats import norm

from audit.attacks import sanity_checks
from audit.smoothing import Adaptive, Smooth, _certify_many, certify_dataset
from fedvision.errors import ConfigError


def _linear_points(count: int, sigma: float, seed: int) -> tuple[nn.Module, torch.Tensor, np.ndarray, np.ndarray]:
    """A 2-class linear model on 1×4×4 inputs, ``count`` points with true radii spread over (0, 2.5σ), their
    true classes and radii."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
    w = (model[1].weight[1] - model[1].weight[0]).detach()
    b = float((model[1].bias[1] - model[1].bias[0]).detach())
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(count, 16, generator=g)
    base = base - ((base @ w + b) / (w @ w))[:, None] * w  # onto the hyperplane
    radii = torch.rand(count, generator=g) * 2.5 * sigma + 0.02 * sigma
    side = torch.where(torch.rand(count, generator=g) < 0.5, -1.0, 1.0)
    points = base + (side * radii)[:, None] * w / w.norm()
    return model.eval(), points.reshape(count, 1, 4, 4), (side > 0).long().numpy(), radii.numpy()


def _failures(results, classes, true_radii) -> int:
    """Certificates that claim a wrong class or a radius beyond the true one."""
    return sum(c != Smooth.ABSTAIN and (c != y or r > t + 1e-9)
               for (c, r, _), y, t in zip(results, classes, true_radii))


class _NoSplit(Adaptive):
    """An unsound variant: every look at the full α (no Bonferroni split), to show the test can see the difference."""

    def alpha_per_look(self, alpha: float) -> float:
        return alpha


def test_adaptive_certificates_fail_at_most_alpha_of_the_time_on_a_linear_classifier():
    sigma, alpha, count = 0.5, 0.1, 1200  # a large α makes the failure rate measurable with 1,200 certificates
    model, points, classes, true_radii = _linear_points(count, sigma, seed=0)
    smooth = Smooth(model, 2, sigma, generator=0)
    rule = Adaptive(max_n=3200, radii=(0.0, 0.25, 0.5, 0.75, 1.0), first_n=50)
    assert rule.looks == [50, 100, 200, 400, 800, 1600, 3200] and rule.alpha_per_look(alpha) == alpha / 7
    results = _certify_many(smooth, points, 20, rule.max_n, alpha, 20_000, rule)
    failures = _failures(results, classes, true_radii)
    # binomial bound: the rate may exceed α only by sampling error (3 standard errors)
    assert failures / count <= alpha + 3 * math.sqrt(alpha * (1 - alpha) / count), failures
    used = np.array([n for *_, n in results])
    assert set(used) <= set(rule.looks) and used.mean() < 0.5 * rule.max_n  # it did stop early, often
    certified = [r for c, r, _ in results if c != Smooth.ABSTAIN]
    assert max(certified) <= rule.max_certifiable_radius(sigma, alpha) + 1e-9

    # Without the split, taking the best of seven looks each at α fails far more often: the test has power.
    unsound = _certify_many(Smooth(model, 2, sigma, generator=0), points, 20, rule.max_n, alpha, 20_000,
                            _NoSplit(max_n=3200, radii=rule.radii, first_n=50))
    assert _failures(unsound, classes, true_radii) > 1.5 * max(failures, alpha * count / 2)


def test_default_rule_is_sound_over_a_thousand_certificates_on_a_linear_classifier():
    # The default schedule and stopping rule (max n = 10,000, 8 looks), α = 0.05 so that failures are frequent
    # enough to count: each certificate fails with probability ≤ α, so the count is stochastically below
    # Binomial(1,200, α); more than its 1 − 10⁻⁶ quantile would be a real excess, not bad luck.
    from scipy.stats import binom

    from audit import DEFAULT_N

    sigma, alpha, count = 0.25, 0.05, 1200
    model, points, classes, true_radii = _linear_points(count, sigma, seed=7)
    rule = Adaptive(max_n=DEFAULT_N)
    results = _certify_many(Smooth(model, 2, sigma, generator=7), points, 100, rule.max_n, alpha, 50_000, rule)
    failures = _failures(results, classes, true_radii)
    assert failures <= binom.isf(1e-6, count, alpha), failures
    certified = [r for c, r, _ in results if c != Smooth.ABSTAIN]
    assert len(certified) > count / 2 and max(certified) <= rule.max_certifiable_radius(sigma, alpha) + 1e-9
    assert np.mean([n for *_, n in results]) < 0.5 * rule.max_n


def test_adaptive_and_fixed_agree_on_the_curve_with_fewer_samples():
    sigma, count = 0.5, 300
    model, points, classes, true_radii = _linear_points(count, sigma, seed=1)
    data = torch.utils.data.TensorDataset(points, torch.as_tensor(classes))
    radii = (0.0, 0.25, 0.5, 0.75)
    runs = {method: certify_dataset(model, data, sigma, n0=50, n=4000, alpha=0.001, batch_size=20_000, radii=radii,
                                    seed=3, progress=False, method=method) for method in ("fixed", "adaptive")}
    fixed, adaptive = ({p["radius"]: p["certified_accuracy"] for p in runs[m]["curve"]} for m in ("fixed", "adaptive"))
    for r in radii:  # same images, only the samples differ: within a few images of each other
        assert abs(fixed[r] - adaptive[r]) <= 0.04, (r, fixed, adaptive)
    assert runs["adaptive"]["samples"]["mean"] < 0.5 * runs["fixed"]["samples"]["mean"]
    assert runs["fixed"]["samples"]["max"] == runs["fixed"]["samples"]["min"] == 4050
    # the true curve is known: neither exceeds it by more than sampling noise over 300 images
    truth = {r: float(np.mean(true_radii >= r)) for r in radii}
    for curve in (fixed, adaptive):
        assert all(curve[r] <= truth[r] + 0.02 for r in radii)


def test_certify_adaptive_on_one_image_matches_the_rule():
    sigma = 0.5
    model, points, classes, true_radii = _linear_points(40, sigma, seed=2)
    smooth = Smooth(model, 2, sigma, generator=5)
    rule = Adaptive(max_n=1000, radii=(0.0, 0.5), first_n=100)
    for x, y, t in zip(points, classes, true_radii):
        cls, radius, n = smooth.certify_adaptive(x, 20, 0.001, 500, rule)
        assert n in rule.looks
        assert cls in (Smooth.ABSTAIN, int(y)) and radius <= t + 1e-9  # α = 0.001: no failure expected in 40
        if cls == Smooth.ABSTAIN:
            assert radius == 0.0
    again = Smooth(model, 2, sigma, generator=5).certify_adaptive(points[0], 20, 0.001, 500, rule)
    assert again == Smooth(model, 2, sigma, generator=5).certify_adaptive(points[0], 20, 0.001, 500, rule)


def test_stopping_rule_cases():
    sigma, alpha = 0.25, 0.001
    rule = Adaptive(max_n=1000, radii=(0.0, 0.25, 0.5, 0.75, 1.0), futility=0.01)
    level = rule.alpha_per_look(alpha)
    ceiling = rule.max_certifiable_radius(sigma, alpha)
    assert rule.looks == [100, 200, 400, 800, 1000]
    assert ceiling == pytest.approx(sigma * norm.ppf(level ** (1 / 1000)))
    assert 0.5 < ceiling < 0.75  # default max n at σ = 0.25: r = 0.5 is certifiable, 0.75 is not

    def p_lower(na, n):
        from audit.intervals import clopper_pearson_lower
        return clopper_pearson_lower(na, n, level)

    assert rule.stop(30, 100, p_lower(30, 100), sigma, alpha)  # cannot reach p_A > ½ by n = 1,000: stop at once
    assert not rule.stop(50, 100, p_lower(50, 100), sigma, alpha)  # a coin flip so far: could still reach r = 0
    assert not rule.stop(200, 200, p_lower(200, 200), sigma, alpha)  # all agree, radius < 0.5 reachable
    assert rule.stop(400, 400, p_lower(400, 400), sigma, alpha)  # past 0.5; 0.75 is out of reach of n = 1,000
    assert rule.stop(700, 1000, p_lower(700, 1000), sigma, alpha)  # the last look
    # A certain image keeps going under a larger maximum: 0.75 is then within reach.
    wide = Adaptive(max_n=10_000, radii=rule.radii, futility=0.01)
    assert not wide.stop(400, 400, p_lower(400, 400), sigma, alpha)
    # tolerance: stop when the reachable radius is within it of the current one
    assert Adaptive(max_n=10_000, radii=rule.radii, tolerance=1.0, futility=0.01).stop(400, 400, p_lower(400, 400),
                                                                                       sigma, alpha)
    for bad in ({"max_n": 0}, {"growth": 1.0}, {"tolerance": -0.1}, {"futility": 1.0}, {"radii": ()},
                {"radii": (-1.0,)}, {"first_n": 0}):
        with pytest.raises(ConfigError):
            Adaptive(**bad)
    assert Adaptive(max_n=50).looks == [50]  # a maximum below the first look: one look, Cohen's CERTIFY
    with pytest.raises(ConfigError):
        certify_dataset(nn.Linear(2, 2), [(torch.zeros(2), 0)], 0.5, method="sequential")


# --------------------------------------------------------------------------------------------------------
# sanity checks: paired, with a stated test
# --------------------------------------------------------------------------------------------------------
def _row(name, eps, robust, steps=10, purpose="evaluation"):
    robust = list(robust)
    return {"name": name, "norm": "Linf", "eps": eps, "steps": steps, "purpose": purpose, "n": len(robust),
            "clean_accuracy": 1.0, "robust_accuracy": sum(robust) / len(robust),
            "robust_per_image": "".join("1" if r else "0" for r in robust)}


def test_one_image_does_not_raise_a_gradient_masking_alarm():
    # The failure seen on an AVX-512 CPU: on 12 images, 10 steps left 9 robust, 5 steps left 8.
    five = [1] * 8 + [0] * 4
    ten = [1] * 8 + [1] + [0] * 3
    rows = [_row("pgd", 0, [1] * 12, steps=1), _row("pgd", 0.1, ten),
            _row("pgd", 0.1, five, steps=5, purpose="sanity check: 5 steps")]
    checks = {c["check"]: c for c in sanity_checks(rows)}
    assert checks["more_steps_not_weaker"]["passed"], checks["more_steps_not_weaker"]
    assert "sign test" in checks["more_steps_not_weaker"]["test"]
    assert "1 images broken only by the first" in checks["more_steps_not_weaker"]["detail"]


def test_a_systematically_weaker_stronger_attack_is_flagged():
    rng = np.random.default_rng(0)
    five = rng.random(200) < 0.3
    ten = five | (rng.random(200) < 0.4)  # more steps leave many more images robust: masking
    rows = [_row("fgsm", 0.1, ten, steps=1), _row("pgd", 0.1, ten),
            _row("pgd", 0.1, five, steps=5, purpose="sanity check: 5 steps"), _row("pgd", 0.2, ten | five)]
    checks = {(c["check"], c["attack"]): c for c in sanity_checks(rows)}
    assert not checks[("more_steps_not_weaker", "pgd")]["passed"]
    assert "gradient masking" in checks[("more_steps_not_weaker", "pgd")]["detail"]
    assert checks[("pgd_not_weaker_than_fgsm", "pgd")]["passed"]  # the same images survive both
    assert checks[("monotone_in_eps", "pgd")]["passed"]
    # a robust accuracy that rises with ε by a handful of images out of 200 is noise, by 30 it is not
    noisy = [_row("fgsm", 0.1, five, steps=1), _row("fgsm", 0.2, five ^ (np.arange(200) < 4))]
    assert all(c["passed"] for c in sanity_checks(noisy) if c["check"] == "monotone_in_eps")
    rising = [_row("fgsm", 0.1, five, steps=1), _row("fgsm", 0.2, five | (np.arange(200) < 60))]
    assert not [c for c in sanity_checks(rising) if c["check"] == "monotone_in_eps"][0]["passed"]


# --------------------------------------------------------------------------------------------------------
# findings
# --------------------------------------------------------------------------------------------------------
def _robustness_section(accuracy_ci, majority, requirements=()):
    return {"assessed": True, "confidence": 0.95, "sanity_checks_passed": True, "sanity_checks": [],
            "worst_case_robust_accuracy": {"L2": [{"eps": 0.5, "robust_accuracy": 0.4, "standard": True}]},
            "certification": {
                "protocol": "adaptive", "sigma": 0.25, "n0": 100, "n": 1000, "alpha": 0.001, "num_samples": 100,
                "certified_accuracy": {"0": 0.7, "0.25": 0.6, "0.5": 0.4, "0.75": 0.0},
                "certified_accuracy_ci": {k: [0.1, 0.9] for k in ("0", "0.25", "0.5", "0.75")},
                "above_max_certifiable_radius": ["0.75"], "max_certifiable_radius": 0.597,
                "samples_per_image": {"mean": 540.0, "max": 1100}, "smoothed_accuracy": 0.7,
                "smoothed_accuracy_ci": accuracy_ci, "majority_class_rate": majority,
                "requirements": list(requirements)}}


def test_robustness_findings_are_informational_unless_required():
    from audit.findings import robustness_findings

    certified, attacks = robustness_findings(_robustness_section([0.6, 0.78], 0.5))
    assert certified["status"] == "informational" and attacks["status"] == "informational"
    assert "n ≤ 1,000" in certified["reason"] and "540 samples per image" in certified["reason"]
    assert "0.75" not in certified["reason"].split("largest")[0]  # a radius beyond the ceiling is not quoted
    # not above the majority class with its interval: flagged, whatever the radii say
    certified, _ = robustness_findings(_robustness_section([0.55, 0.78], 0.6))
    assert certified["status"] == "flag" and "majority-class rate" in certified["reason"]
    met = {"radius": 0.25, "min_certified_accuracy": 0.6, "certified_accuracy": 0.6, "ci": [0.5, 0.7], "met": True,
           "above_max_certifiable_radius": False}
    assert robustness_findings(_robustness_section([0.6, 0.78], 0.5, [met]))[0]["status"] == "pass"
    unmet = dict(met, min_certified_accuracy=0.65, met=False)
    certified, _ = robustness_findings(_robustness_section([0.6, 0.78], 0.5, [met, unmet]))
    assert certified["status"] == "flag" and "not met" in certified["reason"]
    beyond = dict(unmet, radius=0.75, certified_accuracy=0.0, above_max_certifiable_radius=True)
    certified, _ = robustness_findings(_robustness_section([0.6, 0.78], 0.5, [beyond]))
    assert certified["status"] == "insufficient data" and "raise --n" in certified["reason"]
