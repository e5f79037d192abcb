"""The cloud node: serves the Link service (transport packets in, feedback out) and the Watch service.

Each sender stream gets its own transport reassembler. Every new stage is logged as an event (JSON lines)
when its layers arrive, and decoded by a small pool of workers; for one image a newer stage supersedes a
pending older one, so a slow decoder (a GPU diffusion pass) never works on stale stages. Memory is bounded:
open streams, images per stream, buffered symbols, and the watchers' queues all have limits.
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

from miscnet.channel.grpc_util import TlsFiles, check_token, start_server
from miscnet.channel.transport import TransportReceiver
from miscnet.core.container import layers_digest
from miscnet.core.image_io import MAX_PIXELS, png_bytes, save_png
from miscnet.receiver.assembly import ImageAssembly
from miscnet.receiver.stages import StageInput
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
    max_pixels: int = MAX_PIXELS  # the same limit the sender applies to its input images
    max_buffered_bytes: int = 32 * 1024 * 1024  # per stream, undecoded symbols
    watcher_queue: int = 1024


class DecodeScheduler:
    """Worker threads decoding the newest pending stage of each image; older pending stages are dropped."""

    def __init__(self, handle: Callable[[str, StageInput, dict], None], workers: int,
                 superseded: Callable[[StageInput, dict], None] | None = None):
        self._handle = handle
        self._on_superseded = superseded
        self._pending: dict[str, tuple[StageInput, dict]] = {}
        self._ready: deque[str] = deque()
        self._running: set[str] = set()
        self._cond = threading.Condition()
        self._closing = False
        self.superseded = 0
        self._threads = [threading.Thread(target=self._work, daemon=True, name=f"decode-{i}") for i in range(workers)]
        for t in self._threads:
            t.start()

    def submit(self, key: str, stage: StageInput, meta: dict) -> bool:
        """Queue a stage; returns False if it replaced a pending one (which is then never decoded)."""
        with self._cond:
            old = self._pending.get(key)
            if old is not None:
                self.superseded += 1
            self._pending[key] = (stage, meta)
            if old is None and key not in self._running:
                self._ready.append(key)
            self._cond.notify()
        if old is not None and self._on_superseded:
            self._on_superseded(*old)
        return old is None

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._ready and not self._closing:
                    self._cond.wait()
                if not self._ready:
                    return
                key = self._ready.popleft()
                stage, meta = self._pending.pop(key)
                self._running.add(key)
            try:
                self._handle(key, stage, meta)
            finally:
                with self._cond:
                    self._running.discard(key)
                    if key in self._pending:
                        self._ready.append(key)
                        self._cond.notify()

    def close(self) -> None:
        """Decode everything still pending, then stop the workers."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        for t in self._threads:
            t.join()


class EventLog:
    """events.jsonl (flushed per line) and the watchers' bounded queues."""

    def __init__(self, path: Path, watcher_queue: int):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = path.open("a", encoding="utf-8")
        self._lock = threading.Lock()
        self._watchers: list[tuple[queue.Queue, bool]] = []
        self._watcher_queue = watcher_queue
        self.dropped_for_slow_watchers = 0
        self.dropped_after_close = 0

    def emit(self, event: dict, png: bytes | None = None) -> None:
        with self._lock:
            if self._file.closed:  # a stream torn down after shutdown: nothing left to write to
                self.dropped_after_close += 1
                return
            self._file.write(json.dumps(event) + "\n")
            self._file.flush()
            watchers = list(self._watchers)
        message = spb.StageEvent(**{k: v for k, v in event.items() if k in _EVENT_FIELDS and v is not None})
        for q, include_png in watchers:
            m = message
            if include_png and png is not None:
                m = spb.StageEvent()
                m.CopyFrom(message)
                m.png = png
            try:
                q.put_nowait(m)
            except queue.Full:
                self.dropped_for_slow_watchers += 1

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
        self.oversized = 0

    def label(self, image_id: int) -> str:
        return self.labels.get(image_id) or f"image{image_id}"


class ReceiverNode(sgrpc.LinkServicer, sgrpc.WatchServicer):
    def __init__(self, options: ReceiverOptions, decoder):
        self.options = options
        self.decoder = decoder
        self.out_dir = Path(options.out_dir)
        self.events = EventLog(self.out_dir / "events.jsonl", options.watcher_queue)
        self.scheduler = DecodeScheduler(self._decode, options.decode_workers, self._superseded)
        self._streams = threading.BoundedSemaphore(options.max_streams)
        self._seq = 0
        self._lock = threading.Lock()
        self._readers: list[threading.Thread] = []
        self.stats = {"streams": 0, "streams_refused": 0, "packets": 0, "packets_bad": 0, "images_complete": 0,
                      "images_incomplete": 0, "images_refused": 0}

    # ---------------------------------------------------------------- Link
    def Exchange(self, request_iterator, context):  # noqa: N802 (gRPC method name)
        check_token(context, self.options.token)
        if not self._streams.acquire(blocking=False):
            with self._lock:
                self.stats["streams_refused"] += 1
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many open streams")
        with self._lock:
            self._seq += 1
            self.stats["streams"] += 1
            stream = _Stream(f"s{self._seq:04d}", self.options)
        replies: queue.Queue = queue.Queue()
        reader = threading.Thread(target=self._read, args=(stream, request_iterator, replies), daemon=True)
        with self._lock:
            self._readers = [t for t in self._readers if t.is_alive()] + [reader]
        reader.start()
        try:
            while True:
                item = replies.get()
                if item is None:
                    return
                yield spb.LinkMessage(packet=item)
        finally:
            self._streams.release()

    def _read(self, stream: _Stream, request_iterator, replies: queue.Queue) -> None:
        try:
            for message in request_iterator:
                which = message.WhichOneof("body")
                if which == "label":
                    name = _SAFE.sub("_", message.label.name)[:80].strip("._") or None
                    if name and len(stream.labels) < self.options.max_images_per_stream:
                        stream.labels[message.label.image_id] = name
                elif which == "packet":
                    for fb in self._on_packet(stream, message.packet):
                        replies.put(fb)
        except grpc.RpcError:
            pass  # the sender went away: what arrived is kept, below
        finally:
            self._close_stream(stream)
            replies.put(None)

    def _on_packet(self, stream: _Stream, data: bytes) -> list[bytes]:
        now = time.monotonic()
        with self._lock:
            self.stats["packets"] += 1
        before = stream.transport.stats.packets_bad
        received = stream.transport.on_datagram(data)
        image_id = received.image_id  # verified: a packet that fails its checks creates no state
        if image_id is not None:
            stream.first_seen.setdefault(image_id, now)
            stream.wire_bytes[image_id] = stream.wire_bytes.get(image_id, 0) + len(data)
        if stream.transport.stats.packets_bad != before:
            with self._lock:
                self.stats["packets_bad"] += 1
        groups: dict[int, list] = {}
        for arrival in received.arrivals:
            groups.setdefault(arrival.image_id, []).append(arrival)
        for image_id, group in groups.items():
            header = group[0].header
            assembly = stream.assemblies.get(image_id)
            if assembly is None:
                if header.width * header.height > self.options.max_pixels:
                    stream.oversized += 1
                    with self._lock:
                        self.stats["images_refused"] += 1
                    continue
                assembly = stream.assemblies[image_id] = ImageAssembly(header)
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
                 "wire_bytes": stream.wire_bytes.get(image_id, 0), "width": assembly.width,
                 "height": assembly.height, "complete": assembly.complete, "status": "stage",
                 "path": str(folder / f"{index:02d}-{stage.name}.png")}
        if assembly.complete:
            event["digest"] = layers_digest(assembly.layers.values())
            with self._lock:
                self.stats["images_complete"] += 1
        event["_arrived"] = now
        self.scheduler.submit(f"{stream.name}/{image_id}", stage, event)

    def _decode(self, key: str, stage: StageInput, event: dict) -> None:
        event = dict(event)
        arrived = event.pop("_arrived")
        try:
            image = self.decoder.render(stage)
            png = png_bytes(image)
            save_png(event["path"], image)
        except Exception as exc:  # noqa: BLE001 - a bad stage must not take the node down
            event.update(status="decode-error", path="", error=str(exc)[:200])
            png = None
        event["decode_latency_s"] = time.monotonic() - arrived  # queueing + decoding after arrival
        self.events.emit(event, png)

    def _superseded(self, stage: StageInput, event: dict) -> None:
        event = {k: v for k, v in event.items() if k != "_arrived"}
        event.update(status="superseded", path="")  # logged, never decoded: a newer stage came first
        self.events.emit(event)

    def _close_stream(self, stream: _Stream) -> None:
        for image_id, assembly in stream.assemblies.items():
            if not assembly.complete:
                with self._lock:
                    self.stats["images_incomplete"] += 1
                self.events.emit({"stream": stream.name, "image_id": image_id, "image": stream.label(image_id),
                                  "stage": "", "status": "incomplete", "complete": False,
                                  "layers": sorted(assembly.layers), "width": assembly.width,
                                  "height": assembly.height})
        for image_id in stream.first_seen:
            if image_id not in stream.assemblies:
                with self._lock:
                    self.stats["images_incomplete"] += 1
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

    def register(server: grpc.Server) -> None:
        sgrpc.add_LinkServicer_to_server(node, server)
        sgrpc.add_WatchServicer_to_server(node, server)

    names = [spb.DESCRIPTOR.services_by_name["Link"].full_name, spb.DESCRIPTOR.services_by_name["Watch"].full_name]
    try:
        server, _, port = start_server(options.listen, options.tls, register, names, workers=options.grpc_workers)
    except BaseException:
        node.close()
        raise
    return server, node, port
