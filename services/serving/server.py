"""Start a gRPC server with health, reflection, optional TLS and token, bound to loopback."""

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from .interceptor import ServiceInterceptor

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerSettings:
    host: str = "127.0.0.1"  # loopback unless told otherwise: no data leaves the house
    port: int = 0  # 0 = any free port (tests)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    token: str | None = None  # shared token expected as 'authorization: Bearer <token>'
    max_message_bytes: int = 1 << 20
    grace_s: float = 5.0


@dataclass
class RunningServer:
    server: grpc.aio.Server
    port: int
    health: health_aio.HealthServicer
    services: tuple[str, ...]
    grace_s: float

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", *self.services):
            await self.health.set(name, status)

    async def stop(self) -> None:
        """Drain: health says NOT_SERVING at once, running streams get the grace period."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(self.grace_s)


def _credentials(settings: ServerSettings) -> grpc.ServerCredentials | None:
    if not settings.tls_cert and not settings.tls_key:
        return None
    if not (settings.tls_cert and settings.tls_key):
        raise ValueError("TLS needs both a certificate and a key")
    return grpc.ssl_server_credentials([(Path(settings.tls_key).read_bytes(), Path(settings.tls_cert).read_bytes())])


async def start_server(
    settings: ServerSettings,
    add: Callable[[grpc.aio.Server], None],
    service_names: Sequence[str],
) -> RunningServer:
    """Build, bind and start a server; health starts NOT_SERVING until the caller says so."""
    options = [
        # The transport takes up to 4x the limit so that the interceptor, not the transport,
        # refuses an oversized request: INVALID_ARGUMENT with the limit in the message.
        ("grpc.max_receive_message_length", 4 * settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.so_reuseport", 0),
    ]
    server = grpc.aio.server(interceptors=[ServiceInterceptor(settings.token, settings.max_message_bytes)], options=options)
    add(server)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection((*service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server)
    address = f"{settings.host}:{settings.port}"
    creds = _credentials(settings)
    port = server.add_secure_port(address, creds) if creds else server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"could not bind {address}")
    await server.start()
    running = RunningServer(server, port, health, tuple(service_names), settings.grace_s)
    await running.set_serving(False)
    log.info("listening on %s:%d (%s)", settings.host, port, "TLS" if creds else "plaintext")
    return running
