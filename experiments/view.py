"""A live web view of a receiver: each stream's images appear and sharpen stage by stage in a browser.

A ``Viewer`` takes the receiver's stage events (``miscnet.v1.StageEvent``, with PNG previews) from one of
two sources -- a ``miscnet.v1.Watch/Events`` call to a receiver anywhere (``watch_grpc``: ``miscnet view
--watch HOST:PORT``, with the receiver's TLS and token settings) or, inside the receiver's own process,
its event log directly (``watch_local``: ``miscnet receiver --web HOST:PORT``) -- and serves one page from
a small stdlib HTTP server (threads):

* ``/``, ``/view.js``, ``/view.css``: the page, from package data (plain HTML, JavaScript and SVG: no build
  step, nothing fetched from elsewhere, so it works offline);
* ``/events``: Server-Sent Events, one JSON message per stage event (the history first, so a page opened
  late shows everything), ``quality`` messages when a stage's quality is known, ``status`` messages
  (connected, reconnecting, gone: the page then says the receiver is gone);
* ``/png/N.png``: the stage previews (kept in memory, oldest dropped past ``preview_cache_bytes``);
* ``/state.json``: the same history as one JSON document.

Quality against a reference (PSNR, MS-SSIM, SSIMULACRA2, FLIP; experiments/metrics.py) is computed in a
thread of its own, after the stage has been sent to the page, so it never delays a picture. References
are found by the image's label: the bundled samples by name, and any ``LABEL=IMAGE`` given.

With a token, every request must carry it (``?token=...``, which the page passes on, or an
``Authorization: Bearer`` header); with a certificate and key the page is served over HTTPS.
"""

from __future__ import annotations

import hmac
import json
import queue
import ssl
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import numpy as np

from miscnet.core.errors import MiscError
from miscnet.receiver.node import stage_label

_HTML = ("index.html", "text/html; charset=utf-8")
STATIC = {"/": _HTML, "/index.html": _HTML, "/view.js": ("view.js", "text/javascript; charset=utf-8"),
          "/view.css": ("view.css", "text/css; charset=utf-8")}
# Event fields the page gets (the PNG travels separately, by URL).
PAGE_FIELDS = ("key", "stream", "image_id", "image", "stage", "time_s", "payload_bytes", "wire_bytes", "complete",
               "width", "height", "status", "decode_latency_s", "error", "png_width", "png_height")
STAGE_STATUSES = ("stage", "superseded", "rejected", "decode-error", "decode-timeout")


@dataclass
class ViewerOptions:
    web: str = "127.0.0.1:8080"  # HOST:PORT of the page (port 0: any free port)
    token: str | None = None  # required of every request when set
    tls_cert: str | None = None  # serve HTTPS with this certificate and key
    tls_key: str | None = None
    references: dict[str, str | Path] = field(default_factory=dict)  # image label -> reference image file
    samples_as_references: bool = True  # the bundled samples, by name
    history: int = 4096  # events kept for pages that connect late
    preview_cache_bytes: int = 256 * 1024 * 1024
    quality_queue: int = 256  # stages waiting for their quality at most (more: skipped, counted)


class Viewer:
    """The page's state: the event history, the previews, and the pages listening now."""

    def __init__(self, options: ViewerOptions):
        self.options = options
        self._lock = threading.Lock()
        self._history: deque[dict] = deque(maxlen=options.history)
        self._by_key: dict[str, dict] = {}
        self._pngs: OrderedDict[int, bytes] = OrderedDict()
        self._png_bytes = 0
        self._next_png = 0
        self._listeners: list[queue.Queue] = []
        self.status = {"type": "status", "state": "connecting", "detail": ""}
        self._references: dict[str, np.ndarray | None] = {}
        self._quality: queue.Queue = queue.Queue(options.quality_queue)
        self.quality_skipped = 0
        self._closed = threading.Event()
        self._quality_thread = threading.Thread(target=self._quality_worker, daemon=True, name="view-quality")
        self._quality_thread.start()

    # ------------------------------------------------------------------ input
    def on_event(self, event) -> None:
        """One StageEvent (protobuf message) from the receiver."""
        message = {"type": "event", "received_at": time.time()}
        for name in PAGE_FIELDS:
            message[name] = getattr(event, name)
        message["label"] = stage_label(event.stage)
        message["logged_at"] = event.logged_at or None  # wall clock at the receiver, when it logged the event
        png = bytes(event.png) if event.png else b""
        if png:
            message["png"] = self._keep_png(png)
        self._publish(message, keep=True)
        if png and event.status == "stage" and event.stage != "map" and event.stage != "semantic":
            reference = self._reference(event.image)
            if reference is not None:
                try:
                    self._quality.put_nowait((message["key"], event.image, reference, png))
                except queue.Full:
                    self.quality_skipped += 1

    def set_status(self, state: str, detail: str = "") -> None:
        with self._lock:
            self.status = {"type": "status", "state": state, "detail": detail, "at": time.time()}
        self._publish(self.status, keep=False)

    def _keep_png(self, png: bytes) -> int:
        with self._lock:
            n = self._next_png
            self._next_png += 1
            self._pngs[n] = png
            self._png_bytes += len(png)
            while self._png_bytes > self.options.preview_cache_bytes and len(self._pngs) > 1:
                _, old = self._pngs.popitem(last=False)
                self._png_bytes -= len(old)
        return n

    def _publish(self, message: dict, keep: bool) -> None:
        with self._lock:
            if keep:
                self._history.append(message)
                self._by_key[message["key"]] = message
                if len(self._by_key) > 2 * self.options.history:  # keys of events the history has dropped
                    live = {m["key"] for m in self._history if "key" in m}
                    self._by_key = {k: v for k, v in self._by_key.items() if k in live}
            listeners = list(self._listeners)
        for q in listeners:
            try:
                q.put_nowait(message)
            except queue.Full:  # a page that stopped reading: dropped; its EventSource reconnects to the history
                q.lost = True
                self.unlisten(q)

    # ------------------------------------------------------------------ quality
    def _reference(self, label: str) -> np.ndarray | None:
        if label in self._references:
            return self._references[label]
        from miscnet.core.image_io import load_image
        from miscnet.core.samples import SAMPLE_NAMES, sample_image_path

        path = self.options.references.get(label)
        if path is None and self.options.samples_as_references and label in SAMPLE_NAMES:
            path = sample_image_path(label)
        image = None
        if path is not None:
            try:
                image = load_image(path)
            except MiscError:
                image = None
        self._references[label] = image
        return image

    def _quality_worker(self) -> None:
        from miscnet.core.image_io import decode_image_bytes
        from miscnet.experiments.metrics import quality_report

        while not self._closed.is_set():
            try:
                item = self._quality.get(timeout=0.5)
            except queue.Empty:
                continue
            key, label, reference, png = item
            try:
                recon = decode_image_bytes(png, label)
            except MiscError:
                continue
            if recon.shape != reference.shape:  # a preview scaled to fit a message: compare at its size
                from PIL import Image

                reference = np.asarray(Image.fromarray(reference).resize((recon.shape[1], recon.shape[0]),
                                                                         Image.Resampling.LANCZOS))
            metrics = quality_report(reference, recon)
            with self._lock:
                event = self._by_key.get(key)
                if event is not None:
                    event["quality"] = metrics
            self._publish({"type": "quality", "key": key, "quality": metrics}, keep=False)

    # ------------------------------------------------------------------ output
    def snapshot(self) -> tuple[list[dict], dict]:
        with self._lock:
            return [dict(m) for m in self._history], dict(self.status)

    def png(self, n: int) -> bytes | None:
        with self._lock:
            return self._pngs.get(n)

    def listen(self) -> queue.Queue:
        q: queue.Queue = queue.Queue(4096)
        with self._lock:
            self._listeners.append(q)
        return q

    def unlisten(self, q: queue.Queue) -> None:
        with self._lock:
            self._listeners = [x for x in self._listeners if x is not q]

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            listeners = list(self._listeners)
        for q in listeners:
            try:
                q.put_nowait(None)
            except queue.Full:
                pass


# ---------------------------------------------------------------------------------------------- HTTP

def _handler_for(viewer: Viewer):
    token = viewer.options.token

    class Handler(BaseHTTPRequestHandler):
        server_version = "miscnet-view"
        protocol_version = "HTTP/1.1"
        timeout = 60  # seconds a read or write may block: a silent or stalled client lets go of its thread

        def log_message(self, format, *args):  # noqa: A002 - quiet: the page polls nothing, errors show in it
            pass

        def _authorised(self, query: dict) -> bool:
            if not token:
                return True
            sent = (query.get("token") or [""])[0]
            header = self.headers.get("Authorization", "")
            if header.startswith("Bearer "):
                sent = sent or header[7:]
            return hmac.compare_digest(sent.encode(), token.encode())

        def _send(self, status: HTTPStatus, body: bytes, content_type: str, cache: bool = False) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "max-age=3600" if cache else "no-store")
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):  # noqa: N802 (http.server's name)
            url = urlsplit(self.path)
            query = parse_qs(url.query)
            if url.path not in ("/view.js", "/view.css") and not self._authorised(query):  # code, not data
                self._send(HTTPStatus.UNAUTHORIZED, b"missing or wrong token (open the URL the viewer printed)\n",
                           "text/plain; charset=utf-8")
                return
            if url.path in STATIC:
                name, kind = STATIC[url.path]
                body = resources.files("miscnet.experiments").joinpath("web", name).read_bytes()
                self._send(HTTPStatus.OK, body, kind)
            elif url.path == "/events":
                self._events()
            elif url.path == "/state.json":
                history, status = viewer.snapshot()
                self._send(HTTPStatus.OK, json.dumps({"status": status, "events": history}).encode(),
                           "application/json")
            elif url.path.startswith("/png/") and url.path.endswith(".png") and url.path[5:-4].isdigit():
                png = viewer.png(int(url.path[5:-4]))
                if png is None:
                    self._send(HTTPStatus.NOT_FOUND, b"preview no longer kept\n", "text/plain; charset=utf-8")
                else:
                    self._send(HTTPStatus.OK, png, "image/png", cache=True)
            else:
                self._send(HTTPStatus.NOT_FOUND, b"not found\n", "text/plain; charset=utf-8")

        def _events(self) -> None:
            q = viewer.listen()  # listen before the snapshot: nothing falls between the two
            history, status = viewer.snapshot()
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-store")
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True
            seen = {m["key"] for m in history if "key" in m}
            try:
                for message in [status, *history]:
                    self._write(message)
                while True:
                    if getattr(q, "lost", False):
                        return
                    try:
                        message = q.get(timeout=10.0)
                    except queue.Empty:
                        self.wfile.write(b": keep-alive\n\n")  # notices a page that went away
                        self.wfile.flush()
                        continue
                    if message is None:
                        return
                    if message.get("type") == "event" and message["key"] in seen:
                        seen.discard(message["key"])  # already in the history sent
                        continue
                    self._write(message)
            except (BrokenPipeError, ConnectionResetError, ssl.SSLError, OSError):
                pass
            finally:
                viewer.unlisten(q)

        def _write(self, message: dict) -> None:
            self.wfile.write(b"data: " + json.dumps(message).encode() + b"\n\n")
            self.wfile.flush()

    return Handler


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


def serve_view(viewer: Viewer) -> tuple[ThreadingHTTPServer, str]:
    """Start the page's HTTP server in a thread; returns it and the page's URL (with the token, if any)."""
    host, _, port = viewer.options.web.rpartition(":")
    try:
        server = _Server((host.strip("[]"), int(port)), _handler_for(viewer))
    except (OSError, ValueError) as exc:
        raise MiscError(f"cannot serve the web view on {viewer.options.web}: {exc}") from None
    scheme = "http"
    if viewer.options.tls_cert or viewer.options.tls_key:
        if not (viewer.options.tls_cert and viewer.options.tls_key):
            server.server_close()
            raise MiscError("the web view's HTTPS needs both a certificate and a key")
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            context.load_cert_chain(viewer.options.tls_cert, viewer.options.tls_key)
        except (OSError, ssl.SSLError) as exc:
            server.server_close()
            raise MiscError(f"cannot load the web view's certificate {viewer.options.tls_cert}: {exc}") from None
        # the handshake in the request's thread, not in the accept loop a silent client would stall
        server.socket = context.wrap_socket(server.socket, server_side=True, do_handshake_on_connect=False)
        scheme = "https"
    threading.Thread(target=server.serve_forever, daemon=True, name="view-http").start()
    shown = host if host and host != "0.0.0.0" else "127.0.0.1"
    url = f"{scheme}://{shown}:{server.server_address[1]}/"
    if viewer.options.token:
        url += f"?token={viewer.options.token}"
    return server, url


# ---------------------------------------------------------------------------------------------- sources

def watch_grpc(viewer: Viewer, target: str, stop: threading.Event, tls=None, token: str | None = None,
               server_name: str | None = None, retry_s: float = 1.0) -> None:
    """Follow a receiver's Watch service until ``stop``; reconnects, and tells the page while it is gone."""
    import grpc

    from miscnet.channel.grpc_util import TlsFiles, open_channel, token_metadata
    from miscnet.v1 import services_pb2 as spb
    from miscnet.v1 import services_pb2_grpc as sgrpc

    tls = tls or TlsFiles()
    was_connected = False
    while not stop.is_set():
        channel = open_channel(target, tls, server_name=server_name)
        try:  # an idle receiver sends nothing: say "connected" once the channel is up
            grpc.channel_ready_future(channel).result(timeout=max(retry_s, 3.0))
        except grpc.FutureTimeoutError:
            channel.close()
            what = "is gone" if was_connected else "is not reachable"
            viewer.set_status("gone", f"the receiver at {target} {what} (no connection); retrying")
            stop.wait(retry_s)
            continue
        viewer.set_status("connected", target)
        was_connected = True
        call = sgrpc.WatchStub(channel).Events(spb.WatchRequest(include_png=True),
                                               metadata=token_metadata(token), wait_for_ready=False)
        def cancel_on_stop(call=call):  # ends with its call: no thread left behind per reconnection
            while call.is_active() and not stop.wait(0.5):
                pass
            call.cancel()

        threading.Thread(target=cancel_on_stop, daemon=True, name="view-cancel").start()
        try:
            for event in call:
                viewer.on_event(event)
            if not stop.is_set():  # the receiver ended the call: it is shutting down
                viewer.set_status("gone", f"the receiver at {target} ended the stream (stopped?); retrying")
        except grpc.RpcError as exc:
            if stop.is_set():
                break
            code = exc.code()
            if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                viewer.set_status("refused", f"the receiver at {target} refused the watcher: {exc.details()}")
            else:
                viewer.set_status("gone", f"the receiver at {target} is gone ({code.name.lower()}: "
                                  f"{(exc.details() or '').strip()[:160]}); retrying")
        finally:
            channel.close()
        stop.wait(retry_s)


def watch_connected(viewer: Viewer, call: Iterable, target: str, on_end: Callable[[], None] | None = None) -> None:
    """Feed ``viewer`` from an iterable of StageEvents (a local watcher queue's items, None ending it)."""
    viewer.set_status("connected", target)
    for event in call:
        if event is None:
            break
        viewer.on_event(event)
    viewer.set_status("gone", f"the receiver at {target} stopped")
    if on_end:
        on_end()


def watch_local(viewer: Viewer, event_log, target: str) -> threading.Thread:
    """Follow the event log of a receiver in this process (``miscnet receiver --web``), in a thread."""
    q = event_log.watch(include_png=True)

    def items():
        while True:
            yield q.get()

    thread = threading.Thread(target=watch_connected, args=(viewer, items(), target), daemon=True, name="view-local")
    thread.start()
    return thread
