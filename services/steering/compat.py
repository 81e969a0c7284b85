"""What differs between the transformers releases we run: 5.x in the main environment and
4.51.3 in the AWQ one (requirements-awq.txt), kept in one place."""

import inspect
from functools import lru_cache
from typing import Any

import torch
import transformers
from packaging.version import Version

TRANSFORMERS_VERSION = Version(transformers.__version__)


def dtype_kwargs(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """from_pretrained's dtype keyword: `dtype` since 4.56, `torch_dtype` before. An older
    release takes `dtype=` as a config field and silently loads float32."""
    return {"dtype": dtype} if TRANSFORMERS_VERSION >= Version("4.56") else {"torch_dtype": dtype}


@lru_cache(maxsize=32)
def _cache_keyword(model_class: type[torch.nn.Module]) -> str:
    params = inspect.signature(model_class.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_kwargs(model: torch.nn.Module, cache: Any) -> dict[str, Any]:
    """The KV cache keyword of `model.forward`: `cache` in transformers 5 (which still takes
    `past_key_values` with a deprecation warning), `past_key_values` in 4.x."""
    # mypy does not see a class as Hashable (python/mypy#11470); every class is.
    return {_cache_keyword(type(model)): cache}  # type: ignore[arg-type]


class _LegacyLayer:
    """One layer of a transformers 4.x DynamicCache (parallel key_cache/value_cache lists),
    seen through transformers 5's per-layer `.keys` / `.values`."""

    def __init__(self, cache: Any, index: int) -> None:
        self._cache, self._index = cache, index

    @property
    def keys(self) -> torch.Tensor:
        return self._cache.key_cache[self._index]

    @keys.setter
    def keys(self, value: torch.Tensor) -> None:
        self._cache.key_cache[self._index] = value

    @property
    def values(self) -> torch.Tensor:
        return self._cache.value_cache[self._index]

    @values.setter
    def values(self, value: torch.Tensor) -> None:
        self._cache.value_cache[self._index] = value


def cache_layers(cache: Any) -> list[Any]:
    """The cache's layers, each with settable `.keys` and `.values` `[batch, heads, seq, dim]`
    (and `.cumulative_length` on transformers 5's sliding-window layers)."""
    if hasattr(cache, "layers"):
        return list(cache.layers)
    return [_LegacyLayer(cache, i) for i in range(len(cache.key_cache))]
