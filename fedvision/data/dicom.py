"""DICOM decoding: modality rescale, windowing, mapping to a float image in [0, 1]."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from fedvision.data.messages import one_line
from fedvision.errors import DataError

MONOCHROME = ("MONOCHROME1", "MONOCHROME2")


def read_dicom(path: Path, window: tuple[float, float] | None, max_pixels: int) -> Image.Image:
    """Decode one single-frame DICOM file.

    Grayscale: stored values × RescaleSlope + RescaleIntercept (modality units, e.g. Hounsfield), then the
    window ``window`` (center, width) if given, else the file's first WindowCenter/WindowWidth, else the
    image's min–max, mapped to [0, 1] and returned as a float ('F') image. MONOCHROME1 is inverted so that
    bright always means high values. Colour DICOMs come back as 8-bit RGB. Raises ``DataError`` with a
    reason (the caller adds the file and row).
    """
    import pydicom  # imported here: pydicom is only needed when a DICOM file is actually read

    try:
        ds = pydicom.dcmread(path)
    except Exception as e:  # pydicom raises many types (InvalidDicomError, EOFError, struct.error, ...)
        raise DataError(f"cannot read DICOM ({one_line(e)})") from None
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if rows <= 0 or cols <= 0:
        raise DataError("DICOM has no image (missing Rows/Columns or PixelData)")
    if rows * cols > max_pixels:
        raise DataError(f"image is {cols}×{rows} = {rows * cols / 1e6:.0f} MP, over the limit of "
                        f"{max_pixels / 1e6:.0f} MP")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise DataError(f"multi-frame DICOM ({frames} frames) is not supported; export single frames")
    try:
        pixels = ds.pixel_array
    except Exception as e:
        raise DataError(f"cannot decode DICOM pixel data ({one_line(e)})") from None

    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if pixels.ndim == 3 and pixels.shape[-1] in (3, 4):
        # pydicom converts YBR to RGB by default; windowing is a grayscale concept, so scale by bit depth.
        bits = int(ds.get("BitsStored", 8) or 8)
        rgb = pixels[..., :3].astype(np.float64) / float(2 ** bits - 1)
        return Image.fromarray(np.clip(rgb * 255.0 + 0.5, 0, 255).astype(np.uint8))
    if pixels.ndim != 2:
        raise DataError(f"unsupported DICOM pixel array shape {pixels.shape}")
    if photometric not in MONOCHROME:
        raise DataError(f"unsupported DICOM PhotometricInterpretation {photometric}")

    values = pixels.astype(np.float64) * _number(ds.get("RescaleSlope"), 1.0) + _number(ds.get("RescaleIntercept"), 0.0)
    if window is None:
        center, width = _number(ds.get("WindowCenter"), None), _number(ds.get("WindowWidth"), None)
        window = (center, width) if center is not None and width is not None and width > 0 else None
    if window is not None:
        center, width = window
        low = center - width / 2.0
        scaled = (values - low) / width
    else:
        low, high = float(values.min()), float(values.max())
        scaled = (values - low) / (high - low) if high > low else np.zeros_like(values)
    scaled = np.clip(scaled, 0.0, 1.0)
    if photometric == "MONOCHROME1":
        scaled = 1.0 - scaled
    return Image.fromarray(scaled.astype(np.float32))


def _number(value, default):
    """First value of a possibly multi-valued DICOM number, or ``default`` when absent."""
    if value is None or value == "":
        return default
    try:
        if hasattr(value, "__len__") and not isinstance(value, (str, bytes)):
            value = value[0]
        return float(value)
    except (TypeError, ValueError, IndexError):
        return default
