"""Map extraction at the edge: where each named object is, as one N x N grid mask per object.

Backends turn an image and its semantics into masks (``MapBackend``); the layer codec that turns masks
into bytes is shared with the receiver (``miscnet.core.map_codec``).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from miscnet.core.config import MapConfig
from miscnet.core.errors import MiscError
from miscnet.core.semantics import Semantics

# A row (column) of cells belongs to a box when the box spans at least half of it: the box's edges are
# rounded to the nearest grid lines, so a box always gives a rectangle (which the rects codec sends in
# 12 bits at 8 x 8) and never loses more than half a cell on any side.
BOX_COVER_THRESHOLD = 0.5


class MapBackend(Protocol):
    """Computes one (grid x grid) boolean mask per object of ``semantics``, in object order."""

    name: str

    def masks(self, image: np.ndarray, semantics: Semantics, grid: int) -> np.ndarray: ...


class BoxMapBackend:
    """Masks from the sidecar's boxes: a cell is set when the box covers enough of it."""

    name = "boxes"

    def masks(self, image: np.ndarray, semantics: Semantics, grid: int) -> np.ndarray:
        out = np.zeros((len(semantics.objects), grid, grid), dtype=bool)
        for k, obj in enumerate(semantics.objects):
            if obj.box is None:
                raise MiscError(f"--map boxes needs a box for every object; '{obj.name}' has none")
            out[k] = box_to_mask(obj.box, grid)
        return out


def box_to_mask(box: tuple[float, float, float, float], grid: int) -> np.ndarray:
    x0, y0, x1, y1 = (float(v) * grid for v in box)
    edges = np.arange(grid, dtype=np.float64)
    cover_x = np.clip(np.minimum(edges + 1, x1) - np.maximum(edges, x0), 0, 1)
    cover_y = np.clip(np.minimum(edges + 1, y1) - np.maximum(edges, y0), 0, 1)
    mask = np.outer(cover_y >= BOX_COVER_THRESHOLD, cover_x >= BOX_COVER_THRESHOLD)
    if not mask.any():  # a box smaller than a cell still marks the cell holding its centre
        cy = min(int((y0 + y1) / 2), grid - 1)
        cx = min(int((x0 + x1) / 2), grid - 1)
        mask[cy, cx] = True
    return mask


def map_backend(name: str, **options) -> MapBackend:
    """The backend registered under name: "boxes", or "clip" (options: model, threshold, device, ...)."""
    if name == "boxes":
        return BoxMapBackend()
    if name == "clip":
        from miscnet.sender.clip_map import ClipMapBackend  # lazy: torch and transformers load only when used

        return ClipMapBackend(**options)
    raise MiscError(f"unknown map backend '{name}' (available: none, boxes, clip)")


def map_backend_for(config: MapConfig) -> MapBackend | None:
    """The backend a MapConfig asks for, or None for ``none`` (no map layer)."""
    if config.backend == "none":
        return None
    return map_backend(config.backend, **config.backend_options())
