"""Streaming steered generation. One worker thread owns the model, because forward hooks
are attached to the shared modules: two requests stepping at once would see each other's
vectors. Everything a request needs travels in its Job; nothing is kept on the engine
between jobs.

Per job, the prompt is prefilled as a batch of two identical rows: row 0 unsteered, row 1
steered. Row 0's next-token distribution feeds the top-3 skip gate. Then the batch keeps
what the job needs: only row 0 (gate skip, or nothing to steer), only row 1, or both
when KL monitoring is on; the unsteered shadow row is fed the steered row's tokens, so
KL(steered || unsteered) compares the two distributions over the same text.
"""

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from steering.errors import ResourceExhausted, Unavailable
from steering.gate import DEFAULT_THRESHOLD, decide
from steering.generate import eos_ids, sample
from steering.hooks import steer
from steering.loading import LoadedModel

from .events import Event, Failed, Finished, Gate, KlSample, Reinjection, Started, TextDelta

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


@torch.no_grad()
def run_job(loaded: LoadedModel, job: Job) -> None:
    """Generate one reply, emitting events as it goes. Raises nothing for cancellation or
    deadlines: they end the stream with a Finished event."""
    start = time.perf_counter()
    model, tok = loaded.model, loaded.tokenizer
    st = job.steering
    layers = sorted(st.directions) if st else []
    n_prompt = len(job.prompt_ids)
    alpha = st.alpha if st else 0.0
    job.emit(Started(loaded.name, st.concept if st else "", alpha, tuple(layers), n_prompt))

    rows = 2 if st else 1  # row 0 unsteered, row 1 steered
    ids = torch.tensor([job.prompt_ids], device=loaded.device).expand(rows, -1)
    hidden, dtype = loaded.hidden_size, model.dtype

    def deltas_for(kept: list[int], a: float) -> dict[int, torch.Tensor]:
        out = {}
        for layer in layers:
            d = torch.zeros(len(kept), hidden, dtype=dtype, device=loaded.device)
            for i, row in enumerate(kept):
                if row == 1:
                    d[i] = a * st.directions[layer].to(dtype=dtype, device=loaded.device)
            out[layer] = d
        return out

    generator = torch.Generator(device="cpu")
    generator.manual_seed(job.sampling.seed if job.sampling.seed is not None else int(time.time_ns() % (2**63)))
    cache = DynamicCache()
    with steer(loaded.layers, deltas_for([0, 1][:rows], alpha)) as active:
        out = model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
        logits = out.logits[:, -1]  # [rows, vocab]

        # The gate looks at the unsteered row.
        if st is None:
            job.emit(Gate("no_steering"))
            kept = [0]
        elif not job.gate.enabled:
            job.emit(Gate("disabled"))
            kept = [0, 1] if job.kl.enabled else [1]
        else:
            g = decide(logits[0], st.word_ids, tok, job.gate.threshold)
            job.emit(Gate("skip" if g.skip else "steer", g.token, g.probability, g.top3))
            kept = [0] if g.skip else ([0, 1] if job.kl.enabled else [1])
        if kept != [0, 1][:rows]:
            cache.batch_select_indices(torch.tensor(kept, device=loaded.device))
            logits = logits[kept]
            active.deltas = deltas_for(kept, alpha)
        main = len(kept) - 1  # the steered row if kept, else the unsteered one
        shadow = 0 if kept == [0, 1] else None

        text = TextStream(tok, job.stop)
        eos = set(eos_ids(loaded))
        generated: list[int] = []
        window: deque[float] = deque(maxlen=max(1, job.kl.window))
        base_alpha, reinject_until = alpha, -1
        first_token_ms = 0.0
        reason = "length"
        while True:
            if job.cancelled.is_set():
                reason = "cancelled"
                break
            if job.deadline is not None and time.monotonic() >= job.deadline:
                reason = "deadline"
                break
            index = len(generated)
            if shadow is not None:
                kl = kl_divergence(logits[main], logits[shadow])
                window.append(kl)
                mean = sum(window) / len(window)
                if index % max(1, job.kl.every) == 0:
                    job.emit(KlSample(index, kl, mean, alpha))
                if index >= reinject_until and alpha != base_alpha:
                    alpha = base_alpha  # the re-injection window is over
                    active.deltas = deltas_for(kept, alpha)
                faded = len(window) == window.maxlen and mean < job.kl.threshold
                if faded and index >= reinject_until and alpha < st.max_alpha:
                    before, alpha = alpha, min(alpha + job.kl.alpha_step, st.max_alpha)
                    reinject_until = index + job.kl.window
                    job.emit(Reinjection(index, mean, before, alpha))
                    active.deltas = deltas_for(kept, alpha)
                    window.clear()
            token = int(sample(logits[main][None], job.sampling.temperature, job.sampling.top_p, generator)[0])
            if token in eos:
                reason = "end_of_text"
                break
            generated.append(token)
            delta, stopped = text.push(generated)
            if delta:
                if not first_token_ms:
                    first_token_ms = (time.perf_counter() - job.submitted) * 1000
                job.emit(TextDelta(delta))
            if stopped:
                reason = "stop_sequence"
                break
            if len(generated) >= job.max_tokens:
                break
            step = torch.tensor([[token]] * len(kept), device=loaded.device)
            out = model(input_ids=step, cache=cache, use_cache=True)
            logits = out.logits[:, -1]
    if reason not in ("stop_sequence",):
        tail = text.flush(generated)
        if tail and reason != "cancelled":
            job.emit(TextDelta(tail))
    job.emit(Finished(reason, n_prompt, len(generated), time.perf_counter() - start, first_token_ms))


class Engine:
    """A bounded queue of jobs and the one thread that runs them."""

    def __init__(self, loaded: LoadedModel, max_queue: int = 16) -> None:
        self.loaded = loaded
        self._jobs: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self._thread = threading.Thread(target=self._run, name=f"engine-{loaded.name}", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        if not self._thread.is_alive():
            raise Unavailable(f"the engine for {self.loaded.name} has stopped; restart the generator")
        try:
            self._jobs.put_nowait(job)
        except queue.Full:
            raise ResourceExhausted(
                f"generator queue is full ({self._jobs.maxsize} waiting); retry shortly", retry_after_s=1.0
            ) from None

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            if job.cancelled.is_set():
                job.emit(Finished("cancelled", len(job.prompt_ids), 0, 0.0, 0.0))
                continue
            try:
                run_job(self.loaded, job)
            except Exception as exc:  # reported to the caller's stream; the engine keeps serving
                log.exception("generation failed")
                try:
                    job.emit(Failed(exc))
                except Exception:  # the caller is gone; nothing more to tell it
                    log.debug("could not report a failed job", exc_info=True)
