"""ALBEF's pretraining augmentation after the crop: horizontal flip and RandAugment, on uint8 HWC arrays.

RandAugment: Cubuk et al. 2020, "RandAugment: Practical automated data augmentation with a reduced
search space" (CVPR Workshops): N operations drawn uniformly, each at one magnitude M. The variant here is
the one ALBEF pretrains with (salesforce/ALBEF `dataset/__init__.py` and `dataset/randaugment.py`,
`RandomAugment(2, 7, isPIL=True, augs=[...])`): N ops drawn with replacement from Identity, AutoContrast,
Equalize, Brightness, Sharpness, ShearX, ShearY, TranslateX, TranslateY, Rotate; each one applied with
probability 0.5; at level M of 10 the enhance factor is M/10 * 1.8 + 0.1 (no random sign: 1.36 at 7),
the shear M/10 * 0.3, the translation M/10 * 10 pixels (absolute, whatever the size; ALBEF runs at 256 px)
and the rotation M/10 * 30 degrees, the geometric ones with a random sign and grey (128) fill. The
colour ops follow PIL's definitions (which ALBEF's OpenCV versions reproduce); Sharpness clips to
0-255 as PIL does (ALBEF's casts without clipping).

Every draw comes from the numpy Generator the loader passes (seeded per rank, worker, epoch), so an
augmented stream is reproducible and resumes exactly; torchvision's and timm's RandAugment draw from
the global torch / Python generators instead, and torchvision's geometric ops took 4-5x as long as
OpenCV's `warpAffine` on a 256 px uint8 image here (one core).
"""
from __future__ import annotations

from typing import Callable, Dict

import cv2
import numpy as np

MAX_LEVEL = 10
FILL = (128, 128, 128)
_SMOOTH = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], np.float32) / 13  # PIL's ImageFilter.SMOOTH


def _lut(img: np.ndarray, tables: np.ndarray) -> np.ndarray:
    """Per-channel lookup: tables (channels, 256) uint8."""
    return cv2.LUT(img, np.ascontiguousarray(tables.T).reshape(256, 1, img.shape[2]))


def autocontrast(img: np.ndarray) -> np.ndarray:
    """Stretch each channel's [min, max] to [0, 255] (PIL ImageOps.autocontrast, cutoff 0)."""
    tables = []
    for c in range(img.shape[2]):
        lo, hi = int(img[..., c].min()), int(img[..., c].max())
        if hi <= lo:
            tables.append(np.arange(256, dtype=np.uint8))
            continue
        scale = 255.0 / (hi - lo)
        tables.append(np.clip(np.arange(256) * scale - lo * scale, 0, 255).astype(np.uint8))
    return _lut(img, np.stack(tables))


def equalize(img: np.ndarray) -> np.ndarray:
    """Histogram equalisation per channel (PIL ImageOps.equalize)."""
    tables = []
    for c in range(img.shape[2]):
        hist = np.bincount(img[..., c].ravel(), minlength=256)
        used = hist[hist > 0]
        step = (int(used.sum()) - int(used[-1])) // 255
        if step == 0:
            tables.append(np.arange(256, dtype=np.uint8))
            continue
        start = np.concatenate([[step // 2], hist[:-1]]).cumsum()
        tables.append(np.clip(start // step, 0, 255).astype(np.uint8))
    return _lut(img, np.stack(tables))


def brightness(img: np.ndarray, factor: float) -> np.ndarray:
    """Blend with black (PIL ImageEnhance.Brightness)."""
    table = np.clip(np.arange(256, dtype=np.float32) * factor, 0, 255).astype(np.uint8)
    return cv2.LUT(img, table)


def sharpness(img: np.ndarray, factor: float) -> np.ndarray:
    """Blend with the smoothed image, borders kept, clipped to 0-255 (PIL ImageEnhance.Sharpness)."""
    out = cv2.addWeighted(img, factor, cv2.filter2D(img, -1, _SMOOTH), 1.0 - factor, 0.0)
    out[0], out[-1], out[:, 0], out[:, -1] = img[0], img[-1], img[:, 0], img[:, -1]
    return out


def _warp(img: np.ndarray, matrix) -> np.ndarray:
    h, w = img.shape[:2]
    return cv2.warpAffine(img, np.float32(matrix), (w, h), flags=cv2.INTER_LINEAR, borderValue=FILL)


def _rotate(img: np.ndarray, degrees: float) -> np.ndarray:
    h, w = img.shape[:2]
    return cv2.warpAffine(img, cv2.getRotationMatrix2D((w / 2, h / 2), degrees, 1.0), (w, h),
                          flags=cv2.INTER_LINEAR, borderValue=FILL)


def _signed(value: float, rng: np.random.Generator) -> float:
    return -value if rng.random() < 0.5 else value


# name -> fn(img, level, rng); the order is ALBEF's `augs` list
OPS: Dict[str, Callable[[np.ndarray, float, np.random.Generator], np.ndarray]] = {
    "Identity": lambda img, level, rng: img,
    "AutoContrast": lambda img, level, rng: autocontrast(img),
    "Equalize": lambda img, level, rng: equalize(img),
    "Brightness": lambda img, level, rng: brightness(img, level / MAX_LEVEL * 1.8 + 0.1),
    "Sharpness": lambda img, level, rng: sharpness(img, level / MAX_LEVEL * 1.8 + 0.1),
    "ShearX": lambda img, level, rng: _warp(img, [[1, _signed(level / MAX_LEVEL * 0.3, rng), 0], [0, 1, 0]]),
    "ShearY": lambda img, level, rng: _warp(img, [[1, 0, 0], [_signed(level / MAX_LEVEL * 0.3, rng), 1, 0]]),
    "TranslateX": lambda img, level, rng: _warp(img, [[1, 0, _signed(level / MAX_LEVEL * 10, rng)], [0, 1, 0]]),
    "TranslateY": lambda img, level, rng: _warp(img, [[1, 0, 0], [0, 1, _signed(level / MAX_LEVEL * 10, rng)]]),
    "Rotate": lambda img, level, rng: _rotate(img, _signed(level / MAX_LEVEL * 30, rng)),
}
_NAMES = list(OPS)


def rand_augment(img: np.ndarray, n: int, m: float, rng: np.random.Generator) -> np.ndarray:
    """`n` ops drawn with replacement, each applied with probability 0.5 at level `m` (of 10);
    uint8 HWC in, uint8 HWC out (same shape)."""
    for i in rng.integers(0, len(_NAMES), size=n):
        if rng.random() < 0.5:
            img = OPS[_NAMES[int(i)]](img, m, rng)
    return img


def hflip(img: np.ndarray) -> np.ndarray:
    """Mirror left-right (uint8 HWC, contiguous)."""
    return np.ascontiguousarray(img[:, ::-1])


__all__ = ["OPS", "rand_augment", "hflip", "autocontrast", "equalize", "brightness", "sharpness", "MAX_LEVEL"]
