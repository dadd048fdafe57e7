"""Dataset specs, image decoding and ``load_dataset``.

A spec names where samples come from (``folder:PATH``, ``manifest:PATH.csv``, ``npz:PATH``, ``digits``,
``synthetic-derm[:SEED]``). Each spec becomes a ``Source``: a list of items, each knowing its row, label and
how to decode its image, plus the attribute rows. ``load_dataset`` then decodes every item up front into one
uint8 tensor, so every bad file is found at load time, applies the hygiene filters and reports what it did.
"""

from __future__ import annotations

import functools
import hashlib
import io
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from fedvision.data.augment import Augmentation
from fedvision.data.dataset import ImageDataset, LoadedDataset, class_counts
from fedvision.data.dicom import read_dicom
from fedvision.data.hygiene import DEDUP_MODES, DEFAULT_NEAR_THRESHOLD, class_weights, dhash, find_duplicates, pixel_sha256
from fedvision.data.messages import one_line
from fedvision.errors import DataError

SPEC_FORMS = "folder:PATH, manifest:PATH.csv, npz:PATH, digits, synthetic-derm[:SEED]"
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
DICOM_SUFFIXES = frozenset({".dcm", ".dicom"})
# Refuse images above this many pixels before decoding them: a tiny compressed file can expand to gigabytes.
DEFAULT_MAX_PIXELS = 50_000_000
NPZ_SPLITS = ("train", "val", "test")
MANIFEST_REQUIRED = ("path", "label")
MAX_REPORTED_PAIRS = 1000  # duplicate pairs listed in the summary; the counts are always complete


@dataclass
class SourceItem:
    """One sample of a source, not yet decoded."""

    row: int  # manifest: 1-based data row; folder: position in the sorted listing; arrays: index
    where: str  # message prefix naming the file and row, e.g. "data/manifest.csv row 3: images/a.png"
    file: str  # the file as the user wrote it (or the array element), for the skipped list
    label: Any  # class name (str) or, for array sources, class index (int); None when the cell is empty
    read: Callable[[], Image.Image]  # decodes; raises DataError(reason)


@dataclass
class Source:
    items: list[SourceItem]
    attributes: pd.DataFrame  # one row per item, same order
    classes: list[str] | None  # the source's own class list; None: derived from the labels
    labels_are_indices: bool
    description: str  # e.g. "manifest:/abs/path.csv"
    sha256: str | None = None  # of the manifest or archive file (or the generated arrays) for provenance
    ignored_files: int = 0  # folder: files without an image extension


def load_dataset(spec: str, image_size: int = 32, channels: int = 3, skip_bad: bool = False,
                 split: str | None = None, *, classes: Sequence[str] | None = None,
                 dicom_window: tuple[float, float] | None = None, min_resolution: int | None = None,
                 dedup: str | None = None, near_threshold: int = DEFAULT_NEAR_THRESHOLD,
                 augment: bool = False, augment_seed: int = 0,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> LoadedDataset:
    """Load ``spec`` (one of ``SPEC_FORMS``) into memory.

    Images become float32 (channels, image_size, image_size) in [0, 1]. Bad input raises one ``DataError``
    naming the file and row; with ``skip_bad`` the sample is skipped and listed in ``summary["skipped"]``.
    ``classes`` fixes the class list (labels outside it are bad input). ``dicom_window`` = (center, width)
    overrides the files' DICOM window. Hygiene: ``min_resolution`` drops images whose original shorter side
    is smaller; ``dedup`` = "exact" drops pixel-identical duplicates, "near" also perceptual (dHash)
    duplicates within ``near_threshold`` bits; ``augment`` turns on seeded random crop/jitter/flip.
    """
    _check_arguments(image_size, channels, min_resolution, dedup, near_threshold, max_pixels, dicom_window)
    augmentation = Augmentation(seed=augment_seed) if augment else None  # checks the seed before the slow part
    source = open_source(spec, split=split, image_size=image_size, dicom_window=dicom_window, max_pixels=max_pixels)
    class_names, label_of = _label_mapping(source, classes)
    decoded = _decode_all(source, label_of, class_names, channels, image_size, skip_bad, min_resolution, dedup)
    duplicates = None
    if dedup is not None and decoded.items:
        duplicates = find_duplicates([item.row for item in decoded.items], decoded.labels, decoded.digests,
                                     decoded.hashes if dedup == "near" else None, near_threshold)
        decoded.drop(set(duplicates.exact_removed) | set(duplicates.near_removed))
    if not decoded.items:
        raise DataError(_empty_message(source, decoded.skipped, len(decoded.low_resolution_rows), duplicates))

    labels = np.asarray(decoded.labels, dtype=np.int64)
    dataset = ImageDataset(torch.from_numpy(np.stack(decoded.arrays)), torch.from_numpy(labels), augmentation)
    attributes = source.attributes.iloc[decoded.positions].reset_index(drop=True)
    hygiene = {
        "min_resolution": min_resolution,
        "low_resolution": len(decoded.low_resolution_rows),
        "low_resolution_rows": decoded.low_resolution_rows,
        "dedup": dedup,
        "near_threshold": near_threshold if dedup == "near" else None,
        "exact_duplicates": len(duplicates.exact_removed) if duplicates else 0,
        "exact_duplicate_pairs": duplicates.exact_pairs[:MAX_REPORTED_PAIRS] if duplicates else [],
        "near_duplicates": len(duplicates.near_removed) if duplicates else 0,
        "near_duplicate_pairs": duplicates.near_pairs[:MAX_REPORTED_PAIRS] if duplicates else [],
        "near_duplicate_pair_count": len(duplicates.near_pairs) if duplicates else 0,
        "duplicate_label_conflicts": duplicates.label_conflicts if duplicates else 0,
        "unknown_labels": decoded.unknown_labels,
        "class_weights": class_weights(labels, len(class_names)),
        "augment": augment,
    }
    source_text = source.description + (f" split={split}" if split else "") + \
        (f" sha256={source.sha256}" if source.sha256 else "")
    summary = {
        "spec": spec,
        "source": source_text,
        "sha256": source.sha256,
        "split": split,
        "num_rows": len(source.items),
        "num_samples": len(labels),
        "num_classes": len(class_names),
        "class_counts": class_counts(labels, class_names),
        "image_shape": [channels, image_size, image_size],
        "num_skipped": len(decoded.skipped),
        "skipped": decoded.skipped,
        "ignored_files": source.ignored_files,
        "hygiene": hygiene,
    }
    return LoadedDataset(dataset=dataset, attributes=attributes, classes=class_names, summary=summary,
                         source=source_text)


@dataclass
class _Decoded:
    """Samples that survived decoding, in source order, with what was learned on the way."""

    items: list[SourceItem] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)  # index into source.items (and source.attributes)
    labels: list[int] = field(default_factory=list)
    arrays: list[np.ndarray] = field(default_factory=list)  # uint8 (C, H, W)
    digests: list[str] = field(default_factory=list)  # pixel sha256, when deduplicating
    hashes: list[int] = field(default_factory=list)  # dHash, when deduplicating near copies
    skipped: list[dict[str, Any]] = field(default_factory=list)
    unknown_labels: int = 0
    low_resolution_rows: list[int] = field(default_factory=list)

    def drop(self, positions: set[int]) -> None:
        keep = [i for i in range(len(self.items)) if i not in positions]
        for name in ("items", "positions", "labels", "arrays"):
            values = getattr(self, name)
            setattr(self, name, [values[i] for i in keep])


def _decode_all(source: Source, label_of: Callable[[Any], int | None], class_names: list[str], channels: int,
                image_size: int, skip_bad: bool, min_resolution: int | None, dedup: str | None) -> _Decoded:
    out = _Decoded()

    def reject(item: SourceItem, reason: str) -> None:
        if not skip_bad:
            raise DataError(f"{item.where}: {reason}")
        out.skipped.append({"row": item.row, "file": item.file, "reason": reason})

    for position, item in enumerate(source.items):
        if item.label is None:
            reject(item, "empty label")
            continue
        label = label_of(item.label)
        if label is None:
            out.unknown_labels += 1
            reject(item, f"label {item.label!r} is not one of the classes ({', '.join(class_names)})")
            continue
        try:
            image = item.read()
            if min_resolution is not None and min(image.size) < min_resolution:  # the original size
                out.low_resolution_rows.append(item.row)
                continue
            array = image_to_array(image, channels, image_size)
            digest = pixel_sha256(image) if dedup is not None else None
            perceptual = dhash(image) if dedup == "near" else None
        except DataError as e:
            reject(item, str(e))
            continue
        except Exception as e:  # anything a third-party decoder throws is still this file's problem
            reject(item, f"cannot process image ({one_line(e)})")
            continue
        out.items.append(item)
        out.positions.append(position)
        out.labels.append(label)
        out.arrays.append(array)
        if digest is not None:
            out.digests.append(digest)
        if perceptual is not None:
            out.hashes.append(perceptual)
    return out


def _check_arguments(image_size, channels, min_resolution, dedup, near_threshold, max_pixels, dicom_window) -> None:
    if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 1:
        raise DataError(f"image_size must be a positive integer, got {image_size!r}")
    if channels not in (1, 3):
        raise DataError(f"channels must be 1 or 3, got {channels!r}")
    if min_resolution is not None and (not isinstance(min_resolution, int) or min_resolution < 1):
        raise DataError(f"min_resolution must be a positive integer or None, got {min_resolution!r}")
    if dedup not in DEDUP_MODES:
        raise DataError(f"dedup must be None, 'exact' or 'near', got {dedup!r}")
    if not isinstance(near_threshold, int) or not 0 <= near_threshold <= 64:
        raise DataError(f"near_threshold must be an integer in 0..64, got {near_threshold!r}")
    if not isinstance(max_pixels, int) or max_pixels < 1:
        raise DataError(f"max_pixels must be a positive integer, got {max_pixels!r}")
    if dicom_window is not None:
        try:
            center, width = (float(v) for v in dicom_window)
        except (TypeError, ValueError):
            raise DataError(f"dicom_window must be (center, width), got {dicom_window!r}") from None
        if not width > 0:
            raise DataError(f"dicom_window width must be > 0, got {width}")


def _empty_message(source: Source, skipped: list[dict[str, Any]], low_resolution: int, duplicates) -> str:
    if not source.items:
        return f"{source.description}: empty dataset (no samples)"
    reasons = []
    if skipped:
        first = skipped[0]
        reasons.append(f"{len(skipped)} skipped as bad input (first: {first['file']}: {first['reason']})")
    if low_resolution:
        reasons.append(f"{low_resolution} below min_resolution")
    if duplicates is not None and (duplicates.exact_removed or duplicates.near_removed):
        reasons.append(f"{len(duplicates.exact_removed) + len(duplicates.near_removed)} duplicates")
    return f"{source.description}: empty dataset, no usable samples of {len(source.items)}: " + "; ".join(reasons)


# --- labels ---------------------------------------------------------------------------------------------

def _label_mapping(source: Source, classes: Sequence[str] | None) -> tuple[list[str], Callable[[Any], int | None]]:
    """The class list and a function raw label -> class index (None when the label is not a class)."""
    if classes is not None:
        if isinstance(classes, str):
            raise DataError(f"classes must be a list of class names, got the string {classes!r}")
        names = [str(c) for c in classes]
        if not names:
            raise DataError("classes is empty")
        if len(set(names)) != len(names):
            raise DataError(f"classes has duplicate names: {names}")
    elif source.classes is not None:
        names = list(source.classes)
    else:
        names = sorted_labels({str(item.label) for item in source.items if item.label is not None})
    index = {name: i for i, name in enumerate(names)}

    if source.labels_are_indices:
        return names, lambda label: int(label) if 0 <= int(label) < len(names) else None

    # A manifest may give labels as class indices when the caller supplies names ("0"/"1" for
    # ["benign", "malignant"]); only when no class name itself looks like a number, so it is never ambiguous.
    indices_allowed = classes is not None and not any(_is_int(n) for n in names)

    def label_of(label: Any) -> int | None:
        text = str(label)
        if text in index:
            return index[text]
        if indices_allowed and _is_int(text) and 0 <= int(text) < len(names):
            return int(text)
        return None

    return names, label_of


def sorted_labels(labels: set[str]) -> list[str]:
    """Sorted class names; numerically when every label is an integer (so "10" follows "9")."""
    if labels and all(_is_int(v) for v in labels):
        return sorted(labels, key=int)
    return sorted(labels)


def _is_int(text: str) -> bool:
    return re.fullmatch(r"[+-]?\d+", text.strip()) is not None


# --- specs ----------------------------------------------------------------------------------------------

def parse_spec(spec: str) -> tuple[str, str]:
    """Split a spec into (kind, argument); raises DataError for anything that is not one of SPEC_FORMS."""
    if not isinstance(spec, str) or not spec.strip():
        raise DataError(f"empty dataset spec; expected one of {SPEC_FORMS}")
    kind, _, argument = spec.strip().partition(":")
    kind = kind.lower()
    if kind in ("folder", "manifest", "npz"):
        if not argument:
            raise DataError(f"dataset spec {spec!r} needs a path: {kind}:PATH")
    elif kind == "digits":
        if argument:
            raise DataError(f"dataset spec {spec!r}: digits takes no argument")
    elif kind == "synthetic-derm":
        if argument and not re.fullmatch(r"\d+", argument):
            raise DataError(f"dataset spec {spec!r}: the seed must be a non-negative integer (synthetic-derm:SEED)")
    else:
        raise DataError(f"unknown dataset spec {spec!r}; expected one of {SPEC_FORMS}")
    return kind, argument


def open_source(spec: str, split: str | None = None, image_size: int = 32,
                dicom_window: tuple[float, float] | None = None,
                max_pixels: int = DEFAULT_MAX_PIXELS) -> Source:
    kind, argument = parse_spec(spec)
    window = None if dicom_window is None else (float(dicom_window[0]), float(dicom_window[1]))
    read_file = functools.partial(read_image_file, dicom_window=window, max_pixels=max_pixels)
    if kind == "folder":
        return _folder_source(argument, split, read_file)
    if kind == "manifest":
        return _manifest_source(argument, split, read_file)
    if kind == "npz":
        return _npz_source(argument, split)
    if kind == "digits":
        return _digits_source(split)
    return _synthetic_source(int(argument) if argument else 0, split, image_size)


def _folder_source(path_text: str, split: str | None, read_file: Callable[[Path], Image.Image]) -> Source:
    root = Path(path_text).expanduser()
    if split is not None:
        root = root / split  # folder:ROOT with split="test" reads ROOT/test/<class>/...
    if not root.is_dir():
        raise DataError(f"{root}: folder not found" if not root.exists() else f"{root}: not a folder")
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not class_dirs:
        raise DataError(f"{root}: no class subfolders (expected one subfolder per class)")
    items: list[SourceItem] = []
    ignored = 0
    for class_dir in class_dirs:
        for file in sorted(p for p in class_dir.rglob("*") if not p.name.startswith(".")):
            if file.is_dir():
                continue
            if file.suffix.lower() not in IMAGE_SUFFIXES | DICOM_SUFFIXES:
                ignored += 1
                continue
            items.append(SourceItem(row=len(items), where=str(file), file=str(file.relative_to(root)),
                                    label=class_dir.name, read=functools.partial(read_file, file)))
    return Source(items=items, attributes=pd.DataFrame(index=range(len(items))),
                  classes=[d.name for d in class_dirs], labels_are_indices=False,
                  description=f"folder:{root.resolve()}", ignored_files=ignored)


def _manifest_source(path_text: str, split: str | None, read_file: Callable[[Path], Image.Image]) -> Source:
    manifest = Path(path_text).expanduser()
    try:
        data = manifest.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path_text}: manifest not found") from None
    except IsADirectoryError:
        raise DataError(f"{path_text}: is a folder, not a manifest CSV (use folder:PATH for class folders)") from None
    except OSError as e:
        raise DataError(f"{path_text}: cannot read manifest ({e.strerror})") from None
    try:
        table = pd.read_csv(io.BytesIO(data), dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except pd.errors.EmptyDataError:
        raise DataError(f"{path_text}: manifest is empty (expected a header with columns path,label)") from None
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as e:
        raise DataError(f"{path_text}: cannot parse CSV ({one_line(e)})") from None
    table.columns = [str(c).strip() for c in table.columns]
    for column in MANIFEST_REQUIRED:
        if column not in table.columns:
            raise DataError(f"{path_text}: missing column '{column}' (columns: {', '.join(table.columns)}; "
                            f"need {', '.join(MANIFEST_REQUIRED)})")
    rows = np.arange(1, len(table) + 1)  # 1-based data rows, header not counted
    if split is not None:
        if "split" not in table.columns:
            raise DataError(f"{path_text}: split {split!r} requested but the manifest has no 'split' column")
        chosen = (table["split"].str.strip() == split).to_numpy()
        table, rows = table[chosen].reset_index(drop=True), rows[chosen]

    base = manifest.parent
    items: list[SourceItem] = []
    for row, path_value, label in zip(rows, table["path"], table["label"]):
        path_value, label = path_value.strip(), label.strip()
        where = f"{path_text} row {row}: {path_value or '(empty path)'}"
        if path_value:
            file = Path(path_value).expanduser()
            reader = functools.partial(read_file, file if file.is_absolute() else base / file)
        else:
            reader = functools.partial(_fail, "empty path")
        items.append(SourceItem(row=int(row), where=where, file=path_value, label=label or None, read=reader))
    attributes = _typed_attributes(table.drop(columns=[c for c in ("path", "label", "split") if c in table.columns]))
    return Source(items=items, attributes=attributes, classes=None, labels_are_indices=False,
                  description=f"manifest:{manifest.resolve()}", sha256=hashlib.sha256(data).hexdigest())


def _typed_attributes(table: pd.DataFrame) -> pd.DataFrame:
    """Attribute columns: empty cells become missing; columns whose every value is a number become numeric."""
    out = {}
    for column in table.columns:
        values = table[column].str.strip().replace("", pd.NA)
        try:
            out[column] = pd.to_numeric(values)
        except (ValueError, TypeError):
            out[column] = values
    return pd.DataFrame(out, index=range(len(table)))


def _fail(reason: str) -> Image.Image:
    raise DataError(reason)


def _npz_source(path_text: str, split: str | None) -> Source:
    path = Path(path_text).expanduser()
    split = split or "train"
    if split not in NPZ_SPLITS:
        raise DataError(f"{path_text}: unknown split {split!r} (npz splits: {', '.join(NPZ_SPLITS)})")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path_text}: archive not found") from None
    except OSError as e:
        raise DataError(f"{path_text}: cannot read archive ({e.strerror})") from None
    try:
        archive = np.load(io.BytesIO(data), allow_pickle=False)
        if not hasattr(archive, "files"):
            raise DataError(f"{path_text}: not an npz archive (a single .npy array)")
        arrays = {name: archive[name] for name in archive.files}
    except DataError:
        raise
    except Exception as e:  # zipfile.BadZipFile, ValueError (object arrays), OSError, EOFError ...
        raise DataError(f"{path_text}: cannot read npz archive ({one_line(e)})") from None
    images_key, labels_key = f"{split}_images", f"{split}_labels"
    for key in (images_key, labels_key):
        if key not in arrays:
            raise DataError(f"{path_text}: no '{key}' array (has: {', '.join(sorted(arrays)) or 'nothing'})")
    images = arrays[images_key]
    labels = _npz_labels(path_text, labels_key, arrays[labels_key])
    if images.dtype != np.uint8:
        raise DataError(f"{path_text}: {images_key} must be uint8, got {images.dtype}")
    if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] not in (1, 3, 4)):
        raise DataError(f"{path_text}: {images_key} must have shape (N,H,W) or (N,H,W,C) with C in 1/3/4, "
                        f"got {images.shape}")
    if len(images) != len(labels):
        raise DataError(f"{path_text}: {images_key} has {len(images)} images but {labels_key} has {len(labels)} labels")
    # Class count from every split in the archive, so a class missing from one split keeps its index.
    all_labels = [_npz_labels(path_text, k, v) for k, v in arrays.items() if k.endswith("_labels")]
    num_classes = int(max((int(v.max()) for v in all_labels if v.size), default=-1)) + 1
    items = [SourceItem(row=i, where=f"{path_text} {images_key}[{i}]", file=f"{images_key}[{i}]",
                        label=int(labels[i]), read=functools.partial(_array_image, images, i))
             for i in range(len(images))]
    return Source(items=items, attributes=pd.DataFrame(index=range(len(items))),
                  classes=[str(i) for i in range(num_classes)], labels_are_indices=True,
                  description=f"npz:{path.resolve()}", sha256=hashlib.sha256(data).hexdigest())


def _npz_labels(path_text: str, key: str, labels: np.ndarray) -> np.ndarray:
    if labels.ndim == 2 and labels.shape[1] == 1:  # MedMNIST stores (N, 1)
        labels = labels[:, 0]
    if labels.ndim != 1:
        raise DataError(f"{path_text}: {key} must have shape (N,) or (N,1), got {labels.shape} "
                        f"(multi-label archives are not supported)")
    if not np.issubdtype(labels.dtype, np.integer):
        if not (np.issubdtype(labels.dtype, np.floating) and np.all(np.mod(labels, 1) == 0)):
            raise DataError(f"{path_text}: {key} must hold integer class indices, got {labels.dtype}")
    labels = labels.astype(np.int64)
    if labels.size and labels.min() < 0:
        raise DataError(f"{path_text}: {key} has a negative label ({int(labels.min())})")
    return labels


def _array_image(images: np.ndarray, index: int) -> Image.Image:
    array = images[index]
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    return Image.fromarray(np.ascontiguousarray(array))


def _digits_source(split: str | None) -> Source:
    from importlib import resources

    import sklearn
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)  # 0..16 -> [0, 1]
    labels = digits.target.astype(np.int64)
    positions = np.arange(len(labels))
    if split is not None:
        if split not in ("train", "test"):
            raise DataError(f"digits: unknown split {split!r} (splits: train, test)")
        train, test = train_test_split(positions, test_size=0.25, stratify=labels, random_state=0)
        positions = np.sort(train if split == "train" else test)
    items = [SourceItem(row=int(i), where=f"digits[{i}]", file=f"digits[{i}]", label=int(labels[i]),
                        read=functools.partial(_float_image, images, int(i))) for i in positions]
    try:
        bundled = (resources.files("sklearn.datasets") / "data" / "digits.csv.gz").read_bytes()
        digest = hashlib.sha256(bundled).hexdigest()
    except OSError:
        digest = None
    return Source(items=items, attributes=pd.DataFrame(index=range(len(items))),
                  classes=[str(d) for d in range(10)], labels_are_indices=True,
                  description=f"digits (scikit-learn {sklearn.__version__} load_digits)", sha256=digest)


def _float_image(images: np.ndarray, index: int) -> Image.Image:
    return Image.fromarray(images[index])


@functools.lru_cache(maxsize=2)
def _synthetic(seed: int, image_size: int):
    from fedvision.data.synthetic import generate_synthetic_derm

    generated = generate_synthetic_derm(seed=seed, image_size=image_size)
    for part in (generated.train, generated.test):
        part.images.flags.writeable = False  # cached and shared between loads
    return generated


def _synthetic_source(seed: int, split: str | None, image_size: int) -> Source:
    from fedvision import __version__

    if split not in (None, "train", "test"):
        raise DataError(f"synthetic-derm: unknown split {split!r} (splits: train, test)")
    # Render at the requested size (lesion geometry is resolution-independent); below 8 px, render at 8.
    generated = _synthetic(seed, max(image_size, 8))
    part = generated.test if split == "test" else generated.train
    digest = hashlib.sha256(part.images.tobytes() + part.labels.tobytes()).hexdigest()
    items = [SourceItem(row=i, where=f"synthetic-derm:{seed}[{i}]", file=f"synthetic-derm:{seed}[{i}]",
                        label=int(part.labels[i]), read=functools.partial(_array_image, part.images, i))
             for i in range(len(part.labels))]
    params = ", ".join(f"{k}={v}" for k, v in generated.params.items() if k != "seed")
    return Source(items=items, attributes=part.attributes.copy(), classes=list(generated.classes),
                  labels_are_indices=True,
                  description=f"synthetic-derm:{seed} (fedvision {__version__} generator; {params})",
                  sha256=digest)


# --- decoding -------------------------------------------------------------------------------------------

def read_image_file(path: Path, dicom_window: tuple[float, float] | None = None,
                    max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode an image or DICOM file fully into memory; raises DataError(reason) for any bad file."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise DataError("file not found") from None
    except OSError as e:
        raise DataError(f"cannot access file ({e.strerror})") from None
    if path.is_dir():
        raise DataError("is a folder, not an image file")
    if size == 0:
        raise DataError("empty file (0 bytes)")
    if path.suffix.lower() in DICOM_SUFFIXES or _has_dicom_preamble(path):
        return read_dicom(path, dicom_window, max_pixels)
    return _read_pillow(path, max_pixels)


def _has_dicom_preamble(path: Path) -> bool:
    """DICOM Part 10 files carry 'DICM' after a 128-byte preamble, whatever their extension."""
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return head[128:132] == b"DICM"


def _read_pillow(path: Path, max_pixels: int) -> Image.Image:
    try:
        with open(path, "rb") as f, warnings.catch_warnings():
            # Our own pixel limit below is the policy; Pillow's bomb warning would only repeat it.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(f)
            width, height = image.size  # from the header; nothing decoded yet
            if width * height > max_pixels:
                raise DataError(_too_large(width, height, max_pixels))
            image.load()
            # Camera JPEGs store rotation in EXIF; apply it so the pixels are what a viewer shows.
            ImageOps.exif_transpose(image, in_place=True)
            return image
    except DataError:
        raise
    except Image.DecompressionBombError as e:  # Pillow's own limit, checked while reading the header
        raise DataError(f"image too large, refused before decoding ({one_line(e)})") from None
    except UnidentifiedImageError:
        raise DataError("not a recognised image file (PNG, JPEG, BMP, TIFF or DICOM)") from None
    except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError, struct.error, ... for bad files
        raise DataError(f"cannot decode image ({one_line(e)})") from None


def _too_large(width: int, height: int, max_pixels: int) -> str:
    return (f"image is {width}×{height} = {width * height / 1e6:.0f} MP, over the limit of "
            f"{max_pixels / 1e6:.0f} MP (refused before decoding)")


def image_to_array(image: Image.Image, channels: int, size: int) -> np.ndarray:
    """A decoded image as uint8 (channels, size, size): converted, then resized bilinearly (antialiased)."""
    try:
        if image.mode == "F" or image.mode.startswith("I"):
            return _float_to_array(image, channels, size)
        target = "L" if channels == 1 else "RGB"
        if image.mode != target:
            image = image.convert(target)
        if image.size != (size, size):
            # Pillow's resampling filters widen their support when downscaling, i.e. they antialias.
            image = image.resize((size, size), Image.BILINEAR)
        array = np.asarray(image, dtype=np.uint8)
    except Exception as e:
        raise DataError(f"cannot convert image (mode {image.mode}) ({one_line(e)})") from None
    return array[None] if channels == 1 else np.ascontiguousarray(array.transpose(2, 0, 1))


def _float_to_array(image: Image.Image, channels: int, size: int) -> np.ndarray:
    """16/32-bit integer and float images: scale to [0, 1] in float, resize in float, then quantise once."""
    values = np.asarray(image, dtype=np.float32)
    if image.mode == "F":
        low, high = float(values.min()), float(values.max())
        if low < 0.0 or high > 1.0:  # not already in [0, 1] (as DICOM and digits are): stretch min–max
            values = (values - low) / (high - low) if high > low else np.zeros_like(values)
    else:
        values = np.clip(values, 0, 65535) / 65535.0
    resized = Image.fromarray(values).resize((size, size), Image.BILINEAR) if values.shape != (size, size) else None
    if resized is not None:
        values = np.asarray(resized, dtype=np.float32)
    gray = (np.clip(values, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return gray[None] if channels == 1 else np.repeat(gray[None], 3, axis=0)
