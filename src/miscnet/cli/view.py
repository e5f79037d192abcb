"""``miscnet view``: the live web view of a receiver (experiments/view.py), and ``miscnet receiver --web``."""

from __future__ import annotations

import argparse
import os
import signal
import threading

from miscnet.cli.argtypes import host_port
from miscnet.core.errors import MiscError


def _references(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        label, sep, path = pair.partition("=")
        if not sep or not label or not path:
            raise MiscError(f"--reference {pair!r}: expected LABEL=IMAGE (the label the sender gives the image)")
        if not os.path.isfile(path):
            raise MiscError(f"--reference {label}: no such file {path}")
        out[label] = path
    return out


def _write_port_file(path: str | None, url: str) -> None:
    if path:
        from urllib.parse import urlsplit

        from miscnet.core.image_io import atomic_write_bytes

        atomic_write_bytes(path, str(urlsplit(url).port).encode())


def add_receiver_web_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("live web view")
    g.add_argument("--web", type=host_port, metavar="HOST:PORT",
                   help="serve the live view at http://HOST:PORT/ (https with --tls-cert; --token required of it too)")
    g.add_argument("--web-port-file", metavar="FILE", help="write the web view's bound port here (with port 0)")
    g.add_argument("--reference", action="append", default=[], metavar="LABEL=IMAGE",
                   help="reference image for an image label, for its quality in the view (the bundled samples "
                   "are known by name); repeatable")
    g.add_argument("--warm", action="store_true", help="decode a bundled sample's stages before listening, so the "
                   "first image does not pay the decoder's start-up")
    g.add_argument("--quiet", action="store_true", help="no line per stage on stdout")


def start_receiver_web(args: argparse.Namespace, node, port: int):
    """The view inside the receiver's process, fed from its event log (no network hop: TLS and token apply
    to the page). Returns its HTTP server, or None without --web."""
    if not args.web:
        return None
    from miscnet.experiments.view import Viewer, ViewerOptions, serve_view, watch_local

    viewer = Viewer(ViewerOptions(web=args.web, token=args.token, tls_cert=args.tls_cert, tls_key=args.tls_key,
                                  references=_references(args.reference)))
    server, url = serve_view(viewer)
    watch_local(viewer, node.events, f"{args.listen.rsplit(':', 1)[0]}:{port}")
    _write_port_file(args.web_port_file, url)
    print(f"receiver web view at {url}", flush=True)
    return server


def cmd_view(args: argparse.Namespace) -> int:
    from miscnet.channel.grpc_util import TlsFiles
    from miscnet.experiments.view import Viewer, ViewerOptions, serve_view, watch_grpc

    viewer = Viewer(ViewerOptions(web=args.web, token=args.web_token or args.token, tls_cert=args.web_tls_cert,
                                  tls_key=args.web_tls_key, references=_references(args.reference)))
    tls = TlsFiles(args.tls_cert, args.tls_key, args.tls_ca)
    server, url = serve_view(viewer)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    watcher = threading.Thread(target=watch_grpc, args=(viewer, args.watch, stop, tls, args.token, args.server_name),
                               daemon=True, name="view-watch")
    watcher.start()
    _write_port_file(args.web_port_file, url)
    print(f"watching the receiver at {args.watch}; live view at {url}", flush=True)
    stop.wait()
    viewer.close()
    server.shutdown()
    watcher.join(timeout=5)
    print("view stopped", flush=True)
    return 0


def register(sub) -> None:
    p = sub.add_parser("view", help="serve a live web page of a receiver's stages (watches it over gRPC)")
    p.add_argument("--watch", type=host_port, required=True, metavar="HOST:PORT", help="the receiver")
    p.add_argument("--web", type=host_port, default="127.0.0.1:8080", metavar="HOST:PORT",
                   help="where to serve the page (default 127.0.0.1:8080; port 0: any free port)")
    p.add_argument("--web-port-file", metavar="FILE", help="write the page's bound port here")
    p.add_argument("--reference", action="append", default=[], metavar="LABEL=IMAGE",
                   help="reference image for an image label (the bundled samples are known by name); repeatable")
    g = p.add_argument_group("the receiver's security (as for miscnet sender / stats)")
    g.add_argument("--tls-ca", metavar="PEM", help="CA of the receiver's certificate (enables TLS)")
    g.add_argument("--tls-cert", metavar="PEM", help="client certificate, for a receiver that requires one")
    g.add_argument("--tls-key", metavar="PEM", help="its private key")
    g.add_argument("--server-name", help="TLS name expected of the receiver")
    g.add_argument("--token", default=os.environ.get("MISCNET_TOKEN"),
                   help="the receiver's shared token (default: $MISCNET_TOKEN); the page then requires it too")
    g = p.add_argument_group("the page's own security")
    g.add_argument("--web-token", help="token the page requires instead of --token")
    g.add_argument("--web-tls-cert", metavar="PEM", help="serve the page over HTTPS with this certificate")
    g.add_argument("--web-tls-key", metavar="PEM", help="and this key")
    p.set_defaults(func=cmd_view)
