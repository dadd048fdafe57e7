"""``report.html``: the compliance report as one self-contained page for people to read, print and archive.

The layout is a model card (Mitchell et al., 2019) in the order a reviewer asks: the findings first, then model
details, intended use and limitations, data provenance, privacy, robustness, fairness and the method notes.

Self-contained by construction: inline CSS, figures as inline PNG (matplotlib's Agg renderer through
``matplotlib.figure.Figure``, which leaves the process-wide backend alone), no script, no external URL. The file
can be mailed, archived and opened offline years later, and it shows exactly what was audited. Every string
that comes from the report passes through ``html.escape``: group names, site names, file paths and reasons are
data, and data must never become markup. Only fragments built here are wrapped in ``_Html`` and left as is.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from audit import MIN_SAMPLES

INTERSECTION = "\u00d7"  # as fedvision.groups names an intersection of two attributes ("sex×site")
METRIC_LABELS = {"accuracy": "accuracy", "recall": "recall", "fpr": "FPR", "selection_rate": "selection rate"}
# Okabe–Ito colours: distinguishable with the common colour-vision deficiencies.
COLOURS = {"accuracy": "#0072B2", "recall": "#009E73", "fpr": "#D55E00", "selection_rate": "#CC79A7",
           "central": "#0072B2", "federated": "#E69F00", "Linf": "#0072B2", "L2": "#D55E00"}
ATTACK_MARKERS = "osD^v<>"
STATUS_ORDER = {"flag": 0, "insufficient data": 1, "not assessed": 2, "not contradicted": 3, "informational": 4,
                "pass": 5}


class _Html(str):
    """A fragment of markup built in this module (never from data): inserted without escaping."""


def render_html(report: Mapping[str, Any]) -> str:
    """The page for ``report`` (a dict as ``audit.report.build_report`` returns it)."""
    model = report["model"]
    sections = [
        _findings_section(report),
        _model_section(report),
        _limitations_section(report),
        _provenance_section(report),
        _privacy_section(report["privacy"]),
        _robustness_section(report["robustness"]),
        _fairness_section(report["fairness"]),
        _methods_section(report),
    ]
    title = f"Audit report: {model['architecture']} ({', '.join(model['classes'])})"
    return "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title>",
        f"<style>{CSS}</style>",
        "</head>",
        "<body>",
        "<header>",
        f"<h1>{_e(title)}</h1>",
        (f'<p class="meta">Generated {_e(report["generated"])} by fedvision {_e(_audit_version(report))} · '
         f'report format {_e(report["format"])} · model sha256 <code>{_e(model["sha256"][:16])}…</code></p>'),
        _nav(),
        "</header>",
        "<main>",
        *sections,
        "</main>",
        (f'<footer>Machine-readable version: <code>report.json</code> in the same folder (format '
         f'{_e(report["format"])}, validated against its JSON Schema). Model file <code>{_e(model["file"])}</code>, '
         f'sha256 <code>{_e(model["sha256"])}</code>.</footer>'),
        "</body>",
        "</html>",
    ])


# ---------------------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------------------
SECTIONS = [("findings", "Findings"), ("model", "Model"), ("use", "Intended use and limitations"),
            ("provenance", "Data provenance"), ("privacy", "Privacy"), ("robustness", "Robustness"),
            ("fairness", "Fairness"), ("methods", "Method notes")]


def _nav() -> str:
    return "<nav>" + " · ".join(f'<a href="#{key}">{_e(name)}</a>' for key, name in SECTIONS) + "</nav>"


def _section(key: str, *body: str) -> str:
    return f'<section id="{key}">\n<h2>{_e(dict(SECTIONS)[key])}</h2>\n' + "\n".join(body) + "\n</section>"


def _findings_section(report: Mapping[str, Any]) -> str:
    findings = report["findings"]
    counts = {s: sum(f["status"] == s for f in findings) for s in STATUS_ORDER}
    tally = " · ".join(f"{_badge(s)} {n}" for s, n in counts.items() if n)
    rows = [[_badge(f["status"]), f["check"], f["reason"]] for f in findings]
    return _section(
        "findings",
        f'<p class="tally">{tally}</p>',
        _table(["status", "check", "finding"], rows, row_classes=[f"row-{_slug(f['status'])}" for f in findings],
               css="findings"),
        '<p class="note">pass: the check ran and met its rule; flag: it ran and found a problem to look at; '
        "insufficient data: too few samples to judge; not contradicted: an empirical test found nothing against "
        "a claim, which it could not have confirmed; informational: measured and shown, with no requirement "
        "stated to judge it against; not assessed: the check could not run or was not asked "
        "for (never a pass). The rules are in the method notes.</p>")


def _model_section(report: Mapping[str, Any]) -> str:
    model, performance = report["model"], report["performance"]
    trained = model.get("trained_with") or {}
    size = model.get("img_size")
    details = [
        ("architecture", model["architecture"]),
        ("classes", ", ".join(f"{i}: {c}" for i, c in enumerate(model["classes"]))),
        ("input", f"{model.get('in_chans')} × {size} × {size}, values in [0, 1]" if size else "any size"),
        ("trained with", ", ".join(f"{k} {v}" for k, v in trained.items()) or "not recorded"),
        ("federated rounds", _text(model.get("round"))),
        ("differential privacy", "DP-SGD (Opacus): per-sample clipping and Gaussian noise" if model["dp"]
         else "none: no privacy guarantee"),
        ("Gaussian noise augmentation σ", _text(model.get("noise_std"))),
        ("file", model["file"]),
        ("sha256", model["sha256"]),
    ]
    level = _level(performance["confidence"])
    per_class = [[name, row["count"], _with_ci(row["recall"], row["ci"])]
                 for name, row in performance["per_class"].items()]
    parts = [
        _definition_list(details),
        "<h3>Performance on the audited split</h3>",
        (f'<p class="headline">Accuracy <strong>{_num(performance["accuracy"])}</strong> '
         f'({level} CI {_interval(performance["ci"])}, {_e(performance["ci_method"])}) on '
         f'{performance["n"]} samples of split <code>{_e(performance["split"])}</code>. Always predicting the most '
         f'frequent class ({_e(performance["majority_class"])}) would score {_num(performance["majority_class_rate"])}.'
         "</p>"),
        _table(["class", "samples", f"recall ({level} CI)"], per_class),
    ]
    federated = performance.get("federated")
    if federated and federated["rounds"]:
        rows = [[r["round"], _with_ci(r["federated_accuracy"], r["federated_ci"]), r["federated_examples"],
                 _with_ci(r["central_accuracy"], r["central_ci"]), r["central_examples"],
                 {True: "yes", False: "no", None: "—"}[r.get("aggregated")]] for r in federated["rounds"]]
        parts += [
            "<h3>Accuracy during federated training</h3>",
            _figure(_rounds_figure(federated["rounds"]), "Accuracy per federated round",
                    f"Accuracy after each round ({level} Wilson intervals shaded). federated: example-weighted over "
                    "the sites' local held-out data; central: the run's test dataset. Round 0 is the initial model."),
            _table(["round", f"federated accuracy ({level} CI)", "samples", f"central accuracy ({level} CI)",
                    "samples", "aggregated"], rows, css="compact"),
        ]
    return _section("model", *parts)


def _limitations_section(report: Mapping[str, Any]) -> str:
    data = report["provenance"]["data"]
    privacy, robustness, fairness = report["privacy"], report["robustness"], report["fairness"]
    items = [
        ("<strong>Intended use.</strong> A research and demonstration model for federated, differentially private "
         "training across institutions and for auditing such a model. It is not a medical device and must not be "
         "used to diagnose, triage or treat anyone."),
    ]
    if data["synthetic"]:
        items.append("<strong>Synthetic data.</strong> Every number in this report comes from "
                     "<code>synthetic-derm</code>, images generated by fedvision with made-up sites and "
                     "demographics. They say how the method behaves, not how any model performs on real patients.")
    else:
        items.append("<strong>Data.</strong> The numbers hold for the audited split only (see Data provenance); "
                     "performance on other populations, devices or sites is not established by this report.")
    if privacy["assessed"]:
        items.append(
            "<strong>Privacy guarantee.</strong> Each site's (ε, δ) is record-level differential privacy for that "
            "site's training images, as its own accountant computed it (cumulative over all rounds). It protects "
            "one image; a patient with k images is protected with a weaker, group-privacy guarantee. It does not "
            "cover what sites release outside training: per-group confusion counts of local evaluation and the "
            "number of examples are sent without noise. The membership-inference bound is a lower bound from one "
            "weak attack: a bound below the claimed ε is expected and does not prove the claim.")
    else:
        items.append(f"<strong>Privacy.</strong> Not assessed ({_e(privacy['reason'])}): this report makes no "
                     "statement about the model's privacy.")
    if robustness["assessed"]:
        items.append(
            "<strong>Robustness.</strong> The certificates hold for the <em>smoothed</em> classifier g (majority "
            "vote of the model under Gaussian noise, n forward passes per prediction), not for the base model f "
            "deployed as is; they are L2 certificates, each true with probability ≥ 1 − α. Attack results are "
            "upper bounds on robust accuracy: a stronger attack may do better. Neither covers natural corruptions "
            "or distribution shift.")
    if fairness["assessed"]:
        items.append(
            "<strong>Fairness.</strong> Groups are those recorded in the data; small groups are shown but not "
            "judged, and absence of a flag is not evidence of equal performance when intervals are wide. The "
            "federated table describes the sites' own held-out data, whose mix of groups differs from the pooled "
            "split.")
    return _section("use", "<ul>" + "".join(f"<li>{item}</li>" for item in items) + "</ul>")


def _provenance_section(report: Mapping[str, Any]) -> str:
    provenance = report["provenance"]
    data, run, audit = provenance["data"], provenance["run"], provenance["audit"]
    parts = [
        "<h3>Audited data</h3>",
        _definition_list([
            ("dataset spec", data["spec"]), ("source", data["source"]),
            ("sha256", data["sha256"] or "none (no single data file)"), ("split", data["split"]),
            ("samples", data["num_samples"]),
            ("class counts", ", ".join(f"{k}: {v}" for k, v in data["class_counts"].items())),
            ("sensitive attributes", ", ".join(data["sensitive_attributes"]) or "none"),
            ("skipped files", _text(data.get("num_skipped"))),
        ]),
    ]
    if run is None:
        parts.append('<p class="notice">No federated run given (<code>--run</code>): the sites, their data and '
                     "the training history are not part of this report.</p>")
    else:
        config = run["config"]
        parts += [
            "<h3>Federated run</h3>",
            _definition_list([
                ("run folder", run["dir"]), ("status", run["status"]),
                ("started / finished", f"{_text(run.get('started'))} / {_text(run.get('finished'))}"),
                ("rounds completed", _text(run.get("completed_rounds"))),
                ("strategy", config.get("strategy")), ("training data", config.get("dataset")),
                ("partitioning", config.get("partitioning")),
                ("central test data", config.get("test-dataset") or "none"),
            ]),
            "<h3>Sites</h3>",
            _table(["site", "training samples", "local held-out samples", "local accuracy (last round)",
                    "rounds aggregated", "rejected", "refused", "failed", "suspect"],
                   [[name, _text(s["train_examples"]), _text(s["local_test_examples"]),
                     _num(s["local_accuracy_last_round"]), s["rounds_accepted"], s["rounds_rejected"],
                     s["rounds_refused"], s["rounds_failed"], s["rounds_suspects"]]
                    for name, s in run["sites"].items()]),
        ]
        events = [[kind, e.get("round"), e.get("site"), e.get("reason")]
                  for kind in ("rejected", "refused", "failed", "suspects") for e in run.get(kind, [])]
        if events:
            parts += ["<h4>Updates not aggregated, and aggregated updates named as suspect</h4>",
                      _table(["kind", "round", "site", "reason"], events)]
        parts.append(_details("Run configuration (run-config keys)",
                              _table(["key", "value"], [[k, _text(v)] for k, v in config.items()], css="compact")))
    versions = sorted(set(audit["versions"]) | set((run or {}).get("versions", {})))
    parts += [
        "<h3>Software</h3>",
        _table(["package", "audit", "training run"],
               [[name, audit["versions"].get(name, "—"), (run or {}).get("versions", {}).get(name, "—")]
                for name in versions], css="compact"),
        f'<p class="note">Audit started {_e(audit["started"])}, finished {_e(audit["finished"])}.</p>',
    ]
    return _section("provenance", *parts)


def _mechanism(m: Mapping[str, Any] | None) -> str:
    if not m or not m.get("assessed"):
        return _notice(f"Not assessed: {(m or {}).get('reason') or 'not run'}.")
    verdict = ('<p class="ok">Every pair of sites\' updates differs by at least the independent noise their ledgers '
               'declare.</p>' if m["passed"] else
               f'<p class="alert"><strong>Red flag:</strong> {len(m["flagged"])} pair(s) of updates are closer than '
               'independent DP noise allows: the noise may be shared, reproducible or missing.</p>')
    rows = [("lowest statistic ‖Δa − Δb‖²/(va + vb)", f"{_num(m['min_statistic'])} "
             f"({'/'.join(m['min_pair'])}, round {m['min_round']})"),
            ("threshold", _num(m["threshold"])), ("pairs × rounds tested", _text(m["tests"])),
            ("α (false-alarm rate of the whole test)", _text(m["alpha"])),
            ("trainable parameters P", _text(m["parameters"]))]
    return verdict + _definition_list(rows) + f'<p class="note">{_e(m["method"])}.</p>'


def _canary(c: Mapping[str, Any] | None, skipped: str | None) -> str:
    if not c:
        return _notice(f"Not assessed: {skipped or 'not run'}.")
    verdict = (f'<p class="alert"><strong>Red flag:</strong> {_e(c["reason"])}</p>' if c["red_flag"]
               else f'<p class="ok">{_e(c["reason"])}</p>')
    rows = [("site with the canaries", c.get("site", "—")),
            ("canaries m (in by a secret fair coin)", f"{c['m']} ({c.get('canaries_in', '—')} in)"),
            ("guesses (k₊ in, k₋ out; the rest abstain)", f"{c['guesses']} ({c.get('k_in', '—')} in, "
                                                          f"{c.get('k_out', '—')} out)"),
            ("correct guesses", c["correct"]), ("score", c["score"]),
            (f"canary ε lower bound ({_level(c['confidence'])})", _num(c["epsilon_lower_bound"], 2)),
            ("claimed ε (the site's accountant)", _num(c["claimed_epsilon"])), ("δ", _sci(c["delta"]))]
    return verdict + _definition_list(rows) + f'<p class="note">{_e(c["method"])}.</p>'


def _privacy_section(privacy: Mapping[str, Any]) -> str:
    if not privacy["assessed"]:
        return _section("privacy", _notice(privacy["reason"]))
    parts = [
        f'<p class="headline">{_e(privacy.get("method") or "")}. Worst case over the sites: '
        f'<strong>ε = {_num(privacy["epsilon_max"])}</strong> at δ = {_e(_sci(privacy["delta"]))}.</p>'
        if privacy["dp"] else _notice("The run trained without differential privacy: there is no privacy guarantee."),
        _table(["site", "ε training records", "ε training (RDP cross-check)", "ε evaluation records",
                "ε budget (each)", "δ", "noise multiplier σ", "sample rate q", "steps", "training samples", "accountant",
                "secret randomness", "within budget"],
               [[s["site"], _num(s["epsilon"]), _num(s.get("epsilon_rdp")),
                 "∞ (exact counts)" if s.get("exact_evaluation") else _num(s.get("epsilon_evaluation")),
                 _num(s["epsilon_budget"]), _sci(s["delta"]),
                 _num(s.get("noise_multiplier")), _num(s.get("sample_rate")), _text(s.get("steps")),
                 _text(s.get("num_examples")), _text(s.get("accountant")), _yes_no(s.get("secret_randomness")),
                 _yes_no(s.get("within_budget"))]
                for s in privacy["sites"]]),
        _table(["site", "also released"], [[s["site"], _text(s.get("released"))] for s in privacy["sites"]]),
        "<h3>Noise independence</h3>",
        _mechanism(privacy.get("mechanism")),
        "<h3>Canary audit (one run)</h3>",
        _canary(privacy.get("canary"), privacy.get("canary_skipped")),
        "<h3>Membership inference</h3>",
    ]
    attack = privacy["membership_inference"]
    if attack is None:
        parts.append(_notice(f"Not run: {privacy['membership_inference_skipped'] or 'no reason recorded'}."))
        return _section("privacy", *parts)
    level = _level(attack["confidence"])
    verdict = (f'<p class="alert"><strong>Red flag:</strong> {_e(attack["reason"])}</p>' if attack["red_flag"]
               else f'<p class="ok">{_e(attack["reason"])}</p>')
    rows = [
        ("site attacked", attack.get("site", "—")),
        ("members / non-members", f"{attack['n_members']} / {attack['n_non_members']}"),
        ("non-members from", attack.get("non_members_source", "—")),
        ("attack AUC", _num(attack["auc"])),
        ("at the chosen threshold (evaluation half)", f"TPR {_num(attack['tpr'])}, FPR {_num(attack['fpr'])}"),
        (f"empirical ε lower bound ({level})", _Html(f'<strong class="{"flagged" if attack["red_flag"] else ""}">'
                                                    f"{_num(attack['epsilon_lower_bound'])}</strong>")),
        ("claimed ε (the site's accountant)", _Html(f"<strong>{_num(attack['claimed_epsilon'])}</strong>")),
        ("δ", _sci(attack["delta"])),
    ]
    parts += [
        verdict,
        '<div class="pair">',
        _figure(_roc_figure(attack), "ROC curve of the membership-inference attack",
                "Loss-threshold attack: true-positive rate (members called members) against false-positive rate. "
                "The diagonal is guessing; the dot is the chosen threshold on the evaluation half."),
        _definition_list(rows),
        "</div>",
    ]
    return _section("privacy", *parts)


def _robustness_section(robustness: Mapping[str, Any]) -> str:
    if not robustness["assessed"]:
        return _section("robustness", _notice(robustness["reason"]))
    c = robustness["certification"]
    level = _level(robustness["confidence"])
    above = set(c.get("above_max_certifiable_radius", []))
    required = {f"{q['radius']:g}": q for q in c.get("requirements") or []}
    curve_rows = [[r, _with_ci(a, c["certified_accuracy_ci"][r]),
                   "; ".join(filter(None, [
                       f"above the largest certifiable radius ({_num(c['max_certifiable_radius'])}): a value here says "
                       "nothing about the model, only about n" if r in above else "",
                       f"required ≥ {required[r]['min_certified_accuracy']:g}: "
                       f"{'met' if required[r]['met'] else 'NOT MET'}" if r in required else ""]))]
                  for r, a in c["certified_accuracy"].items()]
    evaluation = [row for row in robustness["attacks"] if row["purpose"] == "evaluation"]
    extra = [row for row in robustness["attacks"] if row["purpose"] != "evaluation"]
    attack_rows = [[row["name"], _norm(row["norm"]), _eps(row["eps"], row["norm"]), _num(row["clean_accuracy"]),
                    _with_ci(row["robust_accuracy"], row["robust_accuracy_ci"]), _num(row["attack_success_rate"]),
                    _smoothed(row), _num(row.get("max_perturbation")), _attack_params(row)]
                   for row in evaluation + extra]
    checks = [[_badge("pass" if c_["passed"] else "flag" if c_["passed"] is False else "not assessed"),
               c_["check"], c_["attack"], c_["detail"]] for c_ in robustness["sanity_checks"]]
    return _section(
        "robustness",
        f'<p class="headline">{robustness["num_samples"]} images of the audited split, evenly spaced, are '
        f'certified and attacked. Base model clean accuracy on them: {_num(robustness["clean_accuracy"])}.</p>',
        "<h3>Certified robustness (randomized smoothing)</h3>",
        f"<p>{_e(_certification_protocol(c))} Abstained on {_pct(c['abstain_rate'])} of the images; the smoothed "
        "classifier's accuracy (abstentions count as errors) is "
        f"{_with_ci(c.get('smoothed_accuracy'), c.get('smoothed_accuracy_ci'))}"
        + (f" against {_num(c['majority_class_rate'])} for always predicting the most frequent class"
           if c.get("majority_class_rate") is not None else "") + ".</p>",
        '<div class="pair">',
        _figure(_certified_figure(c, level), "Certified accuracy against L2 radius",
                f"Share of images the smoothed classifier classifies correctly with a certified L2 radius ≥ r "
                f"(bars: {level} Wilson intervals over the images). Dashed: the largest certifiable radius; "
                f"points beyond it (shaded) cannot be above 0 with this n."),
        _table(["radius r (L2)", f"certified accuracy ({level} CI)", ""], curve_rows),
        "</div>",
        "<h3>Empirical robustness (white-box attacks)</h3>",
        _figure(_attacks_figure(evaluation, level), "Robust accuracy against attack strength",
                f"Robust accuracy (correct before and after the attack; an upper bound) against ε, per threat model "
                f"(bars: {level} Wilson intervals). ε in the norm of the panel, on [0, 1] images."),
        _table(["attack", "norm", "ε", "clean accuracy", f"robust accuracy ({level} CI)", "attack success rate",
                "smoothed classifier robust accuracy", "largest perturbation used", "parameters"], attack_rows,
               css="compact"),
        "<h4>Sanity checks</h4>",
        _table(["", "check", "attack", "detail"], checks, css="compact"),
    )


def _fairness_section(fairness: Mapping[str, Any]) -> str:
    if not fairness["assessed"]:
        return _section("fairness", _notice(fairness["reason"]))
    params = fairness["params"]
    single = [a for a in fairness["attributes"] if INTERSECTION not in a]
    crossed = [a for a in fairness["attributes"] if INTERSECTION in a]
    level = _level(params["confidence"])
    parts = [
        (f'<p>Per group: accuracy, recall, false-positive rate and selection rate with {level} bootstrap '
         f'intervals (B = {params["n_boot"]}). Groups with fewer than {params["min_group_size"]} samples are shown '
         "in grey and never judged; among the others, a group is flagged when its accuracy, recall or FPR is outside "
         f"{_bounds(fairness)} times the reference group's (the group with the best accuracy).</p>"),
    ]
    if fairness["attributes"]:
        parts.append("<h3>Pooled: the audited split</h3>")
        parts += [_attribute_block(name, fairness["attributes"][name], level) for name in single]
        if crossed:
            parts.append(_details(f"Intersections ({len(crossed)}): tables",
                                  *[_attribute_table(name, fairness["attributes"][name], level, heading=True)
                                    for name in crossed]))
    federated = fairness.get("federated")
    if federated:
        tables = federated["attributes"]
        parts += [f"<h3>Federated: computed at the sites (round {federated['round']})</h3>",
                  f'<p class="note">{_e(federated["source"])}.</p>']
        parts += [_attribute_block(name, tables[name], level, "federated ")
                  for name in tables if INTERSECTION not in name]
        crossed = [name for name in tables if INTERSECTION in name]
        if crossed:
            parts.append(_details(f"Federated intersections ({len(crossed)}): tables",
                                  *[_attribute_table(name, tables[name], level, heading=True) for name in crossed]))
    return _section("fairness", *parts)


def _attribute_block(name: str, table: Mapping[str, Any], level: str, prefix: str = "") -> str:
    flags = "".join(f"<li>{_e(flag['group'])}: {_e(flag['reason'])}"
                    + ("; <strong>outside the bounds across the group's whole interval</strong>"
                       if flag.get("outside_with_ci") else "; within reach of the bounds inside the group's interval")
                    + "</li>" for flag in table["flags"])
    return "\n".join([
        f"<h4>{_e(prefix)}{_e(name)}</h4>",
        '<div class="pair">',
        _figure(_fairness_figure(table), f"{prefix}{name}: metrics per group",
                f"Metrics per group of {name} with {level} bootstrap intervals (higher is better except FPR); grey "
                "hatched: too few samples to judge; red outline: flagged; ★ the reference group."),
        _attribute_table(name, table, level),
        "</div>",
        f'<ul class="flags">{flags}</ul>' if flags else "",
    ])


def _attribute_table(name: str, table: Mapping[str, Any], level: str, heading: bool = False) -> str:
    """Groups, then overall; ★ marks the reference group, flagged rows are red, groups too small to judge grey."""
    flagged = {(f["group"], f["metric"]) for f in table["flags"]}
    metrics = list(METRIC_LABELS)
    rows, classes = [], []
    for group, row in [*table["groups"].items(), ("overall", {**table["overall"], "sufficient": True})]:
        cells = [f"★ {group}" if group == table["reference_group"] else group, row["count"]]
        for m in metrics:
            value = row["metrics"][m]
            text = _with_ci(value["value"], value["ci"])
            cells.append(_Html(f'<span class="flagged">{_e(text)}</span>') if (group, m) in flagged else text)
        rows.append(cells)
        classes.append("row-small" if not row["sufficient"] else
                       "row-flag" if any(g == group for g, _ in flagged) else
                       "row-overall" if group == "overall" else "")
    out = _table(["group", "n", *[f"{METRIC_LABELS[m]} [{level} CI]" for m in metrics]], rows,
                 row_classes=classes, css="compact numbers")
    return (f"<h5>{_e(name)}</h5>" + out) if heading else out


def _methods_section(report: Mapping[str, Any]) -> str:
    performance, privacy, robustness, fairness = (report[k] for k in ("performance", "privacy", "robustness",
                                                                       "fairness"))
    level = _level(performance["confidence"])
    notes = [
        (f"<strong>Accuracy, recall, certified and robust accuracy intervals</strong>: {level} Wilson score "
         "intervals for a binomial proportion."),
    ]
    if robustness["assessed"]:
        c = robustness["certification"]
        norms = {row["name"]: row["norm"] for row in robustness["attacks"]}
        eps = "; ".join(f"{name} ({_norm(norms[name])}) {', '.join(_eps(e, norms[name]) for e in values)}"
                        for name, values in robustness["eps"].items() if name in norms)
        pgd = next((row for row in robustness["attacks"] if row["name"] in ("pgd", "pgd-l2") and row["eps"] > 0
                    and row["purpose"] == "evaluation"), None)
        smoothed = next((row for row in robustness["attacks"] if row.get("smoothed_samples")), None)
        adaptive = c.get("protocol") == "adaptive"
        notes += [
            (f"<strong>Randomized smoothing</strong> (Cohen, Rosenfeld &amp; Kolter, ICML 2019), "
             + (f"CERTIFY with staged sampling: {_e(c.get('stopping_rule') or '')}; " if adaptive else "CERTIFY with ")
             + f"σ = {_num(c['sigma'])}, n0 = {c['n0']} selection samples, n {'≤' if adaptive else '='} {c['n']:,} "
             f"estimation samples, α = {_e(_sci(c['alpha']))} on {c['num_samples']} images: p_A is the one-sided "
             + ("Clopper–Pearson lower bound at α / (number of looks) at each look (the largest one seen; all hold "
                "together with probability ≥ 1 − α), " if adaptive else
                "(1 − α) Clopper–Pearson lower bound, ")
             + f"radius σ·Φ⁻¹(p_A); largest certifiable radius = {_num(c['max_certifiable_radius'])}."),
            f"<strong>Attacks</strong> (torchattacks 3.3), ε on [0, 1] images: {_e(eps)}"
            + (f"; PGD {pgd['steps']} steps of 2.5·ε/steps, {pgd['restarts']} restart(s)" if pgd else "")
            + ". Minimum-norm attacks (DeepFool, CW) run once; at each ε an image counts as broken only if they "
              "fooled the model with a perturbation of L2 norm ≤ ε. Worst case: per image, over every attack of the "
              "norm within ε. Sanity checks: ε = 0 equals clean accuracy (exactly); robust accuracy not rising in "
              "ε, PGD not weaker than FGSM, more steps not weaker, each compared on the same images and failed only "
              "when an exact one-sided sign test on the images where the two runs disagree rejects at a "
              "family-wise level of 0.05 (Bonferroni over the comparisons).",
        ]
        if smoothed:
            notes.append(f"<strong>Smoothed classifier under attack</strong>: PREDICT with n = "
                         f"{smoothed['smoothed_samples']}, α = {_e(_sci(smoothed['smoothed_alpha']))} on the first "
                         f"{smoothed['smoothed_n']} attacked images (transfer attacks on the base model).")
    if fairness["assessed"]:
        p = fairness["params"]
        definitions = next(iter((fairness["attributes"] or fairness["federated"]["attributes"]).values()))["params"]
        notes += [
            (f"<strong>Fairness</strong>: {_e(definitions['method'])}; seed {p['seed']}; "
             f"minimum group size {p['min_group_size']}; {_e(definitions['flag_rule'])}; reference: "
             f"{_e(definitions['reference_rule'])}; positive class '{_e(definitions['positive_class'])}'."),
            "<strong>Metric definitions</strong>: " + "; ".join(
                f"{_e(METRIC_LABELS.get(k, k))}: {_e(v)}" for k, v in definitions["definitions"].items()) + ".",
        ]
    if privacy["assessed"]:
        notes.append(f"<strong>Privacy accounting</strong>: {_e(privacy.get('method') or '')}.")
        if privacy["membership_inference"]:
            attack = privacy["membership_inference"]
            notes.append(f"<strong>Membership inference</strong>: {_e(attack['method'])}; δ = "
                         f"{_e(_sci(attack['delta']))}; both bounds hold together with probability ≥ "
                         f"{_pct(attack.get('joint_confidence', 2 * attack['confidence'] - 1))}.")
    notes.append(
        "<strong>Findings</strong>: performance is flagged when the lower end of its interval does not exceed the "
        "majority-class rate; privacy accounting when a site spent more than its budget or trained without DP; "
        "membership inference when the empirical ε lower bound exceeds the claimed ε; certified robustness when "
        "the smoothed classifier's accuracy interval does not clear the majority-class rate, or a stated "
        "requirement (--require-certified) is not met, and informational without a requirement; attacks when a "
        "sanity check fails, informational otherwise; fairness when a "
        f"judged group is outside the ratio bounds. Fewer than {MIN_SAMPLES} samples (images) is insufficient data.")
    return _section("methods", "<ul>" + "".join(f"<li>{n}</li>" for n in notes) + "</ul>")


# ---------------------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------------------
def _new_figure(width: float = 7.0, height: float = 3.0):
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=110, layout="constrained")
    return figure


def _style(ax, xlabel: str, ylabel: str, ylim: tuple[float, float] | None = (0, 1.02)) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if ylim:
        ax.set_ylim(*ylim)
    ax.grid(True, alpha=0.3)
    ax.spines[["top", "right"]].set_visible(False)


def _errors(values: Sequence[float | None], intervals: Sequence[Sequence[float] | None]):
    """Error-bar lengths (below, above) for matplotlib; 0 where a value or interval is missing, and where a
    percentile-bootstrap interval does not contain its point value (it need not) the bar stops at the value."""
    below = [max(v - ci[0], 0.0) if v is not None and ci else 0.0 for v, ci in zip(values, intervals)]
    above = [max(ci[1] - v, 0.0) if v is not None and ci else 0.0 for v, ci in zip(values, intervals)]
    return [below, above]


def _rounds_figure(rounds: Sequence[Mapping[str, Any]]):
    figure = _new_figure(7.0, 2.8)
    ax = figure.add_subplot()
    for key in ("central", "federated"):
        points = [(r["round"], r[f"{key}_accuracy"], r[f"{key}_ci"]) for r in rounds
                  if r[f"{key}_accuracy"] is not None]
        if not points:
            continue
        x, y, ci = zip(*points)
        ax.plot(x, y, marker="o", color=COLOURS[key], label=key)
        ax.fill_between(x, [c[0] for c in ci], [c[1] for c in ci], color=COLOURS[key], alpha=0.15)
    ax.set_xticks([r["round"] for r in rounds])
    _style(ax, "round", "accuracy")
    ax.legend(loc="lower right", frameon=False)
    return figure


def _roc_figure(attack: Mapping[str, Any]):
    figure = _new_figure(3.6, 3.4)
    ax = figure.add_subplot()
    ax.plot([0, 1], [0, 1], color="#999999", linestyle="--", linewidth=1, label="guessing")
    ax.plot(attack["roc"]["fpr"], attack["roc"]["tpr"], color=COLOURS["fpr"], linewidth=2,
            label=f"attack (AUC {attack['auc']:.3f})")
    ax.plot([attack["fpr"]], [attack["tpr"]], "o", color="black", label="chosen threshold")
    ax.set_xlim(0, 1)
    ax.set_aspect("equal")
    _style(ax, "false-positive rate", "true-positive rate")
    ax.legend(loc="lower right", frameon=False, fontsize=8)
    return figure


def _certification_protocol(c: Mapping[str, Any]) -> str:
    samples = c.get("samples_per_image")
    spent = f" Samples per image (n0 included): mean {samples['mean']:,.0f}, max {samples['max']:,}." if samples else ""
    if c.get("protocol") == "adaptive":
        return (f"Adaptive CERTIFY: σ = {c['sigma']:g}, n0 = {c['n0']}, at most n = {c['n']:,} estimation samples "
                f"per image, α = {c['alpha']:g} over all looks ({c.get('stopping_rule') or ''}).{spent} The largest "
                f"radius this n can certify is {c['max_certifiable_radius']:.3f}.")
    return (f"CERTIFY with a fixed n: σ = {c['sigma']:g}, n0 = {c['n0']}, n = {c['n']:,}, α = {c['alpha']:g}.{spent} "
            f"The largest radius n samples can certify is {c['max_certifiable_radius']:.3f}.")


def _certified_figure(certification: Mapping[str, Any], level: str):
    figure = _new_figure(4.2, 3.0)
    ax = figure.add_subplot()
    radii = [float(r) for r in certification["certified_accuracy"]]
    values = list(certification["certified_accuracy"].values())
    intervals = list(certification["certified_accuracy_ci"].values())
    ax.errorbar(radii, values, yerr=_errors(values, intervals), marker="o", capsize=3, color=COLOURS["accuracy"],
                label=f"certified accuracy ({level} CI)")
    ceiling = certification["max_certifiable_radius"]
    ax.axvline(ceiling, color="#999999", linestyle="--", linewidth=1, label="largest certifiable radius")
    if radii and max(radii) > ceiling:
        ax.axvspan(ceiling, max(radii) * 1.05, color="#999999", alpha=0.15, linewidth=0)
    _style(ax, "L2 radius r", "certified accuracy")
    ax.legend(loc="upper right", frameon=False, fontsize=8)
    return figure


def _attacks_figure(rows: Sequence[Mapping[str, Any]], level: str):
    norms = [n for n in ("Linf", "L2") if any(r["norm"] == n for r in rows)]
    figure = _new_figure(7.0, 3.0)
    axes = figure.subplots(1, max(len(norms), 1), squeeze=False)[0]
    for ax, norm in zip(axes, norms):
        names = list(dict.fromkeys(r["name"] for r in rows if r["norm"] == norm))
        for i, name in enumerate(names):
            points = sorted((r for r in rows if r["norm"] == norm and r["name"] == name), key=lambda r: r["eps"])
            x = [r["eps"] * 255 if norm == "Linf" else r["eps"] for r in points]
            y = [r["robust_accuracy"] for r in points]
            ax.errorbar(x, y, yerr=_errors(y, [r["robust_accuracy_ci"] for r in points]), capsize=2,
                        marker=ATTACK_MARKERS[i % len(ATTACK_MARKERS)], label=name, alpha=0.85)
        _style(ax, "ε × 255 (L∞)" if norm == "Linf" else "ε (L2)", f"robust accuracy ({level} CI)")
        ax.set_title(_norm(norm))
        ax.legend(frameon=False, fontsize=8)
    return figure


def _fairness_figure(table: Mapping[str, Any]):
    import numpy as np

    groups = [*table["groups"], "overall"]
    rows = [*table["groups"].values(), {**table["overall"], "sufficient": True}]
    metrics = list(METRIC_LABELS)
    flagged = {(f["group"], f["metric"]) for f in table["flags"]}
    figure = _new_figure(min(max(3.8, 1.0 + 0.8 * len(groups)), 9.0), 2.4)
    ax = figure.add_subplot()
    width = 0.8 / len(metrics)
    x = np.arange(len(groups))
    for j, m in enumerate(metrics):
        values = [row["metrics"][m]["value"] for row in rows]
        intervals = [row["metrics"][m]["ci"] for row in rows]
        heights = [0.0 if v is None else v for v in values]
        bars = ax.bar(x + (j - (len(metrics) - 1) / 2) * width, heights, width, color=COLOURS[m],
                      label=METRIC_LABELS[m], yerr=_errors(values, intervals), capsize=2,
                      error_kw={"elinewidth": 0.8, "ecolor": "#333333"})
        for bar, group, row in zip(bars, groups, rows):
            if not row["sufficient"]:
                bar.set_color("#c8c8c8")
                bar.set_hatch("//")
                bar.set_edgecolor("#8c8c8c")
            if (group, m) in flagged:
                bar.set_edgecolor("#cf222e")
                bar.set_linewidth(2)
    ax.set_xticks(x, [f"★ {g}" if g == table["reference_group"] else f"{g}\n(n={row['count']})"
                      if not row["sufficient"] else g for g, row in zip(groups, rows)], fontsize=8)
    _style(ax, "", "")
    ax.legend(ncols=len(metrics), loc="upper center", bbox_to_anchor=(0.5, 1.16), frameon=False, fontsize=7.5,
              handlelength=1.2, columnspacing=1.0)
    return figure


def _figure(figure, alt: str, caption: str) -> str:
    buffer = io.BytesIO()
    # No Software tag: the PNG carries nothing but pixels (matplotlib writes its URL there by default).
    figure.savefig(buffer, format="png", metadata={"Software": None})
    encoded = base64.b64encode(buffer.getvalue()).decode("ascii")
    width, height = (round(v * figure.dpi) for v in figure.get_size_inches())
    # The figure is as wide as its image, so a long caption wraps instead of widening it.
    return (f'<figure style="width: {width}px"><img src="data:image/png;base64,{encoded}" width="{width}" '
            f'height="{height}" alt="{_e(alt)}"><figcaption>{_e(caption)}</figcaption></figure>')


# ---------------------------------------------------------------------------------------------------------
# Markup helpers
# ---------------------------------------------------------------------------------------------------------
def _e(value: Any) -> str:
    return value if isinstance(value, _Html) else html.escape(str(value), quote=True)


def _table(headers: Sequence[str], rows: Iterable[Sequence[Any]], row_classes: Sequence[str] | None = None,
           css: str = "") -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = []
    for i, row in enumerate(rows):
        cls = row_classes[i] if row_classes and row_classes[i] else ""
        cells = "".join(f"<td>{_e(cell)}</td>" for cell in row)
        body.append(f'<tr class="{cls}">{cells}</tr>' if cls else f"<tr>{cells}</tr>")
    return (f'<div class="scroll"><table class="{css}"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table></div>')


def _definition_list(items: Sequence[tuple[str, Any]]) -> str:
    return '<dl class="facts">' + "".join(f"<dt>{_e(k)}</dt><dd>{_e(_text(v))}</dd>" for k, v in items) + "</dl>"


def _details(summary: str, *body: str) -> str:
    return f"<details><summary>{_e(summary)}</summary>{''.join(body)}</details>"


def _notice(text: str) -> str:
    return f'<p class="notice">{_e(text)}</p>'


def _badge(status: str) -> _Html:
    return _Html(f'<span class="badge s-{_slug(status)}">{_e(status)}</span>')


def _slug(status: str) -> str:
    return status.replace(" ", "-")


def _text(value: Any) -> Any:
    return "—" if value is None or value == "" else value if isinstance(value, _Html) else str(value)


def _num(value: float | None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _sci(value: float | None) -> str:
    return "n/a" if value is None else f"{value:g}"


def _pct(value: float) -> str:
    return f"{value:.1%}"


def _level(confidence: float) -> str:
    return f"{confidence:.0%}"


def _interval(ci: Sequence[float] | None) -> str:
    return "n/a" if ci is None else f"{ci[0]:.3f}–{ci[1]:.3f}"


def _with_ci(value: float | None, ci: Sequence[float] | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else f"{value:.3f}"


def _yes_no(value: bool | None) -> str:
    return {True: "yes", False: "NO", None: "—"}[value]


def _norm(norm: str) -> str:
    return "L∞" if norm == "Linf" else norm


def _eps(eps: float, norm: str) -> str:
    if norm == "Linf" and eps and math.isclose(eps * 255, round(eps * 255)):
        return f"{round(eps * 255)}/255"
    return f"{eps:g}"


def _bounds(fairness: Mapping[str, Any]) -> str:
    tables = fairness["attributes"] or (fairness.get("federated") or {}).get("attributes", {})
    low, high = next(iter(tables.values()))["params"]["ratio_bounds"] if tables else (0.8, 1.25)
    return f"[{low:g}, {high:g}]"


def _smoothed(row: Mapping[str, Any]) -> str:
    if row.get("smoothed_robust_accuracy") is None:
        return "—"
    return (f"{row['smoothed_robust_accuracy']:.3f} (base {row['base_robust_accuracy_same_images']:.3f}; "
            f"{row['smoothed_n']} images)")


def _attack_params(row: Mapping[str, Any]) -> str:
    keys = ("steps", "alpha", "restarts", "c", "kappa", "lr", "overshoot", "version", "n_queries")
    text = ", ".join(f"{k} {row[k]:.3g}" if isinstance(row[k], float) else f"{k} {row[k]}"
                     for k in keys if row.get(k) is not None)
    purpose = "" if row["purpose"] == "evaluation" else f"{row['purpose']}; "
    return purpose + (text or "—")


def _audit_version(report: Mapping[str, Any]) -> str:
    return report["provenance"]["audit"]["versions"].get("fedvision", "?")


CSS = """
:root { --fg: #1f2328; --muted: #59636e; --line: #d1d9e0; --bg-soft: #f6f8fa;
        --pass: #1a7f37; --pass-bg: #dafbe1; --flag: #cf222e; --flag-bg: #ffebe9;
        --na: #59636e; --na-bg: #eaeef2; --insufficient: #9a6700; --insufficient-bg: #fff8c5; }
* { box-sizing: border-box; }
body { margin: 0; color: var(--fg); background: #fff; line-height: 1.45;
       font: 15px/1.45 -apple-system, "Segoe UI", "Helvetica Neue", Arial, sans-serif; }
header, main, footer { max-width: 1180px; margin: 0 auto; padding: 0 24px; }
header { padding-top: 24px; border-bottom: 1px solid var(--line); }
h1 { font-size: 26px; margin: 0 0 4px; }
h2 { font-size: 21px; margin: 36px 0 12px; padding-bottom: 4px; border-bottom: 2px solid var(--fg); }
h3 { font-size: 17px; margin: 24px 0 8px; }
h4 { font-size: 15px; margin: 18px 0 6px; }
h5 { font-size: 14px; margin: 14px 0 4px; }
.meta, .note, figcaption { color: var(--muted); font-size: 13px; }
nav { margin: 10px 0 14px; font-size: 14px; }
nav a { color: #0969da; text-decoration: none; }
code { font: 12.5px ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; background: var(--bg-soft);
       padding: 1px 4px; border-radius: 4px; word-break: break-all; }
.scroll { overflow-x: auto; margin: 8px 0 12px; }
table { border-collapse: collapse; font-size: 14px; min-width: 50%; }
th, td { border: 1px solid var(--line); padding: 5px 9px; text-align: left; vertical-align: top; }
th { background: var(--bg-soft); font-weight: 600; }
table.compact { font-size: 12.5px; }
table.compact th, table.compact td { padding: 3px 7px; }
table.numbers td { white-space: nowrap; }
table.findings { width: 100%; }
table.findings td:first-child { width: 1%; white-space: nowrap; }
table.findings td:nth-child(2) { white-space: nowrap; font-weight: 600; }
tr.row-flag td { background: var(--flag-bg); }
tr.row-insufficient-data td { background: var(--insufficient-bg); }
tr.row-not-assessed td { background: var(--na-bg); }
tr.row-pass td { background: #fff; }
tr.row-small td { color: #8c959f; background: #f6f8fa; }
tr.row-overall td { font-weight: 600; }
.badge { display: inline-block; padding: 1px 8px; border-radius: 10px; font-size: 12px; font-weight: 600;
         white-space: nowrap; border: 1px solid currentColor; }
.s-pass { color: var(--pass); background: var(--pass-bg); }
.s-flag { color: var(--flag); background: var(--flag-bg); }
.s-not-assessed { color: var(--na); background: var(--na-bg); }
.s-not-contradicted { color: var(--na); background: var(--na-bg); }
.s-informational { color: var(--na); background: var(--na-bg); }
.s-insufficient-data { color: var(--insufficient); background: var(--insufficient-bg); }
.tally .badge { margin-right: 2px; }
.flagged { color: var(--flag); font-weight: 600; }
.notice { background: var(--na-bg); border-left: 4px solid var(--na); padding: 8px 12px; }
.alert { background: var(--flag-bg); border-left: 4px solid var(--flag); padding: 8px 12px; color: #82071e; }
.ok { background: var(--pass-bg); border-left: 4px solid var(--pass); padding: 8px 12px; }
.headline { font-size: 15px; }
ul.flags { color: var(--flag); font-size: 13px; margin-top: 0; }
dl.facts { display: grid; grid-template-columns: max-content 1fr; gap: 3px 16px; margin: 8px 0 12px;
           font-size: 14px; }
dl.facts dt { color: var(--muted); }
dl.facts dd { margin: 0; overflow-wrap: anywhere; }
figure { margin: 10px 0 14px; max-width: 100%; }
figure img { max-width: 100%; height: auto; display: block; }
.pair { display: flex; flex-wrap: wrap; gap: 18px; align-items: flex-start; }
.pair > figure { flex: 0 1 auto; }
.pair > .scroll { flex: 0 0 auto; max-width: 100%; }
.pair > dl { flex: 1 1 320px; }
details { margin: 10px 0; }
summary { cursor: pointer; color: #0969da; }
footer { margin-top: 40px; padding-top: 12px; padding-bottom: 32px; border-top: 1px solid var(--line);
         color: var(--muted); font-size: 13px; }
@media print { nav { display: none; } h2 { break-after: avoid; } figure, table { break-inside: avoid; } }
"""
