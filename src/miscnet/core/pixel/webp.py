"""WebP thumbnails: a lossy VP8 key frame; the receiver rebuilds the RIFF container around it."""

from __future__ import annotations

import struct

import numpy as np

from miscnet.core.errors import BitstreamError, MiscError
from miscnet.core.pixel.base import PixelLevel, register
from miscnet.core.pixel.thumbnail import ThumbnailCodec, pil_decode, pil_encode
from miscnet.v1 import bitstream_pb2 as pb

# --- WebP: keep the VP8 frame tag and the partitions; RIFF, chunk header, start code and size go.
# (The boolean coder's flush also leaves 1-3 zero bytes at the end that libwebp would not miss, but
# dropping them would hide truncation from the receiver, so they stay.)

_VP8_START = b"\x9d\x01\x2a"


def _webp_encode(thumb: np.ndarray, quality: int) -> bytes:
    data = pil_encode("WEBP", thumb, quality=quality, method=6)
    if data[:4] != b"RIFF" or data[8:16] != b"WEBPVP8 ":
        raise MiscError("webp: the encoder wrote a container this codec cannot strip")
    size = struct.unpack("<I", data[16:20])[0]
    vp8 = data[20 : 20 + size]
    payload = vp8[:3] + vp8[10:]
    h, w = thumb.shape[:2]
    if _webp_rebuild(payload, w, h) != data:
        raise MiscError("webp: stripping the container is not lossless for this encoder")
    return payload


def _webp_rebuild(payload: bytes, width: int, height: int) -> bytes:
    vp8 = payload[:3] + _VP8_START + struct.pack("<HH", width, height) + payload[3:]
    chunk = b"VP8 " + struct.pack("<I", len(vp8)) + vp8 + (b"\x00" if len(vp8) % 2 else b"")
    return b"RIFF" + struct.pack("<I", 4 + len(chunk)) + b"WEBP" + chunk


def _webp_decode(payload: bytes, width: int, height: int, quality: int) -> np.ndarray:
    if len(payload) < 4:
        raise BitstreamError(f"webp level: payload of {len(payload)} bytes is too short")
    if payload[0] & 1:
        raise BitstreamError("webp level: not a VP8 key frame")
    return pil_decode("webp", "WEBP", _webp_rebuild(payload, width, height), width, height)


class WebpCodec(ThumbnailCodec):
    name = "webp"
    codec_id = pb.CODEC_PIXEL_WEBP

    def encode_thumbnail(self, thumb: np.ndarray, quality: int, chroma: str = "420") -> bytes:
        return _webp_encode(thumb, quality)  # lossy WebP is 4:2:0 only

    def decode_thumbnail(self, payload: bytes, width: int, height: int, quality: int) -> np.ndarray:
        return _webp_decode(payload, width, height, quality)

    def file_form(self, level: PixelLevel) -> bytes:
        return _webp_rebuild(level.payload, level.params.width, level.params.height)


register(WebpCodec())
