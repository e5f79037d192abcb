"""Where model weights come from, shared by every backend that loads them (CLIP map, VLM, diffusion).

A model is named by a local folder or by a Hugging Face id that is already in the local cache; nothing
is ever downloaded. Resolution order for a role (``clip``, ``vlm``, ``diffusion``, ...):

1. the value given on the command line or in code;
2. the role's environment variable (``MISCNET_CLIP_MODEL``, ``MISCNET_DIFFUSION_MODEL``, ...);
3. ``$MISCNET_MODELS_DIR/<role>`` when that folder exists (the layout ``miscnet models tiny DIR`` writes).

A value that is an existing folder is used as is. Anything else that looks like a Hub id
(``owner/name``) is looked up in the cache (``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else
``~/.cache/huggingface/hub``) with ``local_files_only``; the folder found there is what every
``from_pretrained(..., local_files_only=True)`` call then receives. A missing model is one MiscError line
naming what was tried and how to provide it. No model id is hard-coded anywhere.

This module imports nothing heavy at import time: torch and huggingface_hub are imported inside the
functions that need them.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from miscnet.core.errors import MiscError

MODELS_DIR_ENV = "MISCNET_MODELS_DIR"


@dataclass(frozen=True)
class Role:
    """One kind of model miscnet can load."""

    key: str  # also the sub-folder name under MISCNET_MODELS_DIR
    env: str
    option: str  # the command-line option that sets it
    marker: str  # a file every valid folder of this kind holds
    what: str  # one phrase for messages and listings


ROLES: dict[str, Role] = {r.key: r for r in (
    Role("diffusion", "MISCNET_DIFFUSION_MODEL", "--diffusion-model", "model_index.json",
         "Stable Diffusion pipeline (diffusers folder: unet, vae, text_encoder, tokenizer, scheduler)"),
    Role("controlnet", "MISCNET_CONTROLNET_MODEL", "--controlnet-model", "config.json",
         "ControlNet conditioned on the degraded reference (DiffBIR-style restoration)"),
    Role("upscaler", "MISCNET_UPSCALER_MODEL", "--upscaler-model", "model_index.json",
         "Stable Diffusion upscaler pipeline (restores from the reference at 1/scale size)"),
    Role("clip", "MISCNET_CLIP_MODEL", "--clip-model", "config.json",
         "CLIP model with its tokenizer and image processor (map encoder)"),
    Role("vlm", "MISCNET_VLM_MODEL", "--vlm-model", "config.json",
         "vision-language chat model with its processor (hf semantic encoder)"),
    Role("diffbir", "MISCNET_DIFFBIR_MODEL", "--diffbir-model", "general_full_v1.ckpt",
         "DiffBIR v1 checkpoint (SwinIR + ControlLDM; a file, or a folder holding one; receiver/diffbir.py)"),
)}

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment at call time (HF_HUB_CACHE, HF_HOME)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"), "huggingface")
    return Path(home).expanduser() / "hub"


@dataclass(frozen=True)
class Located:
    """Where a role's model was looked for and what was found."""

    role: str
    value: str | None  # the configured path or id (None: not configured)
    source: str  # "option", "env VAR", "MISCNET_MODELS_DIR" or "unset"
    path: Path | None  # the local folder, when present
    problem: str | None  # why it is not usable (None when path is set)

    @property
    def present(self) -> bool:
        return self.path is not None


def configured(role: str, value: str | os.PathLike[str] | None = None) -> tuple[str | None, str]:
    """(value, source) for a role after the option / environment / models-dir fallbacks."""
    r = ROLES[role]
    if value is not None and str(value) != "":
        return str(value), "option"
    if os.environ.get(r.env):
        return os.environ[r.env], f"env {r.env}"
    base = os.environ.get(MODELS_DIR_ENV)
    if base:
        candidate = Path(base).expanduser() / r.key
        if candidate.is_dir():
            return str(candidate), MODELS_DIR_ENV
    return None, "unset"


def _how(role: str) -> str:
    r = ROLES[role]
    return (f"give {r.option} FOLDER|ID or set {r.env} (or {MODELS_DIR_ENV} to a folder holding '{r.key}/'); "
            f"see experiments/MODELS.md")


def locate(role: str, value: str | os.PathLike[str] | None = None) -> Located:
    """Find a role's model on this machine without raising; never touches the network."""
    r = ROLES[role]
    value, source = configured(role, value)
    if value is None:
        return Located(role, None, source, None, f"no {role} model configured: {_how(role)}")
    path = Path(value).expanduser()
    if path.is_dir():
        if not (path / r.marker).is_file():
            return Located(role, value, source, None,
                           f"{role} model folder {value} has no {r.marker} (expected a {r.what})")
        return Located(role, value, source, path, None)
    if path.exists():
        return Located(role, value, source, None, f"{role} model {value} is a file, not a model folder")
    if not _HUB_ID.match(value) or value.startswith((".", "~")):
        return Located(role, value, source, None, f"{role} model folder {value} does not exist; {_how(role)}")
    cache = hf_cache_dir()
    snapshot = _cached_snapshot(value, cache)
    if snapshot is None:
        return Located(role, value, source, None,
                       f"{role} model {value!r} is neither a folder nor in the Hugging Face cache {cache} "
                       f"(nothing is downloaded; fetch it elsewhere with `hf download {value}` and copy the "
                       f"cache or the folder here, or {_how(role)})")
    if not (snapshot / r.marker).is_file():
        return Located(role, value, source, None,
                       f"{role} model {value!r} in the cache {cache} has no {r.marker} (expected a {r.what})")
    return Located(role, value, source, snapshot, None)


def _cached_snapshot(repo_id: str, cache: Path) -> Path | None:
    """The local snapshot folder of a cached Hub repository, or None (offline lookup only)."""
    if not (cache / ("models--" + repo_id.replace("/", "--"))).is_dir():
        return None  # avoids importing huggingface_hub for the common "not there" answer
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise MiscError("resolving a model id needs huggingface_hub: pip install 'miscnet[models]'") from None
    try:
        return Path(snapshot_download(repo_id=repo_id, cache_dir=str(cache), local_files_only=True))
    except Exception:  # any flavour of "not in the cache" (LocalEntryNotFoundError, incomplete snapshot)
        return None


def require(role: str, value: str | os.PathLike[str] | None = None) -> Path:
    """The local folder of a role's model, or MiscError with one line saying what was tried."""
    found = locate(role, value)
    if found.path is None:
        raise MiscError(found.problem)
    return found.path


# ---------------------------------------------------------------------------------------------- torch


def require_torch(feature: str):
    """Import torch, or explain in one line how to install the models extra."""
    try:
        import torch
    except ImportError:
        raise MiscError(f"{feature} needs the model packages: pip install 'miscnet[models]' "
                        "(torch, diffusers, transformers)") from None
    return torch


def pick_device(device: str = "auto", asked: str | None = None) -> tuple[str, object]:
    """(device, dtype) for a device request: fp32 on CPU; on CUDA bf16 where the GPU supports it, else fp16.

    ``asked`` is the dtype a model's own config names (``torch_dtype``): "float16" keeps fp16 on CUDA for
    models published for it; bf16 otherwise (Gemma 3, Qwen2-VL and SDXL's VAE overflow in fp16).
    """
    torch = require_torch("this backend")
    if device not in ("auto", "cpu", "cuda") and not device.startswith("cuda:"):
        raise MiscError(f"unknown device {device!r} (use auto, cpu, cuda or cuda:N)")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise MiscError(f"device {device} asked for, but torch sees no CUDA GPU (use --device cpu)")
    if not device.startswith("cuda"):
        return device, torch.float32
    if asked in ("float16", "fp16", "half") or not torch.cuda.is_bf16_supported():
        return device, torch.float16
    return device, torch.bfloat16


def asked_dtype(folder: Path | None) -> str | None:
    """The dtype a model folder's config.json names (``torch_dtype`` / ``dtype``), or None."""
    import json

    if folder is None:
        return None
    for name in ("config.json", "text_encoder/config.json", "unet/config.json"):
        try:
            config = json.loads((Path(folder) / name).read_text())
        except (OSError, ValueError):
            continue
        value = config.get("torch_dtype") or config.get("dtype")
        if isinstance(value, str):
            return value
    return None


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """Silence library chatter (progress bars, advisory warnings) while loading or running models.

    Errors still raise; only log records below ERROR and tqdm bars are hidden.
    """
    saved = []
    try:
        import transformers

        saved.append((transformers.logging.set_verbosity, transformers.logging.get_verbosity()))
        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    except ImportError:
        pass
    try:
        import diffusers

        saved.append((diffusers.utils.logging.set_verbosity, diffusers.utils.logging.get_verbosity()))
        diffusers.utils.logging.set_verbosity_error()
        diffusers.utils.logging.disable_progress_bar()
    except ImportError:
        pass
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            yield
        finally:
            for setter, level in saved:
                setter(level)


def load_error(role: str, path: Path, exc: BaseException) -> MiscError:
    """A one-line MiscError for a model folder that exists but will not load."""
    text = " ".join(str(exc).split())
    if len(text) > 300:
        text = text[:297] + "..."
    hint = ""
    if "torchvision" in text.lower() or "video_processor" in text.lower() or "VIDEO_PROCESSOR" in text:
        hint = " (this processor needs torchvision: pip install torchvision)"
    return MiscError(f"cannot load the {role} model from {path}: {type(exc).__name__}: {text}{hint}")
