"""gRPC plumbing shared by the live nodes: TLS / mTLS credentials, shared-token auth, limits, health
checking and reflection.

Every server gets the standard ``grpc.health.v1.Health`` service and server reflection, so ordinary tools
(grpc_health_probe, grpcurl) work against any node.
"""

from __future__ import annotations

import hmac
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from miscnet.core.errors import MiscError

MAX_MESSAGE_BYTES = 1024 * 1024  # a packet is at most an MTU; chunks stay far under gRPC's 4 MiB
TOKEN_HEADER = "authorization"


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
    names = [*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME]
    reflection.enable_server_reflection(names, server)
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
