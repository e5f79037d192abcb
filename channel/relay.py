"""The channel relay: a Link server that forwards each stream to the receiver through the link model.

The relay runs the very same SimPy link model as ``simulate`` (channel/link.py), on the wall clock: one
thread owns the simulation (SimPy is not thread-safe) and advances it to the wall-clock time whenever an
event is due or a packet arrives from a gRPC thread through a queue. Each sender stream gets its own
duplex link (forward: sender -> receiver, reverse: feedback), seeded from the relay's seed and the
stream's number. Image labels are control-plane and pass unimpaired. Time-based loss (a fade, an outage
file) runs on the simulation's clock, which starts with the relay: outage times count from its start.

Bounded like the receiver: the link queues hold at most ``queue_bytes`` unless the link sets its own limit
(an unlimited queue at 8 kbit/s would hold hundreds of MB for days), open streams are limited, a stream idle
for ``idle_timeout_s`` is ended, and the link counters are served by the Stats RPC and Prometheus.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from dataclasses import dataclass, field

import grpc
import numpy as np
import simpy

from miscnet.channel.errors import LinkConfigError
from miscnet.channel.grpc_util import MAX_STREAM_OFFSET_MS, STREAM_OFFSET_KEY, TlsFiles, check_token, open_channel
from miscnet.channel.link import DuplexConfig, DuplexLink, LinkConfig, PathConfig
from miscnet.channel.link import Path as LinkPath
from miscnet.channel.packet import Datagram
from miscnet.channel.stats import Counters, serve_node
from miscnet.v1 import services_pb2 as spb
from miscnet.v1 import services_pb2_grpc as sgrpc


class WallClockSim:
    """A simpy.Environment whose clock follows time.monotonic(), driven by one thread.

    ``call(fn, *args)`` runs fn inside the simulation thread at the current wall-clock time; link
    deliveries fire at their computed times (to the precision of a queue wait, well under a millisecond).
    """

    def __init__(self) -> None:
        self.env = simpy.Environment()
        self._t0 = time.monotonic()
        self._inbox: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="wallclock-sim")
        self._thread.start()

    def now(self) -> float:
        return time.monotonic() - self._t0

    def call(self, fn, *args) -> None:
        self._inbox.put((fn, args))

    def _advance(self) -> None:
        env, wall = self.env, self.now()
        if wall > env.now:
            env.run(until=wall)  # everything due before now, then the clock moves to now
        while env.peek() <= env.now:  # and what is due exactly now
            env.step()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._advance()
            due = self.env.peek()
            wait = 0.1 if math.isinf(due) else min(0.1, max(0.0, due - self.now()))
            try:
                fn, args = self._inbox.get(timeout=wait)
            except queue.Empty:
                continue
            self._advance()
            fn(*args)
            while True:  # take everything already queued at this instant
                try:
                    fn, args = self._inbox.get_nowait()
                except queue.Empty:
                    break
                fn(*args)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)


@dataclass
class RelayOptions:
    listen: str
    forward: str
    link: DuplexConfig
    seed: int = 0
    tls: TlsFiles = field(default_factory=TlsFiles)  # this server's TLS
    forward_tls: TlsFiles = field(default_factory=TlsFiles)  # how to reach the receiver
    forward_server_name: str | None = None
    token: str | None = None
    max_streams: int = 48
    grpc_workers: int = 128
    queue_bytes: int = 256 * 1024  # per link queue, where the link config leaves it unlimited
    idle_timeout_s: float = 30.0
    # one bottleneck every stream's forward packets cross after their own link (a cell, a backhaul): the
    # same shared-link element as a fleet simulation; discipline "drr" shares it fairly by stream
    shared: LinkConfig | None = None
    hop_queue: int = 1024  # messages waiting for the next hop, each way
    # honour a stream's STREAM_OFFSET_KEY metadata: its own start in the access link's trace / outage file
    # (a live fleet whose senders fade at different times, as a simulated one with trace_offset = "random")
    stream_offsets: bool = False



def bounded_queues(config: DuplexConfig, queue_bytes: int) -> DuplexConfig:
    """``config`` with every unlimited link queue limited to ``queue_bytes``."""

    def bound(one: LinkConfig | PathConfig):
        if isinstance(one, PathConfig):
            return one.with_(links=tuple(bound(link) for link in one.links))
        return one if one.queue_bytes is not None else one.with_(queue_bytes=queue_bytes)

    return DuplexConfig(bound(config.forward), bound(config.reverse))


_LINK_STATS = ("packets_sent", "packets_dropped_queue", "packets_lost", "packets_lost_outage", "packets_delivered",
               "bytes_sent", "bytes_delivered")


class RelayNode(sgrpc.LinkServicer):
    def __init__(self, options: RelayOptions):
        self.options = options
        self.link_config = bounded_queues(options.link, options.queue_bytes)
        self.sim = WallClockSim()
        self.shared = None
        if options.shared is not None:
            shared = options.shared if options.shared.queue_bytes is not None else options.shared.with_(
                queue_bytes=options.queue_bytes)
            self.shared = shared.build(self.sim.env, np.random.default_rng(np.random.SeedSequence([options.seed])),
                                       shared=True)
        self.channel = open_channel(options.forward, options.forward_tls, server_name=options.forward_server_name)
        self.stub = sgrpc.LinkStub(self.channel)
        self._streams = threading.BoundedSemaphore(options.max_streams)
        self._seq = 0
        self._lock = threading.Lock()
        self.links: list = []  # the open streams' DuplexLinks
        self._closed_totals: dict[str, float] = {}  # link statistics of streams that have ended
        self.counters = Counters("relay")
        self.counters.describe("streams_total", "sender streams accepted")
        self.counters.describe("streams_refused_total", "streams refused, by reason (full: max open streams)")
        self.counters.describe("streams_idle_total", "streams ended for sending nothing for the idle timeout")
        self.counters.describe("hop_dropped_total", "packets the link delivered but the next hop did not take "
                               "(its queue full), by direction")
        self.counters.gauge_fn("streams_open", lambda: len(self.links), "sender streams open now")
        for direction in ("forward", "reverse"):
            for stat in _LINK_STATS:
                self.counters.gauge_fn(f"{direction}_{stat}", lambda d=direction, k=stat: self.link_total(d, k),
                                       f"{direction} links, all streams so far: {stat.replace('_', ' ')}")
            if self.shared is not None and direction == "forward":
                for stat in _LINK_STATS:
                    self.counters.gauge_fn(f"shared_{stat}", lambda k=stat: self.shared.stats().get(k, 0),
                                           f"the shared bottleneck, all streams: {stat.replace('_', ' ')}")
            self.counters.gauge_fn(f"{direction}_queued_bytes",
                                   lambda d=direction: self._open_sum(d, "queued_bytes"),
                                   f"bytes in the {direction} link queues now")

    def _open_sum(self, direction: str, attr: str) -> float:
        with self._lock:
            links = list(self.links)
        return sum(getattr(getattr(link, direction), attr, 0) for link in links)

    def link_total(self, direction: str, stat: str) -> float:
        """A link statistic summed over every stream so far (open ones read live)."""
        with self._lock:
            links, closed = list(self.links), self._closed_totals.get(f"{direction}_{stat}", 0)
        return closed + sum(getattr(link, direction).stats().get(stat, 0) for link in links)

    def _retire(self, link) -> None:
        with self._lock:
            if link not in self.links:
                return
            self.links.remove(link)
            for direction in ("forward", "reverse"):
                stats = getattr(link, direction).stats()
                for stat in _LINK_STATS:
                    key = f"{direction}_{stat}"
                    self._closed_totals[key] = self._closed_totals.get(key, 0) + stats.get(stat, 0)

    def Exchange(self, request_iterator, context):  # noqa: N802
        check_token(context, self.options.token)
        if not self._streams.acquire(blocking=False):
            self.counters.inc("streams_refused_total", reason="full")
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many open streams")
        try:
            self.counters.inc("streams_total")
            yield from self._relay(request_iterator, context)
        finally:
            self._streams.release()

    def _stream_link(self, context) -> DuplexConfig:
        """This stream's duplex link: the relay's, its access link shifted when the stream asks and may."""
        values = [v for k, v in context.invocation_metadata() if k == STREAM_OFFSET_KEY]
        if not values:
            return self.link_config
        if not self.options.stream_offsets:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"{STREAM_OFFSET_KEY}: this relay does not take "
                          "per-stream trace offsets (start it with --stream-offsets)")
        text = values[-1]
        if len(values) > 1 or not (text.isascii() and text.isdigit()) or int(text) > MAX_STREAM_OFFSET_MS:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{STREAM_OFFSET_KEY}: one whole number of "
                          f"milliseconds 0..{MAX_STREAM_OFFSET_MS} expected, got {values!r}"[:200])
        forward = self.link_config.forward
        if not isinstance(forward, LinkConfig):
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"{STREAM_OFFSET_KEY}: the relay's access path has several links; offsets need one")
        try:
            forward = forward.with_(trace_offset_s=int(text) / 1000.0)
        except LinkConfigError as exc:  # no trace or outage file to shift
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"{STREAM_OFFSET_KEY}: {exc}")
        return DuplexConfig(forward, self.link_config.reverse)

    def _relay(self, request_iterator, context):
        config = self._stream_link(context)
        with self._lock:
            self._seq += 1
            seq = self._seq
        upstream: queue.Queue = queue.Queue(self.options.hop_queue)
        downstream: queue.Queue = queue.Queue(self.options.hop_queue)
        ready = threading.Event()
        holder: dict = {}

        def deliver(out: queue.Queue, direction: str):
            def put(d: Datagram) -> None:  # in the simulation thread, which must never block
                try:
                    out.put_nowait(spb.LinkMessage(packet=d.data))
                except queue.Full:  # the next hop does not read: drop, counted, rather than grow
                    self.counters.inc("hop_dropped_total", direction=direction)
            return put

        def build() -> None:  # in the simulation thread
            rng = np.random.default_rng(np.random.SeedSequence([self.options.seed, seq]))
            if self.shared is None:
                holder["link"] = config.build(self.sim.env, rng, deliver(upstream, "forward"),
                                              deliver(downstream, "reverse"))
            else:  # the stream's own link, then the bottleneck all streams share
                f_rng, r_rng = rng.spawn(2)
                own = config.forward.build(self.sim.env, f_rng)
                forward = LinkPath(self.sim.env, [own, self.shared], deliver(upstream, "forward"), name=f"s{seq}")
                holder["link"] = DuplexLink(forward, config.reverse.build(self.sim.env, r_rng,
                                                                          deliver(downstream, "reverse")))
            ready.set()

        self.sim.call(build)
        ready.wait()
        link = holder["link"]
        with self._lock:
            self.links.append(link)
        metadata = [(k, v) for k, v in context.invocation_metadata() if k == "authorization"]
        forward_done, reverse_done = threading.Event(), threading.Event()

        def upstream_requests():
            while True:
                try:
                    yield upstream.get(timeout=0.5)
                except queue.Empty:
                    if forward_done.is_set():
                        return

        call = self.stub.Exchange(upstream_requests(), metadata=metadata)

        last_activity = [time.monotonic()]

        def from_sender() -> None:
            try:
                for message in request_iterator:
                    last_activity[0] = time.monotonic()
                    if message.WhichOneof("body") == "packet":
                        self.sim.call(link.forward.send, Datagram(message.packet, "data", flow=seq))
                    else:
                        upstream.put(message)  # a label: blocks this sender's reader when full (back-pressure)
            except grpc.RpcError:
                pass
            self.sim.call(self._close_when_drained, link.forward, forward_done)

        def from_receiver() -> None:
            try:
                for message in call:
                    if message.WhichOneof("body") == "packet":
                        self.sim.call(link.reverse.send, Datagram(message.packet, "feedback"))
            except grpc.RpcError as exc:
                holder["error"] = exc
            self.sim.call(self._close_when_drained, link.reverse, reverse_done)

        threads = [threading.Thread(target=from_sender, daemon=True), threading.Thread(target=from_receiver,
                                                                                         daemon=True)]
        for t in threads:
            t.start()
        idle = self.options.idle_timeout_s
        try:
            while True:
                try:
                    item = downstream.get(timeout=min(0.5, idle))
                except queue.Empty:
                    if reverse_done.is_set() or not context.is_active():  # ended, or the server is stopping
                        break
                    if time.monotonic() - last_activity[0] > idle:
                        self.counters.inc("streams_idle_total")
                        context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, f"stream idle for {idle:g} s")
                    continue
                yield item
        finally:
            call.cancel()
            self._retire(link)
        error = holder.get("error")
        if error is not None and error.code() != grpc.StatusCode.CANCELLED:
            context.abort(error.code(), f"receiver: {error.details()}")

    def _close_when_drained(self, one_way, done: threading.Event) -> None:
        """Close the next hop once the link has delivered (or lost) what it carries."""

        def waiter():
            while one_way.in_flight or one_way.queued_packets:
                yield self.sim.env.timeout(0.005)
            done.set()

        self.sim.env.process(waiter())

    def close(self) -> None:
        self.sim.stop()
        self.channel.close()


def serve_relay(options: RelayOptions) -> tuple[grpc.Server, RelayNode, int]:
    node = RelayNode(options)
    server, port = serve_node(node, {"Link": sgrpc.add_LinkServicer_to_server}, options.listen,
                              options.tls, options.token, options.grpc_workers)
    return server, node, port
