"""Streaming steered generation with continuous batching.

One worker thread owns the model and one running batch. Between two decoding steps it
admits waiting requests (their prompts prefilled and their KV caches merged into the
batch) and drops the rows of requests that finished or were cancelled. Every row carries
its own steering additions, so requests with different concepts and alphas, or none,
decode together without seeing each other's vectors.

A steered request's prompt is prefilled as two rows: unsteered and steered. The unsteered
row's next-token distribution feeds the top-3 skip gate; then the request decodes with one
of them (unsteered when the gate skips). With KL monitoring on, the unsteered row is split
off as the stream's shadow: it is fed the steered row's tokens a few at a time, so
KL(steered || unsteered) compares the two distributions over the same text at every
position while costing a fraction of a second decoding row.

Everything a request needs lives in its `_Stream`; nothing per request is kept on the engine.
"""

import logging
import queue
import threading
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Executor, Future, ThreadPoolExecutor, wait
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from steering.errors import ResourceExhausted, SteeringError, Unavailable
from steering.gate import DEFAULT_THRESHOLD, decide
from steering.generate import eos_ids, sample
from steering.guard import ThemeGuard, Verdict, ends_sentence
from steering.config import SteerConfig
from steering.hooks import RowSteering, row_switches, stack_rows
from steering.loading import LoadedModel

from .batch import Rows, caches_prefixes, decode, merge, prefill, row_past, select, split_off
from .events import Event, Failed, Finished, Gate, Guarded, KlSample, Reinjection, Started, StopReason, TextDelta
from .metrics import GeneratorMetrics
from .prefix import Past, PrefixCache, SteeringKey, past_length, steering_key

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None


@dataclass(frozen=True)
class GateConfig:
    enabled: bool = True
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


def _tell(job: Job, event: Event) -> None:
    """Send a job's caller its last word; a caller already gone has nothing more to hear."""
    try:
        job.emit(event)
    except Exception:
        log.debug("could not reach the caller of a job", exc_info=True)


def kl_divergence(steered: torch.Tensor, unsteered: torch.Tensor) -> float:
    """KL(steered || unsteered) of two next-token logit vectors."""
    ls, lu = steered.float().log_softmax(-1), unsteered.float().log_softmax(-1)
    return float((ls.exp() * (ls - lu)).sum())


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


@dataclass(frozen=True)
class EngineSettings:
    max_batch: int = 8  # streams decoded together
    max_queue: int = 16  # requests waiting to join beyond that
    prefix_cache_mb: int = 64  # keys and values of recent prompts, reused by prompts that begin alike; 0: off
    # While other streams decode, a joiner's prompt is prefilled this many tokens per step; 0: at once.
    prefill_chunk: int = 32


# The KL shadow catches up on the steered row's tokens this many at a time: one forward of a
# few tokens costs about what one forward of one token costs on a CPU, so monitoring costs a
# fraction of a second row; the price is that a re-injection reacts up to this many tokens late.
SHADOW_CHUNK = 4
# With the guard on, text waits for the end of its sentence; a run-on is checked and sent at this length.
GUARD_MAX_HELD = 240


@dataclass
class _Held:
    """A sentence waiting for the guard's check."""

    text: str
    tokens: int  # the reply's length in tokens up to its end
    rng: torch.Tensor  # the sampler's state then


@dataclass
class _Admission:
    """Streams joining the batch: their prefill rows (one or two each), and for every row the
    keys and values of its prompt computed so far (from the prefix cache, then chunk by chunk)."""

    streams: list["_Stream"] = field(default_factory=list)
    starts: list[int] = field(default_factory=list)  # each stream's first row
    prompts: list[list[int]] = field(default_factory=list)
    additions: list[RowSteering | None] = field(default_factory=list)
    keys: list[SteeringKey] = field(default_factory=list)
    pasts: list[Past | None] = field(default_factory=list)
    reused: int = 0  # prompt tokens the prefix cache gave


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


class _Stream:
    """One request in the running batch (one row): its text, sampler and KL shadow."""

    def __init__(self, loaded: LoadedModel, job: Job, eos: set[int], checks: Executor) -> None:
        self.loaded, self.job, self.eos, self.checks = loaded, job, eos, checks
        st = job.steering
        self.base_alpha = self.alpha = st.alpha if st else 0.0
        self.main_steered = False
        self.gate = ""  # the gate's decision, once prefilled
        self.shadow: Rows | None = None  # the unsteered row, in a batch of its own, when KL is on
        self.shadow_next: torch.Tensor | None = None  # its logits for the first pending position
        self.pending: list[_Pending] = []
        self.text = TextStream(loaded.tokenizer, job.stop)
        self.generated: list[int] = []
        self.window: deque[float] = deque(maxlen=max(1, job.kl.window))
        self.reinject_until = -1
        self.first_token_ms = 0.0
        self.reason: StopReason | None = None  # set when the stream has ended
        # The guard: text already sent and the tokens behind it; text waiting for its sentence to
        # end; whole sentences waiting for their check, in order; the check of the first of them.
        self.sent = ""
        self.sent_tokens = 0
        self.held = ""
        self.waiting: deque[_Held] = deque()
        self.checking: Future[Verdict] | None = None
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
        if not steered or st is None:
            return None
        additions = {layer: self.alpha * d for layer, d in st.directions.items()}
        if st.config is None:  # a plain addition at every position
            return RowSteering(additions)
        return RowSteering(additions, st.config.positions == "all", st.config.preserve_norm)

    @property
    def prompt_ids(self) -> list[int]:
        """What to prefill: the prompt, and after a guard restart also the reply sent so far."""
        return self.job.prompt_ids + self.generated if self.restarting else self.job.prompt_ids

    def prefill_rows(self) -> list[RowSteering | None]:
        """The rows to prefill: the unsteered one when the gate or KL needs it, then the steered one."""
        job, st = self.job, self.job.steering
        if self.restarting:
            return [None]
        job.emit(Started(self.loaded.name, st.concept if st else "", self.alpha,
                         tuple(sorted(st.directions)) if st else (), len(job.prompt_ids), st.config if st else None))
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

    def _monitor(self, index: int, main: torch.Tensor, shadow: torch.Tensor, alpha: float) -> bool:
        """KL at one position; re-injects at a higher alpha when the steering has faded."""
        kl_cfg, st = self.job.kl, self.job.steering
        kl = kl_divergence(main, shadow)
        self.window.append(kl)
        mean = sum(self.window) / len(self.window)
        if index % max(1, kl_cfg.every) == 0:
            self.job.emit(KlSample(index, kl, mean, alpha))
        if index >= self.reinject_until and self.alpha != self.base_alpha:
            self.alpha = self.base_alpha  # the re-injection window is over
        faded = len(self.window) == self.window.maxlen and mean < kl_cfg.threshold
        if st and faded and index >= self.reinject_until and abs(self.alpha) < st.max_alpha:
            # Away from zero in the direction in force, never past that direction's ceiling.
            sign = -1.0 if self.base_alpha < 0 else 1.0
            before, self.alpha = self.alpha, sign * min(abs(self.alpha) + kl_cfg.alpha_step, st.max_alpha)
            self.reinject_until = index + kl_cfg.window
            self.window.clear()
            self.job.emit(Reinjection(index, mean, before, self.alpha))
            return True
        return False

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
            fed = decode(self.loaded.model, self.loaded.layers, shadow, chunk)[0]
            shadow_logits += list(fed)
            self.shadow_next = fed[-1]
        reinjections = sum(self._monitor(p.index, p.logits, s, p.alpha) for p, s in zip(self.pending, shadow_logits))
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
        first = self._send(delta)
        if isinstance(first, StepResult):  # the guard withheld the text
            return first
        if len(self.generated) >= job.max_tokens:
            return self.finish(StopReason.LENGTH, first)
        reinjections = self._catch_up() if len(self.pending) >= SHADOW_CHUNK else 0
        return StepResult(token, self.alpha != alpha, reinjections, first)

    def _emit_text(self, text: str) -> bool:
        """Send text to the client; True when it is the reply's first."""
        first = not self.first_token_ms
        if first:
            self.first_token_ms = (time.perf_counter() - self.job.submitted) * 1000
        self.job.emit(TextDelta(text))
        return first

    def _send(self, delta: str, final: bool = False) -> "bool | StepResult":
        """Without a guard, send the text now. With one, hold it until its sentence ends (or the
        reply does), then have it checked off the engine thread, one sentence after another:
        clean text goes out, flagged text is withheld. Returns whether text went out first, or
        the withholding's result."""
        guard = self.job.guard
        if guard is None:
            return self._emit_text(delta) if delta else False
        self.held += delta
        if self.held.strip() and (final or ends_sentence(self.held) or len(self.held) >= GUARD_MAX_HELD):
            # The sampler's state now, so that a restart samples as it would had the check been instant.
            self.waiting.append(_Held(self.held, len(self.generated), self.generator.get_state()))
            self.held = ""
        first = False
        while self.waiting:
            if self.checking is None:
                self.checking = self.checks.submit(guard.check_reply, self.sent, self.waiting[0].text)
            if not self.checking.done():
                break
            verdict, self.checking = self.checking.result(), None
            sentence = self.waiting.popleft()
            if verdict.flagged:
                self.generator.set_state(sentence.rng)
                return self._withhold(verdict.reason, verdict.themes, len(sentence.text))
            first = self._emit_text(sentence.text) or first
            self.sent, self.sent_tokens = self.sent + sentence.text, sentence.tokens
        return first

    def _withhold(self, reason: str, themes: tuple[str, ...], withheld: int) -> StepResult:
        """Drop the flagged text (`withheld` characters) and what was decoded after it while it
        was being checked. A steered reply goes on without steering from what was already sent
        (the stream re-joins the batch with that as its prompt); any other reply ends."""
        self.held, self.waiting, self.ending = "", deque(), None
        if self.main_steered:
            self.job.emit(Guarded(reason, themes, "regenerated_unsteered", withheld))
            self.main_steered, self.alpha, self.restarting = False, 0.0, True
            self.shadow, self.pending = None, []
            self.generated = self.generated[: self.sent_tokens]
            self.text.emitted = self.sent
            return StepResult(None, guard_action="regenerated_unsteered")
        self.job.emit(Guarded(reason, themes, "cut", withheld))
        result = self.end(StopReason.GUARD)
        return result._replace(guard_action="cut")

    def finish(self, reason: StopReason, first_text: bool = False, delta: str = "") -> StepResult:
        """The reply is complete (end-of-text, length, a stop sequence). With a guard its last
        text is checked before the stream ends; until then the stream waits out of the batch
        (`drain`)."""
        if self.job.guard is None:
            first_text = (self._emit_text(delta) if delta else False) or first_text
            return self.end(reason, first_text)
        self.ending = reason
        tail = delta if reason is StopReason.STOP_SEQUENCE else self.text.flush(self.generated)
        sent = self._send(tail, final=True)
        if isinstance(sent, StepResult):
            return sent
        return self.drain(first_text or sent)

    def drain(self, first_text: bool = False) -> StepResult:
        """A complete reply waiting for the guard's last checks: ends when they are clean."""
        if self.job.cancelled.is_set():
            return self.end(StopReason.CANCELLED, first_text)
        if self.job.deadline is not None and time.monotonic() >= self.job.deadline:
            return self.end(StopReason.DEADLINE, first_text)
        sent = self._send("")
        if isinstance(sent, StepResult):
            return sent
        if self.ending is None:
            raise RuntimeError("drain() is for a complete reply waiting for the guard")
        if self.checking is None and not self.waiting:
            return self.end(self.ending, first_text or sent)
        return StepResult(None, first_text=first_text or sent)

    def fail(self, exc: Exception) -> None:
        """This row alone went wrong: its caller gets the error, the batch goes on without it."""
        self.reason, self.shadow, self.pending = StopReason.FAILED, None, []
        self.restarting = False
        _tell(self.job, Failed(exc))

    def end(self, reason: StopReason, first_text: bool = False) -> StepResult:
        self.reason = reason
        reinjections = self._catch_up() if self.pending and reason is not StopReason.CANCELLED else 0  # the last KL samples
        self.shadow = None
        if reason not in (StopReason.STOP_SEQUENCE, StopReason.GUARD, StopReason.CANCELLED) and self.job.guard is None:
            tail = self.text.flush(self.generated)
            if tail:
                self.job.emit(TextDelta(tail))
        self.job.emit(Finished(reason, len(self.job.prompt_ids), len(self.generated),
                               time.perf_counter() - self.started, self.first_token_ms))
        return StepResult(None, reinjections=reinjections, first_text=first_text)


class Engine:
    """A bounded queue of jobs and the one thread that decodes them as one running batch."""

    def __init__(self, loaded: LoadedModel, settings: EngineSettings = EngineSettings(),
                 metrics: GeneratorMetrics | None = None) -> None:
        if settings.max_batch < 1 or settings.max_queue < 1 or settings.prefix_cache_mb < 0 or settings.prefill_chunk < 0:
            raise ValueError("max_batch and max_queue must be at least 1, prefix_cache_mb and prefill_chunk at least 0")
        self.loaded, self.settings = loaded, settings
        # Only the worker thread touches it.
        self._prefixes = (PrefixCache(settings.prefix_cache_mb * 2**20)
                          if settings.prefix_cache_mb and caches_prefixes(loaded.model) else None)
        self.metrics = metrics or GeneratorMetrics()
        self._jobs: queue.Queue[Job] = queue.Queue(maxsize=settings.max_queue)
        self._closing = threading.Event()
        # The guard's checks run here, off the engine thread: a row waiting for one stalls no other.
        self._checks = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"guard-{loaded.name}")
        self._thread = threading.Thread(target=self._run, name=f"engine-{loaded.name}", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        if self._closing.is_set() or not self._thread.is_alive():
            raise Unavailable(f"the engine for {self.loaded.name} has stopped; restart the generator")
        try:
            self._jobs.put_nowait(job)
        except queue.Full:
            raise ResourceExhausted(
                f"generator queue is full ({self._jobs.maxsize} waiting); retry shortly", retry_after_s=1.0
            ) from None
        self.metrics.queue_depth.labels(self.loaded.name).set(self._jobs.qsize())

    def close(self) -> None:
        """Stop the worker: running streams and every job still queued end as cancelled."""
        self._closing.set()
        self._thread.join(timeout=30)
        self._checks.shutdown(wait=False, cancel_futures=True)
        self._cancel_queued()  # a submit racing the worker's own drain still gets its Finished

    def _cancel_queued(self) -> None:
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                return
            _tell(job, Finished(StopReason.CANCELLED, len(job.prompt_ids), 0, 0.0, 0.0))

    # the worker thread -------------------------------------------------------------

    def _take(self, room: int, wait: bool) -> list[Job]:
        jobs: list[Job] = []
        while len(jobs) < room:
            try:
                job = self._jobs.get(timeout=0.1) if wait and not jobs else self._jobs.get_nowait()
            except queue.Empty:
                break
            if job.cancelled.is_set():
                job.emit(Finished(StopReason.CANCELLED, len(job.prompt_ids), 0, 0.0, 0.0))
                continue
            jobs.append(job)
        self.metrics.queue_depth.labels(self.loaded.name).set(self._jobs.qsize())
        return jobs

    def _fail(self, s: _Stream, exc: Exception) -> None:
        log.error("stream failed alone (%s: %s); the batch goes on", type(exc).__name__, exc,
                  exc_info=not isinstance(exc, SteeringError))
        s.fail(exc)
        self.metrics.finished.labels(self.loaded.name, StopReason.FAILED).inc()

    def _admission(self, streams: list[_Stream]) -> "_Admission | None":
        """The joiners (new streams, and guarded ones going on unsteered), their rows and what the
        prefix cache holds of each row's prompt."""
        adm = _Admission()
        for s in streams:
            try:
                steerings = s.prefill_rows()
            except Exception as exc:
                self._fail(s, exc)
                continue
            adm.streams.append(s)
            adm.starts.append(len(adm.prompts))
            adm.prompts += [s.prompt_ids] * len(steerings)
            adm.additions += steerings
        if not adm.streams:
            return None
        adm.keys = [steering_key(a) for a in adm.additions]
        adm.pasts = [self._prefixes.lookup(k, p) if self._prefixes else None for k, p in zip(adm.keys, adm.prompts)]
        adm.reused = sum(past_length(p) if p else 0 for p in adm.pasts)
        return adm

    def _prefill_chunk(self, adm: "_Admission") -> bool:
        """Run the next `prefill_chunk` tokens of every joiner row with more than that left, so a
        long prompt is prefilled between decoding steps rather than in one long stall. False when
        no row has that much left (the admission is ready to finish)."""
        chunk, lm = self.settings.prefill_chunk, self.loaded
        done = [past_length(p) if p else 0 for p in adm.pasts]
        rows = [i for i, p in enumerate(adm.prompts) if chunk and len(p) - done[i] > chunk]
        if not rows:
            return False
        # Only a row that steers its prompt steers these positions; none of them is a prompt's last.
        additions = [a if a is not None and a.steer_prompt else None for a in (adm.additions[i] for i in rows)]
        try:
            deltas = stack_rows(additions, lm.hidden_size, lm.model.dtype, lm.device)
            part = prefill(lm.model, lm.layers, [adm.prompts[i][: done[i] + chunk] for i in rows], deltas,
                           lm.tokenizer.pad_token_id or 0, row_switches(additions, lm.device),
                           [adm.pasts[i] for i in rows])
            for j, i in enumerate(rows):
                adm.pasts[i] = row_past(part, j, done[i] + chunk)
        except Exception as exc:  # the joiners' own forward pass: the running batch is not in it
            for s in adm.streams:
                self._fail(s, exc)
            adm.streams.clear()
        return True

    def _admit(self, adm: "_Admission") -> tuple[Rows | None, list[_Stream]]:
        """Prefill what is left of the joiners' prompts together; each one's gate picks the row it
        decodes with, and a stream monitoring KL splits its unsteered row off as its shadow.
        Returns the joined rows and their streams: a joiner that fails alone (its gate, say) is
        left out; a failed prefill fails every joiner."""
        lm, prompts = self.loaded, adm.prompts
        try:
            deltas = stack_rows(adm.additions, lm.hidden_size, lm.model.dtype, lm.device)
            rows = prefill(lm.model, lm.layers, prompts, deltas, lm.tokenizer.pad_token_id or 0,
                           row_switches(adm.additions, lm.device), adm.pasts)
            self._remember(rows, adm)
        except Exception as exc:  # the joiners' shared forward pass: the running batch is not in it
            for s in adm.streams:
                self._fail(s, exc)
            return None, []
        keep, joined = [], []
        for s, start, end in zip(adm.streams, adm.starts, [*adm.starts[1:], len(prompts)]):
            restarting = s.restarting
            try:
                main, shadow = s.choose_rows(rows.logits[start:end])
                if shadow is not None:
                    s.shadow = split_off(rows, start + shadow)
                    s.shadow_next = s.shadow.logits[0]
            except Exception as exc:
                self._fail(s, exc)
                continue
            if not restarting:
                self.metrics.gate_decisions.labels(lm.name, s.gate).inc()
            keep.append(start + main)
            joined.append(s)
        return (select(rows, keep), joined) if keep else (None, [])

    def _remember(self, rows: Rows, adm: "_Admission") -> None:
        """Count the prompt tokens the cache gave and those computed, and cache each prompt's keys
        and values but its last token's."""
        total = sum(map(len, adm.prompts))
        self.metrics.prefix_tokens.labels(self.loaded.name, "reused").inc(adm.reused)
        self.metrics.prefix_tokens.labels(self.loaded.name, "computed").inc(total - adm.reused)
        if self._prefixes is None:
            return
        for row, (prompt, key, past) in enumerate(zip(adm.prompts, adm.keys, adm.pasts)):
            length = len(prompt) - 1
            if length and (past is None or past_length(past) < length):
                self._prefixes.store(key, prompt[:length], row_past(rows, row, length))

    def _set_row(self, rows: Rows, row: int, steering: RowSteering | None) -> None:
        additions = steering.additions if steering else {}
        for layer, d in rows.deltas.items():
            d[row] = additions[layer].to(d.dtype) if layer in additions else 0

    def _step(self, batch: Rows, streams: list[_Stream]) -> tuple[list[int], torch.Tensor, int]:
        """Sample every stream's token (row i is stream i). Returns the rows still decoding, the
        token of each row and how many tokens were generated. A stream the guard restarts, or
        one whose complete reply waits for the guard, leaves the batch."""
        tokens = torch.zeros(len(streams), dtype=torch.long, device=self.loaded.device)
        produced = 0
        for row, s in enumerate(streams):
            before = len(s.generated)
            try:
                r = s.advance(batch.logits[row])
            except Exception as exc:  # sampling, the gate, the KL shadow, the guard, detokenising
                self._fail(s, exc)
                continue
            produced += max(0, len(s.generated) - before)  # a guard restart shortens the reply
            self._account(s, r)
            if r.token is None:
                continue
            tokens[row] = r.token
            if r.alpha_changed:
                self._set_row(batch, row, s.additions(True))
        self.metrics.tokens.labels(self.loaded.name).inc(produced)
        return [i for i, s in enumerate(streams) if s.decoding], tokens, produced

    def _drain(self, draining: list[_Stream]) -> tuple[list[_Stream], list[_Stream]]:
        """Streams whose complete reply waits for the guard: (still waiting, restarting)."""
        for s in draining:
            try:
                self._account(s, s.drain())
            except Exception as exc:
                self._fail(s, exc)
        waiting = [s for s in draining if s.reason is None and not s.restarting]
        return waiting, [s for s in draining if s.restarting and s.reason is None]

    def _account(self, s: _Stream, r: StepResult) -> None:
        name, m = self.loaded.name, self.metrics
        if r.first_text:
            m.time_to_first_token.labels(name).observe(s.first_token_ms / 1000)
        if r.reinjections:
            m.reinjections.labels(name).inc(r.reinjections)
        if r.guard_action:
            m.guard_actions.labels(name, r.guard_action).inc()
        if r.token is None and s.reason is not None:
            m.finished.labels(name, s.reason).inc()

    def _run(self) -> None:
        name, m = self.loaded.name, self.metrics
        eos = set(eos_ids(self.loaded))
        batch: Rows | None = None
        streams: list[_Stream] = []  # one per batch row
        restarts: list[_Stream] = []  # guarded streams waiting to join again, unsteered
        admitting: _Admission | None = None  # joiners being prefilled
        draining: list[_Stream] = []  # complete replies waiting for the guard's last checks
        recent: deque[tuple[float, int]] = deque()  # (time, tokens) over the last 10 s
        while not self._closing.is_set():
            # New jobs wait in the queue while an admission is under way.
            room = 0 if admitting else self.settings.max_batch - len(streams) - len(restarts) - len(draining)
            jobs = self._take(room, wait=batch is None and not restarts and not draining and not admitting)
            if draining:
                draining, back = self._drain(draining)
                restarts += back
                if batch is None and not restarts and not jobs and draining:  # nothing to decode meanwhile
                    wait([s.checking for s in draining if s.checking], timeout=0.05, return_when=FIRST_COMPLETED)
            try:
                with torch.no_grad():
                    joining = restarts + self._streams(jobs, eos) if admitting is None else []
                    jobs = []
                    if joining:
                        admitting, restarts = self._admission(joining), []
                    if admitting is not None and not (batch is not None and self._prefill_chunk(admitting)):
                        (joined, joiners), admitting = self._admit(admitting), None
                        if joined is not None:
                            batch = joined if batch is None else merge(batch, joined)
                            streams += joiners
                    elif admitting is not None and not admitting.streams:  # its forward pass failed
                        admitting = None
                    if batch is not None:
                        live, tokens, produced = self._step(batch, streams)
                        recent.append((time.monotonic(), produced))
                        restarts += [s for s in streams if s.restarting and s.reason is None]
                        draining += [s for s in streams if s.ending is not None and s.reason is None and not s.restarting]
                        if len(live) < len(streams):
                            streams = [streams[i] for i in live]
                            batch = select(batch, live) if live else None
                        if batch is not None:
                            decode(self.loaded.model, self.loaded.layers, batch, tokens[live])
            except Exception as exc:  # the shared forward pass failed: every stream in it fails; the engine goes on
                log.exception("the batch's forward pass failed")
                for s in streams + restarts + (admitting.streams if admitting else []):
                    if s.reason is None:
                        self._fail(s, exc)
                batch, streams, restarts, admitting = None, [], [], None
            while recent and recent[0][0] < time.monotonic() - 10:
                recent.popleft()
            m.tokens_per_second.labels(name).set(sum(n for _, n in recent) / 10)
            m.batch_streams.labels(name).set(len(streams))
            m.batch_occupancy.labels(name).set(len(streams) / self.settings.max_batch)
        # Shutting down: end what is still running, and what waits.
        for s in streams + restarts + draining + (admitting.streams if admitting else []):
            if s.reason is None:
                s.end(StopReason.CANCELLED)
        self._cancel_queued()

    def _streams(self, jobs: list[Job], eos: set[int]) -> list[_Stream]:
        streams = []
        for job in jobs:
            try:
                streams.append(_Stream(self.loaded, job, eos, self._checks))
            except Exception as exc:
                log.error("could not start a stream: %s", exc)
                _tell(job, Failed(exc))
        return streams
