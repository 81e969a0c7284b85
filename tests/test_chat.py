"""Chat end to end: the real tagger service and the real generator, both in process."""

import asyncio
import logging

import grpc
import pytest

from generator.server import GeneratorConfig, build_service, serve
from protos.steering.v1 import generator_pb2 as pb
from protos.steering.v1 import generator_pb2_grpc, tagger_pb2
from serving.server import ServerSettings
from steering.profiles import Profile
from tagger.server import serve as serve_tagger

from grpc_helpers import chat


@pytest.fixture(scope="module")
def service():
    svc = build_service(GeneratorConfig(profile=Profile.BLIP))
    yield svc
    svc.close()


def test_chat_tags_each_turn_and_steers_by_policy(service, caplog) -> None:
    secret = "My hamster Biscuit is sleeping in his little house"
    turns = ["We are going to the beach tomorrow and I can't wait!!!", f"{secret}. It's so quiet and cosy."]

    async def body():
        tagger = await serve_tagger(ServerSettings())
        try:
            return await chat(service, turns, f"127.0.0.1:{tagger.port}")
        finally:
            await tagger.stop()

    with caplog.at_level(logging.INFO):
        events = asyncio.run(body())
    kinds = [e.WhichOneof("event") for e in events]
    # Per turn: the tag, the concept, then the reply's stream ending in finished.
    assert kinds[0] == "tag" and kinds[1] == "concept" and events[2].reply.WhichOneof("event") == "started"
    tags = [e.tag for e in events if e.WhichOneof("event") == "tag"]
    concepts = [e.concept for e in events if e.WhichOneof("event") == "concept"]
    assert len(tags) == 2 and len(concepts) == 2
    labels = [tagger_pb2.Emotion.Name(t.label).removeprefix("EMOTION_").lower() for t in tags]
    assert labels[0] in ("excited", "happy")
    slot = service.slots[service.default]

    def expected(label: str) -> tuple[str, str]:
        """(concept, mode) of a turn with this tag: "" for both where Chat serves the concept in no mode."""
        concept = service.policy.concept_for(label)
        if concept is None or label in service.unserved_policy_tags():
            return "", ""  # a plain reply, with a notice when the concept is not served
        return concept, str(service.chat_serving(slot, concept).mode)

    assert concepts == [expected(label)[0] for label in labels]
    starts = [e.reply.started for e in events if e.WhichOneof("event") == "reply" and e.reply.WhichOneof("event") == "started"]
    assert [(s.concept, s.mode) for s in starts] == [expected(label) for label in labels]
    # The child's words are not in the INFO log.
    assert secret not in caplog.text and "beach" not in caplog.text


def test_tagger_down_replies_unsteered_and_says_so(service) -> None:
    events = asyncio.run(chat(service, ["I got a gold star today!"], "127.0.0.1:1"))
    assert events[0].WhichOneof("event") == "concept" and events[0].concept == ""
    notices = [e.reply.notice.message for e in events if e.WhichOneof("event") == "reply" and e.reply.WhichOneof("event") == "notice"]
    assert notices and "tagger unavailable" in notices[0]
    assert events[-1].reply.finished.completion_tokens > 0


def test_tagger_down_fails_fast_when_configured(service) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        asyncio.run(chat(service, ["hello"], "127.0.0.1:1", fail_fast=True))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "tagger" in info.value.details()


def test_empty_turn_is_invalid(service) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        asyncio.run(chat(service, ["   "], "127.0.0.1:1"))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_turn_the_tagger_refuses_is_invalid_argument_not_tagger_unavailable(service) -> None:
    async def body():
        tagger = await serve_tagger(ServerSettings())
        try:
            return await chat(service, ["I like trains. " * 200], f"127.0.0.1:{tagger.port}")
        finally:
            await tagger.stop()

    with pytest.raises(grpc.aio.AioRpcError) as info:
        asyncio.run(body())
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "tagger refused this turn" in info.value.details() and "limit is 2000" in info.value.details()


def test_a_label_this_generator_does_not_know_counts_as_no_tagger() -> None:
    from generator.tagger_client import tag_from_pb
    from steering.errors import Unavailable

    newer = tagger_pb2.TagResponse(label=99, confidence=0.9, scores=[tagger_pb2.LabelScore(label=99, score=0.9),
                                                                    tagger_pb2.LabelScore(label=tagger_pb2.EMOTION_HAPPY, score=0.1)])
    with pytest.raises(Unavailable, match="label value 99"):
        tag_from_pb(newer)
    newer.label = tagger_pb2.EMOTION_HAPPY  # a known label with an unknown score beside it: the unknown one is dropped
    assert tag_from_pb(newer).scores == {"happy": pytest.approx(0.1)}


def test_time_to_first_sentence_covers_the_turn_from_its_arrival_to_the_first_whole_sentence(service) -> None:
    """steer_time_to_first_sentence_seconds: one observation per turn, at least the engine's own
    time to first token (the tagging and policy come before it) and at most what the client,
    which sent the turn before the server saw it, waited for the first whole sentence."""
    import time

    from steering.guard import holds_sentence

    slot = service.slots[service.default]
    registry, labels = slot.engine.metrics.registry, {"model": slot.loaded.name}

    def observed() -> tuple[float, float]:
        return (registry.get_sample_value("steer_time_to_first_sentence_seconds_count", labels) or 0.0,
                registry.get_sample_value("steer_time_to_first_sentence_seconds_sum", labels) or 0.0)

    async def body():
        tagger = await serve_tagger(ServerSettings())
        running = await serve(ServerSettings(), GeneratorConfig(tagger=f"127.0.0.1:{tagger.port}"), service=service)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{running.server.port}") as channel:
                call = generator_pb2_grpc.GeneratorStub(channel).Chat(timeout=120)
                sent = time.perf_counter()
                await call.write(pb.ChatTurn(text="I'm scared about the spelling test tomorrow.", max_tokens=48))
                reply, waited, events = [], None, []
                while True:
                    event = await call.read()
                    events.append(event)
                    if event.WhichOneof("event") == "reply" and event.reply.WhichOneof("event") == "text":
                        reply.append(event.reply.text)
                        if waited is None and holds_sentence("".join(reply)):
                            waited = time.perf_counter() - sent
                    if event.WhichOneof("event") == "reply" and event.reply.WhichOneof("event") == "finished":
                        waited = waited if waited is not None else time.perf_counter() - sent
                        break
                await call.done_writing()
                return waited, events
        finally:
            await running.stop()
            await tagger.stop()

    count, total = observed()
    waited, events = asyncio.run(body())
    new_count, new_total = observed()
    ttfs = new_total - total
    finished = events[-1].reply.finished
    assert new_count == count + 1
    print(f"engine TTFT {finished.time_to_first_token_ms:.0f} ms, TTFS {ttfs * 1000:.0f} ms, client {waited * 1000:.0f} ms, "
          f"reply {finished.seconds * 1000:.0f} ms")
    assert finished.time_to_first_token_ms / 1000 <= ttfs <= waited, (finished.time_to_first_token_ms, ttfs, waited)


def test_between_turns_the_next_prompt_is_warmed_so_a_turn_prefills_only_the_child_s_words(service) -> None:
    """While Blip's reply is spoken and the child answers, the engine prefills how the next
    prompt begins under every concept the policy may pick: the next turn, whichever concept its
    tag picks, prefills only the child's words and the reply's start (the first turn's concept,
    empathy for a nervous child, is not the second's, a happy one)."""
    from generator.events import Finished
    from generator.service import ChatConcept, GenerateSpec
    from generator.tagger_client import TaggerClient

    slot = service.slots[service.default]
    registry, engine = slot.engine.metrics.registry, slot.engine
    words = ["I'm scared about the spelling test tomorrow.", "I got a new puppy and he licked my face!"]

    def tokens(source: str) -> float:
        return registry.get_sample_value("steer_prompt_tokens_total", {"model": slot.loaded.name, "source": source}) or 0.0

    before: dict[str, float] = {}

    async def body() -> list:
        tagger = await serve_tagger(ServerSettings())
        client = TaggerClient(f"127.0.0.1:{tagger.port}")

        async def turns():
            yield words[0], GenerateSpec(max_tokens=24)
            # the child listens, then answers: by then the engine has warmed what it was asked to
            assert await asyncio.get_running_loop().run_in_executor(None, engine.wait_warm, 120)
            before.update({source: tokens(source) for source in ("warmed", "reused", "computed")})
            yield words[1], GenerateSpec(max_tokens=24)

        try:
            return [e async for e in service.chat(turns(), client.tag)]
        finally:
            await client.close()
            await tagger.stop()

    events = asyncio.run(body())
    concepts = [e.concept for e in events if isinstance(e, ChatConcept)]
    second = [e for e in events if isinstance(e, Finished)][-1]
    own = len(slot.loaded.tokenizer(words[1], add_special_tokens=False)["input_ids"])
    computed, reused = tokens("computed") - before["computed"], tokens("reused") - before["reused"]
    print(f"concepts {concepts}; warmed before the second turn {before['warmed']:.0f} tokens in all; second turn: "
          f"{second.prompt_tokens} prompt tokens, {reused:.0f} reused, {computed:.0f} computed ({own} are the child's words)")
    assert before["warmed"] > 0 and reused + computed == second.prompt_tokens
    assert computed <= own + 8  # the child's words, the end of their message and the reply's start
