"""Command-line pieces for the real MISC models, for src/miscnet/cli/main.py to wire in.

* ``register(subparsers)``: the ``models`` command (list backends and their weights; ``models tiny DIR``).
* ``add_semantics_backend_options(group)`` + ``semantics_for(args, image, image_path)``: where semantics
  come from (``--semantics-backend sidecar|openai|hf``; sidecar, the default, behaves as before).
* ``add_map_model_options(group)`` + ``map_options(args)``: ``--clip-model``, ``--map-threshold``; the
  dict goes to ``EncoderConfig(map_options=...)``.
* ``add_decoder_options(parser)`` + ``make_decoder(args)``: ``--decoder classical|diffusion`` and the
  diffusion decoder's settings.

Nothing here imports torch, diffusers or transformers at import time.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from miscnet.cli.argtypes import float_in as _float_in
from miscnet.cli.argtypes import non_negative_int as _non_negative_int
from miscnet.cli.argtypes import positive_float as _positive_float
from miscnet.cli.argtypes import positive_int as _positive_int
from miscnet.core.errors import MiscError

MAP_CHOICES = ("none", "boxes", "clip")
SEMANTICS_BACKENDS = ("sidecar", "openai", "hf")
DECODERS = ("classical", "diffusion")


def _has_option(container, flag: str) -> bool:
    """Whether a parser (or the parser behind an argument group) already defines flag."""
    return flag in getattr(container, "_option_string_actions", {})


def _add_model_device(group) -> None:
    if not _has_option(group, "--model-device"):
        group.add_argument("--model-device", default="auto", metavar="DEVICE",
                           help="device for the encoder's models (clip map, hf semantics): auto, cpu, cuda")


# ============================================================================ models command


def register(subparsers) -> argparse.ArgumentParser:
    """Add ``models`` (and ``models tiny DIR``) to the CLI's subparsers; return its parser."""
    p = subparsers.add_parser(
        "models", help="list the model backends and whether their weights are here; 'models tiny DIR' writes "
        "tiny random-weight models for smoke tests",
        description="List each backend, the model it is configured with and whether its weights are present "
        "locally (nothing is downloaded). See experiments/MODELS.md.")
    p.add_argument("--json", action="store_true", help="print a JSON report")
    g = p.add_argument_group("models (default: environment, then $MISCNET_MODELS_DIR/<role>)")
    g.add_argument("--diffusion-model", metavar="PATH|ID")
    g.add_argument("--controlnet-model", metavar="PATH|ID")
    g.add_argument("--upscaler-model", metavar="PATH|ID")
    g.add_argument("--clip-model", metavar="PATH|ID")
    g.add_argument("--vlm-model", metavar="PATH|ID")
    g.add_argument("--lmm-model", metavar="NAME")
    g.add_argument("--lmm-endpoint", metavar="URL")
    sub = p.add_subparsers(dest="models_action", metavar="ACTION")
    t = sub.add_parser("tiny", help="write tiny random-weight models (diffusion, controlnet, upscaler, clip, vlm)")
    t.add_argument("dest", metavar="DIR")
    t.add_argument("--force", action="store_true", help="replace tiny models already in DIR")
    p.set_defaults(func=cmd_models, models_action=None)
    return p


def cmd_models(args: argparse.Namespace) -> int:
    from miscnet.experiments.models import format_rows, list_models, models_report, write_tiny_models

    if args.models_action == "tiny":
        written = write_tiny_models(args.dest, force=args.force)
        if args.json:
            print(json.dumps({"dest": str(Path(args.dest)), "models": {k: str(v) for k, v in written.items()}}))
        else:
            for role, path in written.items():
                print(f"{role:<11}{path}")
            print("tiny random-weight models (outputs are noise); use them with: "
                  f"export MISCNET_MODELS_DIR={args.dest}")
        return 0
    values = {"diffusion": args.diffusion_model, "controlnet": args.controlnet_model,
              "upscaler": args.upscaler_model, "clip": args.clip_model, "vlm": args.vlm_model}
    rows = list_models(values, lmm_model=args.lmm_model, lmm_endpoint=args.lmm_endpoint)
    report = models_report(rows)
    if args.json:
        print(json.dumps(report))
    else:
        print(format_rows(rows))
        print(f"Hugging Face cache: {report['hf_cache']}"
              + (f"; MISCNET_MODELS_DIR={report['models_dir']}" if report["models_dir"] else ""))
    return 0


# ============================================================================ semantics


def add_semantics_backend_options(group) -> None:
    """--semantics-backend and the openai / hf backends' settings (on an argument group or parser)."""
    group.add_argument("--semantics-backend", choices=SEMANTICS_BACKENDS, default="sidecar",
                       help="where semantics come from: sidecar (JSON / MISC CSV, default), openai (an "
                       "OpenAI-compatible chat endpoint) or hf (a local vision-language model)")
    group.add_argument("--lmm-model", metavar="NAME", help="openai: model name (default $MISCNET_LMM_MODEL)")
    group.add_argument("--lmm-endpoint", metavar="URL",
                       help="openai: base URL, e.g. http://localhost:8000/v1 (default $OPENAI_BASE_URL, "
                       "else https://api.openai.com/v1)")
    group.add_argument("--lmm-api-key", metavar="KEY",
                       help="openai: API key (default $OPENAI_API_KEY; prefer the variable: options show in ps)")
    group.add_argument("--lmm-timeout", type=_positive_float, default=120.0, metavar="SECONDS",
                       help="openai: seconds per request (default 120)")
    group.add_argument("--lmm-retries", type=_non_negative_int, default=3, metavar="N",
                       help="openai: retries on timeouts, 429 and 5xx, with back-off (default 3)")
    group.add_argument("--lmm-max-tokens", type=_positive_int, default=600, metavar="N",
                       help="openai / hf: answer length limit in tokens (default 600)")
    group.add_argument("--vlm-model", metavar="PATH|ID", help="hf: model folder or cached id (default "
                       "$MISCNET_VLM_MODEL, else $MISCNET_MODELS_DIR/vlm)")
    group.add_argument("--save-semantics", metavar="FILE",
                       help="openai / hf: also write the semantics as a JSON sidecar ('{stem}' is replaced by "
                       "the image's name), to reuse with --semantics")
    _add_model_device(group)


def _sidecar_for(image_path) -> tuple[Path, Path | None]:
    """(image path, sidecar or None) the way the CLI always resolved them, bundled samples included."""
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


def semantics_for(args: argparse.Namespace, image_array, image_path) -> tuple:
    """(Semantics, warnings) for one image with the chosen backend.

    ``image_path`` is the IMAGE argument (a path or sample:NAME) or the resolved path. The sidecar backend
    (the default) resolves ``--semantics`` or the sidecar beside the image exactly as before; openai and hf
    ask their model about ``image_array``.
    """
    from miscnet.core.semantics import load_semantics

    backend = getattr(args, "semantics_backend", None) or "sidecar"
    explicit = getattr(args, "semantics", None)
    if backend == "sidecar":
        path, sidecar = _sidecar_for(image_path)
        source = Path(explicit) if explicit else sidecar
        if source is None:
            raise MiscError(
                f"no semantics for {image_path}: give --semantics FILE (JSON sidecar or MISC CSV) "
                f"or put {Path(path).with_suffix('.json').name} beside the image"
                f", or use --semantics-backend openai|hf")
        return load_semantics(source, image_name=Path(path).name)
    if explicit:
        raise MiscError(f"--semantics reads a sidecar; it cannot be combined with --semantics-backend {backend} "
                        "(use --save-semantics to keep what the model says)")
    from miscnet.sender.semantic_backends import describe_image, semantics_backend

    max_tokens = getattr(args, "lmm_max_tokens", 600)
    if backend == "openai":
        be = semantics_backend("openai", model=getattr(args, "lmm_model", None),
                               base_url=getattr(args, "lmm_endpoint", None),
                               api_key=getattr(args, "lmm_api_key", None),
                               timeout=getattr(args, "lmm_timeout", 120.0), retries=getattr(args, "lmm_retries", 3),
                               max_tokens=max_tokens)
    else:
        be = semantics_backend("hf", model=getattr(args, "vlm_model", None), max_new_tokens=max_tokens,
                               device=getattr(args, "model_device", None) or "auto")
    semantics, warnings = describe_image(be, image_array)
    save = getattr(args, "save_semantics", None)
    if save:
        from miscnet.core.image_io import atomic_write_bytes
        from miscnet.core.semantics import semantics_to_json

        stem = Path(str(image_path).split(":", 1)[-1] if str(image_path).startswith("sample:") else image_path).stem
        target = save.replace("{stem}", stem)
        atomic_write_bytes(target, (json.dumps(semantics_to_json(semantics), indent=1) + "\n").encode("utf-8"))
    return semantics, warnings


# ============================================================================ map


def add_map_model_options(group) -> None:
    """--clip-model and --map-threshold (the clip map backend's settings)."""
    group.add_argument("--clip-model", metavar="PATH|ID", help="clip map: CLIP model folder or cached id "
                       "(default $MISCNET_CLIP_MODEL, else $MISCNET_MODELS_DIR/clip)")
    group.add_argument("--map-threshold", type=_float_in(0.0, 1.0), default=0.35, metavar="T",
                       help="clip map: a cell is in an object's mask when its normalised score exceeds T "
                       "(default 0.35, MISC's)")
    _add_model_device(group)


def map_options(args: argparse.Namespace) -> dict:
    """The options for EncoderConfig(map_options=...): empty unless --map clip."""
    if getattr(args, "map_backend", None) != "clip":
        return {}
    return {"model": getattr(args, "clip_model", None), "threshold": getattr(args, "map_threshold", 0.35),
            "device": getattr(args, "model_device", None) or "auto"}


# ============================================================================ decoder


def add_decoder_options(parser: argparse.ArgumentParser) -> None:
    """--decoder and the diffusion decoder's settings (skips --seed / --device if the parser has them)."""
    g = parser.add_argument_group("decoder")
    g.add_argument("--decoder", choices=DECODERS, default="classical",
                   help="classical (no weights, default) or diffusion (MISC's decoder on diffusers)")
    g.add_argument("--diffusion-model", metavar="PATH|ID", help="text-to-image pipeline folder or cached id "
                   "(default $MISCNET_DIFFUSION_MODEL, else $MISCNET_MODELS_DIR/diffusion)")
    g.add_argument("--controlnet-model", metavar="PATH|ID",
                   help="ControlNet for DiffBIR-style restoration (default $MISCNET_CONTROLNET_MODEL)")
    g.add_argument("--upscaler-model", metavar="PATH|ID",
                   help="upscaler pipeline for restoration (default $MISCNET_UPSCALER_MODEL)")
    g.add_argument("--restore", choices=("auto", "controlnet", "img2img", "upscale"), default="auto",
                   help="how pixel stages are restored (auto: controlnet if configured, else upscale if "
                   "configured, else img2img)")
    if not _has_option(parser, "--device"):
        g.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    g.add_argument("--steps", type=_positive_int, default=40, help="global pass / text-to-image steps (default 40)")
    g.add_argument("--object-steps", type=_positive_int, default=3, help="steps per object pass (default 3)")
    g.add_argument("--guidance", type=_float_in(0.0, 50.0), default=7.0, help="global guidance (default 7)")
    g.add_argument("--object-guidance", type=_float_in(0.0, 50.0), default=3.5,
                   help="object pass guidance (default 3.5)")
    g.add_argument("--strength", type=_float_in(0.0, 1.0, lo_open=True), default=0.6,
                   help="img2img restoration strength of the global pass (default 0.6)")
    g.add_argument("--diffusion-size", type=_positive_int, metavar="PIXELS",
                   help="working long side (default min(1024, 2 x the model's native size))")
    g.add_argument("--negative-prompt", default="Blurry, Low Quality", help="(default 'Blurry, Low Quality')")
    g.add_argument("--no-color-fix", action="store_true", help="skip the wavelet colour fix")
    if not _has_option(parser, "--seed"):
        g.add_argument("--seed", type=int, default=0, help="diffusion noise seed (default 0)")
    g.add_argument("--cpu-offload", action="store_true",
                   help="keep models in CPU memory and move each to the GPU only while it runs (needs accelerate)")


def diffusion_config(args: argparse.Namespace):
    from miscnet.receiver.diffusion import DiffusionConfig

    return DiffusionConfig(
        model=args.diffusion_model, controlnet=args.controlnet_model, upscaler=args.upscaler_model,
        restore=args.restore, device=getattr(args, "device", "auto") or "auto", size=args.diffusion_size,
        steps=args.steps, guidance=args.guidance, object_steps=args.object_steps,
        object_guidance=args.object_guidance, negative_prompt=args.negative_prompt, strength=args.strength,
        seed=getattr(args, "seed", 0) or 0, cpu_offload=args.cpu_offload, color_fix=not args.no_color_fix)


def make_decoder(args: argparse.Namespace):
    """The decoder the options ask for: an object with ``render(stage) -> uint8 (H, W, 3)``."""
    if getattr(args, "decoder", "classical") == "classical":
        from miscnet.receiver.classical import ClassicalDecoder

        return ClassicalDecoder()
    from miscnet.receiver.diffusion import DiffusionDecoder

    return DiffusionDecoder(diffusion_config(args))


def env_summary() -> dict[str, str | None]:
    """The model-related environment variables, for reports."""
    keys = ("MISCNET_MODELS_DIR", "MISCNET_DIFFUSION_MODEL", "MISCNET_CONTROLNET_MODEL", "MISCNET_UPSCALER_MODEL",
            "MISCNET_CLIP_MODEL", "MISCNET_VLM_MODEL", "MISCNET_LMM_MODEL", "OPENAI_BASE_URL", "HF_HOME",
            "HF_HUB_CACHE", "HF_HUB_OFFLINE")
    return {k: os.environ.get(k) for k in keys}
