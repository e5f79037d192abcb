"""gRPC plumbing against real loopback servers: reflection v1 and v1alpha, and the connection diagnosis."""

import re
import socket

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_reflection.v1alpha import reflection_pb2

from miscnet.channel.grpc_util import REFLECTION_V1, TlsFiles, diagnose_connection, start_server
from miscnet.core.config import EncoderConfig
from miscnet.core.errors import MiscError
from miscnet.core.image_io import load_image
from miscnet.core.samples import sample_image_path, sample_sidecar_path
from miscnet.core.semantics import load_semantics
from miscnet.receiver.classical import ClassicalDecoder
from miscnet.receiver.node import ReceiverOptions, serve_receiver
from miscnet.sender.encoder import encode_image
from miscnet.sender.node import SenderOptions, send_images
from miscnet.v1 import services_pb2 as spb
from miscnet.v1 import services_pb2_grpc as sgrpc


@pytest.fixture
def serve():
    """serve(tls) -> "127.0.0.1:PORT" of a started server with health and reflection only."""
    servers = []

    def start(tls: TlsFiles | None = None, register=lambda server: None, names=()) -> str:
        server, _, port = start_server("127.0.0.1:0", tls or TlsFiles(), register, list(names))
        servers.append(server)
        return f"127.0.0.1:{port}"

    yield start
    for server in servers:
        server.stop(grace=0).wait()


def _reflect(channel: grpc.Channel, service: str, request: reflection_pb2.ServerReflectionRequest):
    call = channel.stream_stream(f"/{service}/ServerReflectionInfo",
                                 request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                                 response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)
    (response,) = list(call(iter([request]), timeout=5))
    return response


@pytest.mark.parametrize("service", [REFLECTION_V1, "grpc.reflection.v1alpha.ServerReflection"])
def test_reflection_v1_and_v1alpha(serve, service):
    target = serve()
    with grpc.insecure_channel(target) as channel:
        listed = _reflect(channel, service, reflection_pb2.ServerReflectionRequest(list_services=""))
        names = {s.name for s in listed.list_services_response.service}
        assert names == {"grpc.health.v1.Health", REFLECTION_V1, "grpc.reflection.v1alpha.ServerReflection"}
        # what `grpcurl describe` asks next: the file that defines a service
        found = _reflect(channel, service, reflection_pb2.ServerReflectionRequest(
            file_containing_symbol="grpc.health.v1.Health"))
        files = [descriptor_pb2.FileDescriptorProto.FromString(raw)
                 for raw in found.file_descriptor_response.file_descriptor_proto]
        assert any(f.package == "grpc.health.v1" for f in files)


@pytest.fixture
def tls(certs):
    files, ca = certs
    (server_cert, server_key), (client_cert, client_key) = files["server"], files["client"]
    rogue_cert, rogue_key = files["rogue"]
    return {
        "server": TlsFiles(server_cert, server_key),
        "mtls-server": TlsFiles(server_cert, server_key, ca),
        "client": TlsFiles(ca=ca),
        "client-cert": TlsFiles(client_cert, client_key, ca),
        "rogue-cert": TlsFiles(rogue_cert, rogue_key, ca),
        "wrong-ca": TlsFiles(ca=rogue_cert),
    }


HEALTHY = "answers HTTP/2 now and no network or TLS problem was found"


@pytest.mark.parametrize("server, client, server_name, expected", [
    (None, None, None, HEALTHY),
    ("server", "client", None, HEALTHY),
    ("mtls-server", "client-cert", None, HEALTHY),
    ("server", None, None, r"^TLS mismatch: 127\.0\.0\.1:\d+ speaks TLS; give the sender --tls-ca$"),
    (None, "client", None, r"^TLS mismatch: 127\.0\.0\.1:\d+ does not speak TLS"),
    ("server", "wrong-ca", None, r"fails verification against the CA .*rogue\.pem: unable to get local issuer"),
    ("server", "client", "other.example", r"hostname mismatch: .* not valid for 'other\.example'.*--server-name"),
    ("mtls-server", "client", None, r"^mutual TLS: .* requires a client certificate.*--tls-cert and --tls-key"),
    ("mtls-server", "rogue-cert", None, r"^mutual TLS: .* rejected the client certificate .*rogue\.pem"),
])
def test_diagnosis_against_real_servers(serve, tls, server, client, server_name, expected):
    target = serve(tls[server] if server else TlsFiles())
    client_tls = tls[client] if client else TlsFiles()
    reason = diagnose_connection(target, client_tls, server_name)
    assert "\n" not in reason
    assert re.search(expected, reason), reason


def test_diagnosis_without_a_grpc_server():
    with socket.socket() as probe:  # a port that was free a moment ago
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    assert diagnose_connection(f"127.0.0.1:{port}", TlsFiles()) == \
        f"nothing is listening on 127.0.0.1:{port} (connection refused)"
    assert diagnose_connection("no-such-host.invalid:50051", TlsFiles()).startswith("cannot resolve the host")
    # a socket that accepts connections (the kernel's backlog) but never answers: not gRPC
    with socket.socket() as mute:
        mute.bind(("127.0.0.1", 0))
        mute.listen()
        target = f"127.0.0.1:{mute.getsockname()[1]}"
        assert "does not speak gRPC (HTTP/2)" in diagnose_connection(target, TlsFiles(), timeout_s=0.3)


@pytest.fixture(scope="module")
def one_image():
    image = load_image(sample_image_path("astronaut"))
    sem, _ = load_semantics(sample_sidecar_path("astronaut"))
    return [("astronaut", encode_image(image, sem, EncoderConfig(budget_bytes=1800)).encoded)]


@pytest.mark.parametrize("server, client, expected", [
    ("server", None, r"^cannot reach 127\.0\.0\.1:\d+ within 1 s: TLS mismatch: .* speaks TLS; give the sender"),
    ("mtls-server", "client", r"^cannot reach .* within 1 s: mutual TLS: .* requires a client certificate"),
])
def test_sender_names_the_tls_problem(tmp_path, tls, one_image, server, client, expected):
    options = ReceiverOptions(out_dir=tmp_path / "rx", listen="127.0.0.1:0", tls=tls[server])
    rx_server, node, port = serve_receiver(options, ClassicalDecoder())
    try:
        with pytest.raises(MiscError, match=expected):
            send_images(one_image, SenderOptions(target=f"127.0.0.1:{port}", connect_timeout_s=1,
                                                 tls=tls[client] if client else TlsFiles()))
    finally:
        rx_server.stop(grace=0).wait()
        node.close()


class _Unavailable(sgrpc.LinkServicer):
    def Exchange(self, request_iterator, context):  # noqa: N802 - the gRPC method name
        context.abort(grpc.StatusCode.UNAVAILABLE, "going away")


def test_sender_diagnoses_a_stream_refused_before_any_reply(serve, one_image):
    """A ready channel whose first call fails UNAVAILABLE (as a TLS 1.3 mTLS refusal does): the diagnosis
    is appended to the sender's message."""
    target = serve(register=lambda server: sgrpc.add_LinkServicer_to_server(_Unavailable(), server),
                   names=[spb.DESCRIPTOR.services_by_name["Link"].full_name])
    with pytest.raises(MiscError, match=rf"^lost the connection to {target} \(restarted or gone\?\): "
                                        rf"127\.0\.0\.1:\d+ {HEALTHY}"):
        send_images(one_image, SenderOptions(target=target))
