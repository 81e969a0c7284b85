"""The monitors that watch a stream as it decodes and say what should happen next: the KL
monitor (has the steering faded?) and the content guard (may this sentence be sent?). Each
sees only what it is given (logits, text, token counts) and returns an action; the stream
applies it. Neither touches the model or the batch."""

import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor, Future
from dataclasses import dataclass

import torch

from steering.guard import ThemeGuard, ends_sentence

from .events import Event, KlSample, Reinjection
from .job import KlConfig

# With the guard on, text waits for the end of its sentence; a run-on is checked and sent at this length.
GUARD_MAX_HELD = 240


def kl_divergence(steered: torch.Tensor, unsteered: torch.Tensor) -> float:
    """KL(steered || unsteered) of two next-token logit vectors."""
    ls, lu = steered.float().log_softmax(-1), unsteered.float().log_softmax(-1)
    return float((ls.exp() * (ls - lu)).sum())


@dataclass(frozen=True)
class SetAlpha:
    """Steer at this alpha from the next token on."""

    alpha: float
    reinjection: bool  # True: raised because the steering faded; False: back to the base alpha


@dataclass(frozen=True)
class Withhold:
    """The guard flagged a sentence: drop it and what came after, and go on (unsteered) from
    `from_token` generated tokens, the end of the text already sent, with the sampler's state
    as it was when the flagged sentence ended."""

    reason: str
    themes: tuple[str, ...]
    chars: int  # the flagged sentence's length
    from_token: int
    sent: str  # the text already sent
    rng: torch.Tensor


class KlMonitor:
    """KL(steered || unsteered) at every generated position, a running mean over `window`
    positions, and a re-injection when the mean falls under the threshold: alpha moves away
    from zero by `alpha_step` (never past `max_alpha`) for `window` positions, then back."""

    def __init__(self, config: KlConfig, base_alpha: float, max_alpha: float, emit: Callable[[Event], None]) -> None:
        self.config, self.base_alpha, self.max_alpha, self.emit = config, base_alpha, max_alpha, emit
        self.alpha = base_alpha
        self.window: deque[float] = deque(maxlen=max(1, config.window))
        self.reinject_until = -1

    def observe(self, index: int, steered: torch.Tensor, unsteered: torch.Tensor, alpha: float) -> SetAlpha | None:
        """Position `index` was generated at `alpha`, with these next-token logits steered and not."""
        kl = kl_divergence(steered, unsteered)
        self.window.append(kl)
        mean = sum(self.window) / len(self.window)
        if index % max(1, self.config.every) == 0:
            self.emit(KlSample(index, kl, mean, alpha))
        action = None
        if index >= self.reinject_until and self.alpha != self.base_alpha:  # the re-injection window is over
            self.alpha = self.base_alpha
            action = SetAlpha(self.alpha, reinjection=False)
        faded = len(self.window) == self.window.maxlen and mean < self.config.threshold
        if faded and index >= self.reinject_until and abs(self.alpha) < self.max_alpha:
            # Away from zero in the direction in force, never past that direction's ceiling.
            sign = -1.0 if self.base_alpha < 0 else 1.0
            before, self.alpha = self.alpha, sign * min(abs(self.alpha) + self.config.alpha_step, self.max_alpha)
            self.reinject_until = index + self.config.window
            self.window.clear()
            self.emit(Reinjection(index, mean, before, self.alpha))
            action = SetAlpha(self.alpha, reinjection=True)
        return action


@dataclass
class _Sentence:
    """Text waiting for the guard's check."""

    text: str
    tokens: int  # the reply's length in tokens at its end
    rng: torch.Tensor  # the sampler's state then


class GuardMonitor:
    """Holds a reply's text until its sentence ends (or the reply does), and has the sentences
    checked one after another on `checks`, off the engine thread. A clean sentence is handed to
    `release` as soon as its check ends, from the checks' thread, rather than at the engine's
    next step: a child hears it a decoding step sooner. `poll` (on the engine thread) hands out
    the first flagged sentence, after which nothing more is released."""

    def __init__(self, guard: ThemeGuard, checks: Executor, release: Callable[[str], None]) -> None:
        self.guard, self.checks, self.release = guard, checks, release
        self._lock = threading.Lock()  # what the engine's thread and the checks' thread share, below
        self.sent = ""  # text already cleared
        self.sent_tokens = 0  # the reply's tokens behind it
        self.waiting: deque[_Sentence] = deque()  # sentences waiting for their check, in order
        self.checking: Future[None] | None = None  # the checks of the waiting sentences, while they run
        self._flagged: Withhold | None = None  # a flagged sentence the engine has not polled yet
        self._failed: Exception | None = None  # a check that raised, for the engine to fail the stream with
        self._closed = False
        self.held = ""  # text whose sentence has not ended (the engine's thread alone)

    @property
    def idle(self) -> bool:
        """Nothing waits for a check."""
        with self._lock:
            return self.checking is None and not self.waiting

    def push(self, text: str, tokens: int, rng: Callable[[], torch.Tensor], final: bool = False) -> None:
        """More of the reply, `tokens` long now; `final`: the reply is complete. `rng` gives the
        sampler's state now, kept with a sentence for a restart should it be flagged."""
        self.held += text
        if not (self.held.strip() and (final or ends_sentence(self.held) or len(self.held) >= GUARD_MAX_HELD)):
            return
        with self._lock:
            self.waiting.append(_Sentence(self.held, tokens, rng()))
            if self.checking is None and self._flagged is None and self._failed is None and not self._closed:
                self.checking = self.checks.submit(self._check_waiting)
        self.held = ""

    def _check_waiting(self) -> None:
        """On the checks' thread: check the waiting sentences in order, releasing each clean one
        at once, until none waits or one is flagged."""
        while True:
            with self._lock:
                if self._closed or not self.waiting:
                    self.checking = None
                    return
                sentence, sent = self.waiting[0], self.sent
            try:
                verdict = self.guard.check_reply(sent, sentence.text)
            except Exception as exc:  # the stream fails alone, on the engine's thread (poll)
                with self._lock:
                    self._failed, self.checking = exc, None
                return
            with self._lock:
                if self._closed:
                    self.checking = None
                    return
                self.waiting.popleft()
                if verdict.flagged:
                    self.waiting.clear()
                    self._flagged = Withhold(verdict.reason, verdict.themes, len(sentence.text), self.sent_tokens,
                                             self.sent, sentence.rng)
                    self.checking = None
                    return
                self.sent, self.sent_tokens = sent + sentence.text, sentence.tokens
                self.release(sentence.text)  # under the lock: in order, and never after close()

    def poll(self) -> Withhold | None:
        """The flagged sentence, if a check flagged one (after which nothing more is held: the
        reply goes on, if at all, from the text sent). A check that failed raises here."""
        with self._lock:
            flagged, self._flagged = self._flagged, None
            failed, self._failed = self._failed, None
            if flagged is not None:  # and what was pushed after it before this poll
                self.waiting.clear()
        if failed is not None:
            raise failed
        if flagged is not None:
            self.held = ""
        return flagged

    def close(self) -> None:
        """The reply has ended: release nothing more."""
        with self._lock:
            self._closed = True
            self.waiting.clear()
