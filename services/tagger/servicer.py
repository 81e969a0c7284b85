"""gRPC face of the tagger: protobuf in, domain call, protobuf out.

Bad input raises domain errors; the shared interceptor turns them into status codes. The
classifier is CPU-bound, so each call runs in a worker thread to keep the event loop free.
The child's words are never logged, at any level; DEBUG shows only the label.
"""

import asyncio
import logging
from collections import deque
from collections.abc import AsyncIterator, Sequence

import grpc

from protos.steering.v1 import tagger_pb2, tagger_pb2_grpc
from steering.errors import InvalidArgument, Unavailable

from .classifier import Prediction, TaggerModel

log = logging.getLogger(__name__)

SERVICE_NAME = tagger_pb2.DESCRIPTOR.services_by_name["Tagger"].full_name
MAX_TEXT_CHARS = 2000
MAX_CONTEXT_TURNS = 8  # the proto promises "at most 8 are used": older turns are dropped


def emotion(label: str) -> tagger_pb2.Emotion:
    """`"happy"` -> `EMOTION_HAPPY`."""
    return tagger_pb2.Emotion.Value(f"EMOTION_{label.upper()}")


def _checked_text(text: str, what: str) -> str:
    if not text.strip():
        raise InvalidArgument(f"{what} is empty: send the child's turn")
    if len(text) > MAX_TEXT_CHARS:
        raise InvalidArgument(f"{what} has {len(text)} characters; the limit is {MAX_TEXT_CHARS}: send one turn at a time")
    return text


def validated(request: tagger_pb2.TagRequest) -> tuple[str, tuple[str, ...]]:
    """`(text, context)` of a request: text checked, blank context turns dropped, the last 8 kept."""
    text = _checked_text(request.text, "text")
    context = [turn for turn in request.context if turn.strip()][-MAX_CONTEXT_TURNS:]
    for i, turn in enumerate(context):
        _checked_text(turn, f"context turn {i}")
    return text, tuple(context)


def to_response(prediction: Prediction, threshold: float) -> tagger_pb2.TagResponse:
    return tagger_pb2.TagResponse(
        label=emotion(prediction.label),
        confidence=prediction.confidence,
        scores=[tagger_pb2.LabelScore(label=emotion(k), score=v) for k, v in prediction.scores.items()],
        threshold=threshold,
    )


class TaggerServicer(tagger_pb2_grpc.TaggerServicer):
    """Answers UNAVAILABLE until `attach()` hands it a loaded model (health says NOT_SERVING then)."""

    def __init__(self, model: TaggerModel | None = None) -> None:
        self._model = model

    def attach(self, model: TaggerModel) -> None:
        self._model = model

    def _ready(self) -> TaggerModel:
        if self._model is None:
            raise Unavailable("the tagger is still loading its model; retry in a moment")
        return self._model

    async def _tag(self, model: TaggerModel, text: str, context: Sequence[str]) -> tagger_pb2.TagResponse:
        prediction = await asyncio.to_thread(model.predict, text, context)
        log.debug("tagged a turn: %s (%.2f)", prediction.label, prediction.confidence)
        return to_response(prediction, model.threshold)

    async def Tag(self, request: tagger_pb2.TagRequest, context: grpc.aio.ServicerContext) -> tagger_pb2.TagResponse:
        model = self._ready()
        text, turns = validated(request)
        return await self._tag(model, text, turns)

    async def TagConversation(
        self, request_iterator: AsyncIterator[tagger_pb2.TagRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[tagger_pb2.TagResponse]:
        """Each turn is tagged with the turns before it in this stream as context.

        A streamed request's own `context` (say, Blip's reply that the stream did not carry)
        goes into the transcript just before its turn. The transcript lives in this call only.
        """
        model = self._ready()
        transcript: deque[str] = deque(maxlen=MAX_CONTEXT_TURNS)
        async for request in request_iterator:
            text, extra = validated(request)
            transcript.extend(extra)
            yield await self._tag(model, text, tuple(transcript))
            transcript.append(text)


def add_to_server(servicer: TaggerServicer, server: grpc.aio.Server) -> None:
    tagger_pb2_grpc.add_TaggerServicer_to_server(servicer, server)
