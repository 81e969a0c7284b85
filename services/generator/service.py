"""The generator's domain side: which models and vectors it serves, how a request becomes a
job, and the bridge from the engine thread to an async stream. No gRPC here: the servicer
converts protobuf to these calls and back."""

import asyncio
import logging
import math
import threading
import time
from concurrent import futures
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from steering.config import SteerConfig
from steering.errors import ConfigError, FailedPrecondition, InvalidArgument, NotFoundError, SteeringError, Unavailable
from steering.gate import DEFAULT_THRESHOLD, concept_token_ids
from steering.generate import MIN_TEMPERATURE, render_prompt
from steering.guard import ThemeGuard, holds_sentence
from steering.loading import LoadedModel
from steering.pairs import load_concept
from steering.profiles import Profile, alpha_ceiling, check_concept_name, load_profile_vectors, served_alpha
from steering.record import BlipServing, ConceptState, Steerability, assess
from steering.threads import single_threaded
from steering.vector import ConceptVector
from steering.vocabulary import CONTEXT_TURNS, Mode, instructed

from .engine import Engine, EngineSettings
from .job import GateConfig, Job, KlConfig, Sampling, Steering, Warming, row_steering
from .events import Event, Failed, Finished, Notice, TextDelta
from .metrics import GeneratorMetrics
from .policy import Policy

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
MAX_PROMPT_CHARS = 8000
MAX_MESSAGES = 64
MAX_TOKENS_LIMIT = 512
DEFAULT_MAX_TOKENS = 128
MAX_STOP = 4
MAX_STOP_CHARS = 64
HISTORY_TURNS = 6  # earlier messages a Chat reply sees


@dataclass
class ModelSlot:
    """One loaded model with what this profile may serve from it."""

    loaded: LoadedModel
    engine: Engine
    vectors: dict[str, ConceptVector]
    refused: dict[str, str]
    steerability: Steerability
    pairs_dir: Path
    words: dict[str, frozenset[int]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def concept_words(self, concept: str) -> frozenset[int]:
        with self.lock:  # computed once per concept, on first use
            if concept not in self.words:
                words = load_concept(self.pairs_dir, concept).words
                self.words[concept] = concept_token_ids(self.loaded, self.vectors[concept], words)
            return self.words[concept]


def open_slot(
    loaded: LoadedModel, profile: Profile, vectors_dir: Path, pairs_dir: Path, engine: EngineSettings,
    metrics: GeneratorMetrics,
) -> ModelSlot:
    model_dir = vectors_dir / loaded.name
    vectors, refused = load_profile_vectors(
        profile, model_dir, fingerprint=loaded.fingerprint, hidden_size=loaded.hidden_size, layers=loaded.steering_layers
    )
    steerability = assess(loaded.name, model_dir, loaded.fingerprint, vectors)
    return ModelSlot(loaded, Engine(loaded, engine, metrics), vectors, refused, steerability, pairs_dir)


def concept_config(slot: ModelSlot, state: ConceptState) -> SteerConfig:
    """How a concept is steered on this model: its record's configuration, or for a record from
    before the search the model's default band at a uniform alpha."""
    return state.config or SteerConfig(slot.loaded.steering_layers)


@dataclass(frozen=True)
class GenerateSpec:
    model: str = ""
    prompt: str | None = None
    messages: tuple[tuple[str, str], ...] | None = None  # (role, content)
    concept: str | None = None
    tag: str | None = None
    alpha: float | None = None
    sampling: Sampling = Sampling()
    max_tokens: int = 0
    stop: tuple[str, ...] = ()
    gate: GateConfig = GateConfig()
    kl: KlConfig = KlConfig()
    # Set by Chat only, from the concept's record (`chat_serving`); a Generate request steers.
    mode: Mode = Mode.STEER


@dataclass(frozen=True)
class TagResult:
    label: str
    confidence: float
    scores: dict[str, float]


@dataclass(frozen=True)
class ChatTag:
    tag: TagResult


@dataclass(frozen=True)
class ChatConcept:
    concept: str  # "" = no steering and no instruction


def _finite(name: str, value: float, low: float, high: float) -> float:
    if not math.isfinite(value) or not low <= value <= high:
        raise InvalidArgument(f"{name} must be a number between {low:g} and {high:g}, got {value!r}")
    return value


def _reason(exc: SteeringError) -> str:
    """InvalidArgument -> invalid_argument: the metrics label of a refusal."""
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in type(exc).__name__).lstrip("_")


class GeneratorService:
    def __init__(
        self, slots: dict[str, ModelSlot], default: str, profile: Profile, policy: Policy, metrics: GeneratorMetrics,
        guard: ThemeGuard | None,
    ) -> None:
        if profile is Profile.BLIP and guard is None:
            raise ConfigError("the Blip profile always runs the content guard; it cannot be switched off")
        self.guard = guard  # checks every reply at sentence boundaries; None only in the personal profile
        self.slots = slots
        self.metrics = metrics
        self.default = default
        self.profile = profile
        self.policy = policy
        # Requests are tokenised and their steering built here, off the event loop; single-threaded,
        # so the engines' threads keep the process's OpenMP teams (steering/threads.py).
        self._preparing = futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="prepare",
                                                     initializer=single_threaded)

    def close(self) -> None:
        """Stop every model's engine (their running streams end as cancelled)."""
        for slot in self.slots.values():
            slot.engine.close()
        self._preparing.shutdown(wait=False, cancel_futures=True)

    def slot(self, name: str) -> ModelSlot:
        name = name or self.default
        if name not in self.slots:
            raise NotFoundError(f"model {name!r} is not served here; served: {', '.join(sorted(self.slots))}")
        return self.slots[name]

    def unserved_policy_tags(self, name: str = "") -> dict[str, str]:
        """Tags the policy maps to a concept Chat does not serve on the model in any mode (tag -> why):
        a child's turn with such a tag gets a plain reply."""
        slot = self.slot(name)
        unserved = {}
        for tag, concept in self.policy.concepts.items():
            if concept is None:
                continue
            try:
                self.chat_serving(slot, concept)
            except SteeringError as exc:
                unserved[tag] = str(exc)
        return unserved

    # request -> job ----------------------------------------------------------------

    def _prompt_ids(self, slot: ModelSlot, spec: GenerateSpec) -> list[int]:
        if (spec.prompt is None) == (spec.messages is None):
            raise InvalidArgument("send either a prompt or chat messages")
        if spec.prompt is not None:
            if not spec.prompt.strip():
                raise InvalidArgument("prompt is empty")
            if len(spec.prompt) > MAX_PROMPT_CHARS:
                raise InvalidArgument(f"prompt is {len(spec.prompt)} characters; the limit is {MAX_PROMPT_CHARS}")
            rendered = render_prompt(slot.loaded, spec.prompt)
        else:
            msgs = spec.messages or ()
            if not msgs:
                raise InvalidArgument("messages is empty: send at least one user message")
            if len(msgs) > MAX_MESSAGES:
                raise InvalidArgument(f"{len(msgs)} messages; the limit is {MAX_MESSAGES}")
            bad = [role for role, _ in msgs if role not in ROLES]
            if bad:
                raise InvalidArgument(f"unknown message role {bad[0]!r}; roles are {', '.join(ROLES)}")
            if sum(len(c) for _, c in msgs) > MAX_PROMPT_CHARS:
                raise InvalidArgument(f"messages are longer than {MAX_PROMPT_CHARS} characters in all")
            if not any(c.strip() for role, c in msgs if role == "user"):
                raise InvalidArgument("messages hold no user text")
            rendered = render_prompt(slot.loaded, [{"role": r, "content": c} for r, c in msgs])
        ids = slot.loaded.tokenizer(rendered, add_special_tokens=not slot.loaded.has_chat_template)["input_ids"]
        return list(ids)

    def _concept(self, spec: GenerateSpec) -> str | None:
        if spec.concept and spec.tag:
            raise InvalidArgument("send a concept or a tag, not both")
        if spec.tag:
            if spec.tag not in self.policy.concepts:
                raise InvalidArgument(f"unknown tag {spec.tag!r}")
            return self.policy.concept_for(spec.tag)
        if spec.concept:
            return check_concept_name(spec.concept, self.profile)
        return None

    def concept_state(self, slot: ModelSlot, concept: str) -> ConceptState:
        if not slot.steerability.steerable:
            raise FailedPrecondition(f"model {slot.loaded.name!r} is not steerable: {slot.steerability.reason}")
        if concept in slot.refused:
            raise FailedPrecondition(f"concept {concept!r} is refused on {slot.loaded.name}: {slot.refused[concept]}")
        state = slot.steerability.concepts.get(concept)
        if state is None:
            raise NotFoundError(f"no vector for concept {concept!r} on {slot.loaded.name}")
        if not state.servable:
            raise FailedPrecondition(f"concept {concept!r} is not servable on {slot.loaded.name}: {state.reason}")
        if self.profile is Profile.BLIP and state.child_safe_alpha is None:
            raise FailedPrecondition(
                f"concept {concept!r} has no child-safe alpha on {slot.loaded.name}: steered replies raised more guard "
                "flags or repeats than unsteered ones at every swept alpha, or the record predates the guard; "
                "re-run `steer validate`"
            )
        if served_alpha(state, self.profile) is None:
            at = state.effect_at(alpha_ceiling(state, self.profile))
            measured = f" (d {at.d:.2f}, 95% interval {at.low:.2f} to {at.high:.2f}, n {at.n})" if at else ""
            raise FailedPrecondition(
                f"concept {concept!r} is not servable on {slot.loaded.name} in the {self.profile} profile: no alpha at or "
                f"under its child-safe alpha {state.child_safe_alpha:g} moves the register past the effect-size gate{measured}"
            )
        return state

    def chat_serving(self, slot: ModelSlot, concept: str) -> BlipServing:
        """How a Chat reply reaches `concept`'s register: the mode the record chose for Blip
        (steering, the instruction, or both). The personal profile also steers a concept the
        record measured for steering only. FailedPrecondition: the turn is answered plainly."""
        state = slot.steerability.concepts.get(concept)
        if state is not None and state.blip is not None and not slot.refused.get(concept) and slot.steerability.steerable:
            return state.blip
        state = self.concept_state(slot, concept)  # says why the concept is not served
        served = served_alpha(state, self.profile)
        if self.profile is Profile.BLIP or served is None:
            raise FailedPrecondition(
                f"concept {concept!r} is not served to a child on {slot.loaded.name}: neither steering, nor its register "
                "instruction, nor both passed the effect-size gate at a child-safe setting in its validation record"
            )
        effect = state.effect_at(served)
        assert effect is not None, "a served alpha is one of the record's swept points"
        return BlipServing(Mode.STEER, served, self.ceiling(state), effect)

    def ceiling(self, state: ConceptState) -> float:
        """The largest |alpha| served for a concept here; 0 when it is not served at all."""
        if served_alpha(state, self.profile) is None:
            return 0.0
        return alpha_ceiling(state, self.profile)

    def _negative_ceiling(self, state: ConceptState, alpha: float) -> float:
        """The largest |alpha| served when steering away from a concept, or a refusal: Blip never
        steers away (minus-kind is unkind), the personal profile only where the record measured it."""
        if self.profile is Profile.BLIP:
            raise InvalidArgument(
                f"alpha {alpha:g} is negative: the Blip profile only steers toward a concept (alpha > 0), because "
                f"steering away from {state.concept!r} was never validated for a child; send a positive alpha or none"
            )
        if state.negative_max_alpha is None:
            raise FailedPrecondition(
                f"alpha {alpha:g} steers away from {state.concept!r}, a direction its validation record has not "
                f"passed (negative direction: {state.negative_status}); run `steer validate --negative "
                f"--concepts {state.concept}` or send a positive alpha"
            )
        return float(state.negative_max_alpha)

    def _both_steering(self, slot: ModelSlot, concept: str) -> Steering:
        """Chat's steering beside the register instruction: the alpha and bound its record measured
        for the two together, which need not pass for steering alone."""
        serving = self.chat_serving(slot, concept)
        state = slot.steerability.concepts[concept]
        if serving.mode is not Mode.BOTH or serving.alpha is None or serving.ceiling is None:
            raise ValueError(f"concept {concept!r} is not served with its instruction and steering together")
        return self._steering_at(slot, state, serving.alpha, serving.ceiling)

    def _steering_at(self, slot: ModelSlot, state: ConceptState, alpha: float, max_alpha: float) -> Steering:
        cv = slot.vectors[state.concept]
        config = concept_config(slot, state)
        per_unit = {layer: share * cv.directions[layer] for layer, share in config.layer_alphas(cv, 1.0).items()}
        return Steering(state.concept, per_unit, alpha, max_alpha, slot.concept_words(state.concept), config)

    def _steering(self, slot: ModelSlot, concept: str, alpha: float | None) -> Steering:
        state = self.concept_state(slot, concept)
        max_alpha = alpha_ceiling(state, self.profile)
        if alpha is None:
            served = served_alpha(state, self.profile)
            if served is None:  # concept_state refuses a concept this profile does not serve
                raise ValueError(f"concept {concept!r} has no alpha served in the {self.profile} profile")
            alpha = float(served)
        _finite("alpha", alpha, -math.inf, math.inf)
        what = "child-safe ceiling" if max_alpha != state.max_alpha else "validated max_alpha"
        if alpha < 0:
            max_alpha, what = self._negative_ceiling(state, alpha), "validated max_alpha away from it"
        if abs(alpha) > max_alpha:
            raise InvalidArgument(f"alpha {alpha:g} is beyond concept {concept!r}'s {what} {max_alpha:g}")
        return self._steering_at(slot, state, alpha, max_alpha)

    def _as_chat_answers(self, slot: ModelSlot, spec: GenerateSpec) -> GenerateSpec:
        """A request by tag is answered as Chat answers that tag: the policy's concept in the mode
        its record serves, the register instruction (prompt and both modes) added to the system prompt."""
        concept = self.policy.concept_for(spec.tag or "")
        if spec.concept or not concept:
            return spec  # a concept and a tag together, an unknown tag, or none: _concept says so
        serving = self.chat_serving(slot, concept)
        alpha = spec.alpha if spec.alpha is not None and serving.mode is Mode.STEER else serving.alpha
        spec = replace(spec, mode=serving.mode, alpha=alpha)
        if not serving.instruction or (spec.prompt is None) == (spec.messages is None):
            return spec
        messages = spec.messages if spec.messages is not None else (("user", spec.prompt or ""),)
        if messages and messages[0][0] == "system":
            return replace(spec, messages=(("system", instructed(messages[0][1], serving.instruction)), *messages[1:]))
        return replace(spec, prompt=None, messages=(("system", serving.instruction), *messages))

    def build_job(self, spec: GenerateSpec, emit: Callable[[Event], None], deadline: float | None) -> tuple[ModelSlot, Job]:
        slot = self.slot(spec.model)
        if spec.tag:
            spec = self._as_chat_answers(slot, spec)
        s = spec.sampling
        if not math.isfinite(s.temperature) or not (s.temperature == 0 or MIN_TEMPERATURE <= s.temperature <= 5):
            raise InvalidArgument(
                f"temperature must be 0 (greedy) or between {MIN_TEMPERATURE:g} and 5, got {s.temperature!r}: "
                "a smaller one overflows the logits"
            )
        sampling = Sampling(s.temperature, _finite("top_p", s.top_p, 1e-6, 1), s.seed)
        max_tokens = spec.max_tokens or DEFAULT_MAX_TOKENS
        if not 1 <= max_tokens <= MAX_TOKENS_LIMIT:
            raise InvalidArgument(f"max_tokens must be between 1 and {MAX_TOKENS_LIMIT}")
        if len(spec.stop) > MAX_STOP or any(not x or len(x) > MAX_STOP_CHARS for x in spec.stop):
            raise InvalidArgument(f"at most {MAX_STOP} stop sequences of 1 to {MAX_STOP_CHARS} characters")
        gate = GateConfig(spec.gate.enabled, _finite("gate threshold", spec.gate.threshold or DEFAULT_THRESHOLD, 0, 1))
        kl = spec.kl
        if kl.enabled:
            _finite("kl window", kl.window, 1, 256)
            _finite("kl threshold", kl.threshold, 0, 1e6)
            _finite("kl alpha_step", kl.alpha_step, 0, 1e6)
            _finite("kl every", kl.every, 1, 1024)
        prompt_ids = self._prompt_ids(slot, spec)
        limit = getattr(slot.loaded.model.config.get_text_config(), "max_position_embeddings", None) or 8192
        if len(prompt_ids) + max_tokens > limit:
            raise InvalidArgument(f"prompt ({len(prompt_ids)} tokens) plus max_tokens exceeds the model's {limit}")
        concept = self._concept(spec)
        mode = spec.mode if concept else Mode.NONE
        steering = None
        if mode is Mode.STEER and concept:
            steering = self._steering(slot, concept, spec.alpha)
        elif mode is Mode.BOTH and concept:
            steering = self._both_steering(slot, concept)
        job = Job(prompt_ids, emit, steering, sampling, max_tokens, spec.stop, gate, kl, deadline=deadline, guard=self.guard,
                  mode=mode, instructed=concept if mode is Mode.PROMPT and concept else "")
        return slot, job

    # streaming -----------------------------------------------------------------------

    async def stream(self, spec: GenerateSpec, timeout_s: float | None = None) -> AsyncIterator[Event]:
        """Run a request on its model's engine; closing the iterator cancels the job."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()

        def emit(event: Event) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the caller's event loop is gone: nobody is listening any more
                job.cancelled.set()

        deadline = time.monotonic() + timeout_s if timeout_s is not None else None
        # Tokenising and a concept's first word lookup take real time: keep them off the event loop.
        try:
            slot, job = await loop.run_in_executor(self._preparing, self.build_job, spec, emit, deadline)
            slot.engine.submit(job)
        except SteeringError as exc:
            self.metrics.refusals.labels(_reason(exc)).inc()
            raise
        try:
            while True:
                event = await events.get()
                if isinstance(event, Failed):
                    raise event.error
                yield event
                if isinstance(event, Finished):
                    return
        finally:
            job.cancelled.set()  # a client that went away stops the job within one token

    def _chat_spec(self, base: GenerateSpec, history: list[tuple[str, str]], text: str, concept: str | None,
                   serving: BlipServing | None) -> GenerateSpec:
        """A Chat reply's request: Blip's system prompt (with the register instruction in prompt
        and both modes), the recent history and the child's words, steered as `serving` says."""
        system = instructed(self.policy.system_prompt, serving.instruction if serving else "")
        messages = [("system", system)] if system else []
        messages += history[-HISTORY_TURNS:] + [("user", text)]
        return GenerateSpec(
            model=base.model, messages=tuple(messages), concept=concept, sampling=base.sampling,
            max_tokens=base.max_tokens, stop=base.stop, gate=base.gate, kl=base.kl,
            alpha=serving.alpha if serving else None, mode=serving.mode if serving else Mode.NONE,
        )

    def warm_chat(self, base: GenerateSpec, history: list[tuple[str, str]], cancelled: threading.Event,
                  last: str | None = None) -> None:
        """Have the engine prefill, while it idles, how a conversation's next prompt begins under
        each concept the policy may pick, up to where the child's next words go: the next turn
        then prefills only those words, whichever concept its tag picks. A child listens to a
        reply and answers in seconds; the prefills take a fraction of a second each. First the
        last turn's concept (a mood lasts; its reply is mostly cached already), then a plain
        reply (a turn tagged none, or one whose concept is not served), then the rest. Only ever a speed-up: a failure is
        logged, and `cancelled` (set when the turn arrives) stops what has not run."""
        try:
            slot = self.slot(base.model)
            for concept in dict.fromkeys([last, None, *self.policy.concepts.values()]):
                serving = None
                if concept:
                    try:
                        serving = self.chat_serving(slot, concept)
                    except SteeringError:  # Chat answers this concept's turns plainly
                        concept = None
                _, job = self.build_job(self._chat_spec(base, history, "a", concept, serving), lambda _: None, None)
                # The tokens both placeholders' prompts share: all before the child's words.
                other = self._prompt_ids(slot, self._chat_spec(base, history, "b", concept, serving))
                shared = next((i for i, (x, y) in enumerate(zip(job.prompt_ids, other)) if x != y), len(other))
                steering = row_steering(job.steering, job.steering.alpha) if job.steering else None
                slot.engine.warm(Warming(job.prompt_ids[:shared], steering, cancelled))
        except Exception:
            log.exception("could not warm the prefix cache for a Chat's next turn; it prefills in full")

    async def chat(
        self,
        turns: AsyncIterator[tuple[str, GenerateSpec]],
        tag: Callable[[str, list[str]], Awaitable[TagResult]],
        fail_fast: bool = False,
    ) -> AsyncIterator[ChatTag | ChatConcept | Event]:
        """A Blip conversation: tag each child turn, pick the concept, stream the reply.
        `turns` yields (child text, base spec for its reply); history lives in this call."""
        history: list[tuple[str, str]] = []
        child_turns: list[str] = []
        warming = threading.Event()  # set when the turn the warmed prefixes were for arrives
        loop = asyncio.get_running_loop()
        try:
            async for text, base in turns:
                arrived = time.perf_counter()
                warming.set()
                if not text.strip():
                    raise InvalidArgument("turn text is empty: send the child's words")
                concept: str | None = None
                serving: BlipServing | None = None
                notice = ""
                try:
                    result = await tag(text, child_turns[-CONTEXT_TURNS:])
                    yield ChatTag(result)
                    concept = self.policy.concept_for(result.label)
                except Unavailable as exc:
                    if fail_fast:
                        raise
                    notice = f"tagger unavailable ({exc}): replying without steering"
                if concept:
                    try:
                        serving = self.chat_serving(self.slot(base.model), concept)
                    except FailedPrecondition as exc:
                        notice, concept = f"replying without steering: {exc}", None
                yield ChatConcept(concept or "")
                if notice:
                    yield Notice(notice)
                spec = self._chat_spec(base, history, text, concept, serving)
                reply = []
                slot = self.slot(base.model)
                first_sentence = slot.engine.metrics.time_to_first_sentence.labels(slot.loaded.name)
                waiting = True
                async for event in self.stream(spec):
                    if isinstance(event, TextDelta):
                        reply.append(event.text)
                    if waiting and (isinstance(event, Finished) or (isinstance(event, TextDelta) and holds_sentence("".join(reply)))):
                        first_sentence.observe(time.perf_counter() - arrived)
                        waiting = False
                    yield event
                history += [("user", text), ("assistant", "".join(reply))]
                child_turns.append(text)
                warming = threading.Event()
                loop.run_in_executor(self._preparing, self.warm_chat, base, list(history), warming, concept)
        finally:
            warming.set()
