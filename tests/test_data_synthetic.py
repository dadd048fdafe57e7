"""synthetic-derm: determinism, labels independent of demographics, balanced test split, the synth command."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import chi2_contingency

from fedvision.cli import main
from fedvision.data import generate_synthetic_derm, load_dataset
from fedvision.data.synthetic import AGE_BANDS, SKIN_TONES
from fedvision.errors import DataError


@pytest.fixture(scope="module")
def default_data():
    start = time.perf_counter()
    data = generate_synthetic_derm(seed=0)
    return data, time.perf_counter() - start


def test_default_sizes_and_speed(default_data):
    data, seconds = default_data
    assert data.train.images.shape == (1800, 32, 32, 3) and data.train.images.dtype == np.uint8
    assert data.test.images.shape == (600, 32, 32, 3)
    assert data.classes == ["benign", "malignant"]
    assert set(data.train.attributes["site"]) == {"site-1", "site-2", "site-3"}
    assert (data.train.attributes["site"].value_counts() == 600).all()
    assert seconds < 6.0, f"generation took {seconds:.1f} s"  # about 0.7 s on one idle core


def test_same_seed_same_data_other_seed_other_data():
    small = dict(sites=2, per_site=40, test_size=30)
    a, b = generate_synthetic_derm(seed=5, **small), generate_synthetic_derm(seed=5, **small)
    c = generate_synthetic_derm(seed=6, **small)
    for x, y in ((a.train, b.train), (a.test, b.test)):
        assert np.array_equal(x.images, y.images) and np.array_equal(x.labels, y.labels)
        pd.testing.assert_frame_equal(x.attributes, y.attributes)
    assert not np.array_equal(a.train.images, c.train.images)
    assert not np.array_equal(a.test.images, c.test.images)
    # Separate random streams: more training data per site leaves the test split unchanged.
    d = generate_synthetic_derm(seed=5, sites=2, per_site=80, test_size=30)
    assert np.array_equal(a.test.images, d.test.images)


def test_spec_seed_matches_generator(default_data):
    direct, _ = default_data
    loaded = load_dataset("synthetic-derm", split="test")  # no seed: seed 0
    expected = torch.from_numpy(direct.test.images).permute(0, 3, 1, 2)
    assert torch.equal(loaded.dataset.images, expected)
    assert loaded.labels.tolist() == direct.test.labels.tolist()
    pd.testing.assert_frame_equal(loaded.attributes, direct.test.attributes)
    assert not torch.equal(load_dataset("synthetic-derm:4", split="test").dataset.images, expected)


def test_labels_do_not_depend_on_demographics():
    # Many samples at a tiny image size: the labels and appearance do not depend on the image size.
    data = generate_synthetic_derm(seed=1, sites=3, per_site=3000, test_size=0, image_size=8)
    attributes, labels = data.train.attributes, data.train.labels
    for column in ("skin_tone", "sex", "age_band", "site"):
        table = pd.crosstab(attributes[column], labels)
        p_value = chi2_contingency(table)[1]
        assert p_value > 0.01, f"malignant rate depends on {column}: {table}"
    rates = pd.Series(labels).groupby(attributes["skin_tone"].to_numpy()).mean()
    assert rates.max() - rates.min() < 0.12, rates  # similar malignant rates across tones
    # The appearance scores (the label's only cause) are just as independent of tone.
    scores = pd.Series(data.train.appearance.mean(axis=1)).groupby(attributes["skin_tone"].to_numpy()).mean()
    assert scores.max() - scores.min() < 0.05, scores
    # Not trivial: the classes are roughly balanced and overlap (the label is drawn, not thresholded).
    assert 0.35 < labels.mean() < 0.65


def test_label_follows_appearance_not_a_threshold():
    data = generate_synthetic_derm(seed=2, sites=1, per_site=4000, test_size=0, image_size=8)
    severity = data.train.appearance.mean(axis=1)
    labels = data.train.labels
    assert severity[labels == 1].mean() > severity[labels == 0].mean() + 0.2
    near_midpoint = np.abs(severity - 0.5) < 0.03
    assert 0.2 < labels[near_midpoint].mean() < 0.8  # overlap: the same appearance gets either label


def test_dark_tones_rare_at_most_sites_and_darker_skin(default_data):
    data, _ = default_data
    attributes = data.train.attributes
    dark_share = attributes["skin_tone"].isin(["V", "VI"]).groupby(attributes["site"]).mean()
    assert (dark_share < 0.10).sum() >= 2, dark_share  # rare at most sites
    assert dark_share.max() < 0.25
    # Skin tone is rendered as background colour: image corners get darker from I to VI.
    corners = data.test.images[:, :3, :3].reshape(len(data.test.labels), -1).mean(axis=1)
    by_tone = pd.Series(corners).groupby(data.test.attributes["skin_tone"].to_numpy()).mean()
    assert list(by_tone.loc[list(SKIN_TONES)]) == sorted(by_tone, reverse=True)


def test_test_split_represents_every_group(default_data):
    data, _ = default_data
    test = data.test.attributes
    tones = test["skin_tone"].value_counts()
    assert set(tones.index) == set(SKIN_TONES) and tones.min() >= 30
    assert set(test["sex"]) == {"F", "M"} and set(test["age_band"]) == set(AGE_BANDS)
    assert set(test["site"]) == {"site-1", "site-2", "site-3"}
    for tone in SKIN_TONES:  # both classes present in every tone
        assert set(data.test.labels[test["skin_tone"].to_numpy() == tone]) == {0, 1}


def test_sites_differ_in_acquisition(default_data):
    data, _ = default_data
    fields = ("gain", "blur_px", "noise", "vignetting")
    values = {f: [site[f] for site in data.sites] for f in fields}
    assert all(len(set(v)) == 3 for v in values.values())
    json.dumps(data.sites)  # plain values, so the site table can go into a report


def test_bad_parameters():
    with pytest.raises(DataError, match="sites must be an integer ≥ 1"):
        generate_synthetic_derm(sites=0)
    with pytest.raises(DataError, match="seed must be an integer ≥ 0"):
        generate_synthetic_derm(seed=-1)


def test_synth_command_writes_readable_site_folders(tmp_path: Path, capsys):
    out = tmp_path / "derm"
    args = ["data", "synth", "--out", str(out), "--sites", "2", "--per-site", "20", "--test-size", "30", "--seed", "3"]
    assert main(args) == 0
    assert "site-1/manifest.csv: 20 images" in capsys.readouterr().out
    direct = generate_synthetic_derm(seed=3, sites=2, per_site=20, test_size=30)
    for site in ("site-1", "site-2"):
        manifest = out / site / "manifest.csv"
        assert pd.read_csv(manifest).columns.tolist() == ["path", "label", "sex", "age_band", "skin_tone", "site"]
        loaded = load_dataset(f"manifest:{manifest}", classes=["benign", "malignant"])
        assert len(loaded) == 20 and (loaded.attributes["site"] == site).all()
        assert list(loaded.attributes.columns) == ["sex", "age_band", "skin_tone", "site"]
        rows = np.flatnonzero(direct.train.attributes["site"] == site)
        pd.testing.assert_frame_equal(loaded.attributes, direct.train.attributes.iloc[rows].reset_index(drop=True))
        assert loaded.labels.tolist() == direct.train.labels[rows].tolist()
        # PNG is lossless and the size is native: pixels come back exactly.
        assert torch.equal(loaded.dataset.images, torch.from_numpy(direct.train.images[rows]).permute(0, 3, 1, 2))
    test = load_dataset(f"manifest:{out / 'test' / 'manifest.csv'}", classes=["benign", "malignant"])
    assert len(test) == 30 and set(test.attributes["site"]) == {"site-1", "site-2"}
    meta = json.loads((out / "synthetic-derm.json").read_text())
    assert meta["params"]["seed"] == 3 and meta["counts"] == {"site-1": 20, "site-2": 20, "test": 30}
    assert not list(out.rglob("*.tmp"))  # atomic writes leave no temporaries
    # A non-empty output folder is refused unless --force.
    assert main(args) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(args + ["--force"]) == 0
