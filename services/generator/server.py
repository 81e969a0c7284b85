"""Run the generator service: `python -m generator.server --help`."""

import argparse
import asyncio
import logging
import os
import signal
import threading
from dataclasses import dataclass
from pathlib import Path

from protos.steering.v1 import generator_pb2, generator_pb2_grpc
from serving.server import RunningServer, ServerSettings, start_server
from steering.errors import ConfigError
from steering.guard import load_guard
from steering.loading import load_model
from steering.profiles import Profile
from steering.registry import DTYPES, load_registry
from steering.settings import paths_from_env
from steering.threads import in_passing_thread

from .engine import EngineSettings
from .metrics import GeneratorMetrics, MetricsServer
from .policy import DEFAULT_POLICY, load_policy
from .service import GenerateSpec, GeneratorService, open_slot
from .servicer import GeneratorServicer
from .tagger_client import TaggerClient

log = logging.getLogger(__name__)
SERVICE = generator_pb2.DESCRIPTOR.services_by_name["Generator"].full_name


@dataclass(frozen=True)
class GeneratorConfig:
    models: tuple[str, ...] = ()  # empty = the registry's default
    profile: Profile = Profile.BLIP
    policy: Path = DEFAULT_POLICY
    tagger: str | None = None  # address of the tagger service
    tagger_token: str | None = None
    fail_fast: bool = False  # Chat fails when the tagger is down instead of replying unsteered
    device: str | None = None
    dtype: str | None = None  # overrides the registry's (a different fingerprint: its own vectors and record)
    engine: EngineSettings = EngineSettings()
    metrics_port: int | None = None  # serve Prometheus /metrics here (0 = any free port)
    guard: bool = True  # the content guard; only the personal profile may switch it off


@dataclass
class RunningGenerator:
    server: RunningServer
    service: GeneratorService
    tagger: TaggerClient | None
    owns_service: bool = True  # tests share one loaded service across servers
    metrics: MetricsServer | None = None

    async def stop(self) -> None:
        await self.server.stop()
        if self.metrics:
            self.metrics.stop()
        if self.owns_service:
            await asyncio.to_thread(self.service.close)
        if self.tagger:
            await self.tagger.close()


def build_service(config: GeneratorConfig) -> GeneratorService:
    paths = paths_from_env()
    registry = load_registry(paths.registry)
    policy = load_policy(config.policy, config.profile)  # a blocked concept in the policy stops start-up here
    if config.profile is Profile.BLIP and not config.guard:
        raise ConfigError("the Blip profile always runs the content guard; --no-guard is for the personal profile only")
    guard = load_guard(paths.guard) if config.guard else None
    names = config.models or (registry.default,)
    slots = {}
    metrics = GeneratorMetrics()
    for name in names:
        loaded = load_model(registry.get(name), paths.cache, device=config.device, dtype=config.dtype)
        slots[loaded.name] = open_slot(loaded, config.profile, paths.vectors, paths.pairs, config.engine, metrics)
    service = GeneratorService(slots, names[0] if config.models else registry.default, config.profile, policy, metrics, guard)
    for name, slot in slots.items():
        if config.profile is Profile.BLIP:  # a Chat's first turn: the system prompt under every concept
            service.warm_chat(GenerateSpec(model=name), [], threading.Event())
        served = [c for c, state in sorted(slot.steerability.concepts.items()) if service.ceiling(state)]
        log.info("model %s: %s; served in the %s profile: %s", name, slot.steerability.reason, config.profile,
                 ", ".join(served) or "none")
        for tag, why in service.unserved_policy_tags(name).items():
            log.warning("policy tag %r will get unsteered replies on %s: %s", tag, name, why)
    return service


async def serve(settings: ServerSettings, config: GeneratorConfig, service: GeneratorService | None = None) -> RunningGenerator:
    """Start the server (health NOT_SERVING), load models and vectors, then say SERVING."""
    owns = service is None
    servicer = GeneratorServicer()
    running = await start_server(settings, lambda s: generator_pb2_grpc.add_GeneratorServicer_to_server(servicer, s), [SERVICE])
    if service is None:
        try:
            # Loaded on a thread that ends, so its OpenMP team does not outlive it (steering/threads.py).
            service = await asyncio.to_thread(in_passing_thread, build_service, config)
        except BaseException:
            await running.stop()
            raise
    tagger = TaggerClient(config.tagger, token=config.tagger_token) if config.tagger else None
    servicer.attach(service, tagger, config.fail_fast)
    metrics = service.metrics.serve(settings.host, config.metrics_port) if config.metrics_port is not None else None
    await running.set_serving(True)
    return RunningGenerator(running, service, tagger, owns, metrics)


def build_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """The options every generator entry point shares. None of them chooses a profile: the
    Blip entry point (this module) is Blip only, and the personal profile is its own program
    (`python -m generator.personal`)."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback)")
    p.add_argument("--port", type=int, default=50052)
    p.add_argument("--models", help="comma-separated registered models (default: the registry's default)")
    p.add_argument("--policy", type=Path, default=DEFAULT_POLICY, help="tag -> concept policy file")
    p.add_argument("--tagger", help="tagger address, e.g. 127.0.0.1:50051")
    p.add_argument("--tagger-fail-fast", action="store_true", help="fail Chat when the tagger is down")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: STEER_DEVICE, then the registry's)")
    p.add_argument("--dtype", choices=DTYPES, help="float32, float16 or bfloat16 (default: STEER_DTYPE, then the registry's)")
    p.add_argument("--max-batch", type=int, default=8, help="streams decoded together in one running batch")
    p.add_argument("--max-queue", type=int, default=16, help="requests waiting to join the batch")
    p.add_argument("--prefix-cache-mb", type=int, default=EngineSettings.prefix_cache_mb,
                   help="memory for the keys and values of recent prompts, reused when a prompt begins like one "
                        "of them (a shared system prompt, a conversation so far); 0 switches it off")
    p.add_argument("--no-warm", action="store_true",
                   help="do not prefill, while idle, how a Chat's next prompt may begin under each concept its "
                        "policy may pick (with it, a turn prefills only the child's new words)")
    p.add_argument("--prefill-chunk", type=int, default=EngineSettings.prefill_chunk,
                   help="while other streams decode, prefill a new prompt this many tokens per step, so they do "
                        "not stall on it; 0 prefills it at once")
    p.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port (same host)")
    p.add_argument("--tls-cert", type=Path)
    p.add_argument("--tls-key", type=Path)
    p.add_argument("--token-env", help="environment variable holding the shared token (never on the command line)")
    p.add_argument("--log-level", default="INFO")
    return p


def parse_config(p: argparse.ArgumentParser, argv: list[str] | None, profile: Profile) -> tuple[ServerSettings, GeneratorConfig, str]:
    """Parse the shared options into the settings of a generator serving `profile`, which the
    entry point fixes in code. Only the personal entry point defines --no-guard."""
    a = p.parse_args(argv)
    token = os.environ.get(a.token_env) if a.token_env else None
    if a.token_env and not token:
        p.error(f"environment variable {a.token_env} is empty")
    if a.max_batch < 1 or a.max_queue < 1:
        p.error("--max-batch and --max-queue must be at least 1")
    if a.prefix_cache_mb < 0 or a.prefill_chunk < 0:
        p.error("--prefix-cache-mb and --prefill-chunk must be 0 (off) or more")
    settings = ServerSettings(host=a.host, port=a.port, tls_cert=a.tls_cert, tls_key=a.tls_key, token=token)
    config = GeneratorConfig(
        models=tuple(m for m in (a.models or "").split(",") if m), profile=profile, policy=a.policy,
        tagger=a.tagger, tagger_token=token, fail_fast=a.tagger_fail_fast, device=a.device, dtype=a.dtype,
        engine=EngineSettings(a.max_batch, a.max_queue, a.prefix_cache_mb, a.prefill_chunk, warm=not a.no_warm),
        metrics_port=a.metrics_port,
        guard=profile is Profile.BLIP or not getattr(a, "no_guard", False),
    )
    return settings, config, a.log_level


async def _main(settings: ServerSettings, config: GeneratorConfig) -> None:
    running = await serve(settings, config)
    print(f"generator serving on {settings.host}:{running.server.port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await running.stop()


def blip_config(argv: list[str] | None) -> tuple[ServerSettings, GeneratorConfig, str]:
    """What Blip's command line can set: everything but the profile and the guard."""
    parser = build_parser("generator", "Blip's steered streaming generation over gRPC (Blip profile only).")
    return parse_config(parser, argv, Profile.BLIP)


def main(argv: list[str] | None = None) -> int:
    """Blip's generator: the allowlist, the child-safe ceilings and the content guard, always."""
    return run(*blip_config(argv))


def run(settings: ServerSettings, config: GeneratorConfig, level: str) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        asyncio.run(_main(settings, config))
    except Exception as exc:  # start-up errors are one line, not a traceback
        from steering.errors import SteeringError

        if not isinstance(exc, (SteeringError, OSError, ValueError)):
            raise
        print(f"generator: error: {exc}", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
