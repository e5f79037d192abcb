"""What the thumbnail codecs (webp, avif, jpeg) share: Pillow plumbing and progressive levels.

A thumbnail codec codes a down-sampled thumbnail through Pillow and keeps only the bytes a receiver
cannot rebuild: container headers, tables and anything else that follows from the layer's PixelParams
are stripped on the sender and re-created on the receiver, and the sender checks that the rebuilt file
decodes to the same pixels before it lets a payload out. A codec module subclasses ``ThumbnailCodec``
with the two halves of that (``encode_thumbnail``, ``decode_thumbnail``) and the file form.

Several levels make the layer progressive. With ``PixelSettings.previews`` (what rate control picks)
every level is a thumbnail of its own and replaces the one before: the previews are small (a few
per cent of the bytes) and the last level is the picture a single level would be, so the progression
costs little (experiments/bench_levels.py measures it against one level of the same bytes). Without
previews, every level after the first, at twice the resolution, codes the residual over the
reconstruction of the levels before it.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from PIL import Image

from miscnet.core.errors import BitstreamError, MiscError
from miscnet.core.pixel.base import MAX_RASTER, PixelCodec, PixelLevel, PixelSettings, Scratch
from miscnet.core.pixel.imaging import DOWN_FILTER, UP_FILTER, resize, to_uint8
from miscnet.v1 import bitstream_pb2 as pb

MAX_THUMBNAIL_LEVELS = 4

# Thumbnail levels k > 0 code target - up-sampled previous reconstruction, offset to 128. Measured
# for 2 levels (bytes to reach block mode's PSNR, mean over the samples, relative to block mode):
# residual 0.150 / 0.208 / 0.243 (avif / webp / jpeg) against 0.165 / 0.240 / 0.272 for an
# independent second thumbnail. The decoder understands both (params.residual); this picks what the
# encoder writes.
RESIDUAL_LEVELS = True
RESIDUAL_GAIN = 8  # residual * gain / 8; 8 (no scaling) measured best or equal among 5, 6, 8, 11, 16, 32

_LEVEL_SCALE = 2  # raster side ratio between consecutive thumbnail levels


# ----------------------------------------------------------------------------------------------
# Pillow plumbing


def pil_decode(name: str, fmt: str, data: bytes, width: int, height: int) -> np.ndarray:
    """Decode a rebuilt file (Pillow format ``fmt``) with Pillow; anything wrong becomes a one-line
    BitstreamError that names the codec ``name``."""
    try:
        with Image.open(io.BytesIO(data), formats=[fmt]) as im:
            if im.size != (width, height):
                raise BitstreamError(f"{name} level: decodes to {im.size}, expected {(width, height)}")
            im.load()
            arr = np.asarray(im.convert("RGB"))
    except BitstreamError:
        raise
    except Exception as e:  # Pillow raises OSError, ValueError, SyntaxError, EOFError, ... on garbage
        raise BitstreamError(f"{name} level: undecodable payload ({type(e).__name__})") from None
    if arr.shape != (height, width, 3):
        raise BitstreamError(f"{name} level: decodes to shape {arr.shape}")
    return arr


def pil_encode(fmt: str, thumb: np.ndarray, **options) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(thumb).save(buf, fmt, **options)
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------
# thumbnail levels


def level_rasters(width: int, height: int, levels: int) -> list[tuple[int, int]]:
    """Raster of each thumbnail level: the last one is width x height, each earlier one half as big."""
    out = []
    for k in range(levels):
        f = _LEVEL_SCALE ** (levels - 1 - k)
        out.append((max(1, round(width / f)), max(1, round(height / f))))
    return out


class _Targets:
    """Down-sampled versions of one image, computed once per raster (rate control reuses them)."""

    def __init__(self, image: np.ndarray) -> None:
        self.image = image
        self.pil: Image.Image | None = None
        self.cache: dict[tuple[int, int], np.ndarray] = {}

    def get(self, width: int, height: int) -> np.ndarray:
        key = (width, height)
        if key not in self.cache:
            # Pillow's 8-bit resampler: no float copy of a large image, and within 0.01 dB of a
            # float32 resize once the thumbnail is coded.
            if self.pil is None:
                self.pil = Image.fromarray(self.image)
            self.cache[key] = np.asarray(self.pil.resize(key, DOWN_FILTER), dtype=np.float32)
        return self.cache[key]

    def shrink(self) -> None:
        self.pil = None  # a cached search keeps small things only


_SCRATCH_KEY = "thumbnail.targets"  # one _Targets per image, shared by every thumbnail codec


def thumbnail_targets(image: np.ndarray, scratch: Scratch | None) -> _Targets:
    """The down-sampled targets of ``image`` (``get(width, height)`` as float32), kept in ``scratch``."""
    return _targets(image, scratch)


def _targets(image: np.ndarray, scratch: Scratch | None) -> _Targets:
    if scratch is None:
        return _Targets(image)
    if _SCRATCH_KEY not in scratch:
        scratch[_SCRATCH_KEY] = _Targets(image)
    return scratch[_SCRATCH_KEY]


class ThumbnailCodec(PixelCodec):
    """A still-image codec run on thumbnails through Pillow, with residual levels above level 0."""

    max_levels = MAX_THUMBNAIL_LEVELS
    auto = True
    quality_search = True
    decoder_needs_quality = False  # PixelParams.quality is written only where the decoder reads it (jpeg)

    ladder_full_size = True

    def encode_thumbnail(self, thumb: np.ndarray, quality: int, chroma: str = "420") -> bytes:
        """The payload of one uint8 thumbnail: the encoder's file less what the receiver rebuilds.
        ``chroma``: one of ``chroma_options`` (the decoder reads it from the payload)."""
        raise NotImplementedError

    def decode_thumbnail(self, payload: bytes, width: int, height: int, quality: int) -> np.ndarray:
        """The uint8 thumbnail of one payload; anything malformed: BitstreamError."""
        raise NotImplementedError

    def proxy_thumbnail(self, thumb: np.ndarray, quality: int, chroma: str = "420") -> tuple[bytes, int]:
        """A quicker encode that ``decode_thumbnail`` reads, and the size the real encode would about
        have: rate control predicts the quality that fits with it and encodes only a few for real."""
        payload = self.encode_thumbnail(thumb, quality, chroma)
        return payload, len(payload)

    def canonical_quality(self, quality: int) -> int:
        """The largest quality that codes exactly as ``quality`` does (rate control encodes each once)."""
        return quality

    def draft_thumbnail(self, thumb: np.ndarray, quality: int, chroma: str = "420") -> bytes | None:
        """A quicker real encode that ``decode_thumbnail`` reads, of about the size and PSNR the real one
        has (rate control ranks rasters with it and encodes only the winner for real); None where the
        codec has none (its real encode is quick)."""
        return None

    def check_settings(self, s: PixelSettings) -> None:
        if not 0 <= s.quality <= 100:
            raise MiscError(f"pixel layer: quality {s.quality} is outside 0..100 (0: the default, 50)")
        if not 1 <= s.levels <= MAX_THUMBNAIL_LEVELS:
            raise MiscError(f"pixel layer: levels must be 1..{MAX_THUMBNAIL_LEVELS}")
        if s.chroma not in self.chroma_options:
            raise MiscError(f"pixel layer: {self.name} has no chroma option {s.chroma!r} "
                            f"(use {', '.join(self.chroma_options)})")
        if s.previews and len(s.previews) != s.levels - 1:
            raise MiscError(f"pixel layer: {len(s.previews)} previews for {s.levels} levels (need levels - 1)")
        for w, h, q in s.previews:
            if not (1 <= w <= MAX_RASTER and 1 <= h <= MAX_RASTER and 1 <= q <= 100):
                raise MiscError(f"pixel layer: preview {w}x{h} quality {q} is outside 1..{MAX_RASTER} or 1..100")

    def encode(self, image: np.ndarray, settings: PixelSettings, scratch: Scratch | None = None
               ) -> list[PixelLevel]:
        return encode_thumbnail_levels(self, _targets(image, scratch), settings)

    def decode(self, levels: Sequence[PixelLevel]) -> np.ndarray:
        return decode_thumbnail_levels(self, levels)


def encode_thumbnail_levels(codec: ThumbnailCodec, targets: _Targets, s: PixelSettings) -> list[PixelLevel]:
    quality = s.quality or 50
    if s.previews:
        out = []
        for k, (w, h, q) in enumerate((*s.previews, (s.width, s.height, quality))):
            params = pb.PixelParams(width=w, height=h, quality=q if codec.decoder_needs_quality else 0)
            chroma = s.chroma if k == len(s.previews) else "420"  # the previews are a few dozen bytes
            out.append(PixelLevel(k, codec.codec_id, params,
                                  codec.encode_thumbnail(to_uint8(targets.get(w, h)), q, chroma)))
        return out
    stored_quality = quality if codec.decoder_needs_quality else 0
    out: list[PixelLevel] = []
    recon = None
    for k, (w, h) in enumerate(level_rasters(s.width, s.height, s.levels)):
        target = targets.get(w, h)
        if k == 0 or not RESIDUAL_LEVELS:
            params = pb.PixelParams(width=w, height=h, quality=stored_quality)
            coded = to_uint8(target)
        else:
            params = pb.PixelParams(width=w, height=h, quality=stored_quality, residual=True,
                                    residual_gain=RESIDUAL_GAIN)
            pred = resize(recon, w, h, UP_FILTER)
            coded = to_uint8((target - pred) * (RESIDUAL_GAIN / 8.0) + 128.0)
        lv = PixelLevel(k, codec.codec_id, params, codec.encode_thumbnail(coded, quality, s.chroma))
        out.append(lv)
        if RESIDUAL_LEVELS and k + 1 < s.levels:
            recon = decode_thumbnail_levels(codec, out)  # the receiver's view, so both sides stay in step
    return out


def decode_thumbnail_levels(codec: ThumbnailCodec, levels: Sequence[PixelLevel]) -> np.ndarray:
    name = codec.name
    for lv in levels:
        p = lv.params
        if p.step or p.plane_shift or p.plane_bits or p.colorspace:
            raise BitstreamError(f"{name} level {lv.level}: block-codec fields set")
        if lv.level == 0 and p.residual:
            raise BitstreamError(f"{name} level 0: cannot be a residual")
        if p.residual and not 1 <= p.residual_gain <= 255:
            raise BitstreamError(f"{name} level {lv.level}: residual gain {p.residual_gain} outside 1..255")
        if not 0 <= p.quality <= 100:
            raise BitstreamError(f"{name} level {lv.level}: quality {p.quality} is outside 0..100")
    # An independent level replaces everything before it: start from the last one.
    start = max(k for k, lv in enumerate(levels) if not lv.params.residual)
    recon = None
    for lv in levels[start:]:
        p = lv.params
        dec = codec.decode_thumbnail(lv.payload, p.width, p.height, p.quality).astype(np.float32)
        if p.residual:
            pred = resize(recon, p.width, p.height, UP_FILTER)
            recon = np.clip(pred + (dec - 128.0) * (8.0 / p.residual_gain), 0.0, 255.0)
        else:
            recon = dec
    return recon
