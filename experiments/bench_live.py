"""Benchmarks of the live nodes on loopback, each measured side by side in one run.

``python -m miscnet.experiments.bench_live [--seconds S] [--json]``:

1. link fidelity of the relay (the SimPy model on the wall clock): delivered throughput against the
   configured rate and against a Mahimahi trace's capacity over the same window (target within +/-3%);
   one-way delay error against the model at the 95th percentile (target <= 5 ms); loss rate against the
   configured one, with its standard error;
2. per-packet overhead on the wire, gRPC and HTTP/2 framing included, measured by a TCP proxy that counts
   the bytes, next to the 12-byte transport header the simulator counts;
3. receiver throughput with the classical decoder: images per second with 1 and with 8 concurrent senders.
"""

from __future__ import annotations

import argparse
import json
import queue
import socket
import struct
import threading
import time
from pathlib import Path

import grpc

from miscnet.channel.grpc_util import TlsFiles, start_server
from miscnet.channel.link import DuplexConfig, LinkConfig
from miscnet.channel.packet import HEADER_BYTES
from miscnet.channel.relay import RelayOptions, serve_relay
from miscnet.channel.trace import Trace
from miscnet.channel.transport import TransportConfig
from miscnet.v1 import services_pb2 as spb
from miscnet.v1 import services_pb2_grpc as sgrpc

TRACE = Path(__file__).resolve().parent.parent.parent / "shared" / "traces" / "ATT-LTE-driving-2016.up"


class _Sink(sgrpc.LinkServicer):
    """A Link server that only timestamps what arrives (payload: 8-byte send time, then padding)."""

    def __init__(self) -> None:
        self.arrivals: list[tuple[float, float, int]] = []  # (sent, arrived, size)

    def Exchange(self, request_iterator, context):  # noqa: N802
        for message in request_iterator:
            now = time.monotonic()
            data = message.packet
            self.arrivals.append((struct.unpack("!d", data[:8])[0], now, len(data)))
        return iter(())


def _sink_server():
    sink = _Sink()
    server, _, port = start_server("127.0.0.1:0", TlsFiles(), lambda s: sgrpc.add_LinkServicer_to_server(sink, s),
                                   ["miscnet.v1.Link"])
    return server, sink, port


def _drive(target: str, size: int, interval: float, count: int) -> None:
    """Send count packets of size bytes, one every interval seconds (0: as fast as possible)."""
    out: queue.Queue = queue.Queue()

    def requests():
        while (item := out.get()) is not None:
            yield item

    with grpc.insecure_channel(target) as channel:
        call = sgrpc.LinkStub(channel).Exchange(requests())
        reader = threading.Thread(target=lambda: list(call), daemon=True)
        reader.start()
        start = time.monotonic()
        for i in range(count):
            if interval:
                delay = start + i * interval - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            out.put(spb.LinkMessage(packet=struct.pack("!d", time.monotonic()) + bytes(size - 8)))
        out.put(None)
        reader.join(timeout=120)


def _relay(forward: str, link: LinkConfig, seed: int = 1):
    return serve_relay(RelayOptions(listen="127.0.0.1:0", forward=forward, link=DuplexConfig(link), seed=seed))


def fidelity(seconds: float) -> dict:
    out = {}
    # (a) delay error: paced at half the rate, so packets never queue: expected one-way = delay + size*8/rate
    rate, delay, size = 1_000_000.0, 0.040, 1000
    server, sink, port = _sink_server()
    rserver, rnode, rport = _relay(f"127.0.0.1:{port}", LinkConfig(rate_bps=rate, delay_s=delay))
    _drive(f"127.0.0.1:{rport}", size, 2 * size * 8 / rate, int(seconds * rate / (2 * size * 8)))
    time.sleep(delay + 0.2)
    errors = sorted(abs((arr - sent) - (delay + size * 8 / rate)) for sent, arr, _ in sink.arrivals)
    out["delay_error_p50_ms"] = 1000 * errors[len(errors) // 2]
    out["delay_error_p95_ms"] = 1000 * errors[int(0.95 * (len(errors) - 1))]
    out["delay_packets"] = len(errors)
    rserver.stop(0).wait()
    rnode.close()
    server.stop(0).wait()

    # (b) throughput, constant rate, saturating sender
    for name, link in (("constant 256kbit", LinkConfig(rate_bps=256_000.0, delay_s=0.02)),
                       ("trace ATT-LTE up", LinkConfig(trace=Trace.load(TRACE), delay_s=0.02) if TRACE.exists()
                        else None)):
        if link is None:
            continue
        server, sink, port = _sink_server()
        rserver, rnode, rport = _relay(f"127.0.0.1:{port}", link)
        capacity = link.capacity_bps()
        count = int(seconds * capacity / (1200 * 8)) + 50
        _drive(f"127.0.0.1:{rport}", 1200, 0.0, count)
        time.sleep(0.3)
        arrivals = sorted(a for _, a, _ in sink.arrivals)
        t0, t1 = arrivals[0], arrivals[-1]
        delivered = sum(s for _, _, s in sink.arrivals[1:]) * 8 / (t1 - t0)
        if link.trace is not None:  # what the trace allows over the same window of its timeline
            span = t1 - t0
            first = link.trace.time_of(link.trace.index_after(0.0))
            capacity = link.trace.count_between(first, first + span) * 1500 * 8 / span
        out[name] = {"configured_bps": capacity, "delivered_bps": delivered, "ratio": delivered / capacity,
                     "packets": len(arrivals)}
        rserver.stop(0).wait()
        rnode.close()
        server.stop(0).wait()

    # (c) loss rate
    server, sink, port = _sink_server()
    rserver, rnode, rport = _relay(f"127.0.0.1:{port}", LinkConfig(rate_bps=10_000_000.0, loss="random 5%"))
    n = 4000
    _drive(f"127.0.0.1:{rport}", 200, 0.0005, n)
    time.sleep(0.3)
    lost = 1 - len(sink.arrivals) / n
    out["loss"] = {"configured": 0.05, "measured": lost, "stderr": (0.05 * 0.95 / n) ** 0.5, "packets": n}
    rserver.stop(0).wait()
    rnode.close()
    server.stop(0).wait()
    return out


class _CountingProxy:
    """A TCP proxy on loopback that counts the bytes going client -> server."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.upstream_bytes = 0
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target_port))
            threading.Thread(target=self._pipe, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, False), daemon=True).start()

    def _pipe(self, src, dst, count: bool) -> None:
        try:
            while data := src.recv(65536):
                if count:
                    self.upstream_bytes += len(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.sock.close()


def overhead() -> dict:
    server, sink, port = _sink_server()
    proxy = _CountingProxy(port)
    rows = {}
    for size in (200, 1212):
        before = proxy.upstream_bytes
        _drive(f"127.0.0.1:{proxy.port}", size, 0.0, 1)  # connection set-up and one packet
        base = proxy.upstream_bytes - before
        before = proxy.upstream_bytes
        n = 2000
        _drive(f"127.0.0.1:{proxy.port}", size, 0.0, n + 1)
        per_packet = (proxy.upstream_bytes - before - base) / n
        rows[f"{size}B packets"] = {"wire_bytes_per_packet": per_packet, "framing_bytes": per_packet - size,
                                    "transport_header_bytes": HEADER_BYTES,
                                    "on_wire_overhead_vs_sim": (per_packet - size + HEADER_BYTES) / HEADER_BYTES}
    proxy.close()
    server.stop(0).wait()
    return rows


def receiver_throughput(images: int) -> dict:
    import tempfile

    from miscnet.core.config import EncoderConfig
    from miscnet.core.image_io import load_image
    from miscnet.core.samples import SAMPLE_NAMES, sample_image_path, sample_sidecar_path
    from miscnet.core.semantics import load_semantics
    from miscnet.receiver.classical import ClassicalDecoder
    from miscnet.receiver.node import ReceiverOptions, serve_receiver
    from miscnet.sender.encoder import encode_image
    from miscnet.sender.node import SenderOptions, send_images

    encoded = []
    for name in SAMPLE_NAMES[:4]:
        sem, _ = load_semantics(sample_sidecar_path(name))
        encoded.append((name, encode_image(load_image(sample_image_path(name)), sem, EncoderConfig()).encoded))
    out = {}
    for senders in (1, 8):
        with tempfile.TemporaryDirectory() as tmp:
            server, node, port = serve_receiver(ReceiverOptions(out_dir=Path(tmp), listen="127.0.0.1:0"),
                                                ClassicalDecoder())
            per = images // senders
            work = [[(f"{n}-{s}-{i}", e) for i in range(per) for n, e in [encoded[i % len(encoded)]]]
                    for s in range(senders)]
            t0 = time.monotonic()
            threads = [threading.Thread(target=send_images, args=(w, SenderOptions(
                target=f"127.0.0.1:{port}", transport=TransportConfig(mode="arq")))) for w in work]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            server.stop(grace=5).wait()
            node.close()  # waits for every pending decode
            wall = time.monotonic() - t0
            out[f"{senders} sender(s)"] = {"images": per * senders, "seconds": wall,
                                           "images_per_s": per * senders / wall,
                                           "complete": node.stats["images_complete"]}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="length of each fidelity run")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    report = {"fidelity": fidelity(args.seconds), "overhead": overhead(),
              "receiver": receiver_throughput(args.images)}
    if args.json:
        print(json.dumps(report))
        return 0
    f = report["fidelity"]
    print(f"delay error against the model: p50 {f['delay_error_p50_ms']:.2f} ms, p95 {f['delay_error_p95_ms']:.2f} ms "
          f"over {f['delay_packets']} packets (target p95 <= 5 ms)")
    for name in ("constant 256kbit", "trace ATT-LTE up"):
        if name in f:
            r = f[name]
            print(f"throughput {name}: delivered {r['delivered_bps'] / 1e3:.1f} kbit/s of "
                  f"{r['configured_bps'] / 1e3:.1f} kbit/s, ratio {r['ratio']:.3f} (target 0.97..1.03)")
    loss = f["loss"]
    print(f"loss: measured {loss['measured']:.4f} against {loss['configured']:.4f} "
          f"(standard error {loss['stderr']:.4f}, {loss['packets']} packets)")
    for name, r in report["overhead"].items():
        print(f"overhead, {name}: {r['wire_bytes_per_packet']:.1f} B on the wire per packet, gRPC/HTTP2/TCP-stream "
              f"framing {r['framing_bytes']:.1f} B on top of the packet "
              f"(whose own header is {r['transport_header_bytes']} B)")
    for name, r in report["receiver"].items():
        print(f"receiver, {name}: {r['images']} images in {r['seconds']:.2f} s = {r['images_per_s']:.1f} images/s "
              f"({r['complete']} complete)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
