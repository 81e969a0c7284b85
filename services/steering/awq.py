"""Load AWQ 4-bit checkpoints as they are: no conversion cache, fused layers always off.

Fused layers (AutoAWQ's `fuse_layers=True`) replace the decoder layers with blocks that drop
the per-block outputs the steering hooks attach to and ignore our padding masks and position
ids; layers.py refuses such a model if one ever appears. AutoAWQ is deprecated and wants the
transformers its checkpoints were quantised with (4.51.3 for Mixtral-family MoE naming), so
it lives in its own environment: requirements-awq.txt. AWQ kernels run on CUDA only.
"""

import importlib.util
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from .compat import TRANSFORMERS_VERSION, dtype_kwargs
from .errors import ModelLoadError
from .registry import ModelEntry

AWQ_ENV = "the AWQ environment from requirements-awq.txt (`make venv-awq`, or the generator-awq compose service)"


def load_awq(entry: ModelEntry, directory: Path, device: torch.device) -> PreTrainedModel:
    """The quantised model on `device`, through the entry's loader."""
    if entry.loader == "autoawq":
        return _autoawq(entry, directory, device)
    return _transformers(entry, directory, device)


def _device_map(entry: ModelEntry, device: torch.device) -> dict[str, int]:
    if device.type != "cuda":
        raise ModelLoadError(
            f"model {entry.name!r} is an AWQ checkpoint ({entry.quantization}); its kernels run on CUDA only, "
            f"not on {device}: use --device cuda"
        )
    return {"": device.index or 0}  # the whole model on this one GPU, never spread by accelerate


def _autoawq(entry: ModelEntry, directory: Path, device: torch.device) -> PreTrainedModel:
    try:
        from awq import AutoAWQForCausalLM
    except ImportError as exc:
        raise ModelLoadError(
            f"model {entry.name!r} loads with AutoAWQ (loader = \"autoawq\"), which is not installed in this "
            f"environment ({exc}); use {AWQ_ENV}"
        ) from None
    wrapped = AutoAWQForCausalLM.from_quantized(
        str(directory),
        fuse_layers=False,  # always: fused blocks remove the per-block outputs the hooks need
        torch_dtype=getattr(torch, entry.dtype),
        trust_remote_code=False,  # offline, and never run code that came with a checkpoint
        device_map=_device_map(entry, device),
    )
    return wrapped.model


def transformers_awq_backend() -> str:
    """The module this transformers release loads AWQ checkpoints through."""
    return "awq" if TRANSFORMERS_VERSION.major < 5 else "gptqmodel"


def _transformers(entry: ModelEntry, directory: Path, device: torch.device) -> PreTrainedModel:
    backend = transformers_awq_backend()
    if importlib.util.find_spec(backend) is None:
        raise ModelLoadError(
            f"model {entry.name!r}: transformers {TRANSFORMERS_VERSION} loads AWQ checkpoints through "
            f"`{backend}`, which is not installed in this environment; use {AWQ_ENV}"
        )
    return AutoModelForCausalLM.from_pretrained(
        directory, **dtype_kwargs(getattr(torch, entry.dtype)), device_map=_device_map(entry, device)
    )
