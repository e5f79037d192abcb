"""Encode + classical decode time per 512 x 512 image on this CPU.

``python -m miscnet.experiments.bench_codec [--repeat N] [--json]``: for each bundled sample, the median wall
time of a full encode (semantic + map + rate-controlled pixel layer at the default budget) and of a
classical decode of every stage, reported as measured and scaled to 512 x 512 pixels.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from miscnet.core.config import EncoderConfig
from miscnet.core.container import from_bytes
from miscnet.core.image_io import load_image
from miscnet.core.samples import SAMPLE_NAMES, sample_image_path, sample_sidecar_path
from miscnet.core.semantics import load_semantics
from miscnet.receiver.classical import ClassicalDecoder
from miscnet.receiver.stages import progressive_stages
from miscnet.sender.encoder import encode_image
from miscnet.sender.rate_control import clear_search_cache


def _median_seconds(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    config = EncoderConfig()
    decoder = ClassicalDecoder()
    rows = []
    for name in SAMPLE_NAMES:
        image = load_image(sample_image_path(name))
        semantics, _ = load_semantics(sample_sidecar_path(name))
        data = encode_image(image, semantics, config).data
        def cold_encode():  # the pixel search caches the last image: time it cold, as a new image is
            clear_search_cache()
            encode_image(image, semantics, config)  # noqa: B023

        enc_s = _median_seconds(cold_encode, args.repeat)
        dec_s = _median_seconds(  # every stage, as a progressive receiver would
            lambda: [decoder.render(s) for s in progressive_stages(from_bytes(data))], args.repeat  # noqa: B023
        )
        scale = 512 * 512 / (image.shape[0] * image.shape[1])
        rows.append({"image": name, "width": image.shape[1], "height": image.shape[0], "bytes": len(data),
                     "encode_s": enc_s, "decode_s": dec_s,
                     "encode_s_per_512": enc_s * scale, "decode_s_per_512": dec_s * scale})
    if args.json:
        print(json.dumps(rows))
        return 0
    print(f"{'image':<18} {'size':>9} {'bytes':>6} {'encode s':>9} {'decode s':>9} {'enc/512²':>9} {'dec/512²':>9}")
    for r in rows:
        print(f"{r['image']:<18} {r['width']:>4}x{r['height']:<4} {r['bytes']:>6} {r['encode_s']:>9.3f} "
              f"{r['decode_s']:>9.3f} {r['encode_s_per_512']:>9.3f} {r['decode_s_per_512']:>9.3f}")
    enc = statistics.mean(r["encode_s_per_512"] for r in rows)
    dec = statistics.mean(r["decode_s_per_512"] for r in rows)
    print(f"mean per 512x512 image: encode {enc:.3f} s, classical decode (all stages) {dec:.3f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
