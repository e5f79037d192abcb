"""The map layer's codec: one N x N grid mask per object (MISC's 8 x 8), as bytes and back.

Box-derived masks are rectangles, which the ``rects`` codec sends in 4 x log2(N) bits per object
instead of N*N; anything else (CLIP maps) is bit-packed row-major. Where masks come from (boxes, CLIP)
is the sender's business (``miscnet.sender.map_layer``).
"""

from __future__ import annotations

import math

import numpy as np

from miscnet.core.errors import BitstreamError, MiscError
from miscnet.core.semantics import MAX_OBJECTS_HARD
from miscnet.v1 import bitstream_pb2 as pb

DEFAULT_GRID = 8
MAX_GRID = 64
# One mask per object of the semantic layer, so the same bound as its: whatever the encoder writes, the
# decoder reads (64 masks of 64 x 64 bit-packed are 32 KiB, still a bound on what a corrupt layer claims).
MAX_OBJECTS = MAX_OBJECTS_HARD


def _rect_of(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """(x0, y0, x1, y1) in cells if mask is exactly one non-empty filled rectangle."""
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return None
    x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    if (x1 - x0) * (y1 - y0) != len(ys):
        return None
    return int(x0), int(y0), int(x1), int(y1)


def encode_map_layer(masks: np.ndarray) -> tuple[int, pb.MapParams, bytes]:
    """Return (codec, params, payload) for masks of shape (objects, N, N)."""
    objects, grid, _ = masks.shape
    if objects > MAX_OBJECTS:
        raise MiscError(f"{objects} object masks; the map layer holds at most {MAX_OBJECTS}")
    params = pb.MapParams(grid=grid, objects=objects)
    rects = [_rect_of(m) for m in masks]
    if objects and all(r is not None for r in rects):
        bits_per = max(1, math.ceil(math.log2(grid)))
        bits: list[int] = []
        for x0, y0, x1, y1 in rects:  # store start and extent-1, both in [0, N-1]
            for value in (x0, y0, x1 - x0 - 1, y1 - y0 - 1):
                bits.extend((value >> (bits_per - 1 - i)) & 1 for i in range(bits_per))
        return pb.CODEC_MASK_RECTS, params, np.packbits(np.array(bits, dtype=np.uint8)).tobytes()
    return pb.CODEC_MASK_BITPACK, params, np.packbits(masks.reshape(-1).astype(np.uint8)).tobytes()


def decode_map_layer(codec: int, params: pb.MapParams, payload: bytes) -> np.ndarray:
    """Inverse of encode_map_layer; BitstreamError on anything inconsistent."""
    grid, objects = params.grid, params.objects
    if not 1 <= grid <= MAX_GRID or objects > MAX_OBJECTS:
        raise BitstreamError(f"map layer: grid {grid} or object count {objects} out of range")
    bits = np.unpackbits(np.frombuffer(payload, dtype=np.uint8))
    if codec == pb.CODEC_MASK_BITPACK:
        need = objects * grid * grid
        if len(payload) != math.ceil(need / 8):
            raise BitstreamError(f"map layer: {len(payload)} bytes for {objects} masks of {grid}x{grid}")
        return bits[:need].reshape(objects, grid, grid).astype(bool)
    if codec == pb.CODEC_MASK_RECTS:
        bits_per = max(1, math.ceil(math.log2(grid)))
        need = objects * 4 * bits_per
        if len(payload) != math.ceil(need / 8):
            raise BitstreamError(f"map layer: {len(payload)} bytes for {objects} rectangles")
        weights = 1 << np.arange(bits_per - 1, -1, -1)
        values = (bits[:need].reshape(objects, 4, bits_per) * weights).sum(axis=2)
        out = np.zeros((objects, grid, grid), dtype=bool)
        for k, (x0, y0, w, h) in enumerate(values):
            if x0 + w + 1 > grid or y0 + h + 1 > grid:
                raise BitstreamError("map layer: rectangle outside the grid")
            out[k, y0 : y0 + h + 1, x0 : x0 + w + 1] = True
        return out
    raise BitstreamError(f"map layer: unknown codec {codec}")


def upsample_mask(mask: np.ndarray, width: int, height: int) -> np.ndarray:
    """Nearest-cell up-sampling of one grid mask to (height, width), for any aspect ratio."""
    grid_h, grid_w = mask.shape
    rows = np.minimum((np.arange(height) * grid_h) // height, grid_h - 1)
    cols = np.minimum((np.arange(width) * grid_w) // width, grid_w - 1)
    return mask[rows[:, None], cols[None, :]]
