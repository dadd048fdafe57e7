"""Data hygiene: duplicate detection (exact and perceptual), class-balanced loss weights.

The checks run on the decoded *original* images, before resizing, so two files that only become equal after
downscaling are not called exact duplicates, and the minimum-resolution filter sees the real size.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from PIL import Image

from fedvision.errors import DataError

DEDUP_MODES = (None, "exact", "near")
DEFAULT_NEAR_THRESHOLD = 6  # Hamming distance on the 64-bit dHash; unrelated images sit near 32


def pixel_sha256(image: Image.Image) -> str:
    """sha256 of decoded pixels (with mode and size, so a reshaped buffer does not collide)."""
    h = hashlib.sha256(f"{image.mode}:{image.size[0]}x{image.size[1]}:".encode())
    h.update(image.tobytes())
    return h.hexdigest()


def dhash(image: Image.Image) -> int:
    """64-bit difference hash: shrink to 9×8 grayscale, one bit per horizontally adjacent pixel pair.

    Robust to rescaling, recompression and small brightness changes, which is what near-duplicate uploads
    of the same photograph differ by.
    """
    gray = _to_gray8(image).resize((9, 8), Image.BILINEAR)
    pixels = np.asarray(gray, dtype=np.int16)
    bits = (pixels[:, 1:] > pixels[:, :-1]).ravel()
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


def _to_gray8(image: Image.Image) -> Image.Image:
    if image.mode == "F":  # our float images hold values in [0, 1]
        return Image.fromarray(np.clip(np.asarray(image) * 255.0 + 0.5, 0, 255).astype(np.uint8))
    if image.mode.startswith("I"):
        return Image.fromarray((np.clip(np.asarray(image, dtype=np.float64), 0, 65535) / 257.0).astype(np.uint8))
    return image.convert("L")


@dataclass
class DuplicateReport:
    """Result of ``find_duplicates``: pairs are (row_i, row_j) in the caller's row numbering, i before j."""

    exact_pairs: list[tuple[int, int]] = field(default_factory=list)
    near_pairs: list[tuple[int, int]] = field(default_factory=list)
    exact_removed: list[int] = field(default_factory=list)  # positions (not rows) of samples to drop
    near_removed: list[int] = field(default_factory=list)
    label_conflicts: int = 0  # duplicate pairs whose labels differ: the same image annotated two ways


def find_duplicates(rows: Sequence[int], labels: Sequence[int], digests: Sequence[str],
                    hashes: Sequence[int] | None, near_threshold: int) -> DuplicateReport:
    """Exact duplicates by pixel digest and, when ``hashes`` is given, near duplicates by dHash distance.

    The first occurrence of each group is kept. Exact duplicates are removed first; near pairs are then
    found among the remaining samples and a sample is removed if it is near one that is kept.
    """
    report = DuplicateReport()
    first_seen: dict[str, int] = {}
    for pos, digest in enumerate(digests):
        if digest in first_seen:
            keep = first_seen[digest]
            report.exact_pairs.append((rows[keep], rows[pos]))
            report.exact_removed.append(pos)
            report.label_conflicts += int(labels[keep] != labels[pos])
        else:
            first_seen[digest] = pos
    if hashes is None:
        return report

    remaining = np.array(sorted(first_seen.values()), dtype=np.int64)
    values = np.array([hashes[p] for p in remaining], dtype=np.uint64)
    removed: set[int] = set()
    chunk = 1024  # bounds the (chunk × N) distance matrix
    for start in range(0, len(values), chunk):
        block = np.bitwise_count(values[start:start + chunk, None] ^ values[None, :])
        for a, b in zip(*np.nonzero(block <= near_threshold)):
            i, j = start + int(a), int(b)
            if j <= i:
                continue
            pi, pj = int(remaining[i]), int(remaining[j])
            report.near_pairs.append((rows[pi], rows[pj]))
            report.label_conflicts += int(labels[pi] != labels[pj])
            if pi not in removed and pj not in removed:
                removed.add(pj)
    report.near_removed = sorted(removed)
    return report


def class_weights(labels: Sequence[int] | np.ndarray, num_classes: int) -> list[float]:
    """Inverse-frequency loss weights, normalised to mean 1 over the classes that occur.

    A class with no samples gets weight 0 (it contributes no loss terms anyway). Weighting the loss, rather
    than resampling, keeps Poisson sampling intact for DP-SGD's privacy accounting.
    """
    if num_classes < 1:
        raise DataError(f"class_weights: num_classes must be ≥ 1, got {num_classes}")
    y = np.asarray(labels).ravel()
    if y.size == 0:
        raise DataError("class_weights: no labels")
    if not np.issubdtype(y.dtype, np.integer):
        if not np.all(np.equal(np.mod(y, 1), 0)):
            raise DataError(f"class_weights: labels must be integers, got {y.dtype}")
        y = y.astype(np.int64)
    if y.min() < 0 or y.max() >= num_classes:
        raise DataError(f"class_weights: label {int(y.min() if y.min() < 0 else y.max())} "
                        f"outside 0..{num_classes - 1}")
    counts = np.bincount(y, minlength=num_classes).astype(np.float64)
    present = counts > 0
    inverse = np.zeros(num_classes)
    inverse[present] = 1.0 / counts[present]
    inverse[present] /= inverse[present].mean()
    return [float(w) for w in inverse]
