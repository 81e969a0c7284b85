"""In-process servers on port 0 for the gRPC tests: real servers, real channels, real models."""

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from generator.server import GeneratorConfig, serve
from generator.service import GeneratorService
from serving.server import ServerSettings


def run(coro: Awaitable[Any]) -> Any:
    return asyncio.run(coro)


async def with_generator(
    service: GeneratorService,
    body: Callable[[grpc.aio.Channel, Any], Awaitable[Any]],
    config: GeneratorConfig = GeneratorConfig(),
    settings: ServerSettings = ServerSettings(),
) -> Any:
    running = await serve(settings, config, service=service)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.server.port}") as channel:
            return await body(channel, running)
    finally:
        await running.stop()


async def collect(call) -> list:
    return [event async for event in call]


async def chat(service: GeneratorService, turns: list[str], tagger_address: str | None, max_tokens: int = 12,
               fail_fast: bool = False) -> list:
    """One Chat call over real gRPC: each turn written after the last one's reply finished.
    Returns every event, each reply read to its end."""
    from protos.steering.v1 import generator_pb2 as pb
    from protos.steering.v1 import generator_pb2_grpc

    async def body(channel: grpc.aio.Channel, _running: Any) -> list:
        call = generator_pb2_grpc.GeneratorStub(channel).Chat(timeout=120)
        events = []
        for text in turns:
            await call.write(pb.ChatTurn(text=text, max_tokens=max_tokens))
            while True:
                events.append(await call.read())
                if events[-1].WhichOneof("event") == "reply" and events[-1].reply.WhichOneof("event") == "finished":
                    break
        await call.done_writing()
        return events

    return await with_generator(service, body, GeneratorConfig(tagger=tagger_address, fail_fast=fail_fast))


class StackInThread:
    """The real tagger and generator servers on an event loop of their own, in a thread, so
    that synchronous clients (Hypothesis tests, load loops) can call them over real gRPC."""

    def __init__(self, service: GeneratorService, config: GeneratorConfig = GeneratorConfig()) -> None:
        import threading

        from tagger.server import serve as serve_tagger

        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="test-servers", daemon=True)
        self._thread.start()

        async def start():
            tagger = await serve_tagger(ServerSettings())
            cfg = dataclasses.replace(config, tagger=f"127.0.0.1:{tagger.port}")
            return tagger, await serve(ServerSettings(), cfg, service=service)

        self.tagger, self.generator = self.call(start())
        self.tagger_address = f"127.0.0.1:{self.tagger.port}"
        self.generator_address = f"127.0.0.1:{self.generator.server.port}"

    def call(self, coro: Awaitable[Any], timeout: float = 300) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        async def stop():
            await self.generator.stop()
            await self.tagger.stop()

        self.call(stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=30)
