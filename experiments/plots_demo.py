"""The demo's two plots: quality (PSNR and SSIMULACRA2) against bytes on the wire and against time, one line
per image. Every stage the receiver reported is on them: decoded pixel stages as filled marks on the line,
the semantic+map stage as a dotted vertical line (it has no pixels to measure), and stages never decoded
(superseded by a newer one, or rejected) as hollow marks on the bottom edge, labelled so."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the headless backend)
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.transforms import blended_transform_factory  # noqa: E402


def write_demo_plots(rows: list[dict], out_dir: Path) -> list[Path]:
    images = list(dict.fromkeys(r["image"] for r in rows))
    colours = {image: f"C{i % 10}" for i, image in enumerate(images)}
    written = []
    for x_key, x_label, name in (("wire_bytes", "bytes received on the wire", "quality_vs_bytes.png"),
                                 ("time_s", "time since the first packet (s)", "quality_vs_time.png")):
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), dpi=110)
        any_skipped = False
        for ax, metric, y_label in zip(axes, ("psnr", "ssimulacra2"),
                                       ("PSNR (dB)", "SSIMULACRA2 (100: identical)"), strict=True):
            tr = blended_transform_factory(ax.transData, ax.transAxes)
            for image in images:
                mine = [r for r in rows if r["image"] == image]
                pts = sorted((r[x_key], r[metric]) for r in mine if r["status"] == "stage" and r[metric] is not None)
                colour = colours[image]
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=colour, label=image)
                sem = [r[x_key] for r in mine if r["status"] == "stage" and not r["stage"].startswith("pixel")]
                if sem:
                    ax.axvline(min(sem), color=colour, alpha=0.35, ls=":")
                skipped = [r[x_key] for r in mine if r["status"] != "stage"]
                if skipped:
                    any_skipped = True
                    ax.plot(skipped, [0.0] * len(skipped), ls="none", marker="o", mfc="white", color=colour, ms=7,
                            transform=tr, clip_on=False)
            ax.set_xlabel(x_label)
            ax.set_ylabel(y_label + ", pixel stages")
            ax.grid(alpha=0.3)
        handles, labels = axes[0].get_legend_handles_labels()
        handles.append(Line2D([], [], color="0.4", ls=":", label="semantic+map stage arrived"))
        if any_skipped:
            handles.append(Line2D([], [], color="0.4", marker="o", mfc="white", ls="none",
                                  label="stage not decoded (superseded)"))
        axes[1].legend(handles=handles, fontsize=8)
        fig.suptitle("miscnet demo: " + ("quality against bytes" if x_key == "wire_bytes" else "quality against time")
                     + f" ({len(rows)} stages, every one shown)", fontsize=11)
        fig.tight_layout()
        path = out_dir / name
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written
