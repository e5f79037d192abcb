"""The progressive-JPEG baseline as a pixel codec, registered into the core registry by this module.

A standard progressive .jpg file, headers included (what a user sends today), cut at scan boundaries:
level 0 holds the headers and the first scan(s), each further level the next scans. A prefix of the
levels plus an EOI marker is itself a progressive file, which libjpeg decodes at a lower quality.

Baselines only: experiments/baselines.py writes it, no MISC encoder may choose it (``selectable`` is
off). Every process that decodes baseline points must import this module (the simulator does), so the
receiver's generic stage decoding finds the codec by its id.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Sequence

import numpy as np
from PIL import Image

from miscnet.core.errors import BitstreamError, MiscError
from miscnet.core.pixel import DOWN_FILTER, PixelCodec, PixelLevel, PixelSettings, Scratch, register
from miscnet.core.pixel.thumbnail import pil_decode
from miscnet.v1 import bitstream_pb2 as pb

JPEG_PROGRESSIVE = "jpeg-progressive"
_SOF2, _SOS, _JPEG_TABLES = 0xC2, 0xDA, frozenset({0xC4, 0xDB, 0xDD, 0xFE, *range(0xE0, 0xF0)})


def jpeg_progressive_segments(data: bytes, start: int = 2) -> list[tuple[int, int, int]]:
    """(marker, start, end) of each segment of a progressive JPEG after SOI, up to EOI or the end of
    ``data``; a scan (SOS) runs to the end of its entropy-coded data. Only tables (DHT, DQT, DRI, COM,
    APPn), one SOF2 and scans may appear; anything else is a BitstreamError."""
    out: list[tuple[int, int, int]] = []
    pos, n = start, len(data)
    while pos < n:
        if pos + 2 > n or data[pos] != 0xFF:
            raise BitstreamError(f"{JPEG_PROGRESSIVE} level: no marker at byte {pos}")
        marker = data[pos + 1]
        if marker == 0xD9:  # EOI: the receiver adds it
            if pos + 2 != n:
                raise BitstreamError(f"{JPEG_PROGRESSIVE} level: data after the end-of-image marker")
            break
        if marker not in _JPEG_TABLES and marker not in (_SOF2, _SOS):
            raise BitstreamError(f"{JPEG_PROGRESSIVE} level: unexpected marker 0x{marker:02X} at byte {pos}")
        if pos + 4 > n:
            raise BitstreamError(f"{JPEG_PROGRESSIVE} level: segment at byte {pos} is truncated")
        end = pos + 2 + struct.unpack(">H", data[pos + 2 : pos + 4])[0]
        if end > n or end < pos + 4:
            raise BitstreamError(f"{JPEG_PROGRESSIVE} level: segment at byte {pos} runs past the data")
        if marker == _SOS:  # entropy-coded data: up to the next marker that is neither a stuffed 0 nor RSTn
            at = end
            while True:
                at = data.find(b"\xff", at)
                if at < 0 or at + 1 >= n:
                    end = n
                    break
                nxt = data[at + 1]
                if nxt == 0 or 0xD0 <= nxt <= 0xD7:
                    at += 2
                    continue
                end = at
                break
        out.append((marker, pos, end))
        pos = end
    return out


def decode_progressive_jpeg(levels: Sequence[PixelLevel]) -> np.ndarray:
    """The raster of a prefix of levels: their bytes plus EOI, a progressive file libjpeg decodes."""
    p0 = levels[0].params
    for lv in levels:
        p = lv.params
        if p.step or p.plane_shift or p.plane_bits or p.colorspace or p.residual or p.residual_gain:
            raise BitstreamError(f"{JPEG_PROGRESSIVE} level {lv.level}: fields of another codec set")
        if (p.width, p.height) != (p0.width, p0.height):
            raise BitstreamError(f"{JPEG_PROGRESSIVE} level {lv.level}: raster differs from level 0's")
    data = b"".join(lv.payload for lv in levels)
    if not data.startswith(b"\xff\xd8"):
        raise BitstreamError(f"{JPEG_PROGRESSIVE} level 0: not a JPEG file")
    segments = jpeg_progressive_segments(data)
    if not segments or segments[-1][2] != len(data):
        raise BitstreamError(f"{JPEG_PROGRESSIVE} level {len(levels) - 1}: bytes after the last scan")
    starts = {s for _, s, _ in segments} | {len(data)}
    edge = 0
    for lv in levels[:-1]:
        edge += len(lv.payload)
        if edge not in starts:
            raise BitstreamError(f"{JPEG_PROGRESSIVE} level {lv.level + 1}: does not start at a segment")
    sofs = [s for m, s, _ in segments if m == _SOF2]
    scans = [s for m, s, _ in segments if m == _SOS]
    if len(sofs) != 1 or not scans or sofs[0] > scans[0] or scans[0] >= len(levels[0].payload):
        raise BitstreamError(f"{JPEG_PROGRESSIVE} level 0: needs one SOF2 header and a first scan")
    height, width = struct.unpack(">HH", data[sofs[0] + 5 : sofs[0] + 9])
    if (width, height) != (p0.width, p0.height):
        raise BitstreamError(f"{JPEG_PROGRESSIVE} level 0: file is {width}x{height}, params say "
                             f"{p0.width}x{p0.height}")
    return pil_decode("jpeg", "JPEG", data + b"\xff\xd9", width, height).astype(np.float32)


def encode_progressive_jpeg(image: np.ndarray, width: int, height: int, quality: int,
                            levels: int = 3, subsampling: str = "420") -> list[PixelLevel]:
    """A standard progressive JPEG of the image at width x height, cut into at most ``levels`` levels.

    Level 0 is the headers and the first scan (the DC coefficients of every component); the other scans
    are grouped into the remaining levels so that each holds about the same number of bytes. A 2-D
    (grey) ``image`` gives a one-component file; ``subsampling`` ("420" or "444") is the chroma's.
    """
    if not 1 <= levels <= 64:
        raise MiscError(f"{JPEG_PROGRESSIVE}: levels must be 1..64, not {levels}")
    if not 1 <= quality <= 100:
        raise MiscError(f"{JPEG_PROGRESSIVE}: quality must be 1..100, not {quality}")
    img = Image.fromarray(image)
    if img.size != (width, height):
        img = img.resize((width, height), DOWN_FILTER)
    buf = io.BytesIO()
    if subsampling not in ("420", "444"):
        raise MiscError(f"{JPEG_PROGRESSIVE}: subsampling must be 420 or 444, not {subsampling!r}")
    img.save(buf, "JPEG", quality=quality, progressive=True, optimize=True,
             subsampling=2 if subsampling == "420" else 0)
    data = buf.getvalue()
    if not (data.startswith(b"\xff\xd8") and data.endswith(b"\xff\xd9")):
        raise MiscError(f"{JPEG_PROGRESSIVE}: the encoder wrote an unexpected file")
    body = data[:-2]  # the receiver adds EOI after whatever prefix of levels it has
    scan_ends = [end for marker, _, end in jpeg_progressive_segments(body) if marker == 0xDA]
    if not scan_ends or scan_ends[-1] != len(body):
        raise MiscError(f"{JPEG_PROGRESSIVE}: the encoder wrote no scans or trailing data")
    cuts = [scan_ends[0]]  # level 0: headers + first scan
    rest = scan_ends[1:]
    groups = min(levels - 1, len(rest))
    if groups:
        first, total = cuts[0], len(body) - cuts[0]
        for j in range(1, groups):
            target = first + total * j / groups
            # the first scan end at or past the target, leaving at least one scan per later group
            candidates = [e for e in rest[: len(rest) - (groups - j)] if e > cuts[-1]]
            cuts.append(next((e for e in candidates if e >= target), candidates[-1]))
        cuts.append(len(body))
    params = pb.PixelParams(width=width, height=height, quality=quality)
    starts = [0, *cuts[:-1]]
    return [PixelLevel(k, pb.CODEC_PIXEL_JPEG_PROGRESSIVE, params, body[a:b])
            for k, (a, b) in enumerate(zip(starts, cuts, strict=True))]


class ProgressiveJpegCodec(PixelCodec):
    name = JPEG_PROGRESSIVE
    codec_id = pb.CODEC_PIXEL_JPEG_PROGRESSIVE
    max_levels = 64
    selectable = False

    def check_settings(self, s: PixelSettings) -> None:
        if not 1 <= s.quality <= 100:
            raise MiscError(f"{JPEG_PROGRESSIVE}: quality must be 1..100, not {s.quality}")
        if not 1 <= s.levels <= self.max_levels:
            raise MiscError(f"{JPEG_PROGRESSIVE}: levels must be 1..{self.max_levels}, not {s.levels}")

    def encode(self, image: np.ndarray, settings: PixelSettings, scratch: Scratch | None = None
               ) -> list[PixelLevel]:
        return encode_progressive_jpeg(image, settings.width, settings.height, settings.quality, settings.levels)

    def decode(self, levels: Sequence[PixelLevel]) -> np.ndarray:
        return decode_progressive_jpeg(levels)


register(ProgressiveJpegCodec())
