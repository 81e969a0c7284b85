"""The decode core: the tensors of a running batch and what is done to them. Prefill new
rows, merge two batches, drop rows or split one off, and decode a token (or a chunk of them)
per row. The generator's engine and `steering.generate` (the CLI, derivation's checks and
validation) both decode with it.

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

from .compat import cache_kwargs, cache_layers
from .derive import position_ids
from .hooks import steer
from .layers import DecoderLayers

# Per decoder layer: (keys, values), each [1, kv heads, tokens, head dim]: a prompt's cached part.
Past = list[tuple[torch.Tensor, torch.Tensor]]


def past_length(past: Past) -> int:
    return past[0][0].shape[-2] if past else 0


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


def _inputs(
    prompts: Sequence[Sequence[int]], pasts: Sequence[Past | None] | None, pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, DynamicCache]:
    """The ids of what is not cached, the mask over cached and new columns, the new columns'
    positions and the cache of the cached parts. Cached and new tokens are left-padded
    separately, so a row may have masked columns between its two parts."""
    pasts = list(pasts) if pasts is not None else [None] * len(prompts)
    cached = [past_length(p) if p else 0 for p in pasts]
    fresh = [list(p)[n:] for p, n in zip(prompts, cached)]
    before, width = max(cached), max(len(f) for f in fresh)
    ids = torch.tensor([[pad_id] * (width - len(f)) + f for f in fresh], device=device)
    mask = torch.tensor([[0] * (before - n) + [1] * n + [0] * (width - len(f)) + [1] * len(f)
                         for n, f in zip(cached, fresh)], device=device)
    return ids, mask, position_ids(mask)[:, before:], _cache_of(pasts, before)


@torch.no_grad()
def prefill(
    model: PreTrainedModel, layers: DecoderLayers, prompts: Sequence[Sequence[int]], deltas: dict[int, torch.Tensor],
    pad_id: int = 0, switches: tuple[torch.Tensor, torch.Tensor] | None = None,
    pasts: Sequence[Past | None] | None = None,
) -> Rows:
    """Run the prompts (token ids) as a new left-padded batch; `deltas[layer]` is [rows, hidden];
    `switches`: per-row steer_prompt and preserve_norm (hooks.row_switches), default on and off.
    `pasts[i]`, when given, holds the keys and values of prompt i's first tokens (a prefix
    cache hit): only the rest of that prompt is run."""
    ids, mask, positions, cache = _inputs(prompts, pasts, pad_id, model.device)
    if switches is None:
        switches = (torch.ones(len(prompts), dtype=torch.bool), torch.zeros(len(prompts), dtype=torch.bool))
    prompt_rows, preserve_rows = (t.to(model.device) for t in switches)
    rows = Rows(cache, mask, positions[:, -1:], torch.empty(0), deltas, prompt_rows, preserve_rows)
    rows.logits = _forward(model, layers, rows, ids, positions, logits_to_keep=1)[:, -1]
    return rows


@torch.no_grad()
def logits_after(
    model: PreTrainedModel, prompts: Sequence[Sequence[int]], pasts: Sequence[Past | None], keep: int, pad_id: int = 0,
) -> torch.Tensor:
    """Unsteered logits at the last `keep` positions of each prompt ([rows, keep, vocab]), with
    the keys and values of each prompt's first tokens taken from `pasts` as in `prefill`."""
    ids, mask, positions, cache = _inputs(prompts, pasts, pad_id, model.device)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, **cache_kwargs(model, cache),
                use_cache=True, logits_to_keep=keep)
    return out.logits


def copy_rows(rows: Rows) -> Rows:
    """An independent copy of a batch (decoding and `select` change a batch's cache in place)."""
    return Rows(copy.deepcopy(rows.cache), rows.mask, rows.positions, rows.logits,
                {layer: d.clone() for layer, d in rows.deltas.items()}, rows.prompt_rows, rows.preserve_rows)


def _cache_of(pasts: Sequence[Past | None], width: int) -> DynamicCache:
    """A cache holding every row's cached prefix, left-padded to `width` columns."""
    cache = DynamicCache()
    template = next((p for p in pasts if p), None)
    if template is None or not width:
        return cache
    for layer, (k0, v0) in enumerate(template):
        keys = [_left_pad(p[layer][0], width, -2) if p else k0.new_zeros(*k0.shape[:-2], width, k0.shape[-1])
                for p in pasts]
        values = [_left_pad(p[layer][1], width, -2) if p else v0.new_zeros(*v0.shape[:-2], width, v0.shape[-1])
                  for p in pasts]
        cache.update(torch.cat(keys), torch.cat(values), layer)
    return cache


def row_past(rows: Rows, row: int, length: int) -> Past:
    """Copies of one row's keys and values at its first `length` real tokens (for the prefix cache)."""
    columns = rows.mask[row].nonzero().flatten()[:length]
    return [(layer.keys[row : row + 1].index_select(-2, columns), layer.values[row : row + 1].index_select(-2, columns))
            for layer in cache_layers(rows.cache)]


def caches_prefixes(model: PreTrainedModel) -> bool:
    """Whether prompts' keys and values can be cached and reused: not with sliding-window
    attention, whose cache layers count and drop columns on their own."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    types = getattr(config, "layer_types", None) or ()
    return "sliding_attention" not in types and not getattr(config, "use_sliding_window", False)


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
    return select(copy_rows(rows), [index])


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
