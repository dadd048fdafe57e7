"""The canaries of the one-run privacy audit (``audit.canary``), as data: made with secret coins, saved in the run
folder, and added to simulated site-1's training data where the coin says "in". Simulation only: a deployed site
refuses a run with canaries (``fedvision.privacy.SitePolicy.refusal``).
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

import torch

from fedvision.errors import ConfigError, DataError

CANARY_FILE = "canaries.pt"  # in RUN_DIR: images, labels and the secret coins (auditor and simulated site-1 only)
CANARY_SITE = "site-1"       # the simulated site whose training data receives the canaries


# ---------------------------------------------------------------------------------------------------------
# Canaries and coins
# ---------------------------------------------------------------------------------------------------------
def make_canaries(m: int, num_classes: int, channels: int, image_size: int) -> dict[str, torch.Tensor]:
    """``m`` canaries: uint8 uniform-noise images (m, C, H, W), uniformly random labels, and one secret fair
    coin each (True = "in": the canary is added to the training data). All drawn from OS entropy."""
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise ConfigError(f"canaries: must be an integer ≥ 1, got {m!r}")
    if num_classes < 2:
        raise ConfigError(f"canaries: need at least 2 classes, got {num_classes}")
    generator = torch.Generator().manual_seed(secrets.randbits(63))
    images = torch.randint(0, 256, (m, channels, image_size, image_size), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, num_classes, (m,), dtype=torch.int64, generator=generator)
    coins = torch.tensor([secrets.randbits(1) == 1 for _ in range(m)], dtype=torch.bool)  # never from a seed
    return {"images": images, "labels": labels, "coins": coins}


def save_canaries(path: str | Path, canaries: dict[str, torch.Tensor]) -> Path:
    from fedvision.io import atomic_write

    return atomic_write(path, lambda f: torch.save(canaries, f))


def load_canaries(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    try:
        canaries = torch.load(path, weights_only=True)
        images, labels, coins = canaries["images"], canaries["labels"], canaries["coins"]
    except (OSError, RuntimeError, KeyError, TypeError, EOFError) as e:
        raise DataError(f"{path}: cannot read the canaries ({e})") from None
    if not (images.dtype == torch.uint8 and images.ndim == 4 and labels.shape == coins.shape == (len(images),)
            and coins.dtype == torch.bool):
        raise DataError(f"{path}: malformed canaries (images, labels and coins do not match)")
    return {"images": images, "labels": labels.to(torch.int64), "coins": coins}


def with_canaries(loaded: Any, canaries: dict[str, torch.Tensor]) -> Any:
    """``loaded`` (a ``fedvision.data.LoadedDataset``) plus the canaries whose coin says "in"."""
    import pandas as pd

    from fedvision.data import LoadedDataset
    from fedvision.data.dataset import ImageDataset

    inside = canaries["coins"]
    images, labels = canaries["images"][inside], canaries["labels"][inside]
    if images.shape[1:] != loaded.dataset.images.shape[1:]:
        raise DataError(f"canaries: images of shape {tuple(images.shape[1:])} do not match the site's "
                        f"{tuple(loaded.dataset.images.shape[1:])}")
    if len(labels) and int(labels.max()) >= len(loaded.classes):
        raise DataError("canaries: a label is outside the site's classes")
    dataset = ImageDataset(torch.cat([loaded.dataset.images, images]), torch.cat([loaded.dataset.labels, labels]),
                           loaded.dataset.augmentation)
    attributes = pd.concat([loaded.attributes, pd.DataFrame(index=range(len(labels)),
                                                            columns=loaded.attributes.columns)],
                           ignore_index=True)
    summary = {**loaded.summary, "num_samples": len(dataset), "canaries_in": len(labels)}
    return LoadedDataset(dataset=dataset, attributes=attributes, classes=list(loaded.classes), summary=summary,
                         source=loaded.source)
