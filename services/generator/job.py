"""What a request asks the engine for: the prompt, the steering, sampling, limits and the
monitors it wants, and where its events go. Plain data, shared by the service and the engine."""

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from steering.config import SteerConfig
from steering.gate import DEFAULT_THRESHOLD
from steering.guard import ThemeGuard
from steering.hooks import RowSteering
from steering.vocabulary import Mode

from .events import Event

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None


@dataclass(frozen=True)
class GateConfig:
    enabled: bool = False  # never skipped a child's turn when measured; costs a second prefill row
    threshold: float = DEFAULT_THRESHOLD


@dataclass(frozen=True)
class KlConfig:
    enabled: bool = False
    window: int = 8  # tokens in the running mean, and the length of a re-injection
    threshold: float = 0.05  # running mean below this: the steering has faded
    alpha_step: float = 2.0
    every: int = 1  # emit a KL sample every N tokens


@dataclass(frozen=True)
class Steering:
    concept: str
    # steering layer -> the addition per unit of alpha [hidden]: the unit vector, times the
    # layer's share of alpha in the concept's validated configuration (1 when alpha is uniform)
    directions: dict[int, torch.Tensor]
    alpha: float  # its sign is the direction; the service only sends a direction the record validated
    max_alpha: float  # the largest |alpha| served in that direction (re-injection stays at or under it)
    word_ids: frozenset[int]  # the gate's concept tokens
    config: SteerConfig | None = None  # the validated configuration (positions, norm); None: plain addition everywhere


@dataclass
class Job:
    prompt_ids: list[int]
    emit: Callable[[Event], None]
    steering: Steering | None = None
    sampling: Sampling = Sampling()
    max_tokens: int = 128
    stop: tuple[str, ...] = ()
    gate: GateConfig = GateConfig()
    kl: KlConfig = KlConfig()
    min_tokens: int = 0  # end-of-text is suppressed until this many tokens (benchmarks use it)
    guard: ThemeGuard | None = None  # checks the reply at sentence boundaries before text is sent
    cancelled: threading.Event = field(default_factory=threading.Event)
    deadline: float | None = None  # time.monotonic() by which to stop
    submitted: float = field(default_factory=time.perf_counter)
    # How the reply reaches its concept's register; in prompt mode the instruction is already in
    # the prompt and `instructed` names the concept (Started reports both).
    mode: Mode = Mode.NONE
    instructed: str = ""


def row_steering(st: Steering, alpha: float) -> RowSteering:
    """A row's additions for `st` at `alpha`, applied as its validated configuration says."""
    additions = {layer: alpha * d for layer, d in st.directions.items()}
    if st.config is None:  # a plain addition at every position
        return RowSteering(additions)
    return RowSteering(additions, st.config.positions == "all", st.config.preserve_norm)


@dataclass
class Warming:
    """A prompt's beginning for the engine to prefill into its prefix cache while it has nothing
    else to do: how a Chat's next prompt will begin under one concept its policy may pick."""

    prompt_ids: list[int]
    steering: RowSteering | None
    cancelled: threading.Event  # set when the turn it was for has arrived (or the Chat ended)


def tell(job: Job, event: Event) -> None:
    """Send a job's caller its last word; a caller already gone has nothing more to hear."""
    try:
        job.emit(event)
    except Exception:
        log.debug("could not reach the caller of a job", exc_info=True)
