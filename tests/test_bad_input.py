"""Bad input, property-based: Hypothesis builds requests for every RPC (and raw bytes that are
not valid protobuf at all) and sends them over real gRPC to the real tagger and generator.
Every stream is read to its end: each answer is a stream that finishes or a clear status with
a message, never INTERNAL, UNKNOWN or a crash, and the servers serve normally afterwards.
Each fuzzed Generate is also sent beside a valid steered stream already running, which must
finish with exactly the text it has alone.

RELIABILITY_EXAMPLES sets the cases per RPC (default 6, the developer loop; `make reliability` runs 1000)."""

import os
import struct
from collections import Counter

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from generator.engine import EngineSettings
from generator.server import GeneratorConfig, build_service
from protos.steering.v1 import generator_pb2 as pb
from protos.steering.v1 import tagger_pb2
from steering.profiles import Profile
from blip_served import STEERED
from grpc_helpers import StackInThread

EXAMPLES = int(os.environ.get("RELIABILITY_EXAMPLES", "6"))
CLEAR = {
    grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.RESOURCE_EXHAUSTED,
}
OUTCOMES: dict[str, Counter] = {}  # per RPC: how each case was answered, printed at the end
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                           HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def stack(figures):
    service = build_service(GeneratorConfig(profile=Profile.BLIP, engine=EngineSettings(max_batch=8, max_queue=64)))
    s = StackInThread(service)
    yield s
    s.stop()
    service.close()
    for rpc, counts in OUTCOMES.items():
        print(f"\n{rpc}: {sum(counts.values())} cases: " + ", ".join(f"{k} {v}" for k, v in counts.most_common()))
    figures["bad_input"] = {rpc: dict(counts.most_common()) for rpc, counts in OUTCOMES.items()}


@pytest.fixture(scope="module")
def channel(stack):
    with grpc.insecure_channel(stack.generator_address) as gen, grpc.insecure_channel(stack.tagger_address) as tag:
        yield {"generator": gen, "tagger": tag}


# ---- strategies ----------------------------------------------------------------------

NAMES = ["", "happy", "sad", "calm", "warmth", "hostile", "mean", "angry", "dominant", "Happy", " happy", "happy ",
         "hаppy", "../hostile", "hostile.safetensors", "HOSTILE", "h\u200bostile", "playfulness", "x" * 300]
MODELS = ["", "smollm2-135m-instruct", "gemma3-270m", "nope", "../models", "SMOLLM2-135M-INSTRUCT"]
text = st.text(max_size=120)
huge = st.builds(lambda c, n: c * n, st.characters(codec="utf-8"), st.integers(8001, 60000))
floats = st.floats(allow_nan=True, allow_infinity=True, width=32)
u32 = st.integers(0, 2**32 - 1)
enum = st.integers(-(2**31), 2**31 - 1)  # proto3 enums are open: unknown values arrive as numbers


def _pick(draw, field: str, wild: set[str], good, bad):
    """The field's value: from its bad strategy when the case perturbs it, else a good one."""
    return draw(bad if field in wild else good)


def _wild(draw, fields: list[str]) -> set[str]:
    """Which fields this case perturbs: none, one (most cases) or all of them."""
    mode = draw(st.sampled_from(["none", "one", "one", "one", "all"]))
    if mode == "none":
        return set()
    return set(fields) if mode == "all" else {draw(st.sampled_from(fields))}


def _sampling(draw, wild: set[str]) -> pb.Sampling:
    s = pb.Sampling(temperature=_pick(draw, "temperature", wild, st.floats(0, 1.5, width=32), floats),
                    top_p=_pick(draw, "top_p", wild, st.floats(0.25, 1, width=32), floats))
    if draw(st.booleans()):
        s.seed = draw(st.integers(0, 2**64 - 1))
    return s


GENERATE_FIELDS = ["model", "input", "concept", "alpha", "temperature", "top_p", "max_tokens", "stop", "gate", "kl"]


@st.composite
def generate_requests(draw) -> pb.GenerateRequest:
    wild = _wild(draw, GENERATE_FIELDS)
    req = pb.GenerateRequest(model=_pick(draw, "model", wild, st.sampled_from(MODELS[:2]), st.sampled_from(MODELS) | text))
    if "input" in wild:
        which = draw(st.sampled_from(["prompt", "huge", "messages", "none"]))
    else:
        which = draw(st.sampled_from(["prompt", "good_messages"]))
    if which == "prompt":
        req.prompt = draw(text if "input" in wild else st.text(min_size=1, max_size=60).filter(str.strip))
    elif which == "huge":
        req.prompt = draw(huge)
    elif which == "good_messages":
        req.messages.messages.add(role="user", content=draw(st.text(min_size=1, max_size=60).filter(str.strip)))
    elif which == "messages":
        roles = st.sampled_from(["system", "user", "assistant", "", "robot", "USER"]) | text
        for _ in range(draw(st.integers(0, 70))):
            req.messages.messages.add(role=draw(roles), content=draw(st.text(max_size=30)))
        if draw(st.booleans()):
            req.messages.messages.add(role="user", content=draw(text))
    steering = draw(st.sampled_from(["concept", "tag", "none"]))
    if steering == "concept":
        req.concept = _pick(draw, "concept", wild, st.sampled_from(["happy", "sad", "warmth", "kind", "empathy"]),
                            st.sampled_from(NAMES) | text)
    elif steering == "tag":
        req.tag = _pick(draw, "concept", wild, st.integers(1, 7), enum)
    if draw(st.booleans()):
        req.alpha = _pick(draw, "alpha", wild, st.floats(-4, 4, width=32), floats)
    req.sampling.CopyFrom(_sampling(draw, wild))
    req.max_tokens = _pick(draw, "max_tokens", wild, st.integers(1, 8),  # 0 is the default 128: in the wild cases
                           st.sampled_from([513, 2**32 - 1]) | u32)
    req.stop.extend(_pick(draw, "stop", wild, st.lists(st.text(min_size=1, max_size=8), max_size=2),
                          st.lists(st.text(max_size=80), max_size=6)))
    req.gate.disabled = draw(st.booleans())
    req.gate.threshold = _pick(draw, "gate", wild, st.floats(0, 1, width=32), floats)
    req.kl.enabled = draw(st.booleans())
    good_kl = "kl" not in wild
    req.kl.window = draw(st.integers(0, 16) if good_kl else u32)
    req.kl.every = draw(st.integers(0, 4) if good_kl else u32)
    req.kl.threshold = draw(st.floats(0, 1, width=32) if good_kl else floats)
    req.kl.alpha_step = draw(st.floats(0, 4, width=32) if good_kl else floats)
    return req


@st.composite
def chat_turns(draw) -> list[pb.ChatTurn]:
    turns = []
    for _ in range(draw(st.integers(1, 2))):
        wild = _wild(draw, ["text", "model", "max_tokens", "temperature", "top_p", "gate", "kl"])
        t = pb.ChatTurn(
            text=_pick(draw, "text", wild, st.sampled_from(["I got a puppy!", "I'm scared of the dark."]),
                       st.sampled_from(["", " "]) | text | huge),
            model=_pick(draw, "model", wild, st.sampled_from(MODELS[:2]), st.sampled_from(MODELS) | text),
            max_tokens=_pick(draw, "max_tokens", wild, st.integers(1, 4), st.sampled_from([0, 513]) | u32),
        )
        t.sampling.CopyFrom(_sampling(draw, wild))
        t.gate.threshold = _pick(draw, "gate", wild, st.floats(0, 1, width=32), floats)
        t.kl.enabled = draw(st.booleans())
        t.kl.window = _pick(draw, "kl", wild, st.integers(0, 16), u32)
        turns.append(t)
    return turns


@st.composite
def tag_requests(draw) -> tagger_pb2.TagRequest:
    wild = _wild(draw, ["text", "context"])
    return tagger_pb2.TagRequest(
        text=_pick(draw, "text", wild, st.text(min_size=1, max_size=80).filter(str.strip), st.sampled_from(["", " "]) | text | huge),
        context=_pick(draw, "context", wild, st.lists(st.text(max_size=40), max_size=3),
                      st.lists(text, max_size=12) | st.lists(huge, min_size=1, max_size=2)),
    )


def _varint(n: int) -> bytes:
    out = b""
    while True:
        b, n = n & 0x7F, n >> 7
        out += struct.pack("B", b | (0x80 if n else 0))
        if not n:
            return out


@st.composite
def raw_bytes(draw) -> bytes:
    """Not valid protobuf, or a string field (field 1 or 2) holding invalid UTF-8 such as a lone surrogate."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=200))
    bad = draw(st.sampled_from([b"\xed\xa0\x80", b"\xff\xfe", b"\xc3\x28", b"ok\x80"]))
    field = draw(st.sampled_from([1, 2]))
    return _varint(field << 3 | 2) + _varint(len(bad)) + bad


# ---- calling --------------------------------------------------------------------------


def _record(rpc: str, outcome: str) -> None:
    OUTCOMES.setdefault(rpc, Counter())[outcome] += 1


def _check_error(rpc: str, err: grpc.RpcError) -> None:
    code = err.code()
    _record(rpc, code.name)
    assert code in CLEAR, f"{rpc} answered {code.name}: {err.details()}"
    assert err.details() and len(err.details()) > 10, f"{rpc}: {code.name} without a useful message"


def _finished(rpc: str, event) -> bool:
    if rpc == "Chat":
        return event.WhichOneof("event") == "reply" and event.reply.WhichOneof("event") == "finished"
    return event.WhichOneof("event") == "finished"


def _read_to_end(rpc: str, call) -> list:
    """Read the whole stream: it ends cleanly (Generate and Chat with a finished event last) or
    with a clear status; a failure after the first events counts the same as one before them."""
    events: list = []
    try:
        events = list(call)
    except grpc.RpcError as err:
        _check_error(rpc, err)
        return events
    if rpc in ("Generate", "Chat"):
        assert events and _finished(rpc, events[-1]), f"{rpc} ended without a finished event: {events[-3:]}"
    _record(rpc, "streamed")
    return events


def _unary(rpc: str, fn, request) -> None:
    try:
        fn(request, timeout=60)
        _record(rpc, "ok")
    except grpc.RpcError as err:
        _check_error(rpc, err)


def _serializer(request: object):
    """Raw bytes go on the wire as they are; messages are serialised."""
    return (lambda b: b) if isinstance(request, bytes) else type(request).SerializeToString


def _generate(channel, request) -> object:
    serialize = _serializer(request)
    method = channel.unary_stream("/steering.v1.Generator/Generate", request_serializer=serialize,
                                  response_deserializer=pb.GenerateEvent.FromString)
    return method(request, timeout=120)


@SETTINGS
@given(req=generate_requests() | raw_bytes())
def test_generate(channel, req) -> None:
    _read_to_end("Generate", _generate(channel["generator"], req))


@SETTINGS
@given(turns=chat_turns() | raw_bytes().map(lambda b: [b]))
def test_chat(channel, turns) -> None:
    serialize = _serializer(turns[0])
    method = channel["generator"].stream_stream("/steering.v1.Generator/Chat", request_serializer=serialize,
                                                response_deserializer=pb.ChatEvent.FromString)
    _read_to_end("Chat", method(iter(turns), timeout=120))


@SETTINGS
@given(req=st.just(pb.ListModelsRequest()) | raw_bytes())
def test_list_models(channel, req) -> None:
    serialize = _serializer(req)
    method = channel["generator"].unary_unary("/steering.v1.Generator/ListModels", request_serializer=serialize,
                                              response_deserializer=pb.ListModelsResponse.FromString)
    _unary("ListModels", method, req)


@SETTINGS
@given(req=tag_requests() | raw_bytes())
def test_tag(channel, req) -> None:
    serialize = _serializer(req)
    method = channel["tagger"].unary_unary("/steering.v1.Tagger/Tag", request_serializer=serialize,
                                           response_deserializer=tagger_pb2.TagResponse.FromString)
    _unary("Tag", method, req)


@SETTINGS
@given(reqs=st.lists(tag_requests() | raw_bytes(), min_size=1, max_size=3))
def test_tag_conversation(channel, reqs) -> None:
    def serialize(r):
        return _serializer(r)(r)

    method = channel["tagger"].stream_stream("/steering.v1.Tagger/TagConversation", request_serializer=serialize,
                                             response_deserializer=tagger_pb2.TagResponse.FromString)
    _read_to_end("TagConversation", method(iter(reqs), timeout=60))


# A child's steered stream: greedy, so its text alone is its text beside anything else.
VALID = pb.GenerateRequest(prompt="Tell me about your day.", concept=STEERED, max_tokens=24)


def _text(events: list) -> str:
    return "".join(e.text for e in events if e.WhichOneof("event") == "text")


@pytest.fixture(scope="module")
def valid_alone(channel) -> str:
    events = list(_generate(channel["generator"], VALID))
    assert events[-1].WhichOneof("event") == "finished" and _text(events)
    return _text(events)


BESIDE = Counter()


@SETTINGS
@given(req=generate_requests() | raw_bytes())
def test_generate_beside_a_valid_stream_leaves_it_unchanged(channel, valid_alone, figures, req) -> None:
    """The valid stream is running (its Started arrived) when the fuzzed request comes; whatever
    happens to the fuzzed one, the valid one finishes with the text it has alone."""
    running = iter(_generate(channel["generator"], VALID))
    first = next(running)
    _read_to_end("Generate beside a valid stream", _generate(channel["generator"], req))
    rest = list(running)
    assert rest and rest[-1].WhichOneof("event") == "finished", "the valid stream did not finish"
    assert _text([first, *rest]) == valid_alone
    BESIDE["valid streams unchanged"] += 1
    figures["beside"] = dict(BESIDE)


def test_cancelling_during_a_guard_hold_harms_nobody(stack, channel, valid_alone) -> None:
    """Blip holds text until its sentence ends; a client that hangs up while text is held leaves
    the valid stream beside it and the engine untouched."""
    held = 0
    for _ in range(5):
        running = iter(_generate(channel["generator"], VALID))
        next(running)
        call = _generate(channel["generator"], pb.GenerateRequest(prompt="Tell me a long story about a dragon.",
                                                                  concept=STEERED, max_tokens=64))
        seen = []
        for event in call:
            seen.append(event.WhichOneof("event"))
            if event.WhichOneof("event") == "gate":  # prefilled, deciding, no sentence finished yet
                break
        held += "text" not in seen
        call.cancel()
        assert _text([*running]) == valid_alone
    assert held == 5, "the cancel came after text was released, not during a hold"
    events = list(_generate(channel["generator"], pb.GenerateRequest(prompt="Say hello.", max_tokens=4)))
    assert events[-1].WhichOneof("event") == "finished"
    _assert_no_hooks(stack)


def _assert_no_hooks(stack) -> None:
    slot = next(iter(stack.generator.service.slots.values()))
    assert slot.engine.wait_warm(60)  # an idle engine warms Chat's next prompts, steering them
    assert all(not slot.loaded.layers[i]._forward_hooks for i in range(len(slot.loaded.layers)))


def test_servers_serve_normally_afterwards(stack, channel) -> None:
    for name, ch in channel.items():
        health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING, name
    events = list(_generate(channel["generator"], pb.GenerateRequest(prompt="Say hello.", concept=STEERED, max_tokens=4)))
    assert events[-1].WhichOneof("event") == "finished" and events[-1].finished.completion_tokens >= 1
    _assert_no_hooks(stack)
