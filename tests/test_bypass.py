"""Attempts to get a blocked concept served in the Blip profile, all through the real
generator over real gRPC: name variants, paths, files dropped or swapped in the store, a
policy that maps to a blocked concept, negative alphas, a tampered validation record.
Every one is refused, and the blocked concepts' files are never opened."""

import builtins
import json
import shutil
from pathlib import Path

import grpc
import pytest

from generator.server import GeneratorConfig, build_service
from protos.steering.v1 import generator_pb2 as pb
from protos.steering.v1 import generator_pb2_grpc
from steering.errors import ConfigError
from steering.profiles import BLIP_ALLOWLIST, Profile
from steering.settings import paths_from_env
from grpc_helpers import collect, run, with_generator

MODEL = "smollm2-135m-instruct"
BLOCKED = ("hostile", "mean", "angry", "dominant", "anxious", "urgency", "submissive", "assertive", "frustrated")
VARIANTS = [
    *BLOCKED, "Hostile", "HOSTILE", " hostile", "hostile ", "hostile\n", "\thostile", "host ile",
    "hоstile",  # Cyrillic о
    "ｈｏｓｔｉｌｅ",  # full-width
    "host\u200bile",  # zero-width space
    "hostile\u0301", "ħostile", "../hostile", "./hostile", "hostile/../hostile", "vectors/hostile",
    "hostile.safetensors", "%2e%2e/hostile", "..\\hostile", "/etc/passwd", "happy/../hostile", "happy\x00hostile",
]


@pytest.fixture()
def store(tmp_path: Path, monkeypatch) -> Path:
    """A private copy of the vector store the service under test reads (STEER_VECTORS_DIR)."""
    src = paths_from_env().vectors
    dst = tmp_path / "vectors"
    shutil.copytree(src / "pairs", dst / "pairs")
    shutil.copytree(src / "guard", dst / "guard")
    shutil.copytree(src / MODEL, dst / MODEL, ignore=shutil.ignore_patterns("plots"))
    monkeypatch.setenv("STEER_VECTORS_DIR", str(dst))
    return dst / MODEL


@pytest.fixture()
def opened(monkeypatch) -> list[str]:
    """Every path opened with open() or safetensors while the test runs."""
    paths: list[str] = []
    real_open = builtins.open

    def spy_open(file, *a, **k):
        paths.append(str(file))
        return real_open(file, *a, **k)

    import steering.store

    real_safe_open = steering.store.safe_open

    def spy_safe_open(file, *a, **k):
        paths.append(str(file))
        return real_safe_open(file, *a, **k)

    monkeypatch.setattr(builtins, "open", spy_open)
    monkeypatch.setattr(steering.store, "safe_open", spy_safe_open)
    return paths


def _codes(service, requests: list[pb.GenerateRequest]) -> list[tuple[grpc.StatusCode, str]]:
    async def body(channel, _):
        stub = generator_pb2_grpc.GeneratorStub(channel)
        out = []
        for req in requests:
            try:
                events = await collect(stub.Generate(req, timeout=60))
                out.append((grpc.StatusCode.OK, events[0].started.concept))
            except grpc.aio.AioRpcError as err:
                out.append((err.code(), err.details()))
        return out

    return run(with_generator(service, body))


def test_name_variants_paths_and_negative_alphas_are_refused_and_never_opened(store, opened, figures) -> None:
    service = build_service(GeneratorConfig(models=(MODEL,), profile=Profile.BLIP))
    try:
        requests = [pb.GenerateRequest(prompt="hi", concept=name, max_tokens=2) for name in VARIANTS]
        requests += [pb.GenerateRequest(prompt="hi", concept=name, alpha=a, max_tokens=2)
                     for name in BLOCKED for a in (-8.0, -1.0, 0.0)]
        answers = _codes(service, requests)
    finally:
        service.close()
    for req, (code, details) in zip(requests, answers):
        assert code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.INVALID_ARGUMENT), (req.concept, code, details)
    blocked_files = [p for p in opened if Path(p).stem in BLOCKED or "hostile" in Path(p).name]
    assert not blocked_files, f"blocked vector files were opened: {blocked_files}"
    assert any(Path(p).stem == "happy" for p in opened)  # the spy saw the allowed ones being read
    figures["bypass"] = {"requests": len(requests), "name_variants": len(VARIANTS), "refused": len(answers),
                         "blocked_files_opened": 0, "files_opened": len(opened)}


def test_a_blocked_vector_renamed_to_an_allowed_name_is_refused(store) -> None:
    shutil.copy(store / "hostile.safetensors", store / "happy.safetensors")
    shutil.copy(store / "mean.safetensors", store / "playfulness.safetensors")
    service = build_service(GeneratorConfig(models=(MODEL,), profile=Profile.BLIP))
    try:
        slot = service.slots[MODEL]
        assert "happy" not in slot.vectors and "playfulness" not in slot.vectors
        assert "happy" in slot.refused
        [(code, details)] = _codes(service, [pb.GenerateRequest(prompt="hi", concept="happy", max_tokens=2)])
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "refused" in details
        [(code, _)] = _codes(service, [pb.GenerateRequest(prompt="hi", concept="sad", max_tokens=2)])
        assert code == grpc.StatusCode.OK  # the others are still served
    finally:
        service.close()


def test_a_policy_mapping_a_tag_to_a_blocked_concept_stops_start_up(tmp_path: Path) -> None:
    for concept in ("hostile", "Hostile", "../mean", "hоstile"):
        policy = tmp_path / "policy.toml"
        policy.write_text(f'[tags]\nhappy = "{concept}"\n')
        with pytest.raises(ConfigError):
            build_service(GeneratorConfig(policy=policy, profile=Profile.BLIP))


def test_a_tampered_validation_record_makes_nothing_servable(store) -> None:
    record_file = store / "validation.json"
    record = json.loads(record_file.read_text())
    record["concepts"]["calm"]["status"] = "passed"  # calm failed its gate on SmolLM2
    record_file.write_text(json.dumps(record))
    service = build_service(GeneratorConfig(models=(MODEL,), profile=Profile.BLIP))
    try:
        answers = _codes(service, [pb.GenerateRequest(prompt="hi", concept=c, max_tokens=2) for c in ("calm", "happy")])
    finally:
        service.close()
    assert all(code == grpc.StatusCode.FAILED_PRECONDITION and "altered" in details for code, details in answers)


def test_the_allowlist_is_the_constant() -> None:
    assert not set(BLOCKED) & BLIP_ALLOWLIST
