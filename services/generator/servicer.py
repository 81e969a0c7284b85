"""gRPC face of the generator: protobuf <-> domain, nothing else."""

import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc

from protos.steering.v1 import generator_pb2 as pb
from protos.steering.v1 import generator_pb2_grpc
from protos.steering.v1 import tagger_pb2
from steering.config import SteerConfig
from steering.errors import InvalidArgument, SteeringError, Unavailable
from steering.profiles import served_alpha
from steering.record import ConceptState

from . import events as ev
from .job import GateConfig, KlConfig, Sampling
from .service import ChatConcept, ChatTag, GenerateSpec, GeneratorService, ModelSlot, TagResult, concept_config
from .tagger_client import EMOTION_NAMES as _EMOTION_NAMES, TaggerClient

log = logging.getLogger(__name__)

_STOP = {
    ev.StopReason.LENGTH: pb.STOP_REASON_LENGTH,
    ev.StopReason.STOP_SEQUENCE: pb.STOP_REASON_STOP_SEQUENCE,
    ev.StopReason.END_OF_TEXT: pb.STOP_REASON_END_OF_TEXT,
    ev.StopReason.CANCELLED: pb.STOP_REASON_CANCELLED,
    ev.StopReason.DEADLINE: pb.STOP_REASON_DEADLINE,
    ev.StopReason.GUARD: pb.STOP_REASON_GUARD,
}
_GATE = {
    "steer": pb.GATE_DECISION_STEER,
    "skip": pb.GATE_DECISION_SKIP,
    "disabled": pb.GATE_DECISION_DISABLED,
    "no_steering": pb.GATE_DECISION_NO_STEERING,
}
_EMOTION_VALUES = {name: value for value, name in _EMOTION_NAMES.items()}


def _sampling(msg: pb.Sampling) -> Sampling:
    return Sampling(msg.temperature, msg.top_p or 1.0, msg.seed if msg.HasField("seed") else None)


def _gate(msg: pb.GateSettings) -> GateConfig:
    return GateConfig(enabled=msg.enabled and not msg.disabled, threshold=msg.threshold or GateConfig().threshold)


def _kl(msg: pb.KlSettings) -> KlConfig:
    d = KlConfig()
    return KlConfig(msg.enabled, msg.window or d.window, msg.threshold or d.threshold, msg.alpha_step or d.alpha_step, msg.every or d.every)


def spec_from_request(req: pb.GenerateRequest) -> GenerateSpec:
    which = req.WhichOneof("input")
    tag = None
    if req.WhichOneof("steering") == "tag":
        if req.tag not in _EMOTION_NAMES:
            raise InvalidArgument(f"tag {req.tag} is not an Emotion value")
        tag = _EMOTION_NAMES[req.tag]
    return GenerateSpec(
        model=req.model,
        prompt=req.prompt if which == "prompt" else None,
        messages=tuple((m.role, m.content) for m in req.messages.messages) if which == "messages" else None,
        concept=req.concept if req.WhichOneof("steering") == "concept" else None,
        tag=tag,
        alpha=req.alpha if req.HasField("alpha") else None,
        sampling=_sampling(req.sampling),
        max_tokens=req.max_tokens,
        stop=tuple(req.stop),
        gate=_gate(req.gate),
        kl=_kl(req.kl),
    )


def _config(config: SteerConfig | None) -> pb.SteeringConfig | None:
    if config is None:
        return None
    return pb.SteeringConfig(layers=list(config.layers), scale=config.scale, positions=config.positions,
                             preserve_norm=config.preserve_norm, name=config.name)


def event_to_pb(event: ev.Event) -> pb.GenerateEvent:
    match event:
        case ev.Started():
            return pb.GenerateEvent(started=pb.Started(model=event.model, concept=event.concept, alpha=event.alpha,
                                                       layers=list(event.layers), prompt_tokens=event.prompt_tokens,
                                                       config=_config(event.config), mode=str(event.mode)))
        case ev.TextDelta():
            return pb.GenerateEvent(text=event.text)
        case ev.Gate():
            return pb.GenerateEvent(gate=pb.GateEvent(decision=_GATE[event.decision], token=event.token,
                                                      probability=event.probability, top3=list(event.top3)))
        case ev.KlSample():
            return pb.GenerateEvent(kl=pb.KlSample(token_index=event.token_index, kl=event.kl,
                                                   running_mean=event.running_mean, alpha=event.alpha))
        case ev.Reinjection():
            return pb.GenerateEvent(reinjection=pb.Reinjection(token_index=event.token_index, running_mean=event.running_mean,
                                                               alpha_before=event.alpha_before, alpha_after=event.alpha_after))
        case ev.Notice():
            return pb.GenerateEvent(notice=pb.Notice(message=event.message))
        case ev.Guarded():
            return pb.GenerateEvent(guard=pb.GuardEvent(reason=event.reason, themes=list(event.themes), action=event.action,
                                                        withheld_chars=event.withheld_chars))
        case ev.Finished():
            return pb.GenerateEvent(finished=pb.Finished(
                reason=_STOP[event.reason], prompt_tokens=event.prompt_tokens, completion_tokens=event.completion_tokens,
                seconds=event.seconds, time_to_first_token_ms=event.time_to_first_token_ms))
    raise TypeError(f"no protobuf form for {type(event).__name__}")


def tag_to_pb(tag: TagResult) -> tagger_pb2.TagResponse:
    scores = sorted(tag.scores.items(), key=lambda kv: -kv[1])
    return tagger_pb2.TagResponse(
        label=_EMOTION_VALUES.get(tag.label, tagger_pb2.EMOTION_NONE),
        confidence=tag.confidence,
        scores=[tagger_pb2.LabelScore(label=_EMOTION_VALUES[k], score=v) for k, v in scores if k in _EMOTION_VALUES],
    )


class GeneratorServicer(generator_pb2_grpc.GeneratorServicer):
    """Registered before the models load (so health can say NOT_SERVING meanwhile);
    `attach` hands it the service once everything is loaded."""

    def __init__(self) -> None:
        self._service: GeneratorService | None = None
        self.tagger: TaggerClient | None = None
        self.fail_fast = False

    def attach(self, service: GeneratorService, tagger: TaggerClient | None, fail_fast: bool) -> None:
        self._service, self.tagger, self.fail_fast = service, tagger, fail_fast

    @property
    def service(self) -> GeneratorService:
        if self._service is None:
            raise Unavailable("the generator is still loading its models; retry shortly")
        return self._service

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.GenerateEvent]:
        spec = spec_from_request(request)
        async for event in self.service.stream(spec, context.time_remaining()):
            yield event_to_pb(event)

    async def Chat(self, request_iterator: AsyncIterator[pb.ChatTurn], context: grpc.aio.ServicerContext) -> AsyncIterator[pb.ChatEvent]:
        async def turns():
            async for turn in request_iterator:
                yield turn.text, GenerateSpec(model=turn.model, sampling=_sampling(turn.sampling), max_tokens=turn.max_tokens,
                                              gate=_gate(turn.gate), kl=_kl(turn.kl))

        async def tag(text: str, context_turns: list[str]) -> TagResult:
            if self.tagger is None:
                raise Unavailable("no tagger configured")
            return await self.tagger.tag(text, context_turns)

        async for item in self.service.chat(turns(), tag, self.fail_fast):
            if isinstance(item, ChatTag):
                yield pb.ChatEvent(tag=tag_to_pb(item.tag))
            elif isinstance(item, ChatConcept):
                yield pb.ChatEvent(concept=item.concept)
            else:
                yield pb.ChatEvent(reply=event_to_pb(item))

    def _concept_info(self, state: ConceptState, slot: ModelSlot) -> pb.ConceptInfo:
        """A concept as this server's profile serves it, with the d measured where it is served."""
        alpha, ceiling = served_alpha(state, self.service.profile), self.service.ceiling(state)
        served = state.effect_at(alpha)  # None where this profile does not serve the concept
        at_ceiling = state.effect_at(ceiling)
        reason = state.reason if served or not state.servable else "no alpha inside this profile's bounds passes the effect-size gate"
        return pb.ConceptInfo(
            name=state.concept, status=state.status, servable=served is not None, reason=reason,
            recommended_alpha=served.alpha if served else 0.0, max_alpha=state.max_alpha or 0.0,
            child_safe_alpha=state.child_safe_alpha or 0.0, alpha_ceiling=ceiling,
            recommended_d=served.d if served else 0.0, recommended_d_low=served.low if served else 0.0,
            recommended_d_high=served.high if served else 0.0, replies=served.n if served else 0,
            ceiling_d=at_ceiling.d if at_ceiling else 0.0,
            config=_config(concept_config(slot, state)),
            **self._chat_info(state, slot),
        )

    def _chat_info(self, state: ConceptState, slot: ModelSlot) -> dict[str, Any]:
        try:
            chat = self.service.chat_serving(slot, state.concept)
        except SteeringError:
            return {}
        e = chat.effect
        return {"chat_mode": str(chat.mode), "chat_alpha": chat.alpha or 0.0, "chat_d": e.d, "chat_d_low": e.low,
                "chat_d_high": e.high, "chat_replies": e.n}

    async def ListModels(self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext) -> pb.ListModelsResponse:
        models = []
        for name, slot in sorted(self.service.slots.items()):
            st = slot.steerability
            concepts = []
            for concept, state in sorted(st.concepts.items()):
                concepts.append(self._concept_info(state, slot))
            for concept, reason in sorted(slot.refused.items()):
                concepts.append(pb.ConceptInfo(name=concept, status="refused", servable=False, reason=reason))
            models.append(pb.ModelInfo(name=name, fingerprint=slot.loaded.fingerprint, loaded=True, steerable=st.steerable,
                                       reason=st.reason, concepts=concepts, is_default=name == self.service.default))
        return pb.ListModelsResponse(models=models, profile=str(self.service.profile))
