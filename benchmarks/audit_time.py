"""How long the default robustness audit takes: certify 100 test images of the demo-sized model
(``fedvision_cnn``, 2 classes, 32×32 RGB) and run the default attack suite on them.

Goal: ≤ 90 s on 2 CPU cores. The model is trained for a few seconds with Gaussian noise augmentation
(σ = 0.25) on a synthetic two-class task, so it is accurate and behaves like the demo model under noise
(an untrained model would make attacks and smoothing look cheaper than they are).
On a machine shared with other jobs, 2 OpenMP threads can be several times slower than 1 (threads spin
waiting for a busy core); the load average is printed so the number can be read in context.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/audit_time.py [--images 100] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from torch.utils.data import TensorDataset


def synthetic_task(count: int, seed: int) -> TensorDataset:
    """Two classes told apart by a bright square's position on a textured background, values in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (count,), generator=g)
    images = 0.3 + 0.2 * torch.rand(count, 3, 32, 32, generator=g)
    for i, y in enumerate(labels.tolist()):
        r = 4 + int(torch.randint(0, 8, (1,), generator=g))
        c = (4 if y == 0 else 18) + int(torch.randint(0, 8, (1,), generator=g))
        images[i, :, r:r + 8, c:c + 8] += 0.4
    return TensorDataset(images.clamp(0, 1), labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from audit.robustness import RobustnessOptions, run_robustness_audit
    from fedvision.models import create_model
    from fedvision.train import TrainConfig, evaluate, train_nonprivate

    torch.manual_seed(0)
    model = create_model("fedvision_cnn", 2, in_chans=3, img_size=32)
    train, test = synthetic_task(512, seed=1), synthetic_task(args.images, seed=2)
    t0 = time.perf_counter()
    train_nonprivate(model, train, TrainConfig(epochs=2, batch_size=32, lr=3e-3, optimizer="adam", noise_std=0.25,
                                               device="cpu"))
    print(f"setup: trained for {time.perf_counter() - t0:.1f} s, clean accuracy "
          f"{evaluate(model, test, device='cpu').accuracy:.3f}")

    options = RobustnessOptions(limit=args.images, progress=False)
    t0 = time.perf_counter()
    result = run_robustness_audit(model, test, options)
    total = time.perf_counter() - t0

    cert = result["certification"]
    print(f"certification: {cert['seconds']:.1f} s for {cert['params']['num_samples']} images "
          f"(n0={options.n0}, n={options.n}, σ={options.sigma}); "
          f"certified accuracy {result['summary']['certified_accuracy']}")
    seen = set()
    for row in result["attacks"]["rows"]:
        key = (row["name"], row["eps"], row["steps"])
        if key in seen:
            continue
        seen.add(key)
        smoothed = row.get("smoothed_robust_accuracy", float("nan"))
        print(f"  {row['name']:>10} ε={row['eps']:.4g} steps={row['steps']}: robust {row['robust_accuracy']:.2f} "
              f"(attack {row['seconds']:.1f} s); smoothed robust {smoothed:.2f}")
    failed = result["summary"]["sanity_checks_failed"]
    print(f"sanity checks: {'all passed' if not failed else failed}")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"TOTAL audit time: {total:.1f} s on {torch.get_num_threads()} threads (goal ≤ 90 s); "
          f"1-minute load average {load:.1f} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
