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


def send_one_image(stream: ExchangeStream, image_id: int, name: str, image: EncodedImage, options: SenderOptions,
              progress, path: PathEstimate | None = None) -> SendResult:
    t0 = time.monotonic()
    stream.outbox.put(spb.LinkMessage(label=spb.ImageLabel(image_id=image_id, name=name)))
    sender = ImageSender(image_id, image, options.transport, path=path)
    stream.send(sender.start(time.monotonic()))
    complete: bool | None = None
    final_poll_at = None
    if not options.transport.uses_feedback:
        # nothing was promised, but ask the receiver what it got, for the report
        # (through the pacer, behind the image's packets)
        stream.send([Datagram(Packet(POLL, image_id, 0, FINAL_TOKEN, POLL_ASK).encode(), "poll", image_id)])
        final_poll_at = time.monotonic() + options.linger_s
    while True:
        if sender.finished and final_poll_at is None:
            break
        deadline = final_poll_at if final_poll_at is not None else sender.timer_at
        wait = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            item = stream.inbox.get(timeout=wait)
        except queue.Empty:
            if final_poll_at is not None:
                break
            stream.send(sender.on_timer(time.monotonic()))
            continue
        if item is _END:
            diagnose = None if stream.replied else (
                lambda: diagnose_connection(options.target, options.tls, options.server_name))
            raise StreamBroken(_describe(stream.error, options.target, diagnose))
        try:
            fb_image, feedback = parse_feedback(item)
        except PacketError:
            continue
        if fb_image != image_id:
            continue
        if final_poll_at is not None:
            if feedback.token != FINAL_TOKEN:
                continue  # not the answer to the final report request
            complete = feedback.complete
            break
        stream.send(sender.on_feedback(feedback, time.monotonic()))
        if sender.state == "done":
            complete = True
    if progress:
        progress(name, sender)
    delivered = sender.state == "done"
    detail = sender.failure or ("delivered" if complete else "sent" if complete is None else "sent, incomplete")
    return SendResult(name, delivered, complete, detail, sender.stats.as_dict(), time.monotonic() - t0,
                      layers_digest(image.layers))


def send_images(items: list[tuple[str, EncodedImage]], options: SenderOptions, progress=None) -> list[SendResult]:
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
                results.append(send_one_image(stream, next_id, name, image, options, progress, path))
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
