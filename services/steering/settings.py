"""Where the project's files live. Environment variables override the defaults.

STEER_REGISTRY     the model registry (default: models.toml at the repository root)
STEER_VECTORS_DIR  the vector store and concept pairs (default: vectors/)
STEER_CACHE_DIR    converted models (default: .cache/ at the repository root)
STEER_DEVICE       overrides every registry entry's device
STEER_DTYPE        overrides every registry entry's dtype (a different fingerprint: its own vectors)
STEER_EMBED_DEVICE the sentence embedder's device (tagger, scorer); default cpu
"""

import os
from dataclasses import dataclass
from pathlib import Path

# services/steering/settings.py -> the repository root
REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Paths:
    registry: Path
    vectors: Path
    cache: Path

    @property
    def pairs(self) -> Path:
        return self.vectors / "pairs"

    @property
    def eval(self) -> Path:
        return self.vectors / "eval"

    @property
    def guard(self) -> Path:
        return self.vectors / "guard"

    def model_vectors(self, model_name: str) -> Path:
        return self.vectors / model_name


def paths_from_env() -> Paths:
    env = os.environ
    return Paths(
        registry=Path(env.get("STEER_REGISTRY", REPO_ROOT / "models.toml")),
        vectors=Path(env.get("STEER_VECTORS_DIR", REPO_ROOT / "vectors")),
        cache=Path(env.get("STEER_CACHE_DIR", REPO_ROOT / ".cache")),
    )


def device_override() -> str | None:
    return os.environ.get("STEER_DEVICE") or None


def dtype_override() -> str | None:
    return os.environ.get("STEER_DTYPE") or None


def embed_device() -> str:
    return os.environ.get("STEER_EMBED_DEVICE") or "cpu"
