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
import threading
import time
from pathlib import Path

import numpy as np

from miscnet.channel.link import DuplexConfig, LinkConfig
from miscnet.channel.relay import RelayOptions, serve_relay
from miscnet.channel.transport import TransportConfig
from miscnet.experiments.fleet import parse_fleet, prepare_images, run_fleet

SAMPLES = ["astronaut", "coffee", "chelsea", "rocket"]
OWN = {"rate": "256kbit", "delay": "20ms"}
SHARED = {"name": "shared", "rate": "1mbit", "delay": "5ms", "discipline": "drr"}


def live(senders: int, images: int, period: float, offsets: list[float], encoded) -> list[float]:
    from miscnet.receiver.classical import ClassicalDecoder
    from miscnet.receiver.node import ReceiverOptions, serve_receiver
    from miscnet.sender.node import SenderOptions, _send_one, _Stream

    out = Path(tempfile.mkdtemp(prefix="miscnet-bench-"))
    server, node, port = serve_receiver(ReceiverOptions(out_dir=out, listen="127.0.0.1:0", decode_workers=1),
                                        ClassicalDecoder())
    shared = LinkConfig.from_strings(rate=SHARED["rate"], delay=SHARED["delay"], discipline="drr", name="shared")
    relay, relay_node, relay_port = serve_relay(RelayOptions(
        listen="127.0.0.1:0", forward=f"127.0.0.1:{port}", shared=shared,
        link=DuplexConfig(LinkConfig.from_strings(**OWN), LinkConfig.from_strings(rate="1mbit", delay="25ms"))))
    captured: dict[str, float] = {}
    t0 = time.time() + 2.0  # the streams connect first

    def sender(i: int) -> None:
        # one stream per camera for the whole run, as a deployed camera keeps it (no connection per image)
        options = SenderOptions(target=f"127.0.0.1:{relay_port}", transport=TransportConfig("arq"))
        stream = _Stream(options)
        try:
            for k in range(images):
                at = t0 + offsets[i] + k * period
                time.sleep(max(0.0, at - time.time()))
                name = SAMPLES[(i + k) % len(SAMPLES)]
                label = f"c{i}-{k}"
                captured[label] = time.time()
                _send_one(stream, k, label, encoded[name].encoded, options, None)
        finally:
            stream.close()

    threads = [threading.Thread(target=sender, args=(i,)) for i in range(senders)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    time.sleep(1.0)
    relay.stop(grace=1).wait()
    relay_node.close()
    server.stop(grace=1).wait()
    node.close()
    first: dict[str, float] = {}
    latency = []
    for line in (out / "events.jsonl").read_text().splitlines():
        e = json.loads(line)
        if e.get("status") == "stage" and e.get("stage", "").startswith("pixel") and e["image"] in captured:
            first.setdefault(e["image"], e["logged_at"] - captured[e["image"]])
            latency.append(e["decode_latency_s"])
    print(f"  live: a pixel stage's decode latency (queue + render + PNG write), mean {np.mean(latency):.3f} s")
    return list(first.values())


def simulated(senders: int, images: int, period: float, offsets: list[float], encoded) -> list[float]:
    duration = offsets[-1] + (images - 1) * period + 0.001  # exactly `images` captures per sender
    raw = {"name": "bench", "duration": f"{duration}s", "seed": 0, "link": [SHARED],
           "reverse": {"rate": "1mbit", "delay": "25ms"},
           "receiver": {"workers": 1, "policy": "newest", "profile": "classical-cpu"},
           "report": {"deadlines": ["10s"]},
           "group": [{"name": f"c{i}", "count": 1, "images": [SAMPLES[(i + k) % len(SAMPLES)] for k in range(images)],
                      "arrival": f"every {period}s", "start": f"{offsets[i]}s", "access": dict(OWN),
                      "path": ["shared"], "protection": {"mode": "arq"}} for i in range(senders)]}
    spec = parse_fleet(raw, "bench", Path("."))
    rows = run_fleet(spec, encoded)["rows"]
    return [r["first_picture_s"] for r in rows if r["first_picture_s"] is not None]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--senders", type=int, default=8)
    p.add_argument("--images", type=int, default=4, help="captures per sender")
    p.add_argument("--period", type=float, default=2.0, help="seconds between a sender's captures")
    args = p.parse_args(argv)
    encoded = prepare_images(set(SAMPLES), 1500)
    offsets = [round(i * args.period / args.senders, 3) for i in range(args.senders)]
    sim = simulated(args.senders, args.images, args.period, offsets, encoded)
    got = live(args.senders, args.images, args.period, offsets, encoded)
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
