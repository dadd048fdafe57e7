"""Cost of secure-mode DP noise (Opacus's sum of four Gaussians, against floating-point attacks on Gaussian
sampling) against plain Gaussian noise, measured side by side in one process:

    python benchmarks/secure_noise.py [--models fedvision_cnn resnet18] [--samples 384]

Per model: the time to draw one step's noise for all trainable parameters, plain and secure, and the time of one
whole DP-SGD step (train_private, batch 64, 32×32 inputs, the default secure mode). The last column is what
secure mode adds to a training step. Drawing noise is timed directly, best of several, because it is a small
part of a step whose time varies more than that from run to run on a shared machine.
"""

from __future__ import annotations

import time
import warnings

import torch

from _common import parse_args, random_images
from fedvision.models import create_model
from fedvision.train import TrainConfig, train_private

warnings.filterwarnings("ignore")


def noise_seconds(parameters: int, secure: bool, repeats: int) -> float:
    from opacus.optimizers.optimizer import _generate_noise

    reference, generator = torch.zeros(parameters), torch.Generator().manual_seed(0)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        _generate_noise(1.0, reference, generator=generator, secure_mode=secure)
        best = min(best, time.perf_counter() - start)
    return best


def step_seconds(name: str, data, batch: int, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        torch.manual_seed(0)
        model = create_model(name, 2, img_size=32)
        cfg = TrainConfig(epochs=1, batch_size=batch, max_physical_batch_size=batch, lr=0.01, noise_multiplier=1.0)
        result = train_private(model, data, cfg)
        best = min(best, result.seconds / result.steps)
    return best


def main() -> None:
    args = parse_args(__doc__, ["fedvision_cnn", "resnet18"], 384)
    data = random_images(args.samples)
    print(f"{args.threads} threads, 32×32 inputs, batch {args.batch}")
    print("| model | parameters | plain noise per step | secure noise per step | DP-SGD step (secure) | secure mode adds |")
    print("|---|---|---|---|---|---|")
    for name in args.models:
        parameters = sum(q.numel() for q in create_model(name, 2, img_size=32).parameters() if q.requires_grad)
        plain, secure = noise_seconds(parameters, False, 5), noise_seconds(parameters, True, 5)
        step = step_seconds(name, data, args.batch, args.repeats)
        print(f"| {name} | {parameters:,} | {plain * 1e3:.1f} ms | {secure * 1e3:.1f} ms | {step * 1e3:.0f} ms | "
              f"{(secure - plain) / (step - (secure - plain)):+.1%} |", flush=True)


if __name__ == "__main__":
    main()
