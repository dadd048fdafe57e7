"""``fedvision data``: inspect a dataset spec, write synthetic-derm to disk as site folders.

Heavy imports (torch, pandas, Pillow) happen inside the handlers: the main CLI imports this module to
register the parser for every command.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from fedvision.errors import DataError


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    data = subparsers.add_parser("data", help="inspect datasets, generate synthetic-derm",
                                 description="Inspect datasets and generate the bundled synthetic-derm data.")
    commands = data.add_subparsers(dest="data_command", metavar="DATA_COMMAND")
    data.set_defaults(handler=lambda args: _usage(data))

    inspect = commands.add_parser(
        "inspect", help="load a dataset spec and print sizes, classes, attributes and hygiene",
        description="Load SPEC (folder:PATH, manifest:PATH.csv, npz:PATH, digits, synthetic-derm[:SEED]) "
                    "and print sizes, classes, class counts, attribute distributions and the hygiene summary.")
    inspect.add_argument("spec", metavar="SPEC")
    inspect.add_argument("--image-size", type=int, default=32, metavar="N", help="side length after resize (32)")
    inspect.add_argument("--channels", type=int, choices=(1, 3), default=3)
    inspect.add_argument("--split", default=None, help="train/val/test where the spec has splits")
    inspect.add_argument("--skip-bad", action="store_true", help="skip and list bad files instead of failing")
    inspect.add_argument("--classes", default=None, metavar="A,B,...", help="fixed class list, comma-separated")
    inspect.add_argument("--min-resolution", type=int, default=None, metavar="N",
                         help="drop images whose shorter original side is below N pixels")
    inspect.add_argument("--dedup", choices=("exact", "near"), default=None, help="drop duplicate images")
    inspect.add_argument("--near-threshold", type=int, default=None, metavar="BITS",
                         help="dHash Hamming distance for --dedup near (default 6 of 64)")
    inspect.add_argument("--dicom-window", default=None, metavar="CENTER,WIDTH", help="override DICOM windowing")
    inspect.add_argument("--json", action="store_true", help="print the summary as JSON")
    inspect.set_defaults(handler=run_inspect)

    synth = commands.add_parser(
        "synth", help="write synthetic-derm as PNG site folders with manifests",
        description="Write synthetic-derm as DIR/site-K/images/*.png + DIR/site-K/manifest.csv and the "
                    "held-out test split as DIR/test/.")
    synth.add_argument("--out", required=True, type=Path, metavar="DIR")
    synth.add_argument("--sites", required=True, type=int, metavar="K")
    synth.add_argument("--per-site", type=int, default=600, metavar="N")
    synth.add_argument("--test-size", type=int, default=600, metavar="N")
    synth.add_argument("--seed", type=int, default=0, metavar="S")
    synth.add_argument("--image-size", type=int, default=32, metavar="N")
    synth.add_argument("--force", action="store_true", help="write into a non-empty DIR")
    synth.set_defaults(handler=run_synth)


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 2


def run_inspect(args: argparse.Namespace) -> int:
    from fedvision.data.sources import load_dataset

    threshold = {} if args.near_threshold is None else {"near_threshold": args.near_threshold}
    loaded = load_dataset(args.spec, image_size=args.image_size, channels=args.channels, skip_bad=args.skip_bad,
                          split=args.split, classes=_split_list(args.classes), dicom_window=_window(args.dicom_window),
                          min_resolution=args.min_resolution, dedup=args.dedup, **threshold)
    if args.json:
        summary = dict(loaded.summary, attributes=_attribute_summary(loaded.attributes))
        print(json.dumps(summary, indent=2, default=_json_default))
    else:
        print(format_report(loaded))
    return 0


def _split_list(text: str | None) -> list[str] | None:
    if text is None:
        return None
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise DataError(f"--classes {text!r}: expected comma-separated class names")
    return names


def _window(text: str | None) -> tuple[float, float] | None:
    if text is None:
        return None
    try:
        center, width = (float(v) for v in text.split(","))
    except ValueError:
        raise DataError(f"--dicom-window {text!r}: expected CENTER,WIDTH, e.g. 40,400") from None
    return center, width


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)


def _attribute_summary(attributes) -> dict[str, Any]:
    """Per attribute column: value counts for categories, min/median/max for many-valued numbers."""
    import pandas as pd

    from fedvision.data.partitioning import group_order

    out: dict[str, Any] = {}
    for column in attributes.columns:
        values = attributes[column]
        present = values.dropna()
        entry: dict[str, Any] = {"missing": int(values.isna().sum())}
        if pd.api.types.is_numeric_dtype(values) and present.nunique() > 10:
            entry.update(min=float(present.min()), median=float(present.median()), max=float(present.max()))
        else:
            counts = present.value_counts()
            entry["counts"] = {str(k): int(counts[k]) for k in group_order(counts.index)}
        out[str(column)] = entry
    return out


def format_report(loaded) -> str:
    """The plain-text report ``fedvision data inspect`` prints."""
    summary, hygiene = loaded.summary, loaded.summary["hygiene"]
    n = summary["num_samples"]
    c, h, w = summary["image_shape"]
    lines = [f"source:   {loaded.source}",
             f"samples:  {n} of {summary['num_rows']} rows/files; images {c}×{h}×{w} float32 in [0, 1]"]
    lines.append(f"classes:  {len(loaded.classes)}")
    width = max(len(name) for name in loaded.classes)
    for name, count in summary["class_counts"].items():
        lines.append(f"  {name:<{width}}  {count:>6}  {100.0 * count / n:5.1f}%")
    attributes = _attribute_summary(loaded.attributes)
    lines.append(f"attributes: {', '.join(attributes) if attributes else 'none'}")
    for column, entry in attributes.items():
        if "counts" in entry:
            text = ", ".join(f"{k} {v} ({100.0 * v / n:.1f}%)" for k, v in entry["counts"].items())
        else:
            text = f"min {entry['min']:g}, median {entry['median']:g}, max {entry['max']:g}"
        missing = f"; missing {entry['missing']}" if entry["missing"] else ""
        lines.append(f"  {column}: {text}{missing}")
    lines.append(f"skipped:  {summary['num_skipped']}")
    shown = 20
    by_row = summary["spec"].startswith("manifest:")  # other sources are named by file or array index
    for item in summary["skipped"][:shown]:
        row = f"row {item['row']}: " if by_row else ""
        lines.append(f"  {row}{item['file']}: {item['reason']}")
    if summary["num_skipped"] > shown:
        lines.append(f"  ... and {summary['num_skipped'] - shown} more")
    if summary.get("ignored_files"):
        lines.append(f"ignored:  {summary['ignored_files']} files without an image extension")
    lines.append("hygiene:")
    if hygiene["min_resolution"] is None:
        lines.append("  min resolution: off")
    else:
        lines.append(f"  min resolution {hygiene['min_resolution']}px: {hygiene['low_resolution']} removed")
    if hygiene["dedup"] is None:
        lines.append("  duplicates: not checked")
    else:
        lines.append(f"  exact duplicates: {hygiene['exact_duplicates']} removed")
        lines += [f"    rows {i} and {j}" for i, j in hygiene["exact_duplicate_pairs"][:shown]]
        if hygiene["dedup"] == "near":
            lines.append(f"  near duplicates (dHash ≤ {hygiene['near_threshold']} bits): "
                         f"{hygiene['near_duplicates']} removed, {hygiene['near_duplicate_pair_count']} pairs")
            lines += [f"    rows {i} and {j}" for i, j in hygiene["near_duplicate_pairs"][:shown]]
        if hygiene["duplicate_label_conflicts"]:
            lines.append(f"  duplicate pairs with different labels: {hygiene['duplicate_label_conflicts']}")
    lines.append(f"  unknown labels: {hygiene['unknown_labels']}")
    weights = ", ".join(f"{name} {wt:.3f}" for name, wt in zip(loaded.classes, hygiene["class_weights"]))
    lines.append(f"  class weights (inverse frequency, mean 1): {weights}")
    lines.append(f"  augmentation: {'on' if hygiene['augment'] else 'off'}")
    return "\n".join(lines)


def run_synth(args: argparse.Namespace) -> int:
    from fedvision.data.synthetic import write_synthetic_derm

    out: Path = args.out
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not args.force:
        raise DataError(f"--out {out}: folder is not empty (use --force to write into it)")
    written = write_synthetic_derm(out, seed=args.seed, sites=args.sites, per_site=args.per_site,
                                   test_size=args.test_size, image_size=args.image_size)
    for name, count in written.items():
        print(f"{out / name / 'manifest.csv'}: {count} images")
    return 0
