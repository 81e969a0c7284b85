"""scripts/screen_bands.py: its direction variants on the real model, and its usage errors; scripts/recheck_served.py's usage errors."""

import sys
from pathlib import Path

import pytest
import torch

from steering.derive import derive_concept
from steering.pairs import Concept, load_concept

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import recheck_served  # noqa: E402
import screen_bands  # noqa: E402


@pytest.fixture(scope="module")
def few_pairs(paths) -> Concept:
    concept = load_concept(paths.pairs, "playfulness")
    return Concept(**{**concept.__dict__, "pairs": concept.pairs[:8]})


@pytest.mark.parametrize("direction", ["pca", "reply-mean"])
def test_variant_directions_are_unit_and_lean_toward_the_concept(smollm, few_pairs, direction):
    caa = derive_concept(smollm, few_pairs)
    cv = screen_bands.derived(smollm, few_pairs, direction)
    assert cv.method == f"{direction}, screened only" and cv.act_norms == caa.act_norms
    for layer in (6, 12, 18):
        d = cv.directions[layer]
        assert abs(float(d.norm()) - 1) < 1e-5
        # A different direction from the stored one, on the concept's side of it.
        cosine = float(torch.dot(d, caa.directions[layer]))
        assert 0 < cosine < 0.999, (layer, cosine)


def test_mean_centred_leans_toward_the_concept_and_needs_a_background(smollm, few_pairs, paths):
    calm = load_concept(paths.pairs, "calm")
    background = [few_pairs, Concept(**{**calm.__dict__, "pairs": calm.pairs[:8]})]
    caa = derive_concept(smollm, few_pairs)
    cv = screen_bands.derived(smollm, few_pairs, "mean-centred", background)
    for layer in (6, 12, 18):
        cosine = float(torch.dot(cv.directions[layer], caa.directions[layer]))
        assert abs(float(cv.directions[layer].norm()) - 1) < 1e-5 and 0 < cosine < 0.999, (layer, cosine)
    with pytest.raises(ValueError, match="at least one background concept"):
        screen_bands.derived(smollm, few_pairs, "mean-centred")


def test_caa_is_the_stored_method(smollm, few_pairs):
    a, b = screen_bands.derived(smollm, few_pairs, "caa"), derive_concept(smollm, few_pairs)
    assert all(torch.equal(a.directions[layer], b.directions[layer]) for layer in (0, 15, 29))


@pytest.mark.parametrize("argv, message", [
    (["--concept", "playfulness", "--bands", "6-12", "--pairs", "x.json"], "--pairs needs --direction"),
    (["--concept", "playfulness", "--bands", "6-12", "--direction", "mean"], "invalid choice"),
    (["--concept", "playfulness", "--bands", "6-12", "--seeds", "0"], "--seeds must be at least 1"),
    (["--concept", "playfulness", "--bands", "6-12", "--first-seed", "-1"], "--first-seed at least 0"),
    (["--concept", "playfulness", "--bands", "6-12", "--release", "0"], "--release must be at least 1"),
    (["--concept", "playfulness", "--bands", "6-12", "--scale", "raw"], "invalid choice"),
])
def test_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        screen_bands.main(argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--seeds", "0"], "--seeds must be at least 1"),
    (["--concepts", "happy,hostile"], "--concepts hostile: not Blip concepts"),
    (["--candidate", "playfulness:steer:strong:x.safetensors"], "ALPHA must be a number"),
    (["--candidate", f"playfulness:prompt:4.1:{ROOT / 'README.md'}"], "MODE must be steer or both"),
    (["--candidate", f"hostile:steer:4.1:{ROOT / 'README.md'}"], "'hostile' is not a Blip concept"),
    (["--candidate", "playfulness:steer:4.1:no-such.safetensors"], "no such vector file"),
])
def test_recheck_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        recheck_served.main(argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err
