"""Figures of a sweep: matplotlib figures (no pyplot, no global state) rendered by Agg, one PNG each.

- ``quality_bytes.png``: PSNR and MS-SSIM of each pixel stage against the bytes delivered on the link
  by the time it arrived (means over images and seeds); a triangle on the x axis marks where MISC's
  first semantic stage arrived (it has no PSNR: the classical decoder draws names and masks).
- ``quality_time.png``: the same stages against the time they arrived (medians), as steps.
- ``first_stage_time.png``: the distribution (ECDF) of the time to MISC's first semantic stage, and of
  the time to each baseline's first picture; a curve that stops below 1 means some images never got one.
- ``protection.png``: protection strategies side by side: final PSNR, share of images complete,
  median completion time, and wire bytes per byte of the file.

Colours are the series (by default the swept keys, see ``[report]`` in experiments/scenario.py); line
styles and markers are the method (MISC or a baseline codec).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from miscnet.experiments.records import first_pixel_events, stage_order
from miscnet.experiments.scenario import Point, ScenarioSpec, short_key

METHOD_STYLE = {
    "misc": ("-", "o"),
    "jpeg": ("--", "s"),
    "webp": (":", "^"),
    "avif": ("-.", "D"),
    "jpeg-progressive": ((0, (5, 1, 1, 1)), "v"),
}
METHOD_LABEL = {"misc": "MISC (layers)", "jpeg": "JPEG", "webp": "WebP", "avif": "AVIF",
                "jpeg-progressive": "progressive JPEG"}
DPI = 110


def _series_keys(spec: ScenarioSpec, figure: str) -> list[str]:
    keys = spec.settings.get(f"report.{figure}")
    if keys is None:
        keys = spec.settings.get("report.series")
    if keys is None:
        case_keys = {k for c in spec.configs if c.case for k in c.swept if k not in _grid_keys(spec)}
        keys = (["case"] if spec.has_cases else []) + [k for k in spec.swept_keys if k not in case_keys]
    return [k for k in keys if k != "method"]


def _grid_keys(spec: ScenarioSpec) -> set[str]:
    keys: set[str] = set()
    for c in spec.configs:
        if c.case is None:
            return set(c.swept)
        keys |= {k for k in c.swept if k in spec.swept_keys}
    # with cases, a grid key is one every configuration sets
    return {k for k in keys if all(k in c.swept for c in spec.configs)}


def _value(spec: ScenarioSpec, ci: int, key: str) -> Any:
    c = spec.configs[ci]
    return c.case if key == "case" else c.params[key]


def _fmt(v: Any) -> str:
    if v is None:
        return "none"
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, str) and "/" in v:
        return Path(v).name
    return str(v)


def _label(keys: list[str], values: tuple, names: dict[str, str] | None = None) -> str:
    """A series or group label; ``names`` ([report] labels) replace values, and their key, in figures."""
    names = names or {}
    if not keys:
        return "all"

    def one(k: str, v: Any, sep: str) -> str:
        if isinstance(v, str) and v in names:
            return names[v]
        return _fmt(v) if k == "case" else f"{short_key(k)}{sep}{_fmt(v)}"

    if len(keys) == 1:
        return one(keys[0], values[0], " ")
    return ", ".join(one(k, v, "=") for k, v in zip(keys, values, strict=True))


class _Groups:
    """Points grouped by (series value, method), series in plan order."""

    def __init__(self, spec: ScenarioSpec, plan: list[Point], records: dict[str, dict], keys: list[str]):
        self.keys = keys
        self.names = spec.settings.get("report.labels") or {}
        self.groups: dict[tuple, dict[int, list[dict]]] = defaultdict(lambda: defaultdict(list))
        self.series: list[tuple] = []
        for p in plan:
            value = tuple(_value(spec, p.config, k) for k in keys)
            if value not in self.series:
                self.series.append(value)
            rec = records[p.id]
            if not rec.get("error"):
                self.groups[(value, p.method)][p.config].append(rec)
        self.methods = [m for m in spec.methods if any(m == k[1] for k in self.groups)]
        # no series: colour by method instead
        self._colours = _colours(len(self.series) if keys else len(self.methods))

    def colour(self, si: int, method: str):
        return self._colours[si if self.keys else self.methods.index(method)]

    def items(self):
        """(series index, value, method, {configuration: records}) for every non-empty group."""
        for si, value in enumerate(self.series):
            for method in self.methods:
                by_config = self.groups.get((value, method))
                if by_config:
                    yield si, value, method, by_config


def _colours(n: int) -> list:
    import matplotlib

    if n <= 10:
        cmap = matplotlib.colormaps["tab10"]
        return [cmap(i) for i in range(n)]
    cmap = matplotlib.colormaps["viridis"]
    return [cmap(x) for x in np.linspace(0.0, 0.92, n)]


def _mean_of(events: list[dict], key: str) -> float:
    values = [e[key] for e in events if e.get(key) is not None]  # older records lack the newer metrics
    return float(np.mean(values)) if values else np.nan


def _pixel_stages(recs: list[dict]) -> list[tuple[str, float, float, float, float, float, float, float]]:
    """(stage, mean wire bytes, median time, mean psnr, mean ms-ssim, share arrived, mean SSIMULACRA2,
    mean FLIP) per pixel stage."""
    per: dict[str, list[dict]] = defaultdict(list)
    for r in recs:
        for e in first_pixel_events(r):
            per[e["stage"]].append(e)
    out = []
    for s in sorted(per, key=stage_order):
        ev = per[s]
        out.append((s, float(np.mean([e["wire_bytes"] for e in ev])), float(np.median([e["time_s"] for e in ev])),
                    float(np.mean([e["psnr"] for e in ev])), float(np.mean([e["ms_ssim"] for e in ev])),
                    len(ev) / len(recs), _mean_of(ev, "ssimulacra2"), _mean_of(ev, "flip")))
    return out


def _semantic_events(recs: list[dict]) -> list[dict]:
    out = []
    for r in recs:
        e = next((e for e in r["events"] if "semantic" in str(e.get("layers", "")).split("+")), None)
        if e is not None:
            out.append(e)
    return out


def _legend(fig, ax, groups: _Groups, extra: list | None = None) -> None:
    from matplotlib.lines import Line2D

    handles = []
    if groups.keys:
        handles += [Line2D([], [], color=groups.colour(i, ""), lw=2.5, label=_label(groups.keys, v, groups.names))
                    for i, v in enumerate(groups.series)]
    if len(groups.methods) > 1 or not handles:
        handles += [Line2D([], [], color="0.25" if groups.keys else groups.colour(0, m), ls=METHOD_STYLE[m][0],
                           marker=METHOD_STYLE[m][1], label=METHOD_LABEL[m]) for m in groups.methods]
    handles += extra or []
    title = ", ".join(short_key(k) for k in groups.keys) if groups.keys else None
    fig.legend(handles=handles, loc="outside right upper", title=title, fontsize=8, title_fontsize=9, frameon=False)


def _finish(fig, path: Path) -> Path:
    import io

    from miscnet.core.image_io import atomic_write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    atomic_write_bytes(path, buf.getvalue())
    return path


def _title(spec: ScenarioSpec, what: str, n_images: int) -> str:
    seeds = len(spec.seeds)
    return (f"{spec.name}: {what}\n{n_images} image{'s' * (n_images != 1)} x {seeds} seed{'s' * (seeds != 1)}, "
            f"classical decoder")


def _plain_log_axis(ax, axis: str = "x") -> None:
    from matplotlib.ticker import FuncFormatter

    a = ax.xaxis if axis == "x" else ax.yaxis
    fmt = FuncFormatter(lambda v, _pos: f"{v:g}")
    a.set_major_formatter(fmt)
    a.set_minor_formatter(FuncFormatter(lambda v, _pos: f"{v:g}" if v > 0 and f"{v:.0e}"[0] in "25" else ""))


def _stage_figure(spec, plan, records, out: Path, *, figure: str, x_col: int, xlabel: str, what: str,
                  semantic_x: str, filename: str) -> Path:
    """Quality of the pixel stages against bytes (x_col 1) or time (x_col 2).

    Per encoding (configurations of a series that share encoder settings are pooled: only the link or the
    protection differs): a thin line through its stages, the progression one image makes; per series and
    method: a thick line through the last stage of each encoding (a rate-quality curve when the
    configurations differ in budget).
    """
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.transforms import blended_transform_factory

    g = _Groups(spec, plan, records, _series_keys(spec, figure))
    fig = Figure(figsize=(12, 8.8), layout="constrained")
    axes = list(fig.subplots(2, 2).flat)
    columns = (3, 4, 6, 7)  # PSNR, MS-SSIM, SSIMULACRA2, FLIP in _pixel_stages' tuples
    any_semantic = False
    for si, _value, method, by_config in g.items():
        ls, marker = METHOD_STYLE[method]
        colour = g.colour(si, method)
        finals = []
        by_encoding: dict[str, list[dict]] = defaultdict(list)
        for ci, recs in by_config.items():
            by_encoding[spec.configs[ci].encoder_key()] += recs
        for recs in by_encoding.values():
            stages = _pixel_stages(recs)
            if not stages:
                continue
            finals.append(stages[-1])
            x = [s[x_col] for s in stages]
            for ax, col in zip(axes, columns, strict=True):
                y = [s[col] for s in stages]
                if x_col == 2:
                    ax.step(x, y, where="post", ls=ls, color=colour, lw=1.2, alpha=0.8)
                else:
                    ax.plot(x, y, ls=ls, color=colour, lw=1.2, alpha=0.8)
                ax.plot(x[:-1], y[:-1], ls="none", marker=marker, mfc="white", color=colour, ms=5)
                ax.plot(x[-1:], y[-1:], ls="none", marker=marker, color=colour, ms=6)
        if len(finals) > 1 and x_col == 1:
            finals.sort(key=lambda s: s[1])
            for ax, col in zip(axes, columns, strict=True):
                ax.plot([s[1] for s in finals], [s[col] for s in finals], ls=ls, color=colour, lw=2.2)
        sem = _semantic_events([r for recs in by_config.values() for r in recs])
        if sem:
            any_semantic = True
            xs = [e[semantic_x] for e in sem]
            for ax in axes:
                tr = blended_transform_factory(ax.transData, ax.transAxes)
                ax.plot([np.median(xs) if x_col == 2 else np.mean(xs)], [0.0], marker="*", color=colour, ms=11,
                        transform=tr, clip_on=False, ls="none")
    names = ("PSNR (dB)", "MS-SSIM", "SSIMULACRA2 (100: identical)", "FLIP (0: identical, lower is better)")
    for ax, name in zip(axes, names, strict=True):
        ax.set_xscale("log")
        _plain_log_axis(ax)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(name)
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle(_title(spec, what, len(spec.images)))
    extra = [Line2D([], [], color="0.4", marker="o", mfc="white", ls="none", label="earlier pixel stage"),
             Line2D([], [], color="0.4", marker="o", ls="none", label="last pixel stage")]
    if any_semantic:
        extra.append(Line2D([], [], color="0.25", marker="*", ms=10, ls="none",
                            label="MISC semantic stage (no PSNR)"))
    _legend(fig, axes[-1], g, extra)
    return _finish(fig, out / filename)


def figure_quality_bytes(spec, plan, records, out: Path) -> Path:
    return _stage_figure(spec, plan, records, out, figure="bytes_series", x_col=1, semantic_x="wire_bytes",
                         xlabel="bytes delivered on the link when the stage arrived (mean)",
                         what="quality against bytes", filename="quality_bytes.png")


def figure_quality_time(spec, plan, records, out: Path) -> Path:
    return _stage_figure(spec, plan, records, out, figure="time_series", x_col=2, semantic_x="time_s",
                         xlabel="time from the first packet when the stage arrived (s, median)",
                         what="quality against time", filename="quality_time.png")


def figure_first_stage(spec, plan, records, out: Path) -> Path:
    from matplotlib.figure import Figure

    g = _Groups(spec, plan, records, _series_keys(spec, "first_series"))
    fig = Figure(figsize=(9, 4.8), layout="constrained")
    ax = fig.subplots()
    drawn = False
    for si, _value, method, by_config in g.items():
        recs = [r for rs in by_config.values() for r in rs]
        key = "first_semantic_time_s" if method == "misc" else "first_stage_time_s"
        times = np.sort([r["totals"][key] for r in recs if r["totals"].get(key) is not None])
        if not len(times):
            continue
        drawn = True
        y = np.arange(1, len(times) + 1) / len(recs)
        ax.step(np.concatenate([[times[0]], times]), np.concatenate([[0.0], y]), where="post",
                ls=METHOD_STYLE[method][0], color=g.colour(si, method), lw=1.8)
    if drawn:
        ax.set_xscale("log")
        _plain_log_axis(ax)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("time from the first packet (s)")
    ax.set_ylabel("share of images")
    ax.grid(True, which="both", alpha=0.3)
    fig.suptitle(_title(spec, "time to the first semantic stage (MISC) / first picture (baselines)",
                        len(spec.images)))
    _legend(fig, ax, g)
    return _finish(fig, out / "first_stage_time.png")


def figure_protection(spec, plan, records, summaries: list[dict], out: Path) -> Path:
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    x_keys = spec.settings.get("report.protection_x")
    if x_keys is None:
        x_keys = [k for k in spec.swept_keys if not k.startswith("protection.") and not
                  (spec.has_cases and k not in _grid_keys(spec))]
    x_keys = [k for k in x_keys if k != "method"]
    # one bar per (protection strategy, method), in plan order; one group per x value
    xs: list[tuple] = []
    bars: list[tuple[str, str]] = []
    cells: dict[tuple, list[dict]] = defaultdict(list)
    for p in plan:
        c = spec.configs[p.config]
        xv = tuple(_value(spec, p.config, k) for k in x_keys)
        bar = (c.protection_label(), p.method)
        if xv not in xs:
            xs.append(xv)
        if bar not in bars:
            bars.append(bar)
        rec = records[p.id]
        if not rec.get("error"):
            cells[(xv, bar)].append(rec)
    protections = list(dict.fromkeys(b[0] for b in bars))
    methods = list(dict.fromkeys(b[1] for b in bars))
    colours = _colours(len(protections))
    hatches = ["", "//", "..", "xx", "\\\\"]

    def first_time(method: str, r: dict) -> float | None:
        return r["totals"].get("first_semantic_time_s" if method == "misc" else "first_stage_time_s")

    def metrics(method: str, recs: list[dict]) -> list[float]:
        if not recs:
            return [np.nan] * 6
        first = [t for r in recs if (t := first_time(method, r)) is not None]
        finals = [max((e for e in r["events"] if e["psnr"] is not None), key=lambda e: e["time_s"])["psnr"]
                  for r in recs if any(e["psnr"] is not None for e in r["events"])]
        done = [r["totals"]["completion_time_s"] for r in recs if r["completed"]]
        sent = sum(r["totals"]["wire_bytes"] for r in recs)
        size = sum(r["file_bytes"] for r in recs)
        return [100.0 * len(first) / len(recs), 100.0 * len(done) / len(recs),
                float(np.mean(finals)) if finals else np.nan, float(np.median(first)) if first else np.nan,
                float(np.median(done)) if done else np.nan, sent / size if size else np.nan]

    panels = ("got a first stage (%): MISC semantic stage, baseline picture", "images complete (%)",
              "final PSNR (dB, mean over images with a picture)", "time to the first stage (s, median)",
              "completion time (s, median of complete)", "wire bytes sent / file bytes")
    width_in = min(32.0, max(14.0, 3 * (0.13 * len(bars) * len(xs) + 0.8) + 2.5))  # about 0.13 in per bar
    fig = Figure(figsize=(width_in, 7.5), layout="constrained")
    axes = fig.subplots(2, 3)
    width = 0.8 / max(1, len(bars))
    for bi, bar in enumerate(bars):
        values = [metrics(bar[1], cells.get((xv, bar), [])) for xv in xs]
        pos = np.arange(len(xs)) - 0.4 + width * (bi + 0.5)
        for k, ax in enumerate(axes.flat):
            ax.bar(pos, [v[k] for v in values], width=width * 0.95, color=colours[protections.index(bar[0])],
                   hatch=hatches[methods.index(bar[1]) % len(hatches)], edgecolor="0.2", lw=0.5)
    for k, ax in enumerate(axes.flat):
        ax.set_title(panels[k], fontsize=10)
        ax.set_xticks(np.arange(len(xs)))
        names = spec.settings.get("report.labels") or {}
        ax.set_xticklabels([_label(x_keys, xv, names) if x_keys else "all" for xv in xs], rotation=20, ha="right",
                           fontsize=8)
        ax.grid(True, axis="y", alpha=0.3)
    heights = [p.get_height() for p in axes.flat[2].patches if np.isfinite(p.get_height())]
    if heights:  # PSNR differences are a fraction of a dB: do not start the axis at 0
        axes.flat[2].set_ylim(min(heights) - 1.0, max(heights) + 0.5)
    for ax in axes.flat[3:5]:
        times = [p.get_height() for p in ax.patches if np.isfinite(p.get_height()) and p.get_height() > 0]
        if times and max(times) > 20 * min(times):
            ax.set_yscale("log")
    handles = [Patch(facecolor=colours[i], edgecolor="0.2", label=p) for i, p in enumerate(protections)]
    if len(methods) > 1:
        handles += [Patch(facecolor="white", edgecolor="0.2", hatch=hatches[i % len(hatches)], label=METHOD_LABEL[m])
                    for i, m in enumerate(methods)]
    fig.legend(handles=handles, loc="outside right upper", title="protection", fontsize=8, title_fontsize=9,
               frameon=False)
    fig.suptitle(_title(spec, "protection strategies side by side", len(spec.images)))
    return _finish(fig, out / "protection.png")


def write_figures(spec: ScenarioSpec, plan: list[Point], records: dict[str, dict], summaries: list[dict],
                  out: Path) -> list[Path]:
    return [figure_quality_bytes(spec, plan, records, out), figure_quality_time(spec, plan, records, out),
            figure_first_stage(spec, plan, records, out), figure_protection(spec, plan, records, summaries, out)]
