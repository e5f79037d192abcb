"""Pixel layer: bytes each thumbnail codec needs to match MISC's block mode, per sample photo.

``python -m miscnet.experiments.bench_pixel [--json] [--levels N] [--codecs webp,avif,jpeg]``

For each photo, MISC's ``pixel`` mode (32 blocks on the short side, aspect kept, step 8, RGB: 5 bits
per value, 3 values per block, bit-packed) sets the reference: its real payload size and its PSNR at
full size. To be fair to MISC the PSNR is the best of three up-samplers of the block means: nearest
(blocks, as MISC shows them), bicubic (Pillow's default resize, which the notebook calls) and ours
(LANCZOS). Then, for each thumbnail codec, the fewest payload bytes that reach at least that PSNR.
The target is a mean best ratio (codec bytes / block bytes) of at most 0.20.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np
from PIL import Image

from miscnet.core.pixel import (
    auto_codec_names,
    decode_pixels,
    decode_raster,
    encode_pixels,
    payload_bytes,
    thumbnail_file,
)
from miscnet.experiments.metrics import psnr
from miscnet.sender.rate_control import misc_block_settings, settings_for_psnr

TARGET_RATIO = 0.20
SAMPLES = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field")


def load_sample(name: str) -> np.ndarray:
    """A scikit-image sample photo as uint8 RGB."""
    import skimage
    import skimage.data
    import skimage.io

    if name == "hubble_deep_field":
        image = skimage.io.imread(os.path.join(skimage.data_dir, "hubble_deep_field.jpg"))
    else:
        image = getattr(skimage.data, name)()
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    return np.ascontiguousarray(image[..., :3].astype(np.uint8))


def _upsample(raster: np.ndarray, width: int, height: int, resample: int) -> np.ndarray:
    small = Image.fromarray(np.clip(np.rint(raster), 0, 255).astype(np.uint8))
    return np.asarray(small.resize((width, height), resample))


def _median_ms(fn, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000.0 * statistics.median(times)


def bench_image(name: str, image: np.ndarray, codecs: tuple[str, ...], levels: int) -> dict:
    height, width = image.shape[:2]
    block = misc_block_settings(width, height)
    block_levels = encode_pixels(image, block)
    raster = decode_raster(block_levels)
    block_psnr = {
        "nearest": psnr(_upsample(raster, width, height, Image.Resampling.NEAREST), image),
        "bicubic": psnr(_upsample(raster, width, height, Image.Resampling.BICUBIC), image),
        "ours": psnr(decode_pixels(block_levels, width, height), image),
    }
    target = max(block_psnr.values())
    block_bytes = payload_bytes(block_levels)
    row = {
        "image": name,
        "width": width,
        "height": height,
        "block_raster": [block.width, block.height],
        "block_bytes": block_bytes,
        "block_psnr": {k: round(v, 3) for k, v in block_psnr.items()},
        "target_psnr": round(target, 3),
        "levels": levels,
        "codecs": {},
    }
    for codec in codecs:
        t0 = time.perf_counter()
        found = settings_for_psnr(image, codec, levels, target)
        search_s = time.perf_counter() - t0
        if found is None:
            row["codecs"][codec] = {"bytes": None, "ratio": None, "search_s": round(search_s, 2)}
            continue
        settings, coded, reached = found
        n = payload_bytes(coded)
        row["codecs"][codec] = {
            "bytes": n,
            "file_bytes": sum(len(thumbnail_file(lv)) for lv in coded),
            "ratio": round(n / block_bytes, 4),
            "psnr": round(reached, 3),
            "raster": [settings.width, settings.height],
            "quality": settings.quality,
            "level_bytes": [len(lv.payload) for lv in coded],
            "search_s": round(search_s, 2),
            "_settings": settings,
            "_coded": coded,
        }
    done = {c: r for c, r in row["codecs"].items() if r["bytes"] is not None}
    if done:
        best = min(done, key=lambda c: done[c]["bytes"])
        settings, coded = done[best]["_settings"], done[best]["_coded"]
        row["best_codec"] = best
        row["best_ratio"] = done[best]["ratio"]
        row["encode_ms"] = round(_median_ms(lambda: encode_pixels(image, settings)), 1)
        row["decode_ms"] = round(_median_ms(lambda: decode_pixels(coded, width, height)), 1)
    else:
        row["best_codec"] = row["best_ratio"] = None
    for r in row["codecs"].values():
        r.pop("_settings", None)
        r.pop("_coded", None)
    return row


def _print_row(row: dict, codecs: tuple[str, ...]) -> None:
    p = row["block_psnr"]
    print(
        f"{row['image']} {row['width']}x{row['height']}: "
        f"block {row['block_raster'][0]}x{row['block_raster'][1]} "
        f"{row['block_bytes']} B, PSNR nearest {p['nearest']:.2f} / bicubic {p['bicubic']:.2f} / "
        f"ours {p['ours']:.2f} -> target {row['target_psnr']:.2f} dB"
    )
    for codec in codecs:
        r = row["codecs"][codec]
        if r["bytes"] is None:
            print(f"  {codec:5s} never reaches the target")
            continue
        print(
            f"  {codec:5s} {r['bytes']:6d} B  ratio {r['ratio']:.3f}  (as files {r['file_bytes']} B; "
            f"{r['raster'][0]}x{r['raster'][1]} "
            f"q{r['quality']}, levels {r['level_bytes']}, {r['psnr']:.2f} dB, search {r['search_s']:.1f} s)"
        )
    if row["best_codec"]:
        print(
            f"  best {row['best_codec']} ratio {row['best_ratio']:.3f}; "
            f"encode {row['encode_ms']:.1f} ms, decode {row['decode_ms']:.1f} ms"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="one JSON object per image, then a summary")
    parser.add_argument("--levels", type=int, default=1, help="levels for the thumbnail codecs (default 1)")
    thumbnail_codecs = auto_codec_names()
    parser.add_argument("--codecs", default=",".join(thumbnail_codecs), help="comma-separated codecs")
    parser.add_argument("--images", default=",".join(SAMPLES), help="comma-separated sample names")
    args = parser.parse_args(argv)
    codecs = tuple(c for c in args.codecs.split(",") if c)
    if any(c not in thumbnail_codecs for c in codecs):
        parser.error(f"codecs must be among {', '.join(thumbnail_codecs)}")
    names = tuple(n for n in args.images.split(",") if n)
    if any(n not in SAMPLES for n in names):
        parser.error(f"images must be among {', '.join(SAMPLES)}")

    rows = []
    for name in names:
        row = bench_image(name, load_sample(name), codecs, args.levels)
        rows.append(row)
        if args.json:
            print(json.dumps(row), flush=True)
        else:
            _print_row(row, codecs)
    ratios = [r["best_ratio"] for r in rows if r["best_ratio"] is not None]
    mean = sum(ratios) / len(ratios) if len(ratios) == len(rows) else None
    verdict = "PASS" if mean is not None and mean <= TARGET_RATIO else "FAIL"
    per_codec = {}
    for codec in codecs:
        rs = [r["codecs"][codec]["ratio"] for r in rows]
        per_codec[codec] = round(sum(rs) / len(rs), 4) if all(x is not None for x in rs) else None
    summary = {"summary": True, "mean_best_ratio": None if mean is None else round(mean, 4),
               "target": TARGET_RATIO, "verdict": verdict, "mean_ratio_per_codec": per_codec}
    if args.json:
        print(json.dumps(summary))
    else:
        codec_means = ", ".join(f"{c} {v:.3f}" if v is not None else f"{c} n/a" for c, v in per_codec.items())
        shown = "n/a" if mean is None else f"{mean:.3f}"
        print(f"mean best ratio {shown} (per codec: {codec_means}); target <= {TARGET_RATIO:.2f}: {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
