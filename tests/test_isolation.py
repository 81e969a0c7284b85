"""One request's failure never hurts another's stream, on the real SmolLM2.

A row that fails (in sampling, in the guard, in its joiners' prefill) ends alone with an
error; every other row produces exactly the tokens it produces alone, and the engine goes
on serving. Through gRPC, the write-up's reproduction (a temperature of 1e-40 beside a
steered child's stream) gives the bad request INVALID_ARGUMENT and the child the whole reply."""

import dataclasses

import grpc
import numpy as np
import pytest
import torch

from generator.engine import Engine, EngineSettings
from generator.job import GateConfig, Job, KlConfig, Sampling, Steering
from generator.events import Finished, Reinjection, Started
from generator.server import GeneratorConfig, build_service
from protos.steering.v1 import generator_pb2 as pb
from protos.steering.v1 import generator_pb2_grpc
from steering.errors import SamplingError
from steering.generate import render_prompt, sample
from steering.guard import load_guard
from steering.loading import LoadedModel
from steering.profiles import Profile
from steering.store import read_vector
from blip_served import STEERED
from collector import Collector
from grpc_helpers import collect, run, with_generator

PROMPT = "Tell me about your day."


@pytest.fixture(scope="module")
def engine(smollm: LoadedModel):
    e = Engine(smollm, EngineSettings(max_batch=4, max_queue=8))
    yield e
    e.close()


def _steering(smollm: LoadedModel, paths, concept: str, alpha: float, max_alpha: float = 8.0) -> Steering:
    cv = read_vector(paths.vectors / smollm.name / f"{concept}.safetensors")
    return Steering(concept, {layer: cv.directions[layer] for layer in smollm.steering_layers}, alpha, max_alpha, frozenset())


def _job(smollm: LoadedModel, steering: Steering | None, prompt: str = PROMPT, **kw) -> tuple[Job, Collector]:
    ids = smollm.tokenizer(render_prompt(smollm, prompt), add_special_tokens=False)["input_ids"]
    c = Collector()
    kw.setdefault("gate", GateConfig(enabled=False))
    return Job(ids, c, steering, max_tokens=kw.pop("max_tokens", 32), **kw), c


def _alone(engine: Engine, smollm: LoadedModel, paths) -> str:
    job, c = _job(smollm, _steering(smollm, paths, "happy", 4.0))
    engine.submit(job)
    assert c.done.wait(300) and c.failed is None
    return c.text


def _beside(engine: Engine, smollm: LoadedModel, paths, bad: Job, bad_c: Collector) -> Collector:
    """A valid happy-steered stream, with `bad` joining its running batch after its first text."""
    job, c = _job(smollm, _steering(smollm, paths, "happy", 4.0))
    engine.submit(job)
    assert c.first_text.wait(120)
    engine.submit(bad)
    assert bad_c.done.wait(300) and c.done.wait(300)
    return c


def test_sampler_refuses_unusable_rows_by_name() -> None:
    logits = torch.zeros(3, 10)
    logits[1, 4] = float("nan")
    logits[2] = -torch.inf
    with pytest.raises(SamplingError, match=r"row\(s\) \[1, 2\]"):
        sample(logits, 0.0, 1.0, None)
    with pytest.raises(ValueError, match="at least 0.01"):
        sample(torch.zeros(1, 10), 1e-40, 1.0, None)
    assert sample(logits[:1], 0.7, 0.9, torch.Generator().manual_seed(0)).shape == (1,)


def test_a_row_failing_in_sampling_ends_alone(smollm, paths, engine) -> None:
    reference = _alone(engine, smollm, paths)
    # The engine's own callers validate temperature; this one reaches the sampler as it is.
    bad, bad_c = _job(smollm, None, "Say hi.", sampling=Sampling(temperature=1e-40))
    good = _beside(engine, smollm, paths, bad, bad_c)
    assert isinstance(bad_c.failed.error, ValueError) and not any(isinstance(e, Finished) for e in bad_c.events)
    assert good.failed is None and good.text == reference and good.finished.reason in ("length", "end_of_text")
    assert all(not smollm.layers[i]._forward_hooks for i in range(len(smollm.layers)))


def test_a_row_whose_guard_breaks_ends_alone(smollm, paths, engine) -> None:
    reference = _alone(engine, smollm, paths)
    guard = load_guard(paths.guard)
    assert guard.harm is not None
    damaged = dataclasses.replace(guard.harm, feature_mean=np.zeros(7, dtype=np.float32))  # of the wrong width
    broken = dataclasses.replace(guard, harm=damaged)
    bad, bad_c = _job(smollm, None, "Tell me a story about a cat.", guard=broken)
    good = _beside(engine, smollm, paths, bad, bad_c)
    assert bad_c.failed is not None and not bad_c.text  # nothing unchecked reached its client
    assert good.failed is None and good.text == reference


def test_a_failed_prefill_fails_its_joiners_only(smollm, paths, engine) -> None:
    reference = _alone(engine, smollm, paths)
    wrong = Steering("happy", {12: torch.ones(7)}, 4.0, 8.0, frozenset())  # a direction of the wrong width
    bad, bad_c = _job(smollm, wrong)
    good = _beside(engine, smollm, paths, bad, bad_c)
    assert bad_c.failed is not None and isinstance(bad_c.events[0], Started)
    assert good.failed is None and good.text == reference
    again, c = _job(smollm, None, "Say hi.", max_tokens=4)  # the engine still serves
    engine.submit(again)
    assert c.done.wait(120) and c.finished.completion_tokens >= 1


def test_close_ends_running_and_queued_streams(smollm, paths) -> None:
    e = Engine(smollm, EngineSettings(max_batch=1, max_queue=4))
    collectors = []
    for _ in range(3):
        job, c = _job(smollm, None, max_tokens=200)
        e.submit(job)
        collectors.append(c)
    assert collectors[0].first_text.wait(120)
    e.close()
    assert all(c.done.wait(5) for c in collectors), "a queued job never heard that the engine stopped"
    assert [c.finished.reason for c in collectors] == ["cancelled"] * 3


def test_reinjection_moves_a_negative_alpha_further_from_zero(smollm, paths, engine) -> None:
    # A KL threshold no steering can reach: the monitor re-injects after every window.
    kl = KlConfig(enabled=True, window=2, threshold=1e9, alpha_step=1.5)
    job, c = _job(smollm, _steering(smollm, paths, "happy", -2.0, max_alpha=5.0), kl=kl, max_tokens=24)
    engine.submit(job)
    assert c.done.wait(300) and c.failed is None
    steps = [(e.alpha_before, e.alpha_after) for e in c.events if isinstance(e, Reinjection)]
    assert steps and all(after < before <= 0 or after < 0 for before, after in steps)
    assert all(-5.0 <= after < -2.0 for _, after in steps)


# ---- through gRPC: the reproduction from the issue ----------------------------------------


@pytest.fixture(scope="module")
def blip():
    service = build_service(GeneratorConfig(profile=Profile.BLIP, engine=EngineSettings(max_batch=4, max_queue=8)))
    yield service
    service.close()


def test_a_tiny_temperature_is_refused_and_the_child_beside_it_gets_the_whole_reply(blip) -> None:
    child = pb.GenerateRequest(prompt=PROMPT, concept=STEERED, max_tokens=32)
    bad = pb.GenerateRequest(prompt=PROMPT, concept=STEERED, max_tokens=32, sampling=pb.Sampling(temperature=1e-40))

    async def body(channel, _):
        stub = generator_pb2_grpc.GeneratorStub(channel)
        alone = await collect(stub.Generate(child, timeout=300))
        running = stub.Generate(child, timeout=300)
        first = [await running.read()]  # the child's stream is running when the bad request arrives
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await collect(stub.Generate(bad, timeout=60))
        rest = []
        while (event := await running.read()) is not grpc.aio.EOF:
            rest.append(event)
        return alone, first + rest, err.value

    alone, beside, err = run(with_generator(blip, body))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "temperature" in err.details()

    def text(events):
        return "".join(e.text for e in events if e.WhichOneof("event") == "text")

    assert beside[-1].WhichOneof("event") == "finished" and text(beside) == text(alone) and text(alone)


def test_a_failed_batch_forward_fails_every_stream_in_it_and_the_engine_serves_on(smollm, paths, monkeypatch) -> None:
    """The one failure that may end a batch: its shared forward pass. Injected once (the real
    forward cannot be made to fail on demand), it gives every stream a status, leaves no hook,
    and the next request is served."""
    import generator.engine as engine_module

    real_decode, calls = engine_module.decode, []

    def failing_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("injected: the batch's forward pass failed")
        return real_decode(*args, **kwargs)

    monkeypatch.setattr(engine_module, "decode", failing_once)
    e = Engine(smollm, EngineSettings(max_batch=4, max_queue=4))
    try:
        collectors = []
        for concept in ("happy", None):
            job, c = _job(smollm, _steering(smollm, paths, concept, 4.0) if concept else None, max_tokens=40)
            e.submit(job)
            collectors.append(c)
        assert all(c.done.wait(300) for c in collectors)
        assert all(isinstance(c.failed.error, RuntimeError) for c in collectors)
        assert all(not smollm.layers[i]._forward_hooks for i in range(len(smollm.layers)))
        again, c = _job(smollm, None, "Say hi.", max_tokens=4)
        e.submit(again)
        assert c.done.wait(120) and c.failed is None and c.finished.completion_tokens >= 1
    finally:
        e.close()
