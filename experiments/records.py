"""Reading the per-point records a sweep writes (one dict per simulated point, with its events).

Shared by the sweep's aggregation and the plots, which both read records and neither imports the other's
machinery.
"""

from __future__ import annotations


def first_pixel_events(rec: dict) -> list[dict]:
    """The first event of each pixel stage of a point (a stage can come twice: ``pixel.0`` alone, then
    ``pixel.0`` again with the semantic and map layers once their block is repaired)."""
    seen: set[str] = set()
    out = []
    for e in rec["events"]:
        if e["psnr"] is not None and e["stage"] not in seen:
            seen.add(e["stage"])
            out.append(e)
    return out


def stage_order(name: str) -> tuple[int, int]:
    kind, _, level = name.partition(".")
    return ({"semantic": 0, "map": 1, "pixel": 2}.get(kind, 3), int(level) if level.isdigit() else 0)
