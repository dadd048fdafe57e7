"""The compliance audit of a trained model.

Robustness: ``audit.smoothing`` (randomized-smoothing certificates, Cohen et al. 2019), ``audit.attacks``
(white-box attacks and their sanity checks), ``audit.robustness`` (both over one dataset, written as JSON and
CSV). Fairness: ``audit.fairness``; privacy: ``audit.privacy``. The report: ``audit.report`` (``report.json``
against its schema in ``audit/schema/``), its findings' rules ``audit.findings`` and ``audit.report_html``
(``report.html``, from the templates in ``audit/templates/``); confidence intervals: ``audit.intervals``.
``audit.cli`` is ``fedvision audit``. See docs/audit.md.

The public names below are loaded on first use, so that ``fedvision --help`` does not import torch; the
protocol defaults live here for the same reason (the CLI's help shows them).
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

# Randomized smoothing. The paper's protocol (Cohen et al., Section 4): fixed-n CERTIFY, and the radii its tables
# report at σ = 0.25 ...
PAPER_N0, PAPER_N, PAPER_ALPHA = 100, 100_000, 0.001
PAPER_RADII = (0.0, 0.25, 0.5, 0.75, 1.0)
# ... and the default: adaptive CERTIFY (audit.smoothing.Adaptive) with the paper's n0 and α: estimation samples
# drawn in stages up to looks 100, 200, 400, …, 6,400, 10,000 (a schedule fixed in advance); every look's
# Clopper–Pearson bound is at α / 8 (Bonferroni over the 8 looks), so each certificate holds with probability
# ≥ 1 − α whenever sampling stops. An image stops at a look when even at p_A's 95% upper bound (futility 0.05)
# the radius 10,000 samples could reach is below the next reported radius, or within 0.01 of the radius certified
# so far. The default curve stops at r = 0.5 (2σ at σ = 0.25): an image whose samples all agree certifies it after
# about 400 samples, while r = 0.75 would cost every such image about 6,700. The maximum n = 10,000 caps the
# certifiable radius at σ·Φ⁻¹((α/8)^(1/n)) ≈ 3.12σ (0.78 at σ = 0.25); larger radii need --radii (and --n above
# the cap). Measurements, and the rules tried and dropped: docs/audit.md ("Why the default curve stops at r = 0.5").
DEFAULT_CERTIFY = "adaptive"
DEFAULT_N0, DEFAULT_N, DEFAULT_ALPHA = 100, 10_000, 0.001
# The adaptive schedule: first look, growth between looks, the level at which "more samples cannot change it" is
# judged (p_A at its 95% upper bound: only where to stop, never what is certified) and the radius change below
# which more samples are not worth drawing.
DEFAULT_FIRST_LOOK, DEFAULT_GROWTH, DEFAULT_FUTILITY, DEFAULT_TOLERANCE = 100, 2.0, 0.05, 0.01
DEFAULT_RADII = (0.0, 0.25, 0.5)
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
