"""Pair consistency: the leave-one-out arithmetic by hand, then through a tiny random model."""

import math
from pathlib import Path

import pytest
import torch

from steering.consistency import (
    concept_consistency,
    leave_one_out_cosines,
    mean_pairwise_cosine,
    measure,
    read_record,
    write_record,
)
from steering.derive import pair_activations
from steering.errors import ConfigError
from steering.loading import LoadedModel
from steering.pairs import Concept, Pair
from tiny_models import tiny_loaded

STEERING_LAYERS = (1, 2)


def test_leave_one_out_by_hand() -> None:
    diffs = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    # Pair 0 against ((0,1) + (1,1)) / 2 = (0.5, 1), pair 1 against (1, 0.5),
    # pair 2 against ((1,0) + (0,1)) / 2 = (0.5, 0.5).
    expected = [0.5 / math.sqrt(1.25), 0.5 / math.sqrt(1.25), 1.0]
    assert leave_one_out_cosines(diffs).tolist() == pytest.approx(expected, abs=1e-12)


def test_pairwise_by_hand() -> None:
    diffs = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    # cos(0,1) = 0, cos(0,2) = cos(1,2) = 1/sqrt(2): the mean of the three is sqrt(2)/3.
    assert float(mean_pairwise_cosine(diffs)) == pytest.approx(math.sqrt(2) / 3, abs=1e-12)


@pytest.mark.parametrize("figure", [leave_one_out_cosines, mean_pairwise_cosine])
def test_one_pair_is_refused(figure) -> None:
    with pytest.raises(ConfigError):
        figure(torch.ones(1, 4))


@pytest.fixture(scope="module")
def tiny() -> LoadedModel:
    return tiny_loaded(layers=STEERING_LAYERS)


PAIR = Pair("t5 t6 t7", "t10 t11 t12", "t20 t21")  # sides of different lengths: padding is exercised
OTHER = Pair("t30 t31", "t40 t41 t42 t43", "t50")


def _concept(*pairs: Pair) -> Concept:
    return Concept(name="c", description="", valence=0.0, arousal=0.0, words=(), pairs=pairs)


def test_identical_pairs_agree_completely(tiny) -> None:
    entry = concept_consistency(tiny, _concept(PAIR, PAIR, PAIR))
    assert entry["consistency"] == pytest.approx(1.0, abs=1e-4)
    assert entry["agreeing"] == 1.0
    assert entry["pairwise"] == pytest.approx(1.0, abs=1e-4)
    assert set(entry["per_layer"]) == {"1", "2"}


def test_a_reversed_pair_lowers_it_by_hand(tiny) -> None:
    # Three pairs with difference d and one with -d: each d-pair sees (d + d - d) / 3 = d/3,
    # cosine 1; the reversed pair sees d, cosine -1. Mean (3 - 1) / 4 = 0.5; 3 of 4 agree.
    # Pairwise: 3 couples of d-pairs at +1, 3 couples with the reversed one at -1: mean 0.
    reversed_pair = Pair(PAIR.context, PAIR.negative, PAIR.positive)
    entry = concept_consistency(tiny, _concept(PAIR, PAIR, PAIR, reversed_pair), batch_size=3)
    assert entry["consistency"] == pytest.approx(0.5, abs=1e-4)
    assert entry["agreeing"] == 0.75
    assert entry["pairwise"] == pytest.approx(0.0, abs=1e-4)
    assert entry["weakest"][0]["index"] == 3 and entry["weakest"][0]["cosine"] == pytest.approx(-1.0, abs=1e-4)


def test_two_different_pairs_each_see_the_other(tiny) -> None:
    # With two pairs, leave-one-out compares each with the other: both cosines are cos(d0, d1),
    # here from each pair run alone, averaged over the steering layers only.
    def alone(pair: Pair) -> torch.Tensor:
        pos, neg, _, _ = pair_activations(tiny, _concept(pair), batch_size=1)
        return (pos - neg)[0]

    d0, d1 = alone(PAIR), alone(OTHER)
    cos = [float(torch.nn.functional.cosine_similarity(d0[layer], d1[layer], dim=0)) for layer in STEERING_LAYERS]
    entry = concept_consistency(tiny, _concept(PAIR, OTHER))
    assert entry["consistency"] == pytest.approx(sum(cos) / len(cos), abs=1e-4)
    assert [entry["per_layer"][str(layer)] for layer in STEERING_LAYERS] == pytest.approx(cos, abs=1e-4)
    assert entry["pairwise"] == pytest.approx(entry["consistency"], abs=1e-4)  # with two pairs they coincide
    assert abs(entry["consistency"]) < 0.99  # different pairs: the case is not trivially 1


def test_record_keeps_other_concepts_of_the_same_model(tiny, tmp_path: Path) -> None:
    first = measure(tiny, [_concept(PAIR, PAIR)])
    write_record(tmp_path, first)
    other = Concept(name="d", description="", valence=0.0, arousal=0.0, words=(), pairs=(PAIR, OTHER))
    second = measure(tiny, [other], read_record(tmp_path))
    assert set(second["concepts"]) == {"c", "d"} and second["concepts"]["c"] == first["concepts"]["c"]
    assert measure(tiny, [other], {**first, "fingerprint": "e" * 64})["concepts"].keys() == {"d"}
