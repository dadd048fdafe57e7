"""DP-SGD overhead: samples/s of non-private vs DP-SGD training, same model, batch and process.

    python benchmarks/dp_overhead.py [--models fedvision_cnn resnet18 vit_tiny_patch16_224] [--samples 512]

Both paths go through fedvision.train (train_nonprivate / train_private) on the same random 32×32 images,
batch 64; DP-SGD uses Poisson sampling, flat clipping and σ = 1. Prints a Markdown table with the ratio.
"""

from __future__ import annotations

import argparse
import warnings

import torch

from fedvision.models import create_model
from fedvision.train import TrainConfig, train_nonprivate, train_private

warnings.filterwarnings("ignore")


def throughput(name: str, private: bool, data, batch: int, repeats: int) -> float:
    best = 0.0
    for _ in range(repeats):
        torch.manual_seed(0)
        model = create_model(name, 2, img_size=32)  # the same DP-compatible model for both paths
        cfg = TrainConfig(epochs=1, batch_size=batch, max_physical_batch_size=batch, lr=0.01, noise_multiplier=1.0,
                          seed=0)
        result = (train_private if private else train_nonprivate)(model, data, cfg)
        best = max(best, len(data) / result.seconds)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["fedvision_cnn", "resnet18", "vit_tiny_patch16_224"])
    p.add_argument("--samples", type=int, default=512)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.rand(args.samples, 3, 32, 32, generator=g),
                                          torch.randint(0, 2, (args.samples,), generator=g))
    print(f"{args.threads} threads, 32×32 inputs, batch {args.batch}, {args.samples} samples, best of {args.repeats}")
    print("| model | non-private samples/s | DP-SGD samples/s | slowdown |")
    print("|---|---|---|---|")
    for name in args.models:
        plain = throughput(name, False, data, args.batch, args.repeats)
        private = throughput(name, True, data, args.batch, args.repeats)
        print(f"| {name} | {plain:.0f} | {private:.0f} | {plain / private:.1f}× |", flush=True)


if __name__ == "__main__":
    main()
