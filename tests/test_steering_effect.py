"""Steering really happens: an independent sentiment judge (VADER, a lexicon model that knows
nothing of our vectors) scores happy-steered replies more positive and sad-steered replies
more negative than unsteered replies to the same prompts, through the `steer` CLI."""

import json
import statistics
from pathlib import Path

import pytest
from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

from steer_cli import steer
PROMPTS = Path(__file__).parent / "data" / "sentiment_prompts.jsonl"
# The strengths README recommends for SmolLM2 (alpha per layer, layers 12-18).
ALPHA = {"happy": "8", "sad": "8"}


def _sentiment(*extra: str) -> list[float]:
    res = steer("generate", "--model", "smollm2-135m-instruct", "--prompts-file", str(PROMPTS),
                "--max-new-tokens", "48", "--batch-size", "16", "--json", *extra)
    assert res.returncode == 0, res.stderr
    judge = SentimentIntensityAnalyzer()
    return [judge.polarity_scores(json.loads(line)["text"])["compound"] for line in res.stdout.splitlines()]


@pytest.fixture(scope="module")
def unsteered() -> list[float]:
    return _sentiment()


def test_happy_is_clearly_more_positive(unsteered: list[float]) -> None:
    happy = _sentiment("--concept", "happy", "--alpha", ALPHA["happy"])
    print(f"VADER compound mean: unsteered {statistics.mean(unsteered):+.3f}, happy {statistics.mean(happy):+.3f}")
    # SmolLM2's unsteered replies are already cheerful (VADER saturates near +1), so the
    # room to move up is smaller than the room to move down.
    assert statistics.mean(happy) > statistics.mean(unsteered) + 0.12
    assert sum(h > u for h, u in zip(happy, unsteered)) > sum(h < u for h, u in zip(happy, unsteered))


def test_sad_is_clearly_more_negative(unsteered: list[float]) -> None:
    sad = _sentiment("--concept", "sad", "--alpha", ALPHA["sad"])
    print(f"VADER compound mean: unsteered {statistics.mean(unsteered):+.3f}, sad {statistics.mean(sad):+.3f}")
    assert statistics.mean(sad) < statistics.mean(unsteered) - 0.25
    assert sum(s < u for s, u in zip(sad, unsteered)) >= len(sad) // 2
