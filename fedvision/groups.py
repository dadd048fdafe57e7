"""Sensitive-attribute groups and their pairwise intersections, named one way everywhere.

Sites count per-group confusion matrices under these names (``fedvision.site.Site.evaluate``) and the
fairness audit groups pooled predictions under the same names (``audit.fairness``), so a federated table and
a pooled one line up group by group. An intersection of attributes ``a`` and ``b`` (in the order given) is
named ``"a×b"`` and its groups ``"<value of a>×<value of b>"`` (× is U+00D7). Values are compared as strings
(a missing value becomes the group ``"nan"``), as they are written to JSON.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from itertools import combinations

import numpy as np

INTERSECTION = "\u00d7"


def intersection_name(*names: str) -> str:
    return INTERSECTION.join(names)


# A numeric age (years) is grouped in the bands of the bundled data (fedvision.data.synthetic.AGE_BANDS):
# < 40, 40–60 (both ends included), > 60; a missing age is its own group "unknown". One value per person
# would make every group too small to judge.
AGE_BAND_EDGES = (40, 60)


def age_bands(ages: Sequence) -> np.ndarray:
    import pandas as pd

    low, high = AGE_BAND_EDGES
    years = pd.to_numeric(pd.Series(ages), errors="coerce").to_numpy(dtype=float)
    return np.select([np.isnan(years), years < low, years <= high], ["unknown", f"<{low}", f"{low}-{high}"],
                     f">{high}")


def group_values(name: str, values: Sequence) -> np.ndarray:
    """Each sample's group for attribute ``name``: its value as a string, a numeric ``age`` in bands."""
    array = np.asarray(values)
    if str(name) == "age" and array.dtype.kind in "iuf":
        return age_bands(array)
    return array.astype(str)


def group_labels(columns: Mapping[str, Sequence], intersections: bool = True) -> dict[str, np.ndarray]:
    """Per attribute, each sample's group as a string (``group_values``); with ``intersections``, also every
    pair of attributes (``"a×b"``, pairs in the order the columns are given)."""
    labels = {str(name): group_values(name, values) for name, values in columns.items()}
    if intersections:
        for a, b in combinations(list(labels), 2):
            labels[intersection_name(a, b)] = np.char.add(np.char.add(labels[a], INTERSECTION), labels[b])
    return labels


def group_sort_key(group: str) -> tuple:
    """Reading order for group names: bands by their numbers ("<40", "40-60", ">60"), other names as text;
    an intersection part by part."""
    def part(name: str) -> tuple:
        number = re.search(r"\d+(\.\d+)?", name)
        if number is None:
            return (math.inf, 0, name)
        return (float(number.group()), {"<": 0, ">": 2}.get(name[:1], 1), name)
    return tuple(part(p) for p in str(group).split(INTERSECTION))
