"""From received layers to the inputs of one reconstruction stage, for any decoder.

A stage is what the receiver can show once a set of layers has arrived: semantic; + map; + pixel
level 0; + pixel level 1; ... Layers are decoded once here, so decoders (classical, diffusion) only
paint; a pixel level counts only when every level before it is there too.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from proto.miscnet.v1 import bitstream_pb2 as pb
from sender.bitstream import KIND_ORDER, EncodedImage, layer_name, validate_layer
from sender.map_layer import decode_map_layer
from sender.pixel_codec import PixelLevel
from sender.semantic_codec import decode_semantic_layer
from sender.semantics import Semantics


@dataclass(frozen=True)
class StageInput:
    name: str  # the layer whose arrival made this stage
    width: int
    height: int
    semantics: Semantics | None
    masks: np.ndarray | None  # (objects, N, N) bool
    pixel_levels: tuple[PixelLevel, ...]
    layers: tuple[str, ...]  # names of the layers used, in stream order
    payload_bytes: int

    @property
    def has_pixels(self) -> bool:
        return bool(self.pixel_levels)


def stage_input(width: int, height: int, layers: Iterable[pb.Layer], name: str | None = None) -> StageInput:
    """Decode what layers hold (validated); pixel levels beyond a gap are left out."""
    ordered = sorted(layers, key=lambda ly: (KIND_ORDER.get(ly.kind, 9), ly.level))
    semantics = masks = None
    pixel: dict[int, PixelLevel] = {}
    for layer in ordered:
        validate_layer(layer)
        if layer.kind == pb.LAYER_KIND_SEMANTIC:
            semantics = decode_semantic_layer(layer.codec, layer.semantic, layer.payload)
        elif layer.kind == pb.LAYER_KIND_MAP:
            masks = decode_map_layer(layer.codec, layer.map, layer.payload)
        else:
            pixel[layer.level] = PixelLevel(layer.level, layer.codec, layer.pixel, layer.payload)
    prefix: list[PixelLevel] = []
    while len(prefix) in pixel:
        prefix.append(pixel[len(prefix)])
    used = [ly for ly in ordered if ly.kind != pb.LAYER_KIND_PIXEL or ly.level < len(prefix)]
    names = tuple(layer_name(ly) for ly in used)
    return StageInput(
        name=name or (names[-1] if names else "empty"),
        width=width,
        height=height,
        semantics=semantics,
        masks=masks,
        pixel_levels=tuple(prefix),
        layers=names,
        payload_bytes=sum(len(ly.payload) for ly in used),
    )


def progressive_stages(encoded: EncodedImage) -> list[StageInput]:
    """One StageInput per layer prefix, in stream order (what a receiver sees as layers arrive)."""
    ordered: Sequence[pb.Layer] = sorted(encoded.layers, key=lambda ly: (KIND_ORDER[ly.kind], ly.level))
    return [stage_input(encoded.width, encoded.height, ordered[: i + 1]) for i in range(len(ordered))]
