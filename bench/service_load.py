"""The services as users run them: the tagger and the generator each in its own process,
driven over gRPC from this one."""

import asyncio
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from generator.events import Finished, TextDelta
from generator.service import GenerateSpec, GeneratorService
from protos.steering.v1 import generator_pb2 as gpb
from protos.steering.v1 import generator_pb2_grpc, tagger_pb2, tagger_pb2_grpc
from steering.guard import holds_sentence
from steering.settings import REPO_ROOT


@dataclass
class Process:
    proc: subprocess.Popen
    address: str

    def peak_memory_mb(self) -> float:
        """The process's high-water mark of resident memory (VmHWM)."""
        with open(f"/proc/{self.proc.pid}/status") as f:
            kb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
        return kb / 1024

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def service_python() -> str:
    """The services run in the project's own environment, not the bench one (which adds the peers)."""
    main = REPO_ROOT / ".venv" / "bin" / "python"
    return str(main) if main.exists() else sys.executable


def start(module: str, args: Sequence[str], timeout_s: float = 300, checkout: Path | None = None) -> Process:
    """Start `python -m module --port 0 ...` and wait for its "serving on host:port" line.
    `checkout`: run another checkout's code of this project (in this project's environment)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    if checkout is not None:
        env["PYTHONPATH"] = f"{checkout / 'services'}{os.pathsep}{checkout}"
    proc = subprocess.Popen([service_python(), "-m", module, "--port", "0", "--log-level", "WARNING", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=checkout)
    if proc.stdout is None:  # never with stdout=PIPE; it narrows the type
        raise RuntimeError(f"{module}: no pipe to its output")
    deadline = time.monotonic() + timeout_s
    lines = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if m := re.search(r"serving on (\S+:\d+)", line):
            return Process(proc, m.group(1))
    proc.kill()
    raise RuntimeError(f"{module} did not start:\n{''.join(lines[-20:])}")


def percentile(xs: Sequence[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


async def _stream(stub, prompt: str, concept: str, tokens: int) -> tuple[int, float, float]:
    """(completion tokens, client-side time to first text in ms, the engine's own time to first text in ms)."""
    start, first, n, engine = time.perf_counter(), None, 0, float("nan")
    async for event in stub.Generate(gpb.GenerateRequest(prompt=prompt, concept=concept, max_tokens=tokens)):
        kind = event.WhichOneof("event")
        if kind == "text" and first is None:
            first = (time.perf_counter() - start) * 1000
        elif kind == "finished":
            n, engine = event.finished.completion_tokens, event.finished.time_to_first_token_ms
    return n, first if first is not None else float("nan"), engine


async def served_concepts(address: str, model: str) -> list[str]:
    """The concepts the generator at `address` serves on `model`, as ListModels says."""
    async with grpc.aio.insecure_channel(address) as channel:
        resp = await generator_pb2_grpc.GeneratorStub(channel).ListModels(gpb.ListModelsRequest())
    return [c.name for m in resp.models if m.name == model for c in m.concepts if c.servable]


def distinct(prompts: Sequence[str], n: int, start: int = 0) -> list[str]:
    """n prompts no request has sent before (numbered questions), so a prefix cache can reuse
    only what they share by design: the system prompt and the chat template's start."""
    return [f"Question {start + i + 1}: {prompts[i % len(prompts)]}" for i in range(n)]


async def concurrency(address: str, prompts: list[str], concepts: list[str], levels: Sequence[int], tokens: int,
                      runs: int) -> dict[str, dict]:
    out: dict[str, dict] = {}
    sent = 0
    async with grpc.aio.insecure_channel(address) as channel:
        stub = generator_pb2_grpc.GeneratorStub(channel)
        await _stream(stub, distinct(prompts, 1, 10**6)[0], concepts[0], 4)  # warm-up
        for n in levels:
            rates, ttfts = [], []
            for _ in range(runs):
                texts, sent = distinct(prompts, n, sent), sent + n
                start = time.perf_counter()
                results = await asyncio.gather(*(
                    _stream(stub, texts[i], concepts[i % len(concepts)], tokens) for i in range(n)
                ))
                rates.append(sum(r[0] for r in results) / (time.perf_counter() - start))
                ttfts += [r[1] for r in results]
            out[str(n)] = {
                "streams": n, "concepts": sorted({concepts[i % len(concepts)] for i in range(n)}),
                "tokens_per_s": round(statistics.median(rates), 2), "runs_tokens_per_s": [round(r, 2) for r in rates],
                "ttft_ms_p50": round(percentile(ttfts, 0.5), 1), "ttft_ms_p95": round(percentile(ttfts, 0.95), 1),
            }
    return out


async def grpc_vs_in_process(service: GeneratorService, address: str, prompts: Sequence[str], concept: str) -> dict[str, float]:
    """Time to first text of one stream on an idle generator, in process and over gRPC, interleaved.

    The two run in different processes, whose engines do not decode at exactly the same speed,
    so the overhead is taken per request against the engine's own time to first text (measured
    from the job's creation): what the caller waits beyond the engine, over gRPC minus in process.
    Both sides get the same prompts, each new to them; the first warms up."""

    async def local(prompt: str) -> tuple[float, float]:
        start, first, engine = time.perf_counter(), float("nan"), float("nan")
        async for event in service.stream(GenerateSpec(prompt=prompt, concept=concept, max_tokens=4)):
            if isinstance(event, TextDelta) and first != first:  # the first text (nan != nan)
                first = (time.perf_counter() - start) * 1000
            elif isinstance(event, Finished):
                engine = event.time_to_first_token_ms
        return first, engine

    local_ms, remote_ms, local_extra, remote_extra = [], [], [], []
    async with grpc.aio.insecure_channel(address) as channel:
        stub = generator_pb2_grpc.GeneratorStub(channel)
        await local(prompts[0])
        await _stream(stub, prompts[0], concept, 4)
        for prompt in prompts[1:]:
            first, engine = await local(prompt)
            local_ms.append(first)
            local_extra.append(first - engine)
            _, first, engine = await _stream(stub, prompt, concept, 4)
            remote_ms.append(first)
            remote_extra.append(first - engine)
    med = statistics.median
    return {"in_process_ms_p50": round(med(local_ms), 1), "grpc_ms_p50": round(med(remote_ms), 1),
            "in_process_beyond_engine_ms_p50": round(med(local_extra), 2),
            "grpc_beyond_engine_ms_p50": round(med(remote_extra), 2),
            "added_ms": round(med(remote_extra) - med(local_extra), 2)}


async def chat_first_sentence(address: str, conversations: Sequence[Sequence[str]], tokens: int,
                              gate: bool = False, pause_s: float = 0.0) -> dict[str, Any]:
    """Blip's time to first sentence at one stream, as the child's device sees it: from sending a
    turn on Chat (tagging, policy, prefill, gate, decoding, the guard's check, release) to the first
    reply text after which the reply holds a whole sentence. Each conversation is one Chat call
    whose turns follow one another, as a child's do; the first conversation warms up. `gate`:
    every turn asks for the skip gate (off by default). `pause_s`: before each turn but the
    first, the time the child takes to hear the reply and answer (what the engine may use to
    warm the next prompt)."""
    times = []
    async with grpc.aio.insecure_channel(address) as channel:
        stub = generator_pb2_grpc.GeneratorStub(channel)
        for n, conversation in enumerate(conversations):
            call = stub.Chat(timeout=600)
            for k, turn in enumerate(conversation):
                if n or k:
                    await asyncio.sleep(pause_s)
                start, first, reply = time.perf_counter(), None, ""
                await call.write(gpb.ChatTurn(text=turn, max_tokens=tokens, gate=gpb.GateSettings(enabled=gate)))
                kind = None
                while kind != "finished":
                    event = await call.read()
                    if event is grpc.aio.EOF:
                        raise RuntimeError(f"Chat ended before the reply to {turn!r} finished")
                    if event.WhichOneof("event") != "reply":
                        continue
                    kind = event.reply.WhichOneof("event")
                    reply += event.reply.text if kind == "text" else ""
                    if first is None and (kind == "finished" or (kind == "text" and holds_sentence(reply))):
                        first = (time.perf_counter() - start) * 1000
                if n and first is not None:
                    times.append(first)
            await call.done_writing()
    return {"turns": len(times), "pause_s": pause_s, "p50_ms": round(percentile(times, 0.5), 1), "p95_ms": round(percentile(times, 0.95), 1),
            "times_ms": [round(t, 1) for t in times]}


async def tagger_latency(address: str, texts: list[str], runs: int) -> dict[str, float]:
    times = []
    async with grpc.aio.insecure_channel(address) as channel:
        stub = tagger_pb2_grpc.TaggerStub(channel)
        await stub.Tag(tagger_pb2.TagRequest(text=texts[0]))
        for i in range(runs):
            start = time.perf_counter()
            await stub.Tag(tagger_pb2.TagRequest(text=texts[i % len(texts)]))
            times.append((time.perf_counter() - start) * 1000)
    return {"calls": runs, "p50_ms": round(percentile(times, 0.5), 1), "p95_ms": round(percentile(times, 0.95), 1)}
