"""DP-SGD overhead: samples/s of non-private vs DP-SGD training, same model, batch and process.

    python benchmarks/dp_overhead.py [--models fedvision_cnn ... vit_tiny_patch16_224] [--samples 512]

Both paths go through fedvision.train (train_nonprivate / train_private) on the same random 32×32 images,
batch 64; DP-SGD uses Poisson sampling, flat per-sample clipping (fedvision.per_sample: book-keeping with mixed
ghost norms), secure-mode noise and σ = 1. Prints a Markdown table with the ratio.
"""

from __future__ import annotations

import warnings

import torch

from _common import parse_args, random_images
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
    args = parse_args(__doc__, ["fedvision_cnn", "fedvision_scatternet", "resnet18", "efficientnet_b0",
                                "convnext_atto", "vit_tiny_patch16_224"], 512)
    data = random_images(args.samples)
    print(f"{args.threads} threads, 32×32 inputs, batch {args.batch}, {args.samples} samples, best of {args.repeats}")
    print("| model | non-private samples/s | DP-SGD samples/s | slowdown |")
    print("|---|---|---|---|")
    for name in args.models:
        plain = throughput(name, False, data, args.batch, args.repeats)
        private = throughput(name, True, data, args.batch, args.repeats)
        print(f"| {name} | {plain:.0f} | {private:.0f} | {plain / private:.1f}× |", flush=True)


if __name__ == "__main__":
    main()
