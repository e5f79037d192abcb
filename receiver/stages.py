"""From received layers to the inputs of one reconstruction stage, for any decoder.

A stage is what the receiver can show once a set of layers has arrived: semantic; + map; + pixel
level 0; + pixel level 1; ... A pixel level counts only when every level before it is there too. Layers
are validated when the stage is made and decoded only when a decoder first asks for their content, once
per stage (the simulator's stage bookkeeping never pays for decoding).

Work is bounded whatever a file declares: a stage is drawn and decoded at most at MAX_RENDER_PIXELS (a
larger declared size renders scaled to fit, aspect kept), and a stage may carry a deadline that decoders
check between their passes (``check_time``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from functools import cached_property

import numpy as np

from miscnet.core.container import KIND_ORDER, EncodedImage, layer_name, validate_layer
from miscnet.core.errors import BitstreamError, MiscError
from miscnet.core.map_codec import decode_map_layer
from miscnet.core.pixel import PixelLevel
from miscnet.core.semantic_codec import decode_semantic_layer
from miscnet.core.semantics import Semantics
from miscnet.v1 import bitstream_pb2 as pb

MAX_RENDER_PIXELS = 16 * 1024 * 1024  # one stage is drawn / decoded at most this large (4096 x 4096)


class StageTimeout(MiscError):
    """A stage's decoding ran past its deadline (the receiver's time bound per stage)."""


def render_size(width: int, height: int, max_pixels: int | None = MAX_RENDER_PIXELS) -> tuple[int, int]:
    """The size a stage is drawn at: the declared one, or scaled down (aspect kept) to fit ``max_pixels``."""
    if max_pixels is None or width * height <= max_pixels:
        return width, height
    scale = math.sqrt(max_pixels / (width * height))
    return max(1, math.floor(width * scale)), max(1, math.floor(height * scale))


def _stream_order(layer: pb.Layer) -> tuple[int, int]:
    return KIND_ORDER.get(layer.kind, 9), layer.level


class StageInput:
    """The usable layers of one stage; ``semantics``, ``masks`` and ``pixel_levels`` decode on demand."""

    def __init__(self, name: str, width: int, height: int, layers: tuple[pb.Layer, ...],
                 max_pixels: int | None = MAX_RENDER_PIXELS):
        self.name = name  # the layer whose arrival made this stage
        self.declared_width, self.declared_height = width, height  # as the header says
        self.width, self.height = render_size(width, height, max_pixels)  # what decoders draw
        self.deadline: float | None = None  # time.monotonic() by which decoding must end
        self._layers = layers
        self.layers = tuple(layer_name(ly) for ly in layers)  # names, in stream order
        self.payload_bytes = sum(len(ly.payload) for ly in layers)

    def _one(self, kind: int) -> pb.Layer | None:
        return next((ly for ly in self._layers if ly.kind == kind), None)

    @cached_property
    def semantics(self) -> Semantics | None:
        layer = self._one(pb.LAYER_KIND_SEMANTIC)
        return None if layer is None else decode_semantic_layer(layer.codec, layer.semantic, layer.payload)

    @cached_property
    def masks(self) -> np.ndarray | None:  # (objects, N, N) bool
        layer = self._one(pb.LAYER_KIND_MAP)
        return None if layer is None else decode_map_layer(layer.codec, layer.map, layer.payload)

    @cached_property
    def pixel_levels(self) -> tuple[PixelLevel, ...]:
        return tuple(PixelLevel(ly.level, ly.codec, ly.pixel, ly.payload)
                     for ly in self._layers if ly.kind == pb.LAYER_KIND_PIXEL)

    @property
    def has_pixels(self) -> bool:
        return any(ly.kind == pb.LAYER_KIND_PIXEL for ly in self._layers)

    @property
    def scaled(self) -> bool:
        return (self.width, self.height) != (self.declared_width, self.declared_height)

    def check_time(self, what: str) -> None:
        """Raise StageTimeout if the deadline has passed (decoders call it between passes)."""
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise StageTimeout(f"stage {self.name}: time bound reached before {what}")


def stage_input(width: int, height: int, layers: Iterable[pb.Layer], name: str | None = None,
                max_pixels: int | None = MAX_RENDER_PIXELS) -> StageInput:
    """The stage the given layers make (validated); pixel levels beyond a gap are left out."""
    ordered = sorted(layers, key=_stream_order)
    for layer in ordered:
        validate_layer(layer)
        if layer.kind == pb.LAYER_KIND_PIXEL and (layer.pixel.width > width or layer.pixel.height > height):
            raise BitstreamError(f"{layer_name(layer)} layer: a {layer.pixel.width}x{layer.pixel.height} raster "
                                 f"is larger than the {width}x{height} image it describes")
    levels = {ly.level for ly in ordered if ly.kind == pb.LAYER_KIND_PIXEL}
    prefix = 0
    while prefix in levels:
        prefix += 1
    used = tuple(ly for ly in ordered if ly.kind != pb.LAYER_KIND_PIXEL or ly.level < prefix)
    return StageInput(name or (layer_name(used[-1]) if used else "empty"), width, height, used, max_pixels)


def progressive_stages(encoded: EncodedImage) -> list[StageInput]:
    """One StageInput per layer prefix, in stream order (what a receiver sees as layers arrive)."""
    ordered = sorted(encoded.layers, key=_stream_order)
    return [stage_input(encoded.width, encoded.height, ordered[: i + 1]) for i in range(len(ordered))]
