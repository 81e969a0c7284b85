"""Exit 0 when a gRPC service reports SERVING: `python -m serving.healthcheck 127.0.0.1:50052 steering.v1.Generator`.
Used by docker-compose health checks."""

import asyncio
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


async def check(address: str, service: str, timeout_s: float = 3.0) -> bool:
    async with grpc.aio.insecure_channel(address) as channel:
        try:
            resp = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.aio.AioRpcError:
            return False
    return resp.status == health_pb2.HealthCheckResponse.SERVING


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not 1 <= len(args) <= 2:
        print("usage: python -m serving.healthcheck ADDRESS [SERVICE]", file=sys.stderr)
        return 2
    return 0 if asyncio.run(check(args[0], args[1] if len(args) > 1 else "")) else 1


if __name__ == "__main__":
    raise SystemExit(main())
