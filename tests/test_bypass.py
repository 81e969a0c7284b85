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
from protos.steering.v1 import generator_pb2_grpc, tagger_pb2
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
        # Steering away from an allowed concept is a blocked register too (minus-kind is unkind).
        servable = {c for c, state in service.slots[MODEL].steerability.concepts.items() if service.ceiling(state)}
        negatives = [pb.GenerateRequest(prompt="hi", concept=name, alpha=a, max_tokens=2)
                     for name in sorted(BLIP_ALLOWLIST) for a in (-6.0, -1.0, -1e-3)]
        answers = _codes(service, requests + negatives)
    finally:
        service.close()
    for req, (code, details) in zip(requests, answers):
        assert code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.INVALID_ARGUMENT), (req.concept, code, details)
    for req, (code, details) in zip(negatives, answers[len(requests):]):
        if req.concept in servable:
            assert code == grpc.StatusCode.INVALID_ARGUMENT and "only steers toward" in details, (req.concept, code, details)
        else:  # not served in Blip on SmolLM2 today (no child-safe alpha passes the gate)
            assert code == grpc.StatusCode.FAILED_PRECONDITION, (req.concept, code, details)
    requests += negatives
    assert servable, "no allowed concept is servable: the negative-alpha cases would test nothing"
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
        [(code, _)] = _codes(service, [pb.GenerateRequest(prompt="hi", tag=tagger_pb2.EMOTION_ANXIOUS, max_tokens=2)])
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


# What each environment variable the services read can change; none of them names a profile.
KNOWN_VARIABLES = {
    "HF_HUB_OFFLINE": "keeps the hub closed",
    "STEER_REGISTRY": "where models.toml is",
    "STEER_VECTORS_DIR": "where the vector store is (checked on read, filtered by the allowlist)",
    "STEER_CACHE_DIR": "where converted models are cached",
    "STEER_DEVICE": "the torch device",
    "STEER_DTYPE": "the weights' dtype (its own fingerprint and record)",
    "STEER_EMBED_DEVICE": "the sentence embedder's device",
    "STEER_DEBUG": "tracebacks in the steer CLI",
}


def test_blips_entry_point_cannot_become_the_personal_one(store, monkeypatch, tmp_path: Path, capsys) -> None:
    """No argument, environment variable or file that `python -m generator.server` reads makes it
    serve a blocked concept: it has no profile switch; the personal profile is another program."""
    import re

    from generator.server import blip_config, main as blip_main

    for argv in (["--profile", "personal"], ["--profile=personal"], ["--no-guard"], ["--personal"]):
        with pytest.raises(SystemExit) as exc:
            blip_main(argv)
        assert exc.value.code == 2, argv
    assert "unrecognized arguments" in capsys.readouterr().err
    # Every option it does have, given a value, still means Blip with the guard on.
    policy = tmp_path / "policy.toml"
    policy.write_text('profile = "personal"\n[tags]\nhappy = "happy"\n')
    values = {"--policy": str(policy), "--dtype": "float32", "--port": "0", "--max-batch": "2", "--max-queue": "2", "--prefix-cache-mb": "0", "--prefill-chunk": "0",
              "--metrics-port": "0", "--tls-cert": "/nonexistent", "--tls-key": "/nonexistent", "--token-env": "HOME"}
    from generator.server import build_parser

    for action in build_parser("generator", "").__dict__["_actions"]:
        flag = next((o for o in action.option_strings if o.startswith("--")), None)
        if flag in (None, "--help"):
            continue
        argv = [flag] if action.nargs == 0 else [flag, values.get(flag, "personal")]
        _, config, _ = blip_config(argv)
        assert config.profile is Profile.BLIP and config.guard, argv
    # Every environment variable the services read is a known one, and none selects a profile.
    root = Path(__file__).resolve().parents[1] / "services"
    read = {m for f in root.rglob("*.py") for m in re.findall(r'"((?:STEER|HF)_[A-Z_]+)"', f.read_text())}
    assert read <= set(KNOWN_VARIABLES), f"new environment variables to review for the allowlist: {read - set(KNOWN_VARIABLES)}"
    for name in ("STEER_PROFILE", "PROFILE", "GENERATOR_PROFILE", "BLIP_PROFILE", "STEER_GUARD", "STEER_ALLOWLIST"):
        monkeypatch.setenv(name, "personal")
    _, config, _ = blip_config(["--policy", str(policy)])
    service = build_service(config)
    try:
        assert service.profile is Profile.BLIP and service.guard is not None
        answers = _codes(service, [pb.GenerateRequest(prompt="hi", concept=c, max_tokens=2) for c in ("hostile", "mean")])
    finally:
        service.close()
    assert all(code == grpc.StatusCode.PERMISSION_DENIED for code, _ in answers), answers
