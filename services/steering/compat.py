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
def _cache_keyword(model_class: type) -> str:
    params = inspect.signature(model_class.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_kwargs(model: torch.nn.Module, cache: Any) -> dict[str, Any]:
    """The KV cache keyword of `model.forward`: `cache` in transformers 5 (which still takes
    `past_key_values` with a deprecation warning), `past_key_values` in 4.x."""
    return {_cache_keyword(type(model)): cache}
