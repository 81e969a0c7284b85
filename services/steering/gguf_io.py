"""GGUF control vectors in the layout llama.cpp and repeng read and write.

A control vector file has GGUF architecture "controlvector", the keys
`controlvector.model_hint` (the model type, e.g. "llama") and `controlvector.layer_count`,
and one float32 tensor `direction.{layer}` per layer, where `layer` is the 0-based index
of the decoder block whose output it is added to (llama.cpp cannot steer block 0, so
exports skip it). The tensors carry their strength: llama.cpp adds them as they are,
times the user's scale. We add our own keys under `steering.` so a re-import can check
the model fingerprint.
"""

from pathlib import Path

import gguf
import numpy as np
import torch

from .atomic import atomic_path
from .errors import VectorError

ARCH = "controlvector"


def export_control_vector(
    path: Path,
    directions: dict[int, torch.Tensor],
    *,
    model_hint: str,
    extra: dict[str, str] | None = None,
) -> list[int]:
    """Write `directions` (layer -> [hidden], already scaled) to a GGUF control vector; return the layers written."""
    layers = sorted(layer for layer in directions if layer >= 1)
    if not layers:
        raise VectorError("nothing to export: llama.cpp control vectors cannot hold layer 0 alone")
    with atomic_path(Path(path)) as tmp:
        writer = gguf.GGUFWriter(str(tmp), ARCH)
        writer.add_string(f"{ARCH}.model_hint", model_hint)
        writer.add_uint32(f"{ARCH}.layer_count", len(layers))
        for key, value in (extra or {}).items():
            writer.add_string(f"steering.{key}", value)
        for layer in layers:
            writer.add_tensor(f"direction.{layer}", directions[layer].detach().to(torch.float32).cpu().numpy())
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return layers


def _field_value(reader: gguf.GGUFReader, key: str) -> str | int | None:
    field = reader.fields.get(key)
    if field is None:
        return None
    value = field.contents()
    return value


def import_control_vector(path: Path) -> tuple[dict[int, torch.Tensor], str, dict[str, str]]:
    """Read a GGUF control vector: (layer -> direction as stored, model hint, our `steering.*` keys)."""
    try:
        reader = gguf.GGUFReader(str(path))
    except FileNotFoundError:
        raise VectorError(f"{path}: no such file") from None
    except Exception as exc:  # gguf raises ValueError, struct errors, ... for damaged files
        raise VectorError(f"{path}: not a readable GGUF file ({exc})") from None
    hint = _field_value(reader, f"{ARCH}.model_hint")
    if hint is None:
        raise VectorError(f"{path}: not a control vector (no {ARCH}.model_hint key)")
    directions: dict[int, torch.Tensor] = {}
    for tensor in reader.tensors:
        name = tensor.name
        if not name.startswith("direction."):
            continue
        try:
            layer = int(name.split(".", 1)[1])
        except ValueError:
            raise VectorError(f"{path}: tensor {name!r} does not name a layer") from None
        data = np.array(tensor.data, dtype=np.float32).reshape(-1)
        directions[layer] = torch.from_numpy(data.copy())
    if not directions:
        raise VectorError(f"{path}: holds no direction.{{layer}} tensors")
    count = _field_value(reader, f"{ARCH}.layer_count")
    if count is not None and int(count) != len(directions):
        raise VectorError(f"{path}: layer_count says {count} but {len(directions)} direction tensors are present")
    extra = {
        key.removeprefix("steering."): str(_field_value(reader, key))
        for key in reader.fields
        if key.startswith("steering.")
    }
    return directions, str(hint), extra
