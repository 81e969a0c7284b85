"""The hand-written concept pairs: complete, varied, and free of duplicates."""

import json

import pytest

from steering.pairs import concept_names, load_concept

CONCEPTS = (
    "happy hopeful content excited sad melancholy bored enthusiasm urgency angry anxious frustrated calm "
    "empathy kind playfulness emotional dominant submissive hostile mean warmth assertive"
).split()


def test_every_concept_has_a_file(paths) -> None:
    assert len(CONCEPTS) == 23
    assert sorted(concept_names(paths.pairs)) == sorted(CONCEPTS)


@pytest.mark.parametrize("name", CONCEPTS)
def test_pairs_are_well_formed(paths, name: str) -> None:
    concept = load_concept(paths.pairs, name)
    assert concept.name == name
    assert len(concept.pairs) >= 15
    for pair in concept.pairs:
        assert pair.context.strip() and pair.positive.strip() and pair.negative.strip()
        assert pair.positive.strip() != pair.negative.strip()
    for field in ("context", "positive", "negative"):
        texts = [getattr(p, field).strip().lower() for p in concept.pairs]
        assert len(set(texts)) == len(texts), f"{name}: duplicate {field}"
    assert -1 <= concept.valence <= 1 and -1 <= concept.arousal <= 1
    assert len(concept.words) >= 10 and all(w == w.lower() and " " not in w for w in concept.words)


def test_no_reply_is_shared_between_concepts(paths) -> None:
    seen: dict[str, str] = {}
    for name in CONCEPTS:
        for pair in load_concept(paths.pairs, name).pairs:
            for text in (pair.positive, pair.negative):
                key = text.strip().lower()
                assert seen.setdefault(key, name) == name, f"{name} and {seen[key]} share {text!r}"


def test_pairs_hash_changes_with_content(paths, tmp_path) -> None:
    data = json.loads((paths.pairs / "happy.json").read_text())
    (tmp_path / "happy.json").write_text(json.dumps(data))
    same = load_concept(tmp_path, "happy").pairs_sha256
    assert same == load_concept(paths.pairs, "happy").pairs_sha256
    data["pairs"][0]["positive"] += "!"
    (tmp_path / "happy.json").write_text(json.dumps(data))
    assert load_concept(tmp_path, "happy").pairs_sha256 != same
