"""Figures of a fleet sweep (matplotlib, Agg, no pyplot), one PNG each:

- ``capacity.png``: p50 / p95 time from capture to the first picture, and the share of images with a first
  picture by each deadline, against the number of senders (one curve per value of the other swept keys);
- ``workers.png``: the receiver's mean worker utilisation against the number of senders;
- ``failures.png``: why images failed, stacked, per grid point;
- ``links.png``: each link's backlog delay and utilisation over time.
"""

from __future__ import annotations

import io
from collections import defaultdict
from pathlib import Path
from typing import Any

DPI = 110


def _save(fig, path: Path) -> None:
    from miscnet.core.image_io import atomic_write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    atomic_write_bytes(path, buf.getvalue())


def _series(points: list[dict], keys: list[str]) -> dict[tuple, list[dict]]:
    count_keys = [k for k in keys if k.endswith(".count")]
    others = [k for k in keys if k not in count_keys]
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for p in points:
        groups[tuple((k, _hashable(p.get(k))) for k in others)].append(p)
    for members in groups.values():
        members.sort(key=lambda p: p["senders"])
    return groups


def _hashable(value: Any) -> Any:
    """A swept value as a dictionary key: tables and lists (``--set 'group.g.access={...}'``) as JSON."""
    import json

    return json.dumps(value, sort_keys=True) if isinstance(value, dict | list) else value


def _label(series: tuple) -> str:
    return ", ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in series) or "fleet"


def fleet_figures(spec: Any, points: list[dict], out: Path) -> None:
    from matplotlib.figure import Figure

    keys = list(spec.sweep)
    groups = _series(points, keys)
    deadlines = list(spec.deadlines)

    fig = Figure(figsize=(11, 4.2), layout="constrained")
    ax_t, ax_s = fig.subplots(1, 2)
    for series, members in groups.items():
        x = [p["senders"] for p in members]
        line = ax_t.plot(x, [p["first_picture_p50_s"] for p in members], "-o", label=f"p50 {_label(series)}")[0]
        ax_t.plot(x, [p["first_picture_p95_s"] for p in members], "--", color=line.get_color(),
                  label=f"p95 {_label(series)}")
        for d in deadlines[-1:]:
            ax_s.plot(x, [p.get(f"first_picture_by_{d:g}s") for p in members], "-o", color=line.get_color(),
                      label=f"{_label(series)} (by {d:g} s)")
    for ax in (ax_t, ax_s):
        ax.set_xscale("log")
        ax.set_xlabel("senders")
        ax.grid(alpha=0.3)
    ax_t.set_ylabel("time from capture to first picture (s)")
    ax_s.set_ylabel("share of images with a first picture by the deadline")
    ax_s.set_ylim(0, 1.02)
    ax_t.legend(fontsize=7)
    ax_s.legend(fontsize=7)
    _save(fig, out / "capacity.png")

    fig = Figure(figsize=(5.5, 4.2), layout="constrained")
    ax = fig.subplots()
    for series, members in groups.items():
        util = [sum(w["utilization"] for w in p["workers"]["workers"]) / len(p["workers"]["workers"])
                for p in members]
        ax.plot([p["senders"] for p in members], util, "-o", label=_label(series))
    ax.set_xscale("log")
    ax.set_xlabel("senders")
    ax.set_ylabel("mean receiver worker utilisation")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    _save(fig, out / "workers.png")

    fig = Figure(figsize=(max(5.5, 0.5 * len(points)), 4.2), layout="constrained")
    ax = fig.subplots()
    reasons = sorted({r for p in points for r in p["failures"]})
    bottom = [0.0] * len(points)
    for reason in reasons:
        share = [p["failures"].get(reason, 0) / max(1, p["images"]) for p in points]
        ax.bar(range(len(points)), share, bottom=bottom, label=reason)
        bottom = [b + s for b, s in zip(bottom, share, strict=True)]
    ax.set_xticks(range(len(points)), [", ".join(f"{p.get(k)}" for k in keys) for p in points], rotation=60,
                  fontsize=7)
    ax.set_ylabel("share of images failed")
    ax.set_title(" / ".join(k.rsplit(".", 1)[-1] for k in keys), fontsize=8)
    if reasons:
        ax.legend(fontsize=7)
    _save(fig, out / "failures.png")


def link_figure(results: list[dict], out: Path) -> None:
    """``links.png``: each link's backlog delay and utilisation over time, one curve per number of senders
    (the first grid point with that many: the channel does not depend on the receiver's settings)."""
    from matplotlib.figure import Figure

    by_senders: dict[int, dict] = {}
    for r in results:
        if r.get("series") and r["summary"]["senders"] not in by_senders:
            by_senders[r["summary"]["senders"]] = r["series"]
    if not by_senders:
        return
    names = list(next(iter(by_senders.values()))["links"])
    fig = Figure(figsize=(5.2 * len(names), 6.4), layout="constrained")
    axes = fig.subplots(2, len(names), squeeze=False)
    for col, name in enumerate(names):
        for senders, series in sorted(by_senders.items()):
            cols = series["links"][name]
            axes[0][col].plot(series["t_s"], cols["queue_delay_ms"], label=f"{senders} senders")
            axes[1][col].plot(series["t_s"], cols["utilization"], label=f"{senders} senders")
        axes[0][col].set_title(f"{name}" + (" (mean over senders)" if name == "access" else ""), fontsize=9)
        axes[0][col].set_ylabel("backlog delay (ms)")
        axes[1][col].set_ylabel("utilisation")
        axes[1][col].set_xlabel("simulated time (s)")
        for ax in (axes[0][col], axes[1][col]):
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    _save(fig, out / "links.png")
