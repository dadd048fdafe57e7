"""fedvision.data loading: every spec from real files written here, DICOM, bad input, the inspect command."""

from __future__ import annotations

import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from fedvision.cli import main
from fedvision.data import LoadedDataset, load_dataset, parse_spec
from fedvision.data.sources import sorted_labels
from fedvision.errors import DataError

REPO = Path(__file__).resolve().parents[1]


def smooth_image(seed: int, size: int = 40, mode: str = "RGB") -> np.ndarray:
    """A random but smooth image (upsampled 4×4 noise): distinct per seed, stable under re-encoding."""
    rng = np.random.default_rng(seed)
    channels = 3 if mode == "RGB" else 1
    small = rng.integers(0, 256, size=(4, 4, channels), dtype=np.uint8)
    image = Image.fromarray(small if channels == 3 else small[..., 0]).resize((size, size), Image.BICUBIC)
    return np.asarray(image)


def write_manifest(path: Path, rows: list[dict]) -> Path:
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def one_line_error(excinfo: pytest.ExceptionInfo, *fragments: str) -> str:
    message = str(excinfo.value)
    assert isinstance(excinfo.value, DataError)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


def check_images(loaded: LoadedDataset, channels: int = 3, size: int = 32) -> None:
    assert len(loaded) == len(loaded.attributes)
    for i in range(len(loaded)):
        image, label = loaded.dataset[i]
        assert image.dtype == torch.float32 and image.shape == (channels, size, size)
        assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
        assert isinstance(label, int) and 0 <= label < len(loaded.classes)


# --- folder: PNG, JPEG, BMP, TIFF -----------------------------------------------------------------------

@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    root = tmp_path / "folder"
    (root / "cat").mkdir(parents=True)
    (root / "dog" / "nested").mkdir(parents=True)
    solid = lambda rgb: np.tile(np.array(rgb, dtype=np.uint8), (30, 40, 1))  # noqa: E731  (H=30, W=40)
    Image.fromarray(solid((255, 0, 0))).save(root / "cat" / "red.png")
    Image.fromarray(solid((0, 255, 0))).save(root / "cat" / "green.jpg", quality=95)
    Image.fromarray(solid((0, 0, 255))).save(root / "dog" / "blue.bmp")
    Image.fromarray(np.full((50, 50), 128, dtype=np.uint8)).save(root / "dog" / "gray.tif")
    Image.fromarray(np.full((20, 20), 65535, dtype=np.uint16)).save(root / "dog" / "nested" / "white16.png")
    (root / "dog" / "notes.txt").write_text("not an image")
    return root


def test_folder_reads_every_format(image_folder: Path):
    loaded = load_dataset(f"folder:{image_folder}")
    check_images(loaded)
    assert loaded.classes == ["cat", "dog"]
    assert loaded.summary["class_counts"] == {"cat": 2, "dog": 3}
    assert loaded.summary["ignored_files"] == 1  # notes.txt
    assert list(loaded.attributes.columns) == [] and len(loaded.attributes) == 5
    by_colour = [loaded.dataset[i][0].mean(dim=(1, 2)) for i in range(5)]  # per-channel means
    green, red, blue, gray, white = by_colour  # sorted: cat/green.jpg, cat/red.png, dog/blue.bmp, dog/gray.tif, ...
    assert torch.allclose(red, torch.tensor([1.0, 0.0, 0.0]))
    assert torch.allclose(blue, torch.tensor([0.0, 0.0, 1.0]))
    assert torch.allclose(green, torch.tensor([0.0, 1.0, 0.0]), atol=0.03)  # JPEG is lossy
    assert torch.allclose(gray, torch.full((3,), 128 / 255))  # grayscale replicated to 3 channels
    assert torch.allclose(white, torch.ones(3))  # 16-bit scaled by its range, not clipped
    assert [loaded.dataset[i][1] for i in range(5)] == [0, 0, 1, 1, 1]
    assert loaded.source.startswith("folder:")


def test_folder_one_channel_and_resize(image_folder: Path):
    loaded = load_dataset(f"folder:{image_folder}", image_size=16, channels=1)
    check_images(loaded, channels=1, size=16)
    red = loaded.dataset[1][0]
    assert torch.allclose(red, torch.full_like(red, round(0.299 * 255) / 255), atol=1 / 255)  # luma of pure red


def test_folder_split_subfolder(tmp_path: Path):
    for split, n in (("train", 3), ("test", 2)):
        for i in range(n):
            (tmp_path / split / "a").mkdir(parents=True, exist_ok=True)
            Image.fromarray(smooth_image(i)).save(tmp_path / split / "a" / f"{i}.png")
    assert len(load_dataset(f"folder:{tmp_path}", split="test")) == 2


# --- manifest -------------------------------------------------------------------------------------------

def test_manifest_paths_labels_attributes(tmp_path: Path):
    (tmp_path / "images").mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    rows = []
    for i in range(6):
        folder, name = (tmp_path / "images", f"images/{i}.png") if i % 2 else (elsewhere, None)
        Image.fromarray(smooth_image(i, size=48 + i)).save(folder / f"{i}.png")
        rows.append({"path": name or str(elsewhere / f"{i}.png"),  # relative to the CSV, or absolute
                     "label": ["malignant", "benign"][i % 2], "sex": "FM"[i % 2], "age": 30 + i,
                     "site": f"site-{1 + i % 3}"})
    manifest = write_manifest(tmp_path / "manifest.csv", rows)
    loaded = load_dataset(f"manifest:{manifest}", image_size=24)
    check_images(loaded, size=24)
    assert loaded.classes == ["benign", "malignant"]
    assert [loaded.dataset[i][1] for i in range(6)] == [1, 0, 1, 0, 1, 0]
    assert list(loaded.attributes.columns) == ["sex", "age", "site"]
    assert loaded.attributes["sex"].tolist() == list("FMFMFM")
    assert loaded.attributes["age"].tolist() == [30, 31, 32, 33, 34, 35]  # numeric columns stay numeric
    assert "sha256=" in loaded.source and str(manifest.resolve()) in loaded.source
    # An explicit class list fixes the order; labels may then also be given as indices.
    reordered = load_dataset(f"manifest:{manifest}", classes=["malignant", "benign"])
    assert [reordered.dataset[i][1] for i in range(6)] == [0, 1, 0, 1, 0, 1]
    rows_by_index = [dict(r, label=str(int(r["label"] == "malignant"))) for r in rows]
    indexed = load_dataset(f"manifest:{write_manifest(tmp_path / 'indexed.csv', rows_by_index)}",
                           classes=["benign", "malignant"])
    assert [indexed.dataset[i][1] for i in range(6)] == [1, 0, 1, 0, 1, 0]


def test_manifest_split_column_keeps_row_numbers(tmp_path: Path):
    rows = []
    for i in range(4):
        Image.fromarray(smooth_image(i)).save(tmp_path / f"{i}.png")
        rows.append({"path": f"{i}.png", "label": "a", "split": "test" if i >= 2 else "train"})
    rows[3]["path"] = "missing.png"
    manifest = write_manifest(tmp_path / "m.csv", rows)
    assert len(load_dataset(f"manifest:{manifest}", split="train")) == 2
    with pytest.raises(DataError) as e:
        load_dataset(f"manifest:{manifest}", split="test")
    one_line_error(e, "m.csv row 4: missing.png: file not found")


def test_numeric_labels_sort_as_numbers():
    assert sorted_labels({"10", "9", "2"}) == ["2", "9", "10"]
    assert sorted_labels({"b", "a"}) == ["a", "b"]


# --- npz, digits, synthetic-derm --------------------------------------------------------------------------

def test_npz_medmnist_style(tmp_path: Path):
    rng = np.random.default_rng(0)
    archive = tmp_path / "mnist_like.npz"
    np.savez(archive,
             train_images=rng.integers(0, 256, (10, 28, 28), dtype=np.uint8), train_labels=rng.integers(0, 3, (10, 1)),
             val_images=rng.integers(0, 256, (4, 28, 28), dtype=np.uint8), val_labels=np.zeros((4, 1), dtype=np.int64),
             test_images=rng.integers(0, 256, (6, 28, 28, 3), dtype=np.uint8), test_labels=np.full((6, 1), 4))
    train = load_dataset(f"npz:{archive}")
    check_images(train)
    assert len(train) == 10 and train.classes == ["0", "1", "2", "3", "4"]  # classes from every split
    assert train.labels.tolist() == np.load(archive)["train_labels"][:, 0].tolist()
    test = load_dataset(f"npz:{archive}", split="test", image_size=28)
    expected = torch.from_numpy(np.load(archive)["test_images"][2]).permute(2, 0, 1).float() / 255
    assert torch.equal(test.dataset[2][0], expected)  # no resize at the native size: exact
    gray = load_dataset(f"npz:{archive}", split="val", image_size=28, channels=1)
    assert torch.equal(gray.dataset[0][0][0], torch.from_numpy(np.load(archive)["val_images"][0]).float() / 255)
    assert "sha256=" in train.source
    with pytest.raises(DataError) as e:
        load_dataset(f"npz:{archive}", split="validation")
    one_line_error(e, "unknown split 'validation'")


def test_npz_bad_archives(tmp_path: Path):
    np.savez(tmp_path / "no_labels.npz", train_images=np.zeros((2, 8, 8), dtype=np.uint8))
    with pytest.raises(DataError) as e:
        load_dataset(f"npz:{tmp_path / 'no_labels.npz'}")
    one_line_error(e, "no 'train_labels' array")
    np.savez(tmp_path / "float.npz", train_images=np.zeros((2, 8, 8)), train_labels=np.zeros(2, dtype=int))
    with pytest.raises(DataError) as e:
        load_dataset(f"npz:{tmp_path / 'float.npz'}")
    one_line_error(e, "must be uint8")
    (tmp_path / "junk.npz").write_bytes(b"this is not a zip archive")
    with pytest.raises(DataError) as e:
        load_dataset(f"npz:{tmp_path / 'junk.npz'}")
    one_line_error(e, "junk.npz", "cannot read npz")


def test_digits_splits():
    everything = load_dataset("digits", image_size=8)
    train, test = load_dataset("digits", split="train"), load_dataset("digits", split="test")
    assert (len(everything), len(train), len(test)) == (1797, 1347, 450)
    check_images(test)
    assert everything.classes == [str(d) for d in range(10)]
    # Values 0..16 map onto [0, 1]: at the native 8×8 size pixels are exact multiples of 1/16 (to 8 bits).
    pixels = everything.dataset.images.float().unique() / 255
    assert pixels.min() == 0 and pixels.max() == 1 and len(pixels) == 17
    # Stratified: every digit is in the test split in about its share.
    assert min(test.summary["class_counts"].values()) >= 43
    again = load_dataset("digits", split="test")
    assert torch.equal(again.dataset.images, test.dataset.images)


def test_synthetic_derm_spec():
    train = load_dataset("synthetic-derm:7")
    test = load_dataset("synthetic-derm:7", split="test")
    assert (len(train), len(test)) == (1800, 600)
    check_images(test)
    assert train.classes == ["benign", "malignant"]
    assert list(train.attributes.columns) == ["sex", "age_band", "skin_tone", "site"]
    assert train.source.startswith("synthetic-derm:7 ")


# --- DICOM ----------------------------------------------------------------------------------------------

def dicom_file(name: str) -> Path:
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name)  # bundled with pydicom: no network
    assert path is not None, f"pydicom test file {name} is not installed"
    return Path(path)


def test_dicom_ct_and_mr(tmp_path: Path):
    import pydicom

    ct, mr = dicom_file("CT_small.dcm"), dicom_file("MR_small.dcm")
    manifest = write_manifest(tmp_path / "dicom.csv", [{"path": str(ct), "label": "ct"}, {"path": str(mr), "label": "mr"}])
    loaded = load_dataset(f"manifest:{manifest}")
    check_images(loaded)
    for i in range(2):
        image = loaded.dataset[i][0]
        assert torch.equal(image[0], image[1]) and torch.equal(image[0], image[2])  # grayscale replicated
        assert image.max() > 0.8 and image.min() < 0.3  # spread over the range

    # At the native size the windowing arithmetic is visible exactly.
    mr_pixels = pydicom.dcmread(mr).pixel_array.astype(np.float64)  # MR_small: window 600/1600, no rescale
    expected = np.clip((mr_pixels - (600 - 800)) / 1600, 0, 1)
    mr_native = load_dataset(f"manifest:{manifest}", image_size=64, channels=1).dataset[1][0][0].numpy()
    assert np.abs(mr_native - expected).max() <= 1 / 255 + 1e-6
    ct_ds = pydicom.dcmread(ct)  # CT_small: slope 1, intercept -1024, no window: min–max after rescale
    hu = ct_ds.pixel_array * float(ct_ds.RescaleSlope) + float(ct_ds.RescaleIntercept)
    ct_native = load_dataset(f"manifest:{manifest}", image_size=128, channels=1).dataset[0][0][0].numpy()
    assert np.abs(ct_native - (hu - hu.min()) / (hu.max() - hu.min())).max() <= 1 / 255 + 1e-6
    # A caller-given window overrides the file's.
    narrow = load_dataset(f"manifest:{manifest}", image_size=64, channels=1, dicom_window=(1000, 200))
    assert np.abs(narrow.dataset[1][0][0].numpy() - np.clip((mr_pixels - 900) / 200, 0, 1)).max() <= 1 / 255 + 1e-6


def test_truncated_dicom_is_one_line_error(tmp_path: Path):
    manifest = write_manifest(tmp_path / "manifest.csv", [{"path": str(dicom_file("MR_truncated.dcm")), "label": "mr"}])
    with pytest.raises(DataError) as e:
        load_dataset(f"manifest:{manifest}")
    one_line_error(e, "manifest.csv row 1:", "MR_truncated.dcm", "DICOM")


# --- bad input ------------------------------------------------------------------------------------------

def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG that declares huge dimensions but holds almost no data (a decompression bomb's header)."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def corrupt_png(path: Path) -> Path:
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


@pytest.fixture
def bad_files(tmp_path: Path) -> Path:
    Image.fromarray(smooth_image(0)).save(tmp_path / "good.png")
    corrupt_png(tmp_path / "corrupt.png")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "garbage.jpg").write_bytes(b"not an image at all" * 10)
    png_header_only(tmp_path / "huge.png", 8000, 8000)  # 64 MP > 50 MP limit
    png_header_only(tmp_path / "bomb.png", 20000, 20000)  # past Pillow's own bomb limit too
    return tmp_path


@pytest.mark.parametrize("file, reason", [
    ("missing.png", "file not found"),
    ("corrupt.png", "cannot decode image"),
    ("empty.png", "empty file (0 bytes)"),
    ("garbage.jpg", "not a recognised image file"),
    ("huge.png", "image is 8000×8000 = 64 MP, over the limit of 50 MP"),
    ("bomb.png", "image too large, refused before decoding"),
])
def test_bad_file_names_file_and_row(bad_files: Path, file: str, reason: str):
    manifest = write_manifest(bad_files / "manifest.csv", [{"path": "good.png", "label": "a"},
                                                           {"path": file, "label": "a"}])
    with pytest.raises(DataError) as e:
        load_dataset(f"manifest:{manifest}")
    one_line_error(e, f"manifest.csv row 2: {file}: {reason}")


def test_pixel_limit_is_configurable(tmp_path: Path):
    (tmp_path / "a").mkdir()
    Image.fromarray(smooth_image(0)).save(tmp_path / "a" / "good.png")  # 40×40 = 1600 pixels
    assert len(load_dataset(f"folder:{tmp_path}", max_pixels=1600)) == 1
    with pytest.raises(DataError) as e:
        load_dataset(f"folder:{tmp_path}", max_pixels=1599)
    one_line_error(e, "good.png: image is 40×40", "over the limit")


def test_skip_bad_reports_every_skipped_file(bad_files: Path):
    files = ["good.png", "missing.png", "corrupt.png", "empty.png", "garbage.jpg", "huge.png", "bomb.png", "good.png"]
    rows = [{"path": f, "label": "a"} for f in files] + [{"path": "good.png", "label": ""}, {"path": "", "label": "a"}]
    manifest = write_manifest(bad_files / "manifest.csv", rows)
    loaded = load_dataset(f"manifest:{manifest}", skip_bad=True)
    assert len(loaded) == 2
    skipped = loaded.summary["skipped"]
    assert loaded.summary["num_skipped"] == 8 == len(skipped)
    assert [s["row"] for s in skipped] == [2, 3, 4, 5, 6, 7, 9, 10]
    assert skipped[0] == {"row": 2, "file": "missing.png", "reason": "file not found"}
    assert skipped[-2]["reason"] == "empty label" and skipped[-1]["reason"] == "empty path"


def test_unknown_label_error_or_skip(tmp_path: Path):
    Image.fromarray(smooth_image(0)).save(tmp_path / "a.png")
    rows = [{"path": "a.png", "label": "benign"}, {"path": "a.png", "label": "malignant"},
            {"path": "a.png", "label": "unsure"}]
    manifest = write_manifest(tmp_path / "manifest.csv", rows)
    classes = ["benign", "malignant"]
    with pytest.raises(DataError) as e:
        load_dataset(f"manifest:{manifest}", classes=classes)
    one_line_error(e, "manifest.csv row 3: a.png: label 'unsure' is not one of the classes (benign, malignant)")
    loaded = load_dataset(f"manifest:{manifest}", classes=classes, skip_bad=True)
    assert len(loaded) == 2 and loaded.summary["hygiene"]["unknown_labels"] == 1


def test_manifest_structure_errors(tmp_path: Path):
    write_manifest(tmp_path / "no_label.csv", [{"path": "a.png", "site": "x"}])
    with pytest.raises(DataError) as e:
        load_dataset(f"manifest:{tmp_path / 'no_label.csv'}")
    one_line_error(e, "no_label.csv: missing column 'label' (columns: path, site")
    (tmp_path / "header_only.csv").write_text("path,label\n")
    with pytest.raises(DataError) as e:
        load_dataset(f"manifest:{tmp_path / 'header_only.csv'}")
    one_line_error(e, "empty dataset")
    (tmp_path / "blank.csv").write_text("")
    with pytest.raises(DataError) as e:
        load_dataset(f"manifest:{tmp_path / 'blank.csv'}")
    one_line_error(e, "blank.csv: manifest is empty")
    with pytest.raises(DataError) as e:
        load_dataset(f"manifest:{tmp_path / 'nope.csv'}")
    one_line_error(e, "nope.csv: manifest not found")


def test_all_bad_is_empty_dataset_even_when_skipping(tmp_path: Path):
    corrupt_png(tmp_path / "bad.png")
    manifest = write_manifest(tmp_path / "m.csv", [{"path": "bad.png", "label": "a"}])
    with pytest.raises(DataError) as e:
        load_dataset(f"manifest:{manifest}", skip_bad=True)
    one_line_error(e, "empty dataset", "1 skipped", "bad.png")


def test_folder_errors(tmp_path: Path):
    with pytest.raises(DataError) as e:
        load_dataset(f"folder:{tmp_path}")
    one_line_error(e, "no class subfolders")
    (tmp_path / "a").mkdir()
    with pytest.raises(DataError) as e:
        load_dataset(f"folder:{tmp_path}")
    one_line_error(e, "empty dataset")
    corrupt_png(tmp_path / "a" / "x.png")
    with pytest.raises(DataError) as e:
        load_dataset(f"folder:{tmp_path}")
    one_line_error(e, str(tmp_path / "a" / "x.png"), "cannot decode image")


@pytest.mark.parametrize("spec, fragment", [
    ("", "empty dataset spec"),
    ("imagenet", "unknown dataset spec 'imagenet'"),
    ("folder:", "needs a path"),
    ("digits:3", "digits takes no argument"),
    ("synthetic-derm:abc", "seed must be a non-negative integer"),
])
def test_bad_spec_strings(spec: str, fragment: str):
    with pytest.raises(DataError) as e:
        parse_spec(spec)
    one_line_error(e, fragment)


@pytest.mark.parametrize("kwargs, fragment", [
    ({"channels": 2}, "channels must be 1 or 3"),
    ({"image_size": 0}, "image_size must be a positive integer"),
    ({"dedup": "fuzzy"}, "dedup must be"),
    ({"split": "val"}, "unknown split 'val'"),
])
def test_bad_arguments(kwargs: dict, fragment: str):
    with pytest.raises(DataError) as e:
        load_dataset("digits", **kwargs)
    one_line_error(e, fragment)


# --- the console entry ----------------------------------------------------------------------------------

def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedvision.cli", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=120)


def test_inspect_exits_2_with_one_line_on_bad_input(tmp_path: Path):
    Image.fromarray(smooth_image(0)).save(tmp_path / "good.png")
    corrupt_png(tmp_path / "corrupt.png")
    corrupt = write_manifest(tmp_path / "corrupt.csv", [{"path": "good.png", "label": "a"},
                                                        {"path": "corrupt.png", "label": "a"}])
    no_column = write_manifest(tmp_path / "no_column.csv", [{"path": "good.png"}])
    for spec, fragment in ((f"manifest:{corrupt}", "corrupt.csv row 2: corrupt.png: cannot decode image"),
                           (f"manifest:{no_column}", "no_column.csv: missing column 'label'")):
        result = run_cli("data", "inspect", spec)
        assert result.returncode == 2, result.stderr
        assert "Traceback" not in result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and fragment in lines[0], result.stderr


def test_inspect_skip_bad_lists_the_file(tmp_path: Path, capsys):
    Image.fromarray(smooth_image(0)).save(tmp_path / "good.png")
    corrupt_png(tmp_path / "corrupt.png")
    corrupt = write_manifest(tmp_path / "corrupt.csv", [{"path": "good.png", "label": "a"},
                                                        {"path": "corrupt.png", "label": "a"}])
    assert main(["data", "inspect", f"manifest:{corrupt}"]) == 2
    assert main(["data", "inspect", f"manifest:{corrupt}", "--skip-bad"]) == 0
    out = capsys.readouterr().out
    assert "skipped:  1" in out and "row 2: corrupt.png: cannot decode image" in out


def test_inspect_report(capsys):
    assert main(["data", "inspect", "synthetic-derm:7", "--split", "test", "--dedup", "exact"]) == 0
    out = capsys.readouterr().out
    assert "samples:  600 of 600" in out
    assert "benign" in out and "malignant" in out
    assert "skin_tone: I 100 (16.7%), II 100" in out  # balanced test split, tones in order
    assert "exact duplicates: 0 removed" in out and "class weights" in out
    assert main(["data", "inspect", "digits", "--json"]) == 0
    assert '"num_samples": 1797' in capsys.readouterr().out



def test_exif_rotation_is_applied(tmp_path: Path):
    from fedvision.data.sources import read_image_file

    image = Image.fromarray(np.zeros((20, 60, 3), dtype=np.uint8))  # stored 60 wide, 20 high
    exif = image.getexif()
    exif[0x0112] = 6  # orientation: shown rotated by 90°
    image.save(tmp_path / "photo.jpg", exif=exif)
    assert read_image_file(tmp_path / "photo.jpg").size == (20, 60)  # as a viewer shows it
