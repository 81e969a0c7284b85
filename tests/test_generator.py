"""The generator service over real gRPC, in process on port 0, against the real SmolLM2."""

import asyncio
import json
import math

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from generator.engine import EngineSettings
from generator.server import GeneratorConfig, build_service
from protos.steering.v1 import generator_pb2 as pb
from protos.steering.v1 import generator_pb2_grpc
from steering.profiles import Profile
from steering.record import record_path
from blip_served import STEERED
from grpc_helpers import collect, run, with_generator

BLOCKED = ("hostile", "mean", "angry", "dominant", "anxious", "urgency")


@pytest.fixture(scope="module")
def service():
    svc = build_service(GeneratorConfig(profile=Profile.BLIP, engine=EngineSettings(max_batch=2, max_queue=2)))
    yield svc
    svc.close()


def _no_hooks(service) -> bool:
    slot = next(iter(service.slots.values()))
    assert slot.engine.wait_warm(60)  # an idle engine warms Chat's next prompts, steering them
    layers = slot.loaded.layers
    return all(not layers[i]._forward_hooks for i in range(len(layers)))


def _generate(service, request: pb.GenerateRequest, timeout: float | None = 120):
    async def body(channel, _):
        stub = generator_pb2_grpc.GeneratorStub(channel)
        return await collect(stub.Generate(request, timeout=timeout))

    return run(with_generator(service, body))


def _code(service, request: pb.GenerateRequest) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        _generate(service, request)
    return info.value.code(), info.value.details()


def _recorded_config(paths, concept: str) -> dict:
    """A concept's configuration in the committed SmolLM2 record (the default band before the search)."""
    entry = json.loads(record_path(paths.model_vectors("smollm2-135m-instruct")).read_text())["concepts"][concept]
    return entry.get("config", {"layers": list(range(12, 19)), "scale": "uniform", "positions": "all", "preserve_norm": False})


def test_stream_order_and_final_event(service, paths) -> None:
    events = _generate(service, pb.GenerateRequest(prompt="Tell me about your morning.", concept=STEERED, max_tokens=16))
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds[0] == "started" and kinds[1] == "gate" and kinds[-1] == "finished"
    assert set(kinds[2:-1]) <= {"text"} and "text" in kinds
    started, finished = events[0].started, events[-1].finished
    config = _recorded_config(paths, STEERED)  # the engine steers with the record's configuration
    assert started.concept == STEERED and list(started.layers) == config["layers"]
    assert (list(started.config.layers), started.config.scale, started.config.positions, started.config.preserve_norm) == (
        config["layers"], config["scale"], config["positions"], config["preserve_norm"])
    assert started.alpha > 0  # the validated recommended alpha
    assert finished.reason in (pb.STOP_REASON_LENGTH, pb.STOP_REASON_END_OF_TEXT)
    assert finished.completion_tokens <= 16 and finished.prompt_tokens == started.prompt_tokens
    text = "".join(e.text for e in events if e.WhichOneof("event") == "text")
    assert text.strip()
    assert _no_hooks(service)


def test_greedy_stream_matches_in_process_generation(paths) -> None:
    """The engine's stream is the same text as the core's batched generate for greedy decoding
    (personal profile without the content guard, which may withhold and regenerate text), both
    steered with the record's configuration."""
    from steering.config import SteerConfig
    from steering.generate import GenerationSettings, generate

    service = build_service(GeneratorConfig(profile=Profile.PERSONAL, guard=False))
    slot = next(iter(service.slots.values()))
    cv = slot.vectors["happy"]
    alpha = slot.steerability.concepts["happy"].recommended_alpha
    events = _generate(service, pb.GenerateRequest(prompt="What is your favourite game?", concept="happy",
                                                   alpha=alpha, max_tokens=20))
    streamed = "".join(e.text for e in events if e.WhichOneof("event") == "text").strip()
    config = SteerConfig.from_dict(_recorded_config(paths, "happy"))
    ref = generate(slot.loaded, ["What is your favourite game?"], [config.row(cv, alpha)],
                   GenerationSettings(max_new_tokens=20))[0].text
    service.close()
    assert streamed == ref


@pytest.mark.parametrize(
    "request_, code, words",
    [
        (pb.GenerateRequest(model="nope", prompt="hi"), grpc.StatusCode.NOT_FOUND, "not served here"),
        (pb.GenerateRequest(prompt="   "), grpc.StatusCode.INVALID_ARGUMENT, "prompt is empty"),
        (pb.GenerateRequest(), grpc.StatusCode.INVALID_ARGUMENT, "either a prompt or chat messages"),
        (pb.GenerateRequest(prompt="x" * 9000), grpc.StatusCode.INVALID_ARGUMENT, "limit is 8000"),
        (pb.GenerateRequest(prompt="hi", concept=STEERED, alpha=math.nan), grpc.StatusCode.INVALID_ARGUMENT, "alpha"),
        (pb.GenerateRequest(prompt="hi", concept=STEERED, alpha=1e6), grpc.StatusCode.INVALID_ARGUMENT, "beyond concept"),
        (pb.GenerateRequest(prompt="hi", max_tokens=100000), grpc.StatusCode.INVALID_ARGUMENT, "max_tokens"),
        (pb.GenerateRequest(prompt="hi", sampling=pb.Sampling(temperature=-1)), grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
        (pb.GenerateRequest(prompt="hi", sampling=pb.Sampling(temperature=1e-40)), grpc.StatusCode.INVALID_ARGUMENT,
         "overflows the logits"),
        (pb.GenerateRequest(prompt="hi", sampling=pb.Sampling(temperature=0.5, top_p=-0.5)), grpc.StatusCode.INVALID_ARGUMENT,
         "top_p"),
        (pb.GenerateRequest(prompt="hi", concept=STEERED, alpha=-6), grpc.StatusCode.INVALID_ARGUMENT, "only steers toward"),
        (pb.GenerateRequest(messages=pb.Conversation(messages=[pb.ChatMessage(role="wizard", content="hi")])),
         grpc.StatusCode.INVALID_ARGUMENT, "unknown message role"),
        (pb.GenerateRequest(prompt="hi", concept="Happy"), grpc.StatusCode.INVALID_ARGUMENT, "plain lower-case"),
        (pb.GenerateRequest(prompt="hi", concept="../hostile"), grpc.StatusCode.INVALID_ARGUMENT, "plain lower-case"),
        (pb.GenerateRequest(prompt="hi", concept="nonexistent"), grpc.StatusCode.PERMISSION_DENIED, "Blip profile"),
    ],
)
def test_bad_requests_get_clear_status_codes(service, request_, code, words) -> None:
    got, details = _code(service, request_)
    assert got == code and words in details, details


@pytest.mark.parametrize("concept", BLOCKED)
def test_blocked_concepts_are_permission_denied(service, concept) -> None:
    got, details = _code(service, pb.GenerateRequest(prompt="hi", concept=concept, alpha=-2.0))
    assert got == grpc.StatusCode.PERMISSION_DENIED and "not allowed in the Blip profile" in details
    # ...and their files were never loaded into the service.
    assert all(concept not in slot.vectors and concept not in slot.refused for slot in service.slots.values())


def test_tag_is_mapped_by_the_policy(service, paths) -> None:
    from protos.steering.v1 import tagger_pb2

    events = _generate(service, pb.GenerateRequest(prompt="We are going to the zoo!", tag=tagger_pb2.EMOTION_EXCITED, max_tokens=4))
    assert events[0].started.concept == "happy"
    events = _generate(service, pb.GenerateRequest(prompt="I am nervous.", tag=tagger_pb2.EMOTION_ANXIOUS, max_tokens=4))
    # The nervous child: empathy, as the write-up asks, steered, in the mode and at the alpha its record chose.
    blip = json.loads(record_path(paths.model_vectors("smollm2-135m-instruct")).read_text())["concepts"]["empathy"]["blip"]
    assert blip["mode"] in ("steer", "both")
    started = events[0].started
    assert (started.concept, started.mode, round(started.alpha, 4)) == ("empathy", blip["mode"], blip["alpha"])
    # A concept on the allowlist that passes no gate at a child-safe alpha is refused, not served weakly.
    got, details = _code(service, pb.GenerateRequest(prompt="I am calm.", concept="calm"))
    assert got == grpc.StatusCode.FAILED_PRECONDITION and "'calm' is not servable" in details
    events = _generate(service, pb.GenerateRequest(prompt="What is two plus two?", tag=tagger_pb2.EMOTION_NONE, max_tokens=4))
    assert events[0].started.concept == "" and events[1].gate.decision == pb.GATE_DECISION_NO_STEERING


def test_gate_skips_when_a_concept_word_is_already_likely(service) -> None:
    conv = pb.Conversation(messages=[pb.ChatMessage(role="user", content="My goldfish died this morning."),
                                     pb.ChatMessage(role="assistant", content="Oh no, I am so")])
    on = pb.GateSettings(enabled=True)
    events = _generate(service, pb.GenerateRequest(messages=conv, concept=STEERED, max_tokens=6, gate=on))
    gate = events[1].gate
    assert gate.decision == pb.GATE_DECISION_SKIP and gate.token.strip() == "sorry" and gate.probability >= 0.25
    events = _generate(service, pb.GenerateRequest(prompt="Tell me about your morning.", concept=STEERED, max_tokens=4,
                                                   gate=on))
    assert events[1].gate.decision == pb.GATE_DECISION_STEER and len(events[1].gate.top3) == 3
    # Off by default: a request that does not ask for it is steered without looking, and the
    # deprecated `disabled` still turns it off where `enabled` asks for it.
    for gate in (pb.GateSettings(), pb.GateSettings(enabled=True, disabled=True)):
        events = _generate(service, pb.GenerateRequest(messages=conv, concept=STEERED, max_tokens=2, gate=gate))
        assert events[1].gate.decision == pb.GATE_DECISION_DISABLED


def test_kl_samples_and_forced_reinjection(service) -> None:
    kl = pb.KlSettings(enabled=True, window=4, threshold=1000.0, alpha_step=1.0)  # any KL counts as faded
    slot = next(iter(service.slots.values()))
    ceiling = service.ceiling(slot.steerability.concepts[STEERED])  # in Blip the child-safe ceiling caps re-injection
    events = _generate(service, pb.GenerateRequest(prompt="Tell me about your morning.", concept=STEERED, alpha=ceiling - 2,
                                                   max_tokens=12, kl=kl))
    samples = [e.kl for e in events if e.WhichOneof("event") == "kl"]
    reinjections = [e.reinjection for e in events if e.WhichOneof("event") == "reinjection"]
    assert len(samples) >= 4 and all(s.kl >= 0 for s in samples) and samples[0].kl > 0  # the reply may end early
    assert reinjections and reinjections[0].token_index == 3
    r = reinjections[0]
    assert r.alpha_after == pytest.approx(min(r.alpha_before + 1.0, ceiling))
    # While re-injected, the samples report the raised alpha.
    assert any(s.alpha == pytest.approx(r.alpha_after) for s in samples if s.token_index > r.token_index)


def test_kl_without_reinjection_at_a_low_threshold(service) -> None:
    kl = pb.KlSettings(enabled=True, window=4, threshold=1e-9)
    events = _generate(service, pb.GenerateRequest(prompt="Tell me about your morning.", concept=STEERED, max_tokens=8, kl=kl))
    assert any(e.WhichOneof("event") == "kl" for e in events)
    assert not any(e.WhichOneof("event") == "reinjection" for e in events)


def test_stop_sequence(service) -> None:
    request = pb.GenerateRequest(prompt="Tell me about your favourite animal.", max_tokens=30)
    full = "".join(e.text for e in _generate(service, request) if e.WhichOneof("event") == "text")
    words = full.split()
    stop = words[len(words) // 2]  # a word the greedy reply is sure to reach
    request.stop.append(stop)
    events = _generate(service, request)
    text = "".join(e.text for e in events if e.WhichOneof("event") == "text")
    assert events[-1].finished.reason == pb.STOP_REASON_STOP_SEQUENCE
    assert stop not in text and full.startswith(text) and len(text) < len(full)


def test_cancel_mid_stream_stops_and_leaves_no_hook(service) -> None:
    async def body(channel, running):
        stub = generator_pb2_grpc.GeneratorStub(channel)
        call = stub.Generate(pb.GenerateRequest(prompt="Tell me a long story about a dragon.", concept=STEERED, max_tokens=200))
        async for event in call:
            if event.WhichOneof("event") == "text":
                call.cancel()
                break
        for _ in range(100):  # the engine notices within a token
            await asyncio.sleep(0.05)
            if _no_hooks(service) and running.service.slots[running.service.default].engine._jobs.empty():
                break
        assert _no_hooks(service)
        # The next request is served normally.
        after = await collect(stub.Generate(pb.GenerateRequest(prompt="Say hi.", max_tokens=3)))
        assert after[-1].WhichOneof("event") == "finished"

    run(with_generator(service, body))


def test_deadline_is_honoured(service) -> None:
    """A reply that would run ~15 s stops at a 1 s deadline. The server reads the deadline when
    the call starts and ends the stream with STOP_REASON_DEADLINE as it passes; which arrives
    first at the client, that event or its own timer's DEADLINE_EXCEEDED, is a race."""
    try:
        events = _generate(service, pb.GenerateRequest(prompt="Tell me a very long story.", max_tokens=400), timeout=1.0)
    except grpc.aio.AioRpcError as error:
        assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    else:
        assert events[-1].finished.reason == pb.STOP_REASON_DEADLINE
    events = _generate(service, pb.GenerateRequest(prompt="Say hi.", max_tokens=3))
    assert events[-1].WhichOneof("event") == "finished" and _no_hooks(service)


def test_queue_limit_gives_resource_exhausted(service) -> None:
    async def body(channel, _):
        stub = generator_pb2_grpc.GeneratorStub(channel)
        calls = [stub.Generate(pb.GenerateRequest(prompt="Tell me a story.", max_tokens=30)) for _ in range(10)]
        results = await asyncio.gather(*(collect(c) for c in calls), return_exceptions=True)
        return results, [c for c in calls]

    results, calls = run(with_generator(service, body))
    errors = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert errors and all(e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for e in errors)
    assert any(not isinstance(r, Exception) for r in results)
    assert "retry" in errors[0].details()


def test_list_models_reports_validation_and_allowlist(service, paths) -> None:
    async def body(channel, _):
        return await generator_pb2_grpc.GeneratorStub(channel).ListModels(pb.ListModelsRequest())

    resp = run(with_generator(service, body))
    assert resp.profile == "blip"
    model = resp.models[0]
    assert model.name == "smollm2-135m-instruct" and model.steerable and model.is_default
    names = {c.name for c in model.concepts}
    assert names <= {"warmth", "empathy", "enthusiasm", "playfulness", "happy", "sad", "kind", "calm"}
    served = [c for c in model.concepts if c.servable]
    print("\n" + "\n".join(f"{c.name}: {'served at ' + format(c.recommended_alpha, 'g') if c.servable else 'not served'} "
                           f"d {c.recommended_d:.2f} [{c.recommended_d_low:.2f}, {c.recommended_d_high:.2f}] n {c.replies}, "
                           f"ceiling {c.alpha_ceiling:g} (d there {c.ceiling_d:.2f}): {c.reason}" for c in model.concepts))
    assert served, "Blip serves no concept: re-run `steer validate`"
    for c in served:  # served only where the whole interval clears the gate, inside the child-safe ceiling
        assert 0 < c.recommended_alpha <= c.alpha_ceiling <= c.child_safe_alpha
        assert c.recommended_d_low > 0.5 and c.recommended_d_low < c.recommended_d < c.recommended_d_high and c.replies >= 96
        assert list(c.config.layers) == _recorded_config(paths, c.name)["layers"] and c.config.name
    for c in model.concepts:
        if not c.servable:
            assert c.recommended_alpha == 0 and c.replies == 0 and c.reason


def test_health_goes_serving_and_reflection_lists_services(service) -> None:
    async def body(channel, running):
        health = health_pb2_grpc.HealthStub(channel)
        resp = await health.Check(health_pb2.HealthCheckRequest(service="steering.v1.Generator"))
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
        await running.server.set_serving(False)
        resp = await health.Check(health_pb2.HealthCheckRequest(service=""))
        assert resp.status == health_pb2.HealthCheckResponse.NOT_SERVING

    run(with_generator(service, body))


def test_blocked_concept_in_policy_fails_at_start(tmp_path) -> None:
    from steering.errors import ConfigError

    policy = tmp_path / "policy.toml"
    policy.write_text('[tags]\nhappy = "hostile"\n')
    with pytest.raises(ConfigError, match="maps tag 'happy' to a concept the blip profile refuses"):
        build_service(GeneratorConfig(policy=policy))


def _scrape(port: int) -> dict[str, float]:
    """Prometheus text format -> {"name{labels}": value}."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def test_metrics_endpoint_counts_tokens_gate_and_refusals(service) -> None:
    async def body(channel, running):
        stub = generator_pb2_grpc.GeneratorStub(channel)
        before = _scrape(running.metrics.port)
        events = await collect(stub.Generate(pb.GenerateRequest(prompt="Say hello.", concept=STEERED, max_tokens=6)))
        with pytest.raises(grpc.aio.AioRpcError):
            await collect(stub.Generate(pb.GenerateRequest(prompt="Hi", concept="hostile")))
        with pytest.raises(grpc.aio.AioRpcError):
            await collect(stub.Generate(pb.GenerateRequest(prompt="", max_tokens=4)))
        return before, events, _scrape(running.metrics.port)

    before, events, after = run(with_generator(service, body, GeneratorConfig(metrics_port=0)))
    model = 'model="smollm2-135m-instruct"'

    def gained(key: str) -> float:
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert gained(f"steer_tokens_generated_total{{{model}}}") == events[-1].finished.completion_tokens > 0
    decisions = [k for k in after if k.startswith("steer_gate_decisions_total")]
    assert sum(gained(k) for k in decisions) == 1
    assert gained('steer_refusals_total{reason="permission_denied"}') == 1
    assert gained('steer_refusals_total{reason="invalid_argument"}') == 1
    assert gained(f"steer_time_to_first_token_seconds_count{{{model}}}") == 1
    assert f"steer_queue_depth{{{model}}}" in after and f"steer_batch_occupancy{{{model}}}" in after
