"""Preference-optimised directions (optimize.py) on the real model: training widens the
steered preference for a concept's positive replies and leaves the model as it was, and
`steer derive --optimize` stores what it trained."""

import json
import statistics
from dataclasses import replace

import pytest
import torch

from steer_cli import steer as run
from steering.derive import derive_concept
from steering.optimize import GRID_SCALE, METHOD, OptimizeSettings, encode_pairs, margins, optimized_directions
from steering.pairs import Concept, load_concept
from steering.store import read_vector, vector_path
from steering.validate import ALPHA_GRID_REL, BOTH_GRID_REL, SweepSettings, concept_settings

LAYERS = (12, 13, 14)


@pytest.fixture(scope="module")
def few_pairs(paths) -> Concept:
    concept = load_concept(paths.pairs, "playfulness")
    return Concept(**{**concept.__dict__, "pairs": concept.pairs[:4]})


def _mean_margin(smollm, pairs, directions: dict[int, torch.Tensor], alpha: float) -> float:
    with torch.no_grad():
        return float(margins(smollm, pairs, {layer: alpha * d for layer, d in directions.items()},
                             torch.arange(len(pairs))).mean())


def test_training_widens_the_preference_for_the_positive_replies(smollm, few_pairs):
    caa = derive_concept(smollm, few_pairs)
    init = {layer: caa.directions[layer] for layer in LAYERS}
    weights = {name: p.detach().clone() for name, p in smollm.model.named_parameters() if name.endswith("layers.13.mlp.down_proj.weight")}
    grads = [p.requires_grad for p in smollm.model.parameters()]
    seen: list[float] = []
    learned = optimized_directions(smollm, few_pairs, init, OptimizeSettings(alpha=4.0, steps=3, pairs_per_step=4, lr=0.01),
                                   on_step=lambda _k, loss: seen.append(loss))
    assert sorted(learned) == list(LAYERS) and len(seen) == 3
    for layer, d in learned.items():
        assert abs(float(d.norm()) - 1) < 1e-5
        cosine = float(d @ init[layer])
        assert 0.5 < cosine < 0.9999, (layer, cosine)  # moved, but from the mean difference
    pairs = encode_pairs(smollm, few_pairs)
    before, after = _mean_margin(smollm, pairs, init, 4.0), _mean_margin(smollm, pairs, learned, 4.0)
    print(f"mean margin at alpha 4: {before:+.2f} nats from the mean difference, {after:+.2f} trained")
    assert before > 0 and after > before + 1.0, (before, after)
    # Steered the other way, the learned axis prefers the negative replies: a bidirectional axis.
    assert _mean_margin(smollm, pairs, learned, -4.0) < 0
    assert [p.requires_grad for p in smollm.model.parameters()] == grads
    for name, w in weights.items():
        assert torch.equal(dict(smollm.model.named_parameters())[name], w)


def test_bad_settings_are_refused(smollm, few_pairs):
    init = {12: torch.ones(smollm.hidden_size)}
    with pytest.raises(ValueError, match="alpha must be > 0"):
        optimized_directions(smollm, few_pairs, init, OptimizeSettings(alpha=0.0))
    one = Concept(**{**few_pairs.__dict__, "pairs": few_pairs.pairs[:1]})
    with pytest.raises(ValueError, match="at least 2"):
        optimized_directions(smollm, one, init, OptimizeSettings(alpha=4.0))


def test_derive_optimize_stores_the_trained_vector_and_resume_tells_them_apart(smollm, paths, tmp_path, monkeypatch):
    """`steer derive --optimize`: the steering layers' directions are trained and the rest are the
    mean difference's; `--resume` keeps an optimised vector only when optimising again."""
    (tmp_path / "pairs").mkdir()
    data = json.loads((paths.pairs / "playfulness.json").read_text())
    (tmp_path / "pairs" / "playfulness.json").write_text(json.dumps({**data, "pairs": data["pairs"][:4]}))
    monkeypatch.setenv("STEER_VECTORS_DIR", str(tmp_path))
    out = tmp_path / "out"
    args = ("derive", "--concepts", "playfulness", "--out", str(out), "--quiet")
    res = run(*args, "--optimize", "--optimize-steps", "1")
    assert res.returncode == 0, res.stderr
    cv = read_vector(vector_path(out, "playfulness"))
    caa = derive_concept(smollm, load_concept(tmp_path / "pairs", "playfulness"))
    trained = json.loads(cv.metadata["optimized"])
    assert cv.method == METHOD and trained["layers"] == list(smollm.steering_layers) and trained["steps"] == 1
    assert trained["alpha"] == pytest.approx(0.036 * statistics.fmean(caa.act_norms[k] for k in smollm.steering_layers), abs=1e-3)
    for layer in cv.layers:
        same = torch.allclose(cv.directions[layer], caa.directions[layer], atol=1e-5)
        assert same == (layer not in smollm.steering_layers), layer
    assert "resuming: 1 concept(s)" in run(*args, "--optimize", "--resume").stdout
    assert "resuming" not in run(*args, "--resume").stdout  # a plain derive replaces it
    assert read_vector(vector_path(out, "playfulness")).method == "caa-mean-diff"


def test_validation_sweeps_a_trained_vector_at_its_own_lower_strengths(paths):
    caa = read_vector(vector_path(paths.model_vectors("smollm2-135m-instruct"), "happy"))
    settings = SweepSettings(prompts=("hi",))
    assert caa.method != METHOD and concept_settings(settings, caa) is settings
    trained = concept_settings(settings, replace(caa, method=METHOD))
    assert trained.alpha_grid_rel == tuple(round(x * GRID_SCALE, 4) for x in ALPHA_GRID_REL)
    assert trained.both_grid_rel == tuple(round(x * GRID_SCALE, 4) for x in BOTH_GRID_REL)
    assert trained.screen_alpha_rel == round(settings.screen_alpha_rel * GRID_SCALE, 4) and trained.prompts == settings.prompts
