"""Benchmark: one small fleet run live (real gRPC nodes on loopback) and simulated, side by side.

python -m miscnet.experiments.bench_fleet_live [--senders 8] [--images 4]

N senders, each capturing one bundled sample every PERIOD seconds from its own start offset, each through
its own 256 kbit/s, 20 ms link and then one shared 1 Mbit/s fair-queued (DRR) bottleneck at the relay, to a
receiver with one classical decoder; ARQ. The same topology runs in the fleet simulator with the classical
decoder's profile measured on this machine (experiments/profiles/classical-cpu.json). Printed: p50 and p95
of the time from capture to the first picture, live and simulated, and their ratios. Target: within 15 %
(exit status 1 when missed). Live times include what the simulator does not model (gRPC, the wall-clock
relay's timer precision, writing each stage's PNG).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

from miscnet.experiments.fleet import parse_fleet, prepare_images, run_fleet

SAMPLES = ["astronaut", "coffee", "chelsea", "rocket"]
OWN = {"rate": "256kbit", "delay": "20ms"}
SHARED = {"name": "shared", "rate": "1mbit", "delay": "5ms", "discipline": "drr"}


def scenario(senders: int, images: int, period: float, offsets: list[float]) -> dict:
    """One group per sender (its own start offset and image order), each through its own link and the
    shared bottleneck: the scenario both runs take."""
    duration = offsets[-1] + (images - 1) * period + 0.001  # exactly `images` captures per sender
    return {"name": "bench", "duration": f"{duration}s", "seed": 0, "link": [SHARED],
            "reverse": {"rate": "1mbit", "delay": "25ms"},
            "receiver": {"workers": 1, "policy": "newest", "profile": "classical-cpu"},
            "report": {"deadlines": ["10s"]},
            "group": [{"name": f"c{i}", "count": 1, "images": [SAMPLES[(i + k) % len(SAMPLES)] for k in range(images)],
                       "arrival": f"every {period}s", "start": f"{offsets[i]}s", "access": dict(OWN),
                       "path": ["shared"], "protection": {"mode": "arq"}} for i in range(senders)]}


def live(raw: dict, encoded) -> list[float]:
    """The scenario through real nodes: miscnet loadgen's engine, on its topology (experiments/loadgen.py)."""
    from miscnet.experiments.loadgen import run_loadgen, topology_of

    spec = parse_fleet(raw, "bench", Path("."))
    out = Path(tempfile.mkdtemp(prefix="miscnet-bench-"))
    images = {name: image.encoded for name, image in encoded.items()}
    rows = run_loadgen(spec, out, topology=topology_of(spec), images=images, lead_s=2.0, quality=False).rows
    events = [json.loads(line) for line in (out / "receiver" / "events.jsonl").read_text().splitlines()]
    latency = [e["decode_latency_s"] for e in events if e.get("status") == "stage" and e["stage"].startswith("pixel")]
    print(f"  live: a pixel stage's decode latency (queue + render + PNG write), mean {np.mean(latency):.3f} s")
    return [r["first_picture_s"] for r in rows if r["first_picture_s"] is not None]


def simulated(raw: dict, encoded) -> list[float]:
    spec = parse_fleet(raw, "bench", Path("."))
    rows = run_fleet(spec, encoded)["rows"]
    return [r["first_picture_s"] for r in rows if r["first_picture_s"] is not None]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--senders", type=int, default=8)
    p.add_argument("--images", type=int, default=4, help="captures per sender")
    p.add_argument("--period", type=float, default=2.0, help="seconds between a sender's captures")
    args = p.parse_args(argv)
    offsets = [round(i * args.period / args.senders, 3) for i in range(args.senders)]
    raw = scenario(args.senders, args.images, args.period, offsets)
    encoded = prepare_images(set(SAMPLES), 1500)  # both runs send the same bytes
    sim = simulated(raw, encoded)
    got = live(raw, encoded)
    print(f"{args.senders} senders x {args.images} images; time from capture to first picture (s)")
    ok = True
    for q in (50, 95):
        a, b = float(np.percentile(got, q)), float(np.percentile(sim, q))
        ratio = a / b
        ok &= abs(ratio - 1) <= 0.15
        print(f"  p{q}: live {a:.3f}   simulated {b:.3f}   live/simulated {ratio:.2f}")
    print(f"  images with a first picture: live {len(got)}, simulated {len(sim)} of {args.senders * args.images}")
    if not ok:
        print("target missed: live and simulated differ by more than 15 %", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
