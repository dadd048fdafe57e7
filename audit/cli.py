"""``fedvision audit``: audit a trained model on a dataset and write the compliance report to a folder.

Each check is one ``Check`` in ``CHECKS``: ``options(args, meta)`` validates its command-line options (before
any data is loaded), ``run(model, inputs, options)`` returns a JSON-able dict from the model and the
``audit.report.AuditInputs`` (the audited split, its sensitive attributes, the model's predictions on every
sample and, with ``--run``, the federated run's record), ``write(result, out_dir)`` writes the check's own files
atomically (None: its result lives in the report only) and ``summary(result)`` prints a few lines. The checks are
``robustness`` (randomized-smoothing certification, attacks, sanity checks), ``fairness`` (per-group
performance with intervals, pooled here and as the sites computed it) and ``privacy`` (the sites' accounting and
a membership-inference test of it). Whatever ran, ``report.json`` and ``report.html`` are always written.
"""

from __future__ import annotations

import argparse
import csv
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from audit import (ATTACK_NORMS, DEFAULT_ALPHA, DEFAULT_ATTACKS, DEFAULT_CERTIFY, DEFAULT_EPS, DEFAULT_FIRST_LOOK,
                   DEFAULT_FUTILITY, DEFAULT_GROWTH, DEFAULT_N, DEFAULT_N0,
                   DEFAULT_RADII, DEFAULT_SIGMA, DEFAULT_TOLERANCE, PAPER_ALPHA, PAPER_N, PAPER_N0, PAPER_RADII)
from fedvision.errors import ConfigError, DataError, FedVisionError

# Sensitive attributes audited by default (without --sensitive and --run) when the data has them.
KNOWN_SENSITIVE = ("sex", "age_band", "age_group", "age", "skin_tone", "site")


@dataclass(frozen=True)
class Check:
    options: Callable[[argparse.Namespace, dict], Any]
    run: Callable[[Any, Any, Any], dict]
    write: Callable[[dict, Path], list] | None
    summary: Callable[[dict], None]


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "audit", help="audit a trained model: robustness, fairness, privacy; writes report.json and report.html",
        description="Audit a trained model on a dataset and write the compliance report (report.json, validated "
                    "against its schema, and report.html) to --out. robustness: randomized-smoothing "
                    "certificates (Cohen et al., 2019), white-box attacks (torchattacks) and their sanity checks "
                    "(also robustness.json, certification.csv, attacks.csv); fairness: per-group performance with "
                    "bootstrap intervals (fairlearn), and from the sites' own counts with --run; privacy (needs "
                    "--run): the sites' (ε, δ) accounting and a membership-inference lower bound on ε.")
    p.add_argument("--model", required=True, type=Path, help="model file written by fedvision (MODEL.pt)")
    p.add_argument("--data", required=True, metavar="SPEC", help="dataset spec, as for `fedvision data`")
    p.add_argument("--split", default="auto", help="dataset split to audit: test, train, all (every sample) or "
                                                   "auto (default: test where the data has a test split — the "
                                                   "bundled sources, a manifest with a 'split' column — else all)")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--run", type=Path, metavar="RUN_DIR",
                   help="the federated run that trained the model: adds the privacy audit, the sites' own fairness "
                        "counts, per-round accuracy and the run's provenance to the report")
    p.add_argument("--checks", nargs="+", default=list(CHECKS), metavar="CHECK",
                   help=f"what to audit, from {', '.join(CHECKS)} (default: all)")
    p.add_argument("--limit", type=int, default=500,
                   help="robustness: certify and attack this many samples, evenly spaced through the split "
                        "(default: 500; 0: all); performance and fairness always use every sample")
    p.add_argument("--seed", type=int, default=0, help="seed for noise, random starts and resampling (default: 0)")
    p.add_argument("--confidence", type=float, default=0.95,
                   help="level of every confidence interval and of the privacy lower bound (default: 0.95)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")

    g = p.add_argument_group("certification (randomized smoothing)")
    g.add_argument("--sigma", type=float, default=None,
                   help=f"noise level σ (default: the noise_std the model was trained with, else {DEFAULT_SIGMA})")
    g.add_argument("--certify", choices=("adaptive", "fixed"), default=None,
                   help=f"adaptive: estimation samples drawn in stages at looks {DEFAULT_FIRST_LOOK}, "
                        f"{DEFAULT_FIRST_LOOK * DEFAULT_GROWTH:g}, … (×{DEFAULT_GROWTH:g}) up to n, each look's "
                        f"Clopper–Pearson bound at α / (number of looks), so every certificate holds with "
                        f"probability ≥ 1 − α; an image stops once more samples could not change the "
                        f"certified-accuracy curve or raise its radius by more than --tolerance; fixed: Cohen et "
                        f"al.'s CERTIFY with exactly n samples per image at α (default: {DEFAULT_CERTIFY})")
    g.add_argument("--n0", type=int, default=None, help=f"selection samples (default: {DEFAULT_N0})")
    g.add_argument("--n", type=int, default=None,
                   help=f"estimation samples per image: the most (adaptive) or exactly n (fixed) (default: "
                        f"{DEFAULT_N:,}; n caps the certifiable radius)")
    g.add_argument("--alpha", type=float, default=None,
                   help=f"failure probability of each certificate (default: {DEFAULT_ALPHA})")
    g.add_argument("--tolerance", type=float, default=None,
                   help=f"adaptive: stop sampling an image when more samples could not raise its radius by more than "
                        f"this (L2; judged with p_A at its {1 - DEFAULT_FUTILITY:g} upper bound; it sets the samples "
                        f"spent, not α; default: {DEFAULT_TOLERANCE:g})")
    g.add_argument("--paper-protocol", action="store_true",
                   help=f"Cohen et al.'s protocol: fixed-n CERTIFY, n0={PAPER_N0}, n={PAPER_N:,}, α={PAPER_ALPHA} "
                        "(slow on CPU)")
    g.add_argument("--require-certified", nargs="+", default=None, metavar="RADIUS:ACCURACY",
                   help="requirements on the smoothed classifier, e.g. 0.25:0.6 (certified accuracy ≥ 0.6 at L2 "
                        "radius 0.25); without any, the certified-robustness finding is informational")
    g.add_argument("--radii", type=float, nargs="+", default=None,
                   help=f"radii of the certified-accuracy curve and the adaptive rule's targets (default: "
                        f"{' '.join(f'{r:g}' for r in DEFAULT_RADII)}; with --paper-protocol "
                        f"{' '.join(f'{r:g}' for r in PAPER_RADII)})")
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

    f = p.add_argument_group("fairness")
    f.add_argument("--sensitive", metavar="A,B,...",
                   help="sensitive attributes (columns of the data) to audit (default: the run config's 'sensitive' "
                        f"with --run, else whichever of {', '.join(KNOWN_SENSITIVE)} the data has); a numeric "
                        "'age' is audited in bands <40, 40-60, >60")
    f.add_argument("--min-group-size", type=int, default=30,
                   help="groups smaller than this are shown but never judged (default: 30)")
    f.add_argument("--n-boot", type=int, default=200, help="bootstrap resamples per interval (default: 200)")

    v = p.add_argument_group("privacy (needs --run)")
    v.add_argument("--mia-samples", type=int, default=500,
                   help="members and non-members each for the membership-inference test (default: 500)")
    p.set_defaults(handler=run_audit)
    return p


def run_audit(args: argparse.Namespace) -> int:
    from audit.report import build_report, timestamp, write_report
    from fedvision.io import default_device
    from fedvision.models import load_model

    started = timestamp()
    model = load_model(args.model)
    meta = model.fedvision_meta
    unknown = [name for name in args.checks if name not in CHECKS]
    if unknown:
        raise ConfigError(f"--checks: unknown check '{unknown[0]}' (choose from {', '.join(CHECKS)})")
    if not 0 < args.confidence < 1:
        raise ConfigError(f"--confidence must be in (0, 1), got {args.confidence}")
    checks = {name: CHECKS[name] for name in dict.fromkeys(args.checks)}
    options = {name: check.options(args, meta) for name, check in checks.items()}  # validate before loading data
    run_record = _read_run(args.run) if args.run else None
    model.to(default_device())
    inputs = _load_inputs(args, meta, model, run_record)
    written: list[Path] = []
    results = {}
    for name, check in checks.items():
        result = check.run(model, inputs, options[name])
        result["source"] = {"model": str(args.model), "data": args.data, "split": args.split}
        if check.write is not None:
            written += check.write(result, args.out)
        check.summary(result)
        results[name] = result
    report = build_report(args.model, meta, inputs, results, confidence=args.confidence, started=started,
                          options={k: v for k, v in vars(args).items() if k != "handler"})
    written += write_report(report, args.out)
    for finding in report["findings"]:
        print(f"  [{finding['status']}] {finding['check']}: {finding['reason']}")
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def fairness_options(args: argparse.Namespace, meta: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments of ``audit.fairness.assess_fairness`` from the command line."""
    if args.min_group_size < 1:
        raise ConfigError(f"--min-group-size must be ≥ 1, got {args.min_group_size}")
    if args.n_boot < 0:
        raise ConfigError(f"--n-boot must be ≥ 0 (0: no intervals), got {args.n_boot}")
    return {"min_group_size": args.min_group_size, "n_boot": args.n_boot, "confidence": args.confidence,
            "seed": args.seed}


def privacy_options(args: argparse.Namespace, meta: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments of ``audit.privacy.run_privacy_audit`` from the command line."""
    if args.mia_samples < 2:
        raise ConfigError(f"--mia-samples must be ≥ 2, got {args.mia_samples}")
    return {"max_samples": args.mia_samples, "seed": args.seed, "confidence": args.confidence}


def robustness_options(args: argparse.Namespace, meta: dict[str, Any]):
    """``RobustnessOptions`` from the command line; σ defaults to the model's training noise."""
    from audit.attacks import parse_eps
    from audit.robustness import RobustnessOptions

    sigma = args.sigma if args.sigma is not None else (meta.get("noise_std") or DEFAULT_SIGMA)
    given = {k: getattr(args, k) for k in ("certify", "n0", "n", "alpha", "tolerance") if getattr(args, k) is not None}
    if args.paper_protocol:
        if given:
            raise ConfigError(f"--paper-protocol sets the method, n0, n and alpha; drop --{', --'.join(given)}")
        given = {"certify": "fixed", "n0": PAPER_N0, "n": PAPER_N, "alpha": PAPER_ALPHA}
    radii = args.radii or (PAPER_RADII if args.paper_protocol else DEFAULT_RADII)
    attacks = list(ATTACK_NORMS) if "all" in args.attacks else args.attacks
    return RobustnessOptions(
        sigma=sigma, **given, batch_size=args.batch_size, radii=radii, attacks=attacks,
        eps=parse_eps(args.eps) if args.eps else None, steps=args.steps, smooth_n=args.smooth_n,
        smooth_limit=_positive_or_all(args.smooth_limit, "--smooth-limit"),
        limit=_positive_or_all(args.limit, "--limit"), seed=args.seed, progress=args.progress,
        require_certified=_requirements(args.require_certified))


def _requirements(tokens: list[str] | None) -> dict[float, float] | None:
    """``--require-certified 0.25:0.6 0.5:0.4`` as {radius: certified accuracy}."""
    if not tokens:
        return None
    out = {}
    for token in tokens:
        radius, sep, accuracy = token.partition(":")
        try:
            out[float(radius)] = float(accuracy)
        except ValueError:
            sep = ""
        if not sep:
            raise ConfigError(f"--require-certified: write RADIUS:ACCURACY (e.g. 0.25:0.6), got {token!r}")
    return out


def _show(value: float, norm: str) -> str:
    return f"{round(value * 255)}/255" if norm == "Linf" and value and math.isclose(value * 255, round(value * 255)) \
        else f"{value:g}"


def _positive_or_all(value: int, flag: str) -> int | None:
    if value < 0:
        raise ConfigError(f"{flag} must be ≥ 0 (0: all), got {value}")
    return value or None


def _read_run(run_dir: Path) -> dict[str, Any]:
    from fedvision.federation import RUN_RECORD, read_run_record

    if not run_dir.is_dir():
        raise ConfigError(f"--run: {run_dir} is not a folder (give the run folder that holds run.json)")
    return read_run_record(run_dir / RUN_RECORD)


def _load_inputs(args: argparse.Namespace, meta: dict[str, Any], model, run_record: Mapping[str, Any] | None):
    """The audited split as ``AuditInputs``: its samples, class names, sensitive attributes and the model's
    predictions on every sample (read by the performance section and the fairness check alike)."""
    from audit.report import AuditInputs
    from fedvision.models import state_digest
    from fedvision.train import evaluate

    loaded = _load_data(args, meta)
    names = [str(c) for c in meta.get("class_names") or []] or [str(c) for c in loaded.classes or []]
    classes = names + [str(i) for i in range(len(names), meta["num_classes"])]
    evaluation = evaluate(model, loaded.dataset)
    return AuditInputs(spec=args.data, split=args.split, dataset=loaded.dataset, classes=classes,
                       attributes=_sensitive_attributes(loaded.attributes, args.sensitive, run_record, args.data),
                       data_summary=getattr(loaded, "summary", None) or {}, y_true=evaluation.y_true,
                       y_pred=evaluation.y_pred, run_dir=args.run, run_record=run_record,
                       weights_sha256=state_digest(model.state_dict()))


def _has_test_split(spec: str) -> bool:
    """Whether ``spec`` names data with a test split: a bundled source, or a manifest with a 'split' column."""
    from fedvision.config import named_split

    kind, _, path = spec.partition(":")
    if named_split(spec, "test"):
        return True
    if kind == "manifest":
        try:
            with open(Path(path).expanduser(), newline="") as f:
                header = next(csv.reader(f), [])
        except OSError:
            return False  # the loader names the missing file
        return "split" in (c.strip() for c in header)
    return False


def _load_data(args: argparse.Namespace, meta: dict[str, Any]):
    try:
        from fedvision.data import load_dataset
    except ImportError as e:
        raise DataError(f"cannot load --data: fedvision.data is not available ({e})") from e
    if args.split == "auto":
        args.split = "test" if _has_test_split(args.data) else "all"
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
    return loaded


def _sensitive_attributes(attributes, requested: str | None, run_record: Mapping[str, Any] | None, spec: str):
    """The columns of ``attributes`` to audit for fairness (a numeric age is banded by fedvision.groups).

    Named with --sensitive, every name must be a column; by default the run config's ``sensitive`` (with --run)
    or ``KNOWN_SENSITIVE``, keeping those the data has."""
    import pandas as pd

    table = attributes if isinstance(attributes, pd.DataFrame) else pd.DataFrame()
    if requested is not None:
        names = list(dict.fromkeys(s.strip() for s in requested.split(",") if s.strip()))
        if not names:
            raise ConfigError("--sensitive: name at least one column (e.g. --sensitive sex,skin_tone)")
        missing = [n for n in names if n not in table.columns]
        if missing:
            raise ConfigError(f"--sensitive: '{missing[0]}' is not a column of {spec} "
                              f"(its columns: {', '.join(map(str, table.columns)) or 'none'})")
    else:
        wanted = str(run_record["config"].get("sensitive", "")).split(",") if run_record else KNOWN_SENSITIVE
        names = [n for n in (w.strip() for w in wanted) if n and n in table.columns]
        if "age" in names and {"age_band", "age_group"} & set(names):  # the same attribute twice
            names.remove("age")
    return table[names].reset_index(drop=True)  # a numeric age is banded where groups are formed (groups.py)


def _run_robustness(model, inputs, options) -> dict[str, Any]:
    from audit.robustness import run_robustness_audit

    return run_robustness_audit(model, inputs.dataset, options)


def _write_robustness(result: dict[str, Any], out_dir: Path) -> list[Path]:
    from audit.robustness import write_robustness_outputs

    return write_robustness_outputs(result, out_dir)


def _print_robustness(result: dict[str, Any]) -> None:
    s, c = result["summary"], result["certification"]
    p = c["params"]
    how = (f"adaptive, n0={p['n0']}, n≤{p['n']:,}" if c.get("protocol") == "adaptive" else
           f"fixed n, n0={p['n0']}, n={p['n']:,}")
    print(f"robustness: {result['num_samples']} samples, σ={p['sigma']:g} ({how}, α={p['alpha']:g}; largest "
          f"certifiable radius {p['max_certifiable_radius']:.3f}), clean accuracy {s['clean_accuracy']:.3f}")
    above = {f"{q['radius']:g}" for q in c["curve"] if q["above_max_certifiable_radius"]}
    print("  certified accuracy: " + "  ".join(f"r={r}: {a:.3f}" + ("*" if r in above else "")
                                               for r, a in s["certified_accuracy"].items())
          + f"  (abstained {s['abstain_rate']:.1%}; samples per image: mean {c['samples']['mean']:,.0f}, "
            f"max {c['samples']['max']:,}, n0 included" + ("; *: above the largest certifiable radius, says "
                                                           "nothing about the model" if above else "") + ")")
    for norm, points in s["worst_case_robust_accuracy"].items():
        print(f"  worst-case robust accuracy, {norm}: " + "  ".join(
            f"ε={_show(p['eps'], norm)}: {p['robust_accuracy']:.3f} ({p['attack']})" for p in points if p["eps"] > 0))
    if s["sanity_checks_passed"]:
        print(f"  sanity checks: all {len(result['sanity_checks'])} passed (paired tests, family-wise level "
              f"{s['sanity_level']:g})")
    else:
        for line in s["sanity_checks_failed"]:
            print(f"  SANITY CHECK FAILED (possible gradient masking or broken evaluation): {line}")


def _run_fairness(model, inputs, options) -> dict[str, Any]:
    from audit.fairness import assess_fairness

    sensitive = [str(c) for c in inputs.attributes.columns]
    federated = _federated_fairness(inputs.run_record, options)
    if not sensitive and federated is None:
        return {"assessed": False, "reason": "not assessed: the audited data has no sensitive attributes "
                                             f"({', '.join(KNOWN_SENSITIVE)}) and no --run gave the sites' counts"}
    pooled = assess_fairness(inputs.y_true, inputs.y_pred, inputs.attributes, labels=list(range(len(inputs.classes))),
                             class_names=inputs.classes, **options) if sensitive else {}
    return {"sensitive": sensitive, "attributes": pooled, "federated": federated, "params": options}


def _federated_fairness(run_record: Mapping[str, Any] | None, options: dict[str, Any]) -> dict[str, Any] | None:
    """The fairness tables from the per-group confusion counts the sites reported in the run's last round."""
    from audit.fairness import assess_fairness_from_confusion

    rounds = (run_record or {}).get("rounds") or []
    evaluation = (rounds[-1].get("evaluate") or {}) if rounds else {}
    if not evaluation.get("group_confusion"):
        return None
    number = rounds[-1]["round"]
    return {"round": number,
            "source": f"run.json, round {number}: per-group confusion counts that each site computed on its own "
                      "held-out data, summed by the coordinator (no image left a site)",
            "count_noise_std": float(evaluation.get("count_noise_std") or 0.0),
            "attributes": assess_fairness_from_confusion(evaluation["group_confusion"], evaluation["classes"],
                                                         count_noise_std=float(evaluation.get("count_noise_std") or 0.0),
                                                         **options)}


def _print_fairness(result: dict[str, Any]) -> None:
    if result.get("assessed") is False:
        print(f"fairness: {result['reason']}")
        return
    for where, tables in (("pooled", result["attributes"]), ("federated", (result["federated"] or {}).get(
            "attributes", {}))):
        if tables:
            flags = sum(len(t["flags"]) for t in tables.values())
            small = sum(len(t["insufficient"]) for t in tables.values())
            print(f"fairness ({where}): {len(tables)} attributes and intersections, {flags} flags, "
                  f"{small} groups too small to judge")


def _run_privacy(model, inputs, options) -> dict[str, Any]:
    if inputs.run_dir is None:
        return {"assessed": False, "reason": "not assessed: no --run given"}
    from audit.privacy import run_privacy_audit

    return run_privacy_audit(model, inputs.run_dir, **options)


def _print_privacy(result: dict[str, Any]) -> None:
    if result.get("assessed") is False:
        print(f"privacy: {result['reason']}")
        return
    accounting, attack = result["accounting"], result["membership_inference"]
    print(f"privacy: {accounting['method']}; ε_max = {_number(accounting['epsilon_max'])} over "
          f"{len(accounting['sites'])} sites")
    if attack is None:
        print(f"  membership inference: skipped ({result['skipped']})")
    else:
        print(f"  membership inference on {attack['site']}: AUC {attack['auc']:.3f}; {attack['reason']}"
              + ("  RED FLAG" if attack["red_flag"] else ""))


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3g}"


CHECKS: dict[str, Check] = {
    "robustness": Check(robustness_options, _run_robustness, _write_robustness, _print_robustness),
    "fairness": Check(fairness_options, _run_fairness, None, _print_fairness),
    "privacy": Check(privacy_options, _run_privacy, None, _print_privacy),
}
