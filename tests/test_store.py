"""The vector store refuses every kind of bad file, names the reason, and keeps serving the rest."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from steering.errors import VectorError
from steering.store import load_store, load_vector, save_vector, stored_concepts, vector_path
from steering.vector import ConceptVector

FP = "a" * 64
HIDDEN = 8


def make_vector(concept: str = "happy", fingerprint: str = FP, layers: range = range(4)) -> ConceptVector:
    g = torch.Generator().manual_seed(len(concept))
    dirs = {i: torch.nn.functional.normalize(torch.randn(HIDDEN, generator=g), dim=0) for i in layers}
    return ConceptVector(
        concept=concept,
        model="tiny",
        fingerprint=fingerprint,
        directions=dirs,
        raw_norms={i: 1.5 + i for i in layers},
        act_norms={i: 100.0 + i for i in layers},
        pairs_sha256="b" * 64,
        pair_count=15,
        metadata={"created": "2026-11-25T00:00:00+00:00"},
    )


def _load(path: Path, **kw) -> ConceptVector:
    args = dict(fingerprint=FP, hidden_size=HIDDEN, layers=(1, 2))
    args.update(kw)
    return load_vector(path, **args)


def test_round_trip_keeps_everything(tmp_path: Path) -> None:
    cv = make_vector()
    path = vector_path(tmp_path, "happy")
    save_vector(cv, path)
    back = _load(path)
    assert back.layers == cv.layers
    for layer in cv.layers:
        assert torch.equal(back.directions[layer], cv.directions[layer])
    assert back.raw_norms == cv.raw_norms and back.act_norms == cv.act_norms
    assert back.content_sha256 == cv.content_sha256
    assert (back.pairs_sha256, back.pair_count, back.method) == (cv.pairs_sha256, 15, "caa-mean-diff")
    assert back.metadata["created"] == "2026-11-25T00:00:00+00:00"
    assert stored_concepts(tmp_path) == ["happy"]


def test_other_model_is_refused_naming_both_fingerprints(tmp_path: Path) -> None:
    path = vector_path(tmp_path, "happy")
    save_vector(make_vector(fingerprint="c" * 64), path)
    with pytest.raises(VectorError, match=f"fingerprint {'c' * 16}.*fingerprint is {'a' * 16}"):
        _load(path)


def test_wrong_hidden_size_is_refused(tmp_path: Path) -> None:
    path = vector_path(tmp_path, "happy")
    save_vector(make_vector(), path)
    with pytest.raises(VectorError, match="hidden size 8 does not match the model's 16"):
        _load(path, hidden_size=16)


def test_missing_layer_is_refused(tmp_path: Path) -> None:
    path = vector_path(tmp_path, "happy")
    save_vector(make_vector(layers=range(2)), path)
    with pytest.raises(VectorError, match=r"no direction for steering layer\(s\) \[2\]"):
        _load(path)


def _rewrite(path: Path, mutate) -> None:
    """Change a saved file's tensors/metadata, keeping it a valid safetensors file."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    mutate(tensors, meta)
    save_file(tensors, str(path), metadata=meta)


def test_non_finite_values_are_refused(tmp_path: Path) -> None:
    path = vector_path(tmp_path, "happy")
    save_vector(make_vector(), path)
    _rewrite(path, lambda t, m: t["direction.1"].__setitem__(3, float("nan")))
    with pytest.raises(VectorError, match="layer 1 holds NaN"):
        _load(path)


def test_tampered_content_is_refused(tmp_path: Path) -> None:
    path = vector_path(tmp_path, "happy")
    save_vector(make_vector(), path)
    _rewrite(path, lambda t, m: t["direction.2"].mul_(-1))
    with pytest.raises(VectorError, match="content hash does not match"):
        _load(path)


def test_wrong_shape_is_refused(tmp_path: Path) -> None:
    path = vector_path(tmp_path, "happy")
    save_vector(make_vector(), path)
    _rewrite(path, lambda t, m: t.__setitem__("direction.1", torch.zeros(HIDDEN + 1)))
    with pytest.raises(VectorError, match=r"layer 1 has shape \(9,\), expected \(8,\)"):
        _load(path)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_files_are_refused(tmp_path: Path, damage: str) -> None:
    path = vector_path(tmp_path, "happy")
    save_vector(make_vector(), path)
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"\x00" * 64, "empty": b""}[damage])
    with pytest.raises(VectorError, match="corrupt or truncated"):
        _load(path)


def test_metadata_missing_keys_is_refused(tmp_path: Path) -> None:
    path = vector_path(tmp_path, "happy")
    save_vector(make_vector(), path)
    _rewrite(path, lambda t, m: m.pop("fingerprint"))
    with pytest.raises(VectorError, match="metadata lacks fingerprint"):
        _load(path)


def test_renamed_file_is_refused(tmp_path: Path) -> None:
    save_vector(make_vector("happy"), vector_path(tmp_path, "happy"))
    vector_path(tmp_path, "happy").rename(vector_path(tmp_path, "calm"))
    with pytest.raises(VectorError, match="named 'calm' but holds concept 'happy'"):
        _load(vector_path(tmp_path, "calm"))


def test_one_bad_file_never_stops_the_others(tmp_path: Path) -> None:
    for name in ("happy", "sad", "calm", "kind"):
        save_vector(make_vector(name), vector_path(tmp_path, name))
    vector_path(tmp_path, "sad").write_bytes(b"not a safetensors file")
    save_vector(make_vector("calm", fingerprint="d" * 64), vector_path(tmp_path, "calm"))
    good, refused = load_store(tmp_path, ["happy", "sad", "calm", "kind", "missing"], fingerprint=FP, hidden_size=HIDDEN)
    assert sorted(good) == ["happy", "kind"]
    assert sorted(refused) == ["calm", "missing", "sad"]
    assert "corrupt" in refused["sad"] and "fingerprint" in refused["calm"] and "no such" in refused["missing"]


def test_only_named_concepts_are_opened(tmp_path: Path, monkeypatch) -> None:
    """load_store reads exactly the files it is asked for (what an allowlist relies on)."""
    import builtins

    for name in ("happy", "hostile"):
        save_vector(make_vector(name), vector_path(tmp_path, name))
    opened: list[str] = []
    real_open = builtins.open

    def spy(file, *a, **k):
        opened.append(str(file))
        return real_open(file, *a, **k)

    monkeypatch.setattr(builtins, "open", spy)
    import safetensors

    real_safe_open = safetensors.safe_open
    monkeypatch.setattr("steering.store.safe_open", lambda f, **k: (opened.append(str(f)), real_safe_open(f, **k))[1])
    good, _ = load_store(tmp_path, ["happy"], fingerprint=FP, hidden_size=HIDDEN)
    assert list(good) == ["happy"]
    assert not any("hostile" in path for path in opened)
    assert any("happy" in path for path in opened)


def test_save_is_atomic_on_failure(tmp_path: Path) -> None:
    path = vector_path(tmp_path, "happy")
    save_vector(make_vector(), path)
    before = path.read_bytes()
    bad = make_vector()
    bad.directions[1] = "not a tensor"  # type: ignore[assignment]
    with pytest.raises(Exception):
        save_vector(bad, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["happy.safetensors"]
