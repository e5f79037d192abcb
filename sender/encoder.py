"""The edge encoder: image + semantics -> the three MISC layers, under a byte budget.

Rate control follows the layers' priority: the semantic and map layers are small and always sent
whole; what is left of the budget goes to the pixel reference, whose parameters are the
best-quality ones that make the WHOLE file (container included) fit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# The encoder's config lives in miscnet.core.config (the CLI and scenarios build it too).
from miscnet.core.config import EncoderConfig
from miscnet.core.container import EncodedImage, to_bytes
from miscnet.core.errors import BudgetError
from miscnet.core.image_io import check_image_size
from miscnet.core.map_codec import encode_map_layer
from miscnet.core.pixel import PixelSettings
from miscnet.core.semantic_codec import encode_semantic_layer
from miscnet.core.semantics import Semantics, check_limits
from miscnet.sender.map_layer import map_backend_for
from miscnet.sender.rate_control import choose_for_config
from miscnet.v1 import bitstream_pb2 as pb

# Without --budget / --bpp the pixel reference gets this much (MISC's operating point is
# 0.02-0.05 bpp in all; its pixel reference alone about 0.02-0.04).
DEFAULT_PIXEL_BPP = 0.025
MIN_DEFAULT_PIXEL_BYTES = 200
_RATE_CONTROL_TRIES = 4


@dataclass
class EncodeResult:
    encoded: EncodedImage
    data: bytes  # the .misc file
    warnings: list[str]
    pixel_settings: PixelSettings | None
    semantics: Semantics | None = None


def encode_image(image: np.ndarray, semantics: Semantics, config: EncoderConfig, exhaustive: bool = False
                 ) -> EncodeResult:
    """The .misc file of an image. ``exhaustive``: rate control's full search over codecs and rasters
    (what experiments/bench_levels.py compares the default quick search with)."""
    config.check()
    height, width = image.shape[:2]
    check_image_size(width, height, "to encode")  # the size a .misc header holds: never write what no one reads
    warnings = check_limits(semantics, config.limits)
    codec, params, payload = encode_semantic_layer(semantics)
    layers = [pb.Layer(kind=pb.LAYER_KIND_SEMANTIC, level=0, codec=codec, semantic=params, payload=payload)]
    backend = map_backend_for(config.map) if semantics.objects else None
    if backend is not None:
        masks = backend.masks(image, semantics, config.map.grid)
        codec, params, payload = encode_map_layer(masks)
        layers.append(pb.Layer(kind=pb.LAYER_KIND_MAP, level=0, codec=codec, map=params, payload=payload))
    base = EncodedImage(width, height, layers)
    base_bytes = len(to_bytes(base))
    budget = config.budget_for(width, height)
    if budget is not None and budget < base_bytes:
        raise BudgetError(
            f"budget of {budget} bytes cannot hold the semantic and map layers ({base_bytes} bytes with "
            f"the container); raise it to at least {base_bytes + 1}"
        )
    if config.pixel_codec == "none":
        return EncodeResult(base, to_bytes(base), warnings, None, semantics)

    if config.pixel_codec == "ref" or config.block_rule == "misc":
        # A fixed pixel layer (the external file, the notebook's grid): nothing to trade for bytes, so the
        # whole file is measured against the budget as it is.
        settings, levels = choose_for_config(image, config, None, exhaustive)
        encoded = EncodedImage(width, height, layers + [_pixel_layer(lv) for lv in levels])
        data = to_bytes(encoded)
        if budget is not None and len(data) > budget:
            what = f"the ref file {config.ref}" if config.pixel_codec == "ref" else "the notebook's block rule"
            raise BudgetError(
                f"budget of {budget} bytes is too small: {what} takes {sum(len(lv.payload) for lv in levels)} "
                f"bytes, {len(data)} in all with the semantic and map layers; raise it to at least {len(data)}"
            )
        return EncodeResult(encoded, data, warnings, settings, semantics)

    if budget is None:
        pixel_max = max(MIN_DEFAULT_PIXEL_BYTES, int(DEFAULT_PIXEL_BPP * width * height / 8))
        settings, levels = choose_for_config(image, config, pixel_max, exhaustive)
        encoded = EncodedImage(width, height, layers + [_pixel_layer(lv) for lv in levels])
        return EncodeResult(encoded, to_bytes(encoded), warnings, settings, semantics)

    # Each pixel layer costs a few bytes of framing (its record head and size); start from a guess, then
    # correct by the measured excess. Bytes are monotone in the pixel budget, so this converges in a few tries.
    pixel_max = budget - base_bytes - 5 * config.levels
    for _ in range(_RATE_CONTROL_TRIES):
        if pixel_max <= 0:
            break
        try:
            settings, levels = choose_for_config(image, config, pixel_max, exhaustive)
        except BudgetError as exc:
            raise BudgetError(
                f"budget of {budget} bytes leaves {pixel_max} for the pixel layer: {exc}"
            ) from None
        encoded = EncodedImage(width, height, layers + [_pixel_layer(lv) for lv in levels])
        data = to_bytes(encoded)
        if len(data) <= budget:
            return EncodeResult(encoded, data, warnings, settings, semantics)
        pixel_max = sum(len(lv.payload) for lv in levels) - (len(data) - budget)
    raise BudgetError(
        f"budget of {budget} bytes is too small for a pixel layer after the semantic and map layers "
        f"({base_bytes} bytes); use a larger budget or --pixel none"
    )


def _pixel_layer(level) -> pb.Layer:
    return pb.Layer(
        kind=pb.LAYER_KIND_PIXEL, level=level.level, codec=level.codec, pixel=level.params, payload=level.payload
    )
