"""Time to first token and tokens/s of one steered stream, in process and through gRPC,
measured side by side on the same loaded service: `python scripts/grpc_overhead.py`."""

import asyncio
import json
import statistics
import time

import grpc

from generator.events import Finished, TextDelta
from generator.server import GeneratorConfig, build_service, serve
from generator.service import GenerateSpec
from protos.steering.v1 import generator_pb2 as pb
from protos.steering.v1 import generator_pb2_grpc
from serving.server import ServerSettings

PROMPT = "Tell me about your favourite animal."
TOKENS = 32
RUNS = 5


async def in_process(service) -> tuple[float, float]:
    start = time.perf_counter()
    first = None
    async for event in service.stream(GenerateSpec(prompt=PROMPT, concept="happy", max_tokens=TOKENS)):
        if isinstance(event, TextDelta) and first is None:
            first = time.perf_counter() - start
        if isinstance(event, Finished):
            return first * 1000, event.completion_tokens / (time.perf_counter() - start)
    raise RuntimeError("no finish")


async def over_grpc(stub) -> tuple[float, float]:
    start = time.perf_counter()
    first = None
    async for event in stub.Generate(pb.GenerateRequest(prompt=PROMPT, concept="happy", max_tokens=TOKENS)):
        kind = event.WhichOneof("event")
        if kind == "text" and first is None:
            first = time.perf_counter() - start
        if kind == "finished":
            return first * 1000, event.finished.completion_tokens / (time.perf_counter() - start)
    raise RuntimeError("no finish")


async def main() -> None:
    service = build_service(GeneratorConfig())
    running = await serve(ServerSettings(), GeneratorConfig(), service=service)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.server.port}") as channel:
            stub = generator_pb2_grpc.GeneratorStub(channel)
            await in_process(service)  # warm-up: first-use word lookup, allocator
            await over_grpc(stub)
            local, remote = [], []
            for _ in range(RUNS):  # interleaved, so drift hits both alike
                local.append(await in_process(service))
                remote.append(await over_grpc(stub))
    finally:
        await running.stop()
    med = lambda xs, i: round(statistics.median(x[i] for x in xs), 2)
    print(json.dumps({
        "runs": RUNS, "max_tokens": TOKENS,
        "in_process": {"ttft_ms_p50": med(local, 0), "tokens_per_s_p50": med(local, 1)},
        "grpc": {"ttft_ms_p50": med(remote, 0), "tokens_per_s_p50": med(remote, 1)},
        "grpc_added_ttft_ms": round(med(remote, 0) - med(local, 0), 2),
    }, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
