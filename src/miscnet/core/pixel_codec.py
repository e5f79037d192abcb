"""The pixel layer: MISC's tiny reference image, as quantised block means or a small thumbnail.

Four codecs share one interface. ``block`` is MISC's ``pixel`` mode done right (exact area means,
uniform quantisation, every bit counted and actually bit-packed). ``webp``, ``avif`` and ``jpeg`` code
a down-sampled thumbnail through Pillow and keep only the bytes a receiver cannot rebuild: container
headers, tables and anything else that follows from the layer's PixelParams are stripped on the
sender and re-created on the receiver, and the sender checks that the rebuilt file decodes to the
same pixels before it lets a payload out.

Several levels make the layer progressive: for ``block`` they are bit planes (most significant
first); for thumbnails level 0 is a small thumbnail and every further level, at twice the resolution,
codes the residual over the up-sampled reconstruction of the levels before it.

Format notes: PixelParams.quality is not informational for ``jpeg`` (it selects the quantisation
tables the receiver rebuilds); the AVIF encoder speed follows from the raster size (``avif_speed``).
"""

from __future__ import annotations

import functools
import hashlib
import io
import math
import re
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from miscnet.core.errors import BitstreamError, BudgetError, MiscError
from miscnet.v1 import bitstream_pb2 as pb

CODEC_IDS = {
    "block": pb.CODEC_PIXEL_BLOCK,
    "webp": pb.CODEC_PIXEL_WEBP,
    "avif": pb.CODEC_PIXEL_AVIF,
    "jpeg": pb.CODEC_PIXEL_JPEG,
}
CODEC_NAMES = {v: k for k, v in CODEC_IDS.items()}
THUMBNAIL_CODECS = ("webp", "avif", "jpeg")
COLORSPACES = {"rgb": 0, "ycbcr": 1}

MAX_RASTER = 4096  # coded raster side (block grid or thumbnail)
MAX_OUTPUT = 16384  # decoded image side
MAX_THUMBNAIL_LEVELS = 4
MISC_BLOCKS = 32  # MISC's pixel mode: at least 32 blocks on the short side
MISC_STEP = 8

# Measured on the five sample photos (see experiments/bench_pixel.py and the report): down-sampling
# with LANCZOS beats BOX / BICUBIC / HAMMING by 2-4 % in bytes at equal PSNR, and up-sampling with
# LANCZOS beats BICUBIC by about 1 % and BILINEAR by 5-8 %.
DOWN_FILTER = Image.Resampling.LANCZOS
UP_FILTER = Image.Resampling.LANCZOS

# Thumbnail levels k > 0 code target - up-sampled previous reconstruction, offset to 128. Measured
# for 2 levels (bytes to reach block mode's PSNR, mean over the samples, relative to block mode):
# residual 0.150 / 0.208 / 0.243 (avif / webp / jpeg) against 0.165 / 0.240 / 0.272 for an
# independent second thumbnail. The decoder understands both (params.residual); this picks what the
# encoder writes.
RESIDUAL_LEVELS = True
RESIDUAL_GAIN = 8  # residual * gain / 8; 8 (no scaling) measured best or equal among 5, 6, 8, 11, 16, 32

_LEVEL_SCALE = 2  # raster side ratio between consecutive thumbnail levels
SCORE_MAX_SIDE = 1536  # rate control measures PSNR at full size up to this long side (see _Search)


@dataclass(frozen=True)
class PixelLevel:
    """One pixel level as it crosses the link: the payload plus what is needed to decode it."""

    level: int
    codec: int  # pb.CODEC_PIXEL_*
    params: pb.PixelParams
    payload: bytes


@dataclass(frozen=True)
class PixelSettings:
    """One point in the rate-quality space of the pixel layer."""

    codec: str  # "block" | "webp" | "avif" | "jpeg"
    width: int  # coded raster of the last level (block grid or thumbnail size)
    height: int
    quality: int = 0  # thumbnail codecs, 1..100 (0: codec default)
    step: int = 8  # block codec quantisation step
    levels: int = 1
    colorspace: str = "rgb"  # block codec: "rgb" (MISC) or "ycbcr"

    @property
    def nbytes_hint(self) -> int | None:
        """Exact payload size for the block codec (known without encoding), else None."""
        if self.codec != "block":
            return None
        bits = block_bits(self.step)
        return sum(_packed_len(self.width * self.height * 3, b) for b in _plane_split(bits, self.levels))


# ----------------------------------------------------------------------------------------------
# small helpers


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _resize(arr: np.ndarray, width: int, height: int, resample: int) -> np.ndarray:
    """Resize an HxWx3 float array channel by channel in float32, so nothing is rounded midway."""
    if arr.shape[0] == height and arr.shape[1] == width:
        return arr.astype(np.float32)
    chans = []
    for c in range(arr.shape[2]):
        src = Image.fromarray(np.ascontiguousarray(arr[..., c], dtype=np.float32))
        chans.append(np.asarray(src.resize((width, height), resample), dtype=np.float32))
    return np.stack(chans, axis=-1)


def _area_weights(size: int, cells: int) -> list[tuple[int, np.ndarray]]:
    """For each of ``cells`` equal cells along an axis of ``size`` pixels: the first pixel it touches
    and the weight of each touched pixel (its overlap with the cell over the cell's length)."""
    scale = size / cells
    out = []
    for i in range(cells):
        lo, hi = i * scale, (i + 1) * scale
        first = int(math.floor(lo))
        idx = np.arange(first, min(size, int(math.ceil(hi))), dtype=np.float64)
        out.append((first, (np.minimum(idx + 1, hi) - np.maximum(idx, lo)) / scale))
    return out


def block_means(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """Exact per-channel mean of each cell of a width x height grid laid over the image (float64).

    Pixels cut by a cell border count with the fraction inside. Works one band at a time, so a large
    image is never copied to floating point whole.
    """
    rows = np.empty((height, image.shape[1], image.shape[2]))
    for i, (first, w) in enumerate(_area_weights(image.shape[0], height)):
        rows[i] = np.tensordot(w, image[first : first + len(w)], axes=(0, 0))
    out = np.empty((height, width, image.shape[2]))
    for j, (first, w) in enumerate(_area_weights(image.shape[1], width)):
        out[:, j] = np.tensordot(rows[:, first : first + len(w)], w, axes=(1, 0))
    return out


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two uint8 images of the same shape (inf when identical), MSE over all values.

    Exact integer arithmetic in bands of rows: rate control scores many candidates at full size.
    """
    rows = max(1, (1 << 20) // max(1, a[0].size))
    total = 0
    for i in range(0, a.shape[0], rows):
        d = (a[i : i + rows].astype(np.int64) - b[i : i + rows]).ravel()
        total += int(np.dot(d, d))
    return math.inf if total == 0 else 10.0 * math.log10(255.0**2 * a.size / total)


def _rgb_to_ycbcr(x: np.ndarray) -> np.ndarray:
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    y = 0.299 * r + 0.587 * g + 0.114 * b
    cb = 128.0 - 0.168736 * r - 0.331264 * g + 0.5 * b
    cr = 128.0 + 0.5 * r - 0.418688 * g - 0.081312 * b
    return np.stack([y, cb, cr], axis=-1)


def _ycbcr_to_rgb(x: np.ndarray) -> np.ndarray:
    y, cb, cr = x[..., 0], x[..., 1] - 128.0, x[..., 2] - 128.0
    return np.stack([y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb], axis=-1)


def _check_image(image: np.ndarray) -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise MiscError("pixel layer: the image must be a uint8 array of shape (height, width, 3)")
    h, w = image.shape[:2]
    if not (1 <= w <= MAX_OUTPUT and 1 <= h <= MAX_OUTPUT):
        raise MiscError(f"pixel layer: image size {w}x{h} is outside 1..{MAX_OUTPUT}")


# ----------------------------------------------------------------------------------------------
# block codec: MISC's pixel mode


def block_bits(step: int) -> int:
    """Bits per value for a quantisation step: values 0 .. ceil(256/step)-1."""
    return max(1, (-(-256 // step) - 1).bit_length())


def _plane_split(bits: int, levels: int) -> list[int]:
    """Bits per level, most significant first; earlier levels get no more bits than later ones."""
    base, extra = divmod(bits, levels)
    return [base + (1 if k >= levels - extra else 0) for k in range(levels)]


def _packed_len(count: int, bits: int) -> int:
    return (count * bits + 7) // 8


def _pack(values: np.ndarray, bits: int) -> bytes:
    """Bit-pack non-negative values with ``bits`` bits each, MSB first, zero-padded to a byte."""
    shifts = np.arange(bits - 1, -1, -1, dtype=np.uint16)
    planes = ((values.astype(np.uint16)[:, None] >> shifts) & 1).astype(np.uint8)
    return np.packbits(planes.reshape(-1)).tobytes()


def _unpack(data: bytes, count: int, bits: int) -> np.ndarray:
    flat = np.unpackbits(np.frombuffer(data, dtype=np.uint8))
    if flat[count * bits :].any():
        raise BitstreamError("block level: padding bits are not zero")
    planes = flat[: count * bits].reshape(count, bits).astype(np.uint16)
    return planes @ (1 << np.arange(bits - 1, -1, -1, dtype=np.uint16))


def _encode_block(image: np.ndarray, s: PixelSettings) -> list[PixelLevel]:
    bits = block_bits(s.step)
    if s.levels > bits:
        raise MiscError(f"pixel layer: step {s.step} leaves {bits} bit planes, fewer than {s.levels} levels")
    space = COLORSPACES[s.colorspace]
    means = block_means(image, s.width, s.height)
    if space == 1:
        means = _rgb_to_ycbcr(means)  # linear, so converting the means equals averaging converted pixels
    n_values = -(-256 // s.step)
    q = np.clip(np.floor(means / s.step), 0, n_values - 1).astype(np.uint16).reshape(-1)
    out = []
    shift = bits
    for k, b in enumerate(_plane_split(bits, s.levels)):
        shift -= b
        params = pb.PixelParams(
            width=s.width, height=s.height, step=s.step, plane_shift=shift, plane_bits=b, colorspace=space
        )
        out.append(PixelLevel(k, pb.CODEC_PIXEL_BLOCK, params, _pack((q >> shift) & ((1 << b) - 1), b)))
    return out


def _decode_block(levels: Sequence[PixelLevel]) -> np.ndarray:
    p0 = levels[0].params
    w, h, step, space = p0.width, p0.height, p0.step, p0.colorspace
    if not 1 <= step <= 256:
        raise BitstreamError(f"block level: quantisation step {step} is outside 1..256")
    if space not in COLORSPACES.values():
        raise BitstreamError(f"block level: unknown colorspace {space}")
    bits = block_bits(step)
    count = w * h * 3
    expect_shift = bits
    for lv in levels:
        p = lv.params
        if (p.width, p.height, p.step, p.colorspace) != (w, h, step, space):
            raise BitstreamError(f"block level {lv.level}: raster, step or colorspace differ from level 0")
        if not 1 <= p.plane_bits <= expect_shift or p.plane_shift != expect_shift - p.plane_bits:
            raise BitstreamError(
                f"block level {lv.level}: bit planes [{p.plane_shift}, +{p.plane_bits}) do not continue "
                f"the {bits}-bit values"
            )
        expect_shift = p.plane_shift
        if len(lv.payload) != _packed_len(count, p.plane_bits):
            raise BitstreamError(
                f"block level {lv.level}: payload is {len(lv.payload)} bytes, "
                f"expected {_packed_len(count, p.plane_bits)}"
            )
    q = np.zeros(count, dtype=np.uint16)  # allocated only once the sizes are known to be right
    for lv in levels:
        q |= _unpack(lv.payload, count, lv.params.plane_bits) << lv.params.plane_shift
    n_values = -(-256 // step)
    if expect_shift == 0 and int(q.max()) >= n_values:
        raise BitstreamError(f"block level: value {int(q.max())} is outside 0..{n_values - 1}")
    # Mid-interval of the quantiser that the received planes define (coarser when planes are missing).
    low = q.astype(np.float64) * step
    high = np.minimum((q.astype(np.float64) + (1 << expect_shift)) * step, 256.0)
    values = ((low + high) / 2.0).reshape(h, w, 3)
    if space == 1:
        values = _ycbcr_to_rgb(values)
    return np.clip(values, 0.0, 255.0)


# ----------------------------------------------------------------------------------------------
# Pillow plumbing


_PIL_FORMATS = {"webp": "WEBP", "avif": "AVIF", "jpeg": "JPEG"}


def _pil_decode(name: str, data: bytes, width: int, height: int) -> np.ndarray:
    """Decode a rebuilt file with Pillow; anything wrong becomes a one-line BitstreamError."""
    try:
        with Image.open(io.BytesIO(data), formats=[_PIL_FORMATS[name]]) as im:
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


def _pil_encode(name: str, thumb: np.ndarray, **options) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(thumb).save(buf, _PIL_FORMATS[name], **options)
    return buf.getvalue()


# --- WebP: keep the VP8 frame tag and the partitions; RIFF, chunk header, start code and size go.
# (The boolean coder's flush also leaves 1-3 zero bytes at the end that libwebp would not miss, but
# dropping them would hide truncation from the receiver, so they stay.)

_VP8_START = b"\x9d\x01\x2a"


def _webp_encode(thumb: np.ndarray, quality: int) -> bytes:
    data = _pil_encode("webp", thumb, quality=quality, method=6)
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
    return _pil_decode("webp", _webp_rebuild(payload, width, height), width, height)


# --- JPEG: the abbreviated format. Only the entropy-coded scan is sent; the receiver rebuilds
# SOI/APP0/DQT/SOF0/DHT/SOS from the quality (our own quantisation tables) and the raster size.


def jpeg_qtable(quality: int) -> list[int]:
    """Our quantisation table for a quality 1..100, row-major.

    A ramp, not the IJG tables: at thumbnail sizes a flat-ish table that spends bits on the low
    frequencies maximises PSNR (measured: about 11 % fewer bytes than libjpeg's quality scaling at
    equal PSNR). The same table serves luma and chroma: chroma errors weigh 1.4-1.8x in RGB.
    """
    base = 255.0 ** ((100 - quality) / 99.0)  # 1 at quality 100, 255 at quality 1
    return [min(255, max(1, round(base * (1 + (r + c) / 8)))) for r in range(8) for c in range(8)]


def _jpeg_file(thumb: np.ndarray, quality: int) -> bytes:
    t = jpeg_qtable(quality)
    return _pil_encode("jpeg", thumb, qtables=[t, t], subsampling=2, optimize=False, progressive=False)


def _jpeg_split(data: bytes) -> tuple[bytes, bytes]:
    """Split a baseline JPEG file into (headers up to the end of SOS, entropy-coded data)."""
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            break
        marker = data[pos + 1]
        seg = struct.unpack(">H", data[pos + 2 : pos + 4])[0]
        if marker == 0xDA:
            end = pos + 2 + seg
            if data[-2:] != b"\xff\xd9":
                break
            return data[:end], data[end:-2]
        pos += 2 + seg
    raise MiscError("jpeg: the encoder wrote a file this codec cannot strip")


@functools.lru_cache(maxsize=128)
def _jpeg_template(quality: int) -> tuple[bytes, int]:
    """Headers for a quality, from a tiny encode, and the offset of the SOF0 height field."""
    header, _ = _jpeg_split(_jpeg_file(np.full((16, 16, 3), 128, np.uint8), quality))
    sof = header.find(b"\xff\xc0")
    if sof < 0:
        raise MiscError("jpeg: the encoder did not write a baseline SOF0 header")
    return header, sof + 5


def _jpeg_header(width: int, height: int, quality: int) -> bytes:
    header, at = _jpeg_template(quality)
    return header[:at] + struct.pack(">HH", height, width) + header[at + 4 :]


def _jpeg_encode(thumb: np.ndarray, quality: int) -> bytes:
    data = _jpeg_file(thumb, quality)
    header, scan = _jpeg_split(data)
    h, w = thumb.shape[:2]
    if header != _jpeg_header(w, h, quality):
        raise MiscError("jpeg: headers depend on more than size and quality; cannot strip them")
    return scan


def _jpeg_dht(quality: int) -> bytes:
    """The DHT segments of our headers (libjpeg's standard tables: Huffman optimisation is off)."""
    header, _ = _jpeg_template(quality)
    out, pos = b"", 2
    while pos + 4 <= len(header):
        seg = struct.unpack(">H", header[pos + 2 : pos + 4])[0]
        if header[pos + 1] == 0xC4:
            out += header[pos + 4 : pos + 2 + seg]
        pos += 2 + seg
    return out


@functools.lru_cache(maxsize=4)
def _huffman_lookup(dht: bytes) -> dict[tuple[int, int], tuple[np.ndarray, np.ndarray]]:
    """Lookup tables (16-bit prefix -> code length, symbol) for each table in DHT segment bodies."""
    tables = {}
    body = dht
    while body:
        cls_id, counts = body[0], body[1:17]
        symbols = body[17 : 17 + sum(counts)]
        lengths = np.zeros(1 << 16, np.uint8)
        values = np.zeros(1 << 16, np.uint8)
        code, k = 0, 0
        for length, n in enumerate(counts, start=1):
            for _ in range(n):
                lo = code << (16 - length)
                lengths[lo : lo + (1 << (16 - length))] = length
                values[lo : lo + (1 << (16 - length))] = symbols[k]
                code += 1
                k += 1
            code <<= 1
        tables[(cls_id >> 4, cls_id & 15)] = (lengths, values)
        body = body[17 + sum(counts) :]
    return tables


_JPEG_MARKER = re.compile(rb"\xff[^\x00]|\xff$")


def _scan_error(pos: int, code_len: int, nbits: int) -> str:
    # The bits past the end read as ones, which is no valid code: running into them means truncation.
    if pos > nbits or pos + 16 - code_len > nbits:
        return "jpeg level: truncated scan"
    return "jpeg level: invalid Huffman code"


def _jpeg_check_scan(scan: bytes, width: int, height: int, quality: int) -> None:
    """Walk the Huffman codes of a 4:2:0 baseline scan: it must hold exactly every block.

    libjpeg pads a short scan with grey and only warns, so without this walk a truncated or
    overlong payload would decode silently.
    """
    if _JPEG_MARKER.search(scan):
        raise BitstreamError("jpeg level: marker inside the scan data")
    data = scan.replace(b"\xff\x00", b"\xff")
    nbits = len(data) * 8
    bits = (bin(int.from_bytes(b"\x01" + data, "big"))[3:] if data else "") + "1" * 16
    tables = _huffman_lookup(_jpeg_dht(quality))
    dc = [tables[(0, 0)], tables[(0, 1)], tables[(0, 1)]]
    ac = [tables[(1, 0)], tables[(1, 1)], tables[(1, 1)]]
    mcus = -(-width // 16) * -(-height // 16)
    comps = (0, 0, 0, 0, 1, 2)  # four luma blocks, then Cb and Cr
    pos = 0
    for _ in range(mcus):
        for c in comps:
            lengths, values = dc[c]
            prefix = int(bits[pos : pos + 16], 2)
            n = int(lengths[prefix])
            pos += n + int(values[prefix])
            if n == 0 or pos > nbits:
                raise BitstreamError(_scan_error(pos, n, nbits))
            lengths, values = ac[c]
            k = 1
            while k < 64:
                prefix = int(bits[pos : pos + 16], 2)
                n = int(lengths[prefix])
                rs = int(values[prefix])
                pos += n + (rs & 15)
                if n == 0 or pos > nbits:
                    raise BitstreamError(_scan_error(pos, n, nbits))
                if rs == 0:
                    break
                k += (rs >> 4) + 1
            if k > 64:
                raise BitstreamError("jpeg level: run of coefficients past the end of a block")
    rest = nbits - pos
    if rest >= 8 or bits[pos:nbits] != "1" * rest:
        raise BitstreamError("jpeg level: bytes after the last block")


def _jpeg_decode(payload: bytes, width: int, height: int, quality: int) -> np.ndarray:
    if not 1 <= quality <= 100:
        raise BitstreamError(f"jpeg level: quality {quality} is outside 1..100")
    _jpeg_check_scan(payload, width, height, quality)
    return _pil_decode("jpeg", _jpeg_header(width, height, quality) + payload + b"\xff\xd9", width, height)


# --- AVIF: only AV1 OBUs are sent. The ISOBMFF container (ftyp, meta, ..., ~275 bytes) and the
# temporal delimiter are rebuilt from the sequence header; the sequence header itself (8-11 bytes) is
# left out too when the receiver can predict it from the raster size, which is the common case.
# A payload that starts with a sequence header OBU carries it; one that starts with a frame does not.


def avif_speed(width: int, height: int) -> int:
    """libaom speed for a raster: slower (smaller files) where encoding is cheap.

    Measured on the samples: speed 4 up to 96 x 96 and 6 above matches speed 4 up to 160 x 160 in
    bytes at block mode's PSNR (mean ratio 0.1206 vs 0.1202) at half the rate-control time; at the
    default 0.025 bpp budget, where rasters are larger, it costs about 0.2 dB.
    """
    area = width * height
    return 4 if area <= 96 * 96 else 6 if area <= 384 * 384 else 8


_AVIF_OPTIONS = {"subsampling": "4:2:0", "max_threads": 1, "codec": "aom", "advanced": {"tune": "psnr"}}

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


def _leb128(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _obu(obu_type: int, body: bytes) -> bytes:
    return bytes([(obu_type << 3) | 2]) + _leb128(len(body)) + body


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
    restoration = 1 if avif_speed(width, height) <= 4 else 0
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
        p = pos + 1 + ((head >> 2) & 1)
        size, shift = 0, 0
        while True:
            if p >= len(data) or shift > 28:
                raise BitstreamError("avif level: truncated OBU size")
            b = data[p]
            p += 1
            size |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                break
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


def _avif_encode(thumb: np.ndarray, quality: int) -> bytes:
    h, w = thumb.shape[:2]
    data = _pil_encode("avif", thumb, quality=quality, speed=avif_speed(w, h), **_AVIF_OPTIONS)
    obus = _read_obus(_avif_file_obus(data))
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
        _pil_decode("avif", rebuilt, w, h), _pil_decode("avif", data, w, h)
    ):
        raise MiscError("avif: the rebuilt container does not decode to the same pixels")
    return payload


def _avif_decode(payload: bytes, width: int, height: int, quality: int) -> np.ndarray:
    return _pil_decode("avif", _avif_rebuild(payload, width, height), width, height)


_THUMB_ENCODERS: dict[str, Callable[[np.ndarray, int], bytes]] = {
    "webp": _webp_encode,
    "avif": _avif_encode,
    "jpeg": _jpeg_encode,
}
_THUMB_DECODERS: dict[str, Callable[[bytes, int, int, int], np.ndarray]] = {
    "webp": _webp_decode,
    "avif": _avif_decode,
    "jpeg": _jpeg_decode,
}


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


def _encode_thumbnails(targets: _Targets, s: PixelSettings) -> list[PixelLevel]:
    name = s.codec
    quality = s.quality or 50
    encode = _THUMB_ENCODERS[name]
    out: list[PixelLevel] = []
    recon = None
    for k, (w, h) in enumerate(level_rasters(s.width, s.height, s.levels)):
        target = targets.get(w, h)
        if k == 0 or not RESIDUAL_LEVELS:
            params = pb.PixelParams(width=w, height=h, quality=quality)
            coded = _to_uint8(target)
        else:
            params = pb.PixelParams(width=w, height=h, quality=quality, residual=True,
                                    residual_gain=RESIDUAL_GAIN)
            pred = _resize(recon, w, h, UP_FILTER)
            coded = _to_uint8((target - pred) * (RESIDUAL_GAIN / 8.0) + 128.0)
        lv = PixelLevel(k, CODEC_IDS[name], params, encode(coded, quality))
        out.append(lv)
        if RESIDUAL_LEVELS and k + 1 < s.levels:
            recon = _decode_thumbnail_levels(out)  # the receiver's view, so both sides stay in step
    return out


def _decode_thumbnail_levels(levels: Sequence[PixelLevel]) -> np.ndarray:
    name = CODEC_NAMES[levels[0].codec]
    decode = _THUMB_DECODERS[name]
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
        dec = decode(lv.payload, p.width, p.height, p.quality).astype(np.float32)
        if p.residual:
            pred = _resize(recon, p.width, p.height, UP_FILTER)
            recon = np.clip(pred + (dec - 128.0) * (8.0 / p.residual_gain), 0.0, 255.0)
        else:
            recon = dec
    return recon


# ----------------------------------------------------------------------------------------------
# progressive JPEG, for the baselines only (experiments/baselines.py writes it; no MISC encoder does).
# A standard progressive .jpg file, headers included (what a user sends today), cut at scan boundaries:
# level 0 holds the headers and the first scan(s), each further level the next scans. A prefix of the
# levels plus an EOI marker is itself a progressive file, which libjpeg decodes at a lower quality.

JPEG_PROGRESSIVE = "jpeg-progressive"
CODEC_NAMES[pb.CODEC_PIXEL_JPEG_PROGRESSIVE] = JPEG_PROGRESSIVE
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


def _decode_jpeg_progressive(levels: Sequence[PixelLevel]) -> np.ndarray:
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
    return _pil_decode("jpeg", data + b"\xff\xd9", width, height).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# public API


def _check_settings(s: PixelSettings) -> None:
    if s.codec not in CODEC_IDS:
        raise MiscError(f"pixel layer: unknown codec {s.codec!r} (use one of {', '.join(CODEC_IDS)})")
    if not (1 <= s.width <= MAX_RASTER and 1 <= s.height <= MAX_RASTER):
        raise MiscError(f"pixel layer: raster {s.width}x{s.height} is outside 1..{MAX_RASTER}")
    if s.codec == "block":
        if not 1 <= s.step <= 256:
            raise MiscError(f"pixel layer: step {s.step} is outside 1..256")
        if s.colorspace not in COLORSPACES:
            raise MiscError(f"pixel layer: unknown colorspace {s.colorspace!r}")
        if not 1 <= s.levels <= block_bits(s.step):
            raise MiscError(f"pixel layer: {s.levels} levels for {block_bits(s.step)}-bit values")
    else:
        if not 0 <= s.quality <= 100:
            raise MiscError(f"pixel layer: quality {s.quality} is outside 0..100 (0: the default, 50)")
        if not 1 <= s.levels <= MAX_THUMBNAIL_LEVELS:
            raise MiscError(f"pixel layer: levels must be 1..{MAX_THUMBNAIL_LEVELS}")


def encode_pixels(image: np.ndarray, settings: PixelSettings) -> list[PixelLevel]:
    """Code an RGB uint8 image as pixel levels (coarse first). Same input, same bytes."""
    _check_image(image)
    _check_settings(settings)
    if settings.codec == "block":
        return _encode_block(image, settings)
    return _encode_thumbnails(_Targets(image), settings)


def _check_levels(levels: Sequence[PixelLevel]) -> str:
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
        if lv.codec not in CODEC_NAMES:
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
    return CODEC_NAMES[codec]


def decode_raster(levels: Sequence[PixelLevel]) -> np.ndarray:
    """The coded raster (block grid or last thumbnail) as float32 RGB in 0..255, before up-sampling."""
    name = _check_levels(levels)
    if name == "block":
        return _decode_block(levels).astype(np.float32)
    if name == JPEG_PROGRESSIVE:
        return _decode_jpeg_progressive(levels)
    return _decode_thumbnail_levels(levels)


def decode_pixels(levels: Sequence[PixelLevel], width: int, height: int) -> np.ndarray:
    """Decode the levels received so far (a prefix 0..k) to a uint8 RGB image of width x height."""
    if not (isinstance(width, int) and isinstance(height, int)):
        raise BitstreamError("pixel layer: output size must be integers")
    if not (1 <= width <= MAX_OUTPUT and 1 <= height <= MAX_OUTPUT):
        raise BitstreamError(f"pixel layer: output size {width}x{height} is outside 1..{MAX_OUTPUT}")
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and width * height > limit:
        raise BitstreamError(f"pixel layer: output of {width * height} pixels exceeds Pillow's limit {limit}")
    small = Image.fromarray(_to_uint8(decode_raster(levels)))
    return np.asarray(small.resize((width, height), UP_FILTER))


def payload_bytes(levels: Sequence[PixelLevel]) -> int:
    """Bytes that cross the link for these levels (payloads only, no framing)."""
    return sum(len(lv.payload) for lv in levels)


def thumbnail_file(level: PixelLevel) -> bytes:
    """The standard .webp / .avif / .jpg file the receiver rebuilds around one thumbnail level.

    A level-0 (or non-residual) file is a viewable image; its size against the payload's is what
    stripping saves.
    """
    name = _check_levels([PixelLevel(0, level.codec, level.params, level.payload)])
    p = level.params
    if name == "webp":
        return _webp_rebuild(level.payload, p.width, p.height)
    if name == "avif":
        return _avif_rebuild(level.payload, p.width, p.height)
    if name == "jpeg":
        return _jpeg_header(p.width, p.height, p.quality or 50) + level.payload + b"\xff\xd9"
    raise BitstreamError("pixel layer: block levels have no file form")


# ----------------------------------------------------------------------------------------------
# rate control

_QUALITY_LADDER = (10, 30, 50, 70, 90)
_BLOCK_STEPS = (4, 8, 16, 32, 64)
_RASTER_RATIO = 2 ** 0.25


def raster_ladder(width: int, height: int, smallest: int = 8, largest: int = 512) -> list[tuple[int, int]]:
    """Rasters with the image's aspect, short side on a geometric ladder from ``smallest`` up to
    half the image's short side (or ``largest``)."""
    short = min(width, height)
    lo = min(smallest, short)
    hi = max(lo, min(short // 2, largest))
    out: list[tuple[int, int]] = []
    s = float(lo)
    while True:
        side = min(hi, round(s))
        f = side / short
        r = (max(1, min(MAX_RASTER, round(width * f))), max(1, min(MAX_RASTER, round(height * f))))
        if not out or r != out[-1]:
            out.append(r)
        if side >= hi:
            return out
        s *= _RASTER_RATIO


def misc_block_settings(width: int, height: int, blocks: int = MISC_BLOCKS, step: int = MISC_STEP,
                        levels: int = 1) -> PixelSettings:
    """MISC's faithful pixel mode: ``blocks`` blocks on the short side, aspect kept, RGB, step 8."""
    f = min(blocks, min(width, height)) / min(width, height)
    w, h = max(1, round(width * f)), max(1, round(height * f))
    return PixelSettings("block", w, h, step=step, levels=levels)


def candidate_settings(width: int, height: int, codec: str, levels: int = 1) -> list[PixelSettings]:
    """A coarse grid of settings, from the smallest / worst to the largest / best.

    Thumbnails: every ladder raster times a few qualities (choose_settings searches quality finely);
    block: ladder grids times quantisation steps, ordered by their exact size.
    """
    if codec == "auto":
        return [s for c in THUMBNAIL_CODECS for s in candidate_settings(width, height, c, levels)]
    if codec not in CODEC_IDS:
        raise MiscError(f"pixel layer: unknown codec {codec!r} (use auto or one of {', '.join(CODEC_IDS)})")
    rasters = raster_ladder(width, height, smallest=4 if codec == "block" else 8)
    if codec == "block":
        out = [PixelSettings("block", w, h, step=st, levels=levels) for w, h in rasters for st in _BLOCK_STEPS
               if levels <= block_bits(st)]
        return sorted(out, key=lambda s: (s.nbytes_hint, -s.step))
    return [PixelSettings(codec, w, h, quality=q, levels=levels) for w, h in rasters for q in _QUALITY_LADDER]


class _Search:
    """Encodes and scores candidates for one image, remembering what it already tried."""

    def __init__(self, image: np.ndarray) -> None:
        self.targets = _Targets(image)
        self.image = image
        self.encoded: dict[PixelSettings, list[PixelLevel]] = {}
        self.scores: dict[PixelSettings, float] = {}
        # Scoring decodes every candidate at full size. Above SCORE_MAX_SIDE the PSNR is taken at that
        # size instead: rasters stop at 512 px, three times smaller, so what the smaller reference drops
        # is detail that no candidate carries; the ranking stays the same at a fraction of the time.
        h, w = image.shape[:2]
        if max(w, h) > SCORE_MAX_SIDE:
            f = SCORE_MAX_SIDE / max(w, h)
            self.score_size = (max(1, round(w * f)), max(1, round(h * f)))
            self.reference = np.asarray(Image.fromarray(image).resize(self.score_size, DOWN_FILTER))
        else:
            self.score_size, self.reference = (w, h), image

    def encode(self, s: PixelSettings) -> list[PixelLevel]:
        if s not in self.encoded:
            _check_settings(s)
            if s.codec == "block":
                self.encoded[s] = _encode_block(self.image, s)
            else:
                self.encoded[s] = _encode_thumbnails(self.targets, s)
        return self.encoded[s]

    def size(self, s: PixelSettings) -> int:
        return s.nbytes_hint if s.codec == "block" else payload_bytes(self.encode(s))

    def score(self, s: PixelSettings) -> float:
        if s not in self.scores:
            self.scores[s] = psnr(decode_pixels(self.encode(s), *self.score_size), self.reference)
        return self.scores[s]


_SEARCH_CACHE: list[tuple[bytes, _Search]] = []


def clear_search_cache() -> None:
    """Forget the last image's search (benchmarks time a cold encode with this)."""
    _SEARCH_CACHE.clear()


def _search_for(image: np.ndarray) -> _Search:
    """The search state of the last image seen: a caller that retries with a smaller budget (the
    encoder corrects for framing bytes this way) reuses every encode already made."""
    key = hashlib.blake2b(image.tobytes(), digest_size=16).digest() + repr(image.shape).encode()
    for k, search in _SEARCH_CACHE:
        if k == key:
            return search
    search = _Search(image)
    _SEARCH_CACHE[:] = [(key, search)]
    return search


def _best_under_budget(search: _Search, codec: str, levels: int, max_bytes: int):
    """(psnr, settings) of the best point of one codec under the budget, and the smallest size seen."""
    h, w = search.image.shape[:2]
    best = None
    smallest = None
    if codec == "block":
        fits: dict[tuple[int, int], PixelSettings] = {}
        for s in candidate_settings(w, h, "block", levels):
            smallest = s.nbytes_hint if smallest is None else min(smallest, s.nbytes_hint)
            if s.nbytes_hint <= max_bytes:
                fits[(s.width, s.height)] = s  # sorted by size: the last fit per grid has the finest step
        for s in fits.values():
            cand = (search.score(s), s)
            best = cand if best is None or cand[0] > best[0] else best
        return best, smallest
    ladder = raster_ladder(w, h)
    fitted: dict[int, tuple[float, PixelSettings] | None] = {}
    prior: dict[int, int] = {}

    def evaluate(i: int) -> tuple[float, PixelSettings] | None:
        nonlocal smallest, prior
        if i not in fitted:
            rw, rh = ladder[i]

            def size(q: int) -> int:
                return search.size(PixelSettings(codec, rw, rh, quality=q, levels=levels))

            low = size(1)
            smallest = low if smallest is None else min(smallest, low)
            if low > max_bytes:
                fitted[i] = None
            else:
                q, prior = _fit_quality(size, max_bytes, prior)
                s = PixelSettings(codec, rw, rh, quality=q, levels=levels)
                fitted[i] = (search.score(s), s)
        return fitted[i]

    # PSNR against the raster (each at the best quality that fits) rises, peaks and falls: walk every
    # other raster up to the first that cannot fit, then climb from the best one through its neighbours.
    for i in range(0, len(ladder), 2):
        if evaluate(i) is None:
            break
    scored = {i: r for i, r in fitted.items() if r is not None}
    if not scored:
        evaluate(1) if len(ladder) > 1 else None
        scored = {i: r for i, r in fitted.items() if r is not None}
        if not scored:
            return None, smallest
    best_i = max(scored, key=lambda i: scored[i][0])
    while True:
        moved = False
        for j in (best_i - 1, best_i + 1):
            if 0 <= j < len(ladder):
                r = evaluate(j)
                if r is not None and r[0] > fitted[best_i][0]:
                    best_i, moved = j, True
        if not moved:
            return fitted[best_i], smallest


def _fit_quality(
    size: Callable[[int], int], budget: int, prior: dict[int, int]
) -> tuple[int, dict[int, int]]:
    """Largest quality in 1..100 whose size fits ``budget`` (quality 1 must fit), and the sizes seen.

    The size-quality curve of one raster looks like the previous raster's shifted in log-size, so
    ``prior`` (the previous raster's samples) predicts a first guess; a widening probe brackets the
    answer and bisection finishes it. Sizes are (nearly) monotone in quality.
    """
    seen = {1: size(1)}

    def probe(q: int) -> bool:
        if q not in seen:
            seen[q] = size(q)
        return seen[q] <= budget

    guess = 50
    if len(prior) > 1 and 1 in prior:
        target = math.log(budget) - math.log(seen[1]) + math.log(prior[1])
        pts = sorted((q, math.log(b)) for q, b in prior.items())
        guess = pts[-1][0]
        for (q0, l0), (q1, l1) in zip(pts, pts[1:], strict=False):
            if l1 > target:  # the shifted curve crosses the budget between q0 and q1
                guess = q0 + int((q1 - q0) * (target - l0) / (l1 - l0)) if l1 > l0 else q0
                break
    lo, hi = 1, 101  # size(lo) fits, size(hi) does not (101: past the end)
    q, step = min(100, max(2, guess)), 3
    if probe(q):
        lo = q
        while lo < 100:
            q = min(100, lo + step)
            if not probe(q):
                hi = q
                break
            lo, step = q, step * 2
        if lo == 100:
            return 100, seen
    else:
        hi = q
        while hi - lo > 1:
            q = max(lo + 1, hi - step)
            if probe(q):
                lo = q
                break
            hi, step = q, step * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if probe(mid):
            lo = mid
        else:
            hi = mid
    return lo, seen


def choose_settings(image: np.ndarray, codec: str, levels: int, max_bytes: int
                    ) -> tuple[PixelSettings, list[PixelLevel]]:
    """The settings with the best full-size PSNR whose levels total at most ``max_bytes`` bytes.

    For each raster on the ladder, binary-search the largest quality that fits, then keep the raster
    whose decoded image scores best. ``codec`` may be "auto" (every thumbnail codec).
    """
    _check_image(image)
    codecs = THUMBNAIL_CODECS if codec == "auto" else (codec,)
    if any(c not in CODEC_IDS for c in codecs):
        raise MiscError(f"pixel layer: unknown codec {codec!r} (use auto or one of {', '.join(CODEC_IDS)})")
    most = block_bits(min(_BLOCK_STEPS)) if codec == "block" else MAX_THUMBNAIL_LEVELS
    if not (isinstance(levels, int) and 1 <= levels <= most):
        raise MiscError(f"pixel layer: levels must be 1..{most} for {codec}")
    search = _search_for(image)
    best = None
    smallest = None
    for c in codecs:
        found, low = _best_under_budget(search, c, levels, max_bytes)
        if low is not None:
            smallest = low if smallest is None else min(smallest, low)
        if found and (best is None or found[0] > best[0]):
            best = found
    search.targets.pil = None  # the cache keeps small things only
    if best is None:
        raise BudgetError(
            f"pixel layer: no {codec} setting fits {max_bytes} bytes (the smallest is {smallest} bytes)"
        )
    return best[1], search.encode(best[1])


def settings_for_psnr(image: np.ndarray, codec: str, levels: int, min_psnr: float
                      ) -> tuple[PixelSettings, list[PixelLevel], float] | None:
    """The fewest-bytes settings whose full-size PSNR reaches ``min_psnr`` (None if none does).

    For each raster, binary-search the lowest quality that reaches the PSNR (PSNR is nearly monotone
    in quality) and keep the cheapest; stop once even the lowest quality costs more than the best.
    """
    _check_image(image)
    h, w = image.shape[:2]
    search = _Search(image)
    best: tuple[int, PixelSettings] | None = None
    if codec == "block":
        for s in candidate_settings(w, h, "block", levels):
            if best is not None and s.nbytes_hint >= best[0]:
                break
            if search.score(s) >= min_psnr:
                best = (s.nbytes_hint, s)
    else:
        for rw, rh in raster_ladder(w, h):
            def at(q: int, rw: int = rw, rh: int = rh) -> PixelSettings:
                return PixelSettings(codec, rw, rh, quality=q, levels=levels)

            if best is not None and search.size(at(1)) >= best[0]:
                break
            if search.score(at(100)) < min_psnr:
                continue
            lo, hi = 1, 100
            while lo < hi:
                mid = (lo + hi) // 2
                if search.score(at(mid)) >= min_psnr:
                    hi = mid
                else:
                    lo = mid + 1
            n = search.size(at(lo))
            if best is None or n < best[0]:
                best = (n, at(lo))
    if best is None:
        return None
    return best[1], search.encode(best[1]), search.score(best[1])
