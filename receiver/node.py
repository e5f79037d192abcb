"""The cloud node: serves the Link service (transport packets in, feedback out) and the Watch service.

Each sender stream gets its own transport reassembler. Every new stage is logged as an event (JSON lines)
when its layers arrive, and decoded by a small pool of workers; for one image a newer stage supersedes a
pending older one, so a slow decoder (a GPU diffusion pass) never works on stale stages; streams take turns
at the decoders, so one stream's images cannot hold back everyone else's (the default decode policy,
"newest"; ``ReceiverOptions.policy`` picks another of receiver/scheduling.py's, ``queue_limit`` bounds the
queue: stages it rejects are logged with status "rejected").

Nothing a peer sends can grow without bound or cost work out of proportion to its bytes: open streams,
images per stream, buffered symbols, queued replies and the watchers' queues all have limits with counted
drops; a stream idle for ``idle_timeout_s`` is ended; a stage renders at most ``max_render_pixels`` and stops
at ``stage_timeout_s``. Every drop and refusal is a counter (channel/stats.py), served by the Stats RPC and
the Prometheus endpoint.
"""

from __future__ import annotations

import json
import os
import queue
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
from PIL import Image

from miscnet.channel.grpc_util import MAX_MESSAGE_BYTES, TlsFiles, check_token
from miscnet.channel.stats import Counters, serve_node
from miscnet.channel.transport import BLOCK_DROPS, PACKET_DROPS, TransportReceiver
from miscnet.core.container import EncodedImage, layers_digest
from miscnet.core.errors import MiscError
from miscnet.core.image_io import png_bytes, save_png
from miscnet.receiver.assembly import ImageAssembly
from miscnet.receiver.scheduling import Job, make_policy
from miscnet.receiver.stages import MAX_RENDER_PIXELS, StageInput, StageTimeout, stage_input
from miscnet.receiver.store import ImageStore
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
    shutdown_decode_s: float | None = None  # at close, decode pending stages this long (None: all of them)
    policy: str = "newest"  # decode scheduling (receiver/scheduling.py POLICIES)
    queue_limit: int | None = None  # stages waiting for a decoder at most (None: no limit); more are rejected
    print_stages: bool = False  # print one line per stage event on stdout (the command line's receiver does)


class DecodeScheduler:
    """Worker threads decoding the stages a Policy (receiver/scheduling.py) hands them; default "newest".

    Keys are ``stream/image``. With "newest" only the newest pending stage of each image is decoded and
    streams take turns (round robin), so a stream with many images waits for its own, not others'. One
    image is decoded by one worker at a time, whatever the policy. Stages that leave unserved are reported
    to ``dropped(stage, meta, reason)`` (reason "superseded", "rejected" or "deadline") in the order their
    image's stages were made: by the worker about to decode a newer stage of the image, or by the one that
    has just decoded an older stage, or -- when no stage of the image is queued or decoding -- at once, by
    the caller of ``submit``, with the scheduler's lock held (the callback must not call back into it).
    """

    def __init__(self, handle: Callable[[str, StageInput, dict], None], workers: int,
                 dropped: Callable[[StageInput, dict, str], None] | None = None, policy: str = "newest",
                 queue_limit: int | None = None):
        self._handle = handle
        self._on_dropped = dropped
        self._policy = make_policy(policy, queue_limit)
        self._reports: dict[str, list[tuple[int, Job, str]]] = {}  # key -> (seq, job, reason) not yet reported
        self._seq = 0
        self._busy = 0  # stages being decoded
        self._cond = threading.Condition()
        self._closing = False
        self._close_by: float | None = None
        self.superseded = 0
        self._threads = [threading.Thread(target=self._work, daemon=True, name=f"decode-{i}") for i in range(workers)]
        for t in self._threads:
            t.start()

    @property
    def pending(self) -> int:
        with self._cond:
            return len(self._policy)

    def submit(self, key: str, stage: StageInput, meta: dict, index: int = 0) -> bool:
        """Queue a stage; returns False if it replaced a pending one or was rejected (a full queue)."""
        with self._cond:
            now = time.monotonic()
            job = Job(key, index, stage.name, stage.width * stage.height, now, None, stage.has_pixels,
                      (stage, meta, self._seq))
            self._seq += 1
            dropped = self._policy.push(job, now)
            self._route(dropped)
            self._cond.notify()
        return not dropped

    def _route(self, dropped: list[tuple[Job, str]]) -> None:
        """File the reports of stages leaving unserved; those of an idle image go out now (lock held)."""
        for job, reason in dropped:
            self.superseded += reason == "superseded"
            self._reports.setdefault(job.key, []).append((job.payload[2], job, reason))
        for job, _ in dropped:
            key = job.key
            if key in self._reports and not self._policy.running(key) and not self._policy.queued(key):
                self._report(self._reports.pop(key))

    def _report(self, reports: list[tuple[int, Job, str]]) -> None:
        if self._on_dropped:
            for _, job, reason in reports:
                self._on_dropped(job.payload[0], job.payload[1], reason)

    def _work(self) -> None:
        while True:
            with self._cond:
                while True:
                    self._route(self._policy.expire(time.monotonic()))
                    if self._closing and self._close_by is not None and time.monotonic() > self._close_by:
                        return
                    batch = self._policy.pop(time.monotonic())
                    if batch or self._closing:
                        break
                    self._cond.wait()
                if not batch:
                    return
                (job,) = batch
                key, (stage, meta, seq) = job.key, job.payload
                reports = self._reports.pop(key, [])
                before = [r for r in reports if r[0] < seq]  # stages made before this one
                if len(before) < len(reports):
                    self._reports[key] = [r for r in reports if r[0] > seq]
                self._busy += 1
            try:
                self._report(before)
                self._handle(key, stage, meta)
            finally:
                while True:  # report what left while decoding, unless a queued stage of the image comes first
                    with self._cond:
                        after = None if self._policy.queued(key) else self._reports.pop(key, None)
                        if not after:
                            self._policy.done(key)
                            self._busy -= 1
                            self._cond.notify()
                            break
                    self._report(after)

    def close(self, wait_s: float | None = None) -> int:
        """Decode what is pending, for at most ``wait_s`` (None: all of it), then stop the workers.

        Returns the number of stages left undecoded. A stage running when time is up is not waited for
        (the threads are daemons): the complete images are stored, and a restart decodes them.
        """
        with self._cond:
            self._closing = True
            self._close_by = None if wait_s is None else time.monotonic() + wait_s
            self._cond.notify_all()
        for t in self._threads:
            t.join(None if wait_s is None else max(0.0, self._close_by - time.monotonic()) + 0.5)
        with self._cond:
            left = len(self._policy) + self._busy
            self._policy.clear()
            self._reports.clear()
        return left


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

    def __init__(self, path: Path, watcher_queue: int, counters: Counters, preview_bytes: int,
                 on_event: Callable[[dict], None] | None = None):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._on_event = on_event
        self._file = path.open("a", encoding="utf-8")
        self._lock = threading.Lock()
        self._watchers: list[tuple[queue.Queue, bool]] = []
        self._watcher_queue = watcher_queue
        self._counters = counters
        self._preview_bytes = preview_bytes

    def emit(self, event: dict, image: np.ndarray | None = None, durable: bool = False) -> None:
        """Log ``event`` (fsync'd when ``durable``) and hand it to the watchers."""
        with self._lock:
            if self._file.closed:  # a stream torn down after shutdown: nothing left to write to
                self._counters.inc("events_dropped_total", reason="closed")
                return
            event.setdefault("logged_at", time.time())  # wall clock: lines of several nodes line up
            self._file.write(json.dumps(event) + "\n")
            self._file.flush()
            if durable:
                os.fsync(self._file.fileno())
            watchers = list(self._watchers)
        if self._on_event is not None:
            self._on_event(event)
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


def stage_label(stage: str) -> str:
    """The stage's name for people: the semantic and map layers travel in one block, so "map" is both."""
    return "semantic+map" if stage == "map" else stage


_STAGE_LINE_STATUSES = {"stage": "decoded", "superseded": "superseded (a newer stage came first: not decoded)",
                        "rejected": "rejected (decode queue full)", "decode-error": "DECODE ERROR",
                        "decode-timeout": "DECODE TIMEOUT", "recovered": "decoded after a restart"}


def stage_line(event: dict) -> str | None:
    """One line for a stage event (None for other events; images that end incomplete get one too)."""
    status = event.get("status")
    name = f"{event.get('stream', '')} {event.get('image', '')}"
    if status in ("incomplete", "abandoned"):
        return f"{name}: {status.upper()} (layers {', '.join(event.get('layers', [])) or 'none'})"
    if status not in _STAGE_LINE_STATUSES:
        return None
    index = str(event.get("key", "")).rsplit("/", 1)[-1]
    line = (f"{name} stage {index} {stage_label(event.get('stage', '')):<14} {event.get('wire_bytes', 0):>7} B on the "
            f"wire {event.get('time_s', 0.0) * 1000:8.1f} ms after its first packet: {_STAGE_LINE_STATUSES[status]}")
    if status in ("stage", "recovered") and event.get("decode_latency_s") is not None:
        line += f" in {event['decode_latency_s'] * 1000:.0f} ms"
    if event.get("complete") and status == "stage":
        line += " (complete)"
    if event.get("error"):
        line += f": {event['error']}"
    return line


def print_stage_line(event: dict) -> None:
    line = stage_line(event)
    if line is not None:
        print(line, flush=True)


@dataclass
class _Image:
    """One image in flight on a stream (released once it is settled)."""

    order: int  # its place among the stream's images: unique within the stream, unlike wrapping ids
    label: str
    folder: Path
    first_seen: float
    wire_bytes: int = 0
    stages: int = 0
    assembly: ImageAssembly | None = None


class _Stream:
    """One sender stream's state on the receiver."""

    def __init__(self, name: str, options: ReceiverOptions):
        self.name = name
        # require_ack: the transport says "complete" only after the node has stored the image
        self.transport = TransportReceiver(max_images=options.max_images_per_stream,
                                           max_buffered_bytes=options.max_buffered_bytes, require_ack=True)
        self.labels: dict[int, str] = {}  # labels of images whose first packet has not come yet
        self.images: dict[int, _Image] = {}
        self.count = 0
        self.replies: queue.Queue = queue.Queue(options.max_replies)
        self.last_activity = time.monotonic()
        self.done = threading.Event()  # the sender's half of the call has ended

    def key(self, image: _Image, what: str | int) -> str:
        """An event key that never repeats: stream names are unique across restarts, orders within one."""
        return f"{self.name}/{image.order}/{what}"


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
        ("images_complete_total", "images whose every layer arrived, stored before they were acknowledged"),
        ("images_abandoned_total", "images their sender gave up on before they completed"),
        ("images_recovered_total", "stored images a restarted receiver decoded"),
        ("store_errors_total", "complete images that could not be stored (not acknowledged)"),
        ("images_incomplete_total", "images left incomplete when their stream ended"),
        ("stages_decoded_total", "stages decoded and written"),
        ("stages_superseded_total", "stages replaced by a newer stage of the image before decoding"),
        ("stages_rejected_total", "stages never decoded, by reason (rejected: the decode queue was full)"),
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
        self.store = ImageStore(self.out_dir)
        self.events = EventLog(self.out_dir / "events.jsonl", options.watcher_queue, self.counters,
                               options.preview_bytes, print_stage_line if options.print_stages else None)
        self.scheduler = DecodeScheduler(self._decode, options.decode_workers, self._dropped, options.policy,
                                         options.queue_limit)
        self._streams = threading.BoundedSemaphore(options.max_streams)
        self._open = 0
        self._lock = threading.Lock()
        self._readers: list[threading.Thread] = []
        self.counters.gauge_fn("streams_open", lambda: self._open, "sender streams open now")
        self.counters.gauge_fn("decode_queue", lambda: self.scheduler.pending, "stages waiting for a decoder")
        self.counters.gauge_fn("watchers", lambda: self.events.watchers, "Watch calls open now")
        self._recover()

    # ---------------------------------------------------------------- Link
    def Exchange(self, request_iterator, context):  # noqa: N802 (gRPC method name)
        check_token(context, self.options.token)
        if not self._streams.acquire(blocking=False):
            self.counters.inc("streams_refused_total", reason="full")
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many open streams")
        try:
            with self._lock:
                self._open += 1
                stream = _Stream(self.store.new_stream(), self.options)
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
                    if stream.done.is_set() or not context.is_active():  # ended, or the server is stopping
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
                    image = stream.images.get(message.label.image_id)
                    if name and image is not None and image.stages == 0:
                        image.label, image.folder = name, self.store.folder(stream.name, image.order, name)
                    elif name and len(stream.labels) < self.options.max_images_per_stream:
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
        image = None
        if image_id is not None and image_id in stream.transport.images:  # in flight
            image = stream.images.get(image_id) or self._new_image(stream, image_id, now)
            image.wire_bytes += len(data)
        if received.abandoned and image_id in stream.images:
            self._end_image(stream, stream.images.pop(image_id), "abandoned")
        if received.arrivals and image is not None:
            header = received.arrivals[0].header  # one packet completes at most one block of one image
            if image.assembly is None:
                image.assembly = ImageAssembly(header, self.options.max_render_pixels)
            stage = image.assembly.add(*(a.layer for a in received.arrivals))
            if stage is not None:
                self._on_stage(stream, image_id, image, stage, now)
        return received.feedback

    def _new_image(self, stream: _Stream, image_id: int, now: float) -> _Image:
        stream.count += 1
        label = stream.labels.pop(image_id, None) or f"image{image_id}"
        folder = self.store.folder(stream.name, stream.count, label)
        image = stream.images[image_id] = _Image(stream.count, label, folder, now)
        return image

    def _on_stage(self, stream: _Stream, image_id: int, image: _Image, stage: StageInput, now: float) -> None:
        index, assembly = image.stages, image.assembly
        image.stages += 1
        event = {"key": stream.key(image, index), "stream": stream.name, "image_id": image_id,
                 "image": image.label, "stage": stage.name, "time_s": now - image.first_seen,
                 "payload_bytes": stage.payload_bytes, "wire_bytes": image.wire_bytes, "width": stage.width,
                 "height": stage.height, "complete": assembly.complete, "status": "stage",
                 "path": str(image.folder / f"{index:02d}-{stage.name}.png")}
        if stage.scaled:
            event.update(declared_width=assembly.width, declared_height=assembly.height)
            self.counters.inc("stages_scaled_total")
        if assembly.complete:
            event["digest"] = layers_digest(assembly.layers.values())
            if not self._store(stream, image_id, image, event["digest"]):
                return
        event["_arrived"] = now
        self.scheduler.submit(f"{stream.name}/{image.order}", stage, event, index)

    def _store(self, stream: _Stream, image_id: int, image: _Image, digest: str) -> bool:
        """Store the complete image durably, then acknowledge it: receipt means stored."""
        assembly = image.assembly
        encoded = EncodedImage(assembly.width, assembly.height, list(assembly.layers.values()))
        base = {"key": stream.key(image, "stored"), "stream": stream.name, "image_id": image_id,
                "image": image.label, "stage": "", "complete": True, "digest": digest}
        try:
            path = self.store.store(image.folder, encoded)
        except MiscError as exc:
            self.counters.inc("store_errors_total")
            self.events.emit({**base, "status": "store-error", "error": str(exc)[:200]})
            return False
        self.events.emit({**base, "status": "stored", "path": str(path)}, durable=True)
        stream.transport.acknowledge(image_id)  # only now may a FEEDBACK say complete
        self.counters.inc("images_complete_total")
        del stream.images[image_id]  # settled: the decode job holds what it needs
        return True

    def _recover(self) -> None:
        """Decode the complete stage of every image stored but not decoded before a crash or a kill."""
        for stream, folder, encoded in self.store.pending():
            order, _, label = folder.name.partition("-")
            event = {"key": f"{stream}/{int(order)}/recovered", "stream": stream, "image": label, "stage": "",
                     "complete": True, "status": "recovered"}
            if encoded is None:
                self.events.emit({**event, "status": "recover-error", "error": f"{folder} does not read"})
                continue
            stage = stage_input(encoded.width, encoded.height, encoded.layers,
                                max_pixels=self.options.max_render_pixels)
            event.update(stage=stage.name, digest=layers_digest(encoded.layers), width=stage.width,
                         height=stage.height, payload_bytes=stage.payload_bytes,
                         path=str(folder / f"recovered-{stage.name}.png"), _arrived=time.monotonic())
            self.counters.inc("images_recovered_total")
            self.scheduler.submit(f"{stream}/{int(order)}", stage, event)

    def _decode(self, key: str, stage: StageInput, event: dict) -> None:
        event = dict(event)
        arrived = event.pop("_arrived")
        image = None
        stage.deadline = time.monotonic() + self.options.stage_timeout_s
        try:
            image = self.decoder.render(stage)
            save_png(event["path"], image)
            if event.get("complete"):
                self.store.mark_decoded(Path(event["path"]).parent)
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

    def _dropped(self, stage: StageInput, event: dict, reason: str) -> None:
        event = {k: v for k, v in event.items() if k != "_arrived"}
        if reason == "superseded":
            event.update(status="superseded", path="")  # logged, never decoded: a newer stage came first
            self.counters.inc("stages_superseded_total")
        else:  # "rejected" (the decode queue is full) or "deadline"
            event.update(status="rejected", reason=reason, path="")
            self.counters.inc("stages_rejected_total", reason=reason)
        self.events.emit(event)

    def _end_image(self, stream: _Stream, image: _Image, status: str) -> None:
        assembly = image.assembly
        self.counters.inc("images_abandoned_total" if status == "abandoned" else "images_incomplete_total")
        event = {"key": stream.key(image, "end"), "stream": stream.name, "image": image.label, "stage": "",
                 "status": status, "complete": False, "layers": sorted(assembly.layers) if assembly else []}
        if assembly is not None:
            event.update(width=assembly.width, height=assembly.height)
        self.events.emit(event)

    def _close_stream(self, stream: _Stream) -> None:
        for image_id, image in sorted(stream.images.items(), key=lambda item: item[1].order):
            self._end_image(stream, image, "incomplete")
            del stream.images[image_id]

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

    def close(self, wait_s: float = 5.0, decode_s: float | None = None) -> None:
        """Flush: let closing streams log what they leave incomplete, decode what is pending.

        ``decode_s`` bounds the decoding (None: all of it); what is left is logged, and the complete images
        among it are decoded by the next start (they are stored).
        """
        end = time.monotonic() + wait_s
        with self._lock:
            readers = list(self._readers)
        for reader in readers:
            reader.join(timeout=max(0.0, end - time.monotonic()))
        left = self.scheduler.close(self.options.shutdown_decode_s if decode_s is None else decode_s)
        if left:
            self.events.emit({"key": f"shutdown/{time.time():.6f}", "stream": "", "stage": "", "status": "shutdown",
                              "undecoded_stages": left})
        self.events.close()


def serve_receiver(options: ReceiverOptions, decoder) -> tuple[grpc.Server, ReceiverNode, int]:
    node = ReceiverNode(options, decoder)
    services = {"Link": sgrpc.add_LinkServicer_to_server, "Watch": sgrpc.add_WatchServicer_to_server}
    server, port = serve_node(node, services, options.listen, options.tls, options.token, options.grpc_workers)
    return server, node, port
