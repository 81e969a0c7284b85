"""docker-compose.yml is valid and describes the stack we promise (no Docker engine runs here)."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _config(*profiles: str) -> dict:
    compose = shutil.which("docker-compose")
    if compose is None:
        pytest.skip("docker-compose (Debian package) is not installed; `make test` installs it when run as root")
    args = [compose, *(f"--profile={p}" for p in profiles), "config"]
    res = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    import yaml

    return yaml.safe_load(res.stdout)


def test_compose_file_is_valid_and_complete() -> None:
    cfg = _config("gpu", "cpu")
    services = cfg["services"]
    assert {"tagger", "generator-gpu0", "generator-gpu1", "generator-cpu"} <= set(services)
    for name in ("generator-gpu0", "generator-gpu1"):
        devices = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["device_ids"] == [name[-1]]
    for name, svc in services.items():
        assert "serving.healthcheck" in " ".join(svc["healthcheck"]["test"]), name
        for port in svc.get("ports", []):
            host = port.get("host_ip", "") if isinstance(port, dict) else str(port)  # v1 prints "127.0.0.1:50051:50051"
            assert host.startswith("127.0.0.1"), f"{name} publishes beyond loopback"
    gen = services["generator-cpu"]
    assert any("/app/vectors" in str(v) for v in gen["volumes"]) and any("/cache" in str(v) for v in gen["volumes"])
    assert "model-cache" in cfg["volumes"]


def test_generators_sit_behind_profiles() -> None:
    services = _config("gpu", "cpu")["services"]
    assert "profiles" not in services["tagger"]  # the tagger always runs
    assert services["generator-gpu0"]["profiles"] == ["gpu"] and services["generator-gpu1"]["profiles"] == ["gpu"]
    assert services["generator-cpu"]["profiles"] == ["cpu"]


def test_awq_generator_is_its_own_environment_behind_a_profile() -> None:
    cfg = _config("gpu", "cpu", "awq")
    awq = cfg["services"]["generator-awq"]
    assert awq["profiles"] == ["awq"]
    assert awq["build"]["dockerfile"] == "services/generator/Dockerfile.awq"
    assert "requirements-awq.txt" in (ROOT / "services/generator/Dockerfile.awq").read_text()
    assert awq["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] == ["0"]
    assert "--device" in awq["command"] and "cuda:0" in awq["command"]
    assert "serving.healthcheck" in " ".join(awq["healthcheck"]["test"])
    assert awq["ports"], "generator-awq publishes its port"
    for port in awq["ports"]:
        host = port.get("host_ip", "") if isinstance(port, dict) else str(port)
        assert host.startswith("127.0.0.1"), "generator-awq publishes beyond loopback"
    assert any("/cache" in str(v) for v in awq["volumes"])


def test_the_personal_profile_is_its_own_program_and_off_by_default() -> None:
    services = _config("personal")["services"]  # docker-compose v1 prints every service; the profiles field decides
    personal = services["generator-personal"]
    assert personal["profiles"] == ["personal"] and personal["command"][:3] == ["python", "-m", "generator.personal"]
    for name, svc in services.items():  # Blip's generators never name a profile on their command line
        if name != "generator-personal":
            assert "--profile" not in " ".join(svc.get("command", [])), name
    for port in personal["ports"]:
        host = port.get("host_ip", "") if isinstance(port, dict) else str(port)
        assert host.startswith("127.0.0.1"), "generator-personal publishes beyond loopback"
