"""Splitting one dataset into simulated federation sites.

Schemes: ``iid`` (uniform random), ``dirichlet:ALPHA`` (label skew: each class is spread over the partitions
by Dirichlet(ALPHA) proportions; small ALPHA = strong skew), ``by:COLUMN`` (natural sites: one partition per
value of an attribute column). Every sample lands in exactly one partition; the result is a function of the
labels, the attributes and ``seed`` only.
"""

from __future__ import annotations

import re
from typing import Any, Iterable

import numpy as np
import pandas as pd

from fedvision.data.dataset import LoadedDataset
from fedvision.errors import DataError

SCHEMES = "iid, dirichlet:ALPHA, by:COLUMN"
_DIRICHLET_TRIES = 20  # redraws before falling back to moving samples into empty partitions


def partition(loaded: LoadedDataset, scheme: str, num_partitions: int, seed: int = 0) -> list[np.ndarray]:
    """Split ``loaded`` into ``num_partitions`` sorted index arrays according to ``scheme``."""
    if not isinstance(num_partitions, (int, np.integer)) or isinstance(num_partitions, bool) or num_partitions < 1:
        raise DataError(f"num_partitions must be a positive integer, got {num_partitions!r}")
    if not isinstance(scheme, str):
        raise DataError(f"partition scheme must be a string ({SCHEMES}), got {scheme!r}")
    kind, _, argument = scheme.strip().partition(":")
    n = len(loaded)
    if kind == "by":
        if not argument:
            raise DataError(f"partition scheme {scheme!r} needs a column: by:COLUMN")
        return _by_column(loaded.attributes, argument, num_partitions)
    if n < num_partitions:
        raise DataError(f"cannot split {n} samples into {num_partitions} non-empty partitions")
    rng = np.random.default_rng(seed)
    if kind == "iid" and not argument:
        return [np.sort(part) for part in np.array_split(rng.permutation(n), num_partitions)]
    if kind == "dirichlet":
        try:
            alpha = float(argument)
        except ValueError:
            alpha = float("nan")
        if not alpha > 0 or not np.isfinite(alpha):
            raise DataError(f"partition scheme {scheme!r}: ALPHA must be a positive number (dirichlet:0.5)")
        return _dirichlet(loaded.labels, alpha, num_partitions, rng)
    raise DataError(f"unknown partition scheme {scheme!r}; expected one of {SCHEMES}")


def _dirichlet(labels: np.ndarray, alpha: float, parts: int, rng: np.random.Generator) -> list[np.ndarray]:
    classes = np.unique(labels)
    for _ in range(_DIRICHLET_TRIES):
        buckets: list[list[np.ndarray]] = [[] for _ in range(parts)]
        for c in classes:
            members = rng.permutation(np.flatnonzero(labels == c))
            shares = rng.dirichlet(np.full(parts, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(members)).round().astype(int)
            for bucket, chunk in zip(buckets, np.split(members, cuts)):
                bucket.append(chunk)
        result = [np.sort(np.concatenate(b)).astype(np.int64) for b in buckets]
        if min(len(r) for r in result) > 0:
            return result
    # Very small ALPHA with many partitions: keep the last draw and give each empty partition one sample
    # from the largest partition, which barely changes the skew.
    for i in range(parts):
        if len(result[i]) == 0:
            largest = max(range(parts), key=lambda j: len(result[j]))
            pick = rng.integers(len(result[largest]))
            result[i] = result[largest][pick:pick + 1].copy()
            result[largest] = np.delete(result[largest], pick)
    return result


def _by_column(attributes: pd.DataFrame, column: str, parts: int) -> list[np.ndarray]:
    if column not in attributes.columns:
        have = ", ".join(map(str, attributes.columns)) or "none"
        raise DataError(f"partition by:{column}: no attribute column {column!r} (attribute columns: {have})")
    values = attributes[column]
    missing = int(values.isna().sum())
    if missing:
        raise DataError(f"partition by:{column}: {missing} samples have no {column} value")
    groups = group_order(values.unique())
    if len(groups) != parts:
        shown = ", ".join(map(str, groups[:10])) + (", ..." if len(groups) > 10 else "")
        raise DataError(f"partition by:{column}: the data has {len(groups)} {column} groups ({shown}) "
                        f"but num_partitions={parts}; they must be equal")
    array = values.to_numpy()
    return [np.flatnonzero(array == g).astype(np.int64) for g in groups]


def group_order(values: Iterable[Any]) -> list[Any]:
    """Sorted group values, numbers inside strings compared as numbers ("site-2" before "site-10")."""
    def key(value: Any):
        if isinstance(value, (int, float, np.integer, np.floating)):
            return (0, float(value), ())
        parts = re.split(r"(\d+)", str(value))
        return (1, 0.0, tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in parts))
    return sorted(values, key=key)
