"""Layers arriving one by one -> the next stage to reconstruct, for one image.

A new stage exists when the set of usable layers grows (a pixel level is usable only after every level
before it); its name is the last usable layer in stream order.
"""

from __future__ import annotations

from miscnet.core.container import layer_name
from miscnet.receiver.stages import MAX_RENDER_PIXELS, StageInput, stage_input
from miscnet.v1 import bitstream_pb2 as pb


class ImageAssembly:
    def __init__(self, header: pb.Header, max_render_pixels: int | None = MAX_RENDER_PIXELS):
        self.max_render_pixels = max_render_pixels
        self.width = header.width
        self.height = header.height
        self.layer_count = header.layer_count
        self.layers: dict[str, pb.Layer] = {}
        self._used = 0

    @property
    def complete(self) -> bool:
        return len(self.layers) >= self.layer_count

    def add(self, *layers: pb.Layer) -> StageInput | None:
        """Record arrived layers (those of one packet together); return the new stage they make, if any."""
        fresh = False
        for layer in layers:
            name = layer_name(layer)
            if name not in self.layers:
                self.layers[name] = layer
                fresh = True
        if not fresh:
            return None
        stage = stage_input(self.width, self.height, self.layers.values(), max_pixels=self.max_render_pixels)
        if len(stage.layers) <= self._used:
            return None
        self._used = len(stage.layers)
        return stage
