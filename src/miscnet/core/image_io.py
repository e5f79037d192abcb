"""Reading images safely and writing outputs atomically.

Input images are untrusted: Pillow's decompression-bomb guard is turned into a hard limit, and every
failure becomes a one-line MiscError. Outputs are written to a temporary file and renamed, so a failed
run never leaves a partial file behind (and never clobbers a good one); they get the umask's permissions,
as any file the user creates.

MISC works on 8-bit RGB. Every input is turned into it by one rule per kind of file:

* 8-bit RGB, gray (L), 1-bit, palette (P), CMYK and YCbCr: Pillow's own conversion (8-bit RGB is untouched);
* 16-bit gray (I;16, I;16B, ...) and 32-bit integer (I) images are 16-bit samples, v * 255 / 65535
  rounded; an I image with values outside 0..65535 is refused. 16-bit RGB PNGs Pillow reads as 8-bit RGB;
* 32-bit float (F): values within [0, 1] are that range (v * 255); any other range is stretched from its
  own minimum and maximum to 0..255 (a constant image is clipped to 0..255); NaN or infinity is refused;
* alpha (RGBA, LA, PA, premultiplied, or a transparency key on P, L or RGB) is composited over white;
* the EXIF orientation is applied (the picture comes out as a viewer shows it).
Any other mode (LAB, HSV, ...) is refused with an error that names it.
"""

from __future__ import annotations

import io
import os
import secrets
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from miscnet.core.errors import MiscError

MAX_PIXELS = 64 * 1024 * 1024  # refuse anything larger: an edge node has no business with it
MAX_SIDE = 16384  # the .misc header's limit too (container.MAX_SIDE): what we read, we can encode
MAX_FILE_BYTES = 256 * 1024 * 1024
_PLAIN_MODES = ("1", "L", "P", "RGB", "RGBX", "CMYK", "YCbCr")  # Pillow converts these to RGB faithfully
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_INT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")


def check_image_size(width: int, height: int, source: str, max_pixels: int = MAX_PIXELS) -> None:
    """MiscError unless width x height is a size a .misc file holds (container.validate_header agrees)."""
    if width < 1 or height < 1:
        raise MiscError(f"image {source} is empty ({width}x{height})")
    if width > MAX_SIDE or height > MAX_SIDE:
        raise MiscError(f"image {source} is {width}x{height}, over the limit of {MAX_SIDE} pixels a side")
    if width * height > max_pixels:
        raise MiscError(f"image {source} is {width}x{height}, over the limit of {max_pixels} pixels")


def load_image(path: str | os.PathLike, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Return the image at path as uint8 RGB (H, W, 3), converted as the module docstring says."""
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
                arr = _to_rgb(img, source)
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
    return arr


def _to_rgb(img: Image.Image, source: str) -> np.ndarray:
    """img as uint8 RGB by the rules in the module docstring."""
    mode = img.mode
    if mode in _INT_MODES or mode == "F":
        gray = _gray8(np.asarray(img), mode, source)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode in _ALPHA_MODES or (mode in ("P", "L", "RGB") and "transparency" in img.info):
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    elif mode not in _PLAIN_MODES:
        raise MiscError(f"image {source} has mode {mode}, which miscnet cannot convert to RGB")
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


def _gray8(values: np.ndarray, mode: str, source: str) -> np.ndarray:
    """16-bit, 32-bit integer or float samples as 8-bit gray; Pillow's own conversion clips them to 0..255
    (a 16-bit picture comes out nearly white, a [0, 1] float one black)."""
    if mode == "F":
        v = values.astype(np.float64)
        if not np.isfinite(v).all():
            raise MiscError(f"image {source} (mode F, 32-bit float) has NaN or infinite values")
        lo, hi = float(v.min()), float(v.max())
        if 0.0 <= lo and hi <= 1.0:
            v = v * 255.0
        elif hi > lo:
            v = (v - lo) * (255.0 / (hi - lo))
        return np.clip(np.rint(v), 0, 255).astype(np.uint8)
    v = values.astype(np.int64)
    if v.min() < 0 or v.max() > 65535:
        raise MiscError(f"image {source} (mode {mode}) has values outside 0..65535; save it with 8 or 16 bits")
    return ((v * 255 + 32767) // 65535).astype(np.uint8)  # v * 255 / 65535, rounded


def atomic_write_bytes(path: str | os.PathLike, data: bytes, durable: bool = False) -> None:
    """Write data to path via a temporary file in the same folder and a rename.

    ``durable``: fsync the file before the rename and the folder after it, so the file survives a crash
    once this returns (the receiver acknowledges images only then).
    """
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = _create_temp(parent, path.name)
    except OSError as exc:
        raise MiscError(f"cannot write {path}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
        if durable:
            dir_fd = os.open(parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)  # the rename itself
            finally:
                os.close(dir_fd)
    except OSError as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise MiscError(f"cannot write {path}: {exc.strerror or exc}") from None


def _create_temp(parent: Path, name: str) -> tuple[int, Path]:
    """A new file beside the target, as mkstemp makes one but with mode 0666 less the umask: mkstemp's
    0600 would make every output private whatever the user's umask says (and os.umask cannot be read
    without setting it, which races with other threads)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        tmp = parent / f".{name}.{secrets.token_hex(4)}.tmp"
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name for {name} in {parent}")


def png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def save_png(path: str | os.PathLike, image: np.ndarray) -> None:
    atomic_write_bytes(path, png_bytes(image))
