"""Sensitive-attribute groups and their pairwise intersections, named one way everywhere.

Sites count per-group confusion matrices under these names (``fedvision.site.Site.evaluate``) and the
fairness audit groups pooled predictions under the same names (``audit.fairness``), so a federated table and
a pooled one line up group by group. An intersection of attributes ``a`` and ``b`` (in the order given) is
named ``"a×b"`` and its groups ``"<value of a>×<value of b>"`` (× is U+00D7). Values are compared as strings
(a missing value becomes the group ``"nan"``), as they are written to JSON.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import combinations

import numpy as np

INTERSECTION = "\u00d7"


def intersection_name(*names: str) -> str:
    return INTERSECTION.join(names)


def group_labels(columns: Mapping[str, Sequence], intersections: bool = True) -> dict[str, np.ndarray]:
    """Per attribute, each sample's group as a string; with ``intersections``, also every pair of attributes
    (``"a×b"``, pairs in the order the columns are given)."""
    labels = {str(name): np.asarray(values).astype(str) for name, values in columns.items()}
    if intersections:
        for a, b in combinations(list(labels), 2):
            labels[intersection_name(a, b)] = np.char.add(np.char.add(labels[a], INTERSECTION), labels[b])
    return labels
