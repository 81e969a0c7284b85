"""Continuous batching: rows joining, leaving and decoding together never influence each other.

Structural checks run on tiny random models (one with sliding-window attention); the
isolation check that matters runs the real SmolLM2 with nine different concepts at once."""


import pytest
import torch

from steering.batch import Rows, decode, merge, prefill, select
from generator.engine import Engine, EngineSettings
from generator.job import GateConfig, Job, Steering
from generator.events import Started, TextDelta
from steering.generate import render_prompt
from steering.layers import resolve_layers
from steering.loading import LoadedModel
from steering.store import read_vector
from collector import Collector
from tiny_models import HIDDEN_SIZE, tiny_model

# The tiny gemma3 has a sliding window of 8: prompts and decoding run past it.
PROMPTS = ([5, 9, 17, 3, 44], [7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17], [21, 22, 23])


def _steps(model, layers, rows: Rows, n: int, feed: list[list[int]]) -> list[torch.Tensor]:
    out = [rows.logits.clone()]
    for step in range(n):
        decode(model, layers, rows, torch.tensor([f[step] for f in feed]))
        out.append(rows.logits.clone())
    return out


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_merged_rows_match_rows_alone(arch: str) -> None:
    model, template = tiny_model(arch)
    layers = resolve_layers(model, template)
    gen = torch.Generator().manual_seed(1)
    deltas = [torch.randn(HIDDEN_SIZE, generator=gen) for _ in PROMPTS]
    feed = [torch.randint(3, 100, (12,), generator=gen).tolist() for _ in PROMPTS]
    # Each row its own configuration: row 0 keeps its states' norms, row 1 steers generated
    # tokens only, row 2 adds plainly to every position.
    prompt_rows, preserve_rows = torch.tensor([True, False, True]), torch.tensor([True, False, False])

    def switches(rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        return prompt_rows[rows], preserve_rows[rows]

    with torch.no_grad():
        alone = [
            _steps(model, layers, prefill(model, layers, [p], {1: d[None], 2: d[None]}, switches=switches(slice(i, i + 1))), 12, [f])
            for i, (p, d, f) in enumerate(zip(PROMPTS, deltas, feed))
        ]
        # Row 0 runs 4 steps first; then rows 1 and 2 join (prefilled together), row 1 is
        # unsteered on layer 2 only, to exercise a layer one side does not steer.
        first = prefill(model, layers, [PROMPTS[0]], {1: deltas[0][None], 2: deltas[0][None]}, switches=switches(slice(0, 1)))
        early = _steps(model, layers, first, 4, [feed[0]])
        joiners = prefill(model, layers, PROMPTS[1:], {1: torch.stack(deltas[1:]), 2: torch.stack(deltas[1:])},
                          switches=switches(slice(1, 3)))
        batch = merge(first, joiners)
        torch.testing.assert_close(batch.logits[0], alone[0][4][0], atol=1e-5, rtol=0)
        for step in range(8):
            decode(model, layers, batch, torch.tensor([feed[0][4 + step], feed[1][step], feed[2][step]]))
            torch.testing.assert_close(batch.logits[1], alone[1][step + 1][0], atol=1e-4, rtol=0)
            torch.testing.assert_close(batch.logits[2], alone[2][step + 1][0], atol=1e-4, rtol=0)
            torch.testing.assert_close(batch.logits[0], alone[0][step + 5][0], atol=1e-4, rtol=0)
        # The longest row leaves: its padding columns are trimmed, the others decode on unchanged.
        batch = select(batch, [1, 2])
        assert batch.mask.shape[1] == len(PROMPTS[1]) + 8 and batch.mask[:, 0].any()
        decode(model, layers, batch, torch.tensor([feed[1][8], feed[2][8]]))
        torch.testing.assert_close(batch.logits[0], alone[1][9][0], atol=1e-4, rtol=0)
        torch.testing.assert_close(batch.logits[1], alone[2][9][0], atol=1e-4, rtol=0)
        # The switches are real: steering row 1's prompt too, or not keeping row 0's norm, moves them.
        everywhere = prefill(model, layers, [PROMPTS[1]], {1: deltas[1][None], 2: deltas[1][None]})
        plain_norm = prefill(model, layers, [PROMPTS[0]], {1: deltas[0][None], 2: deltas[0][None]})
    assert not torch.allclose(everywhere.logits, alone[1][0], atol=1e-3)
    assert not torch.allclose(plain_norm.logits, alone[0][0], atol=1e-3)
    assert all(not layers[i]._forward_hooks for i in range(len(layers)))
    assert early[0].shape == (1, model.config.vocab_size)


# ---- the real model ------------------------------------------------------------------

CONCEPTS = ("happy", "sad", "kind", "warmth", "bored", "content", "empathy", "enthusiasm", "melancholy")
CHILD_PROMPTS = (
    "Tell me about cats.", "What is rain?", "I lost my toy.", "Sing me a song!", "Why is the sky blue?",
    "I had a bad dream.", "Can we play a game?", "What do fish eat?", "Tell me a joke.",
)


def _steering(smollm: LoadedModel, paths, concept: str, alpha: float = 6.0) -> Steering:
    cv = read_vector(paths.vectors / smollm.name / f"{concept}.safetensors")
    return Steering(concept, {layer: cv.directions[layer] for layer in smollm.steering_layers}, alpha, 8.0, frozenset())


def _job(smollm: LoadedModel, paths, prompt: str, concept: str | None, max_tokens: int = 20) -> tuple[Job, Collector]:
    ids = smollm.tokenizer(render_prompt(smollm, prompt), add_special_tokens=False)["input_ids"]
    c = Collector()
    steering = _steering(smollm, paths, concept) if concept else None
    return Job(ids, c, steering, max_tokens=max_tokens, gate=GateConfig(enabled=False)), c


@pytest.fixture(scope="module")
def engine(smollm):
    e = Engine(smollm, EngineSettings(max_batch=9, max_queue=16))
    yield e
    e.close()


def test_greedy_request_gives_the_same_tokens_alone_and_in_a_batch_of_nine(smollm, paths, engine) -> None:
    job, alone = _job(smollm, paths, CHILD_PROMPTS[0], CONCEPTS[0])
    engine.submit(job)
    assert alone.done.wait(300)
    together = []
    for prompt, concept in zip(CHILD_PROMPTS, CONCEPTS):
        job, c = _job(smollm, paths, prompt, concept)
        engine.submit(job)
        together.append(c)
    assert all(c.done.wait(600) for c in together)
    assert together[0].text == alone.text and together[0].finished.completion_tokens == alone.finished.completion_tokens
    assert len({c.text for c in together}) == len(together)  # nine different replies, none empty
    assert all(c.text for c in together)
    assert all(not smollm.layers[i]._forward_hooks for i in range(len(smollm.layers)))


def test_padding_moves_logits_by_float_noise_only(smollm, paths) -> None:
    """How far left padding and batch neighbours move a row's logits on the real model."""
    tok = smollm.tokenizer
    ids = [tok(render_prompt(smollm, p), add_special_tokens=False)["input_ids"] for p in CHILD_PROMPTS]
    directions = [_steering(smollm, paths, c).directions for c in CONCEPTS]
    layers = smollm.steering_layers

    def deltas(rows: list[int]) -> dict[int, torch.Tensor]:
        return {layer: torch.stack([6.0 * directions[r][layer] for r in rows]) for layer in layers}

    with torch.no_grad():
        alone = prefill(smollm.model, smollm.layers, [ids[0]], deltas([0]))
        batch = prefill(smollm.model, smollm.layers, ids, deltas(list(range(len(ids)))))
        diff = float((alone.logits[0] - batch.logits[0]).abs().max())
        for _ in range(5):
            token = alone.logits.argmax(-1)
            assert int(token) == int(batch.logits[0].argmax()), "a batch neighbour changed a greedy token"
            decode(smollm.model, smollm.layers, alone, token)
            decode(smollm.model, smollm.layers, batch, torch.cat([token, batch.logits[1:].argmax(-1)]))
            diff = max(diff, float((alone.logits[0] - batch.logits[0]).abs().max()))
    print(f"largest logit difference alone vs padded in a batch of {len(ids)}: {diff:.2e}")
    assert diff < 1e-3


def test_a_request_joins_a_running_stream_without_changing_it(smollm, paths, engine) -> None:
    job, alone = _job(smollm, paths, CHILD_PROMPTS[3], "warmth", max_tokens=24)
    engine.submit(job)
    assert alone.done.wait(300)
    first, a = _job(smollm, paths, CHILD_PROMPTS[3], "warmth", max_tokens=24)
    engine.submit(first)
    assert a.first_text.wait(120)
    second, b = _job(smollm, paths, CHILD_PROMPTS[5], "sad", max_tokens=24)
    engine.submit(second)
    assert a.done.wait(300) and b.done.wait(300)
    assert a.text == alone.text
    assert b.text and isinstance(b.events[0], Started) and b.events[0].concept == "sad"


def test_a_cancelled_stream_leaves_at_once_and_the_others_go_on(smollm, paths, engine) -> None:
    keep, k = _job(smollm, paths, CHILD_PROMPTS[1], "kind", max_tokens=40)
    drop, d = _job(smollm, paths, CHILD_PROMPTS[2], "happy", max_tokens=400)
    engine.submit(keep)
    engine.submit(drop)
    assert d.first_text.wait(120)
    drop.cancelled.set()
    assert d.done.wait(30)
    assert d.finished.reason == "cancelled" and d.finished.completion_tokens < 40
    assert k.done.wait(300) and k.finished.reason in ("length", "end_of_text")
    assert all(not smollm.layers[i]._forward_hooks for i in range(len(smollm.layers)))


def test_engine_settings_are_checked(smollm) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        Engine(smollm, EngineSettings(max_batch=0))


def test_kl_from_the_chunked_shadow_equals_kl_over_the_whole_text(smollm, paths, engine) -> None:
    """The shadow catches up a few tokens at a time; its KL at every position must be what
    comparing the steered and unsteered model over the finished text gives."""
    from generator.job import KlConfig
    from generator.monitors import kl_divergence
    from generator.events import KlSample
    from steering.hooks import steer

    ids = smollm.tokenizer(render_prompt(smollm, CHILD_PROMPTS[4]), add_special_tokens=False)["input_ids"]
    c = Collector()
    st = _steering(smollm, paths, "happy")
    engine.submit(Job(ids, c, st, max_tokens=14, gate=GateConfig(enabled=False),
                      kl=KlConfig(enabled=True, threshold=0.0)))
    assert c.done.wait(300)
    samples = [e for e in c.events if isinstance(e, KlSample)]
    n = c.finished.completion_tokens
    assert [s.token_index for s in samples] == list(range(len(samples))) and len(samples) >= n
    from steering.generate import GenerationSettings, generate

    [ref] = generate(smollm, [CHILD_PROMPTS[4]], [{layer: st.alpha * d for layer, d in st.directions.items()}],
                     GenerationSettings(max_new_tokens=14))
    assert ref.text == c.text.strip()  # the same greedy tokens: the reply's ids are ref.token_ids
    reply = list(ref.token_ids)
    full = torch.tensor([ids + reply])
    with torch.no_grad():
        plain = smollm.model(input_ids=full).logits[0]
        with steer(smollm.layers, {layer: (st.alpha * d)[None] for layer, d in st.directions.items()}):
            steered = smollm.model(input_ids=full).logits[0]
    for s in samples[: min(n, len(reply))]:
        pos = len(ids) - 1 + s.token_index
        assert s.kl == pytest.approx(kl_divergence(steered[pos], plain[pos]), rel=1e-3, abs=1e-4)


def test_a_long_prompt_is_prefilled_in_chunks_between_the_running_streams_steps(smollm, paths, engine) -> None:
    """While a stream decodes, a joiner's long prompt is prefilled a chunk at a time with a
    decoding step of the running stream between chunks; neither reply changes."""
    long_prompt = ("I have a question about my garden. " * 8) + "Which flowers should I plant this spring?"
    runner, r_alone = _job(smollm, paths, CHILD_PROMPTS[0], None, max_tokens=40)
    engine.submit(runner)
    joiner, j_alone = _job(smollm, paths, long_prompt, "happy", max_tokens=12)
    engine.submit(joiner)
    assert r_alone.done.wait(300) and j_alone.done.wait(300)

    log: list[tuple[str, object]] = []
    chunked = Engine(smollm, EngineSettings(max_batch=4, max_queue=8, prefill_chunk=8, prefix_cache_mb=0))
    try:
        runner, r = _job(smollm, paths, CHILD_PROMPTS[0], None, max_tokens=40)
        joiner, j = _job(smollm, paths, long_prompt, "happy", max_tokens=12)
        runner.emit = lambda e: (log.append(("runner", e)), r(e))
        joiner.emit = lambda e: (log.append(("joiner", e)), j(e))
        chunked.submit(runner)
        assert r.first_text.wait(120)
        chunked.submit(joiner)
        assert r.done.wait(300) and j.done.wait(300)
    finally:
        chunked.close()
    assert r.text == r_alone.text and j.text == j_alone.text
    prompt_tokens = len(joiner.prompt_ids)
    start = next(i for i, (who, e) in enumerate(log) if who == "joiner" and isinstance(e, Started))
    first = next(i for i, (who, e) in enumerate(log) if who == "joiner" and isinstance(e, TextDelta))
    between = sum(1 for who, e in log[start:first] if who == "runner" and isinstance(e, TextDelta))
    print(f"joiner prompt {prompt_tokens} tokens; runner text pieces while it was prefilled: {between}")
    assert between >= prompt_tokens // 8 - 2
