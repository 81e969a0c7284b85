"""Contrastive Activation Addition: a concept's direction is mean(pos) - mean(neg) per layer.

Each pair side is rendered as the model will see it at inference: with a chat template,
the pair's context is the user turn and the side is the assistant's reply, left open
(`continue_final_message`) so that the last token is the reply's own last token, not an
end-of-turn marker. Models without a template see "User: ...\\nAssistant: ...".
The residual stream is read at each decoder layer's output, at the last real token.
"""

import datetime as dt
from collections.abc import Callable, Sequence

import torch
import transformers

from .layers import recorded_outputs
from .loading import LoadedModel
from .pairs import Concept
from .vector import ConceptVector

METHOD = "caa-mean-diff"


def render_reply(loaded: LoadedModel, context: str, reply: str) -> str:
    if loaded.has_chat_template:
        messages = [{"role": "user", "content": context}, {"role": "assistant", "content": reply}]
        return loaded.tokenizer.apply_chat_template(messages, tokenize=False, continue_final_message=True)
    return f"User: {context}\nAssistant: {reply}"


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that count real tokens only, so a left-padded row sees the same positions as alone."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def layer_activations(
    loaded: LoadedModel,
    texts: Sequence[str],
    batch_size: int = 8,
    on_batch: Callable[[int], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run `texts` through the model in left-padded batches.

    Returns the last real token's output at every layer `[n_texts, n_layers, hidden]`, and
    per layer the sum and count of residual norms over real positions except each text's
    first (the attention sink carries a norm several times the rest).
    """
    tok, layers = loaded.tokenizer, loaded.layers
    n_layers = len(layers)
    last = torch.empty(len(texts), n_layers, loaded.hidden_size)
    norm_sum = torch.zeros(n_layers, dtype=torch.float64)
    norm_count = torch.zeros(n_layers, dtype=torch.float64)
    with recorded_outputs(layers, range(n_layers)) as captured:
        for start in range(0, len(texts), batch_size):
            chunk = list(texts[start : start + batch_size])
            enc = tok(chunk, return_tensors="pt", padding=True, add_special_tokens=not loaded.has_chat_template)
            enc = {k: v.to(loaded.device) for k, v in enc.items()}
            mask = enc["attention_mask"]  # [b, seq]
            loaded.model(**enc, position_ids=position_ids(mask), use_cache=False, logits_to_keep=1)
            # Real positions after each row's first real token.
            keep = mask.bool() & (position_ids(mask) > 0)  # [b, seq]
            for i in range(n_layers):
                h = captured[i].float()  # [b, seq, hidden]
                last[start : start + len(chunk), i] = h[:, -1, :].cpu()
                norms = h.norm(dim=-1)[keep]
                norm_sum[i] += norms.sum().item()
                norm_count[i] += norms.numel()
            if on_batch:
                on_batch(len(chunk))
    return last, norm_sum, norm_count


def pair_activations(
    loaded: LoadedModel,
    concept: Concept,
    batch_size: int = 8,
    on_batch: Callable[[int], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Last-token activations of every pair's positive and negative side, `[n_pairs, n_layers, hidden]`
    each, and the per-layer norm sum and count of `layer_activations`."""
    pos = [render_reply(loaded, p.context, p.positive) for p in concept.pairs]
    neg = [render_reply(loaded, p.context, p.negative) for p in concept.pairs]
    acts, norm_sum, norm_count = layer_activations(loaded, pos + neg, batch_size, on_batch)
    return acts[: len(pos)], acts[len(pos) :], norm_sum, norm_count


def derive_concept(
    loaded: LoadedModel,
    concept: Concept,
    batch_size: int = 8,
    on_batch: Callable[[int], None] | None = None,
) -> ConceptVector:
    pos, neg, norm_sum, norm_count = pair_activations(loaded, concept, batch_size, on_batch)
    diff = pos.mean(0) - neg.mean(0)  # [n_layers, hidden]
    raw = diff.norm(dim=-1)  # [n_layers]
    unit = diff / raw.clamp(min=1e-12)[:, None]
    act_norms = norm_sum / norm_count.clamp(min=1)
    return ConceptVector(
        concept=concept.name,
        model=loaded.name,
        fingerprint=loaded.fingerprint,
        directions={i: unit[i].contiguous() for i in range(len(loaded.layers))},
        raw_norms={i: float(raw[i]) for i in range(len(loaded.layers))},
        act_norms={i: float(act_norms[i]) for i in range(len(loaded.layers))},
        method=METHOD,
        pairs_sha256=concept.pairs_sha256,
        pair_count=len(concept.pairs),
        metadata={
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "torch_version": torch.__version__,
            "transformers_version": transformers.__version__,
            "render": "chat-template" if loaded.has_chat_template else "user-assistant-text",
        },
    )


# Neutral text to measure a model's activation scale when a vector arrives without pairs.
_SCALE_TEXTS = (
    "The library opens at nine in the morning and closes at five.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "Please put the blue folder on the second shelf.",
    "The train to the city leaves every twenty minutes.",
)


def imported_vector(loaded: LoadedModel, concept: str, directions: dict[int, torch.Tensor], source: str) -> ConceptVector:
    """A store entry for directions that came from elsewhere (a GGUF control vector)."""
    for layer, d in directions.items():
        if tuple(d.shape) != (loaded.hidden_size,):
            raise ValueError(f"layer {layer}: width {tuple(d.shape)} does not match the model's {loaded.hidden_size}")
        if not 0 <= layer < loaded.num_layers:
            raise ValueError(f"layer {layer} is out of range for {loaded.name} (0..{loaded.num_layers - 1})")
    texts = [render_reply(loaded, "Tell me something.", t) for t in _SCALE_TEXTS]
    _, norm_sum, norm_count = layer_activations(loaded, texts)
    norms = {layer: float(d.float().norm()) for layer, d in directions.items()}
    return ConceptVector(
        concept=concept,
        model=loaded.name,
        fingerprint=loaded.fingerprint,
        directions={layer: (d.float() / max(norms[layer], 1e-12)).contiguous() for layer, d in directions.items()},
        raw_norms=norms,
        act_norms={layer: float(norm_sum[layer] / norm_count[layer].clamp(min=1)) for layer in directions},
        method="gguf-import",
        metadata={
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "imported_from": source,
            "torch_version": torch.__version__,
            "transformers_version": transformers.__version__,
        },
    )
