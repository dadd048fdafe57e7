"""The in-memory dataset every spec loads into, and the ``LoadedDataset`` record around it."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from fedvision.data.augment import Augmentation
from fedvision.errors import DataError


class ImageDataset(Dataset):
    """Decoded images held as one uint8 tensor (N, C, H, W); yields ``(float32 image in [0, 1], int label)``.

    Keeping uint8 in memory costs a quarter of float32; the conversion happens per sample on access.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, augmentation: Augmentation | None = None):
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"images must be a uint8 tensor (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels must have shape ({images.shape[0]},), got {tuple(labels.shape)}")
        self.images = images
        self.labels = labels.to(torch.int64)
        self.augmentation = augmentation
        # Per-sample draw counters make augmentation independent of the sampler's visiting order.
        self._draws = np.zeros(len(labels), dtype=np.int64)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Fold ``epoch`` into the augmentation draws. Needed only with DataLoader worker processes that are
        not persistent: each epoch's workers start from a copy of this object, so their draw counters restart."""
        if int(epoch) < 0:
            raise DataError(f"epoch must be ≥ 0, got {epoch}")
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        i = int(index)
        image = self.images[i].to(torch.float32).div_(255.0)
        if self.augmentation is not None:
            draw = int(self._draws[i])
            self._draws[i] += 1
            image = self.augmentation.apply(image, i if i >= 0 else i + len(self), draw, self.epoch)
        return image, int(self.labels[i])

    def select(self, indices: np.ndarray) -> "ImageDataset":
        """A new dataset with the samples at ``indices`` (copied), the same augmentation settings."""
        idx = torch.as_tensor(indices, dtype=torch.int64)
        return ImageDataset(self.images[idx], self.labels[idx], self.augmentation)  # indexing copies


@dataclass
class LoadedDataset:
    """What ``load_dataset`` returns.

    ``dataset``: the torch Dataset; ``attributes``: one row per sample (sensitive attributes such as sex,
    age_band, skin_tone, site; possibly no columns); ``classes``: class names, label i is ``classes[i]``;
    ``summary``: counts, skipped files with reasons and the hygiene report; ``source``: where the data came
    from, with the sha256 of the manifest or archive file where there is one.
    """

    dataset: ImageDataset
    attributes: pd.DataFrame
    classes: list[str]
    summary: dict[str, Any] = field(default_factory=dict)
    source: str = ""

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def labels(self) -> np.ndarray:
        """Integer labels (N,) as a numpy array."""
        return self.dataset.labels.numpy()


def class_counts(labels: np.ndarray, classes: Sequence[str]) -> dict[str, int]:
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=len(classes))
    return {name: int(n) for name, n in zip(classes, counts)}


def subset(loaded: LoadedDataset, indices: Sequence[int] | np.ndarray) -> LoadedDataset:
    """The samples of ``loaded`` at ``indices`` (ints, or a boolean mask), attributes rows kept aligned.

    The summary's counts and class weights describe the subset; skipped files and the other hygiene counts
    stay those of the load that produced ``loaded``.
    """
    from fedvision.data.hygiene import class_weights

    n = len(loaded)
    idx = np.asarray(indices)
    if idx.dtype == bool:
        if idx.shape != (n,):
            raise DataError(f"subset: boolean mask has shape {idx.shape}, dataset has {n} samples")
        idx = np.flatnonzero(idx)
    if idx.size == 0:
        idx = idx.astype(np.int64)
    if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
        raise DataError(f"subset: indices must be a 1-D array of integers, got {idx.dtype} with shape {idx.shape}")
    if idx.size and (idx.min() < -n or idx.max() >= n):
        raise DataError(f"subset: index out of range for a dataset of {n} samples")
    idx = np.where(idx < 0, idx + n, idx).astype(np.int64)

    dataset = loaded.dataset.select(idx)
    labels = dataset.labels.numpy()
    summary = copy.deepcopy(loaded.summary)
    summary["num_samples"] = len(idx)
    summary["class_counts"] = class_counts(labels, loaded.classes)
    summary.setdefault("hygiene", {})["class_weights"] = class_weights(labels, len(loaded.classes)) if len(idx) else []
    summary["subset_of"] = n
    return LoadedDataset(
        dataset=dataset,
        attributes=loaded.attributes.iloc[idx].reset_index(drop=True),
        classes=list(loaded.classes),
        summary=summary,
        source=loaded.source,
    )
