"""``miscnet profile --decoder classical|diffusion -o FILE.json``: measure a decoder's cost per stage kind.

Wired into the CLI by ``register(subparsers)`` (src/miscnet/cli/main.py). Times the decoder on the stages of
a bundled sample encoded at each ``--sizes`` and writes a cost profile (miscnet.experiments.profiles) that
``load_profile(FILE)`` reads. ``--random-weights`` gives the diffusion decoder full-size Stable Diffusion
2.1-base architectures with random weights, so it can be profiled without downloading a model. Nothing here
imports torch at import time.
"""

from __future__ import annotations

import argparse
import json
import sys

from miscnet.cli import models as cli_models
from miscnet.cli.argtypes import float_in as _float_in
from miscnet.cli.argtypes import non_negative_int as _non_negative_int
from miscnet.cli.argtypes import positive_int as _positive_int

DEFAULT_SIZES = "256,512,1024"


def _size(item: str) -> tuple[int, int]:
    w, sep, h = item.lower().partition("x")
    try:
        width = int(w)
        height = int(h) if sep else width
    except ValueError:
        raise argparse.ArgumentTypeError(f"a size is N or WxH, not {item!r}") from None
    if width < 1 or height < 1:
        raise argparse.ArgumentTypeError(f"sizes must be positive: {item!r}")
    return width, height


def size_list(text: str) -> list[tuple[int, int]]:
    """'256,512,1024' or '640x480,1024' -> [(w, h), ...] (N alone is N x N)."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise argparse.ArgumentTypeError("give at least one size")
    return [_size(t) for t in items]


def int_list(text: str) -> list[int]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise argparse.ArgumentTypeError("give at least one batch size")
    return [_positive_int(t) for t in items]


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "profile", help="measure a decoder's time and memory per stage kind on this machine; write a cost profile",
        description="Time the decoder on the progressive stages (semantic, map, pixel.0, pixel.1) of a bundled "
                    "sample encoded at each size (median of --repeats) and write a cost profile (JSON) for "
                    "simulators; committed profiles are in experiments/profiles/ (see its README).")
    p.add_argument("-o", "--output", required=True, metavar="FILE.json", help="the profile to write")
    p.add_argument("--device", default="auto",
                   help="where the decoder runs: auto (CUDA when present, for the diffusion decoder), cpu, cuda "
                   "or cuda:N (the classical decoder runs on the CPU)")
    p.add_argument("--sizes", type=size_list, default=size_list(DEFAULT_SIZES), metavar="N,N|WxH,...",
                   help=f"image sizes to measure (default {DEFAULT_SIZES}; N alone is N x N)")
    p.add_argument("--batches", type=int_list, default=[1], metavar="B,B,...",
                   help="batch sizes: stages of one kind per call (default 1)")
    p.add_argument("--repeats", type=_positive_int, default=3, metavar="N",
                   help="timed runs per point; the median is kept (default 3)")
    p.add_argument("--warmup", type=_non_negative_int, default=1, metavar="N",
                   help="untimed runs over every stage first (default 1)")
    p.add_argument("--sample", default="astronaut", metavar="NAME", help="bundled sample to encode (default "
                   "astronaut: three objects, as MISC's encoder gives)")
    g = p.add_argument_group("random weights (diffusion decoder)")
    g.add_argument("--random-weights", action="store_true",
                   help="build SD 2.1-base-size UNet, VAE, text encoder and ControlNet with random weights in a "
                   "temporary folder and load them through the decoder (the cost of a pass does not depend "
                   "on the weights' values)")
    g.add_argument("--width-scale", type=_float_in(0.0, 1.0, lo_open=True), default=1.0, metavar="X",
                   help="narrow every channel width of the random-weight models by X (smoke tests; the profile's "
                   "source says it is not the full-size cost)")
    g.add_argument("--work-dir", metavar="DIR", help="where the random-weight models are written (default: the "
                   "system's temporary folder; full size takes about 3.5 GB)")
    p.add_argument("--json", action="store_true", help="print the profile as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    cli_models.add_decoder_options(p)  # --decoder and the diffusion decoder's settings (--steps, ...)
    p.set_defaults(func=cmd_profile)
    return p


def cmd_profile(args: argparse.Namespace) -> int:
    import dataclasses
    import tempfile

    from miscnet.core.errors import MiscError
    from miscnet.core.image_io import atomic_write_bytes
    from miscnet.experiments.profiles import measure_profile, random_weights_description

    if args.decoder == "classical" and args.device not in ("auto", "cpu"):
        raise MiscError(f"the classical decoder runs on the CPU; drop --device {args.device}")
    if args.random_weights and args.decoder != "diffusion":
        raise MiscError("--random-weights is for --decoder diffusion")
    if args.width_scale != 1.0 and not args.random_weights:
        raise MiscError("--width-scale needs --random-weights")
    if args.random_weights and (args.diffusion_model or args.controlnet_model):
        raise MiscError("--random-weights builds its own models: drop --diffusion-model / --controlnet-model")

    def progress(msg: str) -> None:
        if not args.quiet:
            print(f"profile: {msg}", file=sys.stderr, flush=True)

    config = cli_models.decoder_config(args)
    with tempfile.TemporaryDirectory(prefix="miscnet-profile-", dir=args.work_dir) as tmp:
        notes = []
        if args.decoder == "classical":
            device = "cpu"
        else:
            from miscnet.core.pretrained import pick_device

            device, _ = pick_device(args.device)
            diffusion = dataclasses.replace(config.diffusion, device=device)
            if args.random_weights:
                from miscnet.experiments.profiles import write_random_weight_models

                progress(f"writing random-weight models ({random_weights_description(args.width_scale)}) in {tmp}")
                paths = write_random_weight_models(tmp, scale=args.width_scale)
                diffusion = dataclasses.replace(diffusion, model=str(paths["diffusion"]),
                                                controlnet=str(paths["controlnet"]))
                notes.append(random_weights_description(args.width_scale))
            config = dataclasses.replace(config, diffusion=diffusion)
        from miscnet.receiver.decoders import make_decoder

        decoder = make_decoder(config)
        if args.decoder == "diffusion":
            d = config.diffusion
            sizes = "; ".join(f"{w}x{h} -> {'x'.join(map(str, decoder.working_size(w, h)))}" for w, h in args.sizes)
            notes.append(f"restoration {decoder.mode}, {d.steps} global steps at guidance {d.guidance:g}, "
                         f"{d.object_steps} steps per object at {d.object_guidance:g}, seed {d.seed}; working sizes "
                         f"{sizes}")
        notes.append(f"sample {args.sample}, repeats {args.repeats}, warm-up {args.warmup}")
        try:
            profile = measure_profile(decoder, args.decoder, device, args.sizes, args.batches, args.repeats,
                                      sample=args.sample, warmup=args.warmup, notes="; ".join(notes),
                                      progress=progress)
        finally:
            if args.decoder == "diffusion":
                from miscnet.receiver.diffusion import clear_cache

                del decoder
                clear_cache()  # the models' memory goes back before the temporary folder does
    if args.random_weights and args.width_scale == 1.0:
        profile = dataclasses.replace(profile, source=f"{profile.source} ({random_weights_description()})")
    elif args.random_weights:
        profile = dataclasses.replace(profile, source=f"{profile.source} (random weights, channel widths x "
                                      f"{args.width_scale:g}: NOT the full-size cost)")
    text = profile.to_json()
    atomic_write_bytes(args.output, text.encode("utf-8"))
    if args.json:
        print(json.dumps(json.loads(text)))  # what the file holds
    else:
        print(f"{'kind':<10}{'pixels':>10}{'batch':>7}{'seconds':>12}{'peak MiB':>11}")
        for kind, points in profile.points.items():
            for pixels, batch, seconds, peak in points:
                print(f"{kind:<10}{pixels:>10}{batch:>7}{seconds:>12.5g}{peak:>11.1f}")
        print(f"wrote {args.output}")
    return 0
