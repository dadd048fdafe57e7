"""Data hygiene: duplicates, minimum resolution, class weights, augmentation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image, ImageEnhance

from fedvision.data import Augmentation, class_weights, dhash, load_dataset
from fedvision.data.hygiene import hamming
from fedvision.errors import DataError


def smooth(seed: int, size: int = 64) -> Image.Image:
    """A distinct smooth RGB image per seed (upsampled 4×4 noise)."""
    small = np.random.default_rng(seed).integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((size, size), Image.BICUBIC)


@pytest.fixture
def planted(tmp_path: Path) -> Path:
    """Manifest rows 1-6 distinct; row 7 = row 2's pixels as BMP (exact); row 8 = row 3 re-encoded as JPEG
    and brightened (near); row 9 = row 4 downscaled (near, not exact); row 10 a 10×12 thumbnail (low-res)."""
    rows = []
    for i in range(6):
        smooth(i).save(tmp_path / f"img{i}.png")
        rows.append({"path": f"img{i}.png", "label": ["a", "b"][i % 2]})
    smooth(1).save(tmp_path / "copy_of_1.bmp")
    ImageEnhance.Brightness(smooth(2)).enhance(1.08).save(tmp_path / "near_2.jpg", quality=80)
    smooth(3).resize((48, 48), Image.BILINEAR).save(tmp_path / "small_3.png")
    smooth(4).resize((12, 10), Image.BILINEAR).save(tmp_path / "thumb.png")
    rows += [{"path": "copy_of_1.bmp", "label": "b"}, {"path": "near_2.jpg", "label": "b"},
             {"path": "small_3.png", "label": "b"}, {"path": "thumb.png", "label": "a"}]
    pd.DataFrame(rows).to_csv(tmp_path / "manifest.csv", index=False)
    return tmp_path / "manifest.csv"


def test_no_hygiene_keeps_everything(planted: Path):
    loaded = load_dataset(f"manifest:{planted}")
    hygiene = loaded.summary["hygiene"]
    assert len(loaded) == 10
    assert hygiene["dedup"] is None and hygiene["exact_duplicates"] == 0 and hygiene["low_resolution"] == 0


def test_exact_duplicates_by_pixel_content(planted: Path):
    loaded = load_dataset(f"manifest:{planted}", dedup="exact")
    hygiene = loaded.summary["hygiene"]
    assert hygiene["exact_duplicates"] == 1
    assert hygiene["exact_duplicate_pairs"] == [(2, 7)]  # same pixels, PNG vs BMP
    assert hygiene["near_duplicates"] == 0 and hygiene["near_duplicate_pairs"] == []
    assert hygiene["duplicate_label_conflicts"] == 0
    assert len(loaded) == 9


def test_near_duplicates_by_perceptual_hash(planted: Path):
    loaded = load_dataset(f"manifest:{planted}", dedup="near")
    hygiene = loaded.summary["hygiene"]
    assert hygiene["exact_duplicate_pairs"] == [(2, 7)]
    # Re-encoded + brightened, and downscaled (different size, so not exact): both near. The thumbnail of
    # row 5 is near it too.
    assert sorted(hygiene["near_duplicate_pairs"]) == [(3, 8), (4, 9), (5, 10)]
    assert hygiene["near_duplicates"] == 3 and len(loaded) == 6
    assert hygiene["duplicate_label_conflicts"] == 1  # row 3 is "a", its re-encoded copy "b"


def test_min_resolution_uses_the_original_size(planted: Path):
    loaded = load_dataset(f"manifest:{planted}", min_resolution=16, image_size=8)  # 8 < 16: not the resized size
    hygiene = loaded.summary["hygiene"]
    assert hygiene["low_resolution"] == 1 and hygiene["low_resolution_rows"] == [10]
    assert len(loaded) == 9
    both = load_dataset(f"manifest:{planted}", min_resolution=16, dedup="near")
    assert both.summary["hygiene"]["near_duplicate_pairs"] == [(3, 8), (4, 9)] and len(both) == 6


def test_dhash_properties():
    original = smooth(7)
    assert hamming(dhash(original), dhash(original.resize((40, 40), Image.BILINEAR))) <= 4
    assert hamming(dhash(original), dhash(original.convert("L"))) == 0
    distances = [hamming(dhash(smooth(i)), dhash(smooth(i + 100))) for i in range(20)]
    assert min(distances) > 10 and 20 < np.mean(distances) < 44  # unrelated images: about half the bits
    assert 0 <= dhash(original) < 2 ** 64


def test_class_weights():
    assert class_weights([0, 0, 0, 1], 2) == pytest.approx([0.5, 1.5])
    assert class_weights(np.array([0, 1, 2]), 3) == pytest.approx([1.0, 1.0, 1.0])
    # A class without samples gets 0; the others have mean 1.
    assert class_weights([0, 0, 1], 3) == pytest.approx([2 / 3, 4 / 3, 0.0])
    long_tail = np.repeat([0, 1, 2], [90, 9, 1])
    weights = np.array(class_weights(long_tail, 3))
    assert weights.mean() == pytest.approx(1.0)
    assert (weights * np.bincount(long_tail)).std() == pytest.approx(0.0, abs=1e-9)  # each class' total equal
    with pytest.raises(DataError, match="outside 0..1"):
        class_weights([0, 2], 2)
    with pytest.raises(DataError, match="no labels"):
        class_weights([], 2)


def test_class_weights_in_summary():
    loaded = load_dataset("digits", split="test")
    counts = np.array(list(loaded.summary["class_counts"].values()))
    assert loaded.summary["hygiene"]["class_weights"] == pytest.approx(class_weights(loaded.labels, 10))
    assert np.argmax(loaded.summary["hygiene"]["class_weights"]) == np.argmin(counts)


def test_augmentation_is_seeded_and_fresh_each_draw():
    plain = load_dataset("digits", split="test")
    a = load_dataset("digits", split="test", augment=True, augment_seed=1)
    b = load_dataset("digits", split="test", augment=True, augment_seed=1)
    c = load_dataset("digits", split="test", augment=True, augment_seed=2)
    first = [a.dataset[i][0] for i in range(20)]
    assert all(torch.equal(x, b.dataset[i][0]) for i, x in enumerate(first))  # same seed, same draws
    assert any(not torch.equal(x, c.dataset[i][0]) for i, x in enumerate(first))  # other seed differs
    assert any(not torch.equal(x, a.dataset[i][0]) for i, x in enumerate(first))  # a second epoch differs
    assert any(not torch.equal(x, plain.dataset[i][0]) for i, x in enumerate(first))
    for x in first:
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert torch.equal(plain.dataset[0][0], plain.dataset[0][0])  # no augmentation: the stored image
    assert a.summary["hygiene"]["augment"] is True
    # Draws depend on the sample and how often it was drawn, not on the order samples are visited.
    d = load_dataset("digits", split="test", augment=True, augment_seed=1)
    assert torch.equal(d.dataset[5][0], first[5]) and torch.equal(d.dataset[0][0], first[0])
    # Worker processes restart the counters; set_epoch keeps their epochs apart.
    e = load_dataset("digits", split="test", augment=True, augment_seed=1)
    e.dataset.set_epoch(1)
    assert not torch.equal(e.dataset[0][0], first[0])


def test_augmentation_operations():
    image = torch.rand(3, 8, 8)
    flip_only = Augmentation(crop_padding=0, brightness=0, contrast=0, saturation=0, flip_probability=1.0)
    assert torch.allclose(flip_only.apply(image, 0, 0), image.flip(-1))
    crop_only = Augmentation(crop_padding=0.25, brightness=0, contrast=0, saturation=0, flip_probability=0.0)
    crops = [crop_only.apply(image, 0, draw) for draw in range(10)]
    assert all(c.shape == image.shape for c in crops) and any(not torch.equal(c, image) for c in crops)
    jitter_only = Augmentation(crop_padding=0, flip_probability=0.0)
    jittered = jitter_only.apply(image, 3, 0)
    assert not torch.allclose(jittered, image) and 0 <= jittered.min() and jittered.max() <= 1
