"""What a generation stream carries, as plain data; the servicer turns these into protobuf."""

from dataclasses import dataclass
from enum import StrEnum

from steering.config import SteerConfig
from steering.vocabulary import Mode


class StopReason(StrEnum):
    """Why a stream ended (its value is the metrics' label)."""

    LENGTH = "length"
    STOP_SEQUENCE = "stop_sequence"
    END_OF_TEXT = "end_of_text"
    CANCELLED = "cancelled"
    DEADLINE = "deadline"
    GUARD = "guard"  # the content guard cut an unsteered reply
    FAILED = "failed"  # this stream alone went wrong; its caller gets the error, not a Finished


@dataclass(frozen=True)
class Started:
    model: str
    concept: str  # "" when the reply is neither steered nor instructed
    alpha: float
    layers: tuple[int, ...]
    prompt_tokens: int
    config: SteerConfig | None = None  # how the concept is steered (None when unsteered)
    mode: Mode = Mode.NONE  # how the reply reaches the concept's register (prompt mode: concept set, alpha 0)


@dataclass(frozen=True)
class TextDelta:
    text: str


@dataclass(frozen=True)
class Gate:
    decision: str  # steer, skip, disabled, no_steering
    token: str = ""
    probability: float = 0.0
    top3: tuple[str, ...] = ()


@dataclass(frozen=True)
class KlSample:
    token_index: int
    kl: float
    running_mean: float
    alpha: float


@dataclass(frozen=True)
class Reinjection:
    token_index: int
    running_mean: float
    alpha_before: float
    alpha_after: float


@dataclass(frozen=True)
class Notice:
    message: str


@dataclass(frozen=True)
class Guarded:
    """The content guard withheld text: the reply goes on unsteered, or it is cut."""

    reason: str  # themes, repetition
    themes: tuple[str, ...]
    action: str  # regenerated_unsteered, cut
    withheld_chars: int


@dataclass(frozen=True)
class Finished:
    reason: StopReason
    prompt_tokens: int
    completion_tokens: int
    seconds: float
    time_to_first_token_ms: float


@dataclass(frozen=True)
class Failed:
    """The job raised; the servicer re-raises it so the interceptor picks the status."""

    error: Exception


Event = Started | TextDelta | Gate | KlSample | Reinjection | Notice | Guarded | Finished | Failed
