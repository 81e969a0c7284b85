"""One interceptor for every service: authentication, then domain errors -> status codes.

Domain errors (steering.errors) carry their meaning in their type; this is the only
place that turns them into gRPC codes. Anything else is a bug: the client gets INTERNAL
with a generic message and the details go to the log, never to the wire.
"""

import hmac
import logging
from collections.abc import Awaitable, Callable

import grpc

from steering.errors import (
    ConfigError,
    FailedPrecondition,
    InvalidArgument,
    ModelLoadError,
    NotFoundError,
    PermissionDenied,
    ResourceExhausted,
    Unavailable,
    VectorError,
)

log = logging.getLogger(__name__)

# Most specific first: the first matching type wins.
_CODES: tuple[tuple[type[Exception], grpc.StatusCode], ...] = (
    (InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFoundError, grpc.StatusCode.NOT_FOUND),
    (PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (VectorError, grpc.StatusCode.FAILED_PRECONDITION),
    (ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (Unavailable, grpc.StatusCode.UNAVAILABLE),
    (ModelLoadError, grpc.StatusCode.UNAVAILABLE),
    (ConfigError, grpc.StatusCode.INVALID_ARGUMENT),
)
# Health checks stay open so that probes without the token still work; they reveal nothing.
_OPEN_PREFIXES = ("/grpc.health.v1.Health/",)


def status_for(exc: Exception) -> grpc.StatusCode:
    for kind, code in _CODES:
        if isinstance(exc, kind):
            return code
    return grpc.StatusCode.INTERNAL


async def _abort(context: grpc.aio.ServicerContext, exc: Exception, method: str) -> None:
    code = status_for(exc)
    if code is grpc.StatusCode.INTERNAL:
        log.exception("internal error in %s", method)
        message = "internal error; the server log has the details"
    else:
        message = str(exc)
        if isinstance(exc, ResourceExhausted):
            context.set_trailing_metadata((("retry-after-ms", str(int(exc.retry_after_s * 1000))),))
    await context.abort(code, message)


class _Undecodable:
    """What an oversized request, or one that is not valid protobuf (for example a string
    field holding invalid UTF-8), deserialises to, so that the handler answers
    INVALID_ARGUMENT rather than gRPC's generic INTERNAL for a failed deserialisation."""

    def __init__(self, message: str) -> None:
        self.message = message


def _tolerant(deserialize: Callable | None, max_bytes: int) -> Callable | None:
    if deserialize is None:
        return None

    def wrapper(data: bytes) -> object:
        if len(data) > max_bytes:
            return _Undecodable(f"the request is {len(data)} bytes; the limit is {max_bytes}")
        try:
            return deserialize(data)
        except Exception as exc:
            return _Undecodable(f"the request is not a valid message (string fields must be UTF-8): {exc}")

    return wrapper


def _checked(request: object) -> object:
    if isinstance(request, _Undecodable):
        raise InvalidArgument(request.message)
    return request


async def _checked_stream(requests):
    async for request in requests:
        yield _checked(request)


def _passthrough(exc: Exception) -> bool:
    # An abort already carries its status.
    return isinstance(exc, grpc.aio.AbortError)


def _wrap_unary(fn: Callable, method: str, streaming_request: bool) -> Callable:
    async def wrapper(request, context):
        try:
            request = _checked_stream(request) if streaming_request else _checked(request)
            return await fn(request, context)
        except Exception as exc:  # not BaseException: a cancellation must stay a cancellation
            if _passthrough(exc):
                raise
            await _abort(context, exc, method)

    return wrapper


def _wrap_streaming(fn: Callable, method: str, streaming_request: bool) -> Callable:
    async def wrapper(request, context):
        try:
            request = _checked_stream(request) if streaming_request else _checked(request)
            async for item in fn(request, context):
                yield item
        except Exception as exc:  # not BaseException: a cancellation must stay a cancellation
            if _passthrough(exc):
                raise
            await _abort(context, exc, method)

    return wrapper


def _denied(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    async def deny_unary(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def deny_stream(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover - makes this an async generator

    if handler.unary_unary or handler.stream_unary:
        key = "unary_unary" if handler.unary_unary else "stream_unary"
        return handler._replace(**{key: deny_unary})
    key = "unary_stream" if handler.unary_stream else "stream_stream"
    return handler._replace(**{key: deny_stream})


class ServiceInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, token: str | None = None, max_request_bytes: int = 1 << 20) -> None:
        self._token = token
        self._max_request_bytes = max_request_bytes

    def _authorised(self, details: grpc.HandlerCallDetails) -> bool:
        if not self._token or details.method.startswith(_OPEN_PREFIXES):
            return True
        metadata = dict(details.invocation_metadata or ())
        given = metadata.get("authorization", "")
        return hmac.compare_digest(given.encode(), f"Bearer {self._token}".encode())

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return handler
        handler = handler._replace(request_deserializer=_tolerant(handler.request_deserializer, self._max_request_bytes))
        if not self._authorised(details):
            return _denied(handler, "missing or wrong token: send metadata 'authorization: Bearer <token>'")
        method = details.method
        if handler.unary_unary:
            return handler._replace(unary_unary=_wrap_unary(handler.unary_unary, method, False))
        if handler.stream_unary:
            return handler._replace(stream_unary=_wrap_unary(handler.stream_unary, method, True))
        if handler.unary_stream:
            return handler._replace(unary_stream=_wrap_streaming(handler.unary_stream, method, False))
        return handler._replace(stream_stream=_wrap_streaming(handler.stream_stream, method, True))
