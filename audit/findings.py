"""The rules that turn the report's measurements into its findings: one line per question a reader asks
first, each with a status (``STATUS_ORDER``) and the measurement behind it. The rules are documented in
docs/audit.md ("Findings"); the same measurements always give the same verdicts, and a check that did not run is
"not assessed", never a pass. ``audit.report`` assembles the report and calls ``derive_findings``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from audit import MIN_SAMPLES

if TYPE_CHECKING:
    from audit.report import AuditInputs

# Worst first: the order of the report's tally. Must list the statuses the schema allows (findings/*/status).
STATUS_ORDER = {"flag": 0, "insufficient data": 1, "not assessed": 2, "not contradicted": 3, "informational": 4,
                "pass": 5}


def derive_findings(inputs: AuditInputs, performance: Mapping[str, Any], privacy: Mapping[str, Any],
                    robustness: Mapping[str, Any], fairness: Mapping[str, Any]) -> list[dict[str, str]]:
    """Every finding, in the report's order, from the report's sections (and the lineage from ``inputs``)."""
    return [lineage_finding(inputs), *performance_findings(performance), *privacy_findings(privacy),
            *robustness_findings(robustness), *fairness_findings(fairness)]


def contradicts_claim(epsilon_lower_bound: float, claimed_epsilon: float | None) -> bool:
    """An empirical ε lower bound (membership inference, canaries) is a red flag when it exceeds the claimed ε;
    without a claim (no DP) there is nothing to contradict."""
    return claimed_epsilon is not None and epsilon_lower_bound > claimed_epsilon


def _finding(check: str, status: str, reason: str) -> dict[str, str]:
    return {"check": check, "status": status, "reason": reason}


def lineage_finding(inputs: AuditInputs) -> dict[str, str]:
    """Is the audited model the run's result? The run record holds the sha256 of each round's global weights."""
    rounds = (inputs.run_record or {}).get("rounds") or []
    final = rounds[-1].get("global_sha256") if rounds else None
    if final is None or inputs.weights_sha256 is None:
        return _finding("provenance", "not assessed", "no --run with a weights lineage: the audited model is not "
                                                      "tied to a training run")
    if inputs.weights_sha256 == final:
        return _finding("provenance", "pass", f"the audited weights are the run's round {rounds[-1]['round']} "
                                              f"global model (sha256 {final[:12]}…)")
    earlier = [r["round"] for r in rounds if r.get("global_sha256") == inputs.weights_sha256]
    where = f"round {earlier[-1]}'s global model, not the final one" if earlier else "not a model this run produced"
    return _finding("provenance", "flag", f"the audited weights are {where} (run record: {final[:12]}…)")


def performance_findings(p: Mapping[str, Any]) -> list[dict[str, str]]:
    level = confidence_level(p["confidence"])
    measured = (f"accuracy {p['accuracy']:.3f} ({level} CI {interval(p['ci'])}) on {p['n']} {p['split']} samples; "
                f"always predicting '{p['majority_class']}' scores {p['majority_class_rate']:.3f}")
    if p["n"] < MIN_SAMPLES:
        return [_finding("performance", "insufficient data", f"only {p['n']} samples (< {MIN_SAMPLES}): {measured}")]
    better = p["ci"][0] > p["majority_class_rate"]
    return [_finding("performance", "pass" if better else "flag",
                     measured + ("" if better else " (not demonstrably better than that)"))]


def privacy_findings(p: Mapping[str, Any]) -> list[dict[str, str]]:
    if not p["assessed"]:
        return [_finding("privacy: accounting", "not assessed", p["reason"]),
                _finding("privacy: noise independence", "not assessed", p["reason"]),
                _finding("privacy: membership inference", "not assessed", p["reason"]),
                _finding("privacy: canary audit", "not assessed", p["reason"])]
    sites = p.get("sites") or []
    over = [s for s in sites if s.get("within_budget") is False]
    # A site whose DP randomness was seeded (a test mode) or not recorded gives no guarantee against whoever
    # knows the seed: the coordinator. Exact evaluation counts are a release without noise.
    not_secret = [s["site"] for s in sites if s.get("epsilon") is not None and s.get("secret_randomness") is not True]
    exact = [s["site"] for s in sites if s.get("exact_evaluation")]
    if not p.get("dp"):
        accounting = _finding("privacy: accounting", "flag", "trained without DP-SGD: no privacy guarantee")
    elif not_secret:
        accounting = _finding("privacy: accounting", "flag", (
            f"{', '.join(not_secret)}: DP noise and sampling were not drawn from fresh secret randomness "
            "(seeded test mode, or not recorded): no guarantee against anyone who knows the seed"))
    elif not sites or p.get("epsilon_max") is None:
        accounting = _finding("privacy: accounting", "insufficient data", "no site reported a spent ε")
    elif over:
        accounting = _finding("privacy: accounting", "flag", "; ".join(
            f"{s['site']} spent ε = {s['epsilon']:.3g} over its budget {s['epsilon_budget']:.3g}" for s in over))
    elif exact:
        accounting = _finding("privacy: accounting", "flag", (
            f"{', '.join(exact)} released exact evaluation counts (the site's choice): its local evaluation "
            f"records have no DP guarantee; training records: ε ≤ {p['epsilon_max']:.3g} at δ = {p['delta']:g}"))
    else:
        evaluation = [s["epsilon_evaluation"] for s in sites if s.get("epsilon_evaluation") is not None]
        accounting = _finding("privacy: accounting", "pass", (
            f"ε ≤ {p['epsilon_max']:.3g} at δ = {p['delta']:g} for training records"
            + (f", ε ≤ {max(evaluation):.3g} for local evaluation records" if evaluation else "")
            + f" ({p.get('accountant')} accountant, record-level, per site) at all {len(sites)} sites, each within "
              "its budget; DP noise from fresh secret randomness"))
    mia = p.get("membership_inference")
    if mia is None:
        attack = _finding("privacy: membership inference", "not assessed",
                          p.get("membership_inference_skipped") or "not run")
    elif mia["claimed_epsilon"] is None:  # nothing to test the bound against; the accounting _finding flags no DP
        attack = _finding("privacy: membership inference", "not assessed", mia["reason"])
    else:
        measured = (f"empirical ε lower bound {mia['epsilon_lower_bound']:.3g} ({mia['confidence']:.0%} confidence) "
                    f"vs claimed ε {mia['claimed_epsilon']:.3g}; attack AUC {mia['auc']:.3f} on "
                    f"{mia['n_members']} members / {mia['n_non_members']} non-members")
        # A weak attack that finds nothing cannot confirm a claim, only fail to contradict it.
        attack = _finding("privacy: membership inference", "flag" if mia["red_flag"] else "not contradicted",
                          (f"{mia['reason']}: " if mia["red_flag"] and mia.get("reason") else "") + measured)
    return [accounting, _mechanism_finding(p.get("mechanism")), attack, _canary_finding(p)]


def _canary_finding(p: Mapping[str, Any]) -> dict[str, str]:
    c = p.get("canary")
    if c is None:
        return _finding("privacy: canary audit", "not assessed", p.get("canary_skipped") or "not run")
    measured = (f"canary ε lower bound {c['epsilon_lower_bound']:.3g} ({c['confidence']:.0%} confidence, "
                f"δ = {c['delta']:g}) from {c['correct']} correct of {c['guesses']} guesses on {c['m']} canaries "
                f"(score: {c['score']})")
    if c["claimed_epsilon"] is None:  # no claim to test; the accounting _finding flags the missing DP
        return _finding("privacy: canary audit", "not assessed", f"no ε claimed (trained without DP); {measured}")
    return _finding("privacy: canary audit", "flag" if c["red_flag"] else "not contradicted",
                    f"{measured} vs claimed ε {c['claimed_epsilon']:.3g}")


def _mechanism_finding(m: Mapping[str, Any] | None) -> dict[str, str]:
    if not m or not m.get("assessed"):
        return _finding("privacy: noise independence", "not assessed", (m or {}).get("reason") or "not run")
    measured = (f"lowest ‖Δa − Δb‖²/(va + vb) = {m['min_statistic']:.3g} ({'/'.join(m['min_pair'])}, round "
                f"{m['min_round']}) vs threshold {m['threshold']:.3g} over {m['tests']} pairs and rounds, α = "
                f"{m['alpha']:g}")
    if m["passed"]:
        return _finding("privacy: noise independence", "pass",
                        f"the sites' updates differ by at least the independent noise their ledgers declare: {measured}")
    return _finding("privacy: noise independence", "flag",
                    f"{len(m['flagged'])} pair(s) of updates are closer than independent DP noise allows (shared or "
                    f"missing noise?): {measured}")


def robustness_findings(r: Mapping[str, Any]) -> list[dict[str, str]]:
    """Robustness is informational unless the auditor stated a requirement (--require-certified); the
    certificates are flagged when the smoothed classifier is not demonstrably better than always predicting the
    majority class (the lower end of its accuracy interval), as a certified radius of a useless classifier
    means nothing."""
    if not r["assessed"]:
        return [_finding("robustness: certified", "not assessed", r["reason"]),
                _finding("robustness: attacks", "not assessed", r["reason"])]
    return [_certified_finding(r), _attacks_finding(r)]


def _certified_finding(r: Mapping[str, Any]) -> dict[str, str]:
    c = r["certification"]
    level = confidence_level(r["confidence"])
    samples = c.get("samples_per_image")
    protocol = (f"adaptive CERTIFY, n ≤ {c['n']:,}" if c.get("protocol") == "adaptive" else
                f"CERTIFY, n = {c['n']:,}") + \
        (f", {samples['mean']:,.0f} samples per image on average" if samples else "")
    points = [f"{c['certified_accuracy'][k]:.3f} ({level} CI {interval(c['certified_accuracy_ci'][k])}) at r = {k}"
              for k in c["certified_accuracy"] if float(k) > 0
              and k not in c.get("above_max_certifiable_radius", [])][:2]
    measured = (f"smoothed classifier: certified accuracy {'; '.join(points) or 'n/a below the certifiable maximum'} "
                f"(σ = {c['sigma']:g}, {protocol}, α = {c['alpha']:g}, {c['num_samples']} images; largest "
                f"certifiable radius {c['max_certifiable_radius']:.3f})")
    if c["num_samples"] < MIN_SAMPLES:
        return _finding("robustness: certified", "insufficient data",
                        f"only {c['num_samples']} images certified (< {MIN_SAMPLES}): {measured}")
    majority, accuracy_ci = c.get("majority_class_rate"), c.get("smoothed_accuracy_ci")
    if majority is not None and accuracy_ci is not None and accuracy_ci[0] <= majority:
        return _finding("robustness: certified", "flag",
                        f"the smoothed classifier's accuracy {c['smoothed_accuracy']:.3f} ({level} CI "
                        f"{interval(accuracy_ci)}) is not above the majority-class rate {majority:.3f} of the "
                        f"certified images: its certificates say nothing useful; {measured}")
    requirements = c.get("requirements") or []
    if not requirements:
        return _finding("robustness: certified", "informational", f"no requirement stated; {measured}")
    unmet = [q for q in requirements if not q["met"]]
    stated = "; ".join(
        f"required ≥ {q['min_certified_accuracy']:g} at r = {q['radius']:g}: {q['certified_accuracy']:.3f} "
        f"({level} CI {interval(q['ci'])})" + (" — radius above the largest certifiable radius: raise --n"
                                                if q["above_max_certifiable_radius"] else "")
        for q in (unmet or requirements))
    if unmet and all(q["above_max_certifiable_radius"] for q in unmet):
        return _finding("robustness: certified", "insufficient data", f"{stated}; {measured}")
    return _finding("robustness: certified", "flag" if unmet else "pass",
                    f"{'not met' if unmet else 'met'}: {stated}; {measured}")


def _attacks_finding(r: Mapping[str, Any]) -> dict[str, str]:
    standard = [f"{eps_text(p['eps'], norm)}: {p['robust_accuracy']:.3f}"
                for norm, points in r["worst_case_robust_accuracy"].items() for p in points if p["standard"]]
    measured = ("worst-case robust accuracy per image over the attacks (an upper bound) at "
                + ("; ".join(standard) or "no standard ε"))
    if r["sanity_checks_passed"]:
        return _finding("robustness: attacks", "informational", f"sanity checks passed; {measured}")
    failed = [f"{c['check']} ({c['attack']})" for c in r["sanity_checks"] if c["passed"] is False]
    return _finding("robustness: attacks", "flag",
                    f"sanity check failed: {', '.join(failed)} (possible gradient masking); {measured}")


def fairness_findings(f: Mapping[str, Any]) -> list[dict[str, str]]:
    if not f["assessed"]:
        return [_finding("fairness", "not assessed", f["reason"])]
    findings = []
    attributes = f["attributes"]
    single = [a for a in attributes if a in f["sensitive"]]
    for attribute in single:
        findings.append(_attribute_finding(f"fairness: {attribute}", {attribute: attributes[attribute]}))
    crossed = {a: t for a, t in attributes.items() if a not in single}
    if crossed:
        findings.append(_attribute_finding("fairness: intersections", crossed))
    if f.get("federated"):
        findings.append(_attribute_finding("fairness: federated (site-computed)", f["federated"]["attributes"]))
    return findings


def _attribute_finding(check: str, tables: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
    flags = [(a, flag) for a, t in tables.items() for flag in t["flags"]]
    small = [f"{a} {g}" for a, t in tables.items() for g in t["insufficient"]]
    judged = {a: [g for g, row in t["groups"].items() if row["sufficient"]] for a, t in tables.items()}
    bounds = next(iter(tables.values()))["params"]["ratio_bounds"] if tables else [0.8, 1.25]
    size = next(iter(tables.values()))["params"]["min_group_size"] if tables else MIN_SAMPLES
    small_note = f"; too small to judge (< {size}): {_listed(small)}" if small else ""
    if flags:
        # lead with a flag that holds across the group's interval, and say how many do
        flags.sort(key=lambda af: not af[1].get("outside_with_ci"))
        a, first = flags[0]
        more = f" (+{len(flags) - 1} more)" if len(flags) > 1 else ""
        firm = sum(bool(f.get("outside_with_ci")) for _, f in flags)
        return _finding(check, "flag", f"{a} = {first['group']}: {first['reason']}{more}; {firm} of {len(flags)} "
                                       f"outside the bounds across the group's whole interval{small_note}")
    if all(len(groups) < 2 for groups in judged.values()):
        return _finding(check, "insufficient data",
                        f"fewer than two groups with ≥ {size} samples to compare{small_note}")
    compared = sum(len(groups) for groups in judged.values())
    return _finding(check, "pass", f"{compared} groups compared: accuracy, recall and FPR within "
                                   f"[{bounds[0]:g}, {bounds[1]:g}]× the reference group{small_note}")


# ---------------------------------------------------------------------------------------------------------
# Wording shared with the HTML page
# ---------------------------------------------------------------------------------------------------------
def confidence_level(confidence: float) -> str:
    """0.95 → "95%"."""
    return f"{confidence:.0%}"


def interval(ci: Sequence[float] | None) -> str:
    return "n/a" if ci is None else f"{ci[0]:.3f}–{ci[1]:.3f}"


def norm_label(norm: str) -> str:
    return "L∞" if norm == "Linf" else norm


def eps_label(eps: float, norm: str) -> str:
    """An attack's ε: k/255 for L∞ when it is a whole number of grey levels, else as is."""
    if norm == "Linf" and eps and math.isclose(eps * 255, round(eps * 255)):
        return f"{round(eps * 255)}/255"
    return f"{eps:g}"


def eps_text(eps: float, norm: str) -> str:
    return f"{norm_label(norm)} ε = {eps_label(eps, norm)}"


def _listed(items: Sequence[str], limit: int = 4) -> str:
    return ", ".join(items[:limit]) + (f" and {len(items) - limit} more" if len(items) > limit else "")
