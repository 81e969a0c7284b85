"""Is a steered reply still language? Perplexity under the unsteered model, and repetition.

Perplexity says how surprised the unsteered model is by the reply given its prompt; the
repetition rate catches the loops ("I'm so glad you're here!" again and again) that
perplexity misses, since a loop is very predictable once it has started.
"""

import math
import re
from collections.abc import Sequence

import torch

from .batch import Past, logits_after, prefill, row_past
from .generate import Generation
from .loading import LoadedModel

_WORD = re.compile(r"[\w']+")
DEGENERATE_REPEAT = 0.3  # a reply whose word trigrams are more than 30% repeats is a loop


@torch.no_grad()
def perplexities(loaded: LoadedModel, replies: Sequence[Generation], batch_size: int = 16) -> list[float]:
    """exp(mean NLL of each reply's tokens given its prompt), under the model with no hooks.

    Replies to one prompt share its keys and values, run once per call: a sweep's replies are
    a few prompts' many samples, and the prompt (a system prompt and the child's turn) is most
    of each sequence."""
    pad = loaded.tokenizer.pad_token_id or 0
    model = loaded.model
    # A prompt's keys and values less its last token, whose logits predict the reply's first.
    heads = sorted({g.prompt_ids[:-1] for g in replies if len(g.prompt_ids) > 1})
    pasts: dict[tuple[int, ...], Past] = {}
    for start in range(0, len(heads), batch_size):
        group = heads[start : start + batch_size]
        rows = prefill(model, loaded.layers, group, {}, pad)
        pasts |= {head: row_past(rows, i, len(head)) for i, head in enumerate(group)}
    out: list[float] = []
    for start in range(0, len(replies), batch_size):
        chunk = replies[start : start + batch_size]
        seqs = [list(g.prompt_ids) + list(g.token_ids) for g in chunk]
        # Each row's reply ends at the right edge (left padding), so only the last `keep`
        # positions need the vocabulary projection: it costs more than the layers on a small model.
        keep = max(len(g.token_ids) for g in chunk) + 1
        logits = logits_after(model, seqs, [pasts.get(g.prompt_ids[:-1]) for g in chunk], keep, pad).float()
        ids = torch.tensor([[pad] * (keep - min(keep, len(s))) + s[-keep:] for s in seqs], device=logits.device)
        logp = logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)  # [b, keep-1]
        for i, g in enumerate(chunk):
            n = len(g.token_ids)
            if n == 0:
                out.append(math.inf)
                continue
            nll = -logp[i, keep - 1 - n :].mean().item()
            out.append(math.exp(min(nll, 50.0)))
    return out


def repeat_rate(text: str) -> float:
    """Fraction of word trigrams that repeat an earlier one (0 = no repeats)."""
    words = _WORD.findall(text.lower())
    grams = [tuple(words[i : i + 3]) for i in range(len(words) - 2)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def is_degenerate(text: str) -> bool:
    return not text.strip() or repeat_rate(text) > DEGENERATE_REPEAT
