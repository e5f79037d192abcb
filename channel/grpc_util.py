"""gRPC plumbing shared by the live nodes: TLS / mTLS credentials, shared-token auth, limits, health
checking and reflection, and a diagnosis of connections that fail.

Every server gets the standard ``grpc.health.v1.Health`` service and server reflection (v1 and v1alpha), so
ordinary tools (grpc_health_probe, grpcurl) work against any node.
"""

from __future__ import annotations

import hmac
import socket
import ssl
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

from miscnet.core.errors import MiscError

MAX_MESSAGE_BYTES = 1024 * 1024  # a packet is at most an MTU; chunks stay far under gRPC's 4 MiB
TOKEN_HEADER = "authorization"
# Link/Exchange metadata: where in the relay's access-link trace this stream starts, in whole milliseconds
STREAM_OFFSET_KEY = "miscnet-trace-offset-ms"
MAX_STREAM_OFFSET_MS = 2**31 - 1
REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"


@dataclass(frozen=True)
class TlsFiles:
    cert: str | None = None  # this node's certificate (PEM)
    key: str | None = None  # its private key
    ca: str | None = None  # CA that signs the peer: a server with ca requires client certs (mTLS)

    @property
    def enabled(self) -> bool:
        return bool(self.cert or self.key or self.ca)

    def _read(self, path: str | None, what: str) -> bytes | None:
        if path is None:
            return None
        try:
            return Path(path).read_bytes()
        except OSError as exc:
            raise MiscError(f"cannot read TLS {what} {path}: {exc.strerror or exc}") from None

    def server_credentials(self) -> grpc.ServerCredentials:
        if not (self.cert and self.key):
            raise MiscError("a TLS server needs both --tls-cert and --tls-key")
        ca = self._read(self.ca, "CA")
        pair = [(self._read(self.key, "key"), self._read(self.cert, "certificate"))]
        return grpc.ssl_server_credentials(pair, root_certificates=ca, require_client_auth=ca is not None)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        key, cert = self._read(self.key, "key"), self._read(self.cert, "certificate")
        if (key is None) != (cert is None):
            raise MiscError("a TLS client certificate needs both --tls-cert and --tls-key")
        return grpc.ssl_channel_credentials(root_certificates=self._read(self.ca, "CA"), private_key=key,
                                            certificate_chain=cert)


def channel_options(max_message: int = MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    return [("grpc.max_send_message_length", max_message), ("grpc.max_receive_message_length", max_message)]


def open_channel(target: str, tls: TlsFiles, max_message: int = MAX_MESSAGE_BYTES,
                 server_name: str | None = None) -> grpc.Channel:
    options = channel_options(max_message)
    if server_name:
        options.append(("grpc.ssl_target_name_override", server_name))
    if tls.enabled:
        return grpc.secure_channel(target, tls.channel_credentials(), options=options)
    return grpc.insecure_channel(target, options=options)


def token_metadata(token: str | None) -> list[tuple[str, str]]:
    return [(TOKEN_HEADER, f"Bearer {token}")] if token else []


def check_token(context: grpc.ServicerContext, token: str | None) -> None:
    """Abort the call unless it carries the shared token (constant-time comparison)."""
    if not token:
        return
    sent = dict(context.invocation_metadata()).get(TOKEN_HEADER, "")
    if not hmac.compare_digest(sent.encode(), f"Bearer {token}".encode()):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong token")


def start_server(listen: str, tls: TlsFiles, register, service_names: list[str], workers: int = 16,
                 max_message: int = MAX_MESSAGE_BYTES) -> tuple[grpc.Server, health.HealthServicer, int]:
    """A started server with ``register(server)``'s services, health and reflection; returns the bound port."""
    # no SO_REUSEPORT: a second node on a busy port must fail, not silently share it with the first
    options = [*channel_options(max_message), ("grpc.so_reuseport", 0)]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers), options=options,
                         maximum_concurrent_rpcs=None)
    register(server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [*service_names, health.SERVICE_NAME, REFLECTION_V1, reflection.SERVICE_NAME]
    _enable_reflection(names, server)
    try:
        if tls.enabled:
            port = server.add_secure_port(listen, tls.server_credentials())
        else:
            port = server.add_insecure_port(listen)
    except RuntimeError as exc:
        raise MiscError(f"cannot listen on {listen}: {exc}") from None
    if port == 0:
        raise MiscError(f"cannot listen on {listen}: address in use or invalid")
    server.start()
    for name in ["", *service_names]:
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, health_servicer, port


def _enable_reflection(names: list[str], server: grpc.Server) -> None:
    """Reflection v1alpha, and v1 with the same servicer: grpcio-reflection ships only v1alpha, and the two
    protos declare the same messages with the same field numbers (only the package differs, which is not on
    the wire), so v1alpha's classes read and write v1's bytes exactly; current grpcurl asks v1 first."""
    servicer = reflection.ReflectionServicer(names)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    method = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo, request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        REFLECTION_V1, {"ServerReflectionInfo": method}),))


def _host_port(target: str) -> tuple[str, int]:
    """HOST:PORT, [V6]:PORT or a gRPC name (dns:///HOST:PORT, ipv4:HOST:PORT); gRPC's default port is 443."""
    for scheme in ("dns:", "ipv4:", "ipv6:"):
        if target.startswith(scheme):
            target = target[len(scheme):].lstrip("/")
    host, sep, port = target.rpartition(":")
    if not sep or "]" in port or (":" in host and not host.startswith("[")):  # no port given
        host, port = target, "443"
    return host.strip("[]"), int(port)


def _connect(host: str, port: int, timeout_s: float) -> socket.socket:
    return socket.create_connection((host, port), timeout=timeout_s)


def _speaks_tls(host: str, port: int, timeout_s: float) -> bool:
    """Send a ClientHello made in memory and look at the answer's first bytes: a TLS record (handshake 22
    or alert 21, version 3.x) means TLS; a plaintext gRPC server answers with HTTP/2 frames, or closes."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE  # only the record header matters here
    outgoing = ssl.MemoryBIO()
    hello = ctx.wrap_bio(ssl.MemoryBIO(), outgoing)
    try:
        hello.do_handshake()
    except ssl.SSLWantReadError:  # the ClientHello is written; the answer would be read next
        pass
    with _connect(host, port, timeout_s) as raw:
        raw.sendall(outgoing.read())
        try:
            head = raw.recv(2, socket.MSG_WAITALL)
        except OSError:
            return False
    return len(head) == 2 and head[0] in (21, 22) and head[1] == 3


def _speaks_h2(host: str, port: int, timeout_s: float) -> bool:
    """The HTTP/2 client preface and an empty SETTINGS frame: an HTTP/2 server answers with SETTINGS (type 4)."""
    with _connect(host, port, timeout_s) as raw:
        raw.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0]))
        try:
            head = raw.recv(9, socket.MSG_WAITALL)
        except OSError:
            return False
    return len(head) == 9 and head[3] == 4


_HOSTNAME_MISMATCH = (62, 64)  # X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH


def _tls_problem(host: str, port: int, where: str, tls: TlsFiles, server_name: str | None,
                 timeout_s: float) -> str | None:
    """Repeat the client's handshake with the ssl module, which says why it fails; None when it succeeds."""
    name = server_name or host
    try:
        ctx = ssl.create_default_context(cafile=tls.ca)  # no --tls-ca: the system's CAs, as gRPC's own
        if tls.cert and tls.key:
            ctx.load_cert_chain(tls.cert, tls.key)
    except (OSError, ssl.SSLError) as exc:
        return f"cannot use the client's TLS files: {exc}"
    ctx.set_alpn_protocols(["h2"])
    refusal = "closed the connection"
    try:
        with _connect(host, port, timeout_s) as raw, ctx.wrap_socket(raw, server_hostname=name) as conn:
            if conn.selected_alpn_protocol() != "h2":
                return f"{where} speaks TLS but not HTTP/2 (no ALPN h2): not a gRPC server"
            # TLS 1.3: the server checks a client certificate after the handshake has completed on the
            # client's side, so its refusal (an alert, or just a close) comes with the first read
            try:
                if conn.recv(1):
                    return None
            except TimeoutError:
                return None
            except ssl.SSLError as exc:
                refusal = exc.reason or str(exc)
    except ssl.SSLCertVerificationError as exc:
        if exc.verify_code in _HOSTNAME_MISMATCH:
            return (f"TLS hostname mismatch: the certificate of {where} is not valid for {name!r}; "
                    f"give the sender --server-name with a name the certificate holds")
        against = f"the CA {tls.ca}" if tls.ca else "the system's CAs (give the sender --tls-ca)"
        return f"TLS: the certificate of {where} fails verification against {against}: {exc.verify_message}"
    except ssl.SSLError as exc:
        if "ALERT" not in (exc.reason or ""):  # TLS 1.2 refuses a client certificate within the handshake
            return f"TLS handshake with {where} failed: {exc.reason or exc}"
        refusal = exc.reason
    except OSError as exc:
        return f"TLS connection to {where} failed: {exc.strerror or exc}"
    if not tls.cert:
        return (f"mutual TLS: {where} requires a client certificate ({refusal}); "
                f"give the sender --tls-cert and --tls-key")
    return f"mutual TLS: {where} rejected the client certificate {tls.cert} ({refusal})"


def diagnose_connection(target: str, tls: TlsFiles, server_name: str | None = None, timeout_s: float = 3.0) -> str:
    """One line on why a gRPC channel to target does not become ready, found with plain sockets and ssl."""
    try:
        host, port = _host_port(target)
    except ValueError:
        return f"{target!r} is not HOST:PORT"
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        _connect(host, port, timeout_s).close()
        speaks_tls = _speaks_tls(host, port, timeout_s)
        if not tls.enabled:
            if speaks_tls:
                return f"TLS mismatch: {where} speaks TLS; give the sender --tls-ca"
            if not _speaks_h2(host, port, timeout_s):
                return f"{where} accepts connections but does not speak gRPC (HTTP/2): the wrong port?"
        elif not speaks_tls:
            return (f"TLS mismatch: {where} does not speak TLS; drop the sender's --tls-* options "
                    f"or give the server --tls-cert and --tls-key")
        else:
            problem = _tls_problem(host, port, where, tls, server_name, timeout_s)
            if problem:
                return problem
    except socket.gaierror:
        return f"cannot resolve the host {host!r}"
    except ConnectionRefusedError:
        return f"nothing is listening on {where} (connection refused)"
    except TimeoutError:
        return f"no answer from {where} within {timeout_s:g} s (a firewall, or the wrong address?)"
    except OSError as exc:
        return f"cannot connect to {where}: {exc.strerror or exc}"
    return f"{where} answers HTTP/2 now and no network or TLS problem was found (busy, or restarted meanwhile?)"
