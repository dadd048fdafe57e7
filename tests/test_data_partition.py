"""Partitioning into simulated sites, and subsets that keep attributes aligned."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from fedvision.data import ImageDataset, LoadedDataset, group_order, load_dataset, partition, subset
from fedvision.errors import DataError


def make_loaded(n: int = 300, num_classes: int = 3, seed: int = 0, sites: int = 4) -> LoadedDataset:
    """A small in-memory dataset whose image i is filled with the value i % 256 (to check alignment)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, n)
    images = torch.arange(n, dtype=torch.int64).remainder(256).to(torch.uint8).view(n, 1, 1, 1).expand(n, 1, 4, 4)
    attributes = pd.DataFrame({"site": [f"site-{1 + i % sites}" for i in range(n)], "row": np.arange(n)})
    return LoadedDataset(dataset=ImageDataset(images.contiguous(), torch.from_numpy(labels)), attributes=attributes,
                         classes=[f"c{k}" for k in range(num_classes)], summary={"hygiene": {}}, source="test")


def assert_exact_cover(parts: list[np.ndarray], n: int) -> None:
    assert all(len(p) > 0 for p in parts)
    merged = np.concatenate(parts)
    assert len(merged) == n and np.array_equal(np.sort(merged), np.arange(n))


@pytest.mark.parametrize("scheme, k", [("iid", 5), ("dirichlet:0.5", 5), ("dirichlet:0.05", 12), ("by:site", 4)])
def test_every_sample_in_exactly_one_partition(scheme: str, k: int):
    loaded = make_loaded()
    parts = partition(loaded, scheme, k, seed=3)
    assert_exact_cover(parts, len(loaded))
    again = partition(loaded, scheme, k, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))  # deterministic under the seed


def test_seed_changes_random_schemes():
    loaded = make_loaded()
    for scheme in ("iid", "dirichlet:0.5"):
        a, b = partition(loaded, scheme, 4, seed=0), partition(loaded, scheme, 4, seed=1)
        assert any(not np.array_equal(x, y) for x, y in zip(a, b))


def label_skew(loaded: LoadedDataset, parts: list[np.ndarray]) -> float:
    """Mean total-variation distance between each partition's label distribution and the global one."""
    k = len(loaded.classes)
    overall = np.bincount(loaded.labels, minlength=k) / len(loaded)
    return float(np.mean([0.5 * np.abs(np.bincount(loaded.labels[p], minlength=k) / len(p) - overall).sum()
                          for p in parts]))


def test_dirichlet_is_label_skewed_iid_is_not():
    loaded = make_loaded(n=3000)
    iid = label_skew(loaded, partition(loaded, "iid", 5))
    skewed = label_skew(loaded, partition(loaded, "dirichlet:0.1", 5))
    mild = label_skew(loaded, partition(loaded, "dirichlet:100", 5))
    assert iid < 0.05 and mild < 0.08
    assert skewed > 0.3


def test_tiny_alpha_leaves_no_partition_empty():
    loaded = make_loaded(n=40, num_classes=2)
    for seed in range(5):
        assert_exact_cover(partition(loaded, "dirichlet:0.001", 30, seed=seed), 40)


def test_by_site_gives_the_natural_sites():
    loaded = load_dataset("synthetic-derm:7")
    parts = partition(loaded, "by:site", 3)
    assert [len(p) for p in parts] == [600, 600, 600]
    for k, part in enumerate(parts):
        assert set(loaded.attributes["site"].iloc[part]) == {f"site-{k + 1}"}
    with pytest.raises(DataError, match=r"has 3 site groups \(site-1, site-2, site-3\) but num_partitions=4"):
        partition(loaded, "by:site", 4)


def test_by_column_orders_groups_naturally():
    loaded = make_loaded(n=120, sites=12)
    parts = partition(loaded, "by:site", 12)
    first_site = [loaded.attributes["site"].iloc[p[0]] for p in parts]
    assert first_site == [f"site-{k}" for k in range(1, 13)]  # site-2 before site-10
    assert group_order(["b", "a10", "a9", 3, 1.5]) == [1.5, 3, "a9", "a10", "b"]


@pytest.mark.parametrize("scheme, k, fragment", [
    ("by:hospital", 4, "no attribute column 'hospital' (attribute columns: site, row)"),
    ("by:", 4, "needs a column"),
    ("dirichlet:-1", 4, "ALPHA must be a positive number"),
    ("dirichlet:abc", 4, "ALPHA must be a positive number"),
    ("random", 4, "unknown partition scheme 'random'"),
    ("iid", 0, "num_partitions must be a positive integer"),
    ("iid", 301, "cannot split 300 samples into 301"),
])
def test_partition_errors(scheme: str, k: int, fragment: str):
    with pytest.raises(DataError) as e:
        partition(make_loaded(), scheme, k)
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_by_column_with_missing_values():
    loaded = make_loaded()
    loaded.attributes.loc[5, "site"] = None
    with pytest.raises(DataError, match="1 samples have no site value"):
        partition(loaded, "by:site", 4)


def test_subset_keeps_attributes_aligned():
    loaded = make_loaded()
    indices = np.array([250, 3, 77, 3])
    part = subset(loaded, indices)
    assert len(part) == 4 and part.attributes["row"].tolist() == [250, 3, 77, 3]
    assert part.attributes.index.tolist() == [0, 1, 2, 3]
    for j, i in enumerate(indices):
        image, label = part.dataset[j]
        assert label == loaded.dataset[i][1]
        assert torch.equal(image, loaded.dataset[i][0])
    assert part.summary["num_samples"] == 4 and part.summary["subset_of"] == 300
    assert sum(part.summary["class_counts"].values()) == 4
    assert part.classes == loaded.classes and part.source == loaded.source
    # Partitions and subsets compose: every site's subset holds exactly that site.
    for k, idx in enumerate(partition(loaded, "by:site", 4)):
        assert set(subset(loaded, idx).attributes["site"]) == {f"site-{k + 1}"}
    mask = np.zeros(len(loaded), dtype=bool)
    mask[[1, 2]] = True
    assert subset(loaded, mask).attributes["row"].tolist() == [1, 2]
    with pytest.raises(DataError, match="out of range"):
        subset(loaded, [300])
