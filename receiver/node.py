"""The cloud node: serves the Link service (transport packets in, feedback out) and the Watch service.

Each sender stream gets its own transport reassembler. Every new stage is logged as an event (JSON lines)
when its layers arrive, and decoded by a small pool of workers; for one image a newer stage supersedes a
pending older one, so a slow decoder (a GPU diffusion pass) never works on stale stages; streams take turns
at the decoders, so one stream's images cannot hold back everyone else's.

Nothing a peer sends can grow without bound or cost work out of proportion to its bytes: open streams,
images per stream, buffered symbols, queued replies and the watchers' queues all have limits with counted
drops; a stream idle for ``idle_timeout_s`` is ended; a stage renders at most ``max_render_pixels`` and stops
at ``stage_timeout_s``. Every drop and refusal is a counter (channel/stats.py), served by the Stats RPC and
the Prometheus endpoint.
"""

from __future__ import annotations

import json
import queue
import re
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
from PIL import Image

from miscnet.channel.grpc_util import MAX_MESSAGE_BYTES, TlsFiles, check_token, start_server
from miscnet.channel.stats import Counters, add_stats_service
from miscnet.channel.transport import BLOCK_DROPS, PACKET_DROPS, TransportReceiver
from miscnet.core.container import layers_digest
from miscnet.core.image_io import png_bytes, save_png
from miscnet.receiver.assembly import ImageAssembly
from miscnet.receiver.stages import MAX_RENDER_PIXELS, StageInput, StageTimeout
from miscnet.v1 import services_pb2 as spb
from miscnet.v1 import services_pb2_grpc as sgrpc

_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass
class ReceiverOptions:
    out_dir: Path
    listen: str = "127.0.0.1:50051"
    tls: TlsFiles = field(default_factory=TlsFiles)
    token: str | None = None
    decode_workers: int = 2
    grpc_workers: int = 64
    max_streams: int = 48
    max_images_per_stream: int = 256
    max_buffered_bytes: int = 32 * 1024 * 1024  # per stream, undecoded symbols
    watcher_queue: int = 1024
    max_replies: int = 256  # feedback packets queued per stream for a sender that does not read them
    idle_timeout_s: float = 30.0  # a stream that sends nothing this long is ended (DEADLINE_EXCEEDED)
    max_render_pixels: int = MAX_RENDER_PIXELS  # a stage is drawn at most this large
    stage_timeout_s: float = 120.0  # decoding one stage stops (between passes) after this long
    preview_bytes: int = MAX_MESSAGE_BYTES - 64 * 1024  # a watcher's PNG preview fits one message


class DecodeScheduler:
    """Worker threads decoding the newest pending stage of each image; older pending stages are dropped.

    Keys are ``stream/image``; streams take turns (round robin), so a stream with many images waits for
    its own, not others'.
    """

    def __init__(self, handle: Callable[[str, StageInput, dict], None], workers: int,
                 superseded: Callable[[StageInput, dict], None] | None = None):
        self._handle = handle
        self._on_superseded = superseded
        self._pending: dict[str, tuple[StageInput, dict]] = {}
        self._ready: dict[str, deque[str]] = {}  # stream -> its ready keys; dict order is the turn order
        self._running: set[str] = set()
        self._cond = threading.Condition()
        self._closing = False
        self.superseded = 0
        self._threads = [threading.Thread(target=self._work, daemon=True, name=f"decode-{i}") for i in range(workers)]
        for t in self._threads:
            t.start()

    @property
    def pending(self) -> int:
        with self._cond:
            return len(self._pending)

    def _make_ready(self, key: str) -> None:
        self._ready.setdefault(key.split("/", 1)[0], deque()).append(key)

    def submit(self, key: str, stage: StageInput, meta: dict) -> bool:
        """Queue a stage; returns False if it replaced a pending one (which is then never decoded)."""
        with self._cond:
            old = self._pending.get(key)
            if old is not None:
                self.superseded += 1
                # reported under the lock, so a superseded event is logged before its successor's
                if self._on_superseded:
                    self._on_superseded(*old)
            self._pending[key] = (stage, meta)
            if old is None and key not in self._running:
                self._make_ready(key)
            self._cond.notify()
        return old is None

    def _next(self) -> str:
        stream = next(iter(self._ready))
        keys = self._ready.pop(stream)
        key = keys.popleft()
        if keys:
            self._ready[stream] = keys  # back of the turn order
        return key

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._ready and not self._closing:
                    self._cond.wait()
                if not self._ready:
                    return
                key = self._next()
                stage, meta = self._pending.pop(key)
                self._running.add(key)
            try:
                self._handle(key, stage, meta)
            finally:
                with self._cond:
                    self._running.discard(key)
                    if key in self._pending:
                        self._make_ready(key)
                        self._cond.notify()

    def close(self) -> None:
        """Decode everything still pending, then stop the workers."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        for t in self._threads:
            t.join()


def png_preview(image: np.ndarray, limit: int) -> tuple[bytes, int, int]:
    """PNG of ``image``, scaled down until it fits ``limit`` bytes; (png, width, height)."""
    pil = Image.fromarray(image)
    while True:
        png = png_bytes(np.asarray(pil))
        if len(png) <= limit or min(pil.size) <= 16:
            return png, pil.width, pil.height
        scale = max(0.1, min(0.9, (limit / len(png)) ** 0.5 * 0.9))
        pil = pil.resize((max(16, int(pil.width * scale)), max(16, int(pil.height * scale))),
                         Image.Resampling.LANCZOS)


class EventLog:
    """events.jsonl (flushed per line) and the watchers' bounded queues (a full queue drops, counted)."""

    def __init__(self, path: Path, watcher_queue: int, counters: Counters, preview_bytes: int):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = path.open("a", encoding="utf-8")
        self._lock = threading.Lock()
        self._watchers: list[tuple[queue.Queue, bool]] = []
        self._watcher_queue = watcher_queue
        self._counters = counters
        self._preview_bytes = preview_bytes

    def emit(self, event: dict, image: np.ndarray | None = None) -> None:
        with self._lock:
            if self._file.closed:  # a stream torn down after shutdown: nothing left to write to
                self._counters.inc("events_dropped_total", reason="closed")
                return
            self._file.write(json.dumps(event) + "\n")
            self._file.flush()
            watchers = list(self._watchers)
        if not watchers:
            return
        message = spb.StageEvent(**{k: v for k, v in event.items() if k in _EVENT_FIELDS and v is not None})
        with_png = None
        if image is not None and any(include for _, include in watchers):
            with_png = spb.StageEvent()
            with_png.CopyFrom(message)
            with_png.png, with_png.png_width, with_png.png_height = png_preview(image, self._preview_bytes)
            if (with_png.png_width, with_png.png_height) != (image.shape[1], image.shape[0]):
                self._counters.inc("previews_scaled_total")
        for q, include_png in watchers:
            try:
                q.put_nowait(with_png if include_png and with_png is not None else message)
            except queue.Full:
                self._counters.inc("events_dropped_total", reason="slow-watcher")

    def watch(self, include_png: bool) -> queue.Queue:
        q: queue.Queue = queue.Queue(self._watcher_queue)
        with self._lock:
            self._watchers.append((q, include_png))
        return q

    def unwatch(self, q: queue.Queue) -> None:
        with self._lock:
            self._watchers = [w for w in self._watchers if w[0] is not q]
        try:
            q.put_nowait(None)
        except queue.Full:
            pass

    @property
    def watchers(self) -> int:
        with self._lock:
            return len(self._watchers)

    def close(self) -> None:
        with self._lock:
            watchers, self._watchers = self._watchers, []
            self._file.close()
        for q, _ in watchers:
            try:
                q.put_nowait(None)
            except queue.Full:
                pass


_EVENT_FIELDS = {f.name for f in spb.StageEvent.DESCRIPTOR.fields}


class _Stream:
    """One sender stream's state on the receiver."""

    def __init__(self, name: str, options: ReceiverOptions):
        self.name = name
        self.transport = TransportReceiver(max_images=options.max_images_per_stream,
                                           max_buffered_bytes=options.max_buffered_bytes)
        self.labels: dict[int, str] = {}
        self.assemblies: dict[int, ImageAssembly] = {}
        self.first_seen: dict[int, float] = {}
        self.wire_bytes: dict[int, int] = {}
        self.stage_index: dict[int, int] = {}
        self.replies: queue.Queue = queue.Queue(options.max_replies)
        self.last_activity = time.monotonic()
        self.done = threading.Event()  # the sender's half of the call has ended

    def label(self, image_id: int) -> str:
        return self.labels.get(image_id) or f"image{image_id}"


def _describe_counters(counters: Counters) -> None:
    for name, help_text in [
        ("streams_total", "sender streams accepted"),
        ("streams_refused_total", "streams refused, by reason (full: max open streams)"),
        ("streams_idle_total", "streams ended for sending nothing for the idle timeout"),
        ("packets_total", "transport packets received"),
        ("packets_dropped_total", "packets dropped, by reason: " + ", ".join(PACKET_DROPS)
         + "; internal-error: a fault of this node while handling the packet (a bug: please report)"),
        ("blocks_dropped_total", "blocks whose packets passed but the block did not, by reason: "
         + ", ".join(BLOCK_DROPS)),
        ("labels_dropped_total", "image labels dropped (more than the images a stream may have)"),
        ("feedback_sent_total", "feedback packets queued for senders"),
        ("feedback_dropped_total", "feedback packets dropped: the sender did not read its replies"),
        ("images_complete_total", "images whose every layer arrived"),
        ("images_incomplete_total", "images left incomplete when their stream ended"),
        ("stages_decoded_total", "stages decoded and written"),
        ("stages_superseded_total", "stages replaced by a newer stage of the image before decoding"),
        ("stages_failed_total", "stages that failed to decode, by reason (error, timeout)"),
        ("stages_scaled_total", "stages drawn smaller than declared (over the render pixel cap)"),
        ("events_dropped_total", "events not delivered to a watcher, by reason (slow-watcher, closed)"),
        ("previews_scaled_total", "watcher PNG previews scaled down to fit the message limit"),
    ]:
        counters.describe(name, help_text)


class ReceiverNode(sgrpc.LinkServicer, sgrpc.WatchServicer):
    def __init__(self, options: ReceiverOptions, decoder):
        self.options = options
        self.decoder = decoder
        self.out_dir = Path(options.out_dir)
        self.counters = Counters("receiver")
        _describe_counters(self.counters)
        self.events = EventLog(self.out_dir / "events.jsonl", options.watcher_queue, self.counters,
                               options.preview_bytes)
        self.scheduler = DecodeScheduler(self._decode, options.decode_workers, self._superseded)
        self._streams = threading.BoundedSemaphore(options.max_streams)
        self._open = 0
        self._seq = 0
        self._lock = threading.Lock()
        self._readers: list[threading.Thread] = []
        self.counters.gauge_fn("streams_open", lambda: self._open, "sender streams open now")
        self.counters.gauge_fn("decode_queue", lambda: self.scheduler.pending, "stages waiting for a decoder")
        self.counters.gauge_fn("watchers", lambda: self.events.watchers, "Watch calls open now")

    # ---------------------------------------------------------------- Link
    def Exchange(self, request_iterator, context):  # noqa: N802 (gRPC method name)
        check_token(context, self.options.token)
        if not self._streams.acquire(blocking=False):
            self.counters.inc("streams_refused_total", reason="full")
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many open streams")
        try:
            with self._lock:
                self._seq += 1
                self._open += 1
                stream = _Stream(f"s{self._seq:04d}", self.options)
            self.counters.inc("streams_total")
            reader = threading.Thread(target=self._read, args=(stream, request_iterator), daemon=True)
            with self._lock:
                self._readers = [t for t in self._readers if t.is_alive()] + [reader]
            reader.start()
            idle = self.options.idle_timeout_s
            while True:
                try:
                    item = stream.replies.get(timeout=min(0.5, idle))
                except queue.Empty:
                    if stream.done.is_set():
                        return
                    if time.monotonic() - stream.last_activity > idle:
                        self.counters.inc("streams_idle_total")
                        context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, f"stream idle for {idle:g} s")
                    continue
                yield spb.LinkMessage(packet=item)
        finally:
            with self._lock:
                self._open -= 1
            self._streams.release()

    def _read(self, stream: _Stream, request_iterator) -> None:
        try:
            for message in request_iterator:
                stream.last_activity = time.monotonic()
                which = message.WhichOneof("body")
                if which == "label":
                    name = _SAFE.sub("_", message.label.name)[:80].strip("._") or None
                    if name and len(stream.labels) < self.options.max_images_per_stream:
                        stream.labels[message.label.image_id] = name
                    elif name:
                        self.counters.inc("labels_dropped_total")
                elif which == "packet":
                    try:
                        replies = self._on_packet(stream, message.packet)
                    except BaseException as exc:  # noqa: BLE001 - no packet may end a stream's reader
                        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                            raise
                        self.counters.inc("packets_dropped_total", reason="internal-error")
                        continue
                    for fb in replies:
                        try:
                            stream.replies.put_nowait(fb)
                            self.counters.inc("feedback_sent_total")
                        except queue.Full:  # a sender that never reads its replies costs no memory
                            self.counters.inc("feedback_dropped_total")
        except grpc.RpcError:
            pass  # the sender went away (or the call was ended): what arrived is kept, below
        finally:
            self._close_stream(stream)
            stream.done.set()

    def _on_packet(self, stream: _Stream, data: bytes) -> list[bytes]:
        now = time.monotonic()
        self.counters.inc("packets_total")
        received = stream.transport.on_datagram(data)
        if received.dropped:
            self.counters.inc("packets_dropped_total", reason=received.dropped)
        if received.block_bad:
            self.counters.inc("blocks_dropped_total", reason=received.block_bad)
        image_id = received.image_id  # verified: a packet that fails its checks creates no state
        if image_id is not None:
            stream.first_seen.setdefault(image_id, now)
            stream.wire_bytes[image_id] = stream.wire_bytes.get(image_id, 0) + len(data)
        groups: dict[int, list] = {}
        for arrival in received.arrivals:
            groups.setdefault(arrival.image_id, []).append(arrival)
        for image_id, group in groups.items():
            header = group[0].header
            assembly = stream.assemblies.get(image_id)
            if assembly is None:
                assembly = stream.assemblies[image_id] = ImageAssembly(header, self.options.max_render_pixels)
            stage = assembly.add(*(a.layer for a in group))
            if stage is not None:
                self._on_stage(stream, image_id, assembly, stage, now)
        return received.feedback

    def _on_stage(self, stream: _Stream, image_id: int, assembly: ImageAssembly, stage: StageInput,
                  now: float) -> None:
        index = stream.stage_index.get(image_id, 0)
        stream.stage_index[image_id] = index + 1
        label = stream.label(image_id)
        folder = self.out_dir / stream.name / label
        event = {"stream": stream.name, "image_id": image_id, "image": label, "stage": stage.name,
                 "time_s": now - stream.first_seen.get(image_id, now), "payload_bytes": stage.payload_bytes,
                 "wire_bytes": stream.wire_bytes.get(image_id, 0), "width": stage.width,
                 "height": stage.height, "complete": assembly.complete, "status": "stage",
                 "path": str(folder / f"{index:02d}-{stage.name}.png")}
        if stage.scaled:
            event.update(declared_width=assembly.width, declared_height=assembly.height)
            self.counters.inc("stages_scaled_total")
        if assembly.complete:
            event["digest"] = layers_digest(assembly.layers.values())
            self.counters.inc("images_complete_total")
        event["_arrived"] = now
        self.scheduler.submit(f"{stream.name}/{image_id}", stage, event)

    def _decode(self, key: str, stage: StageInput, event: dict) -> None:
        event = dict(event)
        arrived = event.pop("_arrived")
        image = None
        stage.deadline = time.monotonic() + self.options.stage_timeout_s
        try:
            image = self.decoder.render(stage)
            save_png(event["path"], image)
            self.counters.inc("stages_decoded_total")
        except StageTimeout as exc:
            event.update(status="decode-timeout", path="", error=str(exc)[:200])
            self.counters.inc("stages_failed_total", reason="timeout")
            image = None
        except Exception as exc:  # noqa: BLE001 - a bad stage must not take the node down
            event.update(status="decode-error", path="", error=str(exc)[:200])
            self.counters.inc("stages_failed_total", reason="error")
            image = None
        event["decode_latency_s"] = time.monotonic() - arrived  # queueing + decoding after arrival
        self.events.emit(event, image)

    def _superseded(self, stage: StageInput, event: dict) -> None:
        event = {k: v for k, v in event.items() if k != "_arrived"}
        event.update(status="superseded", path="")  # logged, never decoded: a newer stage came first
        self.counters.inc("stages_superseded_total")
        self.events.emit(event)

    def _close_stream(self, stream: _Stream) -> None:
        for image_id, assembly in stream.assemblies.items():
            if not assembly.complete:
                self.counters.inc("images_incomplete_total")
                self.events.emit({"stream": stream.name, "image_id": image_id, "image": stream.label(image_id),
                                  "stage": "", "status": "incomplete", "complete": False,
                                  "layers": sorted(assembly.layers), "width": assembly.width,
                                  "height": assembly.height})
        for image_id in stream.first_seen:
            if image_id not in stream.assemblies:
                self.counters.inc("images_incomplete_total")
                self.events.emit({"stream": stream.name, "image_id": image_id, "image": stream.label(image_id),
                                  "stage": "", "status": "incomplete", "complete": False, "layers": []})

    # ---------------------------------------------------------------- Watch
    def Events(self, request, context):  # noqa: N802
        check_token(context, self.options.token)
        q = self.events.watch(request.include_png)
        context.add_callback(lambda: self.events.unwatch(q))
        while True:
            try:
                item = q.get(timeout=0.5)
            except queue.Empty:
                if not context.is_active():
                    return
                continue
            if item is None:
                return
            yield item

    def close(self, wait_s: float = 5.0) -> None:
        """Flush everything: let closing streams log what they leave incomplete, decode what is pending."""
        end = time.monotonic() + wait_s
        with self._lock:
            readers = list(self._readers)
        for reader in readers:
            reader.join(timeout=max(0.0, end - time.monotonic()))
        self.scheduler.close()
        self.events.close()


def serve_receiver(options: ReceiverOptions, decoder) -> tuple[grpc.Server, ReceiverNode, int]:
    node = ReceiverNode(options, decoder)
    names = [spb.DESCRIPTOR.services_by_name["Link"].full_name, spb.DESCRIPTOR.services_by_name["Watch"].full_name]

    def register(server: grpc.Server) -> None:
        sgrpc.add_LinkServicer_to_server(node, server)
        sgrpc.add_WatchServicer_to_server(node, server)
        names.append(add_stats_service(server, node.counters, options.token))

    try:
        server, _, port = start_server(options.listen, options.tls, register, names, workers=options.grpc_workers)
    except BaseException:
        node.close()
        raise
    return server, node, port
