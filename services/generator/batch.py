"""The tensors of a running batch and what is done to them: prefill new rows, merge two
batches, drop rows or split one off, and decode a token (or a chunk of them) per row.

Rows are left-padded: each row's real tokens end at the right edge, so one new token per
row appends one column to the whole batch. A row's padding is masked out of attention and
its positions count real tokens only, so a row sees what it would see alone. Each row
carries its own steering additions; the hooks are attached for one forward call at a time,
so nothing stays registered between steps.
"""

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache, PreTrainedModel

from steering.compat import cache_kwargs, cache_layers
from steering.derive import position_ids
from steering.hooks import steer
from steering.layers import DecoderLayers


@dataclass
class Rows:
    cache: DynamicCache
    mask: torch.Tensor  # [rows, columns]; 1 = a real token
    positions: torch.Tensor  # [rows, 1]: position of each row's last token
    logits: torch.Tensor  # [rows, vocab]: next-token logits
    deltas: dict[int, torch.Tensor]  # layer -> [rows, hidden] additions
    prompt_rows: torch.Tensor  # [rows] bool: the row's prompt positions are steered too
    preserve_rows: torch.Tensor  # [rows] bool: the row's steered states keep their norm

    def __len__(self) -> int:
        return self.mask.shape[0]


def _forward(
    model: PreTrainedModel, layers: DecoderLayers, rows: Rows, ids: torch.Tensor, positions: torch.Tensor, **kw
) -> torch.Tensor:
    # Layers where no row is steered get no hook at all.
    deltas = {layer: d for layer, d in rows.deltas.items() if bool(d.any())}
    with steer(layers, deltas, steer_prompt=rows.prompt_rows, preserve_norm=rows.preserve_rows):
        out = model(
            input_ids=ids, attention_mask=rows.mask, position_ids=positions, **cache_kwargs(model, rows.cache),
            use_cache=True, **kw,
        )
    return out.logits


@torch.no_grad()
def prefill(
    model: PreTrainedModel, layers: DecoderLayers, prompts: Sequence[Sequence[int]], deltas: dict[int, torch.Tensor],
    pad_id: int = 0, switches: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> Rows:
    """Run the prompts (token ids) as a new left-padded batch; `deltas[layer]` is [rows, hidden];
    `switches`: per-row steer_prompt and preserve_norm (hooks.row_switches), default on and off."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + list(p) for p in prompts], device=model.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=model.device)
    positions = position_ids(mask)
    if switches is None:
        switches = (torch.ones(len(prompts), dtype=torch.bool), torch.zeros(len(prompts), dtype=torch.bool))
    prompt_rows, preserve_rows = (t.to(model.device) for t in switches)
    rows = Rows(DynamicCache(), mask, positions[:, -1:], torch.empty(0), deltas, prompt_rows, preserve_rows)
    rows.logits = _forward(model, layers, rows, ids, positions, logits_to_keep=1)[:, -1]
    return rows


@torch.no_grad()
def decode(model: PreTrainedModel, layers: DecoderLayers, rows: Rows, tokens: torch.Tensor) -> torch.Tensor:
    """Feed one token per row ([rows]) or a chunk of k per row ([rows, k]); updates the cache,
    mask, positions and next-token logits, and returns the logits at every fed position."""
    chunk = tokens if tokens.dim() == 2 else tokens[:, None]
    k = chunk.shape[1]
    rows.mask = torch.cat([rows.mask, rows.mask.new_ones(len(rows), k)], dim=-1)
    positions = rows.positions + torch.arange(1, k + 1, device=rows.positions.device)
    rows.positions = positions[:, -1:]
    logits = _forward(model, layers, rows, chunk, positions)
    rows.logits = logits[:, -1]
    return logits


def split_off(rows: Rows, index: int) -> Rows:
    """A batch of its own holding a copy of one row (the original batch is unchanged)."""
    one = Rows(copy.deepcopy(rows.cache), rows.mask, rows.positions, rows.logits,
               {layer: d.clone() for layer, d in rows.deltas.items()}, rows.prompt_rows, rows.preserve_rows)
    return select(one, [index])


def _left_pad(t: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    missing = length - t.shape[dim]
    if missing <= 0:
        return t
    pads = [0, 0] * (t.dim() - 1 - dim % t.dim()) + [missing, 0]
    return F.pad(t, pads)


def merge(a: Rows, b: Rows) -> Rows:
    """Stack b's rows under a's: the shorter side is left-padded (masked) to the longer."""
    width = max(a.mask.shape[1], b.mask.shape[1])
    for la, lb in zip(cache_layers(a.cache), cache_layers(b.cache), strict=True):
        length = max(la.keys.shape[-2], lb.keys.shape[-2])
        la.keys = torch.cat([_left_pad(la.keys, length, -2), _left_pad(lb.keys, length, -2)])
        la.values = torch.cat([_left_pad(la.values, length, -2), _left_pad(lb.values, length, -2)])
        if hasattr(la, "cumulative_length"):  # sliding-window layers count every column seen
            la.cumulative_length = width
    deltas = {}
    for layer in sorted(set(a.deltas) | set(b.deltas)):  # a layer only one side steers: zeros for the other
        ref = a.deltas[layer] if layer in a.deltas else b.deltas[layer]
        da, db = (r.deltas.get(layer, ref.new_zeros(len(r), ref.shape[-1])) for r in (a, b))
        deltas[layer] = torch.cat([da, db])
    mask = torch.cat([_left_pad(a.mask, width, -1), _left_pad(b.mask, width, -1)])
    return Rows(a.cache, mask, torch.cat([a.positions, b.positions]), torch.cat([a.logits, b.logits]), deltas,
                torch.cat([a.prompt_rows, b.prompt_rows]), torch.cat([a.preserve_rows, b.preserve_rows]))


def select(rows: Rows, keep: Sequence[int]) -> Rows:
    """Keep these rows, in this order, and drop the columns that are padding for all of them."""
    index = torch.tensor(list(keep), dtype=torch.long, device=rows.mask.device)
    rows.cache.batch_select_indices(index)
    mask = rows.mask[index]
    real = mask.any(0).nonzero()
    trim = int(real[0]) if real.numel() else 0
    if trim:
        mask = mask[:, trim:]
        width = mask.shape[1]
        for layer in cache_layers(rows.cache):
            if layer.keys.shape[-2] > width:
                layer.keys, layer.values = layer.keys[..., -width:, :], layer.values[..., -width:, :]
            if hasattr(layer, "cumulative_length"):
                layer.cumulative_length = width
    deltas = {layer: d[index] for layer, d in rows.deltas.items()}
    return Rows(rows.cache, mask, rows.positions[index], rows.logits[index], deltas,
                rows.prompt_rows[index], rows.preserve_rows[index])
