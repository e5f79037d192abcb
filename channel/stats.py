"""A node's counters and gauges, served two ways: the ``miscnet.v1.Stats`` gRPC service (on the node's own
port, behind its TLS and token) and a Prometheus text endpoint over HTTP (``serve_metrics``).

Counting is called per packet, so it is one lock and one dict update; everything else (help texts,
sorting, gauge functions) is paid when a snapshot is taken.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from miscnet.channel.grpc_util import (
    TlsFiles,
    check_token,
    diagnose_connection,
    open_channel,
    start_server,
    token_metadata,
)
from miscnet.core.errors import MiscError
from miscnet.v1 import services_pb2 as spb
from miscnet.v1 import services_pb2_grpc as sgrpc

SERVICE_NAME = spb.DESCRIPTOR.services_by_name["Stats"].full_name
PREFIX = "miscnet_"
KINDS = ("counter", "gauge")

_Key = tuple[str, tuple[tuple[str, str], ...]]


@dataclass(frozen=True)
class Sample:
    name: str
    labels: dict[str, str]
    value: float
    kind: str  # "counter" | "gauge"
    help: str


class Counters:
    """Thread-safe named counters and gauges of one node, with optional labels."""

    def __init__(self, node: str):
        self.node = node  # node kind: "receiver" or "relay"
        self.started = time.monotonic()
        self._lock = threading.Lock()
        self._values: dict[_Key, float] = {}
        self._meta: dict[str, tuple[str, str]] = {}  # name -> (kind, help)
        self._fns: dict[str, Callable[[], float]] = {}

    def describe(self, name: str, help: str, kind: str = "counter") -> None:
        if kind not in KINDS:
            raise ValueError(f"metric kind must be one of {KINDS}, not {kind!r}")
        with self._lock:
            self._meta[name] = (kind, help)

    def inc(self, name: str, amount: float = 1, **labels: str) -> None:
        key = (name, tuple(sorted(labels.items())) if labels else ())
        with self._lock:
            self._values[key] = self._values.get(key, 0) + amount

    def set(self, name: str, value: float, **labels: str) -> None:
        key = (name, tuple(sorted(labels.items())) if labels else ())
        with self._lock:
            self._values[key] = value
            self._meta.setdefault(name, ("gauge", name))  # set() makes an undescribed name a gauge

    def gauge_fn(self, name: str, fn: Callable[[], float], help: str) -> None:
        """A gauge read on every snapshot (a queue length, the number of open streams)."""
        with self._lock:
            self._fns[name] = fn
            self._meta[name] = ("gauge", help)

    def value(self, name: str, **labels: str) -> float:
        """The current value; 0 when never touched."""
        with self._lock:
            fn = self._fns.get(name)
            if fn is None:
                return float(self._values.get((name, tuple(sorted(labels.items()))), 0))
        return _read(fn)

    def uptime_s(self) -> float:
        return time.monotonic() - self.started

    def snapshot(self) -> list[Sample]:
        """Every value, sorted by (name, labels); a described metric never touched reads 0."""
        with self._lock:
            values, meta, fns = dict(self._values), dict(self._meta), dict(self._fns)
        for name, fn in fns.items():  # outside the lock: fn may take locks of its own
            values[(name, ())] = _read(fn)
        seen = {name for name, _ in values}
        values.update({(name, ()): 0 for name in meta if name not in seen})
        return [Sample(name, dict(labels), float(value), *meta.get(name, ("counter", name)))  # help = name
                for (name, labels), value in sorted(values.items(), key=lambda kv: kv[0])]


def _read(fn: Callable[[], float]) -> float:
    try:
        return float(fn())
    except Exception:  # noqa: BLE001 - one broken gauge must not take the whole snapshot down
        return math.nan


class _StatsServicer(sgrpc.StatsServicer):
    def __init__(self, counters: Counters, token: str | None):
        self.counters, self.token = counters, token

    def Get(self, request, context):  # noqa: N802 - the gRPC method name
        check_token(context, self.token)
        metrics = [spb.Metric(name=s.name, kind=s.kind, help=s.help, labels=s.labels, value=s.value)
                   for s in self.counters.snapshot()]
        return spb.StatsResponse(node=self.counters.node, uptime_s=self.counters.uptime_s(), metrics=metrics)


def add_stats_service(server: grpc.Server, counters: Counters, token: str | None) -> str:
    """Serve ``counters`` as miscnet.v1.Stats on server; returns the service name for health / reflection."""
    sgrpc.add_StatsServicer_to_server(_StatsServicer(counters, token), server)
    return SERVICE_NAME


def serve_node(node, services: dict[str, Callable], listen: str, tls: TlsFiles, token: str | None,
               workers: int) -> tuple[grpc.Server, int]:
    """Start a node's gRPC server: ``services`` maps each miscnet.v1 service name to its ``add_*_to_server``
    (each given ``node``), plus Stats over ``node.counters``, health and reflection. A failed start closes the node,
    so a port in use leaves no thread behind."""
    names = [spb.DESCRIPTOR.services_by_name[name].full_name for name in services]

    def register(server: grpc.Server) -> None:
        for add in services.values():
            add(node, server)
        names.append(add_stats_service(server, node.counters, token))

    try:
        server, _, port = start_server(listen, tls, register, names, workers=workers)
    except BaseException:
        node.close()
        raise
    return server, port


class _Collector(Collector):
    """Reads the counters on every scrape; names get the miscnet_ prefix, labels are kept."""

    def __init__(self, counters: Counters):
        self.counters = counters

    def collect(self) -> Iterator[Metric]:
        families: dict[str, Metric] = {}
        for s in self.counters.snapshot():
            family = families.get(s.name)
            if family is None:
                make = CounterMetricFamily if s.kind == "counter" else GaugeMetricFamily
                family = families[s.name] = make(PREFIX + s.name, s.help)
            # a counter family drops a trailing _total from its name; its samples carry it
            family.add_sample(family.name + ("_total" if s.kind == "counter" else ""), s.labels, s.value)
        uptime = GaugeMetricFamily(PREFIX + "uptime_seconds", f"seconds since the {self.counters.node} started",
                                   value=self.counters.uptime_s())
        return iter([*families.values(), uptime])


class MetricsServer:
    """The running /metrics endpoint; shutdown() stops it and frees its port."""

    def __init__(self, httpd, thread: threading.Thread):
        self._httpd, self._thread = httpd, thread

    def shutdown(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


def serve_metrics(listen: str, counters: Counters) -> tuple[MetricsServer, int]:
    """Prometheus text exposition of counters at http://HOST:PORT/metrics (port 0: any free port)."""
    host, sep, port_text = listen.rpartition(":")
    if not sep or not port_text.isdigit() or int(port_text) > 65535:
        raise MiscError(f"metrics address must be HOST:PORT, not {listen!r}")
    registry = CollectorRegistry(auto_describe=False)  # private: nothing of the process's default registry
    registry.register(_Collector(counters))
    try:
        httpd, thread = start_http_server(int(port_text), addr=host.strip("[]") or "0.0.0.0", registry=registry)
    except OSError as exc:
        raise MiscError(f"cannot serve metrics on {listen}: {exc.strerror or exc}") from None
    return MetricsServer(httpd, thread), httpd.server_address[1]


def fetch_stats(target: str, tls: TlsFiles, token: str | None = None, server_name: str | None = None,
                timeout_s: float = 5.0) -> spb.StatsResponse:
    """One Stats.Get call to a node; MiscError with a one-line reason when it fails."""
    with open_channel(target, tls, server_name=server_name) as channel:
        try:
            return sgrpc.StatsStub(channel).Get(spb.StatsRequest(), timeout=timeout_s,
                                                metadata=token_metadata(token))
        except grpc.RpcError as exc:
            code = exc.code()
            if code == grpc.StatusCode.UNAVAILABLE:  # fails fast: the first connection attempt failed
                reason = diagnose_connection(target, tls, server_name, timeout_s=min(timeout_s, 3.0))
                raise MiscError(f"cannot reach {target}: {reason}") from None
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise MiscError(f"{target} did not answer within {timeout_s:g} s") from None
            if code == grpc.StatusCode.UNAUTHENTICATED:
                raise MiscError(f"{target} refused the token ({exc.details()})") from None
            if code == grpc.StatusCode.UNIMPLEMENTED:
                raise MiscError(f"{target} does not serve {SERVICE_NAME} (not a receiver or relay?)") from None
            raise MiscError(f"{target}: {code.name}: {exc.details()}") from None
