"""The generator's client for the tagger service: short deadline, fails fast when it is down."""

import grpc

from protos.steering.v1 import tagger_pb2, tagger_pb2_grpc
from steering.errors import InvalidArgument, Unavailable

from .service import TagResult

# Emotion enum value -> the tag names the policy uses ("happy", "none", ...).
EMOTION_NAMES: dict[tagger_pb2.Emotion, str] = {
    value: name.removeprefix("EMOTION_").lower()
    for name, value in tagger_pb2.Emotion.items()
    if name != "EMOTION_UNSPECIFIED"
}


def tag_from_pb(resp: tagger_pb2.TagResponse) -> TagResult:
    """A tagger's answer as the policy's names. A label this generator does not know (a newer
    tagger) means the tagger cannot be used, as if it were down; unknown scores are dropped."""
    if resp.label not in EMOTION_NAMES:
        raise Unavailable(f"the tagger answered label value {resp.label}, which this generator does not know; "
                          "run matching tagger and generator versions")
    scores = {EMOTION_NAMES[s.label]: s.score for s in resp.scores if s.label in EMOTION_NAMES}
    return TagResult(EMOTION_NAMES[resp.label], resp.confidence, scores)


class TaggerClient:
    def __init__(self, address: str, timeout_s: float = 2.0, token: str | None = None,
                 credentials: grpc.ChannelCredentials | None = None) -> None:
        self._channel = grpc.aio.secure_channel(address, credentials) if credentials else grpc.aio.insecure_channel(address)
        self._stub = tagger_pb2_grpc.TaggerStub(self._channel)
        self._timeout = timeout_s
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None

    async def tag(self, text: str, context: list[str]) -> TagResult:
        try:
            resp = await self._stub.Tag(tagger_pb2.TagRequest(text=text, context=context), timeout=self._timeout,
                                        metadata=self._metadata)
        except grpc.aio.AioRpcError as exc:
            if exc.code() is grpc.StatusCode.INVALID_ARGUMENT:  # the turn itself is at fault: say so, not "unavailable"
                raise InvalidArgument(f"the tagger refused this turn: {exc.details()}") from None
            raise Unavailable(f"tagger: {exc.code().name}: {exc.details()}") from None
        return tag_from_pb(resp)

    async def close(self) -> None:
        await self._channel.close()
