"""Bundled sample images: the public-domain photos shipped in scikit-image's wheel, plus our sidecars.

The photos are not copied into this repository (scikit-image is a dependency and ships them); only the
hand-written MISC-style sidecars live in ``src/miscnet/core/samples/<name>.json``. See that folder's README
for the provenance and licence of each photo.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from PIL import Image

from miscnet.core.errors import MiscError

__all__ = [
    "SAMPLE_NAMES",
    "export_samples",
    "resolve_image_arg",
    "sample_image_path",
    "sample_sidecar_path",
]

SAMPLE_NAMES: tuple[str, ...] = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field")

_FILES = {
    "astronaut": "astronaut.png",
    "coffee": "coffee.png",
    "chelsea": "chelsea.png",
    "rocket": "rocket.jpg",
    "hubble_deep_field": "hubble_deep_field.jpg",
}

_SIDECAR_DIR = Path(__file__).resolve().parent
_PREFIX = "sample:"


def _check(name: str) -> str:
    if name not in _FILES:
        raise MiscError(f"unknown sample {name!r}; valid samples: {', '.join(SAMPLE_NAMES)}")
    return name


def _skimage_data_dir() -> Path:
    # Imported lazily: scikit-image is heavy and only the sample commands need it.
    import skimage

    return Path(os.path.dirname(skimage.__file__)) / "data"


def sample_image_path(name: str) -> Path:
    """The photo inside scikit-image's installed data folder."""
    path = _skimage_data_dir() / _FILES[_check(name)]
    if not path.is_file():
        raise MiscError(f"sample {name!r} is missing from the scikit-image install: {path}")
    return path


def sample_sidecar_path(name: str) -> Path:
    """The MISC-style sidecar shipped with this package: src/miscnet/core/samples/<name>.json."""
    return _SIDECAR_DIR / f"{_check(name)}.json"


def resolve_image_arg(arg: str) -> tuple[Path, Path | None]:
    """Map a command-line image argument to (image path, sidecar path or None).

    ``sample:<name>`` always means a bundled sample; a bare sample name does too unless a file of that
    name exists (a real file wins). Anything else is a path, whose sidecar is ``<stem>.json`` beside it
    when present.
    """
    if arg.startswith(_PREFIX):
        name = arg[len(_PREFIX) :]
        return sample_image_path(name), sample_sidecar_path(name)
    path = Path(arg)
    if arg in _FILES and not path.exists():
        return sample_image_path(arg), sample_sidecar_path(arg)
    sidecar = path.with_suffix(".json")
    # An image called x.json would otherwise be its own sidecar.
    return path, (sidecar if sidecar.is_file() and sidecar != path else None)


def export_samples(dest_dir) -> list[Path]:
    """Write every sample as <name>.png (lossless RGB) and <name>.json into dest_dir; return the paths."""
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for name in SAMPLE_NAMES:
        png = dest / f"{name}.png"
        with Image.open(sample_image_path(name)) as im:
            im.convert("RGB").save(png, format="PNG")
        sidecar = dest / f"{name}.json"
        shutil.copyfile(sample_sidecar_path(name), sidecar)
        written += [png, sidecar]
    return written
