"""The robustness part of the audit: certification, attacks and sanity checks over one dataset, as one dict.

``run_robustness_audit(model, dataset, options)`` is what ``fedvision audit --checks robustness`` runs and what
a report can call directly; ``write_robustness_outputs`` writes ``robustness.json``, ``certification.csv``
and ``attacks.csv`` atomically.
"""

from __future__ import annotations

import csv
import io
import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn

from audit import (DEFAULT_ALPHA, DEFAULT_ATTACKS, DEFAULT_CERTIFY, DEFAULT_N, DEFAULT_N0, DEFAULT_RADII, DEFAULT_SIGMA,
                   DEFAULT_TOLERANCE, PAPER_ALPHA, PAPER_N, PAPER_N0)
from audit.attacks import SANITY_LEVEL, resolve_eps, run_attack_suite, sanity_checks, worst_case_per_image
from audit.smoothing import METHODS, Smooth, _check_positive, certify_dataset, infer_num_classes, select_indices
from fedvision.errors import ConfigError
from fedvision.io import atomic_write_json, atomic_write_text

RESULT_FORMAT = "fedvision-robustness/1"
# The RobustBench points, marked in the summary.
STANDARD_EPS = {"Linf": 8 / 255, "L2": 0.5}


@dataclass
class RobustnessOptions:
    """Everything the robustness audit can be told; the defaults keep the demo's audit of 100 images near a minute
    on 2 CPU cores (benchmarks/audit_time.py)."""

    sigma: float = DEFAULT_SIGMA  # noise level of the smoothed classifier (use the σ the model was trained with)
    certify: str = DEFAULT_CERTIFY  # "adaptive" (staged sampling up to n) or "fixed" (Cohen's CERTIFY with n)
    n0: int = DEFAULT_N0  # CERTIFY selection samples
    n: int = DEFAULT_N  # estimation samples: the maximum (adaptive) or exactly n (fixed; paper: 100,000)
    alpha: float = DEFAULT_ALPHA  # failure probability of each certificate (over all looks, adaptive)
    tolerance: float = DEFAULT_TOLERANCE  # adaptive: stop when the radius could not grow by more than this
    batch_size: int = 1000  # noisy copies per forward pass
    radii: Sequence[float] = DEFAULT_RADII
    attacks: Sequence[str] = DEFAULT_ATTACKS
    eps: Sequence[float] | Mapping[str, Sequence[float]] | None = None  # None: attacks.DEFAULT_EPS
    steps: int = 10  # PGD steps (step size 2.5·ε/steps)
    restarts: int = 1
    steps_check: bool = True  # extra PGD run with twice the steps, for the sanity check
    attack_batch_size: int = 128
    smooth_n: int = 100  # PREDICT samples for the smoothed classifier under attack
    smooth_alpha: float = 0.001
    smooth_limit: int | None = 10  # images on which the smoothed classifier is attacked (None: all)
    limit: int | None = 500  # images audited, evenly spaced (None: all); the paper certifies 500
    seed: int = 0
    progress: bool = True
    # Requirements the auditor states, radius → certified accuracy at least (e.g. {0.25: 0.6}); without any,
    # the certified-robustness finding is informational.
    require_certified: Mapping[float, float] | None = None

    def __post_init__(self) -> None:
        _check_positive(self.sigma, "sigma")
        if self.certify not in METHODS:
            raise ConfigError(f"certify must be one of {', '.join(METHODS)}, got {self.certify!r}")
        if isinstance(self.tolerance, bool) or not isinstance(self.tolerance, (int, float)) \
                or not math.isfinite(self.tolerance) or self.tolerance < 0:
            raise ConfigError(f"tolerance must be a number ≥ 0, got {self.tolerance!r}")
        for name in ("n0", "n", "batch_size", "steps", "restarts", "attack_batch_size", "smooth_n"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be an integer ≥ 1, got {value!r}")
        for name in ("alpha", "smooth_alpha"):
            value = getattr(self, name)
            _check_positive(value, name)
            if value >= 1:
                raise ConfigError(f"{name} must be in (0, 1), got {value!r}")
        for name in ("limit", "smooth_limit"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"{name} must be a positive integer or None, got {value!r}")
        self.attacks = tuple(self.attacks)
        self.require_certified = _check_requirements(self.require_certified)
        # every required radius is a point of the curve
        self.radii = tuple(self.radii) + tuple(r for r in self.require_certified or () if r not in self.radii)
        if not self.radii or any(isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r)
                                 or r < 0 for r in self.radii):
            raise ConfigError(f"radii must be numbers ≥ 0, got {list(self.radii)!r}")
        resolve_eps(self.eps, self.attacks)  # validates names and ε values now, before any work

    @classmethod
    def paper_protocol(cls, **overrides: Any) -> "RobustnessOptions":
        """Cohen et al.'s certification protocol: fixed-n CERTIFY, n0 = 100, n = 100,000, α = 0.001."""
        return cls(**{"certify": "fixed", "n0": PAPER_N0, "n": PAPER_N, "alpha": PAPER_ALPHA, **overrides})

    @classmethod
    def from_mapping(cls, options: Mapping[str, Any]) -> "RobustnessOptions":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ConfigError(f"unknown robustness option '{unknown[0]}' (known: {', '.join(sorted(known))})")
        return cls(**options)


def run_robustness_audit(model: nn.Module, dataset, options: RobustnessOptions | Mapping[str, Any] | None = None
                         ) -> dict[str, Any]:
    """Certify and attack the same images of ``dataset`` (items ``(image in [0, 1], label)``).

    Returns ``certification`` (see ``certify_dataset``), ``attacks`` (parameters and one row per attack and
    ε), ``sanity_checks``, a ``summary`` for reports, the options used and the run time.
    """
    if options is None:
        options = RobustnessOptions()
    elif not isinstance(options, RobustnessOptions):
        options = RobustnessOptions.from_mapping(options)
    start = time.perf_counter()
    indices = select_indices(len(dataset), options.limit)
    num_classes = infer_num_classes(model, dataset[indices[0]][0])

    certification = certify_dataset(model, dataset, options.sigma, n0=options.n0, n=options.n, alpha=options.alpha,
                                     batch_size=options.batch_size, radii=options.radii, limit=options.limit,
                                     seed=options.seed, progress=options.progress, num_classes=num_classes,
                                     method=options.certify, tolerance=options.tolerance)

    items = [dataset[i] for i in indices]
    images = torch.stack([torch.as_tensor(x, dtype=torch.float32) for x, _ in items])
    labels = torch.tensor([int(y) for _, y in items])
    smooth = Smooth(model, num_classes, options.sigma, generator=options.seed + 1)
    rows = run_attack_suite(model, images, labels, options.attacks, options.eps, num_classes, steps=options.steps,
                            restarts=options.restarts, steps_check=options.steps_check,
                            batch_size=options.attack_batch_size, smooth=smooth, smooth_n=options.smooth_n,
                            smooth_alpha=options.smooth_alpha, smooth_batch_size=options.batch_size,
                            smooth_limit=options.smooth_limit, seed=options.seed, progress=options.progress)
    checks = sanity_checks(rows)
    meta = dict(getattr(model, "fedvision_meta", None) or {})
    return {
        "format": RESULT_FORMAT,
        "model": meta,
        "options": _jsonable(asdict(options)),
        "num_samples": len(indices),
        "certification": certification,
        "attacks": {"eps": resolve_eps(options.eps, options.attacks), "rows": rows},
        "sanity_checks": checks,
        "requirements": {f"{r:g}": a for r, a in (options.require_certified or {}).items()},
        "summary": _summary(certification, rows, checks),
        "seconds": time.perf_counter() - start,
    }


def _summary(certification: dict, rows: list[dict], checks: list[dict]) -> dict[str, Any]:
    # Per norm and ε, the worst case per image over the attacks run (each attack is an upper bound).
    worst = worst_case_per_image(rows)
    for norm, points in worst.items():
        for point in points:
            point["standard"] = math.isclose(point["eps"], STANDARD_EPS[norm])
    failed = [c for c in checks if c["passed"] is False]
    labels = [row["label"] for row in certification["rows"]]
    return {
        "clean_accuracy": rows[0]["clean_accuracy"] if rows else None,
        "certified_accuracy": {f"{p['radius']:g}": p["certified_accuracy"] for p in certification["curve"]},
        "max_certifiable_radius": certification["params"]["max_certifiable_radius"],
        "abstain_rate": certification["abstain_rate"],
        "samples_per_image": {k: certification["samples"][k] for k in ("mean", "max")},
        # the accuracy of always predicting the most frequent label of the certified images: the smoothed
        # classifier must beat it for its certificates to mean anything
        "majority_class_rate": max(labels.count(y) for y in set(labels)) / len(labels),
        "worst_case_robust_accuracy": worst,
        "sanity_checks_passed": not failed,
        "sanity_level": SANITY_LEVEL,
        "sanity_checks_failed": [f"{c['check']} ({c['attack']}): {c['detail']}" for c in failed],
    }


def write_robustness_outputs(result: Mapping[str, Any], out_dir: str | Path) -> list[Path]:
    """Write ``robustness.json`` (everything), ``certification.csv`` and ``attacks.csv`` (the rows), atomically."""
    out_dir = Path(out_dir)
    return [
        atomic_write_json(out_dir / "robustness.json", result),
        atomic_write_text(out_dir / "certification.csv", _csv(result["certification"]["rows"])),
        atomic_write_text(out_dir / "attacks.csv", _csv(result["attacks"]["rows"])),
    ]


def _csv(rows: Sequence[Mapping[str, Any]]) -> str:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row.get(k) is None else row.get(k) for k in columns})
    return buf.getvalue()


def _check_requirements(value: Mapping[float, float] | None) -> dict[float, float] | None:
    if not value:
        return None
    out = {}
    for radius, accuracy in dict(value).items():
        try:
            radius, accuracy = float(radius), float(accuracy)
        except (TypeError, ValueError):
            raise ConfigError(f"require_certified: radius and accuracy must be numbers, got {radius!r}: {accuracy!r}") \
                from None
        if not math.isfinite(radius) or radius < 0 or not 0 <= accuracy <= 1:
            raise ConfigError(f"require_certified: need a radius ≥ 0 and an accuracy in [0, 1], got "
                              f"{radius:g}: {accuracy:g}")
        out[radius] = accuracy
    return out


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value
