"""What the benchmarks share: their command line and the random 32×32 images they train on."""

from __future__ import annotations

import argparse

import torch


def parse_args(doc: str, models: list[str], samples: int) -> argparse.Namespace:
    """--models, --samples, --batch, --repeats, --threads; sets torch's thread count."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--models", nargs="+", default=models)
    p.add_argument("--samples", type=int, default=samples)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    return args


def random_images(samples: int) -> torch.utils.data.TensorDataset:
    """``samples`` random 3×32×32 images with random binary labels, the same in every run."""
    g = torch.Generator().manual_seed(0)
    return torch.utils.data.TensorDataset(torch.rand(samples, 3, 32, 32, generator=g),
                                          torch.randint(0, 2, (samples,), generator=g))
