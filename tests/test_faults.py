"""Faults, injected for real: kill -9 during `steer derive` and `steer validate`, damaged
vector files in the store, the generator process killed mid-stream and restarted.
(The tagger going down is in test_chat.py.)"""

import asyncio
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
import torch
from safetensors.torch import load_file, save_file

from generator.client import BlipClient, RetryPolicy
from generator.server import GeneratorConfig, build_service
from protos.steering.v1 import generator_pb2 as pb
from protos.steering.v1 import generator_pb2_grpc, tagger_pb2
from steering.profiles import Profile
from steering.record import assess
from steering.settings import REPO_ROOT, paths_from_env
from steering.store import read_vector
from grpc_helpers import run, with_generator
from steer_cli import steer

MODEL = "smollm2-135m-instruct"
STEER = [sys.executable, "-c", "import steercli; raise SystemExit(steercli.main())"]


def _env(vectors: Path) -> dict[str, str]:
    return {**os.environ, "STEER_VECTORS_DIR": str(vectors), "HF_HUB_OFFLINE": "1"}


def _store(tmp_path: Path, with_model: bool) -> Path:
    src, dst = paths_from_env().vectors, tmp_path / "vectors"
    shutil.copytree(src / "pairs", dst / "pairs")
    shutil.copytree(src / "eval", dst / "eval")
    shutil.copytree(src / "guard", dst / "guard")
    if with_model:
        shutil.copytree(src / MODEL, dst / MODEL, ignore=shutil.ignore_patterns("plots"))
    return dst


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"finished before it could be killed: {proc.stdout.read()[-2000:]}"
        assert time.monotonic() < deadline, "never reached the point to kill it at"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)


def _dead_pid() -> int:
    pid = 4_000_000
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        pid += 1


def _complete_files_only(folder: Path) -> list[str]:
    assert not list(folder.glob(".*.tmp")), "a half-written temporary file was left behind"
    names = []
    for path in sorted(folder.glob("*.safetensors")):
        read_vector(path)  # raises on a truncated or corrupt file
        names.append(path.stem)
    return names


def test_kill_9_during_derive_leaves_only_complete_files_and_a_rerun_finishes(tmp_path: Path, monkeypatch,
                                                                             figures) -> None:
    vectors = _store(tmp_path, with_model=False)
    out = vectors / MODEL
    concepts = ["happy", "sad"]
    for name in concepts:  # what is tested is the files' safety under a kill: six pairs each are enough
        path = vectors / "pairs" / f"{name}.json"
        data = json.loads(path.read_text())
        path.write_text(json.dumps({**data, "pairs": data["pairs"][:6]}))
    args = ["derive", "--model", MODEL, "--concepts", ",".join(concepts), "--quiet"]
    proc = subprocess.Popen([*STEER, *args], env=_env(vectors), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    # Kill while the second concept is being derived or written (one takes a second or more; the poll is 50 ms).
    _kill_when(proc, lambda: (out / "happy.safetensors").exists())
    orphan = out / f".sad.safetensors.{_dead_pid()}.abc123.tmp"  # what a kill mid-write leaves
    orphan.write_bytes(b"half a file")
    survivors = _complete_files_only_except(out, orphan)
    assert "happy" in survivors and len(survivors) < len(concepts)
    first = (out / "happy.safetensors").read_bytes()

    # The rerun is the same command in this process (torch already loaded): only the killed one must be a process.
    monkeypatch.setenv("STEER_VECTORS_DIR", str(vectors))
    rerun = steer(*args, "--resume")
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert f"resuming: {len(survivors)} concept(s)" in rerun.stdout
    assert _complete_files_only(out) == sorted(concepts)
    assert (out / "happy.safetensors").read_bytes() == first  # finished work was kept, not redone
    figures["derive_kill"] = {"complete_after_kill": len(survivors), "after_rerun": len(concepts)}


def _complete_files_only_except(folder: Path, orphan: Path) -> list[str]:
    names = []
    for path in sorted(folder.glob("*.safetensors")):
        read_vector(path)
        names.append(path.stem)
    assert [p for p in folder.glob(".*.tmp") if p != orphan] == []
    return names


def test_kill_9_during_validate_keeps_the_old_record_and_a_rerun_finishes(tmp_path: Path, monkeypatch, smollm,
                                                                         figures) -> None:
    vectors = _store(tmp_path, with_model=True)
    model_dir = vectors / MODEL
    before = (model_dir / "validation.json").read_bytes()
    # What is tested is the record's safety under a kill, so the sweep is the smallest there is:
    # a concept outside Blip's allowlist (no Blip baseline, no modes), four prompts, one seed, eight tokens.
    args = ["validate", "--model", MODEL, "--concepts", "bored", "--prompts", "4", "--seeds", "1",
            "--allowlist-seeds", "1", "--no-plots", "--no-search", "--max-new-tokens", "8"]
    proc = subprocess.Popen([*STEER, *args], env=_env(vectors), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    lines: list[str] = []

    def generating() -> bool:  # the canary is done and the behavioural check is generating
        lines.append(proc.stdout.readline())
        return "check canary_kl" in lines[-1]

    _kill_when(proc, generating)
    assert (model_dir / "validation.json").read_bytes() == before
    assert not list(model_dir.glob(".*.tmp"))
    vecs = {"bored": read_vector(model_dir / "bored.safetensors")}
    assert assess(MODEL, model_dir, smollm.fingerprint, vecs).steerable

    monkeypatch.setenv("STEER_VECTORS_DIR", str(vectors))
    rerun = steer(*args)  # in this process, as the derive test's rerun
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    record = json.loads((model_dir / "validation.json").read_text())
    assert set(record["concepts"]) >= {"bored"} and record["concepts"]["bored"]["status"] in ("passed", "failed")
    assert record["settings"]["prompts"] == 4
    assert assess(MODEL, model_dir, smollm.fingerprint, vecs).steerable
    figures["validate_kill"] = {"record_intact_after_kill": True, "rerun_seconds": record["duration_s"]}


def _damage(model_dir: Path, fingerprint: str) -> dict[str, str]:
    """Four allowed concepts damaged four ways; returns concept -> the word its refusal names."""
    data = (model_dir / "happy.safetensors").read_bytes()
    (model_dir / "happy.safetensors").write_bytes(data[: len(data) // 2])  # truncated
    for concept, how in (("sad", "nan"), ("kind", "size"), ("warmth", "model")):
        path = model_dir / f"{concept}.safetensors"
        tensors = load_file(path)
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
        if how == "nan":
            key = next(k for k in tensors if k.startswith("direction."))
            tensors[key] = torch.full_like(tensors[key], math.nan)
        elif how == "size":
            tensors = {k: v[..., :100] if k.startswith("direction.") else v for k, v in tensors.items()}
            meta["hidden_size"] = "100"
        else:
            meta["fingerprint"] = "0" * 64
        save_file(tensors, str(path), metadata=meta)
    return {"happy": "corrupt", "sad": "", "kind": "", "warmth": "fingerprint"}


def test_damaged_vector_files_refuse_only_their_concepts(tmp_path: Path, monkeypatch, smollm, figures) -> None:
    vectors = _store(tmp_path, with_model=True)
    monkeypatch.setenv("STEER_VECTORS_DIR", str(vectors))
    words = _damage(vectors / MODEL, smollm.fingerprint)
    service = build_service(GeneratorConfig(models=(MODEL,), profile=Profile.BLIP))
    try:
        slot = service.slots[MODEL]
        assert set(words) <= set(slot.refused), slot.refused
        for concept, word in words.items():
            assert word in slot.refused[concept], slot.refused[concept]

        async def body(channel, _):
            stub = generator_pb2_grpc.GeneratorStub(channel)
            codes = {}
            for concept in [*words, "anxious"]:  # the last by its tag, which Blip answers with empathy
                request = pb.GenerateRequest(prompt="hi", max_tokens=2)
                if concept == "anxious":
                    request.tag = tagger_pb2.EMOTION_ANXIOUS
                else:
                    request.concept = concept
                try:
                    events = [e async for e in stub.Generate(request)]
                    codes[concept] = ("OK", events[0].started.concept)
                except grpc.aio.AioRpcError as err:
                    codes[concept] = (err.code().name, err.details())
            return codes

        codes = run(with_generator(service, body))
    finally:
        service.close()
    for concept in words:
        assert codes[concept][0] == "FAILED_PRECONDITION" and concept in codes[concept][1]
    assert codes["anxious"] == ("OK", "empathy")  # a Blip concept left undamaged is still served
    figures["damaged_vectors"] = {"refused": sorted(words), "still_served": ["empathy"]}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_generator(port: int, started: list[subprocess.Popen]) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "generator.server", "--port", str(port), "--log-level", "WARNING"],
                            cwd=REPO_ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    started.append(proc)
    line = ""
    deadline = time.monotonic() + 300
    while "serving on" not in line:
        line = proc.stdout.readline()
        assert line or proc.poll() is None, "the generator did not start"
        assert time.monotonic() < deadline
    return proc


def test_generator_killed_mid_stream_gives_unavailable_and_the_client_reconnects(figures) -> None:
    port = _free_port()
    started: list[subprocess.Popen] = []
    proc = _start_generator(port, started)

    async def scenario() -> dict:
        async with BlipClient(f"127.0.0.1:{port}", retry=RetryPolicy(attempts=60, first_backoff_s=0.25,
                                                                     max_backoff_s=1.0)) as client:
            killed_at = None
            with pytest.raises(grpc.aio.AioRpcError) as info:
                async for event in client.generate(pb.GenerateRequest(prompt="Tell me a long story.", max_tokens=200)):
                    if event.WhichOneof("event") == "text" and killed_at is None:
                        proc.send_signal(signal.SIGKILL)
                        killed_at = time.monotonic()
            noticed_s = time.monotonic() - killed_at
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            proc.wait(30)
            restarted = asyncio.create_task(asyncio.to_thread(_start_generator, port, started))
            # The client retries while the server is down and gets its reply once it is back.
            events = [e async for e in client.generate(pb.GenerateRequest(prompt="Say hi.", max_tokens=4),
                                                       timeout_s=30)]
            await restarted
            return {"noticed_s": noticed_s, "events": events}

    try:
        result = asyncio.run(scenario())
    finally:
        for p in started:
            if p.poll() is None:
                p.kill()
    assert result["noticed_s"] < 5, result["noticed_s"]
    assert result["events"][-1].WhichOneof("event") == "finished"
    figures["generator_killed"] = {"unavailable_after_s": round(result["noticed_s"], 2), "reconnected": True}
