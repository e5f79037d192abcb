"""Typed configuration of both ends: one frozen dataclass per concern, holding the one set of defaults.

* ``SemanticsConfig``: where an image's semantics come from (sidecar, openai or hf) and their settings;
* ``MapConfig``: the map layer backend (none, boxes or clip), its grid and the clip model's settings;
* ``EncoderConfig``: the pixel layer (codec, levels, byte budget) with the semantics and map configs;
* ``DiffusionConfig`` and ``DecoderConfig``: the receiver's decoder (classical, or diffusion and its settings).

The protection config is ``miscnet.channel.transport.TransportConfig``; the link's is
``miscnet.channel.link.LinkConfig`` / ``DuplexConfig``.

The CLI (argparse) and scenario files (TOML) both build these and read their defaults from them. Each
checks itself when made (``check()``, run by ``__post_init__``) and raises a MiscError in one line.
Only light modules are imported here: no model library, no plotting.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from miscnet.core.errors import BudgetError, MiscError
from miscnet.core.map_codec import DEFAULT_GRID, MAX_GRID
from miscnet.core.pixel import codec_names
from miscnet.core.pixel.block import BLOCK_RULES
from miscnet.core.semantics import SemanticLimits

SEMANTICS_BACKENDS = ("sidecar", "openai", "hf")
MAP_BACKENDS = ("none", "boxes", "clip")
MAX_LEVELS = 4
DECODERS = ("classical", "diffusion")
RESTORE_MODES = ("auto", "controlnet", "img2img", "upscale", "diffbir")
NEGATIVE_PROMPT = "Blurry, Low Quality"
MAX_WORKING_SIDE = 4096
MAP_THRESHOLD = 0.35  # MISC's: a cell is in an object's mask when its normalised CLIP score exceeds this
MODEL_DEVICE = "auto"  # every model's default device: CUDA when present, else the CPU (core.pretrained.pick_device)


def pixel_codec_choices() -> tuple[str, ...]:
    """What ``--pixel`` / ``encoder.pixel`` may name: auto (search every auto codec), each registered codec
    a MISC encoder may choose, or none. Asked each time, so a codec registered later is offered too."""
    return ("auto", *codec_names(), "none")


def _positive_finite(v: float) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v > 0


# ============================================================================ encoder side


@dataclass(frozen=True)
class SemanticsConfig:
    """Where an image's semantics come from (``--semantics-backend`` and the model backends' settings)."""

    backend: str = "sidecar"  # sidecar (JSON / MISC CSV), openai (chat endpoint) or hf (local VLM)
    sidecar: str | None = None  # sidecar: this file (--semantics) instead of IMAGE.json beside the image
    lmm_model: str | None = None  # openai: model name (None: $MISCNET_LMM_MODEL)
    lmm_endpoint: str | None = None  # openai: base URL (None: $OPENAI_BASE_URL, else OpenAI's)
    lmm_api_key: str | None = field(default=None, repr=False)  # openai: None: $OPENAI_API_KEY
    lmm_timeout: float = 120.0  # openai: seconds per request
    lmm_retries: int = 3  # openai: retries on timeouts, 429 and 5xx
    lmm_max_tokens: int = 600  # openai / hf: answer length limit
    vlm_model: str | None = None  # hf: model folder or cached id (None: $MISCNET_VLM_MODEL, models dir)
    device: str = MODEL_DEVICE  # hf: the model's device (--model-device, shared with the map's)
    strict: bool = False  # MISC's text limits as errors, not warnings
    save: str | None = None  # openai / hf: also write the answer as a sidecar ('{stem}': the image's name)

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        if self.backend not in SEMANTICS_BACKENDS:
            raise MiscError(f"unknown semantics backend {self.backend!r} (use {', '.join(SEMANTICS_BACKENDS)})")
        if not _positive_finite(self.lmm_timeout):
            raise MiscError(f"lmm timeout must be a positive number of seconds, not {self.lmm_timeout}")
        if isinstance(self.lmm_retries, bool) or not isinstance(self.lmm_retries, int) or self.lmm_retries < 0:
            raise MiscError(f"lmm retries must be 0 or more, not {self.lmm_retries}")
        if isinstance(self.lmm_max_tokens, bool) or not isinstance(self.lmm_max_tokens, int) \
                or self.lmm_max_tokens < 1:
            raise MiscError(f"lmm max tokens must be at least 1, not {self.lmm_max_tokens}")
        if self.sidecar and self.backend != "sidecar":
            raise MiscError(f"--semantics reads a sidecar; it cannot be combined with --semantics-backend "
                            f"{self.backend} (use --save-semantics to keep what the model says)")

    @property
    def limits(self) -> SemanticLimits:
        return SemanticLimits(strict=self.strict)


@dataclass(frozen=True)
class MapConfig:
    """The map layer: its backend (``--map``), grid (``--grid``) and the clip backend's settings."""

    backend: str = "boxes"  # none, boxes (from the sidecar's boxes) or clip (a CLIP model)
    grid: int = DEFAULT_GRID  # N x N cells
    clip_model: str | None = None  # clip: model folder or cached id (None: $MISCNET_CLIP_MODEL, models dir)
    threshold: float = MAP_THRESHOLD  # clip: a cell is in the mask when its normalised score exceeds this
    device: str = MODEL_DEVICE  # clip: the model's device (--model-device, shared with the semantics')

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        if self.backend not in MAP_BACKENDS:
            raise MiscError(f"unknown map backend '{self.backend}' (use {', '.join(MAP_BACKENDS)})")
        if isinstance(self.grid, bool) or not isinstance(self.grid, int) or not 2 <= self.grid <= MAX_GRID:
            raise MiscError(f"--grid must be 2..{MAX_GRID}, not {self.grid}")
        if not (isinstance(self.threshold, int | float) and 0.0 <= self.threshold <= 1.0):
            raise MiscError(f"map threshold must be in [0, 1], not {self.threshold}")

    def backend_options(self) -> dict:
        """The model backend's constructor options (empty for none and boxes)."""
        if self.backend != "clip":
            return {}
        return {"model": self.clip_model, "threshold": self.threshold, "device": self.device}


@dataclass(frozen=True)
class EncoderConfig:
    """The edge encoder: the pixel layer and its budget, with the semantics and map configs."""

    pixel_codec: str = "auto"
    levels: int = 2  # pixel levels, coarse first
    budget_bytes: int | None = None  # whole-file byte budget ...
    bpp: float | None = None  # ... or the same in bits per pixel (give one, or neither)
    block_rule: str = "search"  # block codec: "search" (rate control) or "misc" (the notebook's fixed rule)
    ref: str | None = None  # ref codec: the external codec's file whose bytes are the pixel layer (one level)
    map: MapConfig = field(default_factory=MapConfig)
    semantics: SemanticsConfig = field(default_factory=SemanticsConfig)

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        if self.pixel_codec not in (choices := pixel_codec_choices()):
            raise MiscError(f"unknown pixel codec '{self.pixel_codec}' (use {', '.join(choices)})")
        self.map.check()
        if self.block_rule not in BLOCK_RULES:
            raise MiscError(f"unknown block rule {self.block_rule!r} (use {', '.join(BLOCK_RULES)})")
        if self.block_rule != "search" and self.pixel_codec != "block":
            raise MiscError(f"--block-rule {self.block_rule} applies to --pixel block, not {self.pixel_codec}")
        if self.pixel_codec == "ref" and not self.ref:
            raise MiscError("--pixel ref needs --ref FILE (the external codec's output)")
        if self.ref and self.pixel_codec != "ref":
            raise MiscError(f"--ref FILE goes with --pixel ref, not --pixel {self.pixel_codec}")
        if not 1 <= self.levels <= MAX_LEVELS:
            raise MiscError(f"--levels must be 1..{MAX_LEVELS}, not {self.levels}")
        if self.budget_bytes is not None and self.bpp is not None:
            raise MiscError("give --budget or --bpp, not both")
        if self.budget_bytes is not None and self.budget_bytes <= 0:
            raise BudgetError(f"budget must be positive, not {self.budget_bytes} bytes")
        if self.bpp is not None and not self.bpp > 0:
            raise BudgetError(f"bpp must be positive, not {self.bpp}")

    @property
    def limits(self) -> SemanticLimits:
        """MISC's text limits the encoder checks the semantics against."""
        return self.semantics.limits

    def budget_for(self, width: int, height: int) -> int | None:
        if self.bpp is not None:
            return int(self.bpp * width * height / 8)
        return self.budget_bytes


# ============================================================================ decoder side


@dataclass(frozen=True)
class DiffusionConfig:
    """Everything the diffusion decoder is configured with (see experiments/MODELS.md).

    Checked by ``check()`` when the decoder is made (``DiffusionDecoder`` applies overrides first).
    """

    model: str | None = None  # text-to-image pipeline folder or cached id (MISCNET_DIFFUSION_MODEL)
    controlnet: str | None = None  # MISCNET_CONTROLNET_MODEL
    upscaler: str | None = None  # MISCNET_UPSCALER_MODEL
    diffbir: str | None = None  # DiffBIR v1 checkpoint file or folder (MISCNET_DIFFBIR_MODEL)
    restore: str = "auto"
    device: str = MODEL_DEVICE
    size: int | None = None  # working long side; None: min(1024, 2 x native)
    steps: int = 40
    guidance: float = 7.0
    object_steps: int = 3
    object_guidance: float = 3.5
    negative_prompt: str = NEGATIVE_PROMPT
    strength: float = 0.6  # img2img: global pass
    object_strength: float = 0.5  # img2img: object passes
    control_strength: float = 1.0  # controlnet: 1.0 starts from noise, as DiffBIR does
    noise_level: int = 20  # upscale
    seed: int = 0
    cpu_offload: bool = False
    color_fix: bool = True

    def check(self) -> None:
        if self.restore not in RESTORE_MODES:
            raise MiscError(f"unknown restoration {self.restore!r} (use {', '.join(RESTORE_MODES)})")
        if self.steps < 1 or self.object_steps < 1:
            raise MiscError(f"diffusion steps must be at least 1 (steps {self.steps}, "
                            f"object steps {self.object_steps})")
        if self.size is not None and not 8 <= self.size <= MAX_WORKING_SIDE:
            raise MiscError(f"diffusion working size must be 8..{MAX_WORKING_SIDE}, not {self.size}")
        for name in ("strength", "object_strength", "control_strength"):
            v = getattr(self, name)
            if not 0.0 < v <= 1.0:
                raise MiscError(f"{name.replace('_', ' ')} must be in (0, 1], not {v}")
        if self.guidance < 0 or self.object_guidance < 0 or self.noise_level < 0:
            raise MiscError("guidance and noise level must not be negative")


@dataclass(frozen=True)
class DecoderConfig:
    """The receiver's decoder: classical (no weights) or diffusion with its settings."""

    name: str = "classical"
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        if self.name not in DECODERS:
            raise MiscError(f"unknown decoder {self.name!r} (use {', '.join(DECODERS)})")
        if self.name == "diffusion":
            self.diffusion.check()
