from pathlib import Path

import pytest

from steering.errors import ConfigError, NotFoundError
from steering.loading import default_band, fingerprint
from steering.registry import load_registry


def test_checked_in_registry(paths) -> None:
    reg = load_registry(paths.registry)
    assert reg.default == "smollm2-135m-instruct"
    assert {"smollm2-135m-instruct", "gemma3-270m"} <= set(reg.models)
    smol = reg.get(None)
    assert smol.source.kind == "gguf-package" and smol.dtype == "float32"
    assert reg.get("gemma3-270m").source.assemble is True
    assert smol.sweep_scale == 1.0 and reg.get("qwen2.5-coder-0.5b-instruct").sweep_scale == 0.5


def test_sweep_scale_scales_every_swept_strength() -> None:
    from steering.validate import ALPHA_GRID_REL, BOTH_GRID_REL, SweepSettings

    base = SweepSettings(prompts=("hi",))
    assert base.scaled(1.0) is base
    half = base.scaled(0.5)
    assert half.alpha_grid_rel == tuple(round(x / 2, 4) for x in ALPHA_GRID_REL) == (0.012, 0.018, 0.024, 0.036)
    assert half.both_grid_rel == tuple(round(x / 2, 4) for x in BOTH_GRID_REL) and half.screen_alpha_rel == 0.018
    assert (half.prompts, half.allowlist_seeds, half.max_new_tokens) == (base.prompts, base.allowlist_seeds, base.max_new_tokens)


def test_default_band_is_middle_to_late_third() -> None:
    assert default_band(32) == tuple(range(13, 20))
    assert default_band(30) == tuple(range(12, 19))
    assert default_band(18) == tuple(range(7, 12))


def test_unknown_model_names_the_known_ones(paths) -> None:
    with pytest.raises(NotFoundError, match="registered models: .*smollm2-135m-instruct"):
        load_registry(paths.registry).get("nope")


@pytest.mark.parametrize(
    "body, message",
    [
        ('[models.m]\nsource = { kind = "ftp" }', "source.kind must be one of"),
        ('[models.m]\nsource = { kind = "local" }', "needs path"),
        ('[models.m]\nsource = { kind = "local", path = "x" }\ndtype = "int3"', "dtype 'int3'"),
        ('[models.m]\nsource = { kind = "local", path = "x" }\nlayer_template = "model.layers"', "must contain"),
        ('[models.m]\nsource = { kind = "local", path = "x" }\nlayers = []', "non-empty list"),
        ('[models.m]\nsource = { kind = "local", path = "x" }\nflavour = 1', "unknown field"),
        ('[models.m]\nsource = { kind = "local", path = "x" }\nsweep_scale = 0', "sweep_scale must be a number from 0.1 to 4"),
        ('[models.m]\nsource = { kind = "local", path = "x" }\nsweep_scale = "low"', "sweep_scale must be a number"),
        ("nonsense = = 1", "not valid TOML"),
        ("", "lists no"),
    ],
)
def test_bad_registry_says_what_to_fix(tmp_path: Path, body: str, message: str) -> None:
    path = tmp_path / "models.toml"
    path.write_text(body)
    with pytest.raises(ConfigError, match=message):
        load_registry(path)


def test_fingerprint_covers_weights_dtype_and_quantisation(tmp_path: Path) -> None:
    model = tmp_path / "m"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"weights-1")
    base = '[models.m]\nsource = { kind = "local", path = "m" }\n'
    (tmp_path / "models.toml").write_text(base)
    fp = fingerprint(load_registry(tmp_path / "models.toml").get("m"))
    (tmp_path / "models.toml").write_text(base + 'dtype = "bfloat16"\n')
    fp_dtype = fingerprint(load_registry(tmp_path / "models.toml").get("m"))
    (tmp_path / "models.toml").write_text(base + 'quantization = "int8-dynamic"\n')
    fp_quant = fingerprint(load_registry(tmp_path / "models.toml").get("m"))
    (model / "model.safetensors").write_bytes(b"weights-2")
    (tmp_path / "models.toml").write_text(base)
    fp_weights = fingerprint(load_registry(tmp_path / "models.toml").get("m"))
    assert len({fp, fp_dtype, fp_quant, fp_weights}) == 4


@pytest.mark.parametrize(
    "name, count, size, sha256, depth",
    [
        ("qwen2.5-coder-0.5b-instruct", 6, 491_400_064, "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", 24),
        ("qwen2.5-coder-1.5b-instruct", 22, 1_117_320_768, "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046", 28),
    ],
)
def test_qwen_is_pinned_to_qwens_own_gguf(paths, name: str, count: int, size: int, sha256: str, depth: int) -> None:
    entry = load_registry(paths.registry).get(name)
    src = entry.source
    assert src.kind == "gguf-pieces" and (src.size, src.sha256) == (size, sha256)
    assert len(src.pieces) == count and src.pieces[-1][1] == f"data/part{count:02d}.bin"
    assert src.pieces[0][0].endswith("-part1") and src.pieces[-1][0].endswith(f"-part{count}")
    assert entry.layers == default_band(depth) and entry.layer_template == "model.layers.{num}"
