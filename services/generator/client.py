"""A small client for Blip: streaming replies, deadlines, retries while the server is unavailable."""

import asyncio
import logging
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass

import grpc

from protos.steering.v1 import generator_pb2 as pb
from protos.steering.v1 import generator_pb2_grpc

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 5
    first_backoff_s: float = 0.2
    max_backoff_s: float = 3.0


class BlipClient:
    def __init__(self, address: str, token: str | None = None, credentials: grpc.ChannelCredentials | None = None,
                 retry: RetryPolicy = RetryPolicy()) -> None:
        # Reconnect soon after a restarted generator is back, not after gRPC's default backoff (up to 120 s).
        options = (("grpc.initial_reconnect_backoff_ms", 250), ("grpc.max_reconnect_backoff_ms", 2000),
                   ("grpc.min_reconnect_backoff_ms", 250))
        self._channel = (grpc.aio.secure_channel(address, credentials, options) if credentials
                         else grpc.aio.insecure_channel(address, options))
        self._stub = generator_pb2_grpc.GeneratorStub(self._channel)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        self._retry = retry

    async def __aenter__(self) -> "BlipClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._channel.close()

    async def _retrying(self, open_stream, timeout_s: float | None) -> AsyncIterator:
        """Retry only while nothing has been received: a reply is never duplicated."""
        backoff = self._retry.first_backoff_s
        for attempt in range(1, self._retry.attempts + 1):
            received = False
            try:
                async for item in open_stream(timeout_s):
                    received = True
                    yield item
                return
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE or received or attempt == self._retry.attempts:
                    raise
                log.info("generator unavailable (attempt %d), retrying in %.1fs", attempt, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self._retry.max_backoff_s)

    def generate(self, request: pb.GenerateRequest, timeout_s: float | None = 60.0) -> AsyncIterator[pb.GenerateEvent]:
        return self._retrying(lambda t: self._stub.Generate(request, timeout=t, metadata=self._metadata), timeout_s)

    def chat(self, turns: Iterable[str], timeout_s: float | None = 300.0, max_tokens: int = 0,
             sampling: pb.Sampling | None = None, kl: pb.KlSettings | None = None) -> AsyncIterator[pb.ChatEvent]:
        """One Chat stream for a scripted conversation: each turn is sent after the previous reply finished."""
        turns = list(turns)

        def open_stream(t: float | None):
            call = self._stub.Chat(timeout=t, metadata=self._metadata)

            async def run():
                for text in turns:
                    await call.write(pb.ChatTurn(text=text, max_tokens=max_tokens, sampling=sampling, kl=kl))
                    async for event in _until_finished(call):
                        yield event
                await call.done_writing()

            return run()

        return self._retrying(open_stream, timeout_s)

    async def list_models(self, timeout_s: float = 10.0) -> pb.ListModelsResponse:
        return await self._stub.ListModels(pb.ListModelsRequest(), timeout=timeout_s, metadata=self._metadata)


async def _until_finished(call) -> AsyncIterator[pb.ChatEvent]:
    while True:
        event = await call.read()
        if event is grpc.aio.EOF:
            return
        yield event
        if event.WhichOneof("event") == "reply" and event.reply.WhichOneof("event") == "finished":
            return
