"""The pixel layer's one interface: what a pixel codec is, and the registry that finds one.

A codec is a ``PixelCodec`` instance with a name (what settings and the CLI say), a ``pb.CODEC_PIXEL_*``
id (what the wire says), and the methods below. Each codec module registers its codec when imported;
the package imports the built-in ones. Everything else (the entry points in ``api``, the sender's rate
control, the receiver) finds codecs through ``lookup`` / ``lookup_id`` / ``codec_names``, never by name
in a table of its own: adding a codec is one module that calls ``register`` (and a ``CODEC_PIXEL_*``
enum value, which is the wire format).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from miscnet.core.errors import BitstreamError, MiscError
from miscnet.v1 import bitstream_pb2 as pb

MAX_RASTER = 4096  # coded raster side (block grid or thumbnail)
MAX_OUTPUT = 16384  # decoded image side


@dataclass(frozen=True)
class PixelLevel:
    """One pixel level as it crosses the link: the payload plus what is needed to decode it."""

    level: int
    codec: int  # pb.CODEC_PIXEL_*
    params: pb.PixelParams
    payload: bytes


@dataclass(frozen=True)
class PixelSettings:
    """One point in the rate-quality space of the pixel layer."""

    codec: str  # a registered codec's name: "block" | "webp" | "avif" | "jpeg" | ...
    width: int  # coded raster of the last level (block grid or thumbnail size)
    height: int
    quality: int = 0  # thumbnail codecs, 1..100 (0: codec default)
    step: int = 8  # block codec quantisation step
    levels: int = 1
    colorspace: str = "rgb"  # block codec: "rgb" (MISC) or "ycbcr"
    # thumbnail codecs: (width, height, quality) of each level before the last, every level a picture of
    # its own (empty: levels after the first are residuals at twice the resolution)
    previews: tuple[tuple[int, int, int], ...] = ()
    # thumbnail codecs: chroma subsampling of the last level ("420", or "444" where the codec offers it)
    chroma: str = "420"

    @property
    def nbytes_hint(self) -> int | None:
        """Exact payload size where the codec knows it without encoding (the block codec), else None."""
        codec = lookup(self.codec)
        return None if codec is None else codec.exact_bytes(self)


class Scratch(dict):
    """Work derived from one image that codecs keep across encodes of it (rate control encodes many
    settings of one image). Each codec keeps its entries under a key of its own; ``shrink`` asks every
    entry that has a ``shrink`` method to let go of what is large, once a search is done."""

    def shrink(self) -> None:
        for item in self.values():
            shrink = getattr(item, "shrink", None)
            if shrink is not None:
                shrink()


class PixelCodec:
    """A pixel codec. Subclasses set the class attributes and implement ``encode`` and ``decode``."""

    name: str = ""
    codec_id: int = pb.CODEC_UNSPECIFIED  # pb.CODEC_PIXEL_*
    max_levels: int = 1  # the most levels its rate-control candidates can carry
    selectable: bool = True  # a MISC encoder may choose it (codec_names lists it)
    auto: bool = False  # rate control's "auto" tries it

    # Rate control searches a codec one of two ways. With ``quality_search``, on each raster of the ladder
    # it searches the quality 1..100 (sizes nearly monotone in it). Without, ``candidates`` lists every
    # setting it may pick and ``exact_bytes`` gives their sizes without encoding.
    quality_search: bool = False
    ladder_smallest: int = 8  # smallest short side of the raster ladder its candidates start from
    # the ladder's top and step: half the image's short side (at most 512) in steps of 2**(1/4), or, with
    # ladder_full_size, the image's own size in steps of 2**(1/6) (the thumbnail codecs: a standard file
    # of the same bytes may use any raster, so rate control must be able to as well)
    ladder_full_size: bool = False
    chroma_options: tuple[str, ...] = ("420",)  # PixelSettings.chroma values it encodes; rate control tries each

    def check_settings(self, settings: PixelSettings) -> None:
        """Raise MiscError for settings this codec cannot encode (the raster is checked already)."""

    def encode(self, image: np.ndarray, settings: PixelSettings, scratch: Scratch | None = None
               ) -> list[PixelLevel]:
        """Code a checked uint8 RGB image as levels 0..settings.levels-1. Same input, same bytes."""
        raise NotImplementedError

    def decode(self, levels: Sequence[PixelLevel]) -> np.ndarray:
        """The coded raster of a prefix of levels (structure checked already: a prefix 0..k of this
        codec, rasters within MAX_RASTER) as RGB floats in 0..255; anything malformed: BitstreamError."""
        raise NotImplementedError

    def file_form(self, level: PixelLevel) -> bytes:
        """The standard image file a receiver rebuilds around one level, where the codec has one."""
        raise BitstreamError(f"pixel layer: {self.name} levels have no file form")

    def exact_bytes(self, settings: PixelSettings) -> int | None:
        """Payload bytes of these settings when known without encoding, else None."""
        return None

    def candidates(self, rasters: Sequence[tuple[int, int]], levels: int) -> list[PixelSettings]:
        """Without ``quality_search``: every setting rate control may pick on these rasters, smallest
        (by ``exact_bytes``) first."""
        raise NotImplementedError(f"{self.name}: no candidate settings")


_BY_NAME: dict[str, PixelCodec] = {}
_BY_ID: dict[int, PixelCodec] = {}
_RESERVED = ("auto", "none")  # rate control's and the encoder's words


def register(codec: PixelCodec) -> PixelCodec:
    """Make a codec known by its name and id; returns it. Names and ids are unique."""
    if not isinstance(codec, PixelCodec):
        raise MiscError(f"pixel layer: {codec!r} is not a PixelCodec")
    if not codec.name or codec.name in _RESERVED:
        raise MiscError(f"pixel layer: codec name {codec.name!r} is not allowed")
    if codec.name in _BY_NAME:
        raise MiscError(f"pixel layer: a codec named {codec.name!r} is registered already")
    if codec.codec_id in _BY_ID or codec.codec_id == pb.CODEC_UNSPECIFIED:
        raise MiscError(f"pixel layer: codec id {codec.codec_id} is taken or unset")
    _BY_NAME[codec.name] = codec
    _BY_ID[codec.codec_id] = codec
    return codec


def unregister(name: str) -> None:
    """Forget a codec (tests register toy codecs and take them away again)."""
    codec = _BY_NAME.pop(name)
    del _BY_ID[codec.codec_id]


def lookup(name: str) -> PixelCodec | None:
    """The codec registered under this name, or None."""
    return _BY_NAME.get(name) if isinstance(name, str) else None


def lookup_id(codec_id: int) -> PixelCodec | None:
    """The codec registered with this ``pb.CODEC_PIXEL_*`` id, or None."""
    return _BY_ID.get(codec_id) if isinstance(codec_id, int) else None


def _by_id() -> list[PixelCodec]:
    return [_BY_ID[k] for k in sorted(_BY_ID)]  # id order: the same whatever order modules were imported in


def codec_names() -> tuple[str, ...]:
    """Names of the registered codecs a MISC encoder may choose, in codec id order."""
    return tuple(c.name for c in _by_id() if c.selectable)


def auto_codec_names() -> tuple[str, ...]:
    """Names of the codecs rate control's "auto" tries (the thumbnail codecs), in codec id order.
    The order matters: among equal scores the first codec wins."""
    return tuple(c.name for c in _by_id() if c.selectable and c.auto)


# ----------------------------------------------------------------------------------------------
# checks shared by the entry points and rate control


def check_image(image: np.ndarray) -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise MiscError("pixel layer: the image must be a uint8 array of shape (height, width, 3)")
    h, w = image.shape[:2]
    if not (1 <= w <= MAX_OUTPUT and 1 <= h <= MAX_OUTPUT):
        raise MiscError(f"pixel layer: image size {w}x{h} is outside 1..{MAX_OUTPUT}")


def check_settings(s: PixelSettings) -> PixelCodec:
    """The codec of valid settings; MiscError otherwise."""
    codec = lookup(s.codec)
    if codec is None:
        raise MiscError(f"pixel layer: unknown codec {s.codec!r} (use one of {', '.join(codec_names())})")
    if not (1 <= s.width <= MAX_RASTER and 1 <= s.height <= MAX_RASTER):
        raise MiscError(f"pixel layer: raster {s.width}x{s.height} is outside 1..{MAX_RASTER}")
    codec.check_settings(s)
    return codec
