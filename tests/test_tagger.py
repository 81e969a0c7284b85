"""The tagger: held-out accuracy (heldout_fresh2.jsonl) against the zero-shot baseline, the model
file matching its data, no held-out turn among the training rows, the word features matching
scikit-learn, threshold behaviour, JSONL tagging, and the real gRPC service in process on port 0."""

import asyncio
import io
import json
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from protos.steering.v1 import tagger_pb2, tagger_pb2_grpc
from serving.server import ServerSettings
from steering.errors import ConfigError, ModelLoadError
from tagger.classifier import CLASSES, NONE, TaggerModel, load_default, tag_jsonl
from tagger.server import attach_model, serve, start_tagger
from tagger.servicer import MAX_CONTEXT_TURNS, SERVICE_NAME, validated
from tagger.train import (
    FRESH_PATH,
    FRESH_SPLITS,
    LabelledTurn,
    evaluate,
    load_heldout,
    load_training_turns,
    load_turns,
    select,
    train,
    train_sha256,
    turn_features,
)
from steering.words import WordGrams

pytestmark = pytest.mark.slow  # the real all-MiniLM-L6-v2 embedder

# heldout_fresh2.jsonl (280 turns, 40 per label) was written before any tuning for issue 14
# part 6 and scored once, with the final model: 0.900 (252/280; see data/README.md). The floor
# is that figure, so one more wrong turn fails it (the closest call on the set is 0.04 apart in
# probability, far above numerical noise). Zero-shot on the same turns: 0.564.
MIN_FRESH2_ACCURACY = 0.90
MIN_GAIN_OVER_ZERO_SHOT = 0.05
SETTINGS = ServerSettings(port=0, grace_s=0.5)


@pytest.fixture(scope="module")
def turns() -> list[LabelledTurn]:
    return load_training_turns()


@pytest.fixture(scope="module")
def model() -> TaggerModel:
    return load_default()


@pytest.fixture(scope="module")
def heldout() -> list[LabelledTurn]:
    return load_heldout()


@pytest.fixture(scope="module")
def heldout_x(heldout: list[LabelledTurn]) -> np.ndarray:
    return turn_features(heldout)


def _texts(turns: list[LabelledTurn]) -> list[str]:
    return [t.text for t in turns]


def _key(turn: LabelledTurn) -> str:
    return " ".join(turn.text.lower().split())


# --- the model -----------------------------------------------------------------------------


def test_heldout_accuracy_beats_zero_shot(model: TaggerModel, heldout: list[LabelledTurn], heldout_x: np.ndarray) -> None:
    result = evaluate(model, heldout, heldout_x)
    print(f"\nheldout_fresh2 accuracy {result.accuracy:.3f}, zero-shot {result.zero_shot_accuracy:.3f}, n={result.count}")
    assert result.count == 280 and all(sum(result.confusion[c].values()) == 40 for c in CLASSES)
    assert result.accuracy >= MIN_FRESH2_ACCURACY
    assert result.accuracy >= result.zero_shot_accuracy + MIN_GAIN_OVER_ZERO_SHOT


def test_no_heldout_turn_is_among_the_training_rows(turns: list[LabelledTurn], heldout: list[LabelledTurn]) -> None:
    assert not {_key(t) for t in heldout} & {_key(t) for t in turns}
    assert all(t.split in ("train", "heldout", "fresh") for t in turns)


def test_training_rows_are_both_files(turns: list[LabelledTurn]) -> None:
    data, fresh = load_turns(), load_turns(FRESH_PATH, FRESH_SPLITS)
    assert turns == [*data, *fresh] and len(fresh) == 210


def test_word_features_match_scikit_learn(turns: list[LabelledTurn]) -> None:
    from sklearn.feature_extraction.text import TfidfVectorizer

    texts = _texts(select(turns, "train"))
    ours = WordGrams.fit(texts)
    theirs = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)
    expected = theirs.fit_transform(texts).toarray()
    assert ours.vocabulary == tuple(theirs.get_feature_names_out())
    others = _texts(select(turns, "heldout"))
    np.testing.assert_allclose(ours.transform(texts), expected, atol=1e-6)
    np.testing.assert_allclose(ours.transform(others), theirs.transform(others).toarray(), atol=1e-6)


def test_model_was_trained_on_the_current_training_rows(model: TaggerModel, turns: list[LabelledTurn]) -> None:
    assert model.train_sha256 == train_sha256(turns), "turns.jsonl or heldout_fresh.jsonl changed: run `python -m tagger.train`"


def test_every_training_row_counts_in_the_train_hash(turns: list[LabelledTurn]) -> None:
    for split in ("train", "heldout", "fresh"):
        i = next(i for i, t in enumerate(turns) if t.split == split)
        changed = [*turns[:i], LabelledTurn(turns[i].text + "!", turns[i].label, split, turns[i].context), *turns[i + 1 :]]
        assert train_sha256(changed) != train_sha256(turns)


@pytest.mark.heavy  # a minute and a half of embedding and 25 cross-validation fits: `make reliability`
def test_retraining_reproduces_the_checked_in_model(
    model: TaggerModel, turns: list[LabelledTurn], heldout: list[LabelledTurn], heldout_x: np.ndarray
) -> None:
    retrained = train(turns, turn_features(turns))
    assert retrained.threshold == model.threshold
    assert retrained.metadata["C"] == model.metadata["C"]
    assert retrained.words.vocabulary == model.words.vocabulary
    # Agreement between the two models on turns neither was trained on (no accuracy is read here).
    ours = [p.label for p in retrained.predict_features(retrained.full_features(_texts(heldout), heldout_x))]
    theirs = [p.label for p in model.predict_features(model.full_features(_texts(heldout), heldout_x))]
    agreement = sum(a == b for a, b in zip(ours, theirs, strict=True)) / len(ours)
    assert agreement >= 0.98


def test_neutral_turn_is_none(model: TaggerModel) -> None:
    assert model.predict("How do you spell elephant?").label == NONE


def test_threshold_turns_a_label_into_none(model: TaggerModel) -> None:
    plain = model.predict("My fish died and I miss him so much")
    strict = model.with_threshold(0.999).predict("My fish died and I miss him so much")
    assert plain.label == "sad"
    assert strict.label == NONE
    assert strict.confidence == pytest.approx(plain.confidence)  # confidence is before the threshold
    assert list(strict.scores) == list(plain.scores)
    assert list(plain.scores)[0] == "sad" and set(plain.scores) == set(CLASSES)


def test_save_and_load_round_trip(model: TaggerModel, tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    model.save(path)
    back = TaggerModel.load(path)
    assert np.array_equal(back.coef, model.coef) and np.array_equal(back.intercept, model.intercept)
    assert (back.classes, back.threshold, back.train_sha256) == (model.classes, model.threshold, model.train_sha256)
    assert back.words.vocabulary == model.words.vocabulary and np.array_equal(back.words.idf, model.words.idf)
    assert back.metadata["sklearn_version"] and back.metadata["created"]
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ModelLoadError, match="corrupt"):
        TaggerModel.load(path)


# --- JSONL ---------------------------------------------------------------------------------


def test_tag_jsonl_writes_one_line_per_turn(model: TaggerModel, tmp_path: Path) -> None:
    path = tmp_path / "turns.jsonl"
    lines = [{"text": "What time is it"}, {"text": "He's eight", "context": ["Blip: How old is your brother?"]}]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    out = io.StringIO()
    assert tag_jsonl(path, out, model) == 2
    records = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [r["text"] for r in records] == ["What time is it", "He's eight"]
    for r in records:
        assert r["label"] in CLASSES and 0.0 <= r["confidence"] <= 1.0
        assert list(r["scores"].values()) == sorted(r["scores"].values(), reverse=True)
    assert records[0]["label"] == NONE


@pytest.mark.parametrize(
    ("second_line", "message"),
    [("not json", "not valid JSON"), ('{"context": []}', '"text"'), ('{"text": "hi", "context": "x"}', '"context"')],
)
def test_tag_jsonl_names_the_bad_line(model: TaggerModel, tmp_path: Path, second_line: str, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "hello"}\n' + second_line + "\n")
    out = io.StringIO()
    with pytest.raises(ConfigError, match=f"{path.name}:2: .*{message}"):
        tag_jsonl(path, out, model)
    assert out.getvalue() == ""  # nothing written before the whole file was checked


# --- the servicer's validation ---------------------------------------------------------------


def test_only_the_last_context_turns_are_used() -> None:
    request = tagger_pb2.TagRequest(text="hi", context=[f"turn {i}" for i in range(12)] + ["  "])
    text, context = validated(request)
    assert text == "hi" and context == tuple(f"turn {i}" for i in range(12 - MAX_CONTEXT_TURNS, 12))


# --- gRPC ----------------------------------------------------------------------------------


def _run_with_server(check: Callable[[grpc.aio.Channel], Awaitable[None]]) -> None:
    async def scenario() -> None:
        running = await serve(SETTINGS)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
                await check(channel)
        finally:
            await running.stop()

    asyncio.run(scenario())


def _name(label: int) -> str:
    return tagger_pb2.Emotion.Name(label).removeprefix("EMOTION_").lower()


def test_tag_returns_every_label_best_first(model: TaggerModel) -> None:
    async def check(channel: grpc.aio.Channel) -> None:
        request = tagger_pb2.TagRequest(text="My fish died and I miss him so much")
        response = await tagger_pb2_grpc.TaggerStub(channel).Tag(request)
        assert response.label == tagger_pb2.EMOTION_SAD
        scores = [s.score for s in response.scores]
        assert scores == sorted(scores, reverse=True) and sum(scores) == pytest.approx(1.0, abs=1e-4)
        assert sorted(_name(s.label) for s in response.scores) == sorted(CLASSES)
        assert response.confidence == pytest.approx(scores[0])
        assert response.threshold == pytest.approx(model.threshold)

    _run_with_server(check)


def test_tag_conversation_answers_each_turn_in_order_with_context(model: TaggerModel) -> None:
    turns = ["Tom moved away", "It won't be the same without him", "What's the biggest dinosaur"]
    with_context = [model.predict(t, turns[:i]) for i, t in enumerate(turns)]
    alone = model.predict(turns[1])

    async def check(channel: grpc.aio.Channel) -> None:
        call = tagger_pb2_grpc.TaggerStub(channel).TagConversation()
        for turn, expected in zip(turns, with_context, strict=True):
            await call.write(tagger_pb2.TagRequest(text=turn))
            response = await call.read()  # one answer per turn, before the next turn is sent
            assert _name(response.label) == expected.label
            assert response.confidence == pytest.approx(expected.confidence, abs=1e-4)
        await call.done_writing()
        assert await call.read() == grpc.aio.EOF

    _run_with_server(check)
    assert with_context[1].scores != pytest.approx(alone.scores, abs=1e-4)  # the context did change the answer


def test_bad_text_is_invalid_argument() -> None:
    async def check(channel: grpc.aio.Channel) -> None:
        stub = tagger_pb2_grpc.TaggerStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as empty:
            await stub.Tag(tagger_pb2.TagRequest(text="   "))
        assert empty.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "text is empty: send the child's turn" in empty.value.details()
        with pytest.raises(grpc.aio.AioRpcError) as long:
            await stub.Tag(tagger_pb2.TagRequest(text="a" * 2001))
        assert long.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "2000" in long.value.details()

    _run_with_server(check)


def test_health_goes_serving_after_load_and_reflection_lists_the_service() -> None:
    async def scenario() -> None:
        running, servicer = await start_tagger(SETTINGS)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
                health = health_pb2_grpc.HealthStub(channel)
                request = health_pb2.HealthCheckRequest(service=SERVICE_NAME)
                assert (await health.Check(request)).status == health_pb2.HealthCheckResponse.NOT_SERVING
                with pytest.raises(grpc.aio.AioRpcError) as loading:
                    await tagger_pb2_grpc.TaggerStub(channel).Tag(tagger_pb2.TagRequest(text="hi"))
                assert loading.value.code() == grpc.StatusCode.UNAVAILABLE
                await attach_model(running, servicer)
                assert (await health.Check(request)).status == health_pb2.HealthCheckResponse.SERVING
                reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
                responses = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
                names = [s.name async for r in responses for s in r.list_services_response.service]
                assert SERVICE_NAME == "steering.v1.Tagger" and SERVICE_NAME in names
        finally:
            await running.stop()

    asyncio.run(scenario())
