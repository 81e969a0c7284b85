"""The monitors that watch a stream as it decodes and say what should happen next: the KL
monitor (has the steering faded?) and the content guard (may this sentence be sent?). Each
sees only what it is given (logits, text, token counts) and returns an action; the stream
applies it. Neither touches the model or the batch."""

from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor, Future
from dataclasses import dataclass

import torch

from steering.guard import ThemeGuard, Verdict, ends_sentence

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
    checked one after another on `checks`, off the engine thread. `poll` hands out what has
    been cleared, in order, or the first flagged sentence."""

    def __init__(self, guard: ThemeGuard, checks: Executor) -> None:
        self.guard, self.checks = guard, checks
        self.sent = ""  # text already cleared
        self.sent_tokens = 0  # the reply's tokens behind it
        self.held = ""  # text whose sentence has not ended
        self.waiting: deque[_Sentence] = deque()  # sentences waiting for their check, in order
        self.checking: Future[Verdict] | None = None  # the check of the first of them

    @property
    def idle(self) -> bool:
        """Nothing waits for a check."""
        return self.checking is None and not self.waiting

    def push(self, text: str, tokens: int, rng: Callable[[], torch.Tensor], final: bool = False) -> None:
        """More of the reply, `tokens` long now; `final`: the reply is complete. `rng` gives the
        sampler's state now, kept with a sentence for a restart should it be flagged."""
        self.held += text
        if self.held.strip() and (final or ends_sentence(self.held) or len(self.held) >= GUARD_MAX_HELD):
            self.waiting.append(_Sentence(self.held, tokens, rng()))
            self.held = ""

    def poll(self) -> tuple[list[str], Withhold | None]:
        """The sentences cleared since the last poll, then the flagged one if a check flagged
        one (after which nothing more is held: the reply goes on, if at all, from the text sent)."""
        cleared: list[str] = []
        while self.waiting:
            if self.checking is None:
                self.checking = self.checks.submit(self.guard.check_reply, self.sent, self.waiting[0].text)
            if not self.checking.done():
                break
            verdict, self.checking = self.checking.result(), None
            sentence = self.waiting.popleft()
            if verdict.flagged:
                self.held, self.waiting = "", deque()
                return cleared, Withhold(verdict.reason, verdict.themes, len(sentence.text), self.sent_tokens,
                                         self.sent, sentence.rng)
            cleared.append(sentence.text)
            self.sent, self.sent_tokens = self.sent + sentence.text, sentence.tokens
        return cleared, None
