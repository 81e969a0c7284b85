"""AWQ entries on the CPU: the registry's fields, the clear errors where the AWQ library or
CUDA is missing, and fused (AutoAWQ-style) models refused by the hook path."""

import importlib.util
import re
from pathlib import Path

import pytest
import torch

from steering.errors import ConfigError, ModelLoadError
from steering.layers import LayerPathError, resolve_layers
from steering.loading import LoadedModel, fingerprint, load_model, prepare
from steering.registry import load_registry, with_dtype
from steering.validate import check_hook_path
from tiny_models import HIDDEN_SIZE, NUM_LAYERS, tiny_model

ROOT = Path(__file__).resolve().parents[1]
AWQ_ENTRY = """
[models.m]
source = { kind = "local", path = "m" }
dtype = "float16"
device = "cuda"
quantization = "awq-4bit-gemm"
loader = "%s"
"""


def _registry(tmp_path: Path, body: str):
    (tmp_path / "m").mkdir(exist_ok=True)
    (tmp_path / "m" / "model.safetensors").write_bytes(b"packed int4 weights")
    (tmp_path / "models.toml").write_text(body)
    return load_registry(tmp_path / "models.toml")


@pytest.mark.parametrize("loader", ["autoawq", "transformers"])
def test_registry_reads_awq_fields(tmp_path: Path, loader: str) -> None:
    entry = _registry(tmp_path, AWQ_ENTRY % loader).get("m")
    assert entry.loader == loader and entry.quantization == "awq-4bit-gemm" and entry.is_awq
    plain = _registry(tmp_path, '[models.p]\nsource = { kind = "local", path = "m" }\n').get("p")
    assert plain.loader == "transformers" and not plain.is_awq


def test_the_commented_example_in_models_toml_parses(tmp_path: Path) -> None:
    """The documented AWQ example stays a valid entry, and stays commented out (never loaded by default)."""
    text = (ROOT / "models.toml").read_text()
    block = re.search(r"^# \[models\.(\S+)\]\n(?:#.*\n)+", text, re.M)
    assert block, "models.toml should carry a commented-out AWQ example"
    body = "\n".join(line[2:] if line.startswith("# ") else "" for line in block.group(0).splitlines())
    (tmp_path / "models.toml").write_text(body)
    entry = load_registry(tmp_path / "models.toml").get(block.group(1))
    assert entry.is_awq and entry.loader == "autoawq" and entry.source.kind == "hub-cache"
    assert block.group(1) not in load_registry(ROOT / "models.toml").models


@pytest.mark.parametrize(
    "fields, message",
    [
        ('quantization = "awq-4bit-gemm"\nloader = "vllm"', "loader 'vllm' is not one of transformers, autoawq"),
        ('quantization = "awq-3bit"\nloader = "autoawq"', "quantization 'awq-3bit' is not one of"),
        ('quantization = "awq-4bit-gemv"\nloader = "autoawq"', "quantization 'awq-4bit-gemv' is not one of"),
        ('loader = "autoawq"', "loader 'autoawq' loads AWQ checkpoints only"),
        ('quantization = "awq-4bit-gemm"\nloader = "autoawq"\n[models.n]\nsource = { kind = "local", path = "m" }\n'
         'quantization = "awq-4bit-gemm"', "AWQ kernels compute in float16"),  # n: float32 by default
        ('quantization = ""', "quantization must be a non-empty string"),
    ],
)
def test_bad_awq_fields_say_what_to_fix(tmp_path: Path, fields: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        _registry(tmp_path, f'[models.m]\nsource = {{ kind = "local", path = "m" }}\ndtype = "float16"\n{fields}\n')


def test_awq_from_a_gguf_package_is_refused(tmp_path: Path) -> None:
    body = '[models.m]\nsource = { kind = "gguf-package", package = "p", file = "f.gguf" }\ndtype = "float16"\nquantization = "awq-4bit-gemm"\n'
    with pytest.raises(ConfigError, match="not a GGUF package"):
        _registry(tmp_path, body)


def test_awq_checkpoints_skip_the_conversion_cache(tmp_path: Path) -> None:
    entry = _registry(tmp_path, AWQ_ENTRY % "autoawq").get("m")
    directory, fp = prepare(entry, tmp_path / "cache")
    assert directory == tmp_path / "m" and fp == fingerprint(entry)
    assert not (tmp_path / "cache").exists()


def test_dtype_override_changes_the_fingerprint(tmp_path: Path) -> None:
    entry = _registry(tmp_path, '[models.p]\nsource = { kind = "local", path = "m" }\n').get("p")
    half = with_dtype(entry, "float16")
    assert half.dtype == "float16" and with_dtype(entry, None) is entry
    assert fingerprint(half) != fingerprint(entry)  # float32 vectors are refused on the fp16 model
    with pytest.raises(ConfigError, match="dtype 'int8' is not one of"):
        with_dtype(entry, "int8")
    awq = _registry(tmp_path, AWQ_ENTRY % "autoawq").get("m")
    with pytest.raises(ConfigError, match="cannot run 'm' in float32"):
        with_dtype(awq, "float32")


@pytest.mark.parametrize("loader, backend", [("autoawq", "awq"), ("transformers", None)])
def test_loading_awq_says_which_environment_provides_it(tmp_path: Path, loader: str, backend: str | None) -> None:
    from steering.awq import transformers_awq_backend

    backend = backend or transformers_awq_backend()
    entry = _registry(tmp_path, AWQ_ENTRY % loader).get("m")
    with pytest.raises(ModelLoadError) as info:
        load_model(entry, tmp_path / "cache", device="cpu")
    message = str(info.value)
    if importlib.util.find_spec(backend) is None:  # the main environment: no AWQ library
        assert "not installed in this environment" in message and "requirements-awq.txt" in message
        assert f"`{backend}`" in message or "AutoAWQ" in message
    else:  # the AWQ environment on a machine without a GPU
        assert "its kernels run on CUDA only" in message and "--device cuda" in message


# Fused models, shaped like AutoAWQ's (awq/modules/fused): blocks whose attention and MLP are
# fused modules, and a LlamaLikeModel that replaces `model.model`, so `model.layers` is gone.


class QuantAttentionFused(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv_proj = torch.nn.Linear(HIDDEN_SIZE, 3 * HIDDEN_SIZE)
        self.o_proj = torch.nn.Linear(HIDDEN_SIZE, HIDDEN_SIZE)


class QuantFusedMLP(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate_up = torch.nn.Linear(HIDDEN_SIZE, 2 * HIDDEN_SIZE)


class LlamaLikeBlock(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm_1 = torch.nn.LayerNorm(HIDDEN_SIZE)
        self.attn = QuantAttentionFused()
        self.norm_2 = torch.nn.LayerNorm(HIDDEN_SIZE)
        self.mlp = QuantFusedMLP()


class LlamaLikeModel(torch.nn.Module):
    def __init__(self, embedding: torch.nn.Module, norm: torch.nn.Module) -> None:
        super().__init__()
        self.embedding = embedding
        self.blocks = torch.nn.ModuleList(LlamaLikeBlock() for _ in range(NUM_LAYERS))
        self.norm = norm


def _autoawq_fused() -> torch.nn.Module:
    model, _ = tiny_model("llama")
    model.model = LlamaLikeModel(model.model.embed_tokens, model.model.norm)
    return model


def _transformers_fused() -> torch.nn.Module:
    """transformers 4.x's fuse_awq_modules: fused modules swapped in inside each decoder layer."""
    model, _ = tiny_model("llama")
    for layer in model.model.layers:
        layer.self_attn = QuantAttentionFused()
        layer.mlp = QuantFusedMLP()
    return model


@pytest.mark.parametrize("make", [_autoawq_fused, _transformers_fused])
@pytest.mark.parametrize("template", [None, "model.layers.{num}"])
def test_fused_models_are_refused_with_the_fix(make, template: str | None) -> None:
    with pytest.raises(LayerPathError) as info:
        resolve_layers(make(), template)
    message = str(info.value)
    assert "load with fuse_layers=False" in message
    assert "QuantAttentionFused" in message


def test_hook_path_check_fails_on_a_model_fused_after_loading(tmp_path: Path) -> None:
    model, template = tiny_model("llama")
    entry = _registry(tmp_path, f'[models.t]\nsource = {{ kind = "local", path = "m" }}\nlayer_template = "{template}"\nlayers = [1, 2]\n').get("t")
    loaded = LoadedModel(entry=entry, model=model, tokenizer=None, fingerprint="x",
                         layers=resolve_layers(model, template), device=torch.device("cpu"))
    model.model = LlamaLikeModel(model.model.embed_tokens, model.model.norm)  # what fuse_layers=True does
    check = check_hook_path(loaded)
    assert not check.passed
    assert "load with fuse_layers=False" in check.detail
