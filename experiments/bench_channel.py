"""Channel benchmarks, each a ratio measured side by side in one run.

``python -m experiments.bench_channel [--seeds N] [--json]`` prints:

1. simulator speed: packets per wall second of ``simulate`` (transport + link + receiver, quality off),
   next to a bare SimPy loop moving the same number of packets through a Store and a timeout;
   targets >= 100k packets/s and >= 0.3 of the bare loop;
2. completion time of a 2 KB image at 64 kbit/s, 40 ms one-way delay, 5 % random loss, divided by the
   erasure-channel bound ``delay + bytes * 8 / (rate * (1 - loss))``, mean over seeds, per protection mode;
   target <= 1.15 with fec or hybrid;
3. time to the first (semantic) stage divided by ``delay + semantic bytes * 8 / rate``; target <= 1.2.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import simpy

from miscnet.channel.link import DuplexConfig, LinkConfig
from miscnet.channel.transport import TransportConfig
from miscnet.core.container import to_bytes
from miscnet.core.image_io import load_image
from miscnet.core.samples import sample_image_path, sample_sidecar_path
from miscnet.core.semantics import load_semantics
from miscnet.experiments.simulate import Scenario, SimImage, simulate
from miscnet.sender.encoder import EncoderConfig, encode_image
from miscnet.v1 import bitstream_pb2 as pb

RATE, DELAY, LOSS = 64000.0, 0.040, 0.05


def _item(name: str, budget: int) -> SimImage:
    image = load_image(sample_image_path(name))
    sem, _ = load_semantics(sample_sidecar_path(name))
    return SimImage(name, encode_image(image, sem, EncoderConfig(budget_bytes=budget)).encoded, image)


def bare_simpy(packets: int, size: int = 212, rate: float = 1e9) -> float:
    """Wall seconds for a bare SimPy loop: a Store between a producer and a consumer with a timeout."""
    env = simpy.Environment()
    store = simpy.Store(env)

    def producer():
        for _ in range(packets):
            yield store.put(size)

    def consumer():
        for _ in range(packets):
            item = yield store.get()
            yield env.timeout(item * 8 / rate)

    env.process(producer())
    env.process(consumer())
    t0 = time.perf_counter()
    env.run()
    return time.perf_counter() - t0


def simulator_speed(item: SimImage, copies: int) -> dict:
    link = DuplexConfig(LinkConfig.from_strings(rate="100mbit", delay="5ms", loss="random 1%"))
    scenario = Scenario(link=link, transport=TransportConfig(mode="arq", mtu=200), seed=1, quality=False)
    items = [SimImage(f"{item.name}{i}", item.encoded, None) for i in range(copies)]
    t0 = time.perf_counter()
    results = simulate(items, scenario)
    wall = time.perf_counter() - t0
    packets = sum(r["totals"]["packets_sent"] for r in results)
    packets += sum(1 for r in results for _ in range(r["totals"]["rounds"] + 1))  # feedback, one per poll
    bare = bare_simpy(packets)
    return {"packets": packets, "simulate_s": wall, "simulate_pps": packets / wall,
            "bare_s": bare, "bare_pps": packets / bare, "ratio_to_bare": bare / wall}


def completion(item: SimImage, seeds: int) -> list[dict]:
    link = DuplexConfig(LinkConfig.from_strings(rate="64kbit", delay="40ms", loss="random 5%"))
    file_bytes = len(to_bytes(item.encoded))
    bound = DELAY + file_bytes * 8 / (RATE * (1 - LOSS))
    semantic = next(ly for ly in item.encoded.layers if ly.kind == pb.LAYER_KIND_SEMANTIC)
    first_bound = DELAY + len(semantic.payload) * 8 / RATE
    rows = []
    for mode in ("none", "arq", "fec", "hybrid"):
        times, firsts, complete, wire = [], [], 0, []
        for seed in range(seeds):
            scenario = Scenario(link=link, transport=TransportConfig(mode=mode), seed=seed, quality=False)
            (r,) = simulate([item], scenario)
            t = r["totals"]
            if r["completed"]:
                complete += 1
                times.append(t["completion_time_s"])
            if r["events"] and r["events"][0]["stage"] in ("semantic", "map"):
                firsts.append(r["events"][0]["time_s"])
            wire.append(t["wire_bytes"])
        rows.append({
            "mode": mode, "file_bytes": file_bytes, "bound_s": bound, "completed": complete / seeds,
            "mean_completion_s": statistics.mean(times) if times else None,
            "completion_ratio": statistics.mean(times) / bound if times else None,
            "p95_completion_ratio": sorted(times)[int(0.95 * (len(times) - 1))] / bound if times else None,
            "first_stage_ratio": statistics.mean(firsts) / first_bound if firsts else None,
            "mean_wire_bytes": statistics.mean(wire),
        })
    return rows


def _fmt(value: float | None, spec: str) -> str:
    return format(value, spec) if value is not None else "-"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=200)
    parser.add_argument("--copies", type=int, default=2000, help="images in the speed run")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    item = _item("astronaut", 2048)
    speed = simulator_speed(item, args.copies)
    rows = completion(item, args.seeds)
    if args.json:
        print(json.dumps({"speed": speed, "completion": rows}))
        return 0
    ok = speed["simulate_pps"] >= 100_000 and speed["ratio_to_bare"] >= 0.3
    print(f"simulator: {speed['packets']} packets, simulate {speed['simulate_pps']:,.0f} packets/s, bare SimPy "
          f"loop {speed['bare_pps']:,.0f} packets/s, ratio {speed['ratio_to_bare']:.2f} "
          f"(targets >= 100,000 and >= 0.3: {'PASS' if ok else 'FAIL'})")
    print(f"\n{rows[0]['file_bytes']} B image at 64 kbit/s, 40 ms, 5% random loss, {args.seeds} seeds; "
          f"bound {rows[0]['bound_s'] * 1000:.1f} ms")
    print(f"{'mode':<7} {'complete':>8} {'mean ms':>8} {'ratio':>6} {'p95':>6} {'first':>6} {'wire B':>7}")
    for r in rows:
        mean_ms = r["mean_completion_s"] * 1000 if r["mean_completion_s"] is not None else None
        print(f"{r['mode']:<7} {r['completed']:>8.0%} {_fmt(mean_ms, '8.1f')} "
              f"{_fmt(r['completion_ratio'], '6.3f')} {_fmt(r['p95_completion_ratio'], '6.3f')} "
              f"{_fmt(r['first_stage_ratio'], '6.3f')} {r['mean_wire_bytes']:>7.0f}")
    best = min(r["completion_ratio"] for r in rows if r["mode"] in ("fec", "hybrid"))
    first = max(r["first_stage_ratio"] for r in rows if r["first_stage_ratio"] is not None)
    print(f"best fec/hybrid completion ratio {best:.3f} (target <= 1.15: {'PASS' if best <= 1.15 else 'FAIL'}); "
          f"worst first-stage ratio {first:.3f} (target <= 1.2: {'PASS' if first <= 1.2 else 'FAIL'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
