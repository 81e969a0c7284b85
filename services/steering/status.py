"""What each registered model has on this machine: the fingerprint it would load with, its
stored vectors, and what its validation record lets it serve (`steer models`)."""

from pathlib import Path
from typing import Any

from .errors import SteeringError, VectorError
from .loading import fingerprint
from .profiles import BLIP_ALLOWLIST, Profile, served_alpha
from .record import assess
from .registry import ModelEntry, Registry, with_dtype
from .store import read_vector, stored_concepts


def model_status(entry: ModelEntry, model_dir: Path, default: bool = False) -> dict[str, Any]:
    """One model's row; `entry` already in the dtype it would load in (the fingerprint includes it)."""
    try:
        fp, note = fingerprint(entry), ""
    except SteeringError as exc:  # its files are not installed: the stored vectors cannot be checked
        fp, note = None, str(exc)
    concepts = stored_concepts(model_dir)
    matching = {}
    for c in concepts:
        try:
            cv = read_vector(model_dir / f"{c}.safetensors")
        except VectorError:
            continue
        if cv.fingerprint == fp:
            matching[c] = cv
    state = assess(entry.name, model_dir, fp or "", matching)
    return {
        "name": entry.name,
        "default": default,
        "source": entry.source.kind,
        "dtype": entry.dtype,
        "device": entry.device,
        "quantization": entry.quantization,
        "fingerprint": fp,
        "vectors": len(matching) if fp else len(concepts),
        "stale_vectors": len(concepts) - len(matching) if fp else 0,  # unknowable without the model's files
        "steerable": state.steerable,
        "state": state.reason,
        "servable": state.servable,
        "blip": [c for c in state.servable
                 if c in BLIP_ALLOWLIST and served_alpha(state.concepts[c], Profile.BLIP) is not None],
        # What Blip's Chat serves each concept with (its record's choice of mode), e.g. "both at 6.1"
        "chat": {c: b.mode.value + ("" if b.alpha is None else f" at {b.alpha:g}")
                 for c, cs in sorted(state.concepts.items()) if (b := cs.blip) is not None},
        "note": note,
    }


def registry_status(registry: Registry, vectors_dir: Path, dtype: str | None = None) -> list[dict[str, Any]]:
    """Every registered model's row, in registry order; `dtype` overrides each entry's."""
    return [model_status(with_dtype(entry, dtype), vectors_dir / name, default=name == registry.default)
            for name, entry in registry.models.items()]
