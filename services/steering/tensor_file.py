"""Small numpy models on disk: float32 arrays and string metadata in one safetensors file,
written atomically (a reader sees the old file or the new one) and read with an error that
says how to rebuild it. The tagger's model and the guard's harm model are stored this way."""

from collections.abc import Mapping
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from .atomic import atomic_path
from .errors import ModelLoadError, NotFoundError


def save_arrays(path: Path, arrays: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> None:
    tensors = {name: np.ascontiguousarray(a, dtype=np.float32) for name, a in arrays.items()}
    with atomic_path(Path(path)) as tmp:
        save_file(tensors, str(tmp), metadata=dict(metadata))


def load_arrays(path: Path, missing: str, what: str, remedy: str) -> tuple[dict[str, str], dict[str, np.ndarray]]:
    """(metadata, arrays) of `path`. An absent file is NotFoundError ("<path>: <missing>; <remedy>"),
    a damaged one ModelLoadError ("<path>: corrupt or truncated <what> (...); <remedy>")."""
    path = Path(path)
    if not path.is_file():
        raise NotFoundError(f"{path}: {missing}; {remedy}")
    try:
        with safe_open(str(path), framework="np") as f:
            return dict(f.metadata() or {}), {key: f.get_tensor(key) for key in f.keys()}
    except Exception as exc:  # safetensors raises several kinds for a damaged file
        raise ModelLoadError(f"{path}: corrupt or truncated {what} ({exc}); {remedy}") from None
