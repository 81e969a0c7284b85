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
