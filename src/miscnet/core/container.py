"""The .misc container: one encoded image in a file, with a few bytes of framing.

File layout, version 2 (proto/PROTOCOL.md section 10 gives every byte)::

    "MI" | version 2 | width, height (varints) | one record per layer | CRC-32 of everything before (LE)
    record = head byte (codec, "mask follows", "last") | the kind's params as varints | size | payload

A layer's kind follows from its codec's range, its level from its place (pixel records are levels 0, 1,
... in order), a pixel raster's second side from the image's aspect, and the last record's size from the
file's: a three-layer file costs at most 24 bytes of framing (experiments/bench_levels.py), where the
protobuf ``Bitstream`` of version 1 cost over 90. The layers read back are the very ``pb.Layer`` messages
written (the transport sends those, and the layer digest is taken over them). Version 1 files are refused
with a one-line error.
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from dataclasses import dataclass, field

from miscnet.core import leb128
from miscnet.core.errors import BitstreamError
from miscnet.core.image_io import MAX_PIXELS, MAX_SIDE
from miscnet.v1 import bitstream_pb2 as pb

MAGIC = b"MI"
CONTAINER_VERSION = 2  # the .misc file layout (byte 2 of the file)
V1_MAGIC = b"MISC"  # version 1 files: a protobuf Bitstream between this magic and a CRC
FORMAT_VERSION = 1  # the transport's Header.version (PROTOCOL.md section 5.1), not the file's
MAX_FILE_BYTES = 16 * 1024 * 1024  # an ultra-low-bitrate file is kilobytes; refuse absurd inputs early
MAX_LAYERS = 64
MIN_FILE_BYTES = len(MAGIC) + 1 + 2 + 4  # magic, version, two one-byte sizes, CRC

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
    pb.CODEC_PIXEL_REF: "ref",  # MISC's ref mode: an external codec's file (core/pixel/ref.py)
    pb.CODEC_PIXEL_NET: "net",
}
# Codec numbers by kind (bitstream.proto): 1-15 semantic, 16-31 map, 32-63 pixel.
_CODEC_RANGE = {pb.LAYER_KIND_SEMANTIC: (1, 15), pb.LAYER_KIND_MAP: (16, 31), pb.LAYER_KIND_PIXEL: (32, 63)}
# Stream order: what the receiver can use first goes first.
KIND_ORDER = {pb.LAYER_KIND_SEMANTIC: 0, pb.LAYER_KIND_MAP: 1, pb.LAYER_KIND_PIXEL: 2}

# Record head byte: bits 0-5 the codec, bit 6 "a mask of optional params follows" (pixel records only),
# bit 7 "last record" (no size: its payload runs up to the CRC).
_CODEC_BITS, _MASKED, _LAST = 0x3F, 0x40, 0x80
# Params written as varints, in this order, for every record of the kind.
_FIXED = {pb.LAYER_KIND_SEMANTIC: ("objects", "model_version"), pb.LAYER_KIND_MAP: ("grid", "objects")}
# Pixel records: the raster side along the image's shorter dimension, then (with the mask bit) the mask
# and, for each bit set from bit 0 up, one value (none for "residual", a flag).
_PIXEL_OPTIONAL = ("long_side", "quality", "residual", "residual_gain", "step", "plane_shift", "plane_bits",
                   "colorspace")


def layer_name(layer: pb.Layer) -> str:
    """Stable short name of a layer: "semantic", "map", "pixel.0", "pixel.1", ..."""
    kind = KIND_NAMES.get(layer.kind, f"kind{layer.kind}")
    return f"{kind}.{layer.level}" if layer.kind == pb.LAYER_KIND_PIXEL else kind


def stream_order(layers) -> list[pb.Layer]:
    return sorted(layers, key=lambda ly: (KIND_ORDER.get(ly.kind, 9), ly.level))


def layers_digest(layers) -> str:
    """SHA-256 over the layers in stream order: the receiver reports it so a sender can check bit-exactness."""
    h = hashlib.sha256()
    for layer in stream_order(layers):
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
        """The transport's Header of this image (every block carries it)."""
        return pb.Header(
            version=FORMAT_VERSION, width=self.width, height=self.height, layer_count=len(self.layers)
        )

    def payload_bytes(self) -> int:
        return sum(len(layer.payload) for layer in self.layers)


# ----------------------------------------------------------------------------------------------
# writing


def derived_long_side(width: int, height: int, side: int) -> int:
    """The raster's other side when it keeps the image's aspect: round half up, at least 1."""
    short, long = min(width, height), max(width, height)
    return max(1, (2 * long * side + short) // (2 * short))


def _pixel_sides(width: int, height: int, params: pb.PixelParams) -> tuple[int, int]:
    """(stored side, long side) of a raster: the side along the image's shorter dimension comes first."""
    return (params.width, params.height) if width <= height else (params.height, params.width)


def _record(image: EncodedImage, layer: pb.Layer, last: bool) -> bytes:
    head = layer.codec | (_LAST if last else 0)
    params = layer.WhichOneof("params")
    values: list[int] = []
    if layer.kind == pb.LAYER_KIND_PIXEL:
        p = layer.pixel
        side, long_side = _pixel_sides(image.width, image.height, p)
        mask, optional = 0, []
        for bit, name in enumerate(_PIXEL_OPTIONAL):
            if name == "long_side":
                value = long_side if long_side != derived_long_side(image.width, image.height, side) else 0
                present = long_side != derived_long_side(image.width, image.height, side)
            else:
                value = int(getattr(p, name))
                present = value != 0
            if present:
                mask |= 1 << bit
                if name != "residual":
                    optional.append(value)
        values = [side] + ([mask] + optional if mask else [])
        head |= _MASKED if mask else 0
    else:
        values = [getattr(getattr(layer, params), name) for name in _FIXED[layer.kind]]
    out = bytearray([head])
    for v in values:
        out += leb128.encode(v)
    if not last:
        out += leb128.encode(len(layer.payload))
    return bytes(out) + layer.payload


def to_bytes(image: EncodedImage) -> bytes:
    """The .misc file of an image; BitstreamError for layers the format cannot hold exactly. The image is
    not validated as a whole (tests write hostile files with this; readers validate), but every layer
    must be valid on its own: the record says its kind through its codec."""
    layers = stream_order(image.layers)
    for layer in layers:
        validate_layer(layer)
    body = bytearray(MAGIC + bytes([CONTAINER_VERSION]))
    body += leb128.encode(image.width) + leb128.encode(image.height)
    for i, layer in enumerate(layers):
        body += _record(image, layer, last=i == len(layers) - 1)
    body += struct.pack("<I", zlib.crc32(body))
    data = bytes(body)
    # The file must give back these very layers (digest, transport): anything it cannot say is refused.
    for written, read in zip(layers, _read(data).layers, strict=True):
        if written.SerializeToString(deterministic=True) != read.SerializeToString(deterministic=True):
            raise BitstreamError(f"{layer_name(written)} layer: holds fields a .misc file cannot store")
    return data


# ----------------------------------------------------------------------------------------------
# reading


def _kind_of(codec: int) -> int | None:
    return next((kind for kind, (lo, hi) in _CODEC_RANGE.items() if lo <= codec <= hi), None)


class _Reader:
    def __init__(self, data: bytes, end: int) -> None:
        self.data, self.pos, self.end = data, 0, end

    def varint(self, what: str) -> int:
        value, self.pos = leb128.decode(self.data[: self.end], self.pos, what)
        if value > 0xFFFFFFFF:
            raise BitstreamError(f"{what} {value} is over 32 bits")
        return value


def from_bytes(data: bytes) -> EncodedImage:
    """Parse and validate a .misc file; BitstreamError says what is wrong, in one line."""
    image = _read(data)
    validate(image)
    return image


def _read(data: bytes) -> EncodedImage:
    """The image a file's bytes spell out, checked for structure only (validate checks the rest)."""
    if len(data) > MAX_FILE_BYTES:
        raise BitstreamError(f"file is {len(data)} bytes, over the {MAX_FILE_BYTES} byte limit")
    if data[: len(V1_MAGIC)] == V1_MAGIC:
        raise BitstreamError(f"unsupported container version 1 (an older miscnet wrote it; this reader knows "
                             f"version {CONTAINER_VERSION}): encode the image again")
    if len(data) < MIN_FILE_BYTES:
        raise BitstreamError(f"file is truncated ({len(data)} bytes)")
    if data[: len(MAGIC)] != MAGIC:
        raise BitstreamError("not a .misc file (bad magic)")
    if data[len(MAGIC)] != CONTAINER_VERSION:
        raise BitstreamError(f"unsupported container version {data[len(MAGIC)]} "
                             f"(this reader knows version {CONTAINER_VERSION})")
    end = len(data) - 4
    if zlib.crc32(data[:end]) != struct.unpack("<I", data[end:])[0]:
        raise BitstreamError("checksum mismatch: the file is corrupt or truncated")
    r = _Reader(data, end)
    r.pos = len(MAGIC) + 1
    width, height = r.varint("image width"), r.varint("image height")
    if not (width and height):
        raise BitstreamError(f"image size {width}x{height} out of range")
    layers: list[pb.Layer] = []
    level = 0
    while r.pos < end:
        if len(layers) >= MAX_LAYERS:
            raise BitstreamError(f"more than {MAX_LAYERS} layers")
        what = f"record {len(layers)}"
        head = data[r.pos]
        r.pos += 1
        codec, kind = head & _CODEC_BITS, _kind_of(head & _CODEC_BITS)
        if codec not in CODEC_NAMES or kind is None:
            raise BitstreamError(f"{what}: unknown codec {codec}")
        layer = pb.Layer(kind=kind, codec=codec)
        if kind == pb.LAYER_KIND_PIXEL:
            layer.level, level = level, level + 1
            p = layer.pixel
            side = r.varint(f"{what} raster side")
            long_side = derived_long_side(width, height, side)
            mask = r.varint(f"{what} params mask") if head & _MASKED else 0
            if mask >> len(_PIXEL_OPTIONAL):
                raise BitstreamError(f"{what}: params mask {mask:#x} sets undefined bits")
            for bit, name in enumerate(_PIXEL_OPTIONAL):
                if not mask >> bit & 1:
                    continue
                if name == "residual":
                    p.residual = True
                elif name == "long_side":
                    long_side = r.varint(f"{what} raster long side")
                else:
                    setattr(p, name, r.varint(f"{what} {name}"))
            p.width, p.height = (side, long_side) if width <= height else (long_side, side)
        else:
            if head & _MASKED:
                raise BitstreamError(f"{what}: a {KIND_NAMES[kind]} record has no params mask")
            params = layer.semantic if kind == pb.LAYER_KIND_SEMANTIC else layer.map
            params.SetInParent()
            for name in _FIXED[kind]:
                setattr(params, name, r.varint(f"{what} {name}"))
        if head & _LAST:
            size = end - r.pos
        else:
            size = r.varint(f"{what} payload size")
            if r.pos + size >= end:
                raise BitstreamError(f"{what}: payload runs past the last record")
        if r.pos + size > end:
            raise BitstreamError(f"{what}: truncated")
        layer.payload = data[r.pos : r.pos + size]
        r.pos += size
        layers.append(layer)
    return EncodedImage(width, height, layers)


# ----------------------------------------------------------------------------------------------
# validation (shared with the transport: Header and Layer messages)


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
