"""``synthetic-derm``: a seeded generator of skin-lesion-like RGB images with sites and demographics.

Design (see docs/data.md):

* The label comes from lesion appearance only. Each lesion gets three appearance scores in [0, 1] —
  border irregularity, colour variegation, asymmetry — sharing a latent severity (the ABCD signs co-occur in
  real lesions) and drawn independently of every demographic attribute; P(malignant) is a logistic function
  of their mean, so the classes overlap and the task is not trivial (a small CNN reaches about 80–85 %).
* Skin tone (Fitzpatrick-like I..VI) is the background skin colour. Pigment is rendered by absorption
  (Beer–Lambert: pixel = skin × exp(−optical density)), so on dark skin the same lesion gives a smaller
  absolute contrast — lower signal against the same sensor noise, a real-world mechanism for an accuracy gap.
* Sites differ in acquisition (brightness, colour cast, vignetting, blur, sensor noise) and in demographic
  mix; dark tones V and VI are rare (about 3 % and 2 %) at every site, and somewhat less rare (7 % and 5 %)
  at one more diverse site when there are three or more. Any accuracy gap a model shows therefore
  *emerges* from rarity and contrast; nothing about labels depends on demographics.
* The test split has balanced skin tones, sexes and age bands, drawn across all sites.

All randomness comes from ``numpy.random.default_rng`` streams derived from the seed, with separate streams
for site properties, the training samples and the test samples, so changing ``per_site`` does not change the
test split.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy.ndimage import gaussian_filter

from fedvision.errors import DataError

CLASSES = ["benign", "malignant"]
SKIN_TONES = ("I", "II", "III", "IV", "V", "VI")
SEXES = ("F", "M")
AGE_BANDS = ("<40", "40-60", ">60")
ATTRIBUTE_COLUMNS = ("sex", "age_band", "skin_tone", "site")

# Linear RGB reflectance of skin per tone, light to dark.
SKIN_RGB = np.array([
    [0.96, 0.83, 0.74],
    [0.91, 0.75, 0.63],
    [0.81, 0.63, 0.49],
    [0.65, 0.47, 0.34],
    [0.40, 0.26, 0.18],
    [0.22, 0.14, 0.10],
])
# Optical density per unit pigment for RGB: epidermal melanin (brown), dense melanin (black), dermal melanin
# (blue-grey), vascular (red). Variegation mixes the last three into the brown base in blotches.
PIGMENT_BROWN = np.array([0.75, 1.10, 1.45])
PIGMENT_OTHERS = np.array([
    [2.00, 2.05, 2.10],
    [1.35, 1.00, 0.70],
    [0.15, 1.25, 1.10],
])
# Skin-tone mix at an ordinary site (dark tones rare) and at the diverse site.
TONE_MIX_TYPICAL = np.array([0.18, 0.31, 0.27, 0.19, 0.03, 0.02])
TONE_MIX_DIVERSE = np.array([0.14, 0.24, 0.26, 0.24, 0.07, 0.05])
# P(malignant) = sigmoid((mean appearance score − MIDPOINT) / TEMPERATURE).
APPEARANCE_MIDPOINT = 0.5
APPEARANCE_TEMPERATURE = 0.03
APPEARANCE_SPREAD = 0.15  # per-cue deviation from the lesion's latent severity

_RENDER_CHUNK = 256  # images rendered at once; bounds memory at large image sizes


@dataclass(frozen=True)
class SyntheticSplit:
    images: np.ndarray  # (N, H, W, 3) uint8
    labels: np.ndarray  # (N,) int64, 0 = benign, 1 = malignant
    attributes: pd.DataFrame  # columns sex, age_band, skin_tone, site
    appearance: np.ndarray  # (N, 3) float: irregularity, variegation, asymmetry (the label's only cause)


@dataclass(frozen=True)
class SyntheticDerm:
    train: SyntheticSplit
    test: SyntheticSplit
    classes: list[str] = field(default_factory=lambda: list(CLASSES))
    sites: list[dict[str, Any]] = field(default_factory=list)  # per-site acquisition and demographic mix
    params: dict[str, Any] = field(default_factory=dict)


def generate_synthetic_derm(seed: int = 0, sites: int = 3, per_site: int = 600, test_size: int = 600,
                            image_size: int = 32) -> SyntheticDerm:
    """Generate the train split (``per_site`` samples at each of ``sites`` sites) and a balanced test split."""
    for name, value, low in (("seed", seed, 0), ("sites", sites, 1), ("per_site", per_site, 1),
                             ("test_size", test_size, 0), ("image_size", image_size, 8)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
            raise DataError(f"synthetic-derm: {name} must be an integer ≥ {low}, got {value!r}")
    site_rng = np.random.default_rng((seed, 0))
    site_params = [_site(site_rng, k, diverse=(sites >= 3 and k == sites - 1)) for k in range(sites)]

    train_rng = np.random.default_rng((seed, 1))
    site_index = np.repeat(np.arange(sites), per_site)
    tones = np.concatenate([train_rng.choice(6, size=per_site, p=s["tone_mix"]) for s in site_params])
    sexes = np.concatenate([(train_rng.random(per_site) >= s["female_share"]).astype(int) for s in site_params])
    ages = np.concatenate([train_rng.choice(3, size=per_site, p=s["age_mix"]) for s in site_params])
    train = _render_split(train_rng, site_params, site_index, tones, sexes, ages, image_size)

    test_rng = np.random.default_rng((seed, 2))
    # Balanced groups: equal counts per tone / sex / age band, shuffled independently of each other.
    tones = test_rng.permutation(np.arange(test_size) % 6)
    sexes = test_rng.permutation(np.arange(test_size) % 2)
    ages = test_rng.permutation(np.arange(test_size) % 3)
    site_index = test_rng.permutation(np.arange(test_size) % sites)
    test = _render_split(test_rng, site_params, site_index, tones, sexes, ages, image_size)

    public_sites = [{k: (v.round(4).tolist() if isinstance(v, np.ndarray) else v) for k, v in s.items()}
                    for s in site_params]
    return SyntheticDerm(train=train, test=test, sites=public_sites,
                         params={"seed": int(seed), "sites": int(sites), "per_site": int(per_site),
                                 "test_size": int(test_size), "image_size": int(image_size)})


def _site(rng: np.random.Generator, k: int, diverse: bool) -> dict[str, Any]:
    base = TONE_MIX_DIVERSE if diverse else TONE_MIX_TYPICAL
    return {
        "name": f"site-{k + 1}",
        "diverse": diverse,
        # Demographic mix: concentrated Dirichlet around the base, so sites differ but keep the pattern.
        "tone_mix": rng.dirichlet(base * 400),
        "female_share": float(rng.uniform(0.4, 0.6)),
        "age_mix": rng.dirichlet(np.array([4.0, 5.0, 4.0]) * 3),
        # Acquisition: exposure, white balance, lens fall-off, focus and sensor noise.
        "gain": float(rng.uniform(0.85, 1.12)),
        "colour_cast": rng.uniform(-0.06, 0.06, size=3) + 1.0,
        "vignetting": float(rng.uniform(0.0, 0.25)),
        "blur_px": float(rng.uniform(0.0, 0.7)),  # Gaussian σ in pixels at 32×32
        "noise": float(rng.uniform(0.02, 0.045)),
    }


def _render_split(rng: np.random.Generator, site_params: list[dict[str, Any]], site_index: np.ndarray,
                  tones: np.ndarray, sexes: np.ndarray, ages: np.ndarray, size: int) -> SyntheticSplit:
    n = len(site_index)
    # Appearance: independent of every attribute above; the label depends on it alone.
    # The three cues share a latent severity (ABCD signs co-occur in real lesions) plus their own variation.
    severity = rng.beta(2.0, 2.0, size=(n, 1))
    appearance = np.clip(severity + rng.normal(0.0, APPEARANCE_SPREAD, size=(n, 3)), 0.0, 1.0)
    p_malignant = 1.0 / (1.0 + np.exp(-(appearance.mean(axis=1) - APPEARANCE_MIDPOINT) / APPEARANCE_TEMPERATURE))
    labels = (rng.random(n) < p_malignant).astype(np.int64)
    lesions = _draw_lesions(rng, appearance, n)
    skin = SKIN_RGB[tones] * rng.uniform(0.94, 1.06, size=(n, 1)) * rng.uniform(0.97, 1.03, size=(n, 3))

    images = np.empty((n, size, size, 3), dtype=np.uint8)
    for start in range(0, n, _RENDER_CHUNK):
        chunk = slice(start, min(n, start + _RENDER_CHUNK))
        # float32 halves the rendering time; the result is quantised to 8 bits anyway.
        chunk_lesions = {k: v[chunk].astype(np.float32) for k, v in lesions.items()}
        images[chunk] = _render(rng, chunk_lesions, skin[chunk].astype(np.float32),
                                site_index[chunk], site_params, size)
    attributes = pd.DataFrame({
        "sex": np.array(SEXES)[sexes],
        "age_band": np.array(AGE_BANDS)[ages],
        "skin_tone": np.array(SKIN_TONES)[tones],
        "site": np.array([s["name"] for s in site_params])[site_index],
    })
    return SyntheticSplit(images=images, labels=labels, attributes=attributes, appearance=appearance)


def _draw_lesions(rng: np.random.Generator, appearance: np.ndarray, n: int) -> dict[str, np.ndarray]:
    """Per-lesion shape and pigment parameters; appearance scores set the strength of the malignant cues."""
    irregularity, variegation, asymmetry = appearance.T
    return {
        "irregularity": irregularity,
        "variegation": variegation,
        "asymmetry": asymmetry,
        # Nuisance variation, unrelated to the label: position, size, orientation, pigment density.
        "center": rng.normal(0.0, 0.1, size=(n, 2)).clip(-0.25, 0.25),
        "radius": rng.uniform(0.38, 0.58, size=n),
        "density": rng.uniform(0.55, 0.85, size=n),
        "rotation": rng.uniform(0, 2 * np.pi, size=n),
        # Border harmonics k = 3..7 (jagged, notched border) with random phases and weights.
        "harmonic_weight": rng.uniform(0.5, 1.0, size=(n, 5)),
        "harmonic_phase": rng.uniform(0, 2 * np.pi, size=(n, 5)),
        # Blotches for variegation: per extra pigment two Gaussian blobs inside the lesion.
        "blob_offset": rng.uniform(-0.7, 0.7, size=(n, 3, 2, 2)),
        "blob_scale": rng.uniform(0.25, 0.5, size=(n, 3, 2)),
        "blob_mix": rng.dirichlet(np.ones(3), size=n),
    }


def _render(rng: np.random.Generator, lesion: dict[str, np.ndarray], skin: np.ndarray, site_index: np.ndarray,
            site_params: list[dict[str, Any]], size: int) -> np.ndarray:
    b = len(site_index)
    coords = ((np.arange(size) + 0.5) / size * 2.0 - 1.0).astype(np.float32)
    gy, gx = np.meshgrid(coords, coords, indexing="ij")
    dx = gx[None] - lesion["center"][:, 0, None, None]
    dy = gy[None] - lesion["center"][:, 1, None, None]
    rho = np.hypot(dx, dy)
    theta = np.arctan2(dy, dx) - lesion["rotation"][:, None, None]

    def per(name):  # broadcast a per-lesion scalar over the image
        return lesion[name][:, None, None]

    # Border: asymmetric low-order distortion (one-sided bulge + elongation) plus jagged high-order harmonics.
    asym = per("asymmetry")
    bulge = np.maximum(np.cos(theta), 0.0) ** 2
    outline = 1.0 + asym * (1.0 * bulge - 0.35 * np.cos(2 * theta + 0.7))
    jag = np.zeros_like(theta)
    for j, k in enumerate(range(3, 8)):
        jag += lesion["harmonic_weight"][:, j, None, None] * np.cos(k * theta + lesion["harmonic_phase"][:, j, None, None])
    outline += per("irregularity") * 0.3 * jag
    radius = per("radius") * np.maximum(outline, 0.3)
    edge = 0.03 + 0.04 * per("irregularity")  # irregular lesions also fade out less sharply
    mask = 1.0 / (1.0 + np.exp(-(radius - rho) / edge))

    # Pigment density: uneven across the lesion for asymmetric ones (one side darker).
    side = (dx * np.cos(lesion["rotation"])[:, None, None] + dy * np.sin(lesion["rotation"])[:, None, None]) / per("radius")
    density = per("density") * mask * np.clip(1.0 + 0.6 * asym * side, 0.2, 2.0)

    # Variegation: blotches of black, blue-grey and red pigment replacing the uniform brown.
    blotch = np.zeros((b, 3, size, size), dtype=np.float32)
    for c in range(3):
        for m in range(2):
            ox = lesion["center"][:, 0] + lesion["blob_offset"][:, c, m, 0] * lesion["radius"]
            oy = lesion["center"][:, 1] + lesion["blob_offset"][:, c, m, 1] * lesion["radius"]
            s = lesion["blob_scale"][:, c, m] * lesion["radius"]
            blotch[:, c] += np.exp(-((gx[None] - ox[:, None, None]) ** 2 + (gy[None] - oy[:, None, None]) ** 2)
                                   / (2 * s[:, None, None] ** 2))
    blotch = np.clip(blotch, 0.0, 1.0) * lesion["blob_mix"][:, :, None, None] * 3.5
    share = np.clip(per("variegation")[:, None] * blotch, 0.0, 0.9)  # (b, 3, H, W) share of each extra pigment
    brown = PIGMENT_BROWN.astype(np.float32)[None, :, None, None]
    optical = (1.0 - share.sum(axis=1, keepdims=True).clip(max=1.0)) * brown
    optical += np.einsum("bchw,cr->brhw", share, PIGMENT_OTHERS.astype(np.float32))
    rgb = skin[:, :, None, None] * np.exp(-density[:, None] * optical)  # (b, 3, H, W)

    # Acquisition, per site.
    out = np.empty((b, size, size, 3), dtype=np.uint8)
    vignette_base = np.hypot(gx, gy) ** 2 / 2.0
    for k in np.unique(site_index):
        sel = site_index == k
        p = site_params[k]
        img = rgb[sel] * (p["gain"] * p["colour_cast"]).astype(np.float32)[None, :, None, None]
        img *= (1.0 - np.float32(p["vignetting"]) * vignette_base)[None, None]
        sigma = p["blur_px"] * size / 32.0
        if sigma > 0.05:
            img = gaussian_filter(img, sigma=(0, 0, sigma, sigma), mode="nearest")
        img += rng.standard_normal(size=img.shape, dtype=np.float32) * np.float32(p["noise"])
        out[sel] = (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8).transpose(0, 2, 3, 1)
    return out


def write_synthetic_derm(out: str | Path, seed: int = 0, sites: int = 3, per_site: int = 600, test_size: int = 600,
                         image_size: int = 32) -> dict[str, int]:
    """Write the data as site folders: ``out/site-K/images/*.png`` + ``out/site-K/manifest.csv`` per site and
    ``out/test/`` for the test split (all sites, ``site`` column kept), plus ``out/synthetic-derm.json``.

    Manifests have columns path,label,sex,age_band,skin_tone,site with paths relative to the manifest. Each
    manifest is written atomically after its images, so a manifest never names a half-written image.
    Returns {folder name: number of images}.
    """
    from PIL import Image

    from fedvision import __version__
    from fedvision.io import atomic_write_json, atomic_write_text

    out = Path(out)
    data = generate_synthetic_derm(seed=seed, sites=sites, per_site=per_site, test_size=test_size,
                                   image_size=image_size)
    folders: list[tuple[str, SyntheticSplit, np.ndarray]] = []
    for site in data.sites:
        folders.append((site["name"], data.train, np.flatnonzero(data.train.attributes["site"] == site["name"])))
    folders.append(("test", data.test, np.arange(len(data.test.labels))))

    written: dict[str, int] = {}
    for name, part, indices in folders:
        folder = out / name
        (folder / "images").mkdir(parents=True, exist_ok=True)
        paths = []
        for number, i in enumerate(indices):
            relative = f"images/{number:05d}.png"
            Image.fromarray(part.images[i]).save(folder / relative)
            paths.append(relative)
        manifest = pd.DataFrame({"path": paths, "label": np.array(data.classes)[part.labels[indices]]})
        for column in ATTRIBUTE_COLUMNS:
            manifest[column] = part.attributes[column].to_numpy()[indices]
        atomic_write_text(folder / "manifest.csv", manifest.to_csv(index=False))
        written[name] = len(indices)
    atomic_write_json(out / "synthetic-derm.json", {
        "generator": f"fedvision {__version__} synthetic-derm", "params": data.params, "classes": data.classes,
        "sites": data.sites, "counts": written,
    })
    return written
