"""Where an image's semantics come from, as a SemanticsConfig says: a sidecar, or a model (openai, hf).

``semantics_for(config, image, image_path)`` is what the CLI and scenario sweeps call for each image.
The model backends (``miscnet.sender.semantic_backends``) load only when one is asked for.
"""

from __future__ import annotations

import json
from pathlib import Path

from miscnet.core.config import SemanticsConfig
from miscnet.core.errors import MiscError


def sidecar_for(image_path) -> tuple[Path, Path | None]:
    """(image path, sidecar or None) for an IMAGE argument (a path or sample:NAME), bundled samples included."""
    from miscnet.core.samples import SAMPLE_NAMES, resolve_image_arg, sample_image_path, sample_sidecar_path

    path, sidecar = resolve_image_arg(str(image_path))
    if sidecar is None:  # a bundled sample given by its resolved path inside scikit-image
        for name in SAMPLE_NAMES:
            try:
                if Path(path).resolve() == sample_image_path(name).resolve():
                    return path, sample_sidecar_path(name)
            except (MiscError, OSError):
                break
    return path, sidecar


def semantics_backend_for(config: SemanticsConfig):
    """The model backend (openai or hf) a SemanticsConfig names; the sidecar backend reads files instead."""
    from miscnet.sender.semantic_backends import semantics_backend

    if config.backend == "openai":
        return semantics_backend("openai", model=config.lmm_model, base_url=config.lmm_endpoint,
                                 api_key=config.lmm_api_key, timeout=config.lmm_timeout, retries=config.lmm_retries,
                                 max_tokens=config.lmm_max_tokens)
    if config.backend == "hf":
        return semantics_backend("hf", model=config.vlm_model, max_new_tokens=config.lmm_max_tokens,
                                 device=config.device or "auto")
    raise MiscError(f"the {config.backend} semantics backend has no model")


def semantics_for(config: SemanticsConfig, image_array, image_path) -> tuple:
    """(Semantics, warnings) for one image with the configured backend.

    ``image_path`` is the IMAGE argument (a path or sample:NAME) or the resolved path. The sidecar backend
    reads ``config.sidecar`` or the sidecar beside the image; openai and hf ask their model about
    ``image_array`` (and write the answer to ``config.save`` when set). Either checks MISC's limits as
    ``config.limits`` says (``--strict``: an error), and its warnings name the source.
    """
    from miscnet.core.semantics import load_semantics

    if config.backend == "sidecar":
        path, sidecar = sidecar_for(image_path)
        source = Path(config.sidecar) if config.sidecar else sidecar
        if source is None:
            raise MiscError(
                f"no semantics for {image_path}: give --semantics FILE (JSON sidecar or MISC CSV) "
                f"or put {Path(path).with_suffix('.json').name} beside the image"
                f", or use --semantics-backend openai|hf")
        return load_semantics(source, image_name=Path(path).name, limits=config.limits)
    from miscnet.sender.semantic_backends import describe_image

    semantics, warnings = describe_image(semantics_backend_for(config), image_array, config.limits)
    if config.save:
        from miscnet.core.image_io import atomic_write_bytes
        from miscnet.core.semantics import semantics_to_json

        stem = Path(str(image_path).split(":", 1)[-1] if str(image_path).startswith("sample:") else image_path).stem
        target = config.save.replace("{stem}", stem)
        atomic_write_bytes(target, (json.dumps(semantics_to_json(semantics), indent=1) + "\n").encode("utf-8"))
    return semantics, warnings
