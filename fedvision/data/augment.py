"""Seeded training-time augmentation: random crop with padding, colour jitter, horizontal flip.

Applied per sample in ``ImageDataset.__getitem__``. The random draws for a sample depend only on
(seed, sample index, how many times that sample has been drawn, and the epoch set by
``ImageDataset.set_epoch``), not on the order in which a sampler visits samples, so a run is reproducible
under shuffling or Poisson sampling and every epoch sees fresh draws.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from fedvision.errors import DataError


@dataclass(frozen=True)
class Augmentation:
    """Augmentation strengths and seed (plain numbers, so they can be recorded in a run summary)."""

    seed: int = 0  # non-negative
    crop_padding: float = 0.125  # padding as a fraction of the image side (4 px at 32×32), reflect-padded
    brightness: float = 0.2  # multiplicative factor drawn from [1 - b, 1 + b]
    contrast: float = 0.2
    saturation: float = 0.2
    flip_probability: float = 0.5

    def __post_init__(self) -> None:
        if not isinstance(self.seed, int) or self.seed < 0:
            raise DataError(f"augmentation seed must be a non-negative integer, got {self.seed!r}")

    def apply(self, image: torch.Tensor, index: int, draw: int, epoch: int = 0) -> torch.Tensor:
        """Augment one float image (C, H, W) in [0, 1]; ``draw`` counts earlier draws of this sample."""
        rng = np.random.default_rng((self.seed, index, epoch, draw))
        flip, jitter, offsets = rng.random(), rng.uniform(-1.0, 1.0, size=3), rng.random(2)
        x = image
        if flip < self.flip_probability:
            x = x.flip(-1)
        x = self._random_crop(x, offsets)
        return self._colour_jitter(x, jitter)

    def _random_crop(self, x: torch.Tensor, offsets: np.ndarray) -> torch.Tensor:
        h, w = x.shape[-2:]
        # Reflect padding needs pad < side; reflecting keeps skin texture at the border instead of black bars.
        pad = min(int(round(self.crop_padding * min(h, w))), min(h, w) - 1)
        if pad <= 0:
            return x
        padded = F.pad(x[None], (pad, pad, pad, pad), mode="reflect")[0]
        dy, dx = (int(o * (2 * pad + 1)) for o in offsets)
        return padded[:, dy:dy + h, dx:dx + w]

    def _colour_jitter(self, x: torch.Tensor, jitter: np.ndarray) -> torch.Tensor:
        b, c, s = 1 + self.brightness * jitter[0], 1 + self.contrast * jitter[1], 1 + self.saturation * jitter[2]
        x = x * float(b)
        gray = _luma(x)
        x = (x - gray.mean()) * float(c) + gray.mean()
        if x.shape[0] == 3:
            gray = _luma(x)
            x = gray + (x - gray) * float(s)
        return x.clamp_(0.0, 1.0)


def _luma(x: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma (1, H, W) of a 1- or 3-channel image."""
    if x.shape[0] == 1:
        return x
    return (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2])[None]
