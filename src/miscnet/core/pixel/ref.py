"""The ref codec: MISC's ``ref`` mode, an external codec's output sent as it is.

MISC's ``ref`` mode takes the reference from any codec the user runs (VVC, HiFiC, ...) and counts its bpp.
Here the layer's payload is that codec's file, byte for byte, so the bytes counted are the bytes that
cross the link; the receiver must be able to decode it, so the file must be one Pillow reads: JPEG, PNG,
WebP, AVIF or JPEG 2000 (where this Pillow has the codec), told apart by their magic bytes and opened
with that one format only. PixelParams holds the picture's width and height and nothing else; the
decoder refuses a file whose header says another size before it decodes a pixel, so the work one layer
can cause is bounded by the raster limit (MAX_RASTER a side, Pillow's pixel limit). The file is decoded
as it is stored: no EXIF rotation (the sender refuses files that ask for one), first and only frame.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, features

from miscnet.core.errors import BitstreamError, MiscError
from miscnet.core.image_io import _to_rgb
from miscnet.core.pixel.base import MAX_RASTER, PixelCodec, PixelLevel, PixelSettings, Scratch, register
from miscnet.v1 import bitstream_pb2 as pb

MAX_REF_BYTES = 4 * 1024 * 1024 - 1024  # within the 4 MiB of a unit and a block on the link (PROTOCOL.md 13)
_EXIF_ORIENTATION = 0x0112


def _is_avif(data: bytes) -> bool:
    return data[4:8] == b"ftyp" and data[8:12] in (b"avif", b"avis")


# (name, Pillow format, magic test, Pillow feature that decodes it or None when always built in)
_FORMATS = (
    ("jpeg", "JPEG", lambda d: d[:3] == b"\xff\xd8\xff", "jpg"),
    ("png", "PNG", lambda d: d[:8] == b"\x89PNG\r\n\x1a\n", "zlib"),
    ("webp", "WEBP", lambda d: d[:4] == b"RIFF" and d[8:12] == b"WEBP", "webp"),
    ("avif", "AVIF", _is_avif, "avif"),
    ("jpeg2000", "JPEG2000", lambda d: d[:4] == b"\xff\x4f\xff\x51"
     or d[:12] == b"\x00\x00\x00\x0cjP  \r\n\x87\n", "jpg_2000"),
)


def supported_formats() -> tuple[str, ...]:
    """The file formats a ref layer may hold with this Pillow (sender and receiver must agree)."""
    Image.init()
    return tuple(name for name, fmt, _, feature in _FORMATS
                 if fmt in Image.OPEN and (feature is None or features.check(feature)))


def sniff(data: bytes) -> tuple[str, str] | None:
    """(name, Pillow format) of the file these bytes start, by magic; None for anything else."""
    return next(((name, fmt) for name, fmt, test, _ in _FORMATS if test(data)), None)


def _open_checked(data: bytes, what: str, error: type[MiscError], width: int | None = None,
                  height: int | None = None) -> tuple[np.ndarray, str, int]:
    """Decode a ref file: (uint8 RGB, format name, EXIF orientation). Raises ``error`` in one line.

    The size the file claims is checked against ``width`` x ``height`` (the decoder) or the raster limit
    (the sender) before any pixel is decoded."""
    if not data:
        raise error(f"{what}: empty file")
    if len(data) > MAX_REF_BYTES:
        raise error(f"{what}: {len(data)} bytes, over the {MAX_REF_BYTES} byte limit of a layer")
    kind = sniff(data)
    if kind is None:
        raise error(f"{what}: not a JPEG, PNG, WebP, AVIF or JPEG 2000 file (magic bytes {data[:4].hex()})")
    name, fmt = kind
    if name not in supported_formats():
        raise error(f"{what}: {name} files cannot be decoded by this Pillow (it reads "
                    f"{', '.join(supported_formats())})")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=[fmt]) as im:
                w, h = im.size
                if width is not None and (w, h) != (width, height):
                    raise error(f"{what}: the {name} file is {w}x{h}, the layer says {width}x{height}")
                if not (1 <= w <= MAX_RASTER and 1 <= h <= MAX_RASTER):
                    raise error(f"{what}: the {name} file is {w}x{h}, outside 1..{MAX_RASTER} a side")
                limit = Image.MAX_IMAGE_PIXELS
                if limit is not None and w * h > limit:
                    raise error(f"{what}: the {name} file is {w}x{h}, over Pillow's limit of {limit} pixels")
                if getattr(im, "n_frames", 1) != 1:
                    raise error(f"{what}: the {name} file has {im.n_frames} frames; a reference is one picture")
                orientation = int(im.getexif().get(_EXIF_ORIENTATION, 1) or 1)
                im.load()
                arr = _to_rgb(im, what)
    except MiscError as e:
        raise error(str(e)) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise error(f"{what}: the {name} file claims more than Pillow's limit of {Image.MAX_IMAGE_PIXELS} "
                    "pixels (a decompression bomb?)") from None
    except Exception as e:  # Pillow raises OSError, ValueError, SyntaxError, EOFError, ... on garbage
        raise error(f"{what}: undecodable {name} file ({type(e).__name__})") from None
    if arr.shape != (h, w, 3):
        raise error(f"{what}: the {name} file decodes to shape {arr.shape}, not {h}x{w}x3")
    return arr, name, orientation


def ref_levels(data: bytes, image_width: int, image_height: int, source: str = "ref file") -> list[PixelLevel]:
    """The one pixel level of an external codec's file: its bytes, unchanged. MiscError (one line,
    naming ``source``) for a file the receiver could not decode or that cannot describe this image."""
    if not isinstance(data, (bytes, bytearray)):
        raise MiscError(f"{source}: the ref payload must be bytes")
    data = bytes(data)
    arr, name, orientation = _open_checked(data, source, MiscError)
    h, w = arr.shape[:2]
    if orientation != 1:
        raise MiscError(f"{source}: the {name} file asks for EXIF orientation {orientation}, which the receiver "
                        "does not apply; save it upright without the tag")
    if w > image_width or h > image_height:
        raise MiscError(f"{source}: the {name} file is {w}x{h}, larger than the {image_width}x{image_height} "
                        "image it is the reference of")
    return [PixelLevel(0, pb.CODEC_PIXEL_REF, pb.PixelParams(width=w, height=h), data)]


def read_ref_file(path: str | os.PathLike, image_width: int, image_height: int) -> list[PixelLevel]:
    """``ref_levels`` of the file at ``path``, with its size checked before it is read."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_REF_BYTES:
            raise MiscError(f"ref file {path}: {size} bytes, over the {MAX_REF_BYTES} byte limit of a layer")
        data = path.read_bytes()
    except OSError as e:
        raise MiscError(f"cannot read ref file {path}: {e.strerror or e}") from None
    return ref_levels(data, image_width, image_height, f"ref file {path}")


class RefCodec(PixelCodec):
    name = "ref"
    codec_id = pb.CODEC_PIXEL_REF
    max_levels = 1
    auto = False  # nothing to search: the file is what it is

    def check_settings(self, s: PixelSettings) -> None:
        raise MiscError("pixel layer: ref levels come from an external codec's file (--ref FILE), "
                        "not from settings")

    def encode(self, image: np.ndarray, settings: PixelSettings, scratch: Scratch | None = None
               ) -> list[PixelLevel]:
        self.check_settings(settings)
        return []

    def decode(self, levels: Sequence[PixelLevel]) -> np.ndarray:
        if len(levels) != 1:
            raise BitstreamError(f"ref level: {len(levels)} levels, a ref layer has exactly one")
        lv = levels[0]
        p = lv.params
        if p.step or p.plane_shift or p.plane_bits or p.colorspace or p.residual or p.residual_gain or p.quality:
            raise BitstreamError("ref level 0: fields of another codec set")
        arr, _, _ = _open_checked(bytes(lv.payload), "ref level 0", BitstreamError, p.width, p.height)
        return arr.astype(np.float32)

    def file_form(self, level: PixelLevel) -> bytes:
        return bytes(level.payload)  # the external codec's own file

    def candidates(self, rasters, levels: int) -> list[PixelSettings]:
        raise MiscError("pixel layer: ref takes an external codec's file (--ref FILE); rate control has "
                        "nothing to choose")


register(RefCodec())
