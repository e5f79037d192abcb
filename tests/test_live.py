"""The live nodes over real gRPC on loopback: receiver, relay, sender."""

import threading

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from live_nodes import Receiver, encoded_samples, receiver_process, wait_for

from miscnet.channel.grpc_util import TlsFiles
from miscnet.channel.link import DuplexConfig, LinkConfig
from miscnet.channel.packet import DATA, Packet
from miscnet.channel.relay import RelayOptions, serve_relay
from miscnet.channel.transport import TransportConfig
from miscnet.core.errors import MiscError
from miscnet.experiments.simulate import Scenario, SimImage, simulate
from miscnet.receiver.classical import ClassicalDecoder
from miscnet.receiver.node import ReceiverOptions, serve_receiver
from miscnet.sender.node import SenderOptions, send_images
from miscnet.v1 import services_pb2 as spb
from miscnet.v1 import services_pb2_grpc as sgrpc


@pytest.fixture(scope="module")
def images():
    return encoded_samples(("astronaut", "chelsea", "rocket"), 1800)


def dropped_by_reason(node, name="packets_dropped_total"):
    return {s.labels["reason"]: s.value for s in node.counters.snapshot() if s.name == name and s.labels}


def complete_digests(rx):
    return {e["image"]: e["digest"] for e in rx.events() if e.get("digest")}


@pytest.fixture
def receiver(tmp_path):
    rx = Receiver(tmp_path)
    yield rx
    rx.stop()


def relay_for(target, loss="none", rate="256kbit", delay="20ms", seed=0, **kw):
    link = DuplexConfig(LinkConfig.from_strings(rate=rate, delay=delay, loss=loss))
    server, node, port = serve_relay(RelayOptions(listen="127.0.0.1:0", forward=target, link=link, seed=seed, **kw))
    return server, node, f"127.0.0.1:{port}"


def test_arq_over_lossy_relay_is_bit_exact(receiver, images):
    server, node, target = relay_for(receiver.target, loss="gemodel 10% 40%", seed=3)
    try:
        options = SenderOptions(target=target, transport=TransportConfig(mode="arq", mtu=300))
        results = send_images(images, options)
    finally:
        server.stop(grace=1).wait()
        node.close()
    assert all(r.delivered and r.complete for r in results)
    assert node.link_total("forward", "packets_lost") > 0  # loss happened and was repaired
    assert wait_for(lambda: len(complete_digests(receiver)) == len(images))
    assert complete_digests(receiver) == {r.name: r.digest for r in results}
    for e in receiver.events():
        if e["status"] == "stage":
            assert (receiver.options.out_dir / e["path"]).exists()


def test_live_matches_virtual_time(receiver, images):
    """Same link, no loss, one image: the same stages, in the same order, with the same bytes.

    How closely live times follow virtual ones is a benchmark's business (bench_live), not a test's: on a
    loaded machine no bound holds."""
    name, encoded = images[0]
    link = DuplexConfig(LinkConfig.from_strings(rate="64kbit", delay="40ms"))
    transport = TransportConfig(mode="arq")
    (sim,) = simulate([SimImage(name, encoded, None)], Scenario(link=link, transport=transport, quality=False))
    server, node, port = serve_relay(RelayOptions(listen="127.0.0.1:0", forward=receiver.target, link=link))
    try:
        send_images([(name, encoded)], SenderOptions(target=f"127.0.0.1:{port}", transport=transport))
    finally:
        server.stop(grace=1).wait()
        node.close()
    assert wait_for(lambda: any(e.get("complete") for e in receiver.events()))
    live = [e for e in receiver.events() if e["status"] in ("stage", "superseded")]
    assert [e["stage"] for e in live] == [e["stage"] for e in sim["events"]]
    times = [e["time_s"] for e in live]
    keys = [f"{live[0]['stream']}/1/{i}" for i in range(len(live))]
    assert times == sorted(times) and [e["key"] for e in live] == keys  # logged in the order made
    assert [e["payload_bytes"] for e in live] == [e["payload_bytes"] for e in sim["events"]]


def test_health_and_reflection(receiver):
    server, node, target = relay_for(receiver.target)
    try:
        for address in (receiver.target, target):
            with grpc.insecure_channel(address) as channel:
                health = health_pb2_grpc.HealthStub(channel)
                for service in ("", "miscnet.v1.Link"):
                    status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
                    assert status == health_pb2.HealthCheckResponse.SERVING
                stub = reflection_pb2_grpc.ServerReflectionStub(channel)
                (response,) = list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
                    list_services="")]), timeout=5))
                names = {s.name for s in response.list_services_response.service}
                assert "miscnet.v1.Link" in names and "grpc.health.v1.Health" in names
    finally:
        server.stop(grace=1).wait()
        node.close()


def test_tls_and_mutual_tls(tmp_path, images, certs):
    files, ca = certs
    server_cert, server_key = files["server"]
    one = images[:1]
    # TLS: the client checks the server against the CA
    rx = Receiver(tmp_path / "tls", tls=TlsFiles(server_cert, server_key))
    try:
        ok = send_images(one, SenderOptions(target=rx.target, tls=TlsFiles(ca=ca), transport=TransportConfig("arq")))
        assert ok[0].delivered
        with pytest.raises(MiscError, match="cannot reach"):  # plaintext client against a TLS server
            send_images(one, SenderOptions(target=rx.target, connect_timeout_s=2))
    finally:
        rx.stop()
    # mTLS: the server also requires a client certificate signed by the CA
    rx = Receiver(tmp_path / "mtls", tls=TlsFiles(server_cert, server_key, ca))
    try:
        client_cert, client_key = files["client"]
        good = TlsFiles(client_cert, client_key, ca)
        (result,) = send_images(one, SenderOptions(target=rx.target, tls=good, transport=TransportConfig("arq")))
        assert result.delivered
        rogue_cert, rogue_key = files["rogue"]
        for bad in (TlsFiles(ca=ca), TlsFiles(rogue_cert, rogue_key, ca)):
            with pytest.raises(MiscError):
                send_images(one, SenderOptions(target=rx.target, tls=bad, connect_timeout_s=2,
                                               transport=TransportConfig("arq")))
    finally:
        rx.stop()


def test_token_is_required_when_set(tmp_path, images):
    rx = Receiver(tmp_path, token="s3cret")
    try:
        with pytest.raises(MiscError, match="token"):
            send_images(images[:1], SenderOptions(target=rx.target, token="wrong", transport=TransportConfig("arq")))
        assert send_images(images[:1], SenderOptions(target=rx.target, token="s3cret",
                                                     transport=TransportConfig("arq")))[0].delivered
    finally:
        rx.stop()


def test_32_concurrent_senders_lose_nothing(receiver, images):
    server, node, target = relay_for(receiver.target, loss="random 5%", rate="2mbit", delay="10ms")
    results, errors = {}, []

    def run(i):
        name, encoded = images[i % len(images)]
        try:
            (r,) = send_images([(f"{name}-{i}", encoded)],
                               SenderOptions(target=target, transport=TransportConfig(mode="hybrid")))
            results[i] = r
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(32)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    finally:
        server.stop(grace=1).wait()
        node.close()
    assert not errors and len(results) == 32 and all(r.delivered for r in results.values())
    assert wait_for(lambda: len(complete_digests(receiver)) == 32)
    assert complete_digests(receiver) == {r.name: r.digest for r in results.values()}


def test_hostile_packets_are_dropped_and_counted(receiver, images):
    rng = np.random.default_rng(0)
    good = Packet(DATA, 9, 0, 0, 1, b"\x00" * 40).encode()
    hostile = [rng.bytes(int(n)) for n in rng.integers(0, 300, 50)]
    hostile += [good[:-1] + bytes([good[-1] ^ 1]),  # checksum
                bytes([0xC0]) + good[1:],  # unknown version
                Packet(DATA, 9, 200, 0, 5, b"x" * 10).encode(),  # block index out of range
                Packet(DATA, 9, 0, 0, 60000, b"x" * 10).encode()]  # absurd symbol count
    with grpc.insecure_channel(receiver.target) as channel:
        stub = sgrpc.LinkStub(channel)
        replies = list(stub.Exchange(iter([spb.LinkMessage(packet=p) for p in hostile]), timeout=10))
        assert replies == []
        with pytest.raises(grpc.RpcError) as err:  # over the message-size limit: refused by gRPC itself
            list(stub.Exchange(iter([spb.LinkMessage(packet=b"x" * (2 * 1024 * 1024))]), timeout=10))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    drops = dropped_by_reason(receiver.node)
    assert sum(drops.values()) >= len(hostile) - 2
    assert drops["checksum"] >= 1 and drops["fields"] >= 2
    # the node still serves a real sender, bit-exact
    (r,) = send_images(images[:1], SenderOptions(target=receiver.target, transport=TransportConfig("arq")))
    assert r.delivered
    assert wait_for(lambda: complete_digests(receiver).get(r.name) == r.digest)


def test_sender_disconnect_mid_image_is_reported_incomplete(receiver, images):
    from miscnet.channel.transport import ImageSender

    name, encoded = images[0]
    datagrams = ImageSender(0, encoded, TransportConfig(mode="none", mtu=200)).start(0.0)
    messages = [spb.LinkMessage(label=spb.ImageLabel(image_id=0, name="cut"))]
    messages += [spb.LinkMessage(packet=d.data) for d in datagrams[: len(datagrams) // 2]]
    with grpc.insecure_channel(receiver.target) as channel:
        list(sgrpc.LinkStub(channel).Exchange(iter(messages), timeout=10))
    assert wait_for(lambda: {e["status"] for e in receiver.events()} >= {"incomplete", "stage"})
    events = [e for e in receiver.events() if e["image"] == "cut"]
    (incomplete,) = [e for e in events if e["status"] == "incomplete"]
    assert "semantic" in incomplete["layers"] and "pixel.1" not in incomplete["layers"]
    kept = [e for e in events if e["status"] == "stage"]
    assert kept and all((receiver.options.out_dir / e["path"]).exists() for e in kept)


def test_receiver_gone_gives_a_clear_error(tmp_path, images):
    rx = Receiver(tmp_path)
    target = rx.target
    rx.stop()
    with pytest.raises(MiscError, match="cannot reach"):
        send_images(images[:1], SenderOptions(target=target, connect_timeout_s=1))


def _restart_receiver_during(tmp_path, images, retries):
    """Send three images through a slow relay; restart the receiver on its port after the first one."""
    rx = Receiver(tmp_path / "a")
    port = rx.port
    server, node, target = relay_for(rx.target, rate="16kbit", delay="10ms")
    outcome = {}

    def run():
        try:
            outcome["results"] = send_images(images, SenderOptions(target=target, retries=retries,
                                                                   transport=TransportConfig("arq")))
        except MiscError as exc:
            outcome["error"] = str(exc)

    t = threading.Thread(target=run)
    t.start()
    assert wait_for(lambda: any(e.get("complete") for e in rx.events()))
    rx.stop(grace=0)  # a crash, as far as the open stream can tell
    rx2 = Receiver.__new__(Receiver)
    rx2.options = ReceiverOptions(out_dir=tmp_path / "b", listen=f"127.0.0.1:{port}")
    rx2.server, rx2.node, rx2.port = serve_receiver(rx2.options, ClassicalDecoder())
    t.join(timeout=120)
    server.stop(grace=1).wait()
    node.close()
    rx2.stop()
    return outcome


def test_receiver_restart_fails_clearly_without_retry(tmp_path, images):
    outcome = _restart_receiver_during(tmp_path, images, retries=0)
    assert "error" in outcome and "not sent" in outcome["error"] and "--retry" in outcome["error"]


def test_receiver_restart_is_survived_with_retry(tmp_path, images):
    outcome = _restart_receiver_during(tmp_path, images, retries=3)
    assert "error" not in outcome, outcome
    assert [r.name for r in outcome["results"]] == [n for n, _ in images]
    assert all(r.delivered for r in outcome["results"])


def test_busy_port_is_a_clear_error(receiver, tmp_path):
    with pytest.raises(MiscError, match="cannot listen"):
        serve_receiver(ReceiverOptions(out_dir=tmp_path / "second", listen=receiver.target), ClassicalDecoder())


def test_nodes_stop_cleanly_on_ctrl_c(tmp_path):
    import signal
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    port_file = tmp_path / "port"
    proc = receiver_process(tmp_path / "rx", port_file)
    try:
        assert wait_for(port_file.exists, timeout=60)
        busy = subprocess.run([sys.executable, "-m", "miscnet", "receiver", "--listen",
                               f"127.0.0.1:{port_file.read_text()}", "--out", str(tmp_path / "rx2")], cwd=root,
                              capture_output=True, text=True, timeout=60)
        assert busy.returncode == 2 and busy.stderr.startswith("miscnet: cannot listen")
        assert "Traceback" not in busy.stderr
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0 and "receiver stopped" in out and "Traceback" not in err
    assert (tmp_path / "rx" / "events.jsonl").exists()


def test_live_senders_share_one_bottleneck_at_the_relay(receiver, images):
    """Every stream crosses its own link, then one shared, fair-queued bottleneck (the fleet's element)."""
    shared = LinkConfig.from_strings(rate="256kbit", delay="5ms", discipline="drr", name="shared")
    options = RelayOptions(listen="127.0.0.1:0", forward=receiver.target, shared=shared,
                           link=DuplexConfig(LinkConfig.from_strings(rate="1mbit", delay="5ms")))
    server, node, port = serve_relay(options)
    results, errors = [], []

    def run(i):
        try:
            results.extend(send_images([(f"{name}-{i}", enc) for name, enc in images],
                                       SenderOptions(target=f"127.0.0.1:{port}", transport=TransportConfig("arq"))))
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        flows = node.shared.flow_bytes()
    finally:
        server.stop(grace=1).wait()
        node.close()
    assert not errors and len(results) == 12 and all(r.delivered for r in results)
    assert len(flows) == 4 and min(flows.values()) > 0  # each stream's packets crossed the one bottleneck
    assert node.counters.value("shared_packets_delivered") >= sum(r.stats["packets_sent"] for r in results) // 2
    assert wait_for(lambda: len(complete_digests(receiver)) == 12)
