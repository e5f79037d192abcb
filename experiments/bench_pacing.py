"""Benchmark: N paced senders on one shared bottleneck, against the same senders unpaced, in SimPy.

python -m miscnet.experiments.bench_pacing [--senders 2,8,32] [--duration 40] [--rate 16mbit] [--seed 0]

Each of N senders is always busy: it keeps ``WINDOW`` images unfinished (real ``ImageSender``s, ARQ, one
bundled sample encoded to ``BUDGET`` bytes), starting a new one as soon as one completes, and its first at
a random offset within the first second (so most arrive to a queue the others built). Each has its own
access link (100 Mbit/s, 20 ms) and reverse link (10 Mbit/s, 30 ms); all cross one bottleneck (``--rate``,
10 ms, a 256 kB drop-tail queue: the relay's default) that is FIFO or DRR (``discipline``). Measured after
``WARMUP_S``: utilisation of the bottleneck (bytes it delivered / its capacity), the p95 of the time
packets waited in its queue (the port's sojourn counter), Jain's fairness index of the bytes each sender
had delivered, and images completed. Printed paced and unpaced side by side, for FIFO and DRR.

Targets (paced, every N and both disciplines): utilisation >= 0.9, p95 queueing delay < 100 ms, Jain's
index >= 0.95; exit status 1 when one is missed. ``probes %``: the pacer's probe bytes among all sent.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field

import numpy as np
import simpy

from miscnet.channel.link import LinkConfig
from miscnet.channel.link import Path as LinkPath
from miscnet.channel.pacing import PacingConfig, SimPacer
from miscnet.channel.packet import Datagram, PacketError
from miscnet.channel.transport import ImageSender, TransportConfig, TransportReceiver, parse_feedback
from miscnet.channel.units import parse_rate
from miscnet.core.errors import MiscError

WINDOW = 8  # images each sender keeps unfinished
BUDGET = 12000  # bytes per image: 10 packets of 1200 bytes
WARMUP_S = 5.0
ACCESS = LinkConfig(rate_bps=100e6, delay_s=0.020, name="access")
REVERSE = LinkConfig(rate_bps=10e6, delay_s=0.030, name="reverse")
QUEUE_BYTES = 256 * 1024
TARGETS = {"utilization": 0.9, "queue_p95_s": 0.100, "jain": 0.95}


def jain(values: list[float]) -> float:
    """Jain's fairness index: (sum x)^2 / (n * sum x^2); 1 when all are equal, 1/n when one has all."""
    total, squares = sum(values), sum(v * v for v in values)
    return total * total / (len(values) * squares) if squares else 1.0


def bench_image(budget: int = BUDGET):
    from miscnet.core.config import EncoderConfig
    from miscnet.core.image_io import load_image
    from miscnet.core.samples import sample_image_path, sample_sidecar_path
    from miscnet.core.semantics import load_semantics
    from miscnet.sender.encoder import encode_image

    sem, _ = load_semantics(sample_sidecar_path("astronaut"))
    return encode_image(load_image(sample_image_path("astronaut")), sem, EncoderConfig(budget_bytes=budget)).encoded


@dataclass
class _Flow:
    index: int
    sent: int = 0  # bytes handed to the path
    delivered: int = 0  # bytes that crossed the bottleneck after the warm-up
    images_done: int = 0
    images_failed: int = 0
    inboxes: dict = field(default_factory=dict)


class BusySender:
    """One always-busy sender: ``window`` images unfinished at a time, paced (``pacing``) or not."""

    def __init__(self, env, index: int, image, path: LinkPath, pacing: PacingConfig | None, transport: TransportConfig,
                 window: int, start: float):
        self.env, self.image, self.path, self.transport = env, image, path, transport
        self.flow = _Flow(index)
        self.pacer = None if pacing is None else SimPacer(env, pacing, self._to_path)
        self.receiver = TransportReceiver(max_images=1024)
        self._next_id = 0
        for _ in range(window):
            env.process(self._images(start))

    def _to_path(self, dg: Datagram) -> None:
        dg.flow = self.flow.index
        self.flow.sent += dg.size
        self.path.send(dg)

    def send(self, datagrams) -> None:
        if self.pacer is None:
            for dg in datagrams:
                self._to_path(dg)
        else:
            self.pacer.send(datagrams)

    def _images(self, start: float):
        yield self.env.timeout(start)
        while True:
            yield from self._one()

    def _one(self):
        env = self.env
        image_id, self._next_id = self._next_id, (self._next_id + 1) & 0xFFFF
        sender = ImageSender(image_id, self.image, self.transport)
        inbox = self.flow.inboxes[image_id] = simpy.Store(env)
        self.send(sender.start(env.now))
        get = inbox.get()
        while not sender.finished:
            wait = max(0.0, (sender.timer_at or env.now) - env.now)
            fired = yield get | env.timeout(wait)
            if get in fired:
                self.send(sender.on_feedback(fired[get], env.now))
                get = inbox.get()
            else:
                self.send(sender.on_timer(env.now))
        del self.flow.inboxes[image_id]
        if sender.state == "done":
            self.flow.images_done += 1
        else:
            self.flow.images_failed += 1

    def on_reverse(self, dg: Datagram) -> None:
        if self.pacer is not None and self.pacer.on_feedback(dg.data):
            return  # a probe's answer: nothing for the transport
        try:
            image_id, feedback = parse_feedback(dg.data)
        except PacketError:
            return
        inbox = self.flow.inboxes.get(image_id)
        if inbox is not None:
            inbox.put(feedback)


def run_bottleneck(senders: int, *, paced: bool, discipline: str = "fifo", rate_bps: float = 16e6,
                   duration_s: float = 40.0, seed: int = 0, image=None, window: int = WINDOW,
                   warmup_s: float = WARMUP_S, pacing: PacingConfig | None = None,
                   rate_changes: tuple[tuple[float, float], ...] = ()) -> dict:
    """N always-busy senders on one bottleneck; the figures of the module docstring, measured after warm-up.

    ``rate_changes``: (time, new rate in bit/s) steps of the bottleneck. Also returned: each sender's
    delivered bytes per second over each of those stretches (``shares``), for tests."""
    image = image if image is not None else bench_image()
    env = simpy.Environment()
    link_seed, start_seed, *flow_seeds = np.random.SeedSequence(seed).spawn(2 + senders)
    bottleneck = LinkConfig(rate_bps=rate_bps, delay_s=0.010, queue_bytes=QUEUE_BYTES, discipline=discipline,
                            name="bottleneck").build(env, np.random.default_rng(link_seed), shared=True)
    starts = np.random.default_rng(start_seed).uniform(0, 1.0, senders)
    transport = TransportConfig("arq")
    config = (pacing or PacingConfig()) if paced else None
    flows: list[BusySender] = []
    marks = [warmup_s, *(t for t, _ in rate_changes), duration_s]
    stretch = [[0] * senders for _ in range(len(marks) - 1)]

    def delivered(k: int):
        def on_forward(dg: Datagram) -> None:
            f = flows[k]
            if env.now >= warmup_s:
                f.flow.delivered += dg.size
                for s in range(len(marks) - 1):
                    if marks[s] <= env.now < marks[s + 1]:
                        stretch[s][k] += dg.size
            received = f.receiver.on_datagram(dg.data)
            for fb in received.feedback:
                f.reverse.send(Datagram(fb, "feedback", dg.image_id, k))
        return on_forward

    for k in range(senders):
        a_rng, r_rng = np.random.default_rng(flow_seeds[k]).spawn(2)
        path = LinkPath(env, [ACCESS.build(env, a_rng), bottleneck], delivered(k), name=f"s{k}")
        flow = BusySender(env, k, image, path, config, transport, window, float(starts[k]))
        flow.reverse = REVERSE.build(env, r_rng, flow.on_reverse)
        flows.append(flow)

    def measure():
        yield env.timeout(warmup_s)
        bottleneck.port.sojourns = []

    def change(t: float, rate: float):
        yield env.timeout(t)
        bottleneck.port.rate_bps = rate

    env.process(measure())
    for t, rate in rate_changes:
        env.process(change(t, rate))
    env.run(until=duration_s)
    span = duration_s - warmup_s
    capacity = sum((marks[s + 1] - marks[s]) * ([rate_bps] + [r for _, r in rate_changes])[s]
                   for s in range(len(marks) - 1)) / 8
    per_flow = [f.flow.delivered for f in flows]
    sojourns = bottleneck.port.sojourns or [0.0]
    return {"senders": senders, "paced": paced, "discipline": discipline,
            "utilization": sum(per_flow) / capacity, "jain": jain(per_flow),
            "queue_p95_s": float(np.percentile(sojourns, 95)), "queue_p50_s": float(np.percentile(sojourns, 50)),
            "dropped_queue": bottleneck.packets_dropped_queue, "images_done": sum(f.flow.images_done for f in flows),
            "images_failed": sum(f.flow.images_failed for f in flows), "span_s": span,
            "shares": [[b / (marks[s + 1] - marks[s]) for b in row] for s, row in enumerate(stretch)],
            "probe_bytes": sum(f.pacer.pacer.stats.probe_bytes for f in flows if f.pacer),
            "sent_bytes": sum(f.flow.sent for f in flows)}


def misses(row: dict) -> list[str]:
    out = []
    if row["utilization"] < TARGETS["utilization"]:
        out.append(f"utilization {row['utilization']:.3f} < {TARGETS['utilization']}")
    if row["queue_p95_s"] >= TARGETS["queue_p95_s"]:
        out.append(f"queue p95 {row['queue_p95_s'] * 1e3:.1f} ms >= {TARGETS['queue_p95_s'] * 1e3:g} ms")
    if row["jain"] < TARGETS["jain"]:
        out.append(f"jain {row['jain']:.3f} < {TARGETS['jain']}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--senders", default="2,8,32", help="comma-separated N")
    parser.add_argument("--duration", type=float, default=40.0, help="simulated seconds per run")
    parser.add_argument("--rate", default="16mbit", help="the bottleneck's rate (tc units)")
    parser.add_argument("--disciplines", default="fifo,drr")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    try:
        counts = [int(v) for v in args.senders.split(",")]
        rate = parse_rate(args.rate)
    except (ValueError, MiscError) as exc:
        parser.error(str(exc))
    if args.duration <= WARMUP_S or min(counts) < 1:
        parser.error(f"--duration must be over the {WARMUP_S:g} s warm-up and --senders >= 1")
    if set(args.disciplines.split(",")) - {"fifo", "drr"}:
        parser.error("--disciplines: fifo, drr or both")
    image = bench_image()
    rows, failed = [], []
    print(f"bottleneck {args.rate}, {args.duration:g} s simulated (the first {WARMUP_S:g} s not measured), "
          f"{WINDOW} images of {image.payload_bytes()} bytes unfinished per sender, ARQ")
    print(f"{'N':>3} {'queue':5} {'pacing':7} {'util':>6} {'q p50 ms':>9} {'q p95 ms':>9} {'jain':>6} "
          f"{'drops':>6} {'images':>7} {'failed':>6} {'probes %':>8}")
    for discipline in args.disciplines.split(","):
        for n in counts:
            for paced in (True, False):
                row = run_bottleneck(n, paced=paced, discipline=discipline, rate_bps=rate,
                                     duration_s=args.duration, seed=args.seed, image=image)
                rows.append(row)
                print(f"{n:>3} {discipline:5} {'aimd' if paced else 'off':7} {row['utilization']:6.3f} "
                      f"{row['queue_p50_s'] * 1e3:9.1f} {row['queue_p95_s'] * 1e3:9.1f} {row['jain']:6.3f} "
                      f"{row['dropped_queue']:6d} {row['images_done']:7d} {row['images_failed']:6d} "
                      f"{100 * row['probe_bytes'] / row['sent_bytes']:8.2f}", flush=True)
                if paced:
                    failed += [f"N={n} {discipline}: {m}" for m in misses(row)]
    if args.json:
        print(json.dumps([{k: v for k, v in r.items() if k != "shares"} for r in rows], indent=1))
    for line in failed:
        print("MISSED", line)
    print("all targets met" if not failed else f"{len(failed)} target(s) missed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
