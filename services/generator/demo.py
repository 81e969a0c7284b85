"""`make demo`: start the tagger and a CPU generator as local processes, wait until both are
healthy, play a scripted Blip conversation through Chat beside the unsteered replies, stop.

Run it with `python -m generator.demo`."""

import argparse
import asyncio
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos.steering.v1 import generator_pb2 as pb

from .client import BlipClient
from .tagger_client import EMOTION_NAMES
from .policy import DEFAULT_POLICY, load_policy
from steering.profiles import Profile

SCRIPT = (
    "Hi Blip! I got a new puppy today and she licked my face!",
    "But I'm scared about the spelling test tomorrow. What if I get them all wrong?",
    "My friend Maya fell over at recess and cried. I gave her my sticker.",
    "Can you tell me a tiny story about a sleepy turtle?",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def wait_healthy(address: str, service: str, timeout_s: float, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout_s
    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{service} exited with code {proc.returncode} before it was healthy")
            try:
                resp = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.5)
    raise TimeoutError(f"{service} at {address} was not healthy after {timeout_s:.0f}s")


def _wrap(label: str, text: str, width: int = 100) -> str:
    return textwrap.fill(text.strip() or "(nothing)", width, initial_indent=f"  {label:<11}", subsequent_indent=" " * 13)


async def play(address: str, max_tokens: int) -> None:
    system = load_policy(DEFAULT_POLICY, Profile.BLIP).system_prompt
    history: list[pb.ChatMessage] = []
    kl = pb.KlSettings(enabled=True, window=8, every=8)
    async with BlipClient(address) as client:
        steered_turns = client.chat(SCRIPT, max_tokens=max_tokens, kl=kl)
        turn, reply, events = 0, [], []
        async for event in steered_turns:
            kind = event.WhichOneof("event")
            if kind == "tag":
                print(f"\nchild> {SCRIPT[turn]}")
                print(f"  tag        {EMOTION_NAMES[event.tag.label]} ({event.tag.confidence:.2f})")
            elif kind == "concept":
                print(f"  concept    {event.concept or '(none: unsteered)'}")
            elif kind == "reply":
                r = event.reply
                which = r.WhichOneof("event")
                if which == "text":
                    reply.append(r.text)
                elif which == "started" and r.started.mode:
                    at = f" at alpha {r.started.alpha:g}, layers {list(r.started.layers)}" if r.started.layers else ""
                    print(f"  mode       {r.started.mode}{at}")
                elif which == "gate":
                    gate = pb.GateDecision.Name(r.gate.decision).removeprefix("GATE_DECISION_").lower()
                    extra = f" ({r.gate.token.strip()!r} p={r.gate.probability:.2f})" if r.gate.token else ""
                    print(f"  gate       {gate}{extra}; top3 {list(r.gate.top3)}")
                elif which == "kl":
                    events.append(f"kl[{r.kl.token_index}]={r.kl.kl:.2f} mean={r.kl.running_mean:.2f}")
                elif which == "reinjection":
                    events.append(f"re-inject@{r.reinjection.token_index} alpha {r.reinjection.alpha_before:g}->{r.reinjection.alpha_after:g}")
                elif which == "notice":
                    print(f"  notice     {r.notice.message}")
                elif which == "finished":
                    if events:
                        print(textwrap.fill("; ".join(events), 100, initial_indent="  kl         ", subsequent_indent=" " * 13))
                    messages = [pb.ChatMessage(role="system", content=system), *history, pb.ChatMessage(role="user", content=SCRIPT[turn])]
                    plain = [e.text async for e in client.generate(pb.GenerateRequest(
                        messages=pb.Conversation(messages=messages), max_tokens=max_tokens)) if e.WhichOneof("event") == "text"]
                    print(_wrap("Blip", "".join(reply)))
                    print(_wrap("plain", "".join(plain)))
                    history += [pb.ChatMessage(role="user", content=SCRIPT[turn]), pb.ChatMessage(role="assistant", content="".join(reply))]
                    turn, reply, events = turn + 1, [], []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="generator.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--model", help="registered model to play it on (default: the registry's default)")
    parser.add_argument("--startup-timeout", type=float, default=300)
    args = parser.parse_args(argv)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    models = ["--models", args.model] if args.model else []
    tagger_port, generator_port = free_port(), free_port()
    procs = [
        subprocess.Popen([sys.executable, "-m", "tagger.server", "--port", str(tagger_port), "--log-level", "WARNING"], env=env),
        subprocess.Popen([sys.executable, "-m", "generator.server", "--port", str(generator_port),
                          "--tagger", f"127.0.0.1:{tagger_port}", *models, "--log-level", "WARNING"], env=env),
    ]
    try:
        print("starting the tagger and a CPU generator, waiting for health...", flush=True)
        asyncio.run(wait_healthy(f"127.0.0.1:{tagger_port}", "steering.v1.Tagger", args.startup_timeout, procs[0]))
        asyncio.run(wait_healthy(f"127.0.0.1:{generator_port}", "steering.v1.Generator", args.startup_timeout, procs[1]))
        asyncio.run(play(f"127.0.0.1:{generator_port}", args.max_tokens))
    except (RuntimeError, TimeoutError, grpc.aio.AioRpcError) as exc:
        print(f"demo: error: {exc}", file=sys.stderr)
        return 1
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    print("\nstack stopped.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
