"""Layers that cost nothing extra: container framing, the price of a second pixel level, encode speed.

``python -m miscnet.experiments.bench_levels [--json] [--quick]``

Three measurements, each with its target; the command exits 1 when one is missed:

* **Container**: the bundled samples encoded with their sidecars (semantic, map and pixel layers),
  ``--levels 1`` (three layers) and the default two levels: bytes of the file beyond the layer payloads, and
  the map layer's record head (codec, params, size) against its payload. Target: at most 24 bytes of
  framing for every three-layer file, and no map head larger than its payload.
* **Levels**: scikit-image photos that are not the bundled samples, each coded as a whole file (an empty
  semantic layer, no map) of at most 1000, 1500, 2500 and 4000 bytes with one pixel level and with two.
  Target: the mean PSNR of the two-level file at most 0.2 dB under the one-level file's.
* **Speed**: the 512 x 512 test photos, a cold default encode (auto codec, two levels) with the quick rate
  control and with the exhaustive one (every auto codec, every raster encoded for real), side by side.
  Targets: the quick PSNR at most 0.1 dB under the exhaustive one on average, and at most 0.5 s per image
  on average. The machine is shared with other work, so time is this process's CPU time (the encoders run
  one thread), which other load does not inflate as it does the wall clock; both are printed, with the
  ratio to the exhaustive search.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np

from miscnet.core import leb128
from miscnet.core.config import EncoderConfig, MapConfig
from miscnet.core.container import from_bytes
from miscnet.core.image_io import load_image
from miscnet.core.pixel import PixelLevel, decode_pixels, psnr
from miscnet.core.samples import SAMPLE_NAMES, sample_image_path, sample_sidecar_path
from miscnet.core.semantics import Semantics, load_semantics
from miscnet.experiments.bench_pixel import load_sample
from miscnet.sender.encoder import encode_image
from miscnet.sender.rate_control import clear_search_cache
from miscnet.v1 import bitstream_pb2 as pb

MAX_FRAMING = 24
MAX_LEVEL_COST_DB = 0.2
MAX_SPEED_LOSS_DB = 0.1
TARGET_SECONDS = 0.5
LEVEL_IMAGES = ("camera", "immunohistochemistry", "moon", "brick", "grass", "gravel", "coins")
SPEED_IMAGES = ("camera", "immunohistochemistry", "moon", "brick", "grass", "gravel")  # 512 x 512
BUDGETS = (1000, 1500, 2500, 4000)
EMPTY = Semantics(objects=(), caption="")


def _pixel_psnr(data: bytes, image: np.ndarray) -> float:
    encoded = from_bytes(data)
    levels = [ly for ly in encoded.layers if ly.kind == pb.LAYER_KIND_PIXEL]
    pixel = [PixelLevel(ly.level, ly.codec, ly.pixel, ly.payload) for ly in levels]
    return psnr(decode_pixels(pixel, encoded.width, encoded.height), image)


def container_rows() -> list[dict]:
    rows = []
    for name in SAMPLE_NAMES:
        image = load_image(sample_image_path(name))
        semantics, _ = load_semantics(sample_sidecar_path(name), sample_image_path(name).name)
        for levels in (1, 2):
            result = encode_image(image, semantics, EncoderConfig(levels=levels, map=MapConfig(backend="boxes")))
            encoded = result.encoded
            framing = len(result.data) - encoded.payload_bytes()
            map_layer = next((ly for ly in encoded.layers if ly.kind == pb.LAYER_KIND_MAP), None)
            map_head = None
            if map_layer is not None:  # head byte, grid, objects, size (PROTOCOL.md section 10)
                map_head = 1 + sum(len(leb128.encode(v)) for v in (map_layer.map.grid, map_layer.map.objects,
                                                                     len(map_layer.payload)))
            rows.append({"image": name, "layers": len(encoded.layers), "bytes": len(result.data),
                         "framing": framing, "map_head": map_head,
                         "map_payload": None if map_layer is None else len(map_layer.payload)})
    return rows


def level_rows(images, budgets) -> list[dict]:
    rows = []
    for name in images:
        image = load_sample(name)
        for budget in budgets:
            out = {"image": name, "budget": budget}
            for levels in (1, 2):
                clear_search_cache()
                config = EncoderConfig(levels=levels, budget_bytes=budget, map=MapConfig(backend="none"))
                result = encode_image(image, EMPTY, config)
                out[f"psnr_{levels}"] = _pixel_psnr(result.data, image)
                out[f"bytes_{levels}"] = len(result.data)
            pixel0 = next(ly for ly in from_bytes(result.data).layers if ly.kind == pb.LAYER_KIND_PIXEL)
            out["level0_bytes"] = len(pixel0.payload)
            out["cost_db"] = out["psnr_1"] - out["psnr_2"]
            rows.append(out)
    return rows


def speed_rows(images) -> list[dict]:
    rows = []
    for name in images:
        image = load_sample(name)
        out = {"image": name}
        for label, exhaustive in (("quick", False), ("exhaustive", True)):
            clear_search_cache()
            t0, c0 = time.perf_counter(), time.process_time()
            result = encode_image(image, EMPTY, EncoderConfig(map=MapConfig(backend="none")), exhaustive=exhaustive)
            out[f"{label}_cpu_s"] = time.process_time() - c0  # this process's CPU: what other load does not inflate
            out[f"{label}_s"] = time.perf_counter() - t0
            out[f"{label}_psnr"] = _pixel_psnr(result.data, image)
            out[f"{label}_settings"] = repr(result.pixel_settings)
        out["loss_db"] = out["exhaustive_psnr"] - out["quick_psnr"]
        rows.append(out)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", action="store_true", help="print the measurements as one JSON document")
    p.add_argument("--quick", action="store_true", help="three images and two budgets (a smoke run)")
    args = p.parse_args(argv)
    level_images = LEVEL_IMAGES[:3] if args.quick else LEVEL_IMAGES
    speed_images = SPEED_IMAGES[:2] if args.quick else SPEED_IMAGES
    budgets = BUDGETS[::3] if args.quick else BUDGETS

    container = container_rows()
    levels = level_rows(level_images, budgets)
    speed = speed_rows(speed_images)

    three = [r for r in container if r["layers"] == 3]
    worst_framing = max(r["framing"] for r in three)
    heads_ok = all(r["map_head"] is None or r["map_head"] <= r["map_payload"] for r in container)
    level_cost = statistics.mean(r["cost_db"] for r in levels)
    speed_loss = statistics.mean(r["loss_db"] for r in speed)
    quick_s = statistics.mean(r["quick_cpu_s"] for r in speed)
    exhaustive_s = statistics.mean(r["exhaustive_cpu_s"] for r in speed)
    quick_wall = statistics.mean(r["quick_s"] for r in speed)
    exhaustive_wall = statistics.mean(r["exhaustive_s"] for r in speed)
    ratio = quick_s / exhaustive_s
    targets = {
        "framing": worst_framing <= MAX_FRAMING and heads_ok,
        "level_cost": level_cost <= MAX_LEVEL_COST_DB,
        "speed_quality": speed_loss <= MAX_SPEED_LOSS_DB,
        "speed_time": quick_s <= TARGET_SECONDS,
    }
    summary = {"worst_three_layer_framing": worst_framing, "map_heads_within_payload": heads_ok,
               "mean_level_cost_db": level_cost, "mean_speed_loss_db": speed_loss, "quick_cpu_s": quick_s,
               "exhaustive_cpu_s": exhaustive_s, "quick_wall_s": quick_wall, "exhaustive_wall_s": exhaustive_wall,
               "time_ratio": ratio, "targets_met": targets}
    if args.json:
        print(json.dumps({"container": container, "levels": levels, "speed": speed, "summary": summary}, indent=1))
    else:
        print("container framing (bytes beyond the payloads)")
        for r in container:
            print(f"  {r['image']:<18} {r['layers']} layers  {r['bytes']:>5} B  framing {r['framing']:>3} B  "
                  f"map head {r['map_head']} B for a {r['map_payload']} B payload")
        print(f"  worst three-layer framing {worst_framing} B (target <= {MAX_FRAMING})")
        print("second pixel level: PSNR of one level minus two levels, whole files of equal budget")
        for r in levels:
            print(f"  {r['image']:<20} {r['budget']:>5} B  1 level {r['psnr_1']:6.2f} dB  2 levels "
                  f"{r['psnr_2']:6.2f} dB (level 0: {r['level0_bytes']} B)  cost {r['cost_db']:+.2f} dB")
        print(f"  mean cost {level_cost:+.3f} dB (target <= {MAX_LEVEL_COST_DB})")
        print("cold default encode, quick against exhaustive rate control (CPU s, wall s in brackets)")
        for r in speed:
            print(f"  {r['image']:<20} quick {r['quick_cpu_s']:5.2f} s ({r['quick_s']:5.2f}) "
                  f"{r['quick_psnr']:6.2f} dB   "
                  f"exhaustive {r['exhaustive_cpu_s']:5.2f} s ({r['exhaustive_s']:5.2f}) {r['exhaustive_psnr']:6.2f} dB"
                  f"   loss {r['loss_db']:+.2f} dB")
        print(f"  mean loss {speed_loss:+.3f} dB (target <= {MAX_SPEED_LOSS_DB}); mean CPU time quick {quick_s:.2f} s "
              f"(target <= {TARGET_SECONDS}), exhaustive {exhaustive_s:.2f} s, ratio {ratio:.3f}; wall "
              f"{quick_wall:.2f} s against {exhaustive_wall:.2f} s")
        print("targets: " + ", ".join(f"{k} {'met' if v else 'MISSED'}" for k, v in targets.items()))
    return 0 if all(targets.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
