"""The classical decoder: no model weights, CPU, fast.

Pixel stages up-sample the reference (the pixel codec's own resampler). Stages without pixels draw
what is known, so a user watching the receiver sees the semantics arrive: the object names and
caption over a neutral canvas, then each object's grid mask in its colour with its name.
"""

from __future__ import annotations

import textwrap

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from miscnet.core.map_codec import upsample_mask
from miscnet.core.pixel import decode_pixels
from miscnet.receiver.stages import StageInput

NEUTRAL = (128, 128, 128)
# Distinct, colour-blind-friendly hues (Okabe-Ito) for the objects' masks.
OBJECT_COLOURS = [(230, 159, 0), (86, 180, 233), (0, 158, 115), (240, 228, 66), (0, 114, 178),
                  (213, 94, 0), (204, 121, 167)]
MASK_OPACITY = 0.45
DRAW_MAX_PIXELS = 1024 * 1024  # semantic stages are drawn at most this large, then up-sampled


def _draw_size(width: int, height: int) -> tuple[int, int]:
    if width * height <= DRAW_MAX_PIXELS:
        return width, height
    scale = (DRAW_MAX_PIXELS / (width * height)) ** 0.5
    return max(1, int(width * scale)), max(1, int(height * scale))


class ClassicalDecoder:
    name = "classical"

    def render(self, stage: StageInput) -> np.ndarray:
        """Reconstruction of one stage as uint8 (height, width, 3)."""
        stage.check_time("decoding")
        if stage.has_pixels:
            return decode_pixels(stage.pixel_levels, stage.width, stage.height)
        return draw_semantics(stage)


def draw_semantics(stage: StageInput) -> np.ndarray:
    # Drawn on a canvas of at most DRAW_MAX_PIXELS (a picture of names and masks gains nothing from more),
    # so the cost of a stage without pixels does not grow with the size its header declares.
    width, height = _draw_size(stage.width, stage.height)
    canvas = np.empty((height, width, 3), dtype=np.float32)
    canvas[:] = NEUTRAL
    names = [obj.name for obj in stage.semantics.objects] if stage.semantics else []
    if stage.masks is not None:
        for k, mask in enumerate(stage.masks):
            full = upsample_mask(mask, width, height)
            colour = np.array(OBJECT_COLOURS[k % len(OBJECT_COLOURS)], dtype=np.float32)
            canvas[full] = canvas[full] * (1 - MASK_OPACITY) + colour * MASK_OPACITY
    img = Image.fromarray(canvas.round().astype(np.uint8))
    draw = ImageDraw.Draw(img)
    size = max(10, min(width, height) // 24)
    font = ImageFont.load_default(size=size)
    if stage.masks is not None:
        for k, mask in enumerate(stage.masks):
            if not mask.any():
                continue
            label = names[k] if k < len(names) else f"object {k + 1}"
            ys, xs = np.nonzero(mask)
            cx = (xs.mean() + 0.5) * width / mask.shape[1]
            cy = (ys.mean() + 0.5) * height / mask.shape[0]
            stroke = max(1, size // 8)
            x0, y0, x1, y1 = draw.textbbox((cx, cy), label, font=font, anchor="mm", stroke_width=stroke)
            cx += max(0, -x0) - max(0, x1 - width)  # keep the label inside the picture
            cy += max(0, -y0) - max(0, y1 - height)
            draw.text((cx, cy), label, fill=(255, 255, 255), font=font, anchor="mm",
                      stroke_width=stroke, stroke_fill=(0, 0, 0))
    elif stage.semantics is not None:
        lines = [f"- {name}" for name in names]
        chars = max(10, int(width / (size * 0.55)))
        lines += [""] + textwrap.wrap(stage.semantics.caption, chars)
        draw.multiline_text((size, size), "\n".join(lines), fill=(255, 255, 255), font=font,
                            spacing=size // 4)
    if img.size != (stage.width, stage.height):
        img = img.resize((stage.width, stage.height), Image.Resampling.BILINEAR)
    return np.asarray(img)
