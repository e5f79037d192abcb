"""The block codec: MISC's ``pixel`` mode done right.

Exact area means of a width x height grid, uniform quantisation, every bit counted and actually
bit-packed. Several levels are bit planes of the quantised values, most significant first.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from miscnet.core.errors import BitstreamError, MiscError
from miscnet.core.pixel.base import PixelCodec, PixelLevel, PixelSettings, Scratch, register
from miscnet.v1 import bitstream_pb2 as pb

COLORSPACES = {"rgb": 0, "ycbcr": 1}
MISC_BLOCKS = 32  # experiments/bench_pixel.py's fixed block baseline: 32 cells on the short side
MISC_STEP = 8  # the notebook's 2 ** block_level, block_level = 3
# The notebook's rule (``--block-rule misc``): the block is ``max(long side // 16, 32)`` pixels, the grid
# floor(side / block) cells each way (at least 1), values floor-quantised with step 8.
MISC_BLOCK_MIN_PIXELS = 32
MISC_BLOCKS_LONG = 16
# How the encoder picks the block codec's settings: "search" (rate control: the best grid and step
# that fit the budget) or "misc" (the notebook's fixed rule, checked against the budget).
BLOCK_RULES = ("search", "misc")
BLOCK_STEPS = (4, 8, 16, 32, 64)  # the quantisation steps rate control tries on each grid


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


def _rgb_to_ycbcr(x: np.ndarray) -> np.ndarray:
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    y = 0.299 * r + 0.587 * g + 0.114 * b
    cb = 128.0 - 0.168736 * r - 0.331264 * g + 0.5 * b
    cr = 128.0 + 0.5 * r - 0.418688 * g - 0.081312 * b
    return np.stack([y, cb, cr], axis=-1)


def _ycbcr_to_rgb(x: np.ndarray) -> np.ndarray:
    y, cb, cr = x[..., 0], x[..., 1] - 128.0, x[..., 2] - 128.0
    return np.stack([y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb], axis=-1)


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


def misc_block_pixels(width: int, height: int) -> int:
    """The notebook's block size in pixels: about 16 blocks on the long side, never under 32 pixels."""
    return max(max(width, height) // MISC_BLOCKS_LONG, MISC_BLOCK_MIN_PIXELS)


def misc_block_grid(width: int, height: int) -> tuple[int, int]:
    """The notebook's block grid for an image: floor(side / block) cells each way, at least 1 (the
    notebook's ``int(side / block)`` is 0 for a side under the block size, which it cannot code)."""
    block = misc_block_pixels(width, height)
    return max(1, width // block), max(1, height // block)


def misc_rule_settings(width: int, height: int, levels: int = 1) -> PixelSettings:
    """The block settings of the notebook's rule for an image of this size: RGB, step 8."""
    w, h = misc_block_grid(width, height)
    return PixelSettings("block", w, h, step=MISC_STEP, levels=levels)


def encode_block(image: np.ndarray, s: PixelSettings) -> list[PixelLevel]:
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


def decode_block(levels: Sequence[PixelLevel]) -> np.ndarray:
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


class BlockCodec(PixelCodec):
    name = "block"
    codec_id = pb.CODEC_PIXEL_BLOCK
    max_levels = block_bits(min(BLOCK_STEPS))
    ladder_smallest = 4

    def check_settings(self, s: PixelSettings) -> None:
        if not 1 <= s.step <= 256:
            raise MiscError(f"pixel layer: step {s.step} is outside 1..256")
        if s.colorspace not in COLORSPACES:
            raise MiscError(f"pixel layer: unknown colorspace {s.colorspace!r}")
        if not 1 <= s.levels <= block_bits(s.step):
            raise MiscError(f"pixel layer: {s.levels} levels for {block_bits(s.step)}-bit values")

    def encode(self, image: np.ndarray, settings: PixelSettings, scratch: Scratch | None = None
               ) -> list[PixelLevel]:
        return encode_block(image, settings)

    def decode(self, levels: Sequence[PixelLevel]) -> np.ndarray:
        return decode_block(levels)

    def exact_bytes(self, s: PixelSettings) -> int:
        bits = block_bits(s.step)
        return sum(_packed_len(s.width * s.height * 3, b) for b in _plane_split(bits, s.levels))

    def candidates(self, rasters: Sequence[tuple[int, int]], levels: int) -> list[PixelSettings]:
        """Grids times quantisation steps, ordered by their exact size (finer step first at equal size)."""
        out = [PixelSettings(self.name, w, h, step=st, levels=levels) for w, h in rasters for st in BLOCK_STEPS
               if levels <= block_bits(st)]
        return sorted(out, key=lambda s: (self.exact_bytes(s), -s.step))


register(BlockCodec())
