"""The .misc container: framing around the protobuf ``Bitstream`` message.

File layout (all counted in the file's bytes, and reported as overhead apart from layer payloads)::

    b"MISC"  |  Bitstream protobuf (header + layers)  |  CRC-32 of everything before, little-endian

The header carries the format version; readers refuse versions they do not know. Layers are
self-contained (kind, level, codec, params, payload), so the transport can send them one by one.
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from dataclasses import dataclass, field

from google.protobuf.message import DecodeError

from miscnet.core.errors import BitstreamError
from miscnet.core.image_io import MAX_PIXELS, MAX_SIDE
from miscnet.v1 import bitstream_pb2 as pb

MAGIC = b"MISC"
FORMAT_VERSION = 1
MAX_FILE_BYTES = 16 * 1024 * 1024  # an ultra-low-bitrate file is kilobytes; refuse absurd inputs early
MAX_LAYERS = 64

KIND_NAMES = {pb.LAYER_KIND_SEMANTIC: "semantic", pb.LAYER_KIND_MAP: "map", pb.LAYER_KIND_PIXEL: "pixel"}
CODEC_NAMES = {
    pb.CODEC_TEXT_RAW: "raw",
    pb.CODEC_TEXT_BROTLI: "brotli",
    pb.CODEC_TEXT_WORDMODEL: "wordmodel",
    pb.CODEC_MASK_BITPACK: "bitpack",
    pb.CODEC_MASK_RECTS: "rects",
    pb.CODEC_PIXEL_BLOCK: "block",
    pb.CODEC_PIXEL_WEBP: "webp",
    pb.CODEC_PIXEL_AVIF: "avif",
    pb.CODEC_PIXEL_JPEG: "jpeg",
    pb.CODEC_PIXEL_JPEG_PROGRESSIVE: "jpeg-progressive",  # baselines only (experiments/baselines.py)
}
# Codec numbers by kind (bitstream.proto): 1-15 semantic, 16-31 map, 32-63 pixel.
_CODEC_RANGE = {pb.LAYER_KIND_SEMANTIC: (1, 15), pb.LAYER_KIND_MAP: (16, 31), pb.LAYER_KIND_PIXEL: (32, 63)}
# Stream order: what the receiver can use first goes first.
KIND_ORDER = {pb.LAYER_KIND_SEMANTIC: 0, pb.LAYER_KIND_MAP: 1, pb.LAYER_KIND_PIXEL: 2}


def layer_name(layer: pb.Layer) -> str:
    """Stable short name of a layer: "semantic", "map", "pixel.0", "pixel.1", ..."""
    kind = KIND_NAMES.get(layer.kind, f"kind{layer.kind}")
    return f"{kind}.{layer.level}" if layer.kind == pb.LAYER_KIND_PIXEL else kind


def layers_digest(layers) -> str:
    """SHA-256 over the layers in stream order: the receiver reports it so a sender can check bit-exactness."""
    h = hashlib.sha256()
    for layer in sorted(layers, key=lambda ly: (KIND_ORDER.get(ly.kind, 9), ly.level)):
        data = layer.SerializeToString(deterministic=True)
        h.update(len(data).to_bytes(4, "big") + data)
    return h.hexdigest()


@dataclass
class EncodedImage:
    """An encoded image: original size and its layers in stream order."""

    width: int
    height: int
    layers: list[pb.Layer] = field(default_factory=list)

    def header(self) -> pb.Header:
        return pb.Header(
            version=FORMAT_VERSION, width=self.width, height=self.height, layer_count=len(self.layers)
        )

    def payload_bytes(self) -> int:
        return sum(len(layer.payload) for layer in self.layers)


def to_bytes(image: EncodedImage) -> bytes:
    body = MAGIC + pb.Bitstream(header=image.header(), layers=image.layers).SerializeToString()
    return body + struct.pack("<I", zlib.crc32(body))


def from_bytes(data: bytes) -> EncodedImage:
    """Parse and validate a .misc file; BitstreamError says what is wrong."""
    if len(data) > MAX_FILE_BYTES:
        raise BitstreamError(f"file is {len(data)} bytes, over the {MAX_FILE_BYTES} byte limit")
    if len(data) < len(MAGIC) + 4:
        raise BitstreamError(f"file is truncated ({len(data)} bytes)")
    if data[: len(MAGIC)] != MAGIC:
        raise BitstreamError("not a .misc file (bad magic)")
    body, (crc,) = data[:-4], struct.unpack("<I", data[-4:])
    if zlib.crc32(body) != crc:
        raise BitstreamError("checksum mismatch: the file is corrupt or truncated")
    message = pb.Bitstream()
    try:
        message.ParseFromString(body[len(MAGIC) :])
    except (DecodeError, RecursionError, ValueError) as exc:
        raise BitstreamError(f"malformed bitstream: {exc}") from None
    image = EncodedImage(message.header.width, message.header.height, list(message.layers))
    validate(image, message.header)
    return image


def validate_header(header: pb.Header) -> None:
    if header.version != FORMAT_VERSION:
        raise BitstreamError(f"unsupported format version {header.version} (this reader knows {FORMAT_VERSION})")
    if not (1 <= header.width <= MAX_SIDE and 1 <= header.height <= MAX_SIDE):
        raise BitstreamError(f"image size {header.width}x{header.height} out of range")
    if header.width * header.height > MAX_PIXELS:  # no sender of ours takes a larger input image
        raise BitstreamError(f"image size {header.width}x{header.height} is over the limit of {MAX_PIXELS} pixels")
    if header.layer_count > MAX_LAYERS:
        raise BitstreamError(f"{header.layer_count} layers, over the limit of {MAX_LAYERS}")


def validate_layer(layer: pb.Layer) -> None:
    """Checks that need no other layer: known kind and codec, params of the kind's type."""
    if layer.kind not in KIND_NAMES:
        raise BitstreamError(f"unknown layer kind {layer.kind}")
    if layer.codec not in CODEC_NAMES:
        raise BitstreamError(f"{layer_name(layer)} layer: unknown codec {layer.codec}")
    expected = {pb.LAYER_KIND_SEMANTIC: "semantic", pb.LAYER_KIND_MAP: "map", pb.LAYER_KIND_PIXEL: "pixel"}
    if not _CODEC_RANGE[layer.kind][0] <= layer.codec <= _CODEC_RANGE[layer.kind][1]:
        raise BitstreamError(f"{layer_name(layer)} layer: codec {CODEC_NAMES[layer.codec]} is not a "
                             f"{KIND_NAMES[layer.kind]} codec")
    if layer.WhichOneof("params") != expected[layer.kind]:
        raise BitstreamError(f"{layer_name(layer)} layer: parameters missing or of the wrong kind")
    if layer.kind != pb.LAYER_KIND_PIXEL and layer.level != 0:
        raise BitstreamError(f"{layer_name(layer)} layer: level {layer.level} (only pixel layers have levels)")


def validate(image: EncodedImage, header: pb.Header | None = None) -> None:
    """Whole-image checks: header, each layer, no duplicates, pixel levels 0..k without gaps."""
    header = header or image.header()
    validate_header(header)
    if header.layer_count != len(image.layers):
        raise BitstreamError(f"header announces {header.layer_count} layers, file holds {len(image.layers)}")
    seen: set[str] = set()
    for layer in image.layers:
        validate_layer(layer)
        name = layer_name(layer)
        if name in seen:
            raise BitstreamError(f"duplicate {name} layer")
        seen.add(name)
    levels = sorted(layer.level for layer in image.layers if layer.kind == pb.LAYER_KIND_PIXEL)
    if levels != list(range(len(levels))):
        raise BitstreamError(f"pixel levels {levels} are not 0..k without gaps")
