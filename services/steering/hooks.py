"""Forward hooks that add steering vectors to decoder layer outputs.

A steering is plain data: for each layer index, a `[batch, hidden]` tensor of additions
(alpha already applied), one row per batch row, and two per-row switches: whether the
prompt's positions are steered too, and whether each steered state is scaled back to its
own norm. Rows whose addition is zero are left bit-for-bit untouched, so requests with and
without steering, and with different configurations, share one batch.

`steer()` registers every hook or none, and removes them all on every exit path.
`interrupt_when()` lets a forward pass be abandoned between two layers.
"""

import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch.utils.hooks import RemovableHandle

from .layers import DecoderLayers, layer_output_tensor, replace_layer_output


@dataclass(frozen=True)
class RowSteering:
    """One row's steering: `{layer: addition}` and how it is applied."""

    additions: Mapping[int, torch.Tensor]
    steer_prompt: bool = True  # False: in a multi-position forward only the last position is steered
    preserve_norm: bool = False  # scale each steered state back to the norm it had before the addition


def row_switches(
    rows: Sequence[RowSteering | Mapping[int, torch.Tensor] | None], device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row `steer_prompt` and `preserve_norm` as [batch] bool tensors (plain additions and
    unsteered rows: prompt steered, norm not preserved)."""
    prompt = [r.steer_prompt if isinstance(r, RowSteering) else True for r in rows]
    preserve = [r.preserve_norm if isinstance(r, RowSteering) else False for r in rows]
    return torch.tensor(prompt, device=device), torch.tensor(preserve, device=device)


@dataclass
class ActiveSteering:
    """What the hooks read on every forward call; callers may update `deltas` between steps
    (for example to re-inject at a higher alpha), shapes must stay the same."""

    deltas: dict[int, torch.Tensor]  # layer -> [batch, hidden]
    prompt_rows: torch.Tensor | None = None  # [batch] bool; None: every row's prompt is steered
    preserve_rows: torch.Tensor | None = None  # [batch] bool; None: no row's norm is preserved
    handles: list[RemovableHandle] = field(default_factory=list)

    def keep(self, index: torch.Tensor) -> None:
        """Keep only these rows (finished rows leave the batch)."""
        self.deltas = {layer: d[index] for layer, d in self.deltas.items()}
        if self.prompt_rows is not None:
            self.prompt_rows = self.prompt_rows[index]
        if self.preserve_rows is not None:
            self.preserve_rows = self.preserve_rows[index]

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
        added = delta[:, None, :].expand(-1, hidden.shape[1], -1)
        prompt = active.prompt_rows
        if hidden.shape[1] > 1 and prompt is not None and not bool(prompt.all()):
            # Prefill of a row without prompt steering: only its last position, whose output
            # gives the first generated token's logits, is steered (left padding puts it at -1).
            added = added.clone()
            added[~prompt.to(hidden.device), :-1, :] = 0
        steered = hidden + added
        preserve = active.preserve_rows
        if preserve is not None and bool(preserve.any()):
            # Norm-preserving rows keep each state's length and take only the addition's turn; a
            # row with nothing added at this layer stays bit for bit as it was.
            rescale = preserve.to(hidden.device) & delta.ne(0).any(-1)
            scale = hidden.norm(dim=-1, keepdim=True) / steered.norm(dim=-1, keepdim=True).clamp(min=1e-6)
            steered = torch.where(rescale[:, None, None], steered * scale, steered)
        return replace_layer_output(output, steered)

    return hook


def stack_rows(
    rows: Sequence[RowSteering | Mapping[int, torch.Tensor] | None], hidden_size: int, dtype: torch.dtype, device: torch.device,
) -> dict[int, torch.Tensor]:
    """Per-row `{layer: [hidden]}` additions (None = unsteered row) -> `{layer: [batch, hidden]}`."""
    plain = [r.additions if isinstance(r, RowSteering) else r for r in rows]
    layers = sorted({layer for row in plain if row for layer in row})
    deltas = {}
    for layer in layers:
        out = torch.zeros(len(plain), hidden_size, dtype=dtype, device=device)
        for i, row in enumerate(plain):
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
def steer(
    layers: DecoderLayers, deltas: Mapping[int, torch.Tensor], *, steer_prompt: bool | torch.Tensor = True,
    preserve_norm: torch.Tensor | None = None,
) -> Iterator[ActiveSteering]:
    """Add `deltas[layer][row]` to the output of each decoder layer for the duration of the block.
    `steer_prompt` and `preserve_norm`: for every row, or per row as a [batch] bool tensor."""
    for layer, delta in deltas.items():
        if not 0 <= layer < len(layers):
            raise ValueError(f"layer {layer} is out of range: the model has layers 0..{len(layers) - 1}")
        if delta.dim() != 2:
            raise ValueError(f"layer {layer}: additions must be [batch, hidden], got shape {tuple(delta.shape)}")
    if isinstance(steer_prompt, bool):
        rows = len(next(iter(deltas.values()))) if deltas else 0
        prompt_rows = None if steer_prompt else torch.zeros(rows, dtype=torch.bool)
    else:
        prompt_rows = steer_prompt
    active = ActiveSteering(deltas=dict(deltas), prompt_rows=prompt_rows, preserve_rows=preserve_norm)
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


class Interrupted(Exception):
    """A forward pass abandoned between two layers by `interrupt_when`."""


@contextmanager
def interrupt_when(layers: DecoderLayers, stop: Callable[[], bool]) -> Iterator[None]:
    """Raise `Interrupted` before the next decoder layer once `stop()` holds: work that may give
    way (a prefill done ahead of need) then yields within one layer's time, not a whole pass's.
    Only this thread's passes: another thread running the same modules meanwhile is not stopped."""
    owner = threading.get_ident()

    def check(module: torch.nn.Module, args: object) -> None:
        if threading.get_ident() == owner and stop():
            raise Interrupted

    handles = [module.register_forward_pre_hook(check) for module in layers]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
