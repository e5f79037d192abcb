"""The edge node: streams encoded images over the Link service (to a relay or straight to a receiver).

The transport's sender state machine (channel/transport.py) runs on the wall clock here: packets go out
as one gRPC message each, feedback comes back on the same bidirectional stream, and the retransmission
timer is the loop's wait timeout. Packets leave through the stream's pacer (channel/pacing.py: one per
stream, at the rate its answers say the path carries; ``pacing=None`` sends at once). A broken stream
(receiver or relay restarted) fails with a clear message, or is retried from the current image with
``retries``.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc

from miscnet.channel.grpc_util import STREAM_OFFSET_KEY, TlsFiles, diagnose_connection, open_channel, token_metadata
from miscnet.channel.pacing import PacingConfig, ThreadPacer
from miscnet.channel.packet import POLL, Datagram, Packet, PacketError
from miscnet.channel.transport import FINAL_TOKEN, POLL_ASK, ImageSender, PathEstimate, TransportConfig, parse_feedback
from miscnet.core.container import EncodedImage, layers_digest
from miscnet.core.errors import MiscError
from miscnet.v1 import services_pb2 as spb
from miscnet.v1 import services_pb2_grpc as sgrpc

_END = object()


@dataclass
class SenderOptions:
    target: str
    transport: TransportConfig = field(default_factory=TransportConfig)
    tls: TlsFiles = field(default_factory=TlsFiles)
    server_name: str | None = None  # TLS name to check, when it differs from the target host
    token: str | None = None
    connect_timeout_s: float = 10.0
    retries: int = 0  # reconnect this many times after a broken stream
    linger_s: float = 5.0  # none / fec: wait this long for the receiver's final report
    pacing: PacingConfig | None = field(default_factory=PacingConfig)  # None: packets go out at once
    # ask a relay started with --stream-offsets to start this stream's access link here in its trace
    trace_offset_s: float | None = None


@dataclass
class SendResult:
    name: str
    delivered: bool  # as the protection mode promises (none / fec: every packet sent)
    complete: bool | None  # the receiver's own word, when it answered the final poll
    detail: str
    stats: dict
    seconds: float
    digest: str = ""  # of the layers sent; the receiver logs the same digest for a bit-exact image


class ExchangeStream:
    """One bidirectional Exchange call: a queue feeding requests, a thread reading replies."""

    def __init__(self, options: SenderOptions):
        self.channel = open_channel(options.target, options.tls, server_name=options.server_name)
        try:
            grpc.channel_ready_future(self.channel).result(timeout=options.connect_timeout_s)
        except grpc.FutureTimeoutError:
            self.channel.close()
            reason = diagnose_connection(options.target, options.tls, options.server_name)
            raise MiscError(f"cannot reach {options.target} within {options.connect_timeout_s:g} s: {reason}") from None
        self.outbox: queue.Queue = queue.Queue()
        self.inbox: queue.Queue = queue.Queue()
        self.error: grpc.RpcError | None = None
        self.replied = False  # a reply came: the connection was accepted, not refused after the handshake
        self.pacer = None if options.pacing is None else ThreadPacer(options.pacing, self._emit)
        stub = sgrpc.LinkStub(self.channel)
        metadata = token_metadata(options.token)
        if options.trace_offset_s is not None:
            # whole milliseconds, rounded as a trace offset is (Trace.offset_grid_ms)
            metadata.append((STREAM_OFFSET_KEY, str(math.floor(options.trace_offset_s * 1000 + 0.5))))
        self.call = stub.Exchange(self._requests(), metadata=metadata)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _requests(self):
        while True:
            item = self.outbox.get()
            if item is _END:
                return
            yield item

    def _read(self) -> None:
        try:
            for message in self.call:
                self.replied = True
                if message.WhichOneof("body") == "packet":
                    if self.pacer is not None and self.pacer.on_feedback(message.packet):
                        continue  # the answer to a pacing probe: timing only
                    self.inbox.put(message.packet)
        except grpc.RpcError as exc:
            self.error = exc
        finally:
            self.inbox.put(_END)

    def _emit(self, d: Datagram) -> None:
        self.outbox.put(spb.LinkMessage(packet=d.data))

    def send(self, datagrams) -> None:
        if self.pacer is not None:
            self.pacer.send(datagrams)
            return
        for d in datagrams:
            self._emit(d)

    def close(self, wait_s: float = 5.0) -> None:
        if self.pacer is not None:
            self.pacer.close(wait_s)
        self.outbox.put(_END)
        self.reader.join(timeout=wait_s)
        self.call.cancel()
        self.channel.close()


def _describe(error: grpc.RpcError | None, target: str, diagnose: Callable[[], str] | None = None) -> str:
    """diagnose() explains an UNAVAILABLE call on a stream that never got a reply: under TLS 1.3 a server
    refuses a client certificate only after the client's handshake completed and the channel was ready."""
    if error is None:
        return f"{target} closed the stream"
    code = error.code() if hasattr(error, "code") else None
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return f"{target} refused the token ({error.details()})"
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return f"{target} is full ({error.details()})"
    if code == grpc.StatusCode.UNAVAILABLE:
        if diagnose is not None:
            return f"lost the connection to {target} (restarted or gone?): {diagnose()}"
        return f"lost the connection to {target} (restarted or gone?)"
    return f"{target}: {code.name if code else 'error'}: {error.details() if hasattr(error, 'details') else error}"


class StreamBroken(Exception):
    """The Exchange call ended under an image; the caller may reconnect and resend it."""


class _InFlight:
    """One image on a stream: its transport state machine and, for none / fec (nothing to wait for but the
    receiver's report), when that report is due."""

    def __init__(self, image_id: int, name: str, image: EncodedImage, options: SenderOptions,
                 path: PathEstimate | None):
        self.image_id, self.name, self.image = image_id, name, image
        self.sender = ImageSender(image_id, image, options.transport, path=path)
        self.t0 = time.monotonic()
        self.complete: bool | None = None  # the receiver's word, when it gave it
        self.report_due: float | None = None  # none / fec: waiting for the final report until then
        self.reported = False  # none / fec: the report came, or its wait ran out

    @property
    def wakes_at(self) -> float | None:
        return self.report_due if self.report_due is not None else self.sender.timer_at

    @property
    def over(self) -> bool:
        return self.reported if self.report_due is not None else self.sender.finished

    def result(self) -> SendResult:
        sender, complete = self.sender, self.complete
        detail = sender.failure or ("delivered" if complete else "sent" if complete is None else "sent, incomplete")
        return SendResult(self.name, sender.state == "done", complete, detail, sender.stats.as_dict(),
                          time.monotonic() - self.t0, layers_digest(self.image.layers))


class StreamSender:
    """Images in flight on one Exchange stream, driven from one thread, as the simulator's sender drives its
    images on one link: ``start`` an image at any time (while others are in flight), then ``step`` runs
    feedback and timers and returns the images that ended. Feedback goes to its image by id; the images share
    the stream's pacer and one PathEstimate (what the transport learns of the path)."""

    def __init__(self, stream: ExchangeStream, options: SenderOptions, path: PathEstimate | None = None):
        self.stream, self.options = stream, options
        self.path = path if path is not None else PathEstimate()
        self.in_flight: dict[int, _InFlight] = {}

    def start(self, image_id: int, name: str, image: EncodedImage) -> None:
        if image_id in self.in_flight:
            raise ValueError(f"image id {image_id} is already in flight on this stream")
        one = self.in_flight[image_id] = _InFlight(image_id, name, image, self.options, self.path)
        self.stream.outbox.put(spb.LinkMessage(label=spb.ImageLabel(image_id=image_id, name=name)))
        self.stream.send(one.sender.start(time.monotonic()))
        if not self.options.transport.uses_feedback:
            # nothing was promised, but ask the receiver what it got, for the report
            # (through the pacer, behind the image's packets)
            self.stream.send([Datagram(Packet(POLL, image_id, 0, FINAL_TOKEN, POLL_ASK).encode(), "poll", image_id)])
            one.report_due = time.monotonic() + self.options.linger_s

    def step(self, until: float | None = None) -> list[SendResult]:
        """Wait for feedback or a timer, up to monotonic time ``until`` (None: until an image ends), and run
        it; returns the images that ended meanwhile (possibly none). Raises StreamBroken when the stream ends
        under images in flight (they are then forgotten: the caller decides whether to resend them)."""
        while True:
            ended = self._take_over()
            if ended or not self.in_flight and until is None:
                return ended
            wakes = [w for w in (one.wakes_at for one in self.in_flight.values()) if w is not None]
            if until is not None:
                wakes.append(until)
            wait = None if not wakes else max(0.0, min(wakes) - time.monotonic())
            try:
                item = self.stream.inbox.get(timeout=wait)
            except queue.Empty:
                now = time.monotonic()
                for one in self.in_flight.values():
                    if one.report_due is not None:
                        one.reported = one.reported or now >= one.report_due  # no report: complete unknown
                    elif one.sender.timer_at is not None and now >= one.sender.timer_at:
                        self.stream.send(one.sender.on_timer(now))
                if until is not None and now >= until:
                    return self._take_over()
                continue
            if item is _END:
                diagnose = None if self.stream.replied else (
                    lambda: diagnose_connection(self.options.target, self.options.tls, self.options.server_name))
                self.in_flight.clear()
                raise StreamBroken(_describe(self.stream.error, self.options.target, diagnose))
            try:
                image_id, feedback = parse_feedback(item)
            except PacketError:
                continue
            one = self.in_flight.get(image_id)
            if one is None:
                continue  # an image already over (a late answer), or never ours
            if one.report_due is not None:
                if feedback.token == FINAL_TOKEN:  # the answer to the final report request
                    one.complete, one.reported = feedback.complete, True
                continue
            self.stream.send(one.sender.on_feedback(feedback, time.monotonic()))
            if one.sender.state == "done":
                one.complete = True

    def _take_over(self) -> list[SendResult]:
        """The results of the images that are over, which leave the stream."""
        return [self.in_flight.pop(i).result() for i in [i for i, one in self.in_flight.items() if one.over]]


def send_one_image(stream: ExchangeStream, image_id: int, name: str, image: EncodedImage, options: SenderOptions,
                   path: PathEstimate | None = None) -> SendResult:
    """Send one image on ``stream`` and wait until it is over (the stream carries no other image meanwhile)."""
    one = StreamSender(stream, options, path)
    one.start(image_id, name, image)
    (result,) = one.step()
    return result


def send_images(items: list[tuple[str, EncodedImage]], options: SenderOptions) -> list[SendResult]:
    """Send every image in order; reconnects up to options.retries times, restarting the current image."""
    results: list[SendResult] = []
    attempts = 0
    stream: ExchangeStream | None = None
    next_id = 0
    path = PathEstimate()  # what the transport learns of the path, carried from image to image
    try:
        index = 0
        while index < len(items):
            if stream is None:
                stream = ExchangeStream(options)
            name, image = items[index]
            try:
                results.append(send_one_image(stream, next_id, name, image, options, path))
                next_id = (next_id + 1) & 0xFFFF
                index += 1
            except StreamBroken as broken:
                stream.close(wait_s=0.5)
                stream = None
                attempts += 1
                if attempts > options.retries:
                    raise MiscError(f"{broken}; {len(items) - index} image(s) not sent "
                                    f"(use --retry N to reconnect and resend)") from None
                time.sleep(min(2.0, 0.2 * 2 ** attempts))
    finally:
        if stream is not None:
            stream.close()
    return results
