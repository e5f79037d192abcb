"""Command-line pieces for the real MISC models, for src/miscnet/cli/main.py to wire in.

* ``register(subparsers)``: the ``models`` command (list backends and their weights; ``models tiny DIR``).
* ``add_semantics_backend_options(group)`` + ``semantics_config(args)``: where semantics come from
  (``--semantics-backend sidecar|openai|hf``; sidecar, the default, behaves as before), as a SemanticsConfig
  for ``miscnet.sender.semantics_source.semantics_for``.
* ``add_map_model_options(group)`` + ``map_config(args)``: ``--map``'s model settings (``--clip-model``,
  ``--map-threshold``), as a MapConfig for ``EncoderConfig(map=...)``.
* ``add_decoder_options(parser)`` + ``decoder_config(args)``: ``--decoder classical|diffusion`` and the
  diffusion decoder's settings, as a DecoderConfig for ``miscnet.receiver.decoders.make_decoder``.

Every default (and the default a help text shows) is read from the config dataclasses in
``miscnet.core.config``. Nothing here imports torch, diffusers or transformers at import time.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from miscnet.cli.argtypes import float_in as _float_in
from miscnet.cli.argtypes import non_negative_int as _non_negative_int
from miscnet.cli.argtypes import positive_float as _positive_float
from miscnet.cli.argtypes import positive_int as _positive_int
from miscnet.core.config import (
    DECODERS,
    RESTORE_MODES,
    SEMANTICS_BACKENDS,
    DecoderConfig,
    DiffusionConfig,
    MapConfig,
    SemanticsConfig,
)

_SEM = SemanticsConfig()  # the defaults
_MAP = MapConfig()
_DEC = DecoderConfig()
_DIFF = DiffusionConfig()


def _has_option(container, flag: str) -> bool:
    """Whether a parser (or the parser behind an argument group) already defines flag."""
    return flag in getattr(container, "_option_string_actions", {})


def _add_model_device(group) -> None:
    if not _has_option(group, "--model-device"):
        group.add_argument("--model-device", default=_SEM.device, metavar="DEVICE",
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
    g.add_argument("--diffbir-model", metavar="PATH")
    g.add_argument("--controlnet-model", metavar="PATH|ID")
    g.add_argument("--upscaler-model", metavar="PATH|ID")
    g.add_argument("--clip-model", metavar="PATH|ID")
    g.add_argument("--vlm-model", metavar="PATH|ID")
    g.add_argument("--lmm-model", metavar="NAME")
    g.add_argument("--lmm-endpoint", metavar="URL")
    g.add_argument("--net-model", metavar="PATH")
    sub = p.add_subparsers(dest="models_action", metavar="ACTION")
    t = sub.add_parser("tiny", help="write tiny random-weight models (diffusion, controlnet, upscaler, clip, vlm, "
                       "diffbir)")
    t.add_argument("dest", metavar="DIR")
    t.add_argument("--force", action="store_true", help="replace tiny models already in DIR")
    p.set_defaults(func=cmd_models, models_action=None)
    return p


def cmd_models(args: argparse.Namespace) -> int:
    from miscnet.experiments.models import (  # the net pixel codec
        format_rows,
        list_models,
        models_report,
        net_row,
        write_tiny_models,
        write_tiny_net,
    )

    if args.models_action == "tiny":
        written = write_tiny_models(args.dest, force=args.force)
        written["net"] = write_tiny_net(Path(args.dest) / "net", force=args.force)  # the net pixel codec
        if args.json:
            print(json.dumps({"dest": str(Path(args.dest)), "models": {k: str(v) for k, v in written.items()}}))
        else:
            for role, path in written.items():
                print(f"{role:<11}{path}")
            print("tiny random-weight models (outputs are noise); use them with: "
                  f"export MISCNET_MODELS_DIR={args.dest}")
        return 0
    values = {"diffusion": args.diffusion_model, "diffbir": args.diffbir_model, "controlnet": args.controlnet_model,
              "upscaler": args.upscaler_model, "clip": args.clip_model, "vlm": args.vlm_model}
    rows = list_models(values, lmm_model=args.lmm_model, lmm_endpoint=args.lmm_endpoint)
    rows.append(net_row(args.net_model))
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
    """--strict, --semantics-backend and the openai / hf backends' settings (on an argument group or parser)."""
    group.add_argument("--strict", action="store_true", default=_SEM.strict,
                       help="treat MISC's text limits as errors, not warnings")
    group.add_argument("--semantics-backend", choices=SEMANTICS_BACKENDS, default=_SEM.backend,
                       help=f"where semantics come from: sidecar (JSON / MISC CSV), openai (an "
                       f"OpenAI-compatible chat endpoint) or hf (a local vision-language model); default "
                       f"{_SEM.backend}")
    group.add_argument("--lmm-model", metavar="NAME", default=_SEM.lmm_model,
                       help="openai: model name (default $MISCNET_LMM_MODEL)")
    group.add_argument("--lmm-endpoint", metavar="URL", default=_SEM.lmm_endpoint,
                       help="openai: base URL, e.g. http://localhost:8000/v1 (default $OPENAI_BASE_URL, "
                       "else https://api.openai.com/v1)")
    group.add_argument("--lmm-api-key", metavar="KEY", default=_SEM.lmm_api_key,
                       help="openai: API key (default $OPENAI_API_KEY; prefer the variable: options show in ps)")
    group.add_argument("--lmm-timeout", type=_positive_float, default=_SEM.lmm_timeout, metavar="SECONDS",
                       help=f"openai: seconds per request (default {_SEM.lmm_timeout:g})")
    group.add_argument("--lmm-retries", type=_non_negative_int, default=_SEM.lmm_retries, metavar="N",
                       help=f"openai: retries on timeouts, 429 and 5xx, with back-off (default {_SEM.lmm_retries})")
    group.add_argument("--lmm-max-tokens", type=_positive_int, default=_SEM.lmm_max_tokens, metavar="N",
                       help=f"openai / hf: answer length limit in tokens (default {_SEM.lmm_max_tokens})")
    group.add_argument("--vlm-model", metavar="PATH|ID", default=_SEM.vlm_model,
                       help="hf: model folder or cached id (default $MISCNET_VLM_MODEL, else "
                       "$MISCNET_MODELS_DIR/vlm)")
    group.add_argument("--save-semantics", metavar="FILE", default=_SEM.save,
                       help="openai / hf: also write the semantics as a JSON sidecar ('{stem}' is replaced by "
                       "the image's name), to reuse with --semantics")
    _add_model_device(group)


def semantics_config(args: argparse.Namespace) -> SemanticsConfig:
    """The SemanticsConfig the options ask for (``--semantics FILE`` is the sidecar backend's file)."""
    return SemanticsConfig(
        backend=args.semantics_backend, sidecar=args.semantics, lmm_model=args.lmm_model,
        lmm_endpoint=args.lmm_endpoint, lmm_api_key=args.lmm_api_key, lmm_timeout=args.lmm_timeout,
        lmm_retries=args.lmm_retries, lmm_max_tokens=args.lmm_max_tokens, vlm_model=args.vlm_model,
        device=args.model_device, strict=args.strict, save=args.save_semantics)


# ============================================================================ map


def add_map_model_options(group) -> None:
    """--clip-model and --map-threshold (the clip map backend's settings)."""
    group.add_argument("--clip-model", metavar="PATH|ID", default=_MAP.clip_model,
                       help="clip map: CLIP model folder or cached id (default $MISCNET_CLIP_MODEL, else "
                       "$MISCNET_MODELS_DIR/clip)")
    group.add_argument("--map-threshold", type=_float_in(0.0, 1.0), default=_MAP.threshold, metavar="T",
                       help="clip map: a cell is in an object's mask when its normalised score exceeds T "
                       f"(default {_MAP.threshold:g}, MISC's)")
    _add_model_device(group)


def map_config(args: argparse.Namespace) -> MapConfig:
    """The MapConfig the options ask for (--map, --grid, --clip-model, --map-threshold, --model-device);
    --map's default is None so the CLI can tell it from an explicit --map boxes."""
    return MapConfig(backend=args.map_backend or _MAP.backend, grid=args.grid, clip_model=args.clip_model,
                     threshold=args.map_threshold, device=args.model_device)


# ============================================================================ decoder


def add_decoder_options(parser: argparse.ArgumentParser) -> None:
    """--decoder and the diffusion decoder's settings (skips --seed / --device if the parser has them)."""
    g = parser.add_argument_group("decoder")
    g.add_argument("--decoder", choices=DECODERS, default=_DEC.name,
                   help=f"classical (no weights) or diffusion (MISC's decoder on diffusers); default {_DEC.name}")
    g.add_argument("--diffusion-model", metavar="PATH|ID", default=_DIFF.model,
                   help="text-to-image pipeline folder or cached id (default $MISCNET_DIFFUSION_MODEL, else "
                   "$MISCNET_MODELS_DIR/diffusion)")
    g.add_argument("--diffbir-model", metavar="PATH", default=_DIFF.diffbir,
                   help="DiffBIR v1 checkpoint (general_full_v1.ckpt, or a folder holding it): MISC's decoder "
                   "(default $MISCNET_DIFFBIR_MODEL, else $MISCNET_MODELS_DIR/diffbir)")
    g.add_argument("--controlnet-model", metavar="PATH|ID", default=_DIFF.controlnet,
                   help="diffusers ControlNet for DiffBIR-style restoration (default $MISCNET_CONTROLNET_MODEL)")
    g.add_argument("--upscaler-model", metavar="PATH|ID", default=_DIFF.upscaler,
                   help="upscaler pipeline for restoration (default $MISCNET_UPSCALER_MODEL)")
    g.add_argument("--restore", choices=RESTORE_MODES, default=_DIFF.restore,
                   help=f"how pixel stages are restored (auto: diffbir if configured, else controlnet, else "
                   f"upscale, else img2img; default {_DIFF.restore})")
    if not _has_option(parser, "--device"):
        g.add_argument("--device", default=_DIFF.device,
                       help=f"auto (CUDA when present), cpu, cuda or cuda:N (default {_DIFF.device})")
    g.add_argument("--steps", type=_positive_int, default=_DIFF.steps,
                   help=f"global pass / text-to-image steps (default {_DIFF.steps})")
    g.add_argument("--object-steps", type=_positive_int, default=_DIFF.object_steps,
                   help=f"steps per object pass (default {_DIFF.object_steps})")
    g.add_argument("--guidance", type=_float_in(0.0, 50.0), default=_DIFF.guidance,
                   help=f"global guidance (default {_DIFF.guidance:g})")
    g.add_argument("--object-guidance", type=_float_in(0.0, 50.0), default=_DIFF.object_guidance,
                   help=f"object pass guidance (default {_DIFF.object_guidance:g})")
    g.add_argument("--strength", type=_float_in(0.0, 1.0, lo_open=True), default=_DIFF.strength,
                   help=f"img2img restoration strength of the global pass (default {_DIFF.strength:g})")
    g.add_argument("--diffusion-size", type=_positive_int, metavar="PIXELS", default=_DIFF.size,
                   help="working long side (default min(1024, 2 x the model's native size))")
    g.add_argument("--negative-prompt", default=_DIFF.negative_prompt, help=f"(default {_DIFF.negative_prompt!r})")
    g.add_argument("--no-color-fix", dest="color_fix", action="store_false", default=_DIFF.color_fix,
                   help="skip the wavelet colour fix")
    own_seed = not _has_option(parser, "--seed")
    if own_seed:
        g.add_argument("--seed", type=int, default=_DIFF.seed, help=f"diffusion noise seed (default {_DIFF.seed})")
    g.add_argument("--decoder-seed", type=int, metavar="N",
                   help="diffusion noise seed; default: --seed where --seed is the decoder's (decode, receiver), "
                   f"else {_DIFF.seed} (simulate, where --seed drives the link alone, as a scenario's "
                   "decoder.seed)")
    parser.set_defaults(seed_is_decoders=own_seed)
    g.add_argument("--cpu-offload", action="store_true", default=_DIFF.cpu_offload,
                   help="keep models in CPU memory and move each to the GPU only while it runs (needs accelerate)")


def decoder_seed(args: argparse.Namespace) -> int:
    """--decoder-seed; else --seed when the decoder options added it; else the config's default: a command
    whose --seed drives the link (simulate) does not change the decoder's noise with it."""
    if getattr(args, "decoder_seed", None) is not None:
        return args.decoder_seed
    if getattr(args, "seed_is_decoders", True):
        return args.seed
    return _DIFF.seed


def diffusion_config(args: argparse.Namespace) -> DiffusionConfig:
    """The DiffusionConfig the options ask for (a command's own --device is the decoder's too; its own --seed
    only where the decoder options did not find one already, see decoder_seed)."""
    return DiffusionConfig(
        model=args.diffusion_model, controlnet=args.controlnet_model, upscaler=args.upscaler_model,
        diffbir=args.diffbir_model,
        restore=args.restore, device=args.device, size=args.diffusion_size, steps=args.steps,
        guidance=args.guidance, object_steps=args.object_steps, object_guidance=args.object_guidance,
        negative_prompt=args.negative_prompt, strength=args.strength, seed=decoder_seed(args),
        cpu_offload=args.cpu_offload, color_fix=args.color_fix)


def decoder_config(args: argparse.Namespace) -> DecoderConfig:
    """The DecoderConfig the options ask for."""
    return DecoderConfig(name=args.decoder, diffusion=diffusion_config(args))
