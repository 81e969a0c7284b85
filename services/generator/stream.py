"""One request in the running batch: its tokens, text, sampler, KL shadow and monitors.

Everything a request needs lives in its `Stream`; nothing per request is kept on the engine.
The stream decides what each step means for its request (the token, the text it completes,
the monitors' actions); the engine runs the model calls and applies the stream's results to
the batch.
"""

import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import NamedTuple

import torch

from steering.batch import Rows
from steering.gate import decide
from steering.generate import sample
from steering.hooks import RowSteering
from steering.loading import LoadedModel
from steering.vocabulary import Mode

from .events import Failed, Finished, Gate, Guarded, Started, StopReason, TextDelta
from .job import Job, row_steering, tell
from .monitors import GuardMonitor, KlMonitor, Withhold

class TextStream:
    """Turns growing token lists into text deltas: holds back half-decoded characters and
    anything that could still become a stop sequence."""

    def __init__(self, tokenizer, stop: tuple[str, ...]) -> None:
        self._tok = tokenizer
        self._stop = tuple(s for s in stop if s)
        self.emitted = ""

    def _decoded(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    def push(self, ids: list[int]) -> tuple[str, bool]:
        """(new text safe to send, whether a stop sequence was reached)."""
        text = self._decoded(ids)
        for s in self._stop:
            cut = text.find(s)
            if cut != -1:
                return self._take(text[:cut]), True
        end = len(text)
        if text.endswith("\ufffd"):
            end = len(text.rstrip("\ufffd"))
        for s in self._stop:  # hold back a tail that may start a stop sequence
            for k in range(min(len(s) - 1, end), 0, -1):
                if text[:end].endswith(s[:k]):
                    end = min(end, len(text[:end]) - k)
                    break
        return self._take(text[:end]), False

    def flush(self, ids: list[int]) -> str:
        return self._take(self._decoded(ids).rstrip("\ufffd"))

    def _take(self, text: str) -> str:
        if not text.startswith(self.emitted):  # the tokenizer re-spelt the tail; send nothing odd
            return ""
        delta = text[len(self.emitted) :]
        self.emitted = text
        return delta


# The KL shadow catches up on the steered row's tokens this many at a time: one forward of a
# few tokens costs about what one forward of one token costs on a CPU, so monitoring costs a
# fraction of a second row; the price is that a re-injection reacts up to this many tokens late.
SHADOW_CHUNK = 4


class StepResult(NamedTuple):
    token: int | None  # None: the stream has ended, or leaves the batch to restart
    alpha_changed: bool = False
    reinjections: int = 0
    first_text: bool = False
    guard_action: str = ""  # regenerated_unsteered (the stream restarts) or cut


@dataclass
class _Pending:
    """A generated position whose KL against the unsteered shadow is not computed yet."""

    index: int
    logits: torch.Tensor  # the steered row's next-token logits at this position
    alpha: float
    token: int | None = None  # None for a final end-of-text, which the shadow never needs


class Stream:
    """One request in the running batch (one row): its text, sampler and KL shadow."""

    def __init__(self, loaded: LoadedModel, job: Job, eos: set[int], checks: Executor,
                 shadow_forward: Callable[[Rows, torch.Tensor], torch.Tensor]) -> None:
        """`checks` runs the guard's checks; `shadow_forward` is the engine's model call that
        feeds the KL shadow tokens ([1, k]) and returns its logits at each."""
        self.loaded, self.job, self.eos, self.shadow_forward = loaded, job, eos, shadow_forward
        st = job.steering
        self.alpha = st.alpha if st else 0.0
        self.main_steered = False
        self.gate = ""  # the gate's decision, once prefilled
        self.shadow: Rows | None = None  # the unsteered row, in a batch of its own, when KL is on
        self.shadow_next: torch.Tensor | None = None  # its logits for the first pending position
        self.pending: list[_Pending] = []
        self.text = TextStream(loaded.tokenizer, job.stop)
        self.generated: list[int] = []
        self.kl = KlMonitor(job.kl, st.alpha, st.max_alpha, job.emit) if st and job.kl.enabled else None
        self.guard = GuardMonitor(job.guard, checks, self._emit_text) if job.guard else None
        self.first_token_ms = 0.0  # set when the reply's first text goes out (by the guard's thread, with a guard)
        self._first_told = False  # whether a step has reported it yet
        self.reason: StopReason | None = None  # set when the stream has ended
        self.ending: StopReason | None = None  # why the reply ended, while its last text waits for the guard
        self.restarting = False  # set when a guarded reply goes on unsteered from what was sent
        self.generator = torch.Generator(device=loaded.device)
        seed = job.sampling.seed if job.sampling.seed is not None else time.time_ns() % (2**63)
        self.generator.manual_seed(seed)
        self.started = time.perf_counter()

    @property
    def decoding(self) -> bool:
        """Still a row of the batch: not ended, not restarting, not waiting for the guard's last checks."""
        return self.reason is None and not self.restarting and self.ending is None

    def additions(self, steered: bool) -> RowSteering | None:
        st = self.job.steering
        return row_steering(st, self.alpha) if steered and st is not None else None

    @property
    def prompt_ids(self) -> list[int]:
        """What to prefill: the prompt, and after a guard restart also the reply sent so far."""
        return self.job.prompt_ids + self.generated if self.restarting else self.job.prompt_ids

    def prefill_rows(self) -> list[RowSteering | None]:
        """The rows to prefill: the unsteered one when the gate or KL needs it, then the steered one."""
        job, st = self.job, self.job.steering
        if self.restarting:
            return [None]
        job.emit(Started(self.loaded.name, st.concept if st else job.instructed, self.alpha,
                         tuple(sorted(st.directions)) if st else (), len(job.prompt_ids), st.config if st else None,
                         job.mode or (Mode.STEER if st else Mode.NONE)))
        if st is None:
            return [None]
        if not job.gate.enabled and not job.kl.enabled:
            return [self.additions(True)]
        return [None, self.additions(True)]

    def choose_rows(self, logits: torch.Tensor) -> tuple[int, int | None]:
        """After prefill: (the prefilled row that decodes, the unsteered row to keep as the KL
        shadow or None), as indices into prefill_rows."""
        job, st = self.job, self.job.steering
        if self.restarting:
            self.restarting = False
            return 0, None
        if st is None:
            decision, steered = Gate("no_steering"), False
        elif not job.gate.enabled:
            decision, steered = Gate("disabled"), True
        else:
            g = decide(logits[0], st.word_ids, self.loaded.tokenizer, job.gate.threshold)
            decision, steered = Gate("skip" if g.skip else "steer", g.token, g.probability, g.top3), not g.skip
        self.main_steered = steered
        self.gate = decision.decision
        job.emit(decision)
        if len(logits) == 1 or not steered:
            return 0, None
        return 1, (0 if job.kl.enabled else None)

    def _catch_up(self) -> int:
        """Feed the shadow the pending tokens in one forward and take the KL at each pending
        position. Returns the number of re-injections."""
        shadow, shadow_next = self.shadow, self.shadow_next
        if shadow is None or shadow_next is None:  # positions are pending only while a shadow runs
            raise RuntimeError("KL positions are pending without a shadow row")
        tokens = [p.token for p in self.pending if p.token is not None]
        shadow_logits = [shadow_next]
        if tokens:
            chunk = torch.tensor([tokens], device=self.loaded.device)
            fed = self.shadow_forward(shadow, chunk)
            shadow_logits += list(fed)
            self.shadow_next = fed[-1]
        if self.kl is None:
            raise RuntimeError("a KL shadow runs without its monitor")
        reinjections = 0
        for p, unsteered in zip(self.pending, shadow_logits):
            action = self.kl.observe(p.index, p.logits, unsteered, p.alpha)
            if action is not None:
                self.alpha = action.alpha
                reinjections += action.reinjection
        self.pending.clear()
        return reinjections

    def advance(self, main: torch.Tensor) -> StepResult:
        """Take this step's token from the row's logits and send what text it completes."""
        job = self.job
        if job.cancelled.is_set():
            return self.end(StopReason.CANCELLED)
        if job.deadline is not None and time.monotonic() >= job.deadline:
            return self.end(StopReason.DEADLINE)
        alpha = self.alpha
        if self.shadow is not None:
            self.pending.append(_Pending(len(self.generated), main, alpha))
        if len(self.generated) < job.min_tokens and self.eos:
            main = main.clone()
            main[list(self.eos)] = -torch.inf
        token = int(sample(main[None], job.sampling.temperature, job.sampling.top_p, self.generator)[0])
        if token in self.eos:
            return self.finish(StopReason.END_OF_TEXT)
        self.generated.append(token)
        if self.pending:
            self.pending[-1].token = token
        delta, stopped = self.text.push(self.generated)
        if stopped:
            return self.finish(StopReason.STOP_SEQUENCE, delta=delta)
        flagged = self._send(delta)
        if flagged is not None:
            return self._withhold(flagged)
        if len(self.generated) >= job.max_tokens:
            return self.finish(StopReason.LENGTH)
        reinjections = self._catch_up() if len(self.pending) >= SHADOW_CHUNK else 0
        return StepResult(token, self.alpha != alpha, reinjections, self._first_text())

    def _emit_text(self, text: str) -> None:
        """Send text to the client (on the guard's thread when the guard released it)."""
        if not self.first_token_ms:
            self.first_token_ms = (time.perf_counter() - self.job.submitted) * 1000
        self.job.emit(TextDelta(text))

    def _first_text(self) -> bool:
        """True once, at the first step after the reply's first text went out (for the metrics)."""
        first = bool(self.first_token_ms) and not self._first_told
        self._first_told = self._first_told or first
        return first

    def _send(self, delta: str, final: bool = False) -> Withhold | None:
        """Without a guard, send the text now. With one, hand it to the guard, which sends each
        sentence once it is cleared; returns a sentence it flagged."""
        if self.guard is None:
            if delta:
                self._emit_text(delta)
            return None
        self.guard.push(delta, len(self.generated), self.generator.get_state, final)
        return self.guard.poll()

    def _withhold(self, flagged: Withhold) -> StepResult:
        """Drop the flagged sentence and what was decoded after it while it was being checked. A
        steered reply goes on without steering from what was already sent (the stream re-joins
        the batch with that as its prompt), sampling as it would have after an instant check;
        any other reply ends."""
        self.ending = None
        self.generator.set_state(flagged.rng)
        if self.main_steered:
            self.job.emit(Guarded(flagged.reason, flagged.themes, "regenerated_unsteered", flagged.chars))
            self.main_steered, self.alpha, self.restarting = False, 0.0, True
            self.shadow, self.pending = None, []
            self.generated = self.generated[: flagged.from_token]
            self.text.emitted = flagged.sent
            return StepResult(None, first_text=self._first_text(), guard_action="regenerated_unsteered")
        self.job.emit(Guarded(flagged.reason, flagged.themes, "cut", flagged.chars))
        result = self.end(StopReason.GUARD)
        return result._replace(guard_action="cut")

    def finish(self, reason: StopReason, delta: str = "") -> StepResult:
        """The reply is complete (end-of-text, length, a stop sequence). With a guard its last
        text is checked before the stream ends; until then the stream waits out of the batch
        (`drain`)."""
        if self.guard is None:
            if delta:
                self._emit_text(delta)
            return self.end(reason)
        self.ending = reason
        tail = delta if reason is StopReason.STOP_SEQUENCE else self.text.flush(self.generated)
        flagged = self._send(tail, final=True)
        return self._withhold(flagged) if flagged is not None else self.drain()

    def drain(self) -> StepResult:
        """A complete reply waiting for the guard's last checks: ends when they are clean."""
        if self.job.cancelled.is_set():
            return self.end(StopReason.CANCELLED)
        if self.job.deadline is not None and time.monotonic() >= self.job.deadline:
            return self.end(StopReason.DEADLINE)
        flagged = self.guard.poll() if self.guard else None
        if flagged is not None:
            return self._withhold(flagged)
        if self.ending is None:
            raise RuntimeError("drain() is for a complete reply waiting for the guard")
        if self.guard is None or self.guard.idle:
            return self.end(self.ending)
        return StepResult(None, first_text=self._first_text())

    def fail(self, exc: Exception) -> None:
        """This row alone went wrong: its caller gets the error, the batch goes on without it."""
        self.reason, self.shadow, self.pending = StopReason.FAILED, None, []
        self.restarting = False
        if self.guard is not None:
            self.guard.close()
        tell(self.job, Failed(exc))

    def end(self, reason: StopReason) -> StepResult:
        self.reason = reason
        if self.guard is not None:  # nothing reaches the caller after Finished
            self.guard.close()
        reinjections = self._catch_up() if self.pending and reason is not StopReason.CANCELLED else 0  # the last KL samples
        self.shadow = None
        if reason not in (StopReason.STOP_SEQUENCE, StopReason.GUARD, StopReason.CANCELLED) and self.guard is None:
            tail = self.text.flush(self.generated)
            if tail:
                self.job.emit(TextDelta(tail))
        self.job.emit(Finished(reason, len(self.job.prompt_ids), len(self.generated),
                               time.perf_counter() - self.started, self.first_token_ms))
        return StepResult(None, reinjections=reinjections, first_text=self._first_text())
