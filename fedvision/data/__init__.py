"""Datasets for fedvision: one loader for every source, the bundled synthetic-derm data, partitioning
into simulated sites, and data hygiene.

Public API::

    load_dataset(spec, image_size=32, channels=3, skip_bad=False, split=None, *, classes=None,
                 dicom_window=None, min_resolution=None, dedup=None, near_threshold=6,
                 augment=False, augment_seed=0, max_pixels=50_000_000) -> LoadedDataset
    LoadedDataset(dataset, attributes, classes, summary, source)
    partition(loaded, scheme, num_partitions, seed=0) -> list[np.ndarray]
    subset(loaded, indices) -> LoadedDataset
    class_weights(labels, num_classes) -> list[float]
    generate_synthetic_derm(seed=0, sites=3, per_site=600, test_size=600, image_size=32) -> SyntheticDerm

The partitioning code lives in ``partitioning.py`` so that no module name shadows the ``partition``
function. Names resolve lazily so that ``fedvision.data.cli`` (imported by every ``fedvision`` command to
register its parser) does not pull in torch, pandas and Pillow.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "load_dataset": "fedvision.data.sources",
    "parse_spec": "fedvision.data.sources",
    "SPEC_FORMS": "fedvision.data.sources",
    "LoadedDataset": "fedvision.data.dataset",
    "ImageDataset": "fedvision.data.dataset",
    "subset": "fedvision.data.dataset",
    "partition": "fedvision.data.partitioning",
    "group_order": "fedvision.data.partitioning",
    "class_weights": "fedvision.data.hygiene",
    "dhash": "fedvision.data.hygiene",
    "Augmentation": "fedvision.data.augment",
    "generate_synthetic_derm": "fedvision.data.synthetic",
    "SyntheticDerm": "fedvision.data.synthetic",
    "SyntheticSplit": "fedvision.data.synthetic",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from fedvision.data.augment import Augmentation
    from fedvision.data.dataset import ImageDataset, LoadedDataset, subset
    from fedvision.data.hygiene import class_weights, dhash
    from fedvision.data.partitioning import group_order, partition
    from fedvision.data.sources import SPEC_FORMS, load_dataset, parse_spec
    from fedvision.data.synthetic import SyntheticDerm, SyntheticSplit, generate_synthetic_derm


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'fedvision.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
