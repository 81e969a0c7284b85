"""Load and cancellation against the real generator over real gRPC.

LOAD_SECONDS sets how long 32 streams run (default 20) and CANCELLED_STREAMS how many streams
are cancelled (default 24): the developer loop's sizes; `make reliability` runs 180 s and 400."""

import os
import random
import statistics
import threading
import time

import grpc
import psutil
import pytest
import torch

from generator.engine import EngineSettings
from generator.server import GeneratorConfig, build_service
from protos.steering.v1 import generator_pb2 as pb
from protos.steering.v1 import generator_pb2_grpc
from steering.generate import render_prompt
from steering.loading import load_model
from steering.profiles import Profile
from steering.registry import load_registry
from blip_served import STEERED
from grpc_helpers import StackInThread

LOAD_SECONDS = float(os.environ.get("LOAD_SECONDS", "20"))
CANCELLED = int(os.environ.get("CANCELLED_STREAMS", "24"))
PROMPTS = ["Tell me about dinosaurs.", "I drew a cat!", "Why is snow cold?", "Can you sing?", "I lost my shoe."]
CONCEPTS = [STEERED, ""]  # what Blip steers on SmolLM2 by Generate, and no steering


@pytest.fixture(scope="module")
def stack():
    service = build_service(GeneratorConfig(profile=Profile.BLIP, engine=EngineSettings(max_batch=8, max_queue=16)))
    s = StackInThread(service)
    yield s
    s.stop()
    service.close()


def _request(rng: random.Random) -> pb.GenerateRequest:
    concept = rng.choice(CONCEPTS)
    req = pb.GenerateRequest(prompt=rng.choice(PROMPTS), max_tokens=rng.randint(4, 16))
    if concept:
        req.concept = concept
    return req


def test_32_streams_hold_without_errors_or_memory_growth(stack, figures) -> None:
    stop = time.monotonic() + LOAD_SECONDS
    outcomes: dict[str, int] = {}
    lock = threading.Lock()
    errors: list[str] = []

    completed = [0] * 32

    def worker(seed: int) -> None:
        """Streams until the time is up and it has completed one at least: every one of the 32
        must get through, however slow the machine (a throughput floor would test the machine)."""
        rng = random.Random(seed)
        with grpc.insecure_channel(stack.generator_address) as channel:
            stub = generator_pb2_grpc.GeneratorStub(channel)
            while (time.monotonic() < stop or not completed[seed]) and not errors:
                try:
                    events = list(stub.Generate(_request(rng), timeout=120))
                    kind = "completed" if events[-1].WhichOneof("event") == "finished" else "no finish"
                except grpc.RpcError as err:
                    kind = err.code().name
                    if err.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                        errors.append(f"{kind}: {err.details()}")
                    else:
                        retry = dict(err.trailing_metadata() or ()).get("retry-after-ms", "500")
                        time.sleep(int(retry) / 1000)
                with lock:
                    outcomes[kind] = outcomes.get(kind, 0) + 1
                completed[seed] += kind == "completed"

    process = psutil.Process()
    samples: list[tuple[float, int]] = []
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(32)]
    start = time.monotonic()
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        samples.append((time.monotonic() - start, process.memory_info().rss))
        time.sleep(0.5)
    for t in threads:
        t.join()
    assert not errors, errors[:5]
    assert all(completed) and set(outcomes) <= {"completed", "RESOURCE_EXHAUSTED"}, outcomes
    # Memory: a window (a fifth of the run, at most a minute) after two windows of warm-up, against
    # the last one. Over 20 s the window after one was still warming up: +4.7% to +5.3% there,
    # +3.3% over 40 s (allocator pools and caches filling, not growth).
    window = min(60.0, LOAD_SECONDS / 5)
    first = [rss for t, rss in samples if 2 * window <= t < 3 * window]
    last = [rss for t, rss in samples if t >= samples[-1][0] - window]
    growth = statistics.mean(last) / statistics.mean(first) - 1
    print(f"\n32 streams for {LOAD_SECONDS:.0f}s: {outcomes}; memory {statistics.mean(first) / 2**20:.0f} MB -> "
          f"{statistics.mean(last) / 2**20:.0f} MB ({growth:+.1%})")
    assert growth < 0.05
    figures["load"] = {"streams": 32, "seconds": LOAD_SECONDS, "outcomes": outcomes, "memory_growth": round(growth, 4),
                       "memory_mb_first": round(statistics.mean(first) / 2**20),
                       "memory_mb_last": round(statistics.mean(last) / 2**20)}


def test_streams_cancelled_at_random_points_leave_the_model_untouched(stack, paths, figures) -> None:
    rng = random.Random(7)
    cancelled_after: list[int] = []

    def cancel_one(seed: int) -> None:
        local = random.Random(seed)
        with grpc.insecure_channel(stack.generator_address) as channel:
            call = generator_pb2_grpc.GeneratorStub(channel).Generate(_request(local), timeout=120)
            stop_after = local.randint(0, 8)  # events before hanging up: 0 = at once
            seen = 0
            try:
                for _ in call:
                    if seen >= stop_after:
                        break
                    seen += 1
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.details()
            call.cancel()
            cancelled_after.append(seen)

    seeds = [rng.randrange(2**31) for _ in range(CANCELLED)]
    for wave in range(0, len(seeds), 16):
        threads = [threading.Thread(target=cancel_one, args=(s,)) for s in seeds[wave : wave + 16]]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    slot = next(iter(stack.generator.service.slots.values()))
    deadline = time.monotonic() + 60  # the engine drops the last cancelled rows at its next step
    while slot.engine.metrics.batch_streams.labels(slot.loaded.name)._value.get() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert slot.engine.wait_warm(60)  # an idle engine warms Chat's next prompts, steering them
    loaded = slot.loaded
    assert all(not loaded.layers[i]._forward_hooks for i in range(len(loaded.layers)))

    fresh = load_model(load_registry(paths.registry).get(loaded.name), paths.cache, device="cpu")
    ids = loaded.tokenizer(render_prompt(loaded, "Tell me about the sea."), return_tensors="pt",
                           add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        served = loaded.model(input_ids=ids).logits
        new = fresh.model(input_ids=ids).logits
    assert torch.equal(served, new)
    # ...and the next unsteered request through the service is the fresh model's greedy reply.
    with grpc.insecure_channel(stack.generator_address) as channel:
        events = list(generator_pb2_grpc.GeneratorStub(channel).Generate(
            pb.GenerateRequest(prompt="Tell me about the sea.", max_tokens=8), timeout=120))
    text = "".join(e.text for e in events if e.WhichOneof("event") == "text")
    with torch.no_grad():
        out = fresh.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    assert text == fresh.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    figures["cancellation"] = {"streams": len(cancelled_after), "events_before_cancel": sorted(set(cancelled_after)),
                               "hooks_left": 0, "logits_equal_fresh_model": True}
