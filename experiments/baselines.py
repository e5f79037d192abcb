"""Baselines: what a careful user sends instead of MISC, one standard image file of at most the same bytes.

A baseline is the best file of one codec, over every raster and quality, that fits the byte budget, sent
as an ``EncodedImage`` whose only layer is a pixel layer, so it crosses the very same transport, link and
receiver as MISC's layers and is scored by the same classical decoder:

- ``webp``: a Pillow .webp file at ``method=6`` (libwebp's slowest, smallest setting), quality 0..100.
- ``avif``: a Pillow .avif file (libaom, ``tune=psnr``) at speed ``AVIF_SPEED``, every quantiser, 4:2:0
  and 4:4:4 chroma, and monochrome for a grey image.
- ``jpeg``: the project's JPEG thumbnails (quantisation tables tuned for PSNR at thumbnail sizes), sized
  as the standard .jpg file the receiver rebuilds, quality 1..100.
- ``jpeg-progressive``: a standard progressive .jpg (Pillow / libjpeg, optimised Huffman tables), 4:2:0
  and 4:4:4 chroma (grey for a grey image), quality 1..95, cut at scan boundaries into ``levels`` pixel
  levels so the receiver shows the coarse scans first as a browser does (experiments/jpeg_progressive.py).

The webp, avif and jpeg files travel as the project's codec of that name, whose layers carry the same coded
data without the file's container; ``encode_baseline`` checks that the receiver decodes them to exactly
the file's pixels.

Budget: the **standard file** (what the user would send) must fit ``budget`` bytes; with ``fit_wire`` (the
sweep's default) so must the container that crosses this project's link (``len(to_bytes(encoded))``).
The sweep passes the MISC file's own size. Raster:

- ``fit`` (default): every raster of the image's aspect on a geometric ladder (ratio 2**(1/6)) from 8
  pixels on the short side up to the full size, each with every chroma option; per raster every quality
  that fits (webp, jpeg, jpeg-progressive) or, for the slow avif, the largest quantiser that fits (a
  bisection checked VERIFY_STEPS quantisers past its edge: libaom's sizes wiggle less than that). The best
  PSNR (full size, the receiver's up-sampling) wins. The descent over rasters stops where even the
  uncoded thumbnail, up-sampled, scores below the best file found (``search_points``).
- ``full``: the image's own size only. At MISC's operating point even the lowest quality often does not
  fit; the smallest file is then sent anyway and flagged ``fits = False`` (its real bytes are what every
  figure shows).

Every (raster, quality, option) point is encoded once per image: file size, wire size and PSNR are kept
in a JSON cache under ``$MISCNET_CACHE_DIR/baselines`` (default ``~/.cache/miscnet/baselines``), keyed by
a digest of the pixels and of the codec libraries' versions, so a second sweep or benchmark over the same
images encodes only the files it sends. ``MISCNET_CACHE_DIR=off`` disables it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, features

from miscnet.core.container import EncodedImage, to_bytes
from miscnet.core.errors import MiscError
from miscnet.core.pixel import (
    DOWN_FILTER,
    UP_FILTER,
    PixelLevel,
    PixelSettings,
    decode_pixels,
    encode_pixels,
    psnr,
    thumbnail_file,
)
from miscnet.experiments.jpeg_progressive import JPEG_PROGRESSIVE, encode_progressive_jpeg
from miscnet.sender import rate_control
from miscnet.v1 import bitstream_pb2 as pb

BASELINE_CODECS = ("jpeg", "webp", "avif", JPEG_PROGRESSIVE)
RASTER_MODES = ("fit", "full")
# libaom speed for the AVIF baseline: `python -m miscnet.experiments.bench_codec --avif-speeds` compares
# speeds 0, 2, 4 and 6 (the best AVIF file at 600 and 2500 B on three images, rasters around speed 6's
# best): speed 4 is within a few hundredths of a dB of speed 0 on the mean, speed 6 about 0.3 dB worse,
# and speeds 0-2 cost minutes per image on a shared 2-core CPU.
AVIF_SPEED = 4
_RASTER_STEP = 2 ** (1 / 6)  # short-side ratio between neighbouring rasters of the ladder (12 %)
_SMALLEST_SIDE = 8
_CACHE_VERSION = 1


def _avif_qualities() -> tuple[int, ...]:
    """One Pillow quality per libavif quantiser: libavif maps quality q to quantiser
    ((100 - q) * 63 + 50) // 100, so only these 64 qualities give different files."""
    by_quantiser: dict[int, int] = {}
    for q in range(101):
        by_quantiser[((100 - q) * 63 + 50) // 100] = q
    return tuple(sorted(by_quantiser.values()))


_QUALITIES = {
    "webp": tuple(range(101)),
    "avif": _avif_qualities(),
    "jpeg": tuple(range(1, 101)),
    JPEG_PROGRESSIVE: tuple(range(1, 96)),  # libjpeg: above 95 is waste
}


@dataclass(frozen=True)
class Baseline:
    codec: str
    encoded: EncodedImage  # pixel layer(s) only
    width: int  # coded raster
    height: int
    quality: int
    option: str  # chroma / colour option ("420", "444", "grey"; "" where the codec has one)
    budget: int  # bytes allowed
    bytes: int  # the standard file's size (what a user sends)
    wire_bytes: int  # len(to_bytes(encoded)): what crosses this project's link
    fits: bool
    psnr: float  # full-size PSNR of the file, decoded as the receiver does

    def info(self) -> dict:
        return {"codec": self.codec, "raster": f"{self.width}x{self.height}", "quality": self.quality,
                "option": self.option, "budget_bytes": self.budget, "file_bytes": self.bytes,
                "fits_budget": self.fits}


def _pixel_layer(level: PixelLevel) -> pb.Layer:
    return pb.Layer(kind=pb.LAYER_KIND_PIXEL, level=level.level, codec=level.codec, pixel=level.params,
                    payload=level.payload)


def raster_candidates(width: int, height: int) -> list[tuple[int, int]]:
    """Rasters of the image's aspect, short side from 8 pixels up to the full size on a geometric ladder."""
    short = min(width, height)
    out: list[tuple[int, int]] = []
    side = float(min(_SMALLEST_SIDE, short))
    while True:
        s = min(short, round(side))
        f = s / short
        r = (max(1, round(width * f)), max(1, round(height * f)))
        if s >= short:
            r = (width, height)
        if not out or r != out[-1]:
            out.append(r)
        if s >= short:
            return out
        side *= _RASTER_STEP


def _is_grey(image: np.ndarray) -> bool:
    return bool(np.array_equal(image[..., 0], image[..., 1]) and np.array_equal(image[..., 0], image[..., 2]))


def codec_options(codec: str, image: np.ndarray) -> tuple[str, ...]:
    """The chroma options searched for ``codec`` on this image."""
    grey = _is_grey(image)
    if codec == "avif":
        return ("420", "444", "grey") if grey else ("420", "444")
    if codec == JPEG_PROGRESSIVE:
        return ("420", "444", "grey") if grey else ("420", "444")
    return ("",)  # webp: lossy WebP is 4:2:0 only; jpeg: the project's codec is 4:2:0


# ------------------------------------------------------------------------------------------- AVIF files


def _avif_file(thumb: Image.Image, quality: int, option: str, speed: int = AVIF_SPEED) -> bytes:
    img = thumb.convert("L") if option == "grey" else thumb
    buf = io.BytesIO()
    img.save(buf, "AVIF", quality=quality, speed=speed, codec="aom", max_threads=1,
             subsampling="4:4:4" if option == "444" else "4:2:0", advanced={"tune": "psnr"})
    return buf.getvalue()


def _avif_layer_payload(data: bytes) -> bytes:
    """The AV1 OBUs of a single-image AVIF file, less the temporal delimiter: the sequence header and
    the frame, which the project's avif codec carries (its receiver rebuilds the container)."""
    from miscnet.core.pixel.avif import file_obus

    return b"".join(obu for kind, obu in file_obus(data) if kind != 2)  # 2: temporal delimiter


# ------------------------------------------------------------------------------------------- one point


class _Coder:
    """Encodes one image as one codec's file at (raster, quality, option) points."""

    def __init__(self, image: np.ndarray, codec: str, levels: int, avif_speed: int = AVIF_SPEED):
        self.image, self.codec, self.levels, self.avif_speed = image, codec, levels, avif_speed
        self.height, self.width = image.shape[:2]
        self._pil = Image.fromarray(image)
        self._thumbs: dict[tuple[int, int], Image.Image] = {}
        self._bounds: dict[tuple[int, int], float] = {}

    def thumb(self, w: int, h: int) -> Image.Image:
        if (w, h) not in self._thumbs:
            self._thumbs[(w, h)] = self._pil if (w, h) == (self.width, self.height) else \
                self._pil.resize((w, h), DOWN_FILTER)
        return self._thumbs[(w, h)]

    def encode(self, w: int, h: int, q: int, option: str) -> tuple[bytes, list[PixelLevel]]:
        """(the standard file, the pixel levels that carry it)."""
        if self.codec == JPEG_PROGRESSIVE:
            thumb = self.thumb(w, h)
            src = np.asarray(thumb.convert("L") if option == "grey" else thumb)
            levels = encode_progressive_jpeg(src, w, h, q, self.levels, subsampling="444" if option == "444" else "420")
            return b"".join(lv.payload for lv in levels) + b"\xff\xd9", levels
        if self.codec == "avif":
            data = _avif_file(self.thumb(w, h), q, option, self.avif_speed)
            params = pb.PixelParams(width=w, height=h, quality=q)
            return data, [PixelLevel(0, pb.CODEC_PIXEL_AVIF, params, _avif_layer_payload(data))]
        # webp (method 6) and jpeg: the project's codecs, whose rebuilt file is the standard file
        levels = encode_pixels(np.asarray(self.thumb(w, h)), PixelSettings(self.codec, w, h, quality=q, levels=1))
        return thumbnail_file(levels[0]), levels

    def raster_bound(self, w: int, h: int) -> float:
        """PSNR of the uncoded w x h thumbnail, up-sampled as the receiver does: no file at w x h scores
        (much) higher."""
        if (w, h) not in self._bounds:
            up = self.thumb(w, h).resize((self.width, self.height), UP_FILTER)  # as decode_pixels does
            self._bounds[(w, h)] = psnr(np.asarray(up), self.image)
        return self._bounds[(w, h)]

    def wire_bytes(self, levels: list[PixelLevel]) -> int:
        return len(to_bytes(EncodedImage(self.width, self.height, [_pixel_layer(lv) for lv in levels])))



# ------------------------------------------------------------------------------------------- cache


def _cache_dir() -> Path | None:
    root = os.environ.get("MISCNET_CACHE_DIR")
    if root and root.lower() in ("off", "0", "none"):
        return None
    base = Path(root) if root else Path.home() / ".cache" / "miscnet"
    return base / "baselines"


def _libraries() -> str:
    return ";".join(f"{m}={features.version(m)}" for m in ("webp", "avif", "jpg")) + \
        f";pillow={Image.__version__}"


class _Table:
    """Measured points of one (image, codec, levels), backed by the JSON cache: per point the file and
    wire sizes, and the PSNR once it was needed."""

    def __init__(self, coder: _Coder):
        self.coder = coder
        h = hashlib.sha256()
        h.update(f"{_CACHE_VERSION};{coder.codec};{coder.levels};{coder.avif_speed};{_libraries()};".encode())
        h.update(np.ascontiguousarray(coder.image).tobytes())
        h.update(str(coder.image.shape).encode())
        self.key = h.hexdigest()[:32]
        # Wire sizes depend on this project's container, file sizes and PSNRs do not: a cache written
        # under another container framing keeps the latter and measures the wire again where needed.
        self.container = len(to_bytes(EncodedImage(coder.width, coder.height, [])))
        self.points: dict[str, list] = {}
        self.levels: dict[str, list[PixelLevel]] = {}  # this call's encodings, for the PSNR
        self.dirty = False
        d = _cache_dir()
        self.path = None if d is None else d / f"{self.key}.json"
        if self.path is not None and self.path.is_file():
            try:
                data = json.loads(self.path.read_text())
                self.points = data["points"]
                if data.get("container") != self.container:
                    for p in self.points.values():
                        p[1] = None
            except (OSError, ValueError, KeyError, TypeError, IndexError):
                self.points = {}

    def _point(self, w: int, h: int, q: int, option: str) -> tuple[str, list]:
        k = f"{w}x{h}:{q}:{option}"
        if k not in self.points:
            data, levels = self.coder.encode(w, h, q, option)
            self.points[k] = [len(data), self.coder.wire_bytes(levels), None]
            self.levels[k] = levels
            self.dirty = True
        return k, self.points[k]

    def size(self, w: int, h: int, q: int, option: str) -> tuple[int, int]:
        """(file bytes, wire bytes)."""
        k, p = self._point(w, h, q, option)
        if p[1] is None:
            p[1] = self.coder.wire_bytes(self.coder.encode(w, h, q, option)[1])
            self.dirty = True
        return int(p[0]), int(p[1])

    def file_size(self, w: int, h: int, q: int, option: str) -> int:
        return int(self._point(w, h, q, option)[1][0])

    def psnr(self, w: int, h: int, q: int, option: str) -> float:
        k, p = self._point(w, h, q, option)
        if p[2] is None:
            levels = self.levels.get(k) or self.coder.encode(w, h, q, option)[1]
            c = self.coder
            p[2] = psnr(decode_pixels(levels, c.width, c.height), c.image)
            self.dirty = True
        return float(p[2])

    def save(self) -> None:
        self.levels.clear()
        if self.path is None or not self.dirty:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                json.dump({"codec": self.coder.codec, "container": self.container, "points": self.points}, f)
            os.replace(tmp, self.path)  # atomic: parallel sweep workers never read half a file
        except OSError:
            pass  # a read-only home only costs time
        self.dirty = False


# ------------------------------------------------------------------------------------------- the search

# How a raster's qualities are searched. File size grows with quality only up to wiggles, measured on
# 4 images x 4 rasters (a full scan of every quality): libwebp's sizes dip by up to 1.5 % some 50
# qualities up, libjpeg's by 1-2 bytes up to 15 qualities up, libaom's only within 4 quantisers.
# So webp and both jpegs scan every quality (they are cheap), up to files of _OVERSHOOT x the budget;
# avif (slow) bisects for the edge, then checks VERIFY_STEPS quantisers past it.
_SCAN_ALL = frozenset({"webp", "jpeg", JPEG_PROGRESSIVE})
_OVERSHOOT = 1.25
VERIFY_STEPS = 4


def largest_fitting(fits, n: int, hint: int = 0) -> int | None:
    """The largest index i < n with fits(i), for a ``fits`` monotone up to wiggles of VERIFY_STEPS steps."""
    return rate_control.largest_fitting(fits, n, hint, VERIFY_STEPS)


def _scan_fitting(table: _Table, w: int, h: int, option: str, budget: int, fit_wire: bool
                  ) -> tuple[float, int] | None:
    """(PSNR, quality) of the best-scoring file that fits, by a scan of every quality up to files of
    _OVERSHOOT x the budget (PSNR, like size, is monotone in quality only up to wiggles)."""
    found = None
    for k, q in enumerate(_QUALITIES[table.coder.codec]):
        size = table.file_size(w, h, q, option)
        if size <= budget and (not fit_wire or table.size(w, h, q, option)[1] <= budget):
            score = table.psnr(w, h, q, option)
            if found is None or score > found[0]:
                found = (score, q)
        if size > _OVERSHOOT * budget and k >= VERIFY_STEPS:  # libwebp's quality 0 is larger than 1..4
            break
    return found


# The coded file cannot show more than its raster does: up-sampling the uncoded thumbnail bounds the
# PSNR a raster can reach (coding noise has never been seen to beat it by this margin).
UB_MARGIN_DB = 0.1


def search_points(table: _Table, rasters: list[tuple[int, int]], options: tuple[str, ...], budget: int,
                  fit_wire: bool) -> tuple[float, int, int, int, str] | None:
    """The best (psnr, w, h, quality, option) whose file fits: for every raster and option every quality
    that fits (webp, jpeg) or the largest one (avif), the best PSNR among those.

    Rasters are visited from the largest one that fits at the lowest quality downwards, and the descent
    stops at the first raster whose uncoded up-sampled thumbnail (``raster_bound``) scores below the best
    file found, less UB_MARGIN_DB: no smaller raster can do better.
    """
    qualities = _QUALITIES[table.coder.codec]
    best = None
    for option in options:
        def fits(r: int, i: int, option=option) -> bool:
            size = table.file_size(*rasters[r], qualities[i], option)
            return size <= budget and (not fit_wire or table.size(*rasters[r], qualities[i], option)[1] <= budget)

        # the lowest qualities may wiggle too: a raster "fits" when any of the first few does
        low = range(min(len(qualities), VERIFY_STEPS + 1))
        top = largest_fitting(lambda r, fits=fits, low=low: any(fits(r, i) for i in low), len(rasters),
                              len(rasters) // 2)
        hint = 0
        for r in range(-1 if top is None else top, -1, -1):
            if best is not None and table.coder.raster_bound(*rasters[r]) + UB_MARGIN_DB < best[0]:
                break
            if table.coder.codec in _SCAN_ALL:
                found = _scan_fitting(table, *rasters[r], option, budget, fit_wire)
            else:  # a smaller raster fits at a higher quality than the last one: start there
                i = largest_fitting(lambda i, r=r: fits(r, i), len(qualities), hint)
                found = None if i is None else (table.psnr(*rasters[r], qualities[i], option), qualities[i])
                hint = hint if i is None else i
            if found is not None and (best is None or found[0] > best[0]):
                best = (found[0], *rasters[r], found[1], option)
    return best


def encode_baseline(image: np.ndarray, codec: str, budget: int, raster: str = "fit", levels: int = 3,
                    fit_wire: bool = True, avif_speed: int = AVIF_SPEED,
                    rasters: list[tuple[int, int]] | None = None) -> Baseline:
    """The best ``codec`` file of at most ``budget`` bytes (see the module doc); ``rasters`` replaces the
    ladder (bench_codec's speed comparison)."""
    if codec not in BASELINE_CODECS:
        raise MiscError(f"unknown baseline codec {codec!r} (use {', '.join(BASELINE_CODECS)})")
    if raster not in RASTER_MODES:
        raise MiscError(f"unknown baseline raster mode {raster!r} (use {', '.join(RASTER_MODES)})")
    if budget <= 0:
        raise MiscError(f"baseline budget must be positive, not {budget}")
    if not 0 <= avif_speed <= 10:
        raise MiscError(f"avif speed must be 0..10, not {avif_speed}")
    coder = _Coder(image, codec, levels, avif_speed)
    w, h = coder.width, coder.height
    if rasters is None:
        rasters = raster_candidates(w, h) if raster == "fit" else [(w, h)]
    options = codec_options(codec, image)
    table = _Table(coder)
    try:
        best = search_points(table, rasters, options, budget, fit_wire)
        if best is None:  # nothing fits: send the smallest candidate, flagged
            rw, rh = rasters[0] if raster == "fit" else (w, h)
            q = _QUALITIES[codec][0]
            best = (table.psnr(rw, rh, q, options[0]), rw, rh, q, options[0])
    finally:
        table.save()
    score, rw, rh, q, option = best
    data, lvls = coder.encode(rw, rh, q, option)
    encoded = EncodedImage(w, h, [_pixel_layer(lv) for lv in lvls])
    # The layers must show the receiver exactly the file's pixels (and the cache must be current).
    if codec in ("avif", "webp"):
        fmt = codec.upper()
        with Image.open(io.BytesIO(data), formats=[fmt]) as im:
            want = np.asarray(im.convert("RGB"))
        got = decode_pixels([PixelLevel(0, lv.codec, lv.params, lv.payload) for lv in lvls], rw, rh)
        if not np.array_equal(np.asarray(got).astype(np.uint8), want):
            raise MiscError(f"{codec} baseline: the receiver's layer does not decode to the file's pixels")
    size, wire = len(data), coder.wire_bytes(lvls)
    if (size, wire) != table.size(rw, rh, q, option):
        raise MiscError(f"{codec} baseline: the cache in {table.path} is stale (delete it)")
    fits = size <= budget and (wire <= budget or not fit_wire)
    return Baseline(codec, encoded, rw, rh, q, option, budget, size, wire, fits, score)
