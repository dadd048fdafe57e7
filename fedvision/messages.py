"""What a site and the coordinator say to each other: one schema per message, used by both sides.

A site builds its replies with ``to_record``; the coordinator reads every reply with ``from_record``, which
checks it against the schema (record types, keys, value types and ranges, array and table shapes) and raises
``MalformedReply`` naming what is wrong. The coordinator records a malformed reply as rejected for its site;
it never ends the run. Every value listed here is one a site releases: docs/privacy.md says how private each is.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedvision.errors import MalformedReply


@dataclass(frozen=True)
class Metric:
    """One metric key: its type (int or float), the range it must lie in, and that range in words."""
    kind: type
    valid: Callable[[float], bool]
    expected: str


_count = Metric(int, lambda v: v >= 0, "an integer ≥ 0")
_flag = Metric(int, lambda v: v in (0, 1), "0 or 1")
_non_negative = Metric(float, lambda v: v >= 0, "a finite number ≥ 0")

# A train reply's own metrics.
TRAIN_METRICS = {
    "num-examples": Metric(int, lambda v: v >= 1, "an integer ≥ 1"),
    "train-seconds": _non_negative,
    "steps": _count,
    "dp": _flag,
}
# What a DP site's ledger says, cumulative over the site's life: sent with every DP train reply (all keys) and
# with a refusal (those the ledger has), so the run record shows what each site has spent.
PRIVACY_METRICS = {
    "epsilon": _non_negative,
    "epsilon-rdp": _non_negative,
    "delta": Metric(float, lambda v: 0 < v < 1, "in (0, 1)"),
    "epsilon-budget": Metric(float, lambda v: v > 0, "a finite number > 0"),
    "noise-multiplier": _non_negative,
    "sample-rate": Metric(float, lambda v: 0 < v <= 1, "in (0, 1]"),
    "steps-total": _count,
}
TRAIN_DP_METRICS = {**PRIVACY_METRICS, "secret-randomness": _flag}
EVALUATE_METRICS = {
    "num-examples": _count,
    "accuracy": Metric(float, lambda v: 0 <= v <= 1, "in [0, 1]"),
    "count-noise-std": _non_negative,
    "exact-evaluation": _flag,
}
EVALUATE_OPTIONAL = {"epsilon-evaluation": _non_negative}  # absent when the counts were released exactly


# ---------------------------------------------------------------------------------------------------------
# Messages
# ---------------------------------------------------------------------------------------------------------
@dataclass
class Refusal:
    """A site declines a round (its policy, its budget, unusable local data), with a one-line reason and what
    its ledger says it has spent so far."""
    site: str
    reason: str
    privacy: dict[str, float] = field(default_factory=dict)

    def to_record(self) -> RecordDict:
        return RecordDict({"refusal": ConfigRecord({"site": self.site, "reason": self.reason}),
                           "privacy": MetricRecord(dict(self.privacy))})

    @classmethod
    def from_record(cls, content: RecordDict) -> "Refusal":
        refusal = _config(content, "refusal", {"site", "reason"})
        privacy = _metrics(content, "privacy", {}, optional=PRIVACY_METRICS) if "privacy" in content else {}
        return cls(site=_name(refusal["site"]), reason=str(refusal["reason"]), privacy=privacy)


@dataclass
class TrainReply:
    """A round of local training: the new weights and the metrics of ``TRAIN_METRICS`` (plus
    ``TRAIN_DP_METRICS`` when the site trained with DP). ``refusal`` and ``error`` are the coordinator's record of a
    site that declined, failed or sent a malformed reply (never sent)."""
    site: str
    arrays: dict[str, Any] | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    refusal: str | None = None
    error: str | None = None
    rejected: str | None = None  # the reply broke its schema

    def to_record(self) -> RecordDict:
        return RecordDict({"arrays": ArrayRecord(self.arrays), "metrics": MetricRecord(dict(self.metrics)),
                           "site": ConfigRecord({"name": self.site})})

    @classmethod
    def from_record(cls, content: RecordDict) -> "TrainReply":
        """A reply of either kind: a refusal becomes a TrainReply with ``refusal`` set."""
        if "refusal" in content:
            refusal = Refusal.from_record(content)
            return cls(site=refusal.site, metrics=refusal.privacy, refusal=refusal.reason)
        _only(content, {"arrays", "metrics", "site"})
        site = _name(_config(content, "site", {"name"})["name"])
        sent = content["metrics"] if isinstance(content["metrics"], MetricRecord) else {}
        dp = sent.get("dp") == 1  # a DP reply must also carry every key of TRAIN_DP_METRICS
        metrics = _metrics(content, "metrics", {**TRAIN_METRICS, **(TRAIN_DP_METRICS if dp else {})})
        record = content["arrays"]
        if not isinstance(record, ArrayRecord):
            raise MalformedReply("'arrays' is not an ArrayRecord")
        try:
            arrays = {k: a.numpy() for k, a in record.items()}
        except Exception as e:  # a payload that does not deserialise is the site's fault, not the run's
            raise MalformedReply(f"'arrays' cannot be read as arrays ({type(e).__name__})") from None
        return cls(site=site, arrays=arrays, metrics=metrics)


@dataclass
class EvaluateReply:
    """Local evaluation: ``EVALUATE_METRICS``, the class names, and per-group confusion counts (noisy unless the
    site releases exact counts): {attribute: {group: K×K counts}}."""
    site: str
    metrics: dict[str, float] = field(default_factory=dict)
    groups: dict[str, dict[str, list[list[float]]]] = field(default_factory=dict)
    classes: list[str] = field(default_factory=list)
    error: str | None = None
    rejected: str | None = None  # the reply broke its schema

    def to_record(self) -> RecordDict:
        return RecordDict({"metrics": MetricRecord(dict(self.metrics)),
                           "site": ConfigRecord({"name": self.site, "groups": json.dumps(self.groups),
                                                 "classes": json.dumps(self.classes)})})

    @classmethod
    def from_release(cls, site: str, release: Mapping[str, Any]) -> "EvaluateReply":
        """The reply for ``fedvision.site.Site.evaluate``'s release."""
        metrics = {k: v for k, v in release.items() if k in EVALUATE_METRICS or k in EVALUATE_OPTIONAL}
        return cls(site=site, metrics=metrics, groups=release.get("groups", {}), classes=release.get("classes", []))

    @classmethod
    def from_record(cls, content: RecordDict, classes: list[str] | None = None) -> "EvaluateReply":
        """A reply of either kind (a refusal becomes an EvaluateReply with ``error`` set); ``classes``, when
        given, are the run's class names, which the site's must equal."""
        if "refusal" in content:
            refusal = Refusal.from_record(content)
            return cls(site=refusal.site, error=refusal.reason)
        _only(content, {"metrics", "site"})
        site = _config(content, "site", {"name", "groups", "classes"})
        name = _name(site["name"])
        metrics = _metrics(content, "metrics", EVALUATE_METRICS, optional=EVALUATE_OPTIONAL)
        try:
            sent_classes, groups = json.loads(site["classes"]), json.loads(site["groups"])
        except (TypeError, json.JSONDecodeError):
            raise MalformedReply("'site.groups' or 'site.classes' is not JSON") from None
        if not isinstance(sent_classes, list) or not all(isinstance(c, str) for c in sent_classes):
            raise MalformedReply("'site.classes' is not a list of class names")
        if classes is not None and sent_classes and list(sent_classes) != list(classes):
            raise MalformedReply(f"classes {sent_classes} differ from the run's {list(classes)}")
        k = len(classes if classes is not None else sent_classes)
        return cls(site=name, metrics=metrics, groups=_tables(groups, k), classes=list(sent_classes))


# ---------------------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------------------
def _only(content: RecordDict, keys: set[str]) -> None:
    missing, extra = sorted(keys - set(content)), sorted(set(content) - keys)
    if missing or extra:
        raise MalformedReply(_difference("record", missing, extra))


def _config(content: RecordDict, key: str, keys: set[str]) -> Mapping[str, Any]:
    record = content[key] if key in content else None
    if not isinstance(record, ConfigRecord):
        raise MalformedReply(f"'{key}' is missing or not a ConfigRecord")
    if missing := sorted(keys - set(record)):
        raise MalformedReply(_difference(f"'{key}'", missing, []))
    return record


def _metrics(content: RecordDict, key: str, required: Mapping[str, Metric],
             optional: Mapping[str, Metric] | None = None) -> dict[str, float]:
    """The MetricRecord ``content[key]`` as a dict, if it has every required key, no key outside required and
    optional, and every value of its key's type and range."""
    record = content[key] if key in content else None
    if not isinstance(record, MetricRecord):
        raise MalformedReply(f"'{key}' is missing or not a MetricRecord")
    optional = optional or {}
    allowed = {**optional, **required}
    missing, extra = sorted(set(required) - set(record)), sorted(set(record) - set(allowed))
    if missing or extra:
        raise MalformedReply(_difference(f"'{key}'", missing, extra))
    out = {}
    for name, value in record.items():
        spec = allowed[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise MalformedReply(f"'{key}.{name}' is {value!r}, expected {spec.expected}")
        if spec.kind is int and value != int(value):
            raise MalformedReply(f"'{key}.{name}' is {value!r}, expected {spec.expected}")
        if not spec.valid(value):
            raise MalformedReply(f"'{key}.{name}' is {value!r}, expected {spec.expected}")
        out[name] = spec.kind(value)
    return out


def _tables(groups: Any, k: int) -> dict[str, dict[str, list[list[float]]]]:
    """{attribute: {group: K×K finite counts}}, or MalformedReply naming the first table that is not."""
    if not isinstance(groups, dict):
        raise MalformedReply("'site.groups' is not a mapping of attribute → group → counts")
    for attribute, by_group in groups.items():
        if not isinstance(by_group, dict):
            raise MalformedReply(f"'site.groups.{attribute}' is not a mapping of group → counts")
        for group, counts in by_group.items():
            try:
                table = np.asarray(counts, dtype=float)
            except (TypeError, ValueError):
                table = None
            if table is None or table.shape != (k, k) or not np.isfinite(table).all():
                raise MalformedReply(f"'site.groups.{attribute}.{group}' is not a {k}×{k} table of finite counts")
    return groups


def _name(value: Any) -> str:
    name = str(value)
    if not name or len(name) > 128 or not name.isprintable():
        raise MalformedReply("the site name is empty, longer than 128 characters or not printable")
    return name


def _difference(what: str, missing: list[str], extra: list[str]) -> str:
    parts = ([f"missing {', '.join(missing[:5])}"] if missing else []) + \
            ([f"unexpected {', '.join(extra[:5])}"] if extra else [])
    return f"{what} keys: " + "; ".join(parts)
