"""GPU check: MISC's full decode (DiffBIR v1) on full-size random-weight architectures, per pass.

    python -m miscnet.experiments.gpu_check [--sizes 512 768 1024] [--json] [--work-dir DIR]
    python -m miscnet.experiments.gpu_check --tiny          # the same path at tiny sizes, on the CPU

What runs: a random-weight checkpoint in DiffBIR v1's own key layout at its real sizes (SD 2.1-base UNet,
its ControlNet, VAE, condition encoder, OpenCLIP ViT-H text tower, SwinIR; experiments/models.py
``DIFFBIR_FULL``) is written once to a temporary folder as safetensors and loaded through the decoder's
own path (``--restore diffbir``), in the dtype the decoder picks (bf16 where the GPU has it). Nothing is
downloaded. For each working size (long side) a square image with three boxed objects is encoded and
its semantic, map and first pixel stage are decoded with MISC's schedule (3 steps at guidance 3.5 per
object, 40 at 7 for the global pass; ``--steps`` / ``--object-steps`` change it). Every pass prints its
latency and the GPU's peak memory during it (``torch.cuda.max_memory_allocated``, reset before each
pass); a first decode at the smallest size, with one step per pass, warms the kernels up and is not
reported (on CUDA only). The cost of a pass does not depend on the weights' values; the token embedding has the tiny
tokenizer's rows instead of OpenCLIP's 49408 (about 0.1 GB less weight memory, no compute).

Without CUDA (and without ``--tiny``) it prints one line and exits with status 2: there is nothing to
measure. ``--tiny`` runs the same code on the CPU with the tiny sizes the tests use (no figure it prints
is a GPU figure).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

NOT_RUN = 2  # exit status without CUDA: nothing was measured


def _stage_inputs(side: int):
    """The semantic, map and first pixel stage of a side x side picture with three boxed objects."""
    from miscnet.core.config import EncoderConfig, MapConfig
    from miscnet.core.semantics import SemanticObject, Semantics
    from miscnet.receiver.stages import progressive_stages
    from miscnet.sender.encoder import encode_image

    yy, xx = np.mgrid[0:side, 0:side] / side
    rng = np.random.default_rng(0)
    image = np.stack([0.2 + 0.6 * xx, 0.3 + 0.4 * yy, 0.5 + 0.3 * xx * yy], -1) + rng.normal(0, 0.03, (side, side, 3))
    image = np.clip(image * 255, 0, 255).astype(np.uint8)
    sem = Semantics((SemanticObject("helmet", "A white astronaut helmet with reflections.", (0.25, 0.1, 0.75, 0.6)),
                     SemanticObject("hair", "Flowing blue hair with lighter blue highlights.", (0.1, 0.4, 0.9, 1.0)),
                     SemanticObject("paint", "Bright orange paint splatter effects.", (0.0, 0.0, 1.0, 0.3))),
                    "A portrait of a person in a white astronaut helmet, blue hair floating around the face, "
                    "orange paint splashes all around.")
    stages = progressive_stages(encode_image(image, sem, EncoderConfig(map=MapConfig("boxes"))).encoded)
    return [s for s in stages if s.name in ("semantic", "map", "pixel.0")]


def _write_checkpoint(folder: Path, tiny: bool) -> Path:
    import torch
    from safetensors.torch import save_file

    from miscnet.experiments.models import DIFFBIR_FULL, DIFFBIR_TINY, diffbir_state_dict, tiny_clip_tokenizer

    tok = tiny_clip_tokenizer(folder)
    tok.save_pretrained(str(folder / "tokenizer"))
    sd = diffbir_state_dict(DIFFBIR_TINY if tiny else DIFFBIR_FULL, len(tok))
    keep32 = ("betas", "alphas_cumprod", "scale_factor")  # the schedule stays exact; weights in half size
    sd = {k: (v if k in keep32 or not v.is_floating_point() else v.to(torch.bfloat16)).contiguous()
          for k, v in sd.items()}
    path = folder / "general_full_v1.safetensors"
    save_file(sd, str(path))
    return path


def run(sizes: list[int], *, tiny: bool, steps: int, object_steps: int, work_dir: str | None,
        say=print) -> dict:
    import torch

    from miscnet.core.pretrained import pick_device
    from miscnet.receiver.diffusion import DiffusionDecoder, clear_cache

    device = "cpu" if tiny else "cuda"
    dev, dtype = pick_device(device)
    cuda = dev.startswith("cuda")
    report = {"device": torch.cuda.get_device_name(0) if cuda else "cpu", "dtype": str(dtype).split(".")[-1],
              "tiny": tiny, "steps": steps, "object_steps": object_steps, "sizes": {}}
    with tempfile.TemporaryDirectory(dir=work_dir, prefix="gpu-check-") as tmp:
        t0 = time.perf_counter()
        checkpoint = _write_checkpoint(Path(tmp), tiny)
        say(f"random-weight DiffBIR v1 checkpoint ({'tiny' if tiny else 'full'} size): "
            f"{checkpoint.stat().st_size / 2**30:.2f} GiB written in {time.perf_counter() - t0:.1f} s")

        def decoder(size: int, n: int, m: int):
            return DiffusionDecoder(diffbir=str(checkpoint), restore="diffbir", device=device, size=size,
                                    steps=n, object_steps=m)

        t0 = time.perf_counter()
        warm = decoder(sizes[0], 1, 1)
        warm.pipelines()
        report["load_s"] = time.perf_counter() - t0
        say(f"loaded through the decoder in {report['load_s']:.1f} s on {report['device']} ({report['dtype']})")
        if cuda:  # warm-up: kernels, allocator; not reported
            for stage in _stage_inputs(sizes[0]):
                warm.render(stage)
        for size in sizes:
            dec = decoder(size, steps, object_steps)
            peaks: list[float] = []
            restore, t2i = dec.restore, dec.text_to_image

            def measured(fn, peaks=peaks):
                def call(*args):
                    if cuda:
                        torch.cuda.synchronize()
                        torch.cuda.reset_peak_memory_stats()
                    out = fn(*args)
                    if cuda:
                        torch.cuda.synchronize()
                        peaks.append(torch.cuda.max_memory_allocated() / 2**30)
                    return out
                return call

            dec.restore, dec.text_to_image = measured(restore), measured(t2i)
            rows = []
            for stage in _stage_inputs(size):
                _, timing = dec.render_timed(stage)
                for p in timing.passes:
                    peak = peaks.pop(0) if p.name.startswith(("object", "global", "text")) and peaks else None
                    rows.append({"stage": stage.name, "pass": p.name, "seconds": p.seconds, "peak_gib": peak})
            w, h = dec.working_size(size, size)
            report["sizes"][str(size)] = {"working": [w, h], "passes": rows}
            say(f"-- {size} px (working {w}x{h})")
            for r in rows:
                peak = f"{r['peak_gib']:7.2f} GiB" if r["peak_gib"] is not None else "          -"
                say(f"   {r['stage']:<8} {r['pass']:<14} {r['seconds']:8.3f} s  {peak}")
        clear_cache()
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m miscnet.experiments.gpu_check", description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=None, metavar="PIXELS",
                   help="working long sides (default 512 768 1024; --tiny: 64)")
    p.add_argument("--tiny", action="store_true", help="tiny architectures on the CPU (a smoke test of this script)")
    p.add_argument("--steps", type=int, default=40, help="global pass steps (default 40, MISC's)")
    p.add_argument("--object-steps", type=int, default=3, help="steps per object pass (default 3, MISC's)")
    p.add_argument("--work-dir", metavar="DIR",
                   help="where the random checkpoint is written (default: the system's temporary folder)")
    p.add_argument("--json", action="store_true", help="print the report as JSON at the end")
    args = p.parse_args(argv)
    try:
        import torch
    except ImportError:
        print("gpu_check needs the model packages: pip install 'miscnet[models]'", file=sys.stderr)
        return NOT_RUN
    if not args.tiny and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU here, nothing measured (run it on a CUDA machine, or --tiny for the CPU "
              "smoke test)", file=sys.stderr)
        return NOT_RUN
    from miscnet.core.errors import MiscError

    sizes = args.sizes or ([64] if args.tiny else [512, 768, 1024])
    try:
        report = run(sizes, tiny=args.tiny, steps=args.steps, object_steps=args.object_steps,
                     work_dir=args.work_dir, say=(lambda *a: None) if args.json else print)
    except MiscError as e:
        print(f"gpu_check: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
