"""AVIF thumbnails: only AV1 OBUs cross the link.

Format note: the sequence header the receiver predicts follows from the raster size (``avif_speed``: the
libaom speed this codec first used there, whose loop-restoration flag the header carries). The encoder
now runs libaom at ``encoder_speed`` (4 up to ENCODER_SPEED4_AREA) with loop restoration set as the
prediction says, so the header is still left out, except above RESTORATION_AREA, where restoration pays
for the header; a 4:4:4 thumbnail (``chroma="444"``) sends its header too.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from miscnet.core import leb128
from miscnet.core.errors import BitstreamError, MiscError
from miscnet.core.pixel.base import PixelLevel, register
from miscnet.core.pixel.thumbnail import ThumbnailCodec, pil_decode, pil_encode
from miscnet.v1 import bitstream_pb2 as pb

# --- AVIF: only AV1 OBUs are sent. The ISOBMFF container (ftyp, meta, ..., ~275 bytes) and the
# temporal delimiter are rebuilt from the sequence header; the sequence header itself (8-11 bytes) is
# left out too when the receiver can predict it from the raster size, which is the common case.
# A payload that starts with a sequence header OBU carries it; one that starts with a frame does not.


def avif_speed(width: int, height: int) -> int:
    """The libaom speed the wire format's predicted sequence header assumes for a raster (part of the
    format: its loop-restoration flag is on at speed 4, up to 96 x 96). The encoder's own speed is
    ``encoder_speed``; it sets loop restoration to match, so the header stays predictable.
    """
    area = width * height
    return 4 if area <= 96 * 96 else 6 if area <= 384 * 384 else 8


# libaom speed 4 codes 0.1 to 0.6 dB better than speed 6 at equal bytes on these rasters and matches the
# baselines' files (experiments/baselines.py AVIF_SPEED); it costs about 0.1 s at 256 x 256 and 0.4 s at
# 512 x 512 per encode on this CPU, so rasters above ENCODER_SPEED4_AREA (large images at large budgets)
# are coded at speed 6. Loop restoration, which the predicted header fixes, changes PSNR by +-0.05 dB.
ENCODER_SPEED4_AREA = 640 * 640


def encoder_speed(width: int, height: int) -> int:
    """libaom speed the encoder runs at for a raster (the receiver does not need to know it)."""
    return 4 if width * height <= ENCODER_SPEED4_AREA else 6


def _restoration(width: int, height: int) -> bool:
    """The loop-restoration flag of the predicted sequence header."""
    return avif_speed(width, height) <= 4


# Above this raster area the encoder turns loop restoration on although the predicted header has it off,
# and sends its sequence header (11 bytes): on large rasters (budgets of several kB) restoration is worth
# about 0.1 dB, on small ones it changes PSNR by +-0.05 dB, less than the header's bytes.
RESTORATION_AREA = 320 * 320


def _encoder_restoration(width: int, height: int) -> bool:
    return _restoration(width, height) or width * height > RESTORATION_AREA


_AVIF_OPTIONS = {"subsampling": "4:2:0", "max_threads": 1, "codec": "aom", "advanced": {"tune": "psnr"}}
_SUBSAMPLING = {"420": "4:2:0", "444": "4:4:4"}

# AV1 Annex A: (seq_level_idx, MaxPicSize, MaxHSize, MaxVSize), enough for rasters up to 4096.
_AV1_LEVELS = (
    (0, 147456, 2048, 1152),
    (1, 278784, 2816, 1584),
    (4, 665856, 4352, 2448),
    (5, 1065024, 5504, 3096),
    (8, 2359296, 6144, 3456),
    (12, 8912896, 8192, 4352),
    (16, 35651584, 16384, 8704),
)


class _BitReader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def read(self, n: int) -> int:
        v = 0
        for _ in range(n):
            if self.pos >= 8 * len(self.data):
                raise BitstreamError("avif level: truncated sequence header")
            v = (v << 1) | ((self.data[self.pos >> 3] >> (7 - (self.pos & 7))) & 1)
            self.pos += 1
        return v


class _BitWriter:
    def __init__(self) -> None:
        self.bits: list[int] = []

    def write(self, v: int, n: int) -> None:
        self.bits.extend((v >> (n - 1 - i)) & 1 for i in range(n))

    def trailing(self) -> bytes:
        self.bits.append(1)
        self.bits.extend([0] * (-len(self.bits) % 8))
        return np.packbits(np.array(self.bits, np.uint8)).tobytes()


@dataclass(frozen=True)
class _SeqHeader:
    profile: int
    level: int
    width: int
    height: int
    mono: int
    ssx: int
    ssy: int
    csp: int
    high_bitdepth: int
    primaries: int
    transfer: int
    matrix: int
    full_range: int


def _parse_seq_header(body: bytes) -> _SeqHeader:
    """The fields of a reduced still-picture sequence header that the container repeats."""
    r = _BitReader(body)
    profile, _still, reduced = r.read(3), r.read(1), r.read(1)
    if not reduced or profile > 1:
        raise BitstreamError("avif level: only reduced still-picture profile 0/1 headers are supported")
    level = r.read(5)
    wbits, hbits = r.read(4) + 1, r.read(4) + 1
    width, height = r.read(wbits) + 1, r.read(hbits) + 1
    r.read(6)  # 128x128 superblocks, filter intra, intra edge, superres, cdef, restoration
    high_bitdepth = r.read(1)
    mono = r.read(1) if profile == 0 else 0
    primaries = transfer = matrix = 2
    if r.read(1):
        primaries, transfer, matrix = r.read(8), r.read(8), r.read(8)
    if primaries == 1 and transfer == 13 and matrix == 0:
        full_range, ssx, ssy = 1, 0, 0
    else:
        full_range = r.read(1)
        ssx = ssy = 1 if profile == 0 else 0
    csp = r.read(2) if ssx and ssy and not mono else 0
    return _SeqHeader(profile, level, width, height, mono, ssx, ssy, csp, high_bitdepth,
                      primaries, transfer, matrix, full_range)


def _obu(obu_type: int, body: bytes) -> bytes:
    return bytes([(obu_type << 3) | 2]) + leb128.encode(len(body)) + body


def _predicted_seq_header(width: int, height: int) -> bytes:
    """The sequence header OBU libaom writes for our settings, as far as we know it."""
    level = next((lv for lv, pic, hs, vs in _AV1_LEVELS if width * height <= pic and width <= hs
                  and height <= vs), 31)
    wbits, hbits = max(1, (width - 1).bit_length()), max(1, (height - 1).bit_length())
    w = _BitWriter()
    w.write(0, 3)  # profile 0
    w.write(1, 1)  # still picture
    w.write(1, 1)  # reduced still-picture header
    w.write(level, 5)
    w.write(wbits - 1, 4)
    w.write(hbits - 1, 4)
    w.write(width - 1, wbits)
    w.write(height - 1, hbits)
    restoration = 1 if _restoration(width, height) else 0
    # 64x64 superblocks, filter intra, intra edge filter, no superres, no cdef (tune=psnr), restoration
    w.write(0b011000 | restoration, 6)
    w.write(0, 1)  # 8 bits
    w.write(0, 1)  # not monochrome
    w.write(1, 1)  # colour description: sRGB primaries and transfer, BT.601 matrix
    w.write(1, 8)
    w.write(13, 8)
    w.write(6, 8)
    w.write(1, 1)  # full range
    w.write(0, 2)  # chroma sample position unknown
    w.write(0, 1)  # no separate uv delta q
    w.write(0, 1)  # no film grain
    return _obu(1, w.trailing())


def _read_obus(data: bytes) -> list[tuple[int, bytes]]:
    """Split a run of sized OBUs into (type, whole OBU bytes)."""
    out, pos = [], 0
    while pos < len(data):
        head = data[pos]
        if head & 0x80 or not head & 0x02:
            raise BitstreamError("avif level: malformed OBU header")
        size, p = leb128.decode(data, pos + 1 + ((head >> 2) & 1), "avif level: OBU size")
        if p + size > len(data):
            raise BitstreamError("avif level: truncated OBU")
        out.append(((head >> 3) & 15, data[pos : p + size]))
        pos = p + size
    return out


def _box(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", 8 + len(body)) + kind + body


def _full_box(kind: bytes, version: int, flags: int, body: bytes) -> bytes:
    return _box(kind, struct.pack(">I", (version << 24) | flags) + body)


def _avif_container(seq: _SeqHeader, mdat: bytes) -> bytes:
    """A minimal single-image AVIF file around the AV1 data, laid out as libavif writes it."""
    av1c = bytes([
        0x81,
        (seq.profile << 5) | seq.level,
        (seq.high_bitdepth << 6) | (seq.mono << 4) | (seq.ssx << 3) | (seq.ssy << 2) | seq.csp,
        0,
    ])
    depth = 10 if seq.high_bitdepth else 8
    channels = 1 if seq.mono else 3
    ipco = _box(b"ipco", b"".join([
        _full_box(b"ispe", 0, 0, struct.pack(">II", seq.width, seq.height)),
        _full_box(b"pixi", 0, 0, bytes([channels] + [depth] * channels)),
        _box(b"av1C", av1c),
        _box(b"colr", b"nclx" + struct.pack(">HHHB", seq.primaries, seq.transfer, seq.matrix,
                                            seq.full_range << 7)),
    ]))
    ipma = _full_box(b"ipma", 0, 0, struct.pack(">IHB", 1, 1, 4) + bytes([0x01, 0x02, 0x83, 0x04]))
    ftyp = _box(b"ftyp", b"avif" + struct.pack(">I", 0) + b"avifmif1miafMA1B")

    def meta(offset: int) -> bytes:
        return _full_box(b"meta", 0, 0, b"".join([
            _full_box(b"hdlr", 0, 0, b"\x00" * 4 + b"pict" + b"\x00" * 13),
            _full_box(b"pitm", 0, 0, struct.pack(">H", 1)),
            _full_box(b"iloc", 0, 0, bytes([0x44, 0x00]) + struct.pack(">HHHHII", 1, 1, 0, 1, offset,
                                                                       len(mdat))),
            _full_box(b"iinf", 0, 0, struct.pack(">H", 1)
                      + _full_box(b"infe", 2, 0, struct.pack(">HH", 1, 0) + b"av01Color\x00")),
            _box(b"iprp", ipco + ipma),
        ]))

    head = ftyp + meta(0)
    return head[: len(ftyp)] + meta(len(head) + 8) + _box(b"mdat", mdat)


def _avif_file_obus(data: bytes) -> bytes:
    """The mdat contents of a single-image AVIF file written by libavif."""
    pos = 0
    while pos + 8 <= len(data):
        size, kind = struct.unpack(">I4s", data[pos : pos + 8])
        if kind == b"mdat" and size == len(data) - pos:
            return data[pos + 8 :]
        if size < 8:
            break
        pos += size
    raise MiscError("avif: the encoder wrote a container this codec cannot strip")


def file_obus(data: bytes) -> list[tuple[int, bytes]]:
    """The AV1 OBUs, (type, whole OBU bytes), of a single-image AVIF file written by libavif (the baselines
    send a whole file's OBUs as this codec's layer)."""
    return _read_obus(_avif_file_obus(data))


def _avif_rebuild(payload: bytes, width: int, height: int) -> bytes:
    obus = _read_obus(payload)
    if not obus:
        raise BitstreamError("avif level: empty payload")
    if obus[0][0] == 1:  # the sender could not predict the sequence header and sent it
        seq_obu, frame = obus[0][1], payload[len(obus[0][1]) :]
    else:
        seq_obu, frame = _predicted_seq_header(width, height), payload
    if not frame or any(t not in (3, 4, 6) for t, _ in _read_obus(frame)):
        raise BitstreamError("avif level: payload holds no frame or unexpected OBUs")
    seq = _parse_seq_header(_obu_body(seq_obu))
    if (seq.width, seq.height) != (width, height):
        raise BitstreamError(f"avif level: sequence header says {seq.width}x{seq.height}")
    return _avif_container(seq, b"\x12\x00" + seq_obu + frame)


def _obu_body(obu: bytes) -> bytes:
    p = 1 + ((obu[0] >> 2) & 1)
    while obu[p] & 0x80:
        p += 1
    return obu[p + 1 :]


PROXY_SPEED = 9  # rate control's quick look: far faster than the encoder, at about the same size per quality
DRAFT_SPEED = 6  # rate control's ranking encodes: 3 to 5 times faster than speed 4, within 0.1 to 0.5 dB of it
_DRAFT_MIN_AREA = 32 * 32  # up to here a real encode takes a millisecond or two: no drafts


def _avif_encode(thumb: np.ndarray, quality: int, speed: int | None = None, chroma: str = "420") -> bytes:
    h, w = thumb.shape[:2]
    options = {**_AVIF_OPTIONS, "subsampling": _SUBSAMPLING[chroma],
               "advanced": {**_AVIF_OPTIONS["advanced"],
                            "enable-restoration": "1" if _encoder_restoration(w, h) else "0"}}
    data = pil_encode("AVIF", thumb, quality=quality, speed=encoder_speed(w, h) if speed is None else speed, **options)
    obus = file_obus(data)
    types = [t for t, _ in obus]
    if types[:2] != [2, 1] or any(t not in (3, 4, 6) for t in types[2:]):
        raise MiscError(f"avif: unexpected OBU sequence {types}")
    seq_obu = obus[1][1]
    frame = b"".join(o for _, o in obus[2:])
    payload = frame if seq_obu == _predicted_seq_header(w, h) else seq_obu + frame
    rebuilt = _avif_rebuild(payload, w, h)
    # Our container is byte-identical to libavif's today; should libavif change its layout, fall
    # back to checking that the receiver's file decodes to the same pixels.
    if rebuilt != data and not np.array_equal(
        pil_decode("avif", "AVIF", rebuilt, w, h), pil_decode("avif", "AVIF", data, w, h)
    ):
        raise MiscError("avif: the rebuilt container does not decode to the same pixels")
    return payload


def _avif_decode(payload: bytes, width: int, height: int, quality: int) -> np.ndarray:
    return pil_decode("avif", "AVIF", _avif_rebuild(payload, width, height), width, height)


def _canonical_qualities() -> tuple[int, ...]:
    top: dict[int, int] = {}
    for q in range(101):
        top[((100 - q) * 63 + 50) // 100] = q  # ascending q: the largest q of each quantiser wins
    return tuple(top[((100 - q) * 63 + 50) // 100] for q in range(101))


_CANONICAL_QUALITY = _canonical_qualities()


class AvifCodec(ThumbnailCodec):
    name = "avif"
    codec_id = pb.CODEC_PIXEL_AVIF
    chroma_options = ("420", "444")  # 4:4:4 (AV1 profile 1) pays for itself on colourful graphics

    def encode_thumbnail(self, thumb: np.ndarray, quality: int, chroma: str = "420") -> bytes:
        return _avif_encode(thumb, quality, chroma=chroma)

    def decode_thumbnail(self, payload: bytes, width: int, height: int, quality: int) -> np.ndarray:
        return _avif_decode(payload, width, height, quality)

    def proxy_thumbnail(self, thumb: np.ndarray, quality: int, chroma: str = "420") -> tuple[bytes, int]:
        payload = _avif_encode(thumb, quality, speed=PROXY_SPEED, chroma=chroma)
        obus = _read_obus(payload)
        # the proxy's tools differ, so its sequence header is sent; the real 4:2:0 encode's usually is not
        head = len(obus[0][1]) if obus[0][0] == 1 and chroma == "420" else 0
        return payload, len(payload) - head

    def canonical_quality(self, quality: int) -> int:
        # libavif maps quality q to the quantiser ((100 - q) * 63 + 50) // 100: 64 quantisers for 101 qualities
        return _CANONICAL_QUALITY[quality]

    def draft_thumbnail(self, thumb: np.ndarray, quality: int, chroma: str = "420") -> bytes | None:
        h, w = thumb.shape[:2]
        if w * h <= _DRAFT_MIN_AREA or encoder_speed(w, h) >= DRAFT_SPEED:
            return None  # the real encode is as quick, or is the draft's
        return _avif_encode(thumb, quality, DRAFT_SPEED, chroma)

    def file_form(self, level: PixelLevel) -> bytes:
        return _avif_rebuild(level.payload, level.params.width, level.params.height)


register(AvifCodec())
