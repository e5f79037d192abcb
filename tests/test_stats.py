"""A node's counters: their semantics, the Stats RPC on a real loopback server, the Prometheus endpoint."""

import math
import socket
import threading
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from miscnet.channel.grpc_util import TlsFiles, start_server, token_metadata
from miscnet.channel.stats import SERVICE_NAME, Counters, Sample, add_stats_service, fetch_stats, serve_metrics
from miscnet.core.errors import MiscError
from miscnet.v1 import services_pb2 as spb
from miscnet.v1 import services_pb2_grpc as sgrpc


def _counters() -> Counters:
    c = Counters("relay")
    c.describe("packets_forwarded", "packets passed on")
    c.describe("packets_dropped", "packets dropped, by reason")
    c.describe("streams_open", "open streams", kind="gauge")
    c.inc("packets_forwarded", 3)
    c.inc("packets_dropped", reason="checksum")
    c.inc("packets_dropped", 2, reason="loss")
    c.set("queue_bytes", 1500, link="forward")
    return c


def test_counters_labels_gauges_and_defaults():
    c = _counters()
    assert c.value("packets_forwarded") == 3
    assert c.value("packets_dropped", reason="loss") == 2 and c.value("packets_dropped") == 0
    assert c.value("never_touched") == 0
    c.inc("streams_open")
    c.inc("streams_open", -1)  # a gauge goes both ways
    c.set("queue_bytes", 300, link="forward")
    assert c.value("queue_bytes", link="forward") == 300
    assert c.snapshot() == [
        Sample("packets_dropped", {"reason": "checksum"}, 1.0, "counter", "packets dropped, by reason"),
        Sample("packets_dropped", {"reason": "loss"}, 2.0, "counter", "packets dropped, by reason"),
        Sample("packets_forwarded", {}, 3.0, "counter", "packets passed on"),
        Sample("queue_bytes", {"link": "forward"}, 300.0, "gauge", "queue_bytes"),  # undescribed: help = name
        Sample("streams_open", {}, 0.0, "gauge", "open streams"),
    ]
    with pytest.raises(ValueError):
        c.describe("x", "y", kind="histogram")


def test_gauge_fn_is_read_on_every_snapshot():
    c = Counters("receiver")
    queue = [1, 2]
    c.gauge_fn("queue_length", lambda: len(queue), "stages waiting to be decoded")
    assert c.value("queue_length") == 2
    (sample,) = c.snapshot()
    assert (sample.value, sample.kind, sample.help) == (2.0, "gauge", "stages waiting to be decoded")
    queue.append(3)
    assert c.snapshot()[0].value == 3.0
    c.gauge_fn("broken", lambda: 1 / 0, "raises")
    assert math.isnan(c.value("broken")) and c.snapshot()[1].value == 3.0  # a broken gauge reads NaN


def test_counting_from_many_threads_loses_nothing():
    c = Counters("relay")
    n, threads = 20_000, 8

    def work(i):
        for _ in range(n):
            c.inc("packets")
            c.inc("bytes", 2, stream=str(i % 2))

    pool = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    assert c.value("packets") == n * threads
    assert c.value("bytes", stream="0") == c.value("bytes", stream="1") == n * threads


@pytest.fixture
def stats_server():
    """stats_server(counters, token, tls) -> target of a real server with the Stats service."""
    servers = []

    def start(counters: Counters, token: str | None = None, tls: TlsFiles | None = None) -> str:
        names: list[str] = []  # filled by register, before start_server lists them for health and reflection
        server, _, port = start_server("127.0.0.1:0", tls or TlsFiles(),
                                       lambda s: names.append(add_stats_service(s, counters, token)), names)
        servers.append(server)
        return f"127.0.0.1:{port}"

    yield start
    for server in servers:
        server.stop(grace=0).wait()


def test_stats_rpc(stats_server):
    c = _counters()
    target = stats_server(c)
    response = fetch_stats(target, TlsFiles())
    assert response.node == "relay" and response.uptime_s > 0
    got = [(m.name, dict(m.labels), m.value, m.kind, m.help) for m in response.metrics]
    assert got == [(s.name, s.labels, s.value, s.kind, s.help) for s in c.snapshot()]
    with grpc.insecure_channel(target) as channel:  # listed for health checking as the nodes list theirs
        check = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME))
        assert SERVICE_NAME == "miscnet.v1.Stats" and check.status == health_pb2.HealthCheckResponse.SERVING


def test_stats_rpc_needs_the_token(stats_server):
    target = stats_server(_counters(), token="s3cret")
    assert fetch_stats(target, TlsFiles(), token="s3cret").node == "relay"
    with grpc.insecure_channel(target) as channel:
        stub = sgrpc.StatsStub(channel)
        for metadata in (token_metadata("wrong"), []):
            with pytest.raises(grpc.RpcError) as err:
                stub.Get(spb.StatsRequest(), metadata=metadata, timeout=5)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(MiscError, match=r"refused the token"):
        fetch_stats(target, TlsFiles(), token="wrong")


def test_stats_rpc_over_tls_and_its_failures(stats_server, certs):
    files, ca = certs
    target = stats_server(_counters(), tls=TlsFiles(*files["server"]))
    assert fetch_stats(target, TlsFiles(ca=ca)).node == "relay"
    with pytest.raises(MiscError, match=r"^cannot reach .*: TLS mismatch: .* speaks TLS"):
        fetch_stats(target, TlsFiles())
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(MiscError, match=r"nothing is listening"):
        fetch_stats(f"127.0.0.1:{port}", TlsFiles(), timeout_s=2)


def test_prometheus_endpoint():
    c = _counters()
    c.gauge_fn("queue_length", lambda: 7, "stages waiting")
    server, port = serve_metrics("127.0.0.1:0", c)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
            text = reply.read().decode()
    finally:
        server.shutdown()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for s in c.snapshot():
        family = families["miscnet_" + s.name]
        assert (family.type, family.documentation) == (s.kind, s.help)
        sample_name = family.name + ("_total" if s.kind == "counter" else "")
        (value,) = [x.value for x in family.samples if x.name == sample_name and x.labels == s.labels]
        assert value == s.value
    assert families["miscnet_uptime_seconds"].samples[0].value > 0
    with socket.socket() as again:  # shutdown() closed the listener (SO_REUSEADDR: past the TIME_WAIT)
        again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        again.bind(("127.0.0.1", port))
        again.listen()


def test_metrics_address_errors():
    c = Counters("receiver")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(MiscError, match=rf"^cannot serve metrics on 127\.0\.0\.1:{port}: .*in use"):
            serve_metrics(f"127.0.0.1:{port}", c)
    for bad in ("9100", "localhost:http", "127.0.0.1:70000"):
        with pytest.raises(MiscError, match=r"^metrics address must be HOST:PORT"):
            serve_metrics(bad, c)
    with pytest.raises(MiscError, match=r"^cannot serve metrics on no-such-host\.invalid:0"):
        serve_metrics("no-such-host.invalid:0", c)
