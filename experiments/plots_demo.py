"""The demo's two plots: quality against bytes on the wire and against time, one line per image."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the headless backend)


def write_demo_plots(rows: list[dict], out_dir: Path) -> list[Path]:
    images = sorted({r["image"] for r in rows})
    written = []
    for x_key, x_label, name in (("wire_bytes", "bytes received on the wire", "quality_vs_bytes.png"),
                                 ("time_s", "time since the first packet (s)", "quality_vs_time.png")):
        fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
        for image in images:
            pts = sorted((r[x_key], r["psnr"]) for r in rows if r["image"] == image and r["psnr"] is not None)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=image)
            sem = [r[x_key] for r in rows if r["image"] == image and r["psnr"] is None]
            if sem:
                ax.axvline(min(sem), color=ax.lines[-1].get_color() if pts else "grey", alpha=0.25, ls=":")
        ax.set_xlabel(x_label)
        ax.set_ylabel("PSNR (dB), pixel stages")
        ax.set_title("miscnet demo: " + ("quality against bytes" if x_key == "wire_bytes" else "quality against time")
                     + "\n(dotted: semantic + map stage arrived)", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / name
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written
