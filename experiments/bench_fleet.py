"""Benchmark: the fleet simulator at scale (python -m miscnet.experiments.bench_fleet).

The committed capacity scenario (experiments/fleets/capacity.toml: classical profile, 1 worker, newest)
for 10 simulated minutes at 10, 100 and 1000 cameras (one image every 10 s each: 60,000 images at 1000).
Printed, side by side in one run:
  - wall time, images and packets per wall second at each size;
  - packets/s of the fleet at 1000 cameras against a bounded-Store SimPy loop moving the same number of
    packets (bench_channel.store_loop: the fastest plain SimPy producer/consumer). Target: >= 0.3;
  - peak memory of the process (ru_maxrss). Target: under 2 GiB;
  - wall time per image at 10, 100 and 1000 cameras. Target: the largest within 1.5x of the smallest.
The exit status is 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

from miscnet.experiments.bench_channel import store_loop
from miscnet.experiments.fleet import load_fleet, point_spec, prepare_images, run_fleet

SCENARIO = Path(__file__).parent / "fleets" / "capacity.toml"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--duration", default="600s", help="simulated capture time (default 600s)")
    p.add_argument("--sizes", default="10,100,1000", help="numbers of cameras (default 10,100,1000)")
    args = p.parse_args(argv)
    spec = load_fleet(SCENARIO)
    images = prepare_images({n for g in spec.groups for n in g.images}, spec.budget_bytes)
    rows = []
    for n in (int(x) for x in args.sizes.split(",")):
        point = point_spec(spec, {"group.cameras.count": n, "receiver.workers": 1, "receiver.policy": "newest",
                                  "receiver.profile": "classical-cpu", "duration": args.duration}, SCENARIO.parent)
        t0 = time.perf_counter()
        result = run_fleet(point, images)
        wall = time.perf_counter() - t0
        s = result["summary"]
        rows.append((n, s["images"], s["packets"], wall))
        print(f"{n:>5} cameras: {s['images']:>6} images, {s['packets']:>8} packets in {wall:6.2f} s wall  "
              f"({s['images'] / wall:>7.0f} images/s, {s['packets'] / wall:>8.0f} packets/s, "
              f"{1e3 * wall / s['images']:.3f} ms per image)")
    n, _, packets, wall = rows[-1]
    store_s = store_loop(packets, 64)
    ratio = (packets / wall) / (packets / store_s)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    per_image = [w / i for _, i, _, w in rows]
    spread = max(per_image) / min(per_image)
    print(f"bounded-Store loop, {packets} packets: {packets / store_s:,.0f} packets/s; fleet/Store = {ratio:.2f} "
          f"(target >= 0.3)")
    print(f"peak memory {peak_mib:,.0f} MiB (target < 2048)")
    print(f"wall time per image, largest / smallest = {spread:.2f} (target <= 1.5)")
    missed = [name for name, ok in (("fleet/Store", ratio >= 0.3), ("memory", peak_mib < 2048),
                                    ("flat per image", spread <= 1.5)) if not ok]
    if missed:
        print(f"targets missed: {', '.join(missed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
