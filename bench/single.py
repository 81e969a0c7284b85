"""One stream at a time, in process: our engine in each configuration and the peers on the
same model, prompts, layers, vector and alpha. Every configuration decodes exactly the same
number of tokens per prompt (end-of-text suppressed until then), greedily.

Each measure runs while no other thread holds an OpenMP team (steering/threads.py): the
bench's main thread runs single-threaded, an engine lives for one measure, and a peer runs
on a thread that ends with its run. Otherwise an idle engine's team would slow whatever runs
beside it, by up to half."""

import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from generator.engine import Engine, EngineSettings
from generator.job import GateConfig, Job, KlConfig, Steering
from generator.events import Event, Finished, TextDelta
from steering.gate import concept_token_ids
from steering.generate import render_prompt
from steering.guard import ThemeGuard
from steering.loading import LoadedModel
from steering.threads import in_passing_thread
from steering.pairs import load_concept
from steering.vector import ConceptVector

Runner = Callable[[list[int]], tuple[int, str]]  # prompt ids -> (tokens generated, text)


@dataclass(frozen=True)
class Case:
    name: str
    run: Runner


def prompt_ids(loaded: LoadedModel, prompts: list[str]) -> list[list[int]]:
    tok = loaded.tokenizer
    return [tok(render_prompt(loaded, p), add_special_tokens=not loaded.has_chat_template)["input_ids"] for p in prompts]


def _complete(engine: Engine, ids: list[int], steering: Steering | None, **job: Any) -> tuple[Finished, str]:
    """Run one job on the engine to its end: its Finished event and its text."""
    done, parts, finished = threading.Event(), [], []

    def emit(event: Event) -> None:
        if isinstance(event, TextDelta):
            parts.append(event.text)
        elif isinstance(event, Finished):
            finished.append(event)
            done.set()

    engine.submit(Job(ids, emit, steering, **job))
    if not done.wait(600):
        raise TimeoutError("the engine did not finish a benchmark job in 10 minutes")
    return finished[0], "".join(parts)


def _engine_runner(loaded: LoadedModel, threads: int, tokens: int, steering: Steering | None, gate: bool,
                   kl: bool) -> Runner:
    """An engine of its own for each run (no prefix cache: every run prefills its prompt, as
    the peers do), closed when the run ends, so no idle engine's team outlives it."""
    def run(ids: list[int]) -> tuple[int, str]:
        engine = Engine(loaded, EngineSettings(max_batch=1, max_queue=4, prefix_cache_mb=0, threads=threads))
        try:
            finished, text = _complete(engine, ids, steering, max_tokens=tokens, min_tokens=tokens,
                                       gate=GateConfig(gate), kl=KlConfig(enabled=kl, threshold=0.0))
        finally:
            engine.close()
        return finished.completion_tokens, text

    return run


def our_cases(loaded: LoadedModel, cv: ConceptVector, alpha: float, one_layer: int, tokens: int, pairs_dir,
              threads: int) -> list[Case]:
    band = loaded.steering_layers
    words = concept_token_ids(loaded, cv, load_concept(pairs_dir, cv.concept).words)

    def steering(layers: tuple[int, ...]) -> Steering:
        return Steering(cv.concept, {layer: cv.directions[layer] for layer in layers}, alpha, alpha * 2, words)

    def runner(st: Steering | None, gate: bool = False, kl: bool = False) -> Runner:
        return _engine_runner(loaded, threads, tokens, st, gate, kl)

    return [
        Case("unsteered", runner(None)),
        Case("steered_one_layer", runner(steering((one_layer,)))),
        Case("steered_band", runner(steering(band))),
        Case("steered_band_kl", runner(steering(band), kl=True)),
        Case("steered_band_gate", runner(steering(band), gate=True)),
    ]


def faster_cases(loaded: LoadedModel, cv: ConceptVector | None, alpha: float, tokens: int, threads: int) -> list[Case]:
    """A faster registered model (its own fingerprint, vectors and record) in our engine,
    unsteered and steered with its own vector, to set beside plain generate of the fp32 model."""
    cases = [Case(f"{loaded.name}_unsteered", _engine_runner(loaded, threads, tokens, None, False, False))]
    if cv is not None:
        band = loaded.steering_layers
        st = Steering(cv.concept, {layer: cv.directions[layer] for layer in band}, alpha, alpha * 2, frozenset())
        cases.append(Case(f"{loaded.name}_steered_band", _engine_runner(loaded, threads, tokens, st, False, False)))
    return cases


# ---- the peers ------------------------------------------------------------------------


def _hf_generate(model, tokens: int, tokenizer) -> Runner:
    def run(ids: list[int]) -> tuple[int, str]:
        x = torch.tensor([ids], device=model.device)
        with torch.no_grad():
            out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=tokens,
                                 min_new_tokens=tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        new = out[0, len(ids):].tolist()
        return len(new), tokenizer.decode(new, skip_special_tokens=True)

    return run


def peer_cases(loaded: LoadedModel, cv: ConceptVector, alpha: float, tokens: int) -> tuple[list[Case], dict[str, str]]:
    """Plain transformers, repeng and steering-vectors; a peer that is not installed (outside
    the bench environment) is reported, not measured."""
    model, tok = loaded.model, loaded.tokenizer
    band = loaded.steering_layers
    cases = [Case("transformers_generate", _hf_generate(model, tokens, tok))]
    missing: dict[str, str] = {}
    try:
        from repeng import ControlModel, ControlVector

        def repeng_run(ids: list[int]) -> tuple[int, str]:
            wrapped = ControlModel(model, list(band))
            try:
                vector = ControlVector(model.config.model_type, {layer: cv.directions[layer].numpy() for layer in band})
                wrapped.set_control(vector, coeff=alpha)
                return _hf_generate(wrapped, tokens, tok)(ids)
            finally:
                wrapped.unwrap()

        cases.append(Case("repeng", repeng_run))
    except ImportError as exc:
        missing["repeng"] = f"not installed ({exc}); `make bench` installs it in .venv-bench"
    try:
        from steering_vectors import SteeringVector

        sv = SteeringVector({layer: cv.directions[layer].clone() for layer in band}, layer_type="decoder_block")

        def sv_run(ids: list[int]) -> tuple[int, str]:
            with sv.apply(model, multiplier=alpha):
                return _hf_generate(model, tokens, tok)(ids)

        cases.append(Case("steering_vectors", sv_run))
    except ImportError as exc:
        missing["steering_vectors"] = f"not installed ({exc}); `make bench` installs it in .venv-bench"
    return cases, missing


def measure(cases: list[Case], prompts: list[list[int]], runs: int, threads: int) -> dict[str, dict]:
    """Each case over all prompts, `runs` times, interleaved so drift hits every case alike;
    each run on a thread that ends with it."""
    rates: dict[str, list[float]] = {c.name: [] for c in cases}
    texts: dict[str, list[str]] = {}
    for c in cases:  # warm-up: allocator, first-use lookups
        in_passing_thread(c.run, prompts[0], threads=threads)
    for _ in range(runs):
        for c in cases:
            n, start, out = 0, time.perf_counter(), []
            for ids in prompts:
                k, text = in_passing_thread(c.run, ids, threads=threads)
                n += k
                out.append(text)
            rates[c.name].append(n / (time.perf_counter() - start))
            texts[c.name] = out
    return {name: {"runs_tokens_per_s": [round(r, 2) for r in rs], "texts": texts[name]} for name, rs in rates.items()}


def first_token(loaded: LoadedModel, steering: Steering, prompts: list[list[int]], threads: int) -> dict[str, dict]:
    """Time to first token in process, one steered request at a time: the engine with its prefix
    cache off and on, as a request to the service is by default (the skip gate off), and with the
    cache on behind the gate (the default until the gate was measured never to skip). One engine
    after another, so only the measured one holds an OpenMP team. Every prompt is new to every
    engine; the cache can only reuse what the prompts share (the system prompt and the chat
    template's start)."""
    cases = {"prefix_cache_off": (0, False), "prefix_cache_on": (EngineSettings.prefix_cache_mb, False),
             "prefix_cache_on_gate_on": (EngineSettings.prefix_cache_mb, True)}
    out = {}
    for name, (mb, gate) in cases.items():
        engine = Engine(loaded, EngineSettings(max_batch=1, max_queue=4, prefix_cache_mb=mb, threads=threads))
        try:  # the first prompt warms the engine up
            times = [_complete(engine, ids, steering, max_tokens=4, gate=GateConfig(gate))[0].time_to_first_token_ms
                     for ids in prompts][1:]
        finally:
            engine.close()
        out[name] = {"p50_ms": round(statistics.median(times), 1), "runs": len(times),
                     "prompt_tokens": round(statistics.mean(map(len, prompts[1:])), 1)}
    return out


def guard_hold(loaded: LoadedModel, guard: ThemeGuard, prompts: list[list[int]], streams: int, tokens: int,
               runs: int, threads: int) -> dict[str, object]:
    """`streams` unsteered streams at once, each `tokens` long; in every other run the first of
    them has the content guard, which holds its text and checks it sentence by sentence. What
    the others decode per second, with and without that guarded neighbour, interleaved."""
    engine = Engine(loaded, EngineSettings(max_batch=streams, max_queue=streams, prefix_cache_mb=0, threads=threads))
    rates: dict[str, list[float]] = {"without": [], "with": []}
    try:
        for run in range(2 * runs + 1):  # the first warms up
            side = "with" if run % 2 else "without"
            dones = [threading.Event() for _ in range(streams)]
            ends: list[float] = [0.0] * streams
            counts = [0] * streams

            def emit_for(i: int) -> Callable[[Event], None]:
                def emit(event: Event) -> None:
                    if isinstance(event, Finished):
                        counts[i], ends[i] = event.completion_tokens, time.perf_counter()
                        dones[i].set()
                return emit

            start = time.perf_counter()
            for i in range(streams):
                engine.submit(Job(prompts[i % len(prompts)], emit_for(i), max_tokens=tokens, min_tokens=tokens,
                                  guard=guard if side == "with" and i == 0 else None))
            if not all(d.wait(600) for d in dones):
                raise TimeoutError("a benchmark stream did not finish in 10 minutes")
            if run:
                rates[side].append(sum(counts[1:]) / (max(ends[1:]) - start))
    finally:
        engine.close()
    med = {side: statistics.median(r) for side, r in rates.items()}
    return {"streams": streams, "tokens": tokens, "runs": runs,
            "others_tokens_per_s": {side: round(m, 2) for side, m in med.items()},
            "runs_tokens_per_s": {side: [round(x, 2) for x in r] for side, r in rates.items()},
            "drop": round(1 - med["with"] / med["without"], 3)}


def join_stall(loaded: LoadedModel, steering: Steering, runner_ids: list[int], long_ids: list[int], runs: int,
               threads: int, chunk: int = EngineSettings.prefill_chunk) -> dict[str, object]:
    """One stream decodes; a steered request with a long prompt joins it. The
    running stream's longest wait between two tokens while the joiner is prefilled, and the
    joiner's time to first token: its prompt prefilled at once, and `chunk` tokens per step.
    Each run has an engine of its own, so only the measured one holds an OpenMP team."""
    sides = {"at_once": 0, f"in_chunks_of_{chunk}": chunk}
    gaps: dict[str, list[float]] = {name: [] for name in sides}
    firsts: dict[str, list[float]] = {name: [] for name in sides}
    for run in range(runs + 1):  # the first warms up
        for name, c in sides.items():
            engine = Engine(loaded, EngineSettings(max_batch=2, max_queue=4, prefix_cache_mb=0, prefill_chunk=c,
                                                   threads=threads))
            try:
                stamps: list[float] = []
                started, done, finished = threading.Event(), threading.Event(), threading.Event()
                first_ms: list[float] = []

                def runner(event: Event) -> None:
                    if isinstance(event, TextDelta):
                        stamps.append(time.perf_counter())
                        started.set()
                    elif isinstance(event, Finished):
                        done.set()

                def joiner(event: Event) -> None:
                    if isinstance(event, Finished):
                        first_ms.append(event.time_to_first_token_ms)
                        finished.set()

                running = Job(runner_ids, runner, max_tokens=1000, min_tokens=1000)
                engine.submit(running)
                if not started.wait(600):
                    raise TimeoutError("the running stream never started")
                time.sleep(0.3)
                joined = time.perf_counter()
                engine.submit(Job(long_ids, joiner, steering, max_tokens=4, min_tokens=4))
                if not finished.wait(600):
                    raise TimeoutError("the joiner did not finish")
                running.cancelled.set()
                if not done.wait(600):
                    raise TimeoutError("the running stream did not end")
                # From the join to the runner's first token after the joiner's first.
                until, after = joined + first_ms[0] / 1000, [t for t in stamps if t > joined]
                window = [joined] + [t for t in after if t <= until] + [t for t in after if t > until][:1]
                if run:
                    gaps[name].append(max(b - a for a, b in zip(window, window[1:])) * 1000)
                    firsts[name].append(first_ms[0])
            finally:
                engine.close()
    return {"joiner_prompt_tokens": len(long_ids), "runs": runs,
            **{name: {"runner_longest_gap_ms": round(statistics.median(gaps[name]), 1),
                      "joiner_ttft_ms": round(statistics.median(firsts[name]), 1)} for name in sides}}
