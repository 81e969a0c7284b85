"""The prefix cache: what it keeps and answers, that a prefill from cached keys and values
equals one from scratch (tiny models), and that the engine's replies are the same with the
cache as without it while it really skips the shared tokens, prefilled ahead (warmed) or not
(the real SmolLM2)."""

import threading
import time

import pytest
import torch

from steering.batch import caches_prefixes, decode, past_length, prefill, row_past
from generator.engine import WARM_CHUNK, Engine, EngineSettings
from generator.job import GateConfig, Job, KlConfig, Steering, Warming, row_steering
from generator.prefix import PrefixCache, steering_key
from steering.generate import render_prompt
from steering.hooks import RowSteering
from steering.layers import resolve_layers
from steering.store import read_vector
from collector import Collector
from tiny_models import HIDDEN_SIZE, tiny_model


def _past(tokens: int, value: float = 0.0, layers: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    t = torch.full((1, 2, tokens, 4), value)
    return [(t.clone(), t.clone()) for _ in range(layers)]


def test_the_longest_cached_prefix_shorter_than_the_prompt_answers() -> None:
    cache = PrefixCache(budget_bytes=10**6, block=4)
    prompt = list(range(100, 111))  # 11 tokens
    cache.store(None, prompt, _past(11, 1.0))
    assert past_length(cache.lookup(None, prompt + [7, 8])) == 11  # the whole stored prompt
    assert past_length(cache.lookup(None, prompt)) == 8  # never the whole prompt: its last token is run
    assert past_length(cache.lookup(None, prompt[:6] + [1, 2, 3])) == 4  # a shared start, to a block boundary
    assert cache.lookup(None, [1] + prompt) is None  # prefixes only
    assert cache.lookup(("steered", False, "x"), prompt + [7]) is None  # steered prompts are their own
    hit = cache.lookup(None, prompt[:9] + [5])
    assert past_length(hit) == 8 and bool((hit[0][0] == 1.0).all())
    with pytest.raises(ValueError, match="3 positions"):
        cache.store(None, [1, 2, 3], _past(2))


def test_the_least_recently_used_entries_leave_first_within_the_budget() -> None:
    one = sum(k.numel() * 4 + v.numel() * 4 for k, v in _past(10))
    cache = PrefixCache(budget_bytes=2 * one, block=4)
    a, b, c = ([n] * 10 for n in (1, 2, 3))
    cache.store(None, a, _past(10))
    cache.store(None, b, _past(10))
    assert cache.lookup(None, a + [0]) is not None  # a is now the more recent
    cache.store(None, c, _past(10))
    assert cache.used_bytes <= cache.budget_bytes and len(cache) == 2
    assert cache.lookup(None, b + [0]) is None
    assert cache.lookup(None, a + [0]) is not None and cache.lookup(None, c + [0]) is not None
    PrefixCache(budget_bytes=one - 1).store(None, a, _past(10))  # too big for the budget: not kept, no error


def test_steering_keys_follow_what_the_prompt_positions_saw() -> None:
    d = {3: torch.ones(HIDDEN_SIZE)}
    assert steering_key(None) is None
    assert steering_key(RowSteering(d, steer_prompt=False)) is None  # its prompt is unsteered
    assert steering_key(RowSteering(d)) == steering_key(RowSteering({3: torch.ones(HIDDEN_SIZE)}))
    assert steering_key(RowSteering(d)) != steering_key(RowSteering({3: 2 * torch.ones(HIDDEN_SIZE)}))
    assert steering_key(RowSteering(d)) != steering_key(RowSteering(d, preserve_norm=True))
    assert steering_key(RowSteering(d)) != steering_key(RowSteering({4: torch.ones(HIDDEN_SIZE)}))


def test_a_prefill_from_cached_prefixes_equals_one_from_scratch() -> None:
    model, template = tiny_model("llama")
    layers = resolve_layers(model, template)
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 100, (n,), generator=gen).tolist() for n in (14, 9, 5)]
    d = torch.randn(3, HIDDEN_SIZE, generator=gen)
    d[1] = 0  # one unsteered row
    deltas = {1: d, 2: d}
    switches = torch.tensor([True, True, False]), torch.tensor([False, False, True])
    feed = torch.randint(3, 100, (3, 6), generator=gen)
    with torch.no_grad():
        scratch = prefill(model, layers, prompts, {k: v.clone() for k, v in deltas.items()}, switches=switches)
        # Rows 0 and 1 bring cached prefixes of different lengths; row 2 has none.
        pasts = [row_past(scratch, 0, 10), row_past(scratch, 1, 3), None]
        cached = prefill(model, layers, prompts, {k: v.clone() for k, v in deltas.items()}, switches=switches,
                         pasts=pasts)
        assert cached.mask.shape[1] == 10 + 6  # the longest cached part, then the longest fresh part
        torch.testing.assert_close(cached.logits, scratch.logits, atol=1e-5, rtol=0)
        for step in range(6):
            decode(model, layers, scratch, feed[:, step])
            decode(model, layers, cached, feed[:, step])
            torch.testing.assert_close(cached.logits, scratch.logits, atol=1e-4, rtol=0)
    assert caches_prefixes(model)
    assert not caches_prefixes(tiny_model("gemma3")[0])  # sliding-window layers keep their own count


# ---- the real model ------------------------------------------------------------------


def _jobs(smollm, paths, prompt: str) -> list[tuple[Job, Collector]]:
    """One prompt three ways: unsteered, steered behind the gate with KL, steered on its own."""
    ids = smollm.tokenizer(render_prompt(smollm, prompt), add_special_tokens=False)["input_ids"]
    cv = read_vector(paths.vectors / smollm.name / "happy.safetensors")
    st = Steering("happy", {layer: cv.directions[layer] for layer in smollm.steering_layers}, 6.0, 8.0, frozenset())
    out = []
    for steering, gate, kl in ((None, True, False), (st, True, True), (st, False, False)):
        c = Collector()
        out.append((Job(ids, c, steering, max_tokens=12, gate=GateConfig(enabled=gate), kl=KlConfig(enabled=kl)), c))
    return out


def _replies(engine: Engine, jobs: list[tuple[Job, Collector]]) -> list[tuple]:
    replies = []
    for job, c in jobs:  # one at a time, so each can find the ones before it in the cache
        engine.submit(job)
        assert c.done.wait(300) and c.failed is None
        replies.append((c.text, [e for e in c.events if type(e).__name__ in ("Gate", "KlSample")]))
    return replies


def test_replies_are_the_same_with_the_prefix_cache_and_it_skips_the_shared_tokens(smollm, paths) -> None:
    prompts = ("Tell me about cats.", "What do fish eat?")
    cold = Engine(smollm, EngineSettings(max_batch=4, max_queue=8, prefix_cache_mb=0))
    warm = Engine(smollm, EngineSettings(max_batch=4, max_queue=8))
    try:
        for prompt in prompts:
            expected = _replies(cold, _jobs(smollm, paths, prompt))
            got = _replies(warm, _jobs(smollm, paths, prompt))
            assert [text for text, _ in got] == [text for text, _ in expected]
            for (_, events), (_, wanted) in zip(got, expected):  # the gate's choice and every KL sample
                assert [type(e) for e in events] == [type(e) for e in wanted]
                for e, w in zip(events, wanted):
                    if hasattr(e, "kl"):
                        assert e.kl == pytest.approx(w.kl, abs=1e-3)
                    else:
                        assert e.decision == w.decision
        counts = {s.labels["source"]: s.value for m in warm.metrics.registry.collect()
                  if m.name == "steer_prompt_tokens" for s in m.samples if s.name.endswith("_total")
                  and s.labels["model"] == smollm.name}
        # The second prompt shares the system prompt and the chat template's start with the first.
        print(f"prompt tokens reused {counts['reused']:.0f}, computed {counts['computed']:.0f}")
        assert counts["reused"] >= 16
    finally:
        cold.close()
        warm.close()


def _prompt_tokens(engine: Engine, source: str) -> float:
    return next((s.value for m in engine.metrics.registry.collect() if m.name == "steer_prompt_tokens"
                for s in m.samples if s.name.endswith("_total") and s.labels["source"] == source), 0.0)


def test_a_conversation_s_next_turn_reuses_the_reply_and_replies_the_same(smollm, paths) -> None:
    """A child sad for two turns in a row: the second turn's prompt is the first one, Blip's
    reply and the child's new words. With the cache only what follows the reply is prefilled
    (the reply's keys and values were kept as its row left the batch); the reply is the same."""
    cv = read_vector(paths.vectors / smollm.name / "sad.safetensors")
    sad = Steering("sad", {layer: cv.directions[layer] for layer in smollm.steering_layers}, 6.0, 8.0, frozenset())
    cold = Engine(smollm, EngineSettings(max_batch=2, max_queue=4, prefix_cache_mb=0))
    warm = Engine(smollm, EngineSettings(max_batch=2, max_queue=4))

    def turn(engine: Engine, messages: list[dict[str, str]]) -> tuple[list[int], str]:
        ids = smollm.tokenizer(render_prompt(smollm, messages), add_special_tokens=False)["input_ids"]
        c = Collector()
        engine.submit(Job(ids, c, sad, max_tokens=16))
        assert c.done.wait(300) and c.failed is None
        return ids, c.text

    try:
        first = [{"role": "user", "content": "My goldfish died this morning."}]
        ids1, reply = turn(cold, first)
        assert turn(warm, first)[1] == reply
        second = [*first, {"role": "assistant", "content": reply}, {"role": "user", "content": "I miss him."}]
        before = _prompt_tokens(warm, "reused")
        ids2, expected = turn(cold, second)
        assert turn(warm, second)[1] == expected
        reused = _prompt_tokens(warm, "reused") - before
        print(f"second turn: {len(ids2)} prompt tokens, {reused:.0f} reused; the first prompt was {len(ids1)}")
        assert ids2[: len(ids1)] == ids1
        assert reused >= len(ids1) + 8  # into the reply: the first prompt alone was cached less its last token
    finally:
        cold.close()
        warm.close()


def test_a_prefix_warmed_while_idle_is_all_the_next_turn_reuses_and_the_reply_is_the_same(smollm, paths) -> None:
    """Chat asks the engine to prefill, while it idles, how the next prompt will begin: that
    turn then computes only its new words, and replies as it would from scratch. A warming
    cancelled before the engine takes it is never computed."""
    cv = read_vector(paths.vectors / smollm.name / "sad.safetensors")
    sad = Steering("sad", {layer: cv.directions[layer] for layer in smollm.steering_layers}, 6.0, 8.0, frozenset())
    messages = [{"role": "user", "content": "My goldfish died this morning."},
                {"role": "assistant", "content": "Oh no, I am so sorry. He was a good fish."},
                {"role": "user", "content": "I miss him."}]
    ids = smollm.tokenizer(render_prompt(smollm, messages), add_special_tokens=False)["input_ids"]
    prefix = ids[:-9]  # everything before the child's last words and the reply's start
    cold = Engine(smollm, EngineSettings(max_batch=2, max_queue=4, prefix_cache_mb=0))
    warm = Engine(smollm, EngineSettings(max_batch=2, max_queue=4))

    def reply(engine: Engine) -> str:
        c = Collector()
        engine.submit(Job(ids, c, sad, max_tokens=16))
        assert c.done.wait(300) and c.failed is None
        return c.text

    try:
        gone = threading.Event()
        gone.set()
        warm.warm(Warming(prefix, row_steering(sad, 6.0), gone))
        assert warm.wait_warm(60)
        assert _prompt_tokens(warm, "warmed") == 0  # cancelled before it was taken
        warm.warm(Warming(prefix, row_steering(sad, 6.0), threading.Event()))
        assert warm.wait_warm(120)
        assert _prompt_tokens(warm, "warmed") == len(prefix)
        expected = reply(cold)
        assert reply(warm) == expected
        print(f"{len(ids)} prompt tokens: {_prompt_tokens(warm, 'reused'):.0f} reused, "
              f"{_prompt_tokens(warm, 'computed'):.0f} computed")
        assert _prompt_tokens(warm, "reused") == len(prefix)
        assert _prompt_tokens(warm, "computed") == len(ids) - len(prefix)
    finally:
        cold.close()
        warm.close()


def test_a_warming_its_turn_interrupts_keeps_what_it_computed(smollm, paths) -> None:
    """A long prefix is warmed a chunk at a time; when its turn arrives first, the chunk under
    way gives way between two layers and the chunks done are cached, so the turn starts from
    them and replies as from scratch."""
    messages = [{"role": "user", "content": f"Tell me about animal number {n}."} if n % 2 == 0 else
                {"role": "assistant", "content": f"Animal number {n} is a friendly one with soft fur and big eyes."}
                for n in range(20)] + [{"role": "user", "content": "Which one was the best?"}]
    ids = smollm.tokenizer(render_prompt(smollm, messages), add_special_tokens=False)["input_ids"]
    prefix = ids[:-10]
    assert len(prefix) > 2 * WARM_CHUNK
    cold = Engine(smollm, EngineSettings(max_batch=2, max_queue=4, prefix_cache_mb=0))
    warm = Engine(smollm, EngineSettings(max_batch=2, max_queue=4))
    try:
        came = threading.Event()
        warm.warm(Warming(prefix, None, came))
        deadline = time.monotonic() + 120
        while _prompt_tokens(warm, "warmed") < WARM_CHUNK and time.monotonic() < deadline:
            time.sleep(0.005)
        came.set()
        done = _prompt_tokens(warm, "warmed")  # at least this much is cached (more if a chunk ended meanwhile)
        c, expected = Collector(), Collector()
        warm.submit(Job(ids, c, None, max_tokens=12))
        assert c.done.wait(300) and c.failed is None
        cold.submit(Job(ids, expected, None, max_tokens=12))
        assert expected.done.wait(300) and expected.failed is None
        print(f"{len(prefix)}-token prefix: {done:.0f} warmed before its turn came, "
              f"{_prompt_tokens(warm, 'reused'):.0f} reused")
        assert WARM_CHUNK <= done and _prompt_tokens(warm, "reused") >= done
        assert c.text == expected.text
        assert warm.wait_warm(10)
    finally:
        cold.close()
        warm.close()
