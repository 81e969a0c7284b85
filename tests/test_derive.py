"""CAA derivation on the real SmolLM2."""

import dataclasses

import torch

from steering.derive import derive_concept, render_reply
from steering.pairs import load_concept
from steering.store import read_vector, vector_path


def _small(paths, name: str, n: int = 6):
    concept = load_concept(paths.pairs, name)
    return dataclasses.replace(concept, pairs=concept.pairs[:n])


def test_batched_equals_one_at_a_time(smollm, paths) -> None:
    concept = _small(paths, "calm")
    batched = derive_concept(smollm, concept, batch_size=8)
    single = derive_concept(smollm, concept, batch_size=1)
    for layer in range(smollm.num_layers):
        cos = torch.nn.functional.cosine_similarity(batched.directions[layer], single.directions[layer], dim=0)
        assert cos > 0.9999, f"layer {layer}: cosine {cos:.6f}"
        assert abs(batched.act_norms[layer] - single.act_norms[layer]) / single.act_norms[layer] < 1e-3


def test_vector_fields(smollm, paths) -> None:
    concept = _small(paths, "happy")
    cv = derive_concept(smollm, concept)
    assert cv.layers == list(range(smollm.num_layers))
    assert cv.fingerprint == smollm.fingerprint and cv.pair_count == 6
    assert cv.pairs_sha256 == concept.pairs_sha256
    for layer in cv.layers:
        assert abs(float(cv.directions[layer].norm()) - 1.0) < 1e-5
        assert cv.raw_norms[layer] > 0 and cv.act_norms[layer] > 0
    # The residual stream grows through the stack: the alpha scale must show it.
    assert cv.act_norms[18] > cv.act_norms[2]


def test_rendering_uses_the_chat_template_and_leaves_the_reply_open(smollm) -> None:
    text = render_reply(smollm, "How are you?", "Great, thanks!")
    assert "<|im_start|>user\nHow are you?<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\nGreat, thanks!")


def test_rederiving_happy_reproduces_the_committed_vector(smollm, paths) -> None:
    committed = read_vector(vector_path(paths.model_vectors(smollm.name), "happy"))
    assert committed.fingerprint == smollm.fingerprint
    fresh = derive_concept(smollm, load_concept(paths.pairs, "happy"))
    assert fresh.pairs_sha256 == committed.pairs_sha256
    for layer in committed.layers:
        cos = torch.nn.functional.cosine_similarity(fresh.directions[layer], committed.directions[layer], dim=0)
        assert cos > 0.999, f"layer {layer}: cosine {cos:.5f}"
