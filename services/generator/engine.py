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

A joiner's prompt starts from the prefix cache's keys and values when an earlier prompt began
alike; while a batch runs, the rest is prefilled a chunk per step so the running streams keep
speaking. The content guard's checks run on a worker thread of their own. While nothing runs or
waits, the engine prefills what a Chat asked it to warm (how its next prompt will begin under
each concept its policy may pick), a chunk at a time, into the prefix cache.

Everything a request needs lives in its `Stream` (stream.py); nothing per request is kept on
the engine. The engine makes every model call (prefill, decoding, the KL shadow's catch-up
inside the stream's step) and applies what each stream's step returns.
"""

import logging
import queue
import threading
import time
from collections import deque
from concurrent import futures
from dataclasses import dataclass, field

import torch

from steering.batch import Past, Rows, caches_prefixes, decode, merge, past_length, prefill, row_past, select, split_off
from steering.errors import ResourceExhausted, SteeringError, Unavailable
from steering.generate import eos_ids
from steering.hooks import Interrupted, RowSteering, interrupt_when, row_switches, stack_rows
from steering.loading import LoadedModel
from steering.threads import single_threaded

from .events import Failed, Finished, StopReason
from .job import Job, Warming, tell
from .metrics import GeneratorMetrics
from .prefix import PrefixCache, SteeringKey, steering_key
from .stream import StepResult, Stream

log = logging.getLogger(__name__)

# A warming prefix is prefilled this many tokens a call. A call gives way between two layers
# when a request arrives (its work is lost, not the turn's time); every call reads all the
# weights once, so longer calls cost less in all than shorter ones.
WARM_CHUNK = 128


@dataclass(frozen=True)
class EngineSettings:
    max_batch: int = 8  # streams decoded together
    max_queue: int = 16  # requests waiting to join beyond that
    prefix_cache_mb: int = 128  # keys and values of recent prompts, reused by prompts that begin alike; 0: off
    # While other streams decode, a joiner's prompt is prefilled this many tokens per step; 0: at once.
    prefill_chunk: int = 32
    threads: int = 0  # intra-op threads of the engine's thread; 0: its creator's (steering/threads.py)
    warm: bool = True  # while idle, prefill how a Chat's next prompt may begin (needs the prefix cache)


@dataclass
class _Admission:
    """Streams joining the batch: their prefill rows (one or two each), and for every row the
    keys and values of its prompt computed so far (from the prefix cache, then chunk by chunk)."""

    streams: list[Stream] = field(default_factory=list)
    starts: list[int] = field(default_factory=list)  # each stream's first row
    prompts: list[list[int]] = field(default_factory=list)
    additions: list[RowSteering | None] = field(default_factory=list)
    keys: list[SteeringKey] = field(default_factory=list)
    pasts: list[Past | None] = field(default_factory=list)
    reused: int = 0  # prompt tokens the prefix cache gave


@dataclass
class _Warm:
    """The warming prefix under way: its cache key and its keys and values computed so far."""

    warming: Warming
    key: SteeringKey
    past: Past | None


class Engine:
    """A bounded queue of jobs and the one thread that decodes them as one running batch."""

    def __init__(self, loaded: LoadedModel, settings: EngineSettings = EngineSettings(),
                 metrics: GeneratorMetrics | None = None) -> None:
        if min(settings.max_batch, settings.max_queue) < 1 or min(settings.prefix_cache_mb, settings.prefill_chunk,
                                                                   settings.threads) < 0:
            raise ValueError("max_batch and max_queue must be at least 1, prefix_cache_mb, prefill_chunk and threads at least 0")
        self.loaded, self.settings = loaded, settings
        # Only the worker thread touches it.
        self._prefixes = (PrefixCache(settings.prefix_cache_mb * 2**20)
                          if settings.prefix_cache_mb and caches_prefixes(loaded.model) else None)
        self.metrics = metrics or GeneratorMetrics()
        self._jobs: queue.Queue[Job] = queue.Queue(maxsize=settings.max_queue)
        self._warming: deque[Warming] = deque()  # appended by callers' threads, taken by the worker
        self._warm_left = 0  # prefixes queued or under way
        self._warm_changed = threading.Condition()
        self._closing = threading.Event()
        # The guard's checks run here, off the engine thread: a row waiting for one stalls no other.
        # Single-threaded, so the engine's thread keeps the process's one OpenMP team (threads.py).
        self._checks = futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"guard-{loaded.name}",
                                                  initializer=single_threaded)
        self._threads = settings.threads or torch.get_num_threads()
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

    def warm(self, warming: Warming) -> None:
        """Prefill `warming.prompt_ids` into the prefix cache while no stream runs or waits, a
        chunk at a time, unless it is cancelled first; nothing when the cache or warming is off."""
        if self._prefixes is not None and self.settings.warm and not self._closing.is_set():
            with self._warm_changed:
                self._warm_left += 1
                self._warming.append(warming)

    def wait_warm(self, timeout_s: float) -> bool:
        """Wait until every prefix asked for is warmed or dropped; False if still at it."""
        with self._warm_changed:
            return self._warm_changed.wait_for(lambda: not self._warm_left, timeout_s)

    def _warm_finished(self) -> None:
        with self._warm_changed:
            self._warm_left -= 1
            self._warm_changed.notify_all()

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
            tell(job, Finished(StopReason.CANCELLED, len(job.prompt_ids), 0, 0.0, 0.0))

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

    def _shadow_forward(self, shadow: Rows, tokens: torch.Tensor) -> torch.Tensor:
        """Feed a stream's KL shadow the steered row's tokens ([1, k]); its logits at each."""
        return decode(self.loaded.model, self.loaded.layers, shadow, tokens)[0]

    def _fail(self, s: Stream, exc: Exception) -> None:
        log.error("stream failed alone (%s: %s); the batch goes on", type(exc).__name__, exc,
                  exc_info=not isinstance(exc, SteeringError))
        s.fail(exc)
        self.metrics.finished.labels(self.loaded.name, StopReason.FAILED).inc()

    def _admission(self, streams: list[Stream]) -> _Admission | None:
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

    def _prefill(self, prompts: list[list[int]], additions: list[RowSteering | None], pasts: list[Past | None]) -> Rows:
        """One forward pass over new rows: each prompt after its cached part, with its own steering."""
        lm = self.loaded
        deltas = stack_rows(additions, lm.hidden_size, lm.model.dtype, lm.device)
        return prefill(lm.model, lm.layers, prompts, deltas, lm.tokenizer.pad_token_id or 0,
                       row_switches(additions, lm.device), pasts)

    def _prefill_chunk(self, adm: _Admission) -> bool:
        """Run the next `prefill_chunk` tokens of every joiner row with more than that left, so a
        long prompt is prefilled between decoding steps rather than in one long stall. False when
        no row has that much left (the admission is ready to finish)."""
        chunk = self.settings.prefill_chunk
        done = [past_length(p) if p else 0 for p in adm.pasts]
        rows = [i for i, p in enumerate(adm.prompts) if chunk and len(p) - done[i] > chunk]
        if not rows:
            return False
        # Only a row that steers its prompt steers these positions; none of them is a prompt's last.
        additions = [a if a is not None and a.steer_prompt else None for a in (adm.additions[i] for i in rows)]
        try:
            part = self._prefill([adm.prompts[i][: done[i] + chunk] for i in rows], additions,
                                 [adm.pasts[i] for i in rows])
            for j, i in enumerate(rows):
                adm.pasts[i] = row_past(part, j, done[i] + chunk)
        except Exception as exc:  # the joiners' own forward pass: the running batch is not in it
            for s in adm.streams:
                self._fail(s, exc)
            adm.streams.clear()
        return True

    def _admit(self, adm: _Admission) -> tuple[Rows | None, list[Stream]]:
        """Prefill what is left of the joiners' prompts together; each one's gate picks the row it
        decodes with, and a stream monitoring KL splits its unsteered row off as its shadow.
        Returns the joined rows and their streams: a joiner that fails alone (its gate, say) is
        left out; a failed prefill fails every joiner."""
        lm, prompts = self.loaded, adm.prompts
        try:
            rows = self._prefill(prompts, adm.additions, adm.pasts)
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

    def _remember(self, rows: Rows, adm: _Admission) -> None:
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

    def _warm_step(self, w: _Warm | None) -> _Warm | None:
        """Prefill the next chunk of the prefix under way (or of the next waiting one); cache it
        once complete. Returns the prefix still under way, if any."""
        prefixes = self._prefixes
        assert prefixes is not None, "warm() queues nothing without a prefix cache"
        while w is None:
            try:
                item = self._warming.popleft()
            except IndexError:
                return None
            key = steering_key(item.steering)
            if item.cancelled.is_set() or not item.prompt_ids or prefixes.holds(key, item.prompt_ids):
                self._warm_finished()
            else:
                w = _Warm(item, key, prefixes.lookup(key, item.prompt_ids))
        item = w.warming
        ids, done, steering = item.prompt_ids, past_length(w.past) if w.past else 0, item.steering
        end = min(len(ids), done + WARM_CHUNK)
        try:  # none of these positions is a prompt's last: only a row that steers its prompt steers them
            with interrupt_when(self.loaded.layers, lambda: not self._jobs.empty() or item.cancelled.is_set()):
                rows = self._prefill([ids[:end]], [steering if steering is not None and steering.steer_prompt else None],
                                     [w.past])
        except Interrupted:  # a request came: this chunk runs again once the engine idles, if still wanted
            return w
        except Exception:  # only ever a speed-up: the turn it was for prefills as it would have anyway
            log.exception("warming a prefix of %d tokens failed; dropped", len(ids))
            self._warm_finished()
            return None
        w.past = row_past(rows, 0, end)
        self.metrics.prefix_tokens.labels(self.loaded.name, "warmed").inc(end - done)
        if end < len(ids):
            return w
        prefixes.store(w.key, ids, w.past)
        self._warm_finished()
        return None

    def _settle_warm(self, w: _Warm | None) -> _Warm | None:
        """A cancelled prefix under way is dropped, and what was computed of it cached: its turn
        has come, and begins with those tokens."""
        if w is None or not w.warming.cancelled.is_set():
            return w
        if w.past and self._prefixes is not None:
            self._prefixes.store(w.key, w.warming.prompt_ids[: past_length(w.past)], w.past)
        self._warm_finished()
        return None

    def _remember_reply(self, rows: Rows, row: int, s: Stream) -> None:
        """Cache a complete reply's keys and values with its prompt's, as the row leaves the
        batch: a conversation's next turn, whose prompt is this one and the reply and the child's
        next words, then prefills only the new words when it is steered the same way. Only a row
        steered at every position as its prompt was (unsteered, or steering its prompt at one
        alpha throughout) holds what a prefill of those tokens would give."""
        complete = s.ending is not None or s.reason in (StopReason.END_OF_TEXT, StopReason.LENGTH,
                                                         StopReason.STOP_SEQUENCE)
        steering = s.additions(s.main_steered)
        one_way = s.kl is None and (steering is None or steering.steer_prompt)  # KL re-injection changes alpha
        if self._prefixes is None or not complete or not one_way:
            return
        length = int(rows.mask[row].sum())  # the tokens fed so far: the prompt, then the reply's
        self._prefixes.store(steering_key(steering), (s.job.prompt_ids + s.generated)[:length],
                             row_past(rows, row, length))

    def _set_row(self, rows: Rows, row: int, steering: RowSteering | None) -> None:
        additions = steering.additions if steering else {}
        for layer, d in rows.deltas.items():
            d[row] = additions[layer].to(d.dtype) if layer in additions else 0

    def _step(self, batch: Rows, streams: list[Stream]) -> tuple[list[int], torch.Tensor, int]:
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

    def _drain(self, draining: list[Stream]) -> tuple[list[Stream], list[Stream]]:
        """Streams whose complete reply waits for the guard: (still waiting, restarting)."""
        for s in draining:
            try:
                self._account(s, s.drain())
            except Exception as exc:
                self._fail(s, exc)
        waiting = [s for s in draining if s.reason is None and not s.restarting]
        return waiting, [s for s in draining if s.restarting and s.reason is None]

    def _account(self, s: Stream, r: StepResult) -> None:
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
        # Set here: a helper thread may have lowered the default for new threads.
        torch.set_num_threads(self._threads)
        name, m = self.loaded.name, self.metrics
        eos = set(eos_ids(self.loaded))
        batch: Rows | None = None
        streams: list[Stream] = []  # one per batch row
        restarts: list[Stream] = []  # guarded streams waiting to join again, unsteered
        admitting: _Admission | None = None  # joiners being prefilled
        draining: list[Stream] = []  # complete replies waiting for the guard's last checks
        warm: _Warm | None = None  # the warming prefix under way
        recent: deque[tuple[float, int]] = deque()  # (time, tokens) over the last 10 s
        while not self._closing.is_set():
            # New jobs wait in the queue while an admission is under way.
            room = 0 if admitting else self.settings.max_batch - len(streams) - len(restarts) - len(draining)
            idle = batch is None and not restarts and not draining and not admitting
            jobs = self._take(room, wait=idle and warm is None and not self._warming)
            warm = self._settle_warm(warm)
            if draining:
                draining, back = self._drain(draining)
                restarts += back
                if batch is None and not restarts and not jobs and draining:  # nothing to decode meanwhile
                    futures.wait([s.guard.checking for s in draining if s.guard and s.guard.checking], timeout=0.05,
                                 return_when=futures.FIRST_COMPLETED)
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
                            for i in set(range(len(streams))) - set(live):
                                self._remember_reply(batch, i, streams[i])
                            streams = [streams[i] for i in live]
                            batch = select(batch, live) if live else None
                        if batch is not None:
                            decode(self.loaded.model, self.loaded.layers, batch, tokens[live])
                    elif admitting is None and not restarts and not draining and (warm or self._warming):
                        warm = self._warm_step(warm)
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

    def _streams(self, jobs: list[Job], eos: set[int]) -> list[Stream]:
        streams = []
        for job in jobs:
            try:
                streams.append(Stream(self.loaded, job, eos, self._checks, self._shadow_forward))
            except Exception as exc:
                log.error("could not start a stream: %s", exc)
                tell(job, Failed(exc))
        return streams
