"""Baselines: the whole image as one file of a codec people send today, at MISC's byte budget.

A baseline is an ``EncodedImage`` whose only layer is a pixel layer of the whole image, so it crosses the
very same transport, link and receiver as MISC's layers and is scored by the same classical decoder:

- ``jpeg``, ``webp``, ``avif``: one level of the project's pixel codecs (miscnet.core.pixel). Their
  containers are stripped and rebuilt by the receiver, so they are a few hundred bytes SMALLER than the
  .jpg / .webp / .avif file a user would send: a baseline that is, if anything, too strong.
- ``jpeg-progressive``: a standard progressive .jpg (Pillow / libjpeg, IJG tables, optimised Huffman
  tables, headers included), cut at scan boundaries into ``levels`` pixel levels, so the receiver shows
  the coarse scans first as a browser does (experiments/jpeg_progressive.py, which registers it as a
  pixel codec so the receiver's stage decoding reads it).

Budget: the whole container (``len(to_bytes(encoded))``) must fit ``budget`` bytes (the sweep passes
the MISC file's own size, so baselines never get more bytes than MISC). Raster:

- ``full``: the image's own size, at the highest quality that fits. At MISC's operating point (a few
  hundred bytes to a few kilobytes) even quality 1 often does not fit; the file is then sent at quality
  1 anyway and flagged ``fits = False`` (its real bytes are what every figure shows).
- ``fit`` (default): what a user who must meet the budget would do: the best-PSNR choice among the full
  size and smaller rasters (the receiver up-samples), each at the highest quality that fits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from miscnet.core.container import EncodedImage, to_bytes
from miscnet.core.errors import MiscError
from miscnet.core.pixel import PixelLevel, PixelSettings, decode_pixels, encode_pixels, psnr
from miscnet.experiments.jpeg_progressive import JPEG_PROGRESSIVE, encode_progressive_jpeg
from miscnet.sender.rate_control import raster_ladder
from miscnet.v1 import bitstream_pb2 as pb

BASELINE_CODECS = ("jpeg", "webp", "avif", JPEG_PROGRESSIVE)
RASTER_MODES = ("fit", "full")
_MAX_QUALITY = {"jpeg": 100, "webp": 100, "avif": 100, JPEG_PROGRESSIVE: 95}  # libjpeg: above 95 is waste
_WORSE_IN_A_ROW = 2  # "fit" stops after this many smaller rasters that score worse than the best


@dataclass(frozen=True)
class Baseline:
    codec: str
    encoded: EncodedImage  # pixel layer(s) only
    width: int  # coded raster
    height: int
    quality: int
    budget: int  # bytes allowed for the whole container
    bytes: int  # len(to_bytes(encoded))
    fits: bool
    psnr: float  # full-size PSNR of the whole file (the rate control's score)

    def info(self) -> dict:
        return {"codec": self.codec, "raster": f"{self.width}x{self.height}", "quality": self.quality,
                "budget_bytes": self.budget, "fits_budget": self.fits}


def _pixel_layer(level: PixelLevel) -> pb.Layer:
    return pb.Layer(kind=pb.LAYER_KIND_PIXEL, level=level.level, codec=level.codec, pixel=level.params,
                    payload=level.payload)


class _Search:
    """Encodes one image at (raster, quality) points, remembering sizes and scores."""

    def __init__(self, image: np.ndarray, codec: str, levels: int):
        self.image, self.codec, self.levels = image, codec, levels
        self.height, self.width = image.shape[:2]
        self.coded: dict[tuple[int, int, int], EncodedImage] = {}
        self.thumbs: dict[tuple[int, int], np.ndarray] = {}

    def encode(self, w: int, h: int, q: int) -> EncodedImage:
        key = (w, h, q)
        if key not in self.coded:
            if self.codec == JPEG_PROGRESSIVE:
                levels = encode_progressive_jpeg(self.image, w, h, q, self.levels)
            else:
                levels = encode_pixels(self.image, PixelSettings(self.codec, w, h, quality=q, levels=1))
            self.coded[key] = EncodedImage(self.width, self.height, [_pixel_layer(lv) for lv in levels])
        return self.coded[key]

    def size(self, w: int, h: int, q: int) -> int:
        return len(to_bytes(self.encode(w, h, q)))

    def score(self, w: int, h: int, q: int) -> float:
        enc = self.encode(w, h, q)
        levels = [PixelLevel(ly.level, ly.codec, ly.pixel, ly.payload) for ly in enc.layers]
        return psnr(decode_pixels(levels, self.width, self.height), self.image)


def _largest_quality(size: Callable[[int], int], budget: int, top: int) -> int | None:
    """The largest quality in 1..top whose size fits (sizes are nearly monotone in quality)."""
    if size(1) > budget:
        return None
    if size(top) <= budget:
        return top
    lo, hi = 1, top  # size(lo) fits, size(hi) does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if size(mid) <= budget:
            lo = mid
        else:
            hi = mid
    return lo


def encode_baseline(image: np.ndarray, codec: str, budget: int, raster: str = "fit", levels: int = 3) -> Baseline:
    """The whole image in one ``codec`` file of at most ``budget`` container bytes (see the module doc)."""
    if codec not in BASELINE_CODECS:
        raise MiscError(f"unknown baseline codec {codec!r} (use {', '.join(BASELINE_CODECS)})")
    if raster not in RASTER_MODES:
        raise MiscError(f"unknown baseline raster mode {raster!r} (use {', '.join(RASTER_MODES)})")
    if budget <= 0:
        raise MiscError(f"baseline budget must be positive, not {budget}")
    search = _Search(image, codec, levels)
    w, h = search.width, search.height
    top = _MAX_QUALITY[codec]
    rasters = [(w, h)]
    if raster == "fit":
        rasters += [r for r in reversed(raster_ladder(w, h)) if r != (w, h)]
    best: tuple[float, int, int, int] | None = None
    worse = 0
    for rw, rh in rasters:
        q = _largest_quality(lambda q, rw=rw, rh=rh: search.size(rw, rh, q), budget, top)
        if q is None:
            continue
        score = search.score(rw, rh, q)
        if best is None or score > best[0]:
            best, worse = (score, rw, rh, q), 0
        else:
            worse += 1
            if worse >= _WORSE_IN_A_ROW:
                break
    if best is None:  # nothing fits: send the smallest candidate, flagged
        rw, rh = rasters[-1]
        best = (search.score(rw, rh, 1), rw, rh, 1)
    score, rw, rh, q = best
    enc = search.encode(rw, rh, q)
    n = len(to_bytes(enc))
    return Baseline(codec, enc, rw, rh, q, budget, n, n <= budget, score)
