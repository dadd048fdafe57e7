"""``fedvision audit``: audit a trained model on a dataset and write the results to a folder.

Each check is one ``Check`` in ``CHECKS``: ``options(args, meta)`` validates its command-line options (before
any data is loaded), ``run(model, dataset, options)`` returns a JSON-able dict, ``write(result, out_dir)``
writes its files atomically and ``summary(result)`` prints a few lines. ``robustness`` (randomized-smoothing
certification, attacks, sanity checks) is the first; fairness, privacy and the HTML report plug in the same way.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from audit import (ATTACK_NORMS, DEFAULT_ALPHA, DEFAULT_ATTACKS, DEFAULT_EPS, DEFAULT_N, DEFAULT_N0, DEFAULT_RADII,
                   DEFAULT_SIGMA, PAPER_ALPHA, PAPER_N, PAPER_N0)
from fedvision.errors import ConfigError, DataError, FedVisionError

@dataclass(frozen=True)
class Check:
    options: Callable[[argparse.Namespace, dict], Any]
    run: Callable[[Any, Any, Any], dict]
    write: Callable[[dict, Path], list]
    summary: Callable[[dict], None]


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "audit", help="audit a trained model: certified and empirical robustness",
        description="Audit a trained model on a dataset. robustness: randomized-smoothing certificates "
                    "(Cohen et al., 2019), white-box attacks (torchattacks) and their sanity checks; writes "
                    "robustness.json, certification.csv and attacks.csv to --out.")
    p.add_argument("--model", required=True, type=Path, help="model file written by fedvision (MODEL.pt)")
    p.add_argument("--data", required=True, metavar="SPEC", help="dataset spec, as for `fedvision data`")
    p.add_argument("--split", default="test", help="dataset split to audit (default: test; 'all': every sample)")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--checks", nargs="+", default=["robustness"], metavar="CHECK",
                   help=f"what to audit, from {', '.join(CHECKS)} (default: robustness)")
    p.add_argument("--limit", type=int, default=500,
                   help="audit this many samples, evenly spaced through the split (default: 500; 0: all)")
    p.add_argument("--seed", type=int, default=0, help="seed for noise and random starts (default: 0)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")

    g = p.add_argument_group("certification (randomized smoothing)")
    g.add_argument("--sigma", type=float, default=None,
                   help=f"noise level σ (default: the noise_std the model was trained with, else {DEFAULT_SIGMA})")
    g.add_argument("--n0", type=int, default=None, help=f"selection samples (default: {DEFAULT_N0})")
    g.add_argument("--n", type=int, default=None,
                   help=f"estimation samples (default: {DEFAULT_N}; caps the radius at σ·Φ⁻¹(α^(1/n)))")
    g.add_argument("--alpha", type=float, default=None,
                   help=f"failure probability of each certificate (default: {DEFAULT_ALPHA})")
    g.add_argument("--paper-protocol", action="store_true",
                   help=f"Cohen et al.'s protocol: n0={PAPER_N0}, n={PAPER_N:,}, α={PAPER_ALPHA} (slow on CPU)")
    g.add_argument("--radii", type=float, nargs="+", default=list(DEFAULT_RADII),
                   help="radii of the certified-accuracy curve (default: %(default)s)")
    g.add_argument("--batch-size", type=int, default=1000, help="noisy copies per forward pass (default: 1000)")

    a = p.add_argument_group("attacks")
    a.add_argument("--attacks", nargs="+", default=list(DEFAULT_ATTACKS), metavar="ATTACK",
                   help=f"from {', '.join(ATTACK_NORMS)} or all (default: {' '.join(DEFAULT_ATTACKS)})")
    a.add_argument("--eps", nargs="+", default=None, metavar="EPS",
                   help="ε values for every attack in its own norm (0 2/255 8/255), or per norm "
                        "(linf:0,2/255,8/255 l2:0,0.25,0.5); default: "
                        + " ".join(f"{k.lower()}:{','.join(_show(v, k) for v in vs)}" for k, vs in DEFAULT_EPS.items()))
    a.add_argument("--steps", type=int, default=10, help="PGD steps; step size 2.5·ε/steps (default: 10)")
    a.add_argument("--smooth-limit", type=int, default=10,
                   help="images on which the smoothed classifier is also attacked (default: 10; 0: all)")
    a.add_argument("--smooth-n", type=int, default=100, help="PREDICT samples per attacked image (default: 100)")
    p.set_defaults(handler=run_audit)
    return p


def run_audit(args: argparse.Namespace) -> int:
    from fedvision.io import default_device
    from fedvision.models import load_model

    model = load_model(args.model)
    meta = model.fedvision_meta
    unknown = [name for name in args.checks if name not in CHECKS]
    if unknown:
        raise ConfigError(f"--checks: unknown check '{unknown[0]}' (choose from {', '.join(CHECKS)})")
    checks = {name: CHECKS[name] for name in dict.fromkeys(args.checks)}
    options = {name: check.options(args, meta) for name, check in checks.items()}  # validate before loading data
    dataset = _load_data(args, meta)
    model.to(default_device())
    written: list[Path] = []
    for name, check in checks.items():
        result = check.run(model, dataset, options[name])
        result["source"] = {"model": str(args.model), "data": args.data, "split": args.split}
        written += check.write(result, args.out)
        check.summary(result)
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def robustness_options(args: argparse.Namespace, meta: dict[str, Any]):
    """``RobustnessOptions`` from the command line; σ defaults to the model's training noise."""
    from audit.attacks import parse_eps
    from audit.robustness import RobustnessOptions

    sigma = args.sigma if args.sigma is not None else (meta.get("noise_std") or DEFAULT_SIGMA)
    given = {k: getattr(args, k) for k in ("n0", "n", "alpha") if getattr(args, k) is not None}
    if args.paper_protocol:
        if given:
            raise ConfigError(f"--paper-protocol sets n0, n and alpha; drop --{', --'.join(given)}")
        given = {"n0": PAPER_N0, "n": PAPER_N, "alpha": PAPER_ALPHA}
    attacks = list(ATTACK_NORMS) if "all" in args.attacks else args.attacks
    return RobustnessOptions(
        sigma=sigma, **given, batch_size=args.batch_size, radii=args.radii, attacks=attacks,
        eps=parse_eps(args.eps) if args.eps else None, steps=args.steps, smooth_n=args.smooth_n,
        smooth_limit=_positive_or_all(args.smooth_limit, "--smooth-limit"),
        limit=_positive_or_all(args.limit, "--limit"), seed=args.seed, progress=args.progress)


def _show(value: float, norm: str) -> str:
    return f"{round(value * 255)}/255" if norm == "Linf" and value and math.isclose(value * 255, round(value * 255)) \
        else f"{value:g}"


def _positive_or_all(value: int, flag: str) -> int | None:
    if value < 0:
        raise ConfigError(f"{flag} must be ≥ 0 (0: all), got {value}")
    return value or None


def _load_data(args: argparse.Namespace, meta: dict[str, Any]):
    try:
        from fedvision.data import load_dataset
    except ImportError as e:
        raise DataError(f"cannot load --data: fedvision.data is not available ({e})") from e
    try:
        loaded = load_dataset(args.data, image_size=meta.get("img_size") or 32, channels=meta.get("in_chans", 3),
                              split=None if args.split == "all" else args.split)
    except FedVisionError:
        raise
    except (OSError, ValueError, LookupError) as e:  # a loader's own error about the user's spec: one line
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"{args.data}: cannot load split '{args.split}': {reason}") from e
    classes = [str(c) for c in (getattr(loaded, "classes", None) or [])]
    if len(classes) > meta["num_classes"]:
        raise DataError(f"{args.data}: {len(classes)} classes, but the model was trained for {meta['num_classes']}")
    names = [str(c) for c in meta.get("class_names") or []]
    if classes and names and names != [str(i) for i in range(len(names))] and names[:len(classes)] != classes:
        # label i must mean the same class to the model and to the data
        raise DataError(f"{args.data}: classes {classes} do not match the model's {names}")
    if len(loaded.dataset) == 0:
        raise DataError(f"{args.data}: split '{args.split}' has no samples")
    return loaded.dataset


def _run_robustness(model, dataset, options) -> dict[str, Any]:
    from audit.robustness import run_robustness_audit

    return run_robustness_audit(model, dataset, options)


def _write_robustness(result: dict[str, Any], out_dir: Path) -> list[Path]:
    from audit.robustness import write_robustness_outputs

    return write_robustness_outputs(result, out_dir)


def _print_robustness(result: dict[str, Any]) -> None:
    s, p = result["summary"], result["certification"]["params"]
    print(f"robustness: {result['num_samples']} samples, σ={p['sigma']:g} (n0={p['n0']}, n={p['n']}, "
          f"α={p['alpha']:g}; largest certifiable radius {p['max_certifiable_radius']:.3f}), "
          f"clean accuracy {s['clean_accuracy']:.3f}")
    print("  certified accuracy: " + "  ".join(f"r={r}: {a:.3f}" for r, a in s["certified_accuracy"].items())
          + f"  (abstained {s['abstain_rate']:.1%})")
    for norm, points in s["worst_case_robust_accuracy"].items():
        print(f"  worst-case robust accuracy, {norm}: " + "  ".join(
            f"ε={_show(p['eps'], norm)}: {p['robust_accuracy']:.3f} ({p['attack']})" for p in points if p["eps"] > 0))
    if s["sanity_checks_passed"]:
        print(f"  sanity checks: all {len(result['sanity_checks'])} passed")
    else:
        for line in s["sanity_checks_failed"]:
            print(f"  SANITY CHECK FAILED (possible gradient masking or broken evaluation): {line}")


CHECKS: dict[str, Check] = {
    "robustness": Check(robustness_options, _run_robustness, _write_robustness, _print_robustness),
}
