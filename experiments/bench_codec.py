"""Encode + classical decode time per 512 x 512 image on this CPU, and the equal-bytes comparison.

``python -m miscnet.experiments.bench_codec [--repeat N] [--json]``: for each bundled sample, the median wall
time of a full encode (semantic + map + rate-controlled pixel layer at the default budget) and of a
classical decode of every stage, reported as measured and scaled to 512 x 512 pixels.

``python -m miscnet.experiments.bench_codec --avif-speeds``: the best AVIF file at libaom speeds 0, 2, 4 and 6
(600 and 2500 B, three of those images, the rasters around speed 6's best): the evidence for the baselines'
AVIF_SPEED.

``python -m miscnet.experiments.bench_codec --equal-bytes [--budgets 600 1000 ...] [--jobs N] [--json]``:
on 8 images that are not the bundled samples (scikit-image's camera, coins, immunohistochemistry and
motorcycle photos, its colour wheel and logo graphics, its page and text images; sidecars in
experiments/equal_bytes/), at each budget: the best single standard file a careful user would send
instead (the better of WebP and AVIF, experiments/baselines.py, the file itself at most the budget),
against miscnet's default file (``EncoderConfig`` defaults, the whole .misc file at most the budget,
semantic and map layers included) and against its pixel layers alone (the default pixel search given
the whole budget for its payloads: no container to pay for). All scored by the classical decoder at
full size. Prints the mean PSNR and MS-SSIM differences side by side per budget; exit 1 when the pixel
layers alone are not at least TARGET_PIXEL_DB better at every budget, or the default file is more than
TARGET_DEFAULT_DB worse.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np

from miscnet.core.config import EncoderConfig
from miscnet.core.container import from_bytes
from miscnet.core.errors import MiscError
from miscnet.core.image_io import load_image
from miscnet.core.pixel import PixelLevel, decode_pixels, lookup_id
from miscnet.core.samples import SAMPLE_NAMES, sample_image_path, sample_sidecar_path
from miscnet.core.semantics import load_semantics
from miscnet.experiments.metrics import ms_ssim, psnr
from miscnet.receiver.classical import ClassicalDecoder
from miscnet.receiver.stages import progressive_stages
from miscnet.sender.encoder import encode_image
from miscnet.sender.rate_control import choose_settings, clear_search_cache

BUDGETS = (600, 1000, 1500, 2500, 4000)
BASELINE_CODECS = ("webp", "avif")
AVIF_SPEEDS = (0, 2, 4, 6)
TARGET_PIXEL_DB = 0.2  # the pixel layers alone must beat the best single file by this much (mean PSNR)
TARGET_DEFAULT_DB = -0.3  # the default file may lose at most this much
EQUAL_BYTES_DIR = Path(__file__).resolve().parent / "equal_bytes"
# name -> (scikit-image loader, index into a tuple it returns or None)
EQUAL_BYTES_IMAGES = {
    "camera": ("camera", None), "coins": ("coins", None), "immunohistochemistry": ("immunohistochemistry", None),
    "motorcycle": ("stereo_motorcycle", 0), "colorwheel": ("colorwheel", None), "logo": ("logo", None),
    "page": ("page", None), "text": ("text", None),
}


def _median_seconds(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def equal_bytes_image(name: str) -> np.ndarray:
    """One benchmark image as uint8 RGB: grey images as three equal channels, the logo over white."""
    import skimage.data

    loader, index = EQUAL_BYTES_IMAGES[name]
    arr = getattr(skimage.data, loader)()
    if index is not None:
        arr = arr[index]
    arr = np.asarray(arr)
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    if arr.shape[2] == 4:  # composite RGBA over white, as a viewer shows it
        alpha = arr[..., 3:4].astype(np.float32) / 255.0
        arr = np.round(arr[..., :3] * alpha + 255.0 * (1.0 - alpha))
    return np.ascontiguousarray(arr[..., :3].astype(np.uint8))


def _settings_text(s) -> str:
    """What rate control chose, as the table prints it: codec, last level's raster, quality and chroma."""
    return f"{s.codec} {s.width}x{s.height} q{s.quality} {s.chroma}" if s is not None else "-"


def _scores(recon: np.ndarray, image: np.ndarray) -> tuple[float, float]:
    return psnr(recon, image), ms_ssim(recon, image)


def equal_bytes_row(name: str, budgets: tuple[int, ...]) -> list[dict]:
    """Per budget: the best single file's, the default file's and the pixel layers' scores for one image."""
    from miscnet.experiments.baselines import encode_baseline

    image = equal_bytes_image(name)
    h, w = image.shape[:2]
    semantics, _ = load_semantics(EQUAL_BYTES_DIR / f"{name}.json")
    config = EncoderConfig()
    rows = []
    for budget in budgets:
        row: dict = {"image": name, "budget": budget}
        best = None
        for codec in BASELINE_CODECS:
            base = encode_baseline(image, codec, budget, fit_wire=False)
            if base.fits and (best is None or base.psnr > best.psnr):
                best = base
        if best is not None:
            levels = [PixelLevel(ly.level, ly.codec, ly.pixel, ly.payload) for ly in best.encoded.layers]
            bp, bm = _scores(decode_pixels(levels, w, h), image)
            row.update(file_codec=best.codec, file_raster=f"{best.width}x{best.height}", file_quality=best.quality,
                       file_option=best.option, file_bytes=best.bytes, file_psnr=bp, file_msssim=bm)
        try:
            result = encode_image(image, semantics, EncoderConfig(budget_bytes=budget))
            final = progressive_stages(from_bytes(result.data))[-1]
            dp, dm = _scores(ClassicalDecoder().render(final), image)
            row.update(default_bytes=len(result.data), default_psnr=dp, default_msssim=dm,
                       default_pixel=_settings_text(result.pixel_settings))
        except MiscError as exc:
            row["default_error"] = str(exc)
        try:
            settings, levels = choose_settings(image, config.pixel_codec, config.levels, budget)
            pp, pm = _scores(decode_pixels(levels, w, h), image)
            row.update(pixel_bytes=sum(len(lv.payload) for lv in levels), pixel_codec=lookup_id(levels[0].codec).name,
                       pixel_psnr=pp, pixel_msssim=pm, pixel_settings=_settings_text(settings),
                       pixel_preview_bytes=sum(len(lv.payload) for lv in levels[:-1]))
        except MiscError as exc:
            row["pixel_error"] = str(exc)
        rows.append(row)
    return rows


def _mean(values: list[float]) -> float:
    return statistics.mean(values) if values else float("nan")


def equal_bytes(budgets: tuple[int, ...], jobs: int, as_json: bool) -> int:
    names = list(EQUAL_BYTES_IMAGES)
    by_name: dict[str, list[dict]] = {}
    with ProcessPoolExecutor(max_workers=max(1, min(jobs, len(names)))) as pool:
        futures = {pool.submit(equal_bytes_row, n, budgets): n for n in names}
        for done in as_completed(futures):  # progress: a cold run takes a while
            by_name[futures[done]] = done.result()
            print(f"  {futures[done]} done ({len(by_name)}/{len(names)})", file=sys.stderr, flush=True)
    rows = [r for n in names for r in by_name[n]]
    summary = []
    ok = True
    for budget in budgets:
        at = [r for r in rows if r["budget"] == budget]
        complete = all("file_psnr" in r and "default_psnr" in r and "pixel_psnr" in r for r in at)
        s = {"budget": budget, "images": len(at), "complete": complete}
        for kind in ("default", "pixel"):
            dp = [r[f"{kind}_psnr"] - r["file_psnr"] for r in at if f"{kind}_psnr" in r and "file_psnr" in r]
            dm = [r[f"{kind}_msssim"] - r["file_msssim"] for r in at if f"{kind}_msssim" in r and "file_psnr" in r]
            s[f"{kind}_dpsnr"], s[f"{kind}_dmsssim"] = _mean(dp), _mean(dm)
        s["file_psnr"] = _mean([r["file_psnr"] for r in at if "file_psnr" in r])
        s["pass"] = bool(complete and s["pixel_dpsnr"] >= TARGET_PIXEL_DB and s["default_dpsnr"] >= TARGET_DEFAULT_DB)
        ok &= s["pass"]
        summary.append(s)
    if as_json:
        print(json.dumps({"rows": rows, "summary": summary, "pass": ok}, indent=1))
        return 0 if ok else 1
    print(f"{'image':<21} {'budget':>6}  {'best file':<26} {'dB':>6}  {'default B':>9} {'dB':>6}  "
          f"{'pixels B':>8} {'dB':>6}  {'pixel layers: last level (preview B)':<36}")
    for r in rows:
        f = (f"{r['file_codec']} {r['file_raster']} q{r['file_quality']} {r['file_option']}".strip()
             if "file_psnr" in r else "nothing fits")
        fp = f"{r['file_psnr']:6.2f}" if "file_psnr" in r else "     -"
        d = f"{r['default_bytes']:>9} {r['default_psnr']:6.2f}" if "default_psnr" in r else f"{'failed':>9}      -"
        p = f"{r['pixel_bytes']:>8} {r['pixel_psnr']:6.2f}" if "pixel_psnr" in r else f"{'failed':>8}      -"
        chosen = f"{r['pixel_settings']} ({r['pixel_preview_bytes']} B)" if "pixel_psnr" in r else ""
        print(f"{r['image']:<21} {r['budget']:>6}  {f:<26} {fp}  {d}  {p}  {chosen}")
    print(f"\nmean difference from the best single WebP/AVIF file (PSNR dB, MS-SSIM); targets: pixel layers "
          f">= +{TARGET_PIXEL_DB} dB, default file >= {TARGET_DEFAULT_DB} dB")
    print(f"{'budget':>6}  {'file dB':>7}  {'default dB':>10} {'MS-SSIM':>8}  {'pixels dB':>9} {'MS-SSIM':>8}  result")
    for s in summary:
        print(f"{s['budget']:>6}  {s['file_psnr']:7.2f}  {s['default_dpsnr']:+10.2f} {s['default_dmsssim']:+8.4f}  "
              f"{s['pixel_dpsnr']:+9.2f} {s['pixel_dmsssim']:+8.4f}  "
              f"{'PASS' if s['pass'] else 'FAIL' + ('' if s['complete'] else ' (an encode failed)')}")
    print("equal-bytes: " + ("PASS" if ok else "FAIL"))
    return 0 if ok else 1


def _speed_case(args: tuple[str, int]) -> list[dict]:
    from miscnet.experiments.baselines import encode_baseline, raster_candidates

    name, budget = args
    image = equal_bytes_image(name)
    ladder = raster_candidates(image.shape[1], image.shape[0])
    fast = encode_baseline(image, "avif", budget, fit_wire=False, avif_speed=6)
    i = ladder.index((fast.width, fast.height))
    near = ladder[max(0, i - 2) : i + 3]  # the slow speeds search the rasters around speed 6's best
    rows = []
    for speed in AVIF_SPEEDS:
        t0 = time.perf_counter()
        b = encode_baseline(image, "avif", budget, fit_wire=False, avif_speed=speed, rasters=near)
        rows.append({"image": name, "budget": budget, "speed": speed, "psnr": b.psnr,
                     "raster": f"{b.width}x{b.height}", "option": b.option, "seconds": time.perf_counter() - t0})
    return rows


def avif_speeds(jobs: int) -> int:
    """The best AVIF file per libaom speed: which speed the baselines need."""
    cases = [(n, b) for n in ("colorwheel", "immunohistochemistry", "motorcycle") for b in (600, 2500)]
    with ProcessPoolExecutor(max_workers=max(1, min(jobs, len(cases)))) as pool:
        rows = [r for rs in pool.map(_speed_case, cases) for r in rs]
    for r in rows:
        print(f"{r['image']:<21} {r['budget']:>5} B  speed {r['speed']}  {r['psnr']:6.2f} dB  {r['raster']:>9} "
              f"{r['option']:>4}  {r['seconds']:6.1f} s")
    for speed in AVIF_SPEEDS:
        at = [r for r in rows if r["speed"] == speed]
        print(f"speed {speed}: mean {_mean([r['psnr'] for r in at]):.3f} dB, {sum(r['seconds'] for r in at):.0f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--equal-bytes", action="store_true",
                        help="the equal-bytes comparison against the best single WebP/AVIF file")
    parser.add_argument("--budgets", type=int, nargs="+", default=list(BUDGETS), help="bytes (--equal-bytes)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="processes (--equal-bytes)")
    parser.add_argument("--avif-speeds", action="store_true",
                        help="the best AVIF file at libaom speeds 0, 2, 4, 6 (which speed the baselines need)")
    args = parser.parse_args(argv)
    if args.avif_speeds:
        return avif_speeds(args.jobs)
    if args.equal_bytes:
        if any(b <= 0 for b in args.budgets):
            parser.error("--budgets must be positive")
        return equal_bytes(tuple(args.budgets), args.jobs, args.json)
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
