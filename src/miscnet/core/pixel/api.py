"""The pixel layer's entry points: encode, decode and measure levels of any registered codec.

Each call finds its codec in the registry (``base.lookup`` by name for settings, ``base.lookup_id`` by
the ``pb.CODEC_PIXEL_*`` id for levels), checks what is common to every codec, and hands over.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from miscnet.core.errors import BitstreamError
from miscnet.core.pixel.base import (
    MAX_OUTPUT,
    MAX_RASTER,
    PixelCodec,
    PixelLevel,
    PixelSettings,
    check_image,
    check_settings,
    lookup_id,
)
from miscnet.core.pixel.imaging import UP_FILTER, to_uint8
from miscnet.v1 import bitstream_pb2 as pb


def encode_pixels(image: np.ndarray, settings: PixelSettings) -> list[PixelLevel]:
    """Code an RGB uint8 image as pixel levels (coarse first). Same input, same bytes."""
    check_image(image)
    return check_settings(settings).encode(image, settings)


def check_levels(levels: Sequence[PixelLevel]) -> PixelCodec:
    """The codec of a well-formed prefix 0..k of levels; BitstreamError otherwise."""
    if not isinstance(levels, Sequence) or isinstance(levels, (str, bytes)) or not levels:
        raise BitstreamError("pixel layer: no levels to decode")
    codec = None
    for k, lv in enumerate(levels):
        if not isinstance(lv, PixelLevel) or not isinstance(lv.params, pb.PixelParams):
            raise BitstreamError(f"pixel layer: item {k} is not a pixel level")
        if not isinstance(lv.payload, (bytes, bytearray)):
            raise BitstreamError(f"pixel layer: level {k} payload is not bytes")
        if lv.level != k:
            raise BitstreamError(f"pixel layer: levels are not a prefix 0..k (level {lv.level} at index {k})")
        if lookup_id(lv.codec) is None:
            raise BitstreamError(f"pixel layer: level {k} has unknown codec {lv.codec}")
        if codec is None:
            codec = lv.codec
        elif lv.codec != codec:
            raise BitstreamError(f"pixel layer: level {k} mixes codec {lv.codec} with {codec}")
        p = lv.params
        if not (1 <= p.width <= MAX_RASTER and 1 <= p.height <= MAX_RASTER):
            raise BitstreamError(
                f"pixel layer: level {k} raster {p.width}x{p.height} is outside 1..{MAX_RASTER}"
            )
        limit = Image.MAX_IMAGE_PIXELS
        if limit is not None and p.width * p.height > limit:
            raise BitstreamError(f"pixel layer: level {k} raster exceeds Pillow's limit of {limit} pixels")
    return lookup_id(codec)


def decode_raster(levels: Sequence[PixelLevel]) -> np.ndarray:
    """The coded raster (block grid or last thumbnail) as float32 RGB in 0..255, before up-sampling."""
    return check_levels(levels).decode(levels).astype(np.float32)


def decode_pixels(levels: Sequence[PixelLevel], width: int, height: int) -> np.ndarray:
    """Decode the levels received so far (a prefix 0..k) to a uint8 RGB image of width x height."""
    if not (isinstance(width, int) and isinstance(height, int)):
        raise BitstreamError("pixel layer: output size must be integers")
    if not (1 <= width <= MAX_OUTPUT and 1 <= height <= MAX_OUTPUT):
        raise BitstreamError(f"pixel layer: output size {width}x{height} is outside 1..{MAX_OUTPUT}")
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and width * height > limit:
        raise BitstreamError(f"pixel layer: output of {width * height} pixels exceeds Pillow's limit {limit}")
    small = Image.fromarray(to_uint8(decode_raster(levels)))
    return np.asarray(small.resize((width, height), UP_FILTER))


def payload_bytes(levels: Sequence[PixelLevel]) -> int:
    """Bytes that cross the link for these levels (payloads only, no framing)."""
    return sum(len(lv.payload) for lv in levels)


def thumbnail_file(level: PixelLevel) -> bytes:
    """The standard .webp / .avif / .jpg file the receiver rebuilds around one thumbnail level.

    A level-0 (or non-residual) file is a viewable image; its size against the payload's is what
    stripping saves.
    """
    codec = check_levels([PixelLevel(0, level.codec, level.params, level.payload)])
    return codec.file_form(level)
