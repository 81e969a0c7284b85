"""Token, TLS, loopback bind, and the one interceptor's status mapping, over real gRPC."""

import asyncio
import socket
import subprocess
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos.steering.v1 import tagger_pb2, tagger_pb2_grpc
from serving.server import ServerSettings, start_server
from steering.errors import FailedPrecondition, ResourceExhausted


class Raising(tagger_pb2_grpc.TaggerServicer):
    """A real servicer whose behaviour is chosen by the request text."""

    async def Tag(self, request, context):
        if request.text == "boom":
            raise RuntimeError("secret internal detail")
        if request.text == "busy":
            raise ResourceExhausted("queue full; retry", retry_after_s=2.5)
        if request.text == "unvalidated":
            raise FailedPrecondition("model is not validated")
        return tagger_pb2.TagResponse(label=tagger_pb2.EMOTION_HAPPY, confidence=0.9)


async def _with_server(settings: ServerSettings, body):
    running = await start_server(settings, lambda s: tagger_pb2_grpc.add_TaggerServicer_to_server(Raising(), s), ["steering.v1.Tagger"])
    await running.set_serving(True)
    try:
        return await body(running)
    finally:
        await running.stop()


def _tag(text: str, settings: ServerSettings = ServerSettings(), metadata=None, credentials=None, target_host="127.0.0.1"):
    async def body(running):
        target = f"{target_host}:{running.port}"
        channel = grpc.aio.secure_channel(target, credentials, options=[("grpc.ssl_target_name_override", "localhost")]) \
            if credentials else grpc.aio.insecure_channel(target)
        async with channel:
            return await tagger_pb2_grpc.TaggerStub(channel).Tag(tagger_pb2.TagRequest(text=text), metadata=metadata, timeout=10)

    return asyncio.run(_with_server(settings, body))


def test_unexpected_errors_are_internal_with_a_generic_message(caplog) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        _tag("boom")
    assert info.value.code() == grpc.StatusCode.INTERNAL
    assert "secret internal detail" not in info.value.details() and "server log" in info.value.details()
    assert "secret internal detail" in caplog.text  # the detail is in the log, not on the wire


def test_domain_errors_keep_their_codes() -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        _tag("busy")
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert dict(info.value.trailing_metadata())["retry-after-ms"] == "2500"
    with pytest.raises(grpc.aio.AioRpcError) as info:
        _tag("unvalidated")
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION


@pytest.mark.parametrize("metadata", [None, (("authorization", "Bearer wrong"),), (("authorization", "s3cret"),)])
def test_missing_or_wrong_token_is_unauthenticated(metadata) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        _tag("hi", ServerSettings(token="s3cret"), metadata=metadata)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED and "Bearer" in info.value.details()


def test_right_token_passes_and_health_stays_open() -> None:
    resp = _tag("hi", ServerSettings(token="s3cret"), metadata=(("authorization", "Bearer s3cret"),))
    assert resp.label == tagger_pb2.EMOTION_HAPPY

    async def body(running):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            return await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))

    assert asyncio.run(_with_server(ServerSettings(token="s3cret"), body)).status == health_pb2.HealthCheckResponse.SERVING


def _certificate(tmp: Path) -> tuple[Path, Path]:
    key, cert = tmp / "key.pem", tmp / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True)
    return key, cert


def test_tls_with_a_generated_certificate(tmp_path: Path) -> None:
    key, cert = _certificate(tmp_path)
    settings = ServerSettings(tls_cert=cert, tls_key=key)
    creds = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
    assert _tag("hi", settings, credentials=creds).label == tagger_pb2.EMOTION_HAPPY
    with pytest.raises(grpc.aio.AioRpcError) as info:  # plaintext against a TLS port fails
        _tag("hi", settings)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def _outward_address() -> str | None:
    """One of this machine's own non-loopback IPv4 addresses, if it has one."""
    import psutil

    for addresses in psutil.net_if_addrs().values():
        for a in addresses:
            if a.family == socket.AF_INET and not a.address.startswith("127."):
                return a.address
    return None


def test_default_bind_is_loopback() -> None:
    assert ServerSettings().host == "127.0.0.1"
    address = _outward_address()
    if not address or address.startswith("127."):
        pytest.skip(f"no non-loopback address on this machine ({address}) to prove the bind against")

    async def body(running):
        with socket.socket() as s:
            s.settimeout(2)
            return s.connect_ex((address, running.port))

    assert asyncio.run(_with_server(ServerSettings(), body)) != 0


def test_oversized_request_is_invalid_argument_and_says_the_limit() -> None:
    settings = ServerSettings(max_message_bytes=64 * 1024)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        _tag("x" * (settings.max_message_bytes + 100), settings)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "the limit is 65536" in info.value.details()
    assert _tag("small request", settings).label == tagger_pb2.EMOTION_HAPPY  # the server goes on serving


def test_socket_guard_blocks_outbound_connections() -> None:
    """No data leaves the house: the suite runs behind a guard that refuses any connection
    that is not to loopback (see conftest.py); here it is shown to fire."""
    from conftest import OUTBOUND_ATTEMPTS

    with socket.socket() as s, pytest.raises(ConnectionRefusedError, match="socket guard"):
        s.connect(("192.0.2.1", 80))  # TEST-NET-1
    assert OUTBOUND_ATTEMPTS[-1] == repr(("192.0.2.1", 80))
    OUTBOUND_ATTEMPTS.pop()
    with socket.socket() as s:  # loopback stays open
        s.bind(("127.0.0.1", 0))
        s.listen()
        with socket.socket() as c:
            c.connect(s.getsockname())
