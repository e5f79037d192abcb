"""The pixel layer: MISC's tiny reference image, as quantised block means or a small thumbnail.

Codecs share one interface (``base.PixelCodec``) and are found through a registry (``base.register``,
``lookup``, ``lookup_id``, ``codec_names``). The built-in ones register when this package is imported:
``block`` (MISC's ``pixel`` mode done right, block.py) and the thumbnail codecs ``webp``, ``avif`` and
``jpeg`` (webp.py, avif.py, jpeg.py over the shared machinery in thumbnail.py), and ``ref`` (MISC's
``ref`` mode: an external codec's file sent as it is, ref.py). The entry points
(api.py) dispatch through the registry; the sender's rate control lives in miscnet.sender.rate_control.
"""

from miscnet.core.pixel import avif, block, jpeg, net, ref, webp  # noqa: F401  (they register themselves)
from miscnet.core.pixel.api import decode_pixels, decode_raster, encode_pixels, payload_bytes, thumbnail_file
from miscnet.core.pixel.base import (
    MAX_OUTPUT,
    MAX_RASTER,
    PixelCodec,
    PixelLevel,
    PixelSettings,
    Scratch,
    auto_codec_names,
    codec_names,
    lookup,
    lookup_id,
    register,
    unregister,
)
from miscnet.core.pixel.imaging import DOWN_FILTER, UP_FILTER, psnr

__all__ = [
    "DOWN_FILTER", "MAX_OUTPUT", "MAX_RASTER", "UP_FILTER", "PixelCodec", "PixelLevel", "PixelSettings", "Scratch",
    "auto_codec_names", "codec_names", "decode_pixels", "decode_raster", "encode_pixels", "lookup", "lookup_id",
    "payload_bytes", "psnr", "register", "thumbnail_file", "unregister",
]
