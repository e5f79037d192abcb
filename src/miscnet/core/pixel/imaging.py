"""Raster helpers every pixel codec and the rate control share: resampling filters, rounding, PSNR."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

# Measured on the five sample photos (see experiments/bench_pixel.py and the report): down-sampling
# with LANCZOS beats BOX / BICUBIC / HAMMING by 2-4 % in bytes at equal PSNR, and up-sampling with
# LANCZOS beats BICUBIC by about 1 % and BILINEAR by 5-8 %.
DOWN_FILTER = Image.Resampling.LANCZOS
UP_FILTER = Image.Resampling.LANCZOS


def to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def resize(arr: np.ndarray, width: int, height: int, resample: int) -> np.ndarray:
    """Resize an HxWx3 float array channel by channel in float32, so nothing is rounded midway."""
    if arr.shape[0] == height and arr.shape[1] == width:
        return arr.astype(np.float32)
    chans = []
    for c in range(arr.shape[2]):
        src = Image.fromarray(np.ascontiguousarray(arr[..., c], dtype=np.float32))
        chans.append(np.asarray(src.resize((width, height), resample), dtype=np.float32))
    return np.stack(chans, axis=-1)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two uint8 images of the same shape (inf when identical), MSE over all values.

    Exact integer arithmetic in bands of rows: rate control scores many candidates at full size.
    """
    rows = max(1, (1 << 20) // max(1, a[0].size))
    total = 0
    for i in range(0, a.shape[0], rows):
        d = (a[i : i + rows].astype(np.int64) - b[i : i + rows]).ravel()
        total += int(np.dot(d, d))
    return math.inf if total == 0 else 10.0 * math.log10(255.0**2 * a.size / total)
