"""``report.html``: the compliance report as one self-contained page for people to read, print and archive.

The layout is a model card (Mitchell et al., 2019) in the order a reviewer asks: the findings first, then model
details, intended use and limitations, data provenance, privacy, robustness, fairness and the method notes.
The page is written in Jinja2 templates (``audit/templates/report.html`` and one template per section); this
module only prepares what they cannot: the figures and the number formats.

Self-contained by construction: inline CSS, figures as inline PNG (matplotlib's Agg renderer through
``matplotlib.figure.Figure``, which leaves the process-wide backend alone), no script, no external URL. The file
can be mailed, archived and opened offline years later, and it shows exactly what was audited. The templates
are rendered with autoescaping: group names, site names, file paths and reasons are data, and data must never
become markup; nothing from the report is marked safe.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape

from audit import MIN_SAMPLES
from audit.findings import STATUS_ORDER, confidence_level, eps_label, interval, norm_label

INTERSECTION = "\u00d7"  # as fedvision.groups names an intersection of two attributes ("sex×site")
METRIC_LABELS = {"accuracy": "accuracy", "recall": "recall", "fpr": "FPR", "selection_rate": "selection rate"}
# Okabe–Ito colours: distinguishable with the common colour-vision deficiencies.
COLOURS = {"accuracy": "#0072B2", "recall": "#009E73", "fpr": "#D55E00", "selection_rate": "#CC79A7",
           "central": "#0072B2", "federated": "#E69F00", "Linf": "#0072B2", "L2": "#D55E00"}
ATTACK_MARKERS = "osD^v<>"


def render_html(report: Mapping[str, Any]) -> str:
    """The page for ``report`` (a dict as ``audit.report.build_report`` returns it)."""
    return _ENVIRONMENT.get_template("report.html").render(report=report)


# ---------------------------------------------------------------------------------------------------------
# Number formats (template filters)
# ---------------------------------------------------------------------------------------------------------
def _text(value: Any) -> Any:
    return "—" if value is None or value == "" else value


def _num(value: float | None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _sci(value: float | None) -> str:
    return "n/a" if value is None else f"{value:g}"


def _with_ci(value: float | None, ci: Sequence[float] | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else f"{value:.3f}"


def _environment() -> Environment:
    env = Environment(loader=FileSystemLoader(Path(__file__).resolve().parent / "templates"),
                      autoescape=select_autoescape(["html"]), undefined=StrictUndefined, trim_blocks=True,
                      lstrip_blocks=True, keep_trailing_newline=True)
    env.filters.update(
        text=_text, num=_num, sci=_sci, with_ci=_with_ci, interval=interval, level=confidence_level,
        pct=lambda value: f"{value:.1%}", fmt=format, norm=norm_label, eps=eps_label,
        yes_no=lambda value: {True: "yes", False: "NO", None: "—"}[value], slug=lambda s: s.replace(" ", "-"))
    env.tests["intersection"] = lambda name: INTERSECTION in name
    env.globals.update(
        STATUS_ORDER=STATUS_ORDER, METRIC_LABELS=METRIC_LABELS, MIN_SAMPLES=MIN_SAMPLES,
        rounds_figure=_rounds_figure, roc_figure=_roc_figure, certified_figure=_certified_figure,
        attacks_figure=_attacks_figure, fairness_figure=_fairness_figure)
    return env


# ---------------------------------------------------------------------------------------------------------
# Figures (template globals): each returns an inline PNG
# ---------------------------------------------------------------------------------------------------------
class Png(NamedTuple):
    src: str  # a data: URL
    width: int  # pixels
    height: int


def _png(figure) -> Png:
    buffer = io.BytesIO()
    # No Software tag: the PNG carries nothing but pixels (matplotlib writes its URL there by default).
    figure.savefig(buffer, format="png", metadata={"Software": None})
    encoded = base64.b64encode(buffer.getvalue()).decode("ascii")
    width, height = (round(v * figure.dpi) for v in figure.get_size_inches())
    return Png(f"data:image/png;base64,{encoded}", width, height)


def _new_figure(width: float = 7.0, height: float = 3.0):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=110, layout="constrained")


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


def _rounds_figure(rounds: Sequence[Mapping[str, Any]]) -> Png:
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
    return _png(figure)


def _roc_figure(attack: Mapping[str, Any]) -> Png:
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
    return _png(figure)


def _certified_figure(certification: Mapping[str, Any], level: str) -> Png:
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
    return _png(figure)


def _attacks_figure(rows: Sequence[Mapping[str, Any]], level: str) -> Png:
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
        ax.set_title(norm_label(norm))
        ax.legend(frameon=False, fontsize=8)
    return _png(figure)


def _fairness_figure(table: Mapping[str, Any]) -> Png:
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
    return _png(figure)


_ENVIRONMENT = _environment()
