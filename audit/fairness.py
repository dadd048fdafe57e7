"""The fairness part of the audit: per-group performance with confidence intervals, disparities and flags.

A regulator reading a medical-imaging audit asks how the model performs for each sex, age band, skin tone and
site, how sure those numbers are, and which groups it serves markedly worse (FDA GMLP; EU AI Act Art. 10/15).
``assess_fairness`` answers from pooled predictions; ``assess_fairness_from_confusion`` answers from the
per-group confusion counts a federation collects (no image leaves its site) and gives the same table, number
for number, because everything here is a function of each group's confusion matrix:

* point values are fairlearn ``MetricFrame`` values (metric functions below, all computed from the confusion
  matrix of the group's samples);
* confidence intervals are percentile bootstrap intervals, resampling the group's confusion-matrix cells
  (multinomial with the group's own proportions: the same as resampling its samples with replacement), from a
  numpy Generator seeded by (seed, attribute, group), so the order of samples and sites does not matter;
* the federated path rebuilds the samples a confusion matrix stands for (exact: the metrics only count).

Metrics (``positive class`` = the last class, e.g. ``malignant``; class 1 of a binary task):

* ``accuracy``: share predicted correctly.
* ``recall``: binary: TPR of the positive class; multi-class: macro-averaged recall over the classes present
  in the group (sklearn's ``balanced_accuracy_score``).
* ``fpr``: binary: FP / (FP + TN); multi-class: one-vs-rest FPR averaged over the classes that have negatives.
* ``selection_rate``: share predicted as the positive class (fairlearn's ``selection_rate``).

Groups smaller than ``min_group_size`` keep their point values and intervals but are never judged: no flags,
not in differences, ratios or disparities. Among the others, the reference group is the one with the best
accuracy; a group is flagged for accuracy, recall or FPR when its ratio to the reference group lies outside
``ratio_bounds`` in either direction (the four-fifths rule as Aequitas applies it, [0.8, 1.25]). Selection
rate is reported but not flagged: in diagnosis, base rates legitimately differ between groups.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from audit.intervals import percentile_interval
from fedvision.errors import ConfigError, DataError
from fedvision.groups import INTERSECTION, group_labels, group_sort_key

METRICS = ("accuracy", "recall", "fpr", "selection_rate")
JUDGED = {"accuracy": "higher", "recall": "higher", "fpr": "lower"}  # metric → which direction is better
DEFINITIONS = {
    "accuracy": "share predicted correctly",
    "recall": "binary: TPR of the positive class; multi-class: macro recall over the classes present in the group",
    "fpr": "binary: FP/(FP+TN); multi-class: one-vs-rest FPR averaged over the classes with negatives",
    "selection_rate": "share predicted as the positive class (the last class)",
}


@dataclass(frozen=True)
class _Options:
    min_group_size: int
    ratio_bounds: tuple[float, float]
    n_boot: int
    confidence: float
    seed: int
    intersections: bool
    count_noise_std: float = 0.0  # std of the DP noise on each count (federated counts released with DP)


# ---------------------------------------------------------------------------------------------------------
# Public entry points
# ---------------------------------------------------------------------------------------------------------
def assess_fairness(y_true: Sequence, y_pred: Sequence, sensitive_features: pd.DataFrame | Mapping[str, Sequence],
                    *, min_group_size: int = 30, ratio_bounds: tuple[float, float] = (0.8, 1.25), n_boot: int = 200,
                    confidence: float = 0.95, seed: int = 0, intersections: bool = True,
                    labels: Sequence | None = None, class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """Per attribute (each column, and each pair ``"a×b"`` when ``intersections``), the fairness table.

    ``labels``: the class values in order (default: the sorted values seen); the last is the positive class.
    ``class_names``: how classes are named in the result (default ``str(label)``).
    """
    options = _options(min_group_size, ratio_bounds, n_boot, confidence, seed, intersections)
    true_index, pred_index, names = _encode(y_true, y_pred, labels, class_names)
    columns = _columns(sensitive_features, len(true_index))
    return {attribute: _attribute_table(attribute, true_index, pred_index, groups, names, options)
            for attribute, groups in group_labels(columns, options.intersections).items()}


def assess_fairness_from_confusion(group_confusion: Mapping[str, Mapping[str, Any]], classes: Sequence[str], *,
                                   min_group_size: int = 30, ratio_bounds: tuple[float, float] = (0.8, 1.25),
                                   n_boot: int = 200, confidence: float = 0.95, seed: int = 0,
                                   intersections: bool = True, count_noise_std: float = 0.0) -> dict[str, Any]:
    """The same table as ``assess_fairness``, from ``{attribute: {group: K×K counts (row = true class)}}``.

    That is run.json's ``rounds[-1]["evaluate"]["group_confusion"]`` with ``classes`` next to it. Intersections
    are whatever ``"a×b"`` attributes the sites counted; ``intersections=False`` leaves them out.
    ``count_noise_std`` > 0: the counts carry Gaussian DP noise of that std (``count_noise_std`` in run.json).
    They are then rounded and clipped at 0 (post-processing) for the point values, and every bootstrap resample
    adds fresh noise of the same std to each cell, so the intervals cover the DP noise as well as sampling.
    """
    options = _options(min_group_size, ratio_bounds, n_boot, confidence, seed, intersections)
    if not (isinstance(count_noise_std, (int, float)) and math.isfinite(count_noise_std) and count_noise_std >= 0):
        raise ConfigError(f"count_noise_std: must be a finite number ≥ 0, got {count_noise_std!r}")
    options = _Options(**{**options.__dict__, "count_noise_std": float(count_noise_std)})
    names = [str(c) for c in classes]
    if len(names) < 2:
        raise DataError(f"classes: need at least two class names, got {names}")
    if not isinstance(group_confusion, Mapping) or not group_confusion:
        raise DataError("group_confusion: empty (no per-group confusion counts were recorded)")
    tables = {}
    for attribute, by_group in group_confusion.items():
        if not options.intersections and INTERSECTION in str(attribute):
            continue
        true_index, pred_index, groups = _samples_from_counts(str(attribute), by_group, len(names),
                                                              noisy=options.count_noise_std > 0)
        if len(true_index):
            tables[str(attribute)] = _attribute_table(str(attribute), true_index, pred_index, groups, names, options)
    return tables


def confusion_metrics(cm: np.ndarray) -> dict[str, np.ndarray]:
    """Every metric from confusion matrices of shape (..., K, K) (row = true class); NaN where undefined."""
    cm = np.asarray(cm, dtype=float)
    k = cm.shape[-1]
    n = cm.sum(axis=(-2, -1))
    correct = np.diagonal(cm, axis1=-2, axis2=-1)
    support = cm.sum(axis=-1)  # true samples per class
    predicted = cm.sum(axis=-2)
    with np.errstate(invalid="ignore", divide="ignore"):
        accuracy = correct.sum(axis=-1) / n
        selection_rate = predicted[..., k - 1] / n
        if k == 2:
            recall = cm[..., 1, 1] / support[..., 1]
            fpr = cm[..., 0, 1] / support[..., 0]
        else:
            present = support > 0
            recall = np.where(present, correct / support, 0.0).sum(axis=-1) / present.sum(axis=-1)
            negatives = n[..., None] - support
            has_negatives = negatives > 0
            fpr = (np.where(has_negatives, (predicted - correct) / negatives, 0.0).sum(axis=-1)
                   / has_negatives.sum(axis=-1))
    return {"accuracy": accuracy, "recall": recall, "fpr": fpr, "selection_rate": selection_rate}


# ---------------------------------------------------------------------------------------------------------
# One attribute
# ---------------------------------------------------------------------------------------------------------
def _attribute_table(attribute: str, y_true: np.ndarray, y_pred: np.ndarray, groups: np.ndarray,
                     class_names: list[str], options: _Options) -> dict[str, Any]:
    from fairlearn.metrics import MetricFrame

    k = len(class_names)
    frame = MetricFrame(metrics=_metric_functions(k), y_true=y_true, y_pred=y_pred,
                        sensitive_features=pd.Series(groups, name=attribute))
    confusion = {g: _confusion(y_true[groups == g], y_pred[groups == g], k)
                 for g in sorted(set(groups.tolist()), key=group_sort_key)}
    table_groups = {}
    for g, cm in confusion.items():
        count = int(cm.sum())
        table_groups[g] = {"count": count, "sufficient": count >= options.min_group_size,
                           "metrics": _metric_block(frame.by_group.loc[g], cm, _rng(options.seed, attribute, g),
                                                    options)}
    total = sum(confusion.values())
    # The overall table sums every group's noisy counts: its noise std grows with √(number of groups).
    overall_options = _Options(**{**options.__dict__,
                                  "count_noise_std": options.count_noise_std * math.sqrt(len(confusion))})
    overall = {"count": int(total.sum()),
               "metrics": _metric_block(frame.overall, total, _rng(options.seed, "overall"), overall_options)}
    sufficient = [g for g, row in table_groups.items() if row["sufficient"]]
    values = {g: {m: table_groups[g]["metrics"][m]["value"] for m in METRICS} for g in sufficient}
    reference = max(sufficient, key=lambda g: values[g]["accuracy"], default=None)
    differences, ratios = _spread(values)
    if k == 2:
        disparity = _binary_disparity(y_true, y_pred, groups, sufficient)
    else:
        disparity = _per_class_recall_disparity(confusion, sufficient, class_names)
    return {
        "groups": table_groups,
        "overall": overall,
        "reference_group": reference,
        "differences": differences,
        "ratios": ratios,
        "disparity": disparity,
        "flags": _flags(values, reference, options.ratio_bounds, table_groups),
        "insufficient": [g for g, row in table_groups.items() if not row["sufficient"]],
        "params": _params(options, class_names),
    }


def _metric_functions(k: int) -> dict[str, Any]:
    def metric(name: str):
        return lambda y_true, y_pred: float(confusion_metrics(_confusion(y_true, y_pred, k))[name])

    return {name: metric(name) for name in METRICS}


def _confusion(y_true: Any, y_pred: Any, k: int) -> np.ndarray:
    cm = np.zeros((k, k), dtype=np.int64)
    np.add.at(cm, (np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)), 1)
    return cm


def _metric_block(point: pd.Series, cm: np.ndarray, rng: np.random.Generator, options: _Options) -> dict:
    intervals = _bootstrap(cm, rng, options.n_boot, options.confidence, options.count_noise_std)
    return {m: {"value": _number(point[m]), "ci": intervals[m]} for m in METRICS}


def _bootstrap(cm: np.ndarray, rng: np.random.Generator, n_boot: int, confidence: float,
               noise_std: float = 0.0) -> dict[str, list | None]:
    """Percentile intervals from ``n_boot`` multinomial resamples of the confusion-matrix cells, each with fresh
    Gaussian noise of ``noise_std`` per cell added (counts released with DP). Resamples in which a metric is
    undefined (e.g. no positives drawn, for recall) are left out of that metric's interval."""
    n = int(cm.sum())
    if n_boot == 0 or n == 0:
        return {m: None for m in METRICS}
    k = cm.shape[0]
    draws = rng.multinomial(n, cm.ravel() / n, size=n_boot).reshape(n_boot, k, k).astype(float)
    if noise_std > 0:
        draws = np.clip(draws + rng.normal(0.0, noise_std, draws.shape), 0.0, None)
    return {m: percentile_interval(replicates, confidence) for m, replicates in confusion_metrics(draws).items()}


def _rng(seed: int, *names: str) -> np.random.Generator:
    # crc32, unlike hash(), is the same in every process: the federated and pooled tables must match.
    return np.random.default_rng([seed, *(zlib.crc32(n.encode()) for n in names)])


def _spread(values: dict[str, dict[str, float | None]]) -> tuple[dict, dict]:
    """max − min and min / max of each metric over the (sufficient) groups where it is defined."""
    differences, ratios = {}, {}
    for m in METRICS:
        defined = [v[m] for v in values.values() if v[m] is not None]
        low, high = (min(defined), max(defined)) if defined else (None, None)
        differences[m] = None if high is None else high - low
        ratios[m] = low / high if high else None
    return differences, ratios


def _flags(values: dict[str, dict[str, float | None]], reference: str | None,
           bounds: tuple[float, float], table_groups: dict[str, Any]) -> list[dict[str, Any]]:
    """Four-fifths-rule flags on point values. ``outside_with_ci`` says whether the group's whole bootstrap
    interval lies outside [low, high] × the reference's value, i.e. whether resampling the group could not
    bring it back within the bounds (the reference's own uncertainty is not included)."""
    if reference is None:
        return []
    low, high = bounds
    flags = []
    for g, row in values.items():
        if g == reference:
            continue
        for m, better in JUDGED.items():
            value, ref = row[m], values[reference][m]
            if value is None or ref is None or value == ref:
                continue
            ratio = value / ref if ref else None
            if ratio is not None and low <= ratio <= high:
                continue
            direction = "worse" if ((value < ref) if better == "higher" else (value > ref)) else "better"
            comparison = (f"is {ratio:.2f}× the {ref:.3f} of reference group {reference}" if ratio is not None else
                          f"against 0 in reference group {reference} (no finite ratio)")
            ci = table_groups[g]["metrics"][m]["ci"]
            outside_with_ci = bool(ci) and (ci[1] < low * ref or ci[0] > high * ref)
            flags.append({"group": g, "metric": m, "value": value, "reference": ref, "ratio": ratio,
                          "direction": direction, "outside_with_ci": outside_with_ci,
                          "reason": f"{m} {value:.3f} {comparison}, outside [{low:g}, {high:g}] "
                                    f"({direction}; {better} is better)"})
    return flags


def _binary_disparity(y_true: np.ndarray, y_pred: np.ndarray, groups: np.ndarray,
                      sufficient: list[str]) -> dict[str, Any]:
    """fairlearn's demographic parity and equalized odds (worst case) over the sufficient groups' samples."""
    from fairlearn import metrics

    functions = {name: getattr(metrics, name) for name in ("demographic_parity_difference", "demographic_parity_ratio",
                                                           "equalized_odds_difference", "equalized_odds_ratio")}
    out: dict[str, Any] = {"groups_compared": sufficient}
    if len(sufficient) < 2:
        out.update({name: None for name in functions})
        out["note"] = "fewer than two groups with enough samples: nothing to compare"
        return out
    keep = np.isin(groups, sufficient)
    for name, function in functions.items():
        out[name] = _number(function(y_true[keep], y_pred[keep], sensitive_features=groups[keep]))
    one_class = [g for g in sufficient if len(set(y_true[groups == g].tolist())) < 2]
    if one_class:
        out["note"] = (f"{', '.join(one_class)}: only one true class, so TPR or FPR is undefined there and fairlearn "
                       "counts it as 0; equalized odds is then overstated")
    return out


def _per_class_recall_disparity(confusion: dict[str, np.ndarray], sufficient: list[str],
                                class_names: list[str]) -> dict[str, Any]:
    """Per class, the recall of the worst and best sufficient group that has samples of that class."""
    out = {}
    for c, name in enumerate(class_names):
        recall = {g: confusion[g][c, c] / confusion[g][c].sum() for g in sufficient if confusion[g][c].sum()}
        if not recall:
            out[name] = {"min_group": None, "max_group": None, "difference": None, "ratio": None}
            continue
        low, high = min(recall, key=recall.get), max(recall, key=recall.get)
        out[name] = {"min_group": low, "max_group": high, "difference": float(recall[high] - recall[low]),
                     "ratio": float(recall[low] / recall[high]) if recall[high] else None}
    return out


def _params(options: _Options, class_names: list[str]) -> dict[str, Any]:
    return {
        "min_group_size": options.min_group_size,
        "ratio_bounds": list(options.ratio_bounds),
        "n_boot": options.n_boot,
        "confidence": options.confidence,
        "seed": options.seed,
        "method": ("fairlearn MetricFrame point values; " + (
            f"percentile bootstrap CIs, B={options.n_boot}, {options.confidence:.0%}, multinomial resampling of "
            "each group's confusion matrix" if options.n_boot else "no CIs (n_boot=0)") + (
            f"; counts released with DP (Gaussian noise, std {options.count_noise_std:.3g} per cell): rounded and "
            "clipped at 0 for point values, fresh noise of that std added to every resample"
            if options.count_noise_std else "")),
        "task": "binary" if len(class_names) == 2 else "multi-class",
        "classes": class_names,
        "positive_class": class_names[-1],
        "reference_rule": "the sufficient group with the best accuracy",
        "flag_rule": (f"accuracy, recall, fpr: ratio to the reference group outside "
                      f"[{options.ratio_bounds[0]:g}, {options.ratio_bounds[1]:g}], either direction"),
        "definitions": DEFINITIONS,
    }


def _number(value: Any) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


# ---------------------------------------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------------------------------------
def _options(min_group_size: Any, ratio_bounds: Any, n_boot: Any, confidence: Any, seed: Any,
             intersections: Any) -> _Options:
    if not _is_int(min_group_size) or min_group_size < 1:
        raise ConfigError(f"min_group_size: must be an integer ≥ 1, got {min_group_size!r}")
    try:
        low, high = (float(b) for b in ratio_bounds)
    except (TypeError, ValueError):
        raise ConfigError(f"ratio_bounds: must be two numbers (low, high), got {ratio_bounds!r}") from None
    if not (math.isfinite(low) and math.isfinite(high) and 0 < low <= 1 <= high):
        raise ConfigError(f"ratio_bounds: must satisfy 0 < low ≤ 1 ≤ high, got {ratio_bounds!r}")
    if not _is_int(n_boot) or n_boot < 0:
        raise ConfigError(f"n_boot: must be an integer ≥ 0 (0 = no intervals), got {n_boot!r}")
    if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) or not 0 < confidence < 1:
        raise ConfigError(f"confidence: must be in (0, 1), got {confidence!r}")
    if not _is_int(seed) or seed < 0:
        raise ConfigError(f"seed: must be an integer ≥ 0, got {seed!r}")
    return _Options(int(min_group_size), (low, high), int(n_boot), float(confidence), int(seed), bool(intersections))


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _encode(y_true: Sequence, y_pred: Sequence, labels: Sequence | None,
            class_names: Sequence[str] | None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Labels as class indices 0..K−1 and the class names."""
    true_values, pred_values = _vector(y_true, "y_true"), _vector(y_pred, "y_pred")
    if len(true_values) == 0:
        raise DataError("y_true: empty; there is nothing to assess")
    if len(pred_values) != len(true_values):
        raise DataError(f"y_pred: {len(pred_values)} values, but y_true has {len(true_values)}")
    if labels is None:
        try:
            labels = sorted(set(true_values) | set(pred_values))
        except TypeError:
            raise DataError("y_true/y_pred: labels of mixed types cannot be ordered; pass labels=[...]") from None
    labels = list(labels)
    if len(set(labels)) != len(labels):
        raise ConfigError(f"labels: contains duplicates: {labels}")
    if len(labels) < 2:
        raise DataError(f"labels: need at least two classes, got {labels} (pass labels=[...] with every class)")
    names = [str(c) for c in (class_names if class_names is not None else labels)]
    if len(names) != len(labels):
        raise ConfigError(f"class_names: {len(names)} names for {len(labels)} labels")
    index = {value: i for i, value in enumerate(labels)}
    encoded = []
    for values, argument in ((true_values, "y_true"), (pred_values, "y_pred")):
        unknown = next((v for v in values if v not in index), None)
        if unknown is not None:
            raise DataError(f"{argument}: value {unknown!r} is not one of labels {labels}")
        encoded.append(np.array([index[v] for v in values], dtype=np.int64))
    return encoded[0], encoded[1], names


def _vector(values: Sequence, argument: str) -> list:
    array = np.asarray(values)
    if array.ndim != 1:
        raise DataError(f"{argument}: expected one label per sample (1-D), got shape {array.shape}")
    return array.tolist()


def _columns(sensitive_features: Any, n: int) -> dict[str, np.ndarray]:
    if isinstance(sensitive_features, pd.DataFrame):
        columns = {str(c): sensitive_features[c].to_numpy() for c in sensitive_features.columns}
    elif isinstance(sensitive_features, Mapping):
        columns = {str(c): np.asarray(v) for c, v in sensitive_features.items()}
    else:
        raise ConfigError("sensitive_features: expected a pandas DataFrame or a dict of column → values, "
                          f"got {type(sensitive_features).__name__}")
    if not columns:
        raise DataError("sensitive_features: no columns; name at least one attribute (e.g. sex)")
    for name, values in columns.items():
        if values.ndim != 1 or len(values) != n:
            raise DataError(f"sensitive_features[{name!r}]: {len(values) if values.ndim == 1 else values.shape} "
                            f"values, but y_true has {n}")
    return columns


def _samples_from_counts(attribute: str, by_group: Any, k: int,
                         noisy: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The (true, predicted, group) samples that the groups' confusion counts stand for; ``noisy`` counts (DP) are
    rounded and clipped at 0 first."""
    if not isinstance(by_group, Mapping):
        raise DataError(f"group_confusion[{attribute!r}]: expected {{group: K×K counts}}, got {type(by_group).__name__}")
    true_parts, pred_parts, group_parts = [], [], []
    for group, counts in by_group.items():
        where = f"group_confusion[{attribute!r}][{group!r}]"
        try:
            cm = np.asarray(counts, dtype=float)
        except (TypeError, ValueError):
            raise DataError(f"{where}: not a matrix of counts") from None
        if cm.shape != (k, k):
            raise DataError(f"{where}: shape {cm.shape}, expected ({k}, {k}) for {k} classes")
        if noisy and np.all(np.isfinite(cm)):
            cm = np.clip(np.round(cm), 0, None)
        if not np.all(np.isfinite(cm)) or np.any(cm < 0) or np.any(cm != np.round(cm)):
            raise DataError(f"{where}: counts must be non-negative integers")
        cells = np.repeat(np.arange(k * k), cm.astype(np.int64).ravel())
        true_parts.append(cells // k)
        pred_parts.append(cells % k)
        group_parts.append(np.full(len(cells), str(group), dtype=object))
    if not true_parts:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, dtype=object)
    return np.concatenate(true_parts), np.concatenate(pred_parts), np.concatenate(group_parts).astype(str)
