"""In-process servers on port 0 for the gRPC tests: real servers, real channels, real models."""

import asyncio
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
