"""Streaming steered generation with continuous batching.

One worker thread owns the model and one running batch. Between two decoding steps it
admits waiting requests (their prompts prefilled and their KV caches merged into the
batch) and drops the rows of requests that finished or were cancelled. Every row carries
its own steering additions, so requests with different concepts and alphas, or none,
decode together without seeing each other's vectors.

A steered request's prompt is prefilled as two rows: unsteered and steered. The unsteered
row's next-token distribution feeds the top-3 skip gate; then the request keeps what it
needs: only the unsteered row (gate skip), only the steered one, or both when KL
monitoring is on. The unsteered shadow row is fed the steered row's tokens, so
KL(steered || unsteered) compares the two distributions over the same text.

Everything a request needs lives in its `_Stream`; nothing per request is kept on the engine.
"""

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from steering.errors import ResourceExhausted, Unavailable
from steering.gate import DEFAULT_THRESHOLD, decide
from steering.generate import eos_ids, sample
from steering.hooks import stack_rows
from steering.loading import LoadedModel

from .batch import Rows, decode, merge, prefill, select
from .events import Event, Failed, Finished, Gate, KlSample, Reinjection, Started, TextDelta
from .metrics import GeneratorMetrics

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
    directions: dict[int, torch.Tensor]  # steering layer -> unit vector [hidden]
    alpha: float
    max_alpha: float
    word_ids: frozenset[int]  # the gate's concept tokens


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
    cancelled: threading.Event = field(default_factory=threading.Event)
    deadline: float | None = None  # time.monotonic() by which to stop
    submitted: float = field(default_factory=time.perf_counter)


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
    max_batch: int = 8  # streams decoded together; a KL shadow row does not count
    max_queue: int = 16  # requests waiting to join beyond that


class StepResult(NamedTuple):
    token: int | None  # None: the stream has ended
    alpha_changed: bool = False
    reinjected: bool = False
    first_text: bool = False


class _Stream:
    """One request in the running batch: its rows, text, sampler and KL state."""

    def __init__(self, loaded: LoadedModel, job: Job, eos: set[int]) -> None:
        self.loaded, self.job, self.eos = loaded, job, eos
        st = job.steering
        self.base_alpha = self.alpha = st.alpha if st else 0.0
        self.roles: tuple[str, ...] = ()  # this stream's rows, "main" and maybe "shadow"
        self.main_steered = False
        self.gate = ""  # the gate's decision, once prefilled
        self.text = TextStream(loaded.tokenizer, job.stop)
        self.generated: list[int] = []
        self.window: deque[float] = deque(maxlen=max(1, job.kl.window))
        self.reinject_until = -1
        self.first_token_ms = 0.0
        self.reason: str | None = None  # set when the stream has ended
        self.generator = torch.Generator(device=loaded.device)
        seed = job.sampling.seed if job.sampling.seed is not None else time.time_ns() % (2**63)
        self.generator.manual_seed(seed)
        self.started = time.perf_counter()

    def additions(self, steered: bool) -> dict[int, torch.Tensor] | None:
        st = self.job.steering
        return {layer: self.alpha * d for layer, d in st.directions.items()} if steered and st else None

    def prefill_rows(self) -> list[dict[int, torch.Tensor] | None]:
        """The rows to prefill: the unsteered one when the gate or KL needs it, then the steered one."""
        job, st = self.job, self.job.steering
        job.emit(Started(self.loaded.name, st.concept if st else "", self.alpha,
                         tuple(sorted(st.directions)) if st else (), len(job.prompt_ids)))
        if st is None:
            return [None]
        if not job.gate.enabled and not job.kl.enabled:
            return [self.additions(True)]
        return [None, self.additions(True)]

    def choose_rows(self, logits: torch.Tensor) -> list[int]:
        """After prefill: which prefilled rows to keep, main row first (indices into prefill_rows)."""
        job, st = self.job, self.job.steering
        if st is None:
            decision, steered = Gate("no_steering"), False
        elif not job.gate.enabled:
            decision, steered = Gate("disabled"), True
        else:
            g = decide(logits[0], st.word_ids, self.loaded.tokenizer, job.gate.threshold)
            decision, steered = Gate("skip" if g.skip else "steer", g.token, g.probability, g.top3), not g.skip
        if len(logits) == 1 or not steered:
            keep = [0]
        else:
            keep = [1, 0] if job.kl.enabled else [1]  # the unsteered row stays as the KL shadow
        self.main_steered = steered
        self.roles = ("main", "shadow")[: len(keep)]
        self.gate = decision.decision
        job.emit(decision)
        return keep

    def _monitor(self, index: int, main: torch.Tensor, shadow: torch.Tensor) -> bool:
        """KL of this step; re-injects at a higher alpha when the steering has faded."""
        kl_cfg, st = self.job.kl, self.job.steering
        kl = kl_divergence(main, shadow)
        self.window.append(kl)
        mean = sum(self.window) / len(self.window)
        if index % max(1, kl_cfg.every) == 0:
            self.job.emit(KlSample(index, kl, mean, self.alpha))
        if index >= self.reinject_until and self.alpha != self.base_alpha:
            self.alpha = self.base_alpha  # the re-injection window is over
        faded = len(self.window) == self.window.maxlen and mean < kl_cfg.threshold
        if st and faded and index >= self.reinject_until and self.alpha < st.max_alpha:
            before, self.alpha = self.alpha, min(self.alpha + kl_cfg.alpha_step, st.max_alpha)
            self.reinject_until = index + kl_cfg.window
            self.window.clear()
            self.job.emit(Reinjection(index, mean, before, self.alpha))
            return True
        return False

    def advance(self, main: torch.Tensor, shadow: torch.Tensor | None) -> StepResult:
        """Take this step's token from the main row's logits and send what text it completes."""
        job = self.job
        if job.cancelled.is_set():
            return self.end("cancelled")
        if job.deadline is not None and time.monotonic() >= job.deadline:
            return self.end("deadline")
        alpha = self.alpha
        reinjected = self._monitor(len(self.generated), main, shadow) if shadow is not None else False
        if len(self.generated) < job.min_tokens and self.eos:
            main = main.clone()
            main[list(self.eos)] = -torch.inf
        token = int(sample(main[None], job.sampling.temperature, job.sampling.top_p, self.generator)[0])
        if token in self.eos:
            return self.end("end_of_text")
        self.generated.append(token)
        delta, stopped = self.text.push(self.generated)
        first = bool(delta) and not self.first_token_ms
        if first:
            self.first_token_ms = (time.perf_counter() - job.submitted) * 1000
        if delta:
            job.emit(TextDelta(delta))
        if stopped:
            return self.end("stop_sequence", first)
        if len(self.generated) >= job.max_tokens:
            return self.end("length", first)
        return StepResult(token, self.alpha != alpha, reinjected, first)

    def end(self, reason: str, first_text: bool = False) -> StepResult:
        self.reason = reason
        if reason != "stop_sequence":
            tail = self.text.flush(self.generated)
            if tail and reason != "cancelled":
                self.job.emit(TextDelta(tail))
        self.job.emit(Finished(reason, len(self.job.prompt_ids), len(self.generated),
                               time.perf_counter() - self.started, self.first_token_ms))
        return StepResult(None, first_text=first_text)


class Engine:
    """A bounded queue of jobs and the one thread that decodes them as one running batch."""

    def __init__(self, loaded: LoadedModel, settings: EngineSettings = EngineSettings(),
                 metrics: GeneratorMetrics | None = None) -> None:
        if settings.max_batch < 1 or settings.max_queue < 1:
            raise ValueError("max_batch and max_queue must be at least 1")
        self.loaded, self.settings = loaded, settings
        self.metrics = metrics or GeneratorMetrics()
        self._jobs: queue.Queue[Job] = queue.Queue(maxsize=settings.max_queue)
        self._closing = threading.Event()
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
        self._closing.set()
        self._thread.join(timeout=30)

    # the worker thread -------------------------------------------------------------

    def _take(self, room: int, wait: bool) -> list[Job]:
        jobs: list[Job] = []
        while len(jobs) < room:
            try:
                job = self._jobs.get(timeout=0.1) if wait and not jobs else self._jobs.get_nowait()
            except queue.Empty:
                break
            if job.cancelled.is_set():
                job.emit(Finished("cancelled", len(job.prompt_ids), 0, 0.0, 0.0))
                continue
            jobs.append(job)
        self.metrics.queue_depth.labels(self.loaded.name).set(self._jobs.qsize())
        return jobs

    def _admit(self, jobs: list[Job], eos: set[int]) -> tuple[Rows, list[tuple[_Stream, str]]]:
        """Prefill the joiners together, let each one's gate pick its rows, keep those."""
        streams = [_Stream(self.loaded, job, eos) for job in jobs]
        prompts, additions, spans = [], [], []
        for s in streams:
            rows = s.prefill_rows()
            spans.append(range(len(prompts), len(prompts) + len(rows)))
            prompts += [s.job.prompt_ids] * len(rows)
            additions += rows
        lm = self.loaded
        deltas = stack_rows(additions, lm.hidden_size, lm.model.dtype, lm.device)
        rows = prefill(lm.model, lm.layers, prompts, deltas, lm.tokenizer.pad_token_id or 0)
        keep, owners = [], []
        for s, span in zip(streams, spans):
            chosen = s.choose_rows(rows.logits[span.start : span.stop])
            self.metrics.gate_decisions.labels(self.loaded.name, s.gate).inc()
            keep += [span.start + i for i in chosen]
            owners += [(s, role) for role in s.roles]
        return select(rows, keep), owners

    def _set_row(self, rows: Rows, row: int, additions: dict[int, torch.Tensor] | None) -> None:
        for layer, d in rows.deltas.items():
            d[row] = additions[layer].to(d.dtype) if additions and layer in additions else 0

    def _step(self, batch: Rows, owners: list[tuple[_Stream, str]]) -> tuple[list[int], torch.Tensor]:
        """Sample every stream's token. Returns the rows still live and each row's token."""
        name, m = self.loaded.name, self.metrics
        tokens = torch.zeros(len(owners), dtype=torch.long, device=self.loaded.device)
        index = {(s, role): i for i, (s, role) in enumerate(owners)}
        produced = 0
        for s in dict.fromkeys(s for s, _ in owners):
            main, shadow = index[(s, "main")], index.get((s, "shadow"))
            before = len(s.generated)
            r = s.advance(batch.logits[main], batch.logits[shadow] if shadow is not None else None)
            produced += len(s.generated) - before
            if r.first_text:
                m.time_to_first_token.labels(name).observe(s.first_token_ms / 1000)
            if r.token is None:
                m.finished.labels(name, s.reason).inc()
                continue
            tokens[main] = r.token
            if shadow is not None:
                tokens[shadow] = r.token
            if r.reinjected:
                m.reinjections.labels(name).inc()
            if r.alpha_changed:
                self._set_row(batch, main, s.additions(True))
        m.tokens.labels(name).inc(produced)
        return [i for i, (s, _) in enumerate(owners) if s.reason is None], tokens

    def _run(self) -> None:
        name, m = self.loaded.name, self.metrics
        eos = set(eos_ids(self.loaded))
        batch: Rows | None = None
        owners: list[tuple[_Stream, str]] = []  # one per batch row
        recent: deque[tuple[float, int]] = deque()  # (time, streams stepped) over the last 10 s
        while not self._closing.is_set():
            streams = len({s for s, _ in owners})
            jobs = self._take(self.settings.max_batch - streams, wait=batch is None)
            try:
                with torch.no_grad():
                    if jobs:
                        joined, new = self._admit(jobs, eos)
                        batch = joined if batch is None else merge(batch, joined)
                        owners += new
                        jobs = []
                    if batch is not None:
                        live, tokens = self._step(batch, owners)
                        recent.append((time.monotonic(), len({owners[i][0] for i in live})))
                        if len(live) < len(owners):
                            owners = [owners[i] for i in live]
                            batch = select(batch, live) if live else None
                        if batch is not None:
                            decode(self.loaded.model, self.loaded.layers, batch, tokens[live])
            except Exception as exc:  # a failed step fails the streams in it; the engine keeps serving
                log.exception("generation failed")
                running = [s.job for s in dict.fromkeys(s for s, _ in owners) if s.reason is None]
                for job in dict.fromkeys(running + jobs):
                    try:
                        job.emit(Failed(exc))
                    except Exception:  # the caller is gone; nothing more to tell it
                        log.debug("could not report a failed job", exc_info=True)
                batch, owners = None, []
            while recent and recent[0][0] < time.monotonic() - 10:
                recent.popleft()
            streams = len({s for s, _ in owners})
            m.tokens_per_second.labels(name).set(sum(n for _, n in recent) / 10)
            m.batch_streams.labels(name).set(streams)
            m.batch_rows.labels(name).set(len(owners))
            m.batch_occupancy.labels(name).set(streams / self.settings.max_batch)
        for s in dict.fromkeys(s for s, _ in owners):  # shutting down: end what is still running
            if s.reason is None:
                s.end("cancelled")
