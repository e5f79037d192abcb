"""The diffusion decoder: MISC's decoder on diffusers pipelines, one call per progressive stage.

Same interface as the classical decoder: ``DiffusionDecoder(config).render(stage) -> uint8 (H, W, 3)``.
Per stage, following MISC's notebook (``sr_pipe`` and the cell after it; see /work/shared/MISC.md):

* with pixels: the pixel reference, up-sampled to the working size, is restored: first one pass per
  object with its detail sentence as prompt, composited by its mask (``new = gen * mask + prev * (1 -
  mask)``; ``object_steps`` 3 at ``object_guidance`` 3.5), then one global pass with the caption
  (``steps`` 40 at ``guidance`` 7), every pass with the negative prompt "Blurry, Low Quality" and its own
  wavelet colour fix (the pass's output keeps its high frequencies over the low frequencies of the
  picture the pass was conditioned on, as DiffBIR's sampler does for ``color_fix_type="wavelet"``); the
  result is resized back to the original size. Without maps only the global pass runs.
* semantic only (MISC never shows this stage; the progressive receiver does): text to image from the
  caption at the model's native size (SD 2.1-base repeats subjects at twice its size), up-sampled;
* semantic + map: that same picture, then each object's detail refines it inside the object's mask.

Restoration ("how a pass starts from the current picture") is one of four pipelines:

* ``diffbir`` (MISC's decoder): DiffBIR v1 (receiver/diffbir.py): SwinIR cleans the picture, its latent
  conditions a ControlNet on SD 2.1, sampling starts from noise; chosen by ``auto`` when a DiffBIR
  checkpoint is configured;
* ``controlnet``: a diffusers ControlNet conditioned on the current picture, sampling from noise
  (``control_strength`` 1.0); chosen by ``auto`` when a ControlNet is configured;
* ``upscale``: a Stable Diffusion upscaler fed the current picture at 1/scale size, ``noise_level``;
  chosen by ``auto`` when an upscaler is configured;
* ``img2img``: noise added to the current picture up to ``strength``, then denoised; the fallback.
  A pass of S steps at strength s runs a schedule of ceil(S / s) steps so that S steps actually run.

The working size keeps the image's aspect ratio (any ratio): the long side is ``size`` (default
min(1024, 2 x the model's native resolution): MISC's "about 1024" for SD 2.x) and both sides are rounded
to what the VAE and UNet need. Models are folders or cached ids (miscnet.core.pretrained); every component
is loaded once per process and shared by all pipelines (``from_pipe``); on CUDA bf16 where the GPU has it
(fp16 where the model's config asks for it, or the GPU lacks bf16), fp32 on CPU; optional model CPU
offload (needs accelerate). Every pass draws its noise from a CPU generator seeded by (seed, pass), so a
stage renders the same on every run and device.
"""

from __future__ import annotations

import json
import math
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image

# The decoder's settings live in miscnet.core.config, where the CLI and scenarios build them.
from miscnet.core.config import DiffusionConfig
from miscnet.core.errors import MiscError
from miscnet.core.map_codec import upsample_mask
from miscnet.core.pixel import decode_pixels
from miscnet.receiver.stages import StageInput

WAVELET_LEVELS = 5
_SALT_TEXT, _SALT_OBJECT, _SALT_GLOBAL = 0, 1, 1000  # per-pass seeds: seed * 10007 + salt


# ============================================================================ pure helpers (numpy)


def working_size(width: int, height: int, long_side: int, multiple: int) -> tuple[int, int]:
    """(w, h) with the aspect ratio of width x height, the long side about long_side, both multiples."""
    if width <= 0 or height <= 0:
        raise MiscError(f"image size {width}x{height} is not positive")
    scale = long_side / max(width, height)

    def snap(v: float) -> int:
        return max(multiple, int(round(v / multiple)) * multiple)

    return snap(width * scale), snap(height * scale)


def composite(current: np.ndarray, generated: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """MISC's mask compositing for any aspect ratio: gen inside the (up-sampled) grid mask, current outside.

    current, generated: float (H, W, 3); mask: bool (N, M) grid, up-sampled to (H, W) by nearest cell.
    """
    if current.shape != generated.shape:
        raise ValueError(f"composite: {current.shape} and {generated.shape} differ")
    h, w = current.shape[:2]
    m = upsample_mask(np.asarray(mask, dtype=bool), w, h)[..., None]
    return np.where(m, generated, current)


def _blur(x: np.ndarray, r: int) -> np.ndarray:
    """Separable [1, 2, 1] / 4 blur with taps r apart (a trous), edge pixels replicated."""
    h, w = x.shape[:2]
    p = np.pad(x, ((r, r), (0, 0), (0, 0)), mode="edge")
    x = 0.25 * p[0:h] + 0.5 * p[r:r + h] + 0.25 * p[2 * r:2 * r + h]
    p = np.pad(x, ((0, 0), (r, r), (0, 0)), mode="edge")
    return 0.25 * p[:, 0:w] + 0.5 * p[:, r:r + w] + 0.25 * p[:, 2 * r:2 * r + w]


def wavelet_decompose(x: np.ndarray, levels: int = WAVELET_LEVELS) -> tuple[np.ndarray, np.ndarray]:
    """(high, low) with high + low == x: low is x blurred at dilations 1, 2, 4, ..., high the rest."""
    low = np.asarray(x, dtype=np.float32)
    high = np.zeros_like(low)
    for i in range(levels):
        nxt = _blur(low, 2 ** i)
        high += low - nxt
        low = nxt
    return high, low


def wavelet_color_fix(content: np.ndarray, reference: np.ndarray, levels: int = WAVELET_LEVELS) -> np.ndarray:
    """The content's high frequencies over the reference's low frequencies (StableSR / DiffBIR colour fix).

    Both float (H, W, 3) in [0, 1] of the same size; the result is clipped to [0, 1].
    """
    if content.shape != reference.shape:
        raise ValueError(f"colour fix: {content.shape} and {reference.shape} differ")
    high, _ = wavelet_decompose(content, levels)
    _, low = wavelet_decompose(reference, levels)
    return np.clip(high + low, 0.0, 1.0)


def _to_float(img: np.ndarray) -> np.ndarray:
    return np.asarray(img, dtype=np.float32) / 255.0


def _to_uint8(img: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(np.asarray(img, dtype=np.float32) * 255.0), 0, 255).astype(np.uint8)


def _resize(img: np.ndarray, width: int, height: int) -> np.ndarray:
    """uint8 (H, W, 3) resized with LANCZOS (a no-op when the size already matches)."""
    if img.shape[1] == width and img.shape[0] == height:
        return img
    return np.asarray(Image.fromarray(img).resize((width, height), Image.Resampling.LANCZOS))


# ============================================================================ shared components


_CACHE: dict[tuple, _Pipelines] = {}
_CACHE_LOCK = threading.Lock()


def _model_class(path: Path) -> str:
    try:
        return str(json.loads((path / "model_index.json").read_text()).get("_class_name", ""))
    except (OSError, ValueError):
        return ""


def _has_component(path: Path, name: str) -> bool:
    try:
        return name in json.loads((path / "model_index.json").read_text())
    except (OSError, ValueError):
        return False


_WEIGHTS: dict[tuple, object] = {}  # (role, path, device, dtype) -> loaded pipeline or model
_OFFLOADED: list = [None]  # the pipeline whose models currently carry the CPU-offload hooks


def _weights(role: str, path: Path, device: str, dtype, load):
    """Load one set of weights once per process (shared by every pipeline and configuration)."""
    from miscnet.core.pretrained import load_error, quiet_loading

    key = (role, str(path), device, str(dtype))
    if key not in _WEIGHTS:
        with quiet_loading():
            try:
                _WEIGHTS[key] = load()
            except MiscError:
                raise
            except Exception as e:  # diffusers raises many types for a folder that will not load
                raise load_error(role, path, e) from None
    return _WEIGHTS[key]


class _Pipelines:
    """The pipelines of one configuration, all over the same shared weights."""

    def __init__(self, base: Path | None, controlnet: Path | None, upscaler: Path | None, diffbir: Path | None,
                 device: str, dtype, cpu_offload: bool) -> None:
        from miscnet.core.pretrained import quiet_loading

        with quiet_loading():  # importing diffusers logs transformers' advisory warnings
            from diffusers import (
                AutoPipelineForImage2Image,
                AutoPipelineForText2Image,
                ControlNetModel,
                StableDiffusionUpscalePipeline,
            )

        self.device, self.dtype, self.cpu_offload = device, dtype, cpu_offload
        if cpu_offload:
            if not device.startswith("cuda"):
                self.cpu_offload = False  # nothing to offload to: the models already live in CPU memory
            else:
                try:
                    import accelerate  # noqa: F401
                except ImportError:
                    raise MiscError("--cpu-offload needs the accelerate package: pip install accelerate") from None
        self.img2img = self.control = self.upscale = self.diffbir = None
        if diffbir is not None:
            # MISC's decoder: every component comes from the DiffBIR checkpoint (its UNet is SD 2.1's, frozen)
            from miscnet.receiver.diffbir import load_diffbir

            self.diffbir = _weights("diffbir", diffbir, device, dtype,
                                    lambda: load_diffbir(diffbir, tokenizer_from=base, dtype=dtype))
            with quiet_loading():
                self.text2img = self.diffbir.text_to_image_pipeline()
        else:
            if "Upscale" in _model_class(base):
                raise MiscError(f"diffusion model {base} is an upscaler pipeline; give it as --upscaler-model and "
                                "a text-to-image model as --diffusion-model")
            extra = {}
            if _has_component(base, "safety_checker"):  # MISC's decoder runs without one
                extra = {"safety_checker": None, "requires_safety_checker": False}
            self.text2img = _weights("diffusion", base, device, dtype,
                                     lambda: AutoPipelineForText2Image.from_pretrained(
                                         str(base), local_files_only=True, dtype=dtype, **extra))
            with quiet_loading():
                self.img2img = AutoPipelineForImage2Image.from_pipe(self.text2img)
        if controlnet is not None:
            cn = _weights("controlnet", controlnet, device, dtype, lambda: ControlNetModel.from_pretrained(
                str(controlnet), local_files_only=True, dtype=dtype))
            with quiet_loading():
                self.control = AutoPipelineForImage2Image.from_pipe(self.text2img, controlnet=cn)
        if upscaler is not None:
            self.upscale = _weights("upscaler", upscaler, device, dtype,
                                    lambda: StableDiffusionUpscalePipeline.from_pretrained(
                                        str(upscaler), local_files_only=True, dtype=dtype))
        self._pipes = [p for p in (self.text2img, self.img2img, self.control, self.upscale, self.diffbir)
                       if p is not None]
        for p in self._pipes:
            p.set_progress_bar_config(disable=True)
            if not self.cpu_offload:
                p.to(device)
        unet = self.text2img.unet
        self.vae_scale = int(getattr(self.text2img, "vae_scale_factor", 8))
        # the VAE and UNet down-sampling must divide the size, and diffusers insists on multiples of 8
        self.multiple = math.lcm(8, self.vae_scale * 2 ** (len(unet.config.block_out_channels) - 1))
        if self.diffbir is not None:  # SwinIR's windows after its pixel unshuffle
            self.multiple = math.lcm(self.multiple, self.diffbir.multiple)
        sample = unet.config.sample_size
        sample = sample[0] if isinstance(sample, (list, tuple)) else sample
        self.native = int(sample) * self.vae_scale
        if self.upscale is not None:
            up_scale = int(getattr(self.upscale, "vae_scale_factor", 4))
            up_mult = up_scale * 2 ** (len(self.upscale.unet.config.block_out_channels) - 1)
            self.multiple = math.lcm(self.multiple, up_mult)
            self.upscale_factor = up_scale

    def ready(self, pipe):
        """The pipeline, its models placed for a call (moving the offload hooks to it when offloading)."""
        if self.cpu_offload and _OFFLOADED[0] is not pipe:
            pipe.enable_model_cpu_offload(device=self.device)
            _OFFLOADED[0] = pipe
        return pipe


def _pipelines(base: Path | None, controlnet: Path | None, upscaler: Path | None, diffbir: Path | None,
               device: str, dtype, cpu_offload: bool) -> _Pipelines:
    key = (str(base), str(controlnet), str(upscaler), str(diffbir), device, str(dtype), cpu_offload)
    with _CACHE_LOCK:
        if key not in _CACHE:
            _CACHE[key] = _Pipelines(base, controlnet, upscaler, diffbir, device, dtype, cpu_offload)
        return _CACHE[key]


def clear_cache() -> None:
    """Forget every loaded pipeline and weight set (frees their memory once no decoder holds them)."""
    with _CACHE_LOCK:
        _CACHE.clear()
        _WEIGHTS.clear()
        _OFFLOADED[0] = None


# ============================================================================ the decoder


@dataclass
class PassTiming:
    name: str
    seconds: float


@dataclass
class StageTiming:
    stage: str
    passes: list[PassTiming] = field(default_factory=list)
    seconds: float = 0.0


class DiffusionDecoder:
    name = "diffusion"

    def __init__(self, config: DiffusionConfig | None = None, **overrides) -> None:
        from miscnet.core.pretrained import configured, require

        config = replace(config or DiffusionConfig(), **overrides)
        config.check()
        self.config = config
        # Resolve every path now, so missing weights fail before any work (one clear line each).
        self.model_path = self.controlnet_path = self.upscaler_path = self.diffbir_path = None
        mode = config.restore
        if mode == "auto" and (config.diffbir or _env_set("diffbir")):
            mode = "diffbir"
        if mode == "diffbir":
            from miscnet.receiver.diffbir_checkpoint import resolve_checkpoint

            self.diffbir_path = resolve_checkpoint(config.diffbir)
            if configured("diffusion", config.model)[0] is not None:  # only lends its tokenizer to DiffBIR
                self.model_path = require("diffusion", config.model)
        else:
            self.model_path = require("diffusion", config.model)
        if mode in ("auto", "controlnet") and (config.controlnet or mode == "controlnet" or _env_set("controlnet")):
            self.controlnet_path = require("controlnet", config.controlnet)
        if mode in ("auto", "upscale") and (config.upscaler or mode == "upscale" or _env_set("upscaler")):
            self.upscaler_path = require("upscaler", config.upscaler)
        if mode == "auto":
            mode = "controlnet" if self.controlnet_path else "upscale" if self.upscaler_path else "img2img"
        self.mode = mode
        self._pipes: _Pipelines | None = None
        self._t2i_cache: tuple[tuple, np.ndarray] | None = None
        # one stage at a time per decoder: the pipelines and their scheduler hold state between steps, so
        # the receiver's decode workers take turns on them (more GPUs: more decoders)
        self._lock = threading.Lock()
        self._local = threading.local()
        self.warnings: list[str] = []  # notes for the user (e.g. prompts longer than the text encoder reads)

    # --- loading

    def pipelines(self) -> _Pipelines:
        if self._pipes is None:
            from miscnet.core.pretrained import asked_dtype, pick_device, require_torch

            require_torch("the diffusion decoder")
            device, dtype = pick_device(self.config.device, asked_dtype(self.model_path))
            self._pipes = _pipelines(self.model_path, self.controlnet_path if self.mode == "controlnet" else None,
                                     self.upscaler_path if self.mode == "upscale" else None,
                                     self.diffbir_path if self.mode == "diffbir" else None, device, dtype,
                                     self.config.cpu_offload)
        return self._pipes

    def working_size(self, width: int, height: int) -> tuple[int, int]:
        p = self.pipelines()
        long_side = self.config.size or min(1024, 2 * p.native)
        return working_size(width, height, long_side, p.multiple)

    def native_size(self, width: int, height: int) -> tuple[int, int]:
        """The model's native long side, the image's aspect: where text to image draws."""
        p = self.pipelines()
        return working_size(width, height, min(p.native, self.config.size or p.native), p.multiple)

    # --- passes

    def _generator(self, salt: int):
        import torch

        return torch.Generator("cpu").manual_seed(self.config.seed * 10007 + salt)

    def _check_prompt(self, prompt: str) -> None:
        """Note once per prompt when the text encoder will read only its beginning (CLIP: 77 tokens)."""
        tok = self.pipelines().text2img.tokenizer
        limit = getattr(tok, "model_max_length", None)
        if not prompt or not limit or limit > 100_000:
            return
        n = len(tok(prompt, truncation=False).input_ids)
        note = f"prompt of {n} tokens is cut to the text encoder's {limit}: {prompt[:40]!r}..."
        if n > limit and note not in self.warnings:
            self.warnings.append(note)

    def _timed(self, name: str, fn, *args):
        from miscnet.core.pretrained import quiet_loading

        stage = getattr(self._local, "stage", None)
        if stage is not None:  # the receiver's time bound: no new pass once the deadline is past
            stage.check_time(name)
        t0 = time.perf_counter()
        try:
            with quiet_loading():  # library chatter per call (truncation, deprecations) stays out of the CLI
                out = fn(*args)
        except Exception as e:
            if type(e).__name__ == "OutOfMemoryError":
                raise MiscError(f"out of GPU memory in the diffusion decoder ({name}); lower --diffusion-size "
                                "or use --cpu-offload") from None
            raise
        timing = getattr(self._local, "timing", None)
        if timing is not None:
            timing.passes.append(PassTiming(name, time.perf_counter() - t0))
        return out

    def text_to_image(self, caption: str, width: int, height: int) -> np.ndarray:
        """float (height, width, 3) in [0, 1]: the caption drawn from noise at the model's native size, then
        up-sampled to width x height (cached for the next stage)."""
        c = self.config
        key = (caption, width, height, c.seed, c.steps, c.guidance, c.negative_prompt)
        if self._t2i_cache is not None and self._t2i_cache[0] == key:
            return self._t2i_cache[1]
        p = self.pipelines()
        self._check_prompt(caption)
        nw, nh = self.native_size(width, height)
        pipe = p.ready(p.text2img)
        out = pipe(prompt=caption, height=nh, width=nw, num_inference_steps=c.steps,
                   guidance_scale=c.guidance, negative_prompt=c.negative_prompt,
                   generator=self._generator(_SALT_TEXT), output_type="np").images[0]
        out = _to_float(_resize(_to_uint8(out), width, height))
        self._t2i_cache = (key, out)
        return out

    def restore(self, image: np.ndarray, prompt: str, steps: int, guidance: float, strength: float,
                salt: int) -> np.ndarray:
        """One restoration pass from ``image`` (float (H, W, 3) in [0, 1]); same size out, colour-fixed
        against what the pass was conditioned on (DiffBIR: SwinIR's cleaned picture; else ``image``)."""
        c = self.config
        p = self.pipelines()
        self._check_prompt(prompt)
        h, w = image.shape[:2]
        pil = Image.fromarray(_to_uint8(image))
        common = dict(prompt=prompt, guidance_scale=guidance, negative_prompt=c.negative_prompt,
                      generator=self._generator(salt), output_type="np")
        condition = _to_float(np.asarray(pil))
        if self.mode == "diffbir":
            result = p.ready(p.diffbir)(image=condition, num_inference_steps=steps, **common)
            out, condition = result.images[0], result.conditions[0]
        elif self.mode == "controlnet":
            s = c.control_strength
            out = p.ready(p.control)(image=pil, control_image=pil, strength=s, height=h, width=w,
                                     num_inference_steps=math.ceil(steps / s), **common).images[0]
        elif self.mode == "upscale":
            f = p.upscale_factor
            small = pil.resize((w // f, h // f), Image.Resampling.LANCZOS)
            out = p.ready(p.upscale)(image=small, num_inference_steps=steps, noise_level=c.noise_level,
                                     **common).images[0]
        else:
            out = p.ready(p.img2img)(image=pil, strength=strength, num_inference_steps=math.ceil(steps / strength),
                                     **common).images[0]
        out = np.asarray(out, dtype=np.float32)
        if out.shape[:2] != (h, w):  # an upscaler whose factor does not divide exactly
            out = _to_float(_resize(_to_uint8(out), w, h))
        if c.color_fix:  # per pass, as DiffBIR's sampler does in MISC's sr_pipe
            return wavelet_color_fix(out, condition)
        return np.clip(out, 0.0, 1.0)

    # --- stages

    def render(self, stage: StageInput) -> np.ndarray:
        """Reconstruction of one stage as uint8 (height, width, 3)."""
        return self.render_timed(stage)[0]

    def render_timed(self, stage: StageInput) -> tuple[np.ndarray, StageTiming]:
        """The reconstruction and the time each of its passes took (returned: decoders are shared)."""
        with self._lock:
            timing = StageTiming(stage.name)
            self._local.stage, self._local.timing = stage, timing
            try:
                return self._render(stage, timing), timing
            finally:
                self._local.stage = self._local.timing = None

    def _render(self, stage: StageInput, timing: StageTiming) -> np.ndarray:
        c = self.config
        t0 = time.perf_counter()
        sem = stage.semantics
        if not stage.has_pixels and sem is None:  # nothing known yet: a neutral canvas
            timing.seconds = time.perf_counter() - t0
            return np.full((stage.height, stage.width, 3), 128, dtype=np.uint8)
        w, h = self.working_size(stage.width, stage.height)
        caption = sem.caption if sem is not None else ""
        if stage.has_pixels:
            current = _to_float(self._timed("reference", decode_pixels, stage.pixel_levels, w, h))
        else:
            current = self._timed("text-to-image", self.text_to_image, caption, w, h)
        if sem is not None and stage.masks is not None:
            for j, (obj, mask) in enumerate(zip(sem.objects, stage.masks, strict=False)):
                if not mask.any():
                    continue
                prompt = obj.detail or obj.name
                gen = self._timed(f"object {j + 1}", self.restore, current, prompt, c.object_steps,
                                  c.object_guidance, c.object_strength, _SALT_OBJECT + j)
                current = composite(current, gen, mask)
        if stage.has_pixels:
            current = self._timed("global", self.restore, current, caption, c.steps, c.guidance, c.strength,
                                  _SALT_GLOBAL)
        out = _resize(_to_uint8(current), stage.width, stage.height)
        timing.seconds = time.perf_counter() - t0
        return out


def _env_set(role: str) -> bool:
    from miscnet.core.pretrained import configured

    return configured(role)[0] is not None
