"""The vector store: one safetensors file per model and concept, checked on every read.

Layout: `<vectors>/<model>/<concept>.safetensors` with tensors `direction.{layer}` (unit,
float32), `raw_norms` and `act_norms` (one entry per layer, in layer order) and string
metadata. Reading refuses a file for another model fingerprint, a wrong hidden size,
non-finite values, a missing layer, a content hash that does not match, or a file that
does not parse; one bad file never stops the others from loading.
"""

import json
import logging
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .atomic import atomic_path
from .errors import VectorError
from .vector import ConceptVector

log = logging.getLogger(__name__)

FORMAT_VERSION = "1"
SUFFIX = ".safetensors"
_CORE_KEYS = ("format_version", "concept", "model", "fingerprint", "layers", "hidden_size", "method",
              "pairs_sha256", "pair_count", "content_sha256")


def vector_path(model_dir: Path, concept: str) -> Path:
    return Path(model_dir) / f"{concept}{SUFFIX}"


def save_vector(cv: ConceptVector, path: Path) -> None:
    layers = cv.layers
    tensors = {f"direction.{layer}": cv.directions[layer].to(torch.float32).contiguous() for layer in layers}
    tensors["raw_norms"] = torch.tensor([cv.raw_norms[layer] for layer in layers], dtype=torch.float32)
    tensors["act_norms"] = torch.tensor([cv.act_norms[layer] for layer in layers], dtype=torch.float32)
    metadata = dict(cv.metadata)
    metadata.update(
        format_version=FORMAT_VERSION,
        concept=cv.concept,
        model=cv.model,
        fingerprint=cv.fingerprint,
        layers=json.dumps(layers),
        hidden_size=str(cv.hidden_size),
        method=cv.method,
        pairs_sha256=cv.pairs_sha256,
        pair_count=str(cv.pair_count),
        content_sha256=cv.content_sha256,
    )
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def read_vector(path: Path) -> ConceptVector:
    """Parse a vector file and check it against itself (format, shapes, finiteness, content hash)."""
    path = Path(path)
    if not path.is_file():
        raise VectorError(f"{path}: no such vector file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as exc:  # safetensors raises several kinds for a damaged file
        raise VectorError(f"{path}: corrupt or truncated vector file ({exc})") from None
    missing = [key for key in _CORE_KEYS if key not in meta]
    if missing:
        raise VectorError(f"{path}: metadata lacks {', '.join(missing)}; re-derive with `steer derive`")
    try:
        layers = [int(x) for x in json.loads(meta["layers"])]
        hidden = int(meta["hidden_size"])
    except (ValueError, TypeError):
        raise VectorError(f"{path}: metadata 'layers' or 'hidden_size' is malformed") from None
    absent = [layer for layer in layers if f"direction.{layer}" not in tensors]
    if absent or "raw_norms" not in tensors or "act_norms" not in tensors:
        raise VectorError(f"{path}: missing tensors for layer(s) {absent or 'norms'}; the file is incomplete")
    directions = {layer: tensors[f"direction.{layer}"] for layer in layers}
    for layer, d in directions.items():
        if tuple(d.shape) != (hidden,):
            raise VectorError(f"{path}: layer {layer} has shape {tuple(d.shape)}, expected ({hidden},)")
        if not torch.isfinite(d).all():
            raise VectorError(f"{path}: layer {layer} holds NaN or infinite values")
    raw, act = tensors["raw_norms"], tensors["act_norms"]
    if raw.shape != (len(layers),) or act.shape != (len(layers),) or not (torch.isfinite(raw).all() and torch.isfinite(act).all()):
        raise VectorError(f"{path}: norms are malformed or non-finite")
    extra = {k: v for k, v in meta.items() if k not in _CORE_KEYS}
    cv = ConceptVector(
        concept=meta["concept"],
        model=meta["model"],
        fingerprint=meta["fingerprint"],
        directions=directions,
        raw_norms={layer: float(raw[i]) for i, layer in enumerate(layers)},
        act_norms={layer: float(act[i]) for i, layer in enumerate(layers)},
        method=meta["method"],
        pairs_sha256=meta["pairs_sha256"],
        pair_count=int(meta["pair_count"]),
        metadata=extra,
    )
    if cv.content_sha256 != meta["content_sha256"]:
        raise VectorError(f"{path}: content hash does not match its metadata; the file was altered or damaged")
    return cv


def load_vector(
    path: Path, *, fingerprint: str, hidden_size: int, layers: Iterable[int] = (), force: bool = False
) -> ConceptVector:
    """Read a vector for a loaded model: it must match the model's fingerprint, width and layers.

    `force` accepts a vector from another fingerprint (a quantised twin's fp32 vectors, to
    measure what that does); the vector then carries `forced_onto` in its metadata and a
    warning is logged, so whatever reports on it says it was forced. Services never force.
    """
    path = Path(path)
    cv = read_vector(path)
    if cv.concept != path.stem:
        raise VectorError(f"{path}: file is named {path.stem!r} but holds concept {cv.concept!r}")
    if cv.fingerprint != fingerprint and force:
        log.warning("FORCED: %s derived on %s (fingerprint %s) is used on fingerprint %s",
                    path, cv.model, cv.fingerprint[:16], fingerprint[:16])
        cv.metadata["forced_onto"] = fingerprint
    elif cv.fingerprint != fingerprint:
        raise VectorError(
            f"{path}: derived for model {cv.model!r} with fingerprint {cv.fingerprint[:16]}, "
            f"but the loaded model's fingerprint is {fingerprint[:16]}; vectors only work on the exact "
            f"model and quantisation they came from: re-derive with `steer derive` (or force it, recorded, where a command offers --force)"
        )
    if cv.hidden_size != hidden_size:
        raise VectorError(f"{path}: hidden size {cv.hidden_size} does not match the model's {hidden_size}")
    missing = [layer for layer in layers if layer not in cv.directions]
    if missing:
        raise VectorError(f"{path}: no direction for steering layer(s) {missing}")
    return cv


def load_store(
    model_dir: Path,
    concepts: Iterable[str],
    *,
    fingerprint: str,
    hidden_size: int,
    layers: Iterable[int] = (),
) -> tuple[dict[str, ConceptVector], dict[str, str]]:
    """Load the named concepts; return the good vectors and, per refused concept, why.

    Only files of the named concepts are opened, so a caller that restricts `concepts`
    (the Blip allowlist) is sure no other file is read.
    """
    layers = tuple(layers)
    loaded: dict[str, ConceptVector] = {}
    refused: dict[str, str] = {}
    for concept in concepts:
        try:
            loaded[concept] = load_vector(
                vector_path(model_dir, concept), fingerprint=fingerprint, hidden_size=hidden_size, layers=layers
            )
        except VectorError as exc:
            refused[concept] = str(exc)
    return loaded, refused


def stored_concepts(model_dir: Path) -> list[str]:
    return sorted(p.stem for p in Path(model_dir).glob(f"*{SUFFIX}"))
