"""The channel relay: a Link server that forwards each stream to the receiver through the link model.

The relay runs the very same SimPy link model as ``simulate`` (channel/link.py), on the wall clock: one
thread owns the simulation (SimPy is not thread-safe) and advances it to the wall-clock time whenever an
event is due or a packet arrives from a gRPC thread through a queue. Each sender stream gets its own
duplex link (forward: sender -> receiver, reverse: feedback), seeded from the relay's seed and the
stream's number. Image labels are control-plane and pass unimpaired.
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

from miscnet.channel.grpc_util import TlsFiles, check_token, open_channel, start_server
from miscnet.channel.link import DuplexConfig
from miscnet.channel.packet import Datagram
from miscnet.v1 import services_pb2 as spb
from miscnet.v1 import services_pb2_grpc as sgrpc

_END = object()


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


class RelayNode(sgrpc.LinkServicer):
    def __init__(self, options: RelayOptions):
        self.options = options
        self.sim = WallClockSim()
        self.channel = open_channel(options.forward, options.forward_tls, server_name=options.forward_server_name)
        self.stub = sgrpc.LinkStub(self.channel)
        self._streams = threading.BoundedSemaphore(options.max_streams)
        self._seq = 0
        self._lock = threading.Lock()
        self.links: list = []  # every stream's DuplexLink, for the statistics

    def Exchange(self, request_iterator, context):  # noqa: N802
        check_token(context, self.options.token)
        if not self._streams.acquire(blocking=False):
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many open streams")
        try:
            yield from self._relay(request_iterator, context)
        finally:
            self._streams.release()

    def _relay(self, request_iterator, context):
        with self._lock:
            self._seq += 1
            seq = self._seq
        upstream: queue.Queue = queue.Queue()
        downstream: queue.Queue = queue.Queue()
        ready = threading.Event()
        holder: dict = {}

        def build() -> None:  # in the simulation thread
            rng = np.random.default_rng(np.random.SeedSequence([self.options.seed, seq]))
            holder["link"] = self.options.link.build(
                self.sim.env, rng, lambda d: upstream.put(spb.LinkMessage(packet=d.data)),
                lambda d: downstream.put(spb.LinkMessage(packet=d.data)))
            ready.set()

        self.sim.call(build)
        ready.wait()
        link = holder["link"]
        with self._lock:
            self.links.append(link)
        metadata = [(k, v) for k, v in context.invocation_metadata() if k == "authorization"]

        def upstream_requests():
            while True:
                item = upstream.get()
                if item is _END:
                    return
                yield item

        call = self.stub.Exchange(upstream_requests(), metadata=metadata)

        def from_sender() -> None:
            try:
                for message in request_iterator:
                    if message.WhichOneof("body") == "packet":
                        self.sim.call(link.forward.send, Datagram(message.packet, "data"))
                    else:
                        upstream.put(message)
            except grpc.RpcError:
                pass
            self.sim.call(self._close_when_drained, link, upstream)

        def from_receiver() -> None:
            try:
                for message in call:
                    if message.WhichOneof("body") == "packet":
                        self.sim.call(link.reverse.send, Datagram(message.packet, "feedback"))
            except grpc.RpcError as exc:
                holder["error"] = exc
            self.sim.call(self._close_when_drained, link, downstream, "reverse")

        threads = [threading.Thread(target=from_sender, daemon=True), threading.Thread(target=from_receiver,
                                                                                         daemon=True)]
        for t in threads:
            t.start()
        while True:
            item = downstream.get()
            if item is _END:
                break
            yield item
        call.cancel()
        error = holder.get("error")
        if error is not None and error.code() != grpc.StatusCode.CANCELLED:
            context.abort(error.code(), f"receiver: {error.details()}")

    def _close_when_drained(self, link, out: queue.Queue, direction: str = "forward") -> None:
        """Close the next hop once the link has delivered (or lost) what it carries."""
        one_way = link.forward if direction == "forward" else link.reverse

        def waiter():
            while one_way.in_flight or one_way.queued_packets:
                yield self.sim.env.timeout(0.005)
            out.put(_END)

        self.sim.env.process(waiter())

    def close(self) -> None:
        self.sim.stop()
        self.channel.close()


def serve_relay(options: RelayOptions) -> tuple[grpc.Server, RelayNode, int]:
    node = RelayNode(options)

    def register(server: grpc.Server) -> None:
        sgrpc.add_LinkServicer_to_server(node, server)

    try:
        server, _, port = start_server(options.listen, options.tls, register,
                                       [spb.DESCRIPTOR.services_by_name["Link"].full_name],
                                       workers=options.grpc_workers)
    except BaseException:
        node.close()
        raise
    return server, node, port
