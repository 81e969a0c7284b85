"""The dynamically int8-quantised SmolLM2 twin: its own model, fingerprint and vectors; the
full-precision vectors are refused on it unless forced, and a forced vector says so."""

import json
from pathlib import Path

import pytest
import torch
from torch.ao.nn.quantized.dynamic import Linear as DynamicInt8Linear

from steering.errors import ConfigError, VectorError
from steering.generate import GenerationSettings, generate
from steering.gate import logit_lens_tokens
from steering.loading import LoadedModel, head_weight, load_model
from steering.registry import load_registry
from steering.store import load_vector, read_vector, vector_path
from steering.twin import layer_cosines
from steer_cli import steer

TWIN = "smollm2-135m-instruct-int8"
REFERENCE = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def twin(paths) -> LoadedModel:
    return load_model(load_registry(paths.registry).get(TWIN), paths.cache, device="cpu")


def _vector(paths, model: str, loaded: LoadedModel, force: bool = False):
    return load_vector(vector_path(paths.model_vectors(model), "happy"), fingerprint=loaded.fingerprint,
                       hidden_size=loaded.hidden_size, layers=loaded.steering_layers, force=force)


def test_twin_is_quantised_where_the_hooks_are_and_nowhere_else(twin: LoadedModel, smollm: LoadedModel) -> None:
    block = twin.layers[0]
    assert isinstance(block.self_attn.q_proj, DynamicInt8Linear)
    assert isinstance(block.mlp.down_proj, DynamicInt8Linear)
    assert not any(isinstance(m, DynamicInt8Linear) for m in smollm.model.modules())
    assert isinstance(twin.model.lm_head, DynamicInt8Linear)  # its own int8 copy of the tied embedding
    assert twin.model.model.embed_tokens.weight.dtype == torch.float32
    assert twin.fingerprint != smollm.fingerprint


def test_the_gate_reads_the_int8_head_as_the_model_applies_it(paths, twin: LoadedModel, smollm: LoadedModel) -> None:
    int8, full = head_weight(twin.model), head_weight(smollm.model)
    assert int8.shape == full.shape and int8.dtype == torch.float32
    err = (int8 - full).abs().max() / full.abs().max()
    assert 0 < err < 0.02, err  # quantised (not the float tensor), within int8's step
    assert logit_lens_tokens(twin, _vector(paths, TWIN, twin))  # the gate's words come from that head


def test_full_precision_vector_is_refused_on_the_twin_unless_forced(paths, twin: LoadedModel, smollm: LoadedModel) -> None:
    own = _vector(paths, TWIN, twin)
    assert own.fingerprint == twin.fingerprint and "forced_onto" not in own.metadata
    with pytest.raises(VectorError, match="fingerprint"):
        _vector(paths, REFERENCE, twin)
    forced = _vector(paths, REFERENCE, twin, force=True)
    assert forced.fingerprint == smollm.fingerprint
    assert forced.metadata["forced_onto"] == twin.fingerprint
    # The twin's own direction is close to, but not, the full-precision one.
    cos = layer_cosines(own, forced)
    assert set(cos) == set(own.layers)
    assert all(0.2 < cos[layer] < 0.99 for layer in twin.steering_layers), cos


def test_steering_moves_the_quantised_model(paths, twin: LoadedModel) -> None:
    cv = _vector(paths, TWIN, twin)
    prompt = "Tell me about your morning."
    out = generate(twin, [prompt, prompt], [None, cv.additions(8.0, twin.steering_layers)], GenerationSettings(max_new_tokens=16))
    assert out[0].text != out[1].text


def test_layer_cosines_of_a_vector_with_itself_are_one(paths, smollm: LoadedModel) -> None:
    cv = _vector(paths, REFERENCE, smollm)
    assert all(abs(v - 1.0) < 1e-4 for v in layer_cosines(cv, cv).values())


def test_registry_refuses_unknown_or_non_float32_runtime_quantisation(tmp_path: Path) -> None:
    base = '[models.m]\nsource = { kind = "local", path = "x" }\n'
    for extra, message in (('quantize = "int4"\n', "not one of"), ('quantize = "dynamic-int8"\ndtype = "float16"\n', "float32")):
        (tmp_path / "models.toml").write_text(base + extra)
        with pytest.raises(ConfigError, match=message):
            load_registry(tmp_path / "models.toml")


def test_cli_refuses_foreign_vectors_and_records_a_force() -> None:
    common = ["generate", "--model", TWIN, "--prompt", "Hi!", "--concept", "happy", "--alpha", "6",
              "--vectors-from", REFERENCE, "--max-new-tokens", "4", "--json"]
    refused = steer(*common)
    assert refused.returncode == 1 and "fingerprint" in refused.stderr and "Traceback" not in refused.stderr
    forced = steer(*common, "--force")
    assert forced.returncode == 0, forced.stderr
    assert "FORCED: happy vector derived on smollm2-135m-instruct" in forced.stderr
    row = json.loads(forced.stdout.strip().splitlines()[-1])
    assert row["forced"] is True and row["vectors_from"] == REFERENCE


def test_compare_twin_announces_each_forced_vector_before_comparing(paths, twin: LoadedModel, tmp_path: Path) -> None:
    """Every reference vector forced onto the twin is announced, with the fingerprint it was
    derived on, before the comparison uses it; the comparison is written to a copy of the store."""
    import shutil

    from steering.settings import Paths
    from steering.twin import run_comparison

    for folder in ("eval", "guard", REFERENCE, TWIN):
        shutil.copytree(paths.vectors / folder, tmp_path / folder, ignore=shutil.ignore_patterns("plots"))
    scratch = Paths(paths.registry, tmp_path, paths.cache)
    heard: list[tuple[str, str, str]] = []
    result, written, refused = run_comparison(
        twin, REFERENCE, scratch, [], 1,
        on_forced=lambda cv: heard.append((cv.concept, cv.fingerprint, cv.metadata["forced_onto"])))
    assert not refused and written == [tmp_path / TWIN / "twin.json", tmp_path / TWIN / "twin.md"]
    assert sorted(c for c, _, _ in heard) == sorted(result["forced"]) and all(result["forced"].values())
    reference_fp = read_vector(vector_path(paths.model_vectors(REFERENCE), "happy")).fingerprint
    assert {(fp, onto) for _, fp, onto in heard} == {(reference_fp, twin.fingerprint)}
