"""Loading the real packaged models through the registry: cache, fingerprint, layer paths."""

import dataclasses
import json

import pytest
import torch

from steering.errors import ModelLoadError, NotFoundError
from steering.loading import CACHE_MARKER, cache_dir_for, load_model, prepare
from steering.registry import load_registry


def test_smollm_loads_with_its_layers(smollm) -> None:
    assert smollm.num_layers == 30 and smollm.hidden_size == 576
    assert smollm.layers.template == "model.layers.{num}"
    assert smollm.steering_layers == tuple(range(12, 19))
    assert smollm.has_chat_template and smollm.tokenizer.padding_side == "left"
    assert smollm.model.dtype == torch.float32


def test_cache_is_keyed_by_fingerprint_and_reused(smollm, paths) -> None:
    directory, fp = prepare(smollm.entry, paths.cache)
    assert fp == smollm.fingerprint
    assert directory == cache_dir_for(smollm.entry, fp, paths.cache)
    assert json.loads((directory / CACHE_MARKER).read_text())["fingerprint"] == fp
    assert any(directory.glob("*.safetensors"))
    mtime = (directory / CACHE_MARKER).stat().st_mtime_ns
    prepare(smollm.entry, paths.cache)  # reuse: nothing rewritten
    assert (directory / CACHE_MARKER).stat().st_mtime_ns == mtime


def test_a_broken_layer_path_fails_at_load_with_the_fix(smollm, paths) -> None:
    entry = dataclasses.replace(smollm.entry, layer_template="model.layers.{num}.mlp")
    with pytest.raises(ModelLoadError, match="not a whole block|not a decoder block"):
        load_model(entry, paths.cache)
    entry = dataclasses.replace(smollm.entry, layer_template="model.blocks.{num}")
    with pytest.raises(ModelLoadError, match=r"(?s)model\.blocks\.\{num\}.*model\.layers \(length 30"):
        load_model(entry, paths.cache)


def test_cuda_requested_without_cuda_is_a_clear_error(smollm, paths) -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA is present here; this checks the message on CPU-only machines")
    with pytest.raises(ModelLoadError, match="CUDA is not available"):
        load_model(smollm.entry, paths.cache, device="cuda")


def test_missing_package_is_reported(paths, tmp_path) -> None:
    (tmp_path / "models.toml").write_text(
        '[models.x]\nsource = { kind = "gguf-package", package = "no-such-package", file = "x.gguf" }\n'
    )
    with pytest.raises(NotFoundError, match="package 'no-such-package' is not installed"):
        load_model(load_registry(tmp_path / "models.toml").get("x"), tmp_path)


def test_hub_ids_are_only_read_from_the_local_cache(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    (tmp_path / "models.toml").write_text('[models.x]\nsource = { kind = "hub-cache", repo_id = "org/not-cached" }\n')
    with pytest.raises(NotFoundError, match="not in the local Hugging Face cache and we never download"):
        load_model(load_registry(tmp_path / "models.toml").get("x"), tmp_path)
