"""Forward hooks that add steering vectors to decoder layer outputs.

A steering is plain data: for each layer index, a `[batch, hidden]` tensor of additions
(alpha already applied), one row per batch row. Rows whose addition is zero are left
bit-for-bit untouched, so requests with and without steering share one batch.

`steer()` registers every hook or none, and removes them all on every exit path.
"""

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch.utils.hooks import RemovableHandle

from .layers import DecoderLayers, layer_output_tensor, replace_layer_output


@dataclass
class ActiveSteering:
    """What the hooks read on every forward call; callers may update `deltas` between steps
    (for example to re-inject at a higher alpha), shapes must stay the same."""

    deltas: dict[int, torch.Tensor]  # layer -> [batch, hidden]
    steer_prompt: bool = True
    handles: list[RemovableHandle] = field(default_factory=list)

    def set_rows(self, layer: int, rows: torch.Tensor) -> None:
        current = self.deltas[layer]
        if rows.shape != current.shape:
            raise ValueError(f"layer {layer}: new additions have shape {tuple(rows.shape)}, expected {tuple(current.shape)}")
        self.deltas[layer] = rows.to(dtype=current.dtype, device=current.device)


def _make_hook(active: ActiveSteering, layer: int):
    def hook(_module: torch.nn.Module, _inputs: tuple, output: object) -> object:
        hidden = layer_output_tensor(output)  # [batch, seq, hidden]
        delta = active.deltas[layer]  # [batch, hidden]
        if delta.dtype != hidden.dtype or delta.device != hidden.device:
            # Never let the addition promote the residual stream (bf16 + fp32 -> fp32): add in the
            # layer output's own dtype. Cast once; later steps reuse it.
            delta = active.deltas[layer] = delta.to(dtype=hidden.dtype, device=hidden.device)
        if hidden.shape[0] != delta.shape[0]:
            raise ValueError(
                f"steering for layer {layer} has {delta.shape[0]} rows but the batch has {hidden.shape[0]}"
            )
        if active.steer_prompt or hidden.shape[1] == 1:
            steered = hidden + delta[:, None, :]
        else:
            # Prefill without prompt steering: only the last position, whose output gives
            # the first generated token's logits, is steered (left padding puts it at -1).
            steered = hidden.clone()
            steered[:, -1, :] += delta
        return replace_layer_output(output, steered)

    return hook


def stack_rows(rows: list[Mapping[int, torch.Tensor] | None], hidden_size: int, dtype: torch.dtype, device: torch.device) -> dict[int, torch.Tensor]:
    """Per-row `{layer: [hidden]}` additions (None = unsteered row) -> `{layer: [batch, hidden]}`."""
    layers = sorted({layer for row in rows if row for layer in row})
    deltas = {}
    for layer in layers:
        out = torch.zeros(len(rows), hidden_size, dtype=dtype, device=device)
        for i, row in enumerate(rows):
            if row and layer in row:
                out[i] = row[layer].to(dtype=dtype, device=device)
        deltas[layer] = out
    return deltas


def _float_parameter(module: torch.nn.Module) -> torch.Tensor | None:
    """The block's first floating-point parameter: its compute dtype. Quantised blocks (AWQ)
    hold packed int32 weights, but their norms and scales still carry the activation dtype."""
    for tensor in (*module.parameters(), *module.buffers()):
        if tensor.is_floating_point():
            return tensor
    return None


@contextmanager
def steer(layers: DecoderLayers, deltas: Mapping[int, torch.Tensor], *, steer_prompt: bool = True) -> Iterator[ActiveSteering]:
    """Add `deltas[layer][row]` to the output of each decoder layer for the duration of the block."""
    for layer, delta in deltas.items():
        if not 0 <= layer < len(layers):
            raise ValueError(f"layer {layer} is out of range: the model has layers 0..{len(layers) - 1}")
        if delta.dim() != 2:
            raise ValueError(f"layer {layer}: additions must be [batch, hidden], got shape {tuple(delta.shape)}")
    active = ActiveSteering(deltas=dict(deltas), steer_prompt=steer_prompt)
    try:
        for layer in active.deltas:
            module = layers[layer]
            param = _float_parameter(module)
            if param is not None:  # add in the layer's own dtype and device (fp16/bf16 on a GPU)
                active.deltas[layer] = active.deltas[layer].to(dtype=param.dtype, device=param.device)
            active.handles.append(module.register_forward_hook(_make_hook(active, layer)))
        yield active
    finally:
        for handle in active.handles:
            handle.remove()
        active.handles.clear()
