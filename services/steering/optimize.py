"""A concept's directions learned from its pairs by preference optimisation (BiPO, Cao et al. 2024).

Where the mean difference reads a direction off the pairs' last tokens, this trains one: the
additions at a band's layers, at a fixed strength, are moved by gradient descent so that the
steered model prefers each pair's positive reply to its negative one more than the unsteered
model does (the DPO loss with the unsteered model as reference), and, steered the other way,
the negative one: the bidirectional form, which keeps the direction an axis of the concept
rather than a push toward anything that scores well. The model's own weights never change.
"""

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from .config import SteerConfig
from .derive import position_ids, render_reply
from .hooks import steer
from .loading import LoadedModel
from .pairs import Concept
from .vector import ConceptVector

METHOD = "bipo"
# A trained direction moves the register about twice as far per alpha as the mean difference it
# starts from (SmolLM2's playfulness, steering alone at 4.1 under Blip: +1.05 against +0.54), so
# the mean difference's grid would start where it is already past coherence: validation sweeps it
# at this share of those strengths.
GRID_SCALE = 0.5


def grid_scale(cv: ConceptVector) -> float:
    """What validation's strengths are multiplied by for `cv`: GRID_SCALE for a trained direction."""
    return GRID_SCALE if cv.method == METHOD else 1.0


@dataclass(frozen=True)
class OptimizeSettings:
    alpha: float  # the strength per layer trained at (each layer's addition keeps this norm)
    steps: int = 30
    pairs_per_step: int = 8
    lr: float = 0.005
    beta: float = 0.1  # DPO's temperature on the summed log-likelihood ratios
    seed: int = 0


@dataclass(frozen=True)
class _Side:
    ids: torch.Tensor  # [rows, seq], right-padded
    mask: torch.Tensor  # [rows, seq]
    reply: torch.Tensor  # [rows, seq - 1] bool: the next token at this position is the reply's


def _encode(loaded: LoadedModel, contexts: Sequence[str], replies: Sequence[str]) -> _Side:
    tok = loaded.tokenizer
    rows, starts = [], []
    for context, text in zip(contexts, replies, strict=True):
        rows.append(tok(render_reply(loaded, context, text), add_special_tokens=False)["input_ids"])
        starts.append(len(tok(render_reply(loaded, context, ""), add_special_tokens=False)["input_ids"]))
    width = max(map(len, rows))
    pad = tok.pad_token_id or 0
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=loaded.device)
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=loaded.device)
    target = torch.arange(1, width, device=loaded.device)[None, :]
    lengths = torch.tensor([len(r) for r in rows], device=loaded.device)[:, None]
    reply = (target >= torch.tensor(starts, device=loaded.device)[:, None]) & (target < lengths)
    return _Side(ids, mask, reply)


def _reply_logprob(loaded: LoadedModel, side: _Side, additions: dict[int, torch.Tensor] | None) -> torch.Tensor:
    """Each row's reply log-likelihood, [rows], steered by `additions` ({layer: [hidden]}) at every position."""
    rows = side.ids.shape[0]
    deltas = {layer: v[None, :].expand(rows, -1) for layer, v in (additions or {}).items()}
    with steer(loaded.layers, deltas):
        logits = loaded.model(input_ids=side.ids, attention_mask=side.mask, position_ids=position_ids(side.mask),
                              use_cache=False).logits[:, :-1].float()
    token_lp = logits.gather(-1, side.ids[:, 1:, None]).squeeze(-1) - logits.logsumexp(-1)
    return (token_lp * side.reply).sum(-1)


@dataclass(frozen=True)
class PairSet:
    """A concept's pairs encoded once, with each side's unsteered reply log-likelihood."""

    positive: _Side
    negative: _Side
    reference: tuple[torch.Tensor, torch.Tensor]  # [pairs] each

    def __len__(self) -> int:
        return self.positive.ids.shape[0]


def _rows(side: _Side, index: torch.Tensor) -> _Side:
    return _Side(side.ids[index], side.mask[index], side.reply[index])


@torch.no_grad()
def encode_pairs(loaded: LoadedModel, concept: Concept, chunk: int = 8) -> PairSet:
    contexts = [p.context for p in concept.pairs]
    pos = _encode(loaded, contexts, [p.positive for p in concept.pairs])
    neg = _encode(loaded, contexts, [p.negative for p in concept.pairs])
    # A few rows at a time: a whole concept's logits over the vocabulary would take gigabytes.
    chunks = torch.arange(len(contexts), device=loaded.device).split(chunk)
    ref_pos, ref_neg = (torch.cat([_reply_logprob(loaded, _rows(side, i), None) for i in chunks]) for side in (pos, neg))
    return PairSet(pos, neg, (ref_pos, ref_neg))


def margins(loaded: LoadedModel, pairs: PairSet, additions: dict[int, torch.Tensor], index: torch.Tensor) -> torch.Tensor:
    """How much more the steered model prefers each chosen pair's positive reply to its
    negative one than the unsteered model does, in nats: [len(index)]."""
    pos, neg = _rows(pairs.positive, index), _rows(pairs.negative, index)
    ref_pos, ref_neg = (r[index] for r in pairs.reference)
    return (_reply_logprob(loaded, pos, additions) - ref_pos) - (_reply_logprob(loaded, neg, additions) - ref_neg)


def optimized_directions(
    loaded: LoadedModel, concept: Concept, init: dict[int, torch.Tensor], settings: OptimizeSettings,
    on_step: Callable[[int, float], None] | None = None,
) -> dict[int, torch.Tensor]:
    """Unit directions at `init`'s layers (starting from them), trained as the module says."""
    if settings.alpha <= 0 or settings.steps < 1 or settings.pairs_per_step < 1:
        raise ValueError(f"alpha must be > 0 and steps and pairs_per_step at least 1: {settings}")
    if len(concept.pairs) < 2:
        raise ValueError(f"{concept.name} has {len(concept.pairs)} pair(s): optimising needs at least 2")
    pairs = encode_pairs(loaded, concept)
    raw = {layer: d.detach().float().clone().to(loaded.device).requires_grad_(True) for layer, d in init.items()}
    optim = torch.optim.Adam(raw.values(), lr=settings.lr)
    order = torch.Generator().manual_seed(settings.seed)
    frozen = [p for p in loaded.model.parameters() if p.requires_grad]
    for p in frozen:  # gradients for the additions only; the model is shared and stays as it was
        p.requires_grad_(False)
    try:
        with torch.enable_grad():  # callers may be under no_grad
            for step in range(settings.steps):
                index = torch.randperm(len(pairs), generator=order)[: settings.pairs_per_step].to(loaded.device)
                loss = torch.zeros((), device=loaded.device)
                for sign in (1.0, -1.0):  # steered toward, the positive side wins; away, the negative
                    additions = {layer: sign * settings.alpha * r / r.norm() for layer, r in raw.items()}
                    loss = loss - F.logsigmoid(sign * settings.beta * margins(loaded, pairs, additions, index)).mean()
                optim.zero_grad()
                loss.backward()
                optim.step()
                if on_step:
                    on_step(step, float(loss.detach()))
    finally:
        for p in frozen:
            p.requires_grad_(True)
    return {layer: (r / r.norm()).detach().cpu().contiguous() for layer, r in raw.items()}


def optimized_vector(
    loaded: LoadedModel, concept: Concept, cv: ConceptVector, layers: Sequence[int], rel: float, steps: int,
    on_step: Callable[[int, float], None] | None = None,
) -> ConceptVector:
    """`cv` (the concept's mean-difference vector) with its directions at `layers` trained at
    `rel` of their mean residual norm, the same strength at each; the rest, and the norms
    alpha is scaled by, stay the mean difference's."""
    layers = sorted(set(layers))
    missing = [layer for layer in layers if layer not in cv.directions]
    if not layers or missing:
        raise ValueError(f"cannot optimise at layers {layers}: the vector has none at {missing or 'any'}")
    alpha = rel * SteerConfig(tuple(layers)).activation_scale(cv)  # the scale validation's grid takes alphas of
    settings = OptimizeSettings(alpha=alpha, steps=steps)
    learned = optimized_directions(loaded, concept, {layer: cv.directions[layer] for layer in layers}, settings, on_step)
    trained = {"layers": layers, "rel": rel, "alpha": round(alpha, 3), "steps": steps, "pairs_per_step": settings.pairs_per_step,
               "lr": settings.lr, "beta": settings.beta, "seed": settings.seed}
    return replace(cv, directions={**cv.directions, **learned}, method=METHOD,
                   metadata={**cv.metadata, "optimized": json.dumps(trained)})
