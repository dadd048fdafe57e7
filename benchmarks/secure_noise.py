"""Cost of secure-mode DP noise: DP-SGD samples/s with fresh secret randomness and secure-mode noise (the default)
vs plain Gaussian noise from a seeded generator (the test-only mode), same model, data and process.

    python benchmarks/secure_noise.py [--models fedvision_cnn resnet18] [--samples 512]

Secure mode draws four Gaussians per noise value instead of one (against floating-point attacks on Gaussian
sampling); the question is what share of a training step that costs next to per-sample gradients.
"""

from __future__ import annotations

import argparse
import warnings

import torch

from fedvision.models import create_model
from fedvision.train import TrainConfig, train_private

warnings.filterwarnings("ignore")


def throughput(name: str, secure: bool, data, batch: int, repeats: int) -> float:
    best = 0.0
    for _ in range(repeats):
        torch.manual_seed(0)
        model = create_model(name, 2, img_size=32)
        cfg = TrainConfig(epochs=1, batch_size=batch, max_physical_batch_size=batch, lr=0.01, noise_multiplier=1.0,
                          seed=0, insecure_dp_seed=None if secure else 0)
        best = max(best, len(data) / train_private(model, data, cfg).seconds)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["fedvision_cnn", "resnet18"])
    p.add_argument("--samples", type=int, default=512)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.rand(args.samples, 3, 32, 32, generator=g),
                                          torch.randint(0, 2, (args.samples,), generator=g))
    print(f"{args.threads} threads, 32×32 inputs, batch {args.batch}, {args.samples} samples, best of {args.repeats}")
    print("| model | parameters | plain noise samples/s | secure noise samples/s | cost of secure mode |")
    print("|---|---|---|---|---|")
    for name in args.models:
        params = sum(p.numel() for p in create_model(name, 2, img_size=32).parameters())
        plain = throughput(name, False, data, args.batch, args.repeats)
        secure = throughput(name, True, data, args.batch, args.repeats)
        print(f"| {name} | {params:,} | {plain:.0f} | {secure:.0f} | {plain / secure - 1:+.1%} |", flush=True)


if __name__ == "__main__":
    main()
