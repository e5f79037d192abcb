"""The main job on the embedded default: every bundled sample through encode and classical decode.

Writes, under the output folder: ``<sample>.misc``, ``<sample>/NN-<stage>.png`` for each progressive
stage, ``summary.csv`` (one row per stage) and prints a table of bytes and quality.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from experiments.metrics import quality
from experiments.samples import SAMPLE_NAMES, sample_image_path, sample_sidecar_path
from receiver.classical import ClassicalDecoder
from receiver.stages import progressive_stages
from sender.bitstream import from_bytes
from sender.encoder import EncoderConfig, encode_image
from sender.image_io import atomic_write_bytes, load_image, png_bytes
from sender.semantics import load_semantics

FIELDS = ["image", "width", "height", "stage", "payload_bytes", "file_bytes", "bpp", "psnr", "ssim", "ms_ssim"]


def run_offline_demo(out_dir: Path, config: EncoderConfig | None = None) -> list[dict]:
    config = config or EncoderConfig()
    decoder = ClassicalDecoder()
    rows: list[dict] = []
    for name in SAMPLE_NAMES:
        image = load_image(sample_image_path(name))
        semantics, _ = load_semantics(sample_sidecar_path(name))
        result = encode_image(image, semantics, config)
        atomic_write_bytes(out_dir / f"{name}.misc", result.data)
        encoded = from_bytes(result.data)  # decode what was written, as a receiver would
        height, width = image.shape[:2]
        for i, stage in enumerate(progressive_stages(encoded)):
            recon = decoder.render(stage)
            atomic_write_bytes(out_dir / name / f"{i:02d}-{stage.name}.png", png_bytes(recon))
            q = quality(image, recon) if stage.has_pixels else {"psnr": None, "ssim": None, "ms_ssim": None}
            rows.append({"image": name, "width": width, "height": height, "stage": stage.name,
                         "payload_bytes": stage.payload_bytes, "file_bytes": len(result.data),
                         "bpp": round(len(result.data) * 8 / (width * height), 5), **q})
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=FIELDS)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(out_dir / "summary.csv", buf.getvalue().encode())
    print(format_table(rows))
    print(f"\nwrote {out_dir}/summary.csv, the .misc files and the stage images")
    return rows


def format_table(rows: list[dict]) -> str:
    lines = [f"{'image':<18} {'size':>9} {'stage':<9} {'bytes':>6} {'file':>6} {'bpp':>7} {'PSNR':>6} {'MS-SSIM':>7}"]
    for r in rows:
        psnr = f"{r['psnr']:.2f}" if r["psnr"] is not None else "-"
        msssim = f"{r['ms_ssim']:.4f}" if r["ms_ssim"] is not None else "-"
        lines.append(f"{r['image']:<18} {r['width']:>4}x{r['height']:<4} {r['stage']:<9} {r['payload_bytes']:>6} "
                     f"{r['file_bytes']:>6} {r['bpp']:>7.4f} {psnr:>6} {msssim:>7}")
    return "\n".join(lines)
