"""Reading images safely and writing outputs atomically.

Input images are untrusted: Pillow's decompression-bomb guard is turned into a hard limit, and every
failure becomes a one-line MiscError. Outputs are written to a temporary file and renamed, so a failed
run never leaves a partial file behind (and never clobbers a good one).
"""

from __future__ import annotations

import io
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from miscnet.core.errors import MiscError

MAX_PIXELS = 64 * 1024 * 1024  # refuse anything larger: an edge node has no business with it
MAX_SIDE = 16384  # the .misc header's limit too (container.MAX_SIDE): what we read, we can encode
MAX_FILE_BYTES = 256 * 1024 * 1024


def check_image_size(width: int, height: int, source: str, max_pixels: int = MAX_PIXELS) -> None:
    """MiscError unless width x height is a size a .misc file holds (container.validate_header agrees)."""
    if width < 1 or height < 1:
        raise MiscError(f"image {source} is empty ({width}x{height})")
    if width > MAX_SIDE or height > MAX_SIDE:
        raise MiscError(f"image {source} is {width}x{height}, over the limit of {MAX_SIDE} pixels a side")
    if width * height > max_pixels:
        raise MiscError(f"image {source} is {width}x{height}, over the limit of {max_pixels} pixels")


def load_image(path: str | os.PathLike, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Return the image at path as uint8 RGB (H, W, 3); alpha is composited over white."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise MiscError(f"cannot read image {path}: {exc.strerror or exc}") from None
    if size > MAX_FILE_BYTES:
        raise MiscError(f"image file {path} is {size} bytes, over the {MAX_FILE_BYTES} byte limit")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise MiscError(f"cannot read image {path}: {exc.strerror or exc}") from None
    return decode_image_bytes(data, str(path), max_pixels)


def decode_image_bytes(data: bytes, source: str, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode encoded image bytes (PNG, JPEG, WebP, ...) with size limits; see load_image."""
    try:
        with warnings.catch_warnings():
            # Pillow warns between MAX_IMAGE_PIXELS and twice that; we refuse instead.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                check_image_size(*img.size, source, max_pixels)
                img = ImageOps.exif_transpose(img)
                img.load()
                if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
                    rgba = img.convert("RGBA")
                    canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                    img = Image.alpha_composite(canvas, rgba)
                rgb = img.convert("RGB")
    except MiscError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise MiscError(
            f"image {source} is over the limit of {max_pixels} pixels (a decompression bomb?); refused"
        ) from None
    except UnidentifiedImageError:
        raise MiscError(f"{source} is not an image Pillow can read") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise MiscError(f"cannot decode image {source}: {exc}") from None
    arr = np.asarray(rgb, dtype=np.uint8)
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise MiscError(f"image {source} is empty")
    return arr


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write data to path via a temporary file in the same folder and a rename."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent)
    except OSError as exc:
        raise MiscError(f"cannot write {path}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise MiscError(f"cannot write {path}: {exc.strerror or exc}") from None


def png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def save_png(path: str | os.PathLike, image: np.ndarray) -> None:
    atomic_write_bytes(path, png_bytes(image))
