"""The compliance audit of a trained model.

Robustness: ``audit.smoothing`` (randomized-smoothing certificates, Cohen et al. 2019), ``audit.attacks``
(white-box attacks and their sanity checks), ``audit.robustness`` (both over one dataset, written as JSON and
CSV). Fairness: ``audit.fairness``; privacy: ``audit.privacy``. The report: ``audit.report`` (``report.json``
against its schema in ``audit/schema/``) and ``audit.report_html`` (``report.html``). ``audit.cli`` is
``fedvision audit``. See docs/audit.md.

The public names below are loaded on first use, so that ``fedvision --help`` does not import torch; the
protocol defaults live here for the same reason (the CLI's help shows them).
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

# Randomized smoothing. The paper's protocol (Cohen et al., Section 4): fixed-n CERTIFY ...
PAPER_N0, PAPER_N, PAPER_ALPHA = 100, 100_000, 0.001
# ... and the default: adaptive CERTIFY (audit.smoothing.Adaptive) with the paper's n0 and α, estimation samples
# drawn at looks 100, 200, 400, 800, 1,000 (α split over the 5 looks) and stopped once more samples could not
# change the certified-accuracy curve. At most n = 1,000 keeps the demo's audit of 100 32×32 images near a
# minute on 2 CPU cores (about 550 samples per image there, benchmarks/certify_adaptive.py) and caps the
# certifiable radius at σ·Φ⁻¹((α/5)^(1/n)) ≈ 2.39σ (old fixed default n = 150: 1.70σ; paper's n: 3.81σ). A larger
# --n reaches larger radii; the samples go only to the images that can use them.
DEFAULT_CERTIFY = "adaptive"
DEFAULT_N0, DEFAULT_N, DEFAULT_ALPHA = 100, 1000, 0.001
# The adaptive schedule: first look, growth between looks, the level at which "more samples cannot change it" is
# judged (p_A at its 99% upper bound) and the radius change below which more samples are not worth drawing.
DEFAULT_FIRST_LOOK, DEFAULT_GROWTH, DEFAULT_FUTILITY, DEFAULT_TOLERANCE = 100, 2.0, 0.01, 0.01
DEFAULT_RADII = (0.0, 0.25, 0.5, 0.75, 1.0)
DEFAULT_SIGMA = 0.25

# Attacks: name → norm of its threat model; the minimum-norm ones are scored at each ε after one run.
ATTACK_NORMS = {"fgsm": "Linf", "pgd": "Linf", "pgd-l2": "L2", "cw": "L2", "deepfool": "L2",
                "autoattack": "Linf", "autoattack-l2": "L2"}
MINIMUM_NORM_ATTACKS = frozenset({"cw", "deepfool"})
# Cheap enough for the 90-second CPU goal; add "cw" and "autoattack" (or use all) for a full evaluation.
DEFAULT_ATTACKS = ("fgsm", "pgd", "pgd-l2", "deepfool")
# ε = 0 (the clean-accuracy check), a small ε and the standard points (RobustBench: L∞ 8/255, L2 0.5).
DEFAULT_EPS = {"Linf": (0.0, 2 / 255, 8 / 255), "L2": (0.0, 0.25, 0.5)}

# The report: below this many audited samples (images) an accuracy or certified-accuracy estimate is too loose to
# judge, and its finding is "insufficient data" (the same floor as the fairness audit's default min_group_size).
MIN_SAMPLES = 30

_LAZY = {
    "Smooth": "audit.smoothing", "Adaptive": "audit.smoothing", "certify_dataset": "audit.smoothing",
    "max_certifiable_radius": "audit.smoothing",
    "run_attack_suite": "audit.attacks", "sanity_checks": "audit.attacks", "parse_eps": "audit.attacks",
    "RobustnessOptions": "audit.robustness", "run_robustness_audit": "audit.robustness",
    "write_robustness_outputs": "audit.robustness",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'audit' has no attribute {name!r}")
