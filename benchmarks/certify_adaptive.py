"""Adaptive certification against Cohen et al.'s fixed-n CERTIFY, and certification throughput against plain
batched inference of the same model, side by side in one process.

Model: ``--model MODEL.pt --data SPEC`` (e.g. the demo's ``demo-output/run/global_model.pt`` and
``synthetic-derm:0``; the split is ``--split``, default test), or, without ``--model``, a ``fedvision_cnn``
trained here for a few seconds with Gaussian noise augmentation at σ on ``--train`` (``digits``: scikit-learn's
8×8 digits; ``synthetic-derm``: the demo's 32×32 data, a stand-in for the demo model when there is none).

Printed, each with its parameters:

1. throughput: samples per second of ``Smooth``'s sampling (noise drawn on the model's device, images packed
   into forward passes of ``--batch-size``) and of plain inference on ready-made batches of the same size,
   interleaved ``--repeats`` times; the ratio (goal ≥ 0.95);
2. on ``--images`` images evenly spaced through the split: the certified-accuracy curve and samples per image
   (n0 included) of the adaptive default (n ≤ 1,000), adaptive with n ≤ ``--fixed-n`` and fixed-n CERTIFY with
   ``--fixed-n`` (default 10,000), same seed and images;
3. with ``--large-n N`` (e.g. 100000): adaptive with n ≤ N against Cohen's fixed n = N, whose cost is exactly
   n0 + N samples per image; ``--large-fixed`` also runs that fixed-n CERTIFY (slow on CPU) to compare curves.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/certify_adaptive.py --train digits --threads 1
    .venv/bin/python benchmarks/certify_adaptive.py --model demo-output/run/global_model.pt --data synthetic-derm:0
"""

from __future__ import annotations

import argparse
import os
import time

import torch


def train_stand_in(name: str, sigma: float, seed: int = 0):
    """A noise-augmented ``fedvision_cnn`` (non-private, a few epochs of Adam) and its test split."""
    from fedvision.data import load_dataset
    from fedvision.models import create_model

    size, channels, epochs = (8, 1, 15) if name == "digits" else (32, 3, 6)
    train = load_dataset(name if name == "digits" else "synthetic-derm:0", image_size=size, channels=channels,
                         split="train")
    test = load_dataset(name if name == "digits" else "synthetic-derm:0", image_size=size, channels=channels,
                        split="test")
    torch.manual_seed(seed)
    model = create_model("fedvision_cnn", len(train.classes), in_chans=channels, img_size=size,
                         dp=name != "digits")
    x = torch.stack([train.dataset[i][0] for i in range(len(train.dataset))])
    y = torch.tensor([int(train.dataset[i][1]) for i in range(len(train.dataset))])
    optimizer = torch.optim.Adam(model.parameters(), 3e-3)
    t0 = time.perf_counter()
    for _ in range(epochs):
        for batch in torch.randperm(len(x)).split(64):
            loss = torch.nn.functional.cross_entropy(model(x[batch] + sigma * torch.randn_like(x[batch])), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    print(f"model: fedvision_cnn trained here on {name} ({len(x)} images, {epochs} epochs, noise σ = {sigma}) "
          f"in {time.perf_counter() - t0:.0f} s")
    return model, test.dataset


def throughput(model, dataset, sigma: float, batch_size: int, repeats: int, images: int = 8) -> None:
    from audit.smoothing import Smooth, _fast_layout, infer_num_classes

    xs = torch.stack([torch.as_tensor(dataset[i][0]) for i in range(images)])
    device = next(model.parameters()).device
    smooth = Smooth(model, infer_num_classes(model, xs[0]), sigma, generator=0)
    per_image = 2 * batch_size // images  # two forward passes of a full batch
    ready = xs.repeat_interleave(per_image, 0).to(device)

    def plain() -> float:
        t0 = time.perf_counter()
        with torch.inference_mode():
            for start in range(0, len(ready), batch_size):
                model(_fast_layout(ready[start:start + batch_size])).argmax(1).cpu()
        return len(ready) / (time.perf_counter() - t0)

    def certification() -> float:
        t0 = time.perf_counter()
        smooth._sample_noise_many(xs, [per_image] * images, batch_size)
        return len(ready) / (time.perf_counter() - t0)

    plain(), certification()  # warm up
    # Interleaved, so that load from other jobs on a shared machine hits both alike; best of each and the median
    # of the back-to-back ratios.
    pairs = [(plain(), certification()) for _ in range(repeats)]
    best_plain, best_cert = max(p for p, _ in pairs), max(c for _, c in pairs)
    median = sorted(c / p for p, c in pairs)[len(pairs) // 2]
    print(f"throughput on {device} ({torch.get_num_threads()} threads), batch {batch_size}, {repeats} interleaved "
          f"runs: plain inference {best_plain:,.0f} samples/s, certification sampling {best_cert:,.0f} samples/s "
          f"(best of each); ratio {best_cert / best_plain:.3f} best, {median:.3f} median of pairs (goal ≥ 0.95)")


def compare(model, dataset, sigma: float, images: int, runs: list[tuple[str, str, int]], batch_size: int,
            radii) -> dict:
    from audit.smoothing import certify_dataset

    out = {}
    for label, method, n in runs:
        result = certify_dataset(model, dataset, sigma, n=n, method=method, limit=images, batch_size=batch_size,
                                 radii=radii, seed=0, progress=False)
        out[label] = result
        curve = "  ".join(f"r={p['radius']:g}: {p['certified_accuracy']:.3f}" + ("*" if p[
            "above_max_certifiable_radius"] else "") for p in result["curve"])
        s = result["samples"]
        print(f"  {label:<30} {curve}  | samples/image mean {s['mean']:>9,.0f} max {s['max']:>7,}  "
              f"| {result['seconds']:.0f} s, {result['samples_per_second']:,.0f} samples/s")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model")
    parser.add_argument("--data")
    parser.add_argument("--split", default="test")
    parser.add_argument("--train", choices=("digits", "synthetic-derm"), default="digits")
    parser.add_argument("--sigma", type=float, default=0.25)
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--fixed-n", type=int, default=10_000)
    parser.add_argument("--large-n", type=int, default=0)
    parser.add_argument("--large-images", type=int, default=None, help="images for --large-n (default: --images)")
    parser.add_argument("--large-fixed", action="store_true")
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--skip-throughput", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from audit import DEFAULT_ALPHA, DEFAULT_N, DEFAULT_N0, DEFAULT_RADII
    from fedvision.io import default_device

    if args.model:
        from fedvision.data import load_dataset
        from fedvision.models import load_model

        model = load_model(args.model).eval()
        meta = model.fedvision_meta
        dataset = load_dataset(args.data, image_size=meta.get("img_size") or 32, channels=meta.get("in_chans", 3),
                               split=args.split).dataset
        sigma = meta.get("noise_std") or args.sigma
        print(f"model: {args.model} on {args.data} ({args.split}), σ = {sigma}")
    else:
        model, dataset = train_stand_in(args.train, args.sigma)
        sigma = args.sigma
    model.to(default_device())
    if not args.skip_throughput:
        throughput(model, dataset, sigma, args.batch_size, args.repeats)

    print(f"certification of {args.images} images (n0 = {DEFAULT_N0}, α = {DEFAULT_ALPHA}, σ = {sigma}, seed 0; "
          f"* = above the largest certifiable radius):")
    compare(model, dataset, sigma, args.images, [
        (f"adaptive default, n ≤ {DEFAULT_N:,}", "adaptive", DEFAULT_N),
        (f"adaptive, n ≤ {args.fixed_n:,}", "adaptive", args.fixed_n),
        (f"fixed n = {args.fixed_n:,} (Cohen)", "fixed", args.fixed_n)], args.batch_size, DEFAULT_RADII)
    if args.large_n:
        images = args.large_images or args.images
        print(f"large n on {images} images:")
        runs = [(f"adaptive, n ≤ {args.large_n:,}", "adaptive", args.large_n)] + \
            ([(f"fixed n = {args.large_n:,} (Cohen)", "fixed", args.large_n)] if args.large_fixed else [])
        result = compare(model, dataset, sigma, images, runs, args.batch_size, DEFAULT_RADII)
        mean = result[runs[0][0]]["samples"]["mean"]
        print(f"  Cohen's fixed n = {args.large_n:,} spends exactly {DEFAULT_N0 + args.large_n:,} samples per image: "
              f"{(DEFAULT_N0 + args.large_n) / mean:.1f}× the adaptive mean of {mean:,.0f}")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"1-minute load average {load:.1f} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
