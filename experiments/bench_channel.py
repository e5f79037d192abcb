"""Channel benchmarks, each a ratio measured side by side in one run.

``python -m miscnet.experiments.bench_channel [--seeds N] [--json]`` prints:

1. link speed: packets per wall second through one ``Link`` (1 Gbit/s, 5 ms, a window of packets kept
   in flight by the delivery callback), measured side by side with two bare SimPy baselines moving the
   same number of packets: (a) a producer process putting into a ``simpy.Store(capacity=window)`` and a
   consumer getting from it, (b) one ``env.timeout`` per packet; best of ``--repeat`` interleaved runs.
   Target: link >= 0.5 of the bounded-Store loop (the exit status is 1 when missed);
2. completion time of a 2 KB image at 64 kbit/s, 40 ms one-way delay, 5 % random loss, divided by the
   erasure-channel bound ``delay + bytes * 8 / (rate * (1 - loss))``, mean over seeds, per protection mode;
   target <= 1.15 with fec or hybrid;
3. time to the first (semantic) stage divided by ``delay + semantic bytes * 8 / rate``; target <= 1.2.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import numpy as np
import simpy

from miscnet.channel.link import DuplexConfig, LinkConfig
from miscnet.channel.transport import TransportConfig
from miscnet.core.config import EncoderConfig
from miscnet.core.container import to_bytes
from miscnet.core.image_io import load_image
from miscnet.core.samples import sample_image_path, sample_sidecar_path
from miscnet.core.semantics import load_semantics
from miscnet.experiments.simulate import Scenario, SimImage, simulate
from miscnet.sender.encoder import encode_image
from miscnet.v1 import bitstream_pb2 as pb

RATE, DELAY, LOSS = 64000.0, 0.040, 0.05


def _item(name: str, budget: int) -> SimImage:
    image = load_image(sample_image_path(name))
    sem, _ = load_semantics(sample_sidecar_path(name))
    return SimImage(name, encode_image(image, sem, EncoderConfig(budget_bytes=budget)).encoded, image)


class _Probe:
    __slots__ = ("size",)

    def __init__(self, size: int):
        self.size = size


def link_loop(packets: int, window: int, size: int = 212) -> float:
    """Wall seconds for one link to deliver ``packets``, ``window`` of them kept in flight by ``deliver``."""
    env = simpy.Environment()
    probe = _Probe(size)
    left = packets - window

    def deliver(packet) -> None:
        nonlocal left
        if left > 0:
            left -= 1
            link.send(packet)

    link = LinkConfig.from_strings(rate="1gbit", delay="5ms").build(env, np.random.default_rng(0), deliver)
    t0 = time.perf_counter()
    for _ in range(window):
        link.send(probe)
    env.run()
    wall = time.perf_counter() - t0
    if link.packets_delivered != packets:
        raise RuntimeError(f"link loop delivered {link.packets_delivered} of {packets} packets")
    return wall


def store_loop(packets: int, capacity: int, size: int = 212) -> float:
    """Wall seconds for a producer process to hand ``packets`` to a consumer through a bounded Store."""
    env = simpy.Environment()
    store = simpy.Store(env, capacity=capacity)

    def producer():
        put = store.put
        for _ in range(packets):
            yield put(size)

    def consumer():
        get = store.get
        for _ in range(packets):
            yield get()

    env.process(producer())
    env.process(consumer())
    t0 = time.perf_counter()
    env.run()
    return time.perf_counter() - t0


def timeout_loop(packets: int, size: int = 212, rate: float = 1e9) -> float:
    """Wall seconds for one process that waits one ``env.timeout`` per packet."""
    env = simpy.Environment()

    def clock():
        timeout, d = env.timeout, size * 8 / rate
        for _ in range(packets):
            yield timeout(d)

    env.process(clock())
    t0 = time.perf_counter()
    env.run()
    return time.perf_counter() - t0


def link_speed(packets: int, window: int = 64, repeat: int = 3) -> dict:
    best = {"link": math.inf, "store": math.inf, "timeout": math.inf}
    for _ in range(repeat):  # interleaved, so a busy machine slows all three alike
        best["link"] = min(best["link"], link_loop(packets, window))
        best["store"] = min(best["store"], store_loop(packets, window))
        best["timeout"] = min(best["timeout"], timeout_loop(packets))
    pps = {k: packets / v for k, v in best.items()}
    return {"packets": packets, "window": window, "link_pps": pps["link"], "store_pps": pps["store"],
            "timeout_pps": pps["timeout"], "link_to_store": pps["link"] / pps["store"],
            "link_to_timeout": pps["link"] / pps["timeout"]}


def fair_queue_speed(packets: int = 200_000, flows: int = 10, window: int = 64, repeat: int = 3) -> dict:
    """Packets per wall second through one shared link, FIFO against DRR, ``flows`` paths sending straight
    into it (``window`` packets in flight in all, kept up by the delivery callbacks; 1 Gbit/s, 5 ms, so
    the link is mostly idle, and 10 Mbit/s, so it is backlogged); best of ``repeat`` interleaved runs.
    Prints and returns the rates. Run: ``python -c "from miscnet.experiments.bench_channel import
    fair_queue_speed as f; f()"``."""
    from miscnet.channel.link import Path

    class FlowProbe:
        __slots__ = ("size", "flow")

        def __init__(self, flow: int):
            self.size, self.flow = 212, flow

    def run(discipline: str, rate: str) -> float:
        env = simpy.Environment()
        cell = LinkConfig.from_strings(rate=rate, delay="5ms", discipline=discipline).build(
            env, np.random.default_rng(0), shared=True)
        left = packets - window

        def deliver(packet) -> None:
            nonlocal left
            if left > 0:
                left -= 1
                paths[packet.flow].send(packet)

        paths = [Path(env, [cell], deliver) for _ in range(flows)]
        t0 = time.perf_counter()
        for k in range(window):
            paths[k % flows].send(FlowProbe(k % flows))
        env.run()
        wall = time.perf_counter() - t0
        if cell.packets_delivered != packets:
            raise RuntimeError(f"{discipline} delivered {cell.packets_delivered} of {packets} packets")
        return packets / wall

    out: dict = {"packets": packets, "flows": flows}
    for rate in ("1gbit", "10mbit"):
        best = {"fifo": 0.0, "drr": 0.0}
        for _ in range(repeat):
            for discipline in best:
                best[discipline] = max(best[discipline], run(discipline, rate))
        out[rate] = {"fifo_pps": best["fifo"], "drr_pps": best["drr"], "drr_to_fifo": best["drr"] / best["fifo"]}
        print(f"shared link {rate:>6}, {flows} flows: fifo {best['fifo']:>10,.0f} packets/s, drr "
              f"{best['drr']:>10,.0f} packets/s, drr/fifo {best['drr'] / best['fifo']:.2f}")
    return out


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
    parser.add_argument("--seeds", type=int, default=200, help="seeds per protection mode (default 200)")
    parser.add_argument("--packets", type=int, default=200_000, help="packets in each speed run (default 200000)")
    parser.add_argument("--repeat", type=int, default=3, help="interleaved speed runs, best kept (default 3)")
    parser.add_argument("--quick", action="store_true", help="--seeds 20 --packets 50000 --repeat 2")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.packets, args.repeat = 20, 50_000, 2
    speed = link_speed(args.packets, repeat=args.repeat)
    fast_enough = speed["link_to_store"] >= 0.5
    item = _item("astronaut", 2048)
    rows = completion(item, args.seeds)
    if args.json:
        print(json.dumps({"speed": speed, "completion": rows}))
        return 0 if fast_enough else 1
    print(f"link speed, {speed['packets']} packets, window {speed['window']}, best of {args.repeat}:")
    print(f"  link                        {speed['link_pps']:>12,.0f} packets/s")
    print(f"  bounded Store loop      (a) {speed['store_pps']:>12,.0f} packets/s   link/a = "
          f"{speed['link_to_store']:.2f} (target >= 0.5: {'PASS' if fast_enough else 'FAIL'})")
    print(f"  one timeout per packet  (b) {speed['timeout_pps']:>12,.0f} packets/s   link/b = "
          f"{speed['link_to_timeout']:.2f}")
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
    return 0 if fast_enough else 1


if __name__ == "__main__":
    raise SystemExit(main())
