"""Is a steered reply still language? Perplexity under the unsteered model, and repetition.

Perplexity says how surprised the unsteered model is by the reply given its prompt; the
repetition rate catches the loops ("I'm so glad you're here!" again and again) that
perplexity misses, since a loop is very predictable once it has started.
"""

import math
import re
from collections.abc import Sequence

import torch

from .derive import position_ids
from .generate import Generation
from .loading import LoadedModel

_WORD = re.compile(r"[\w']+")
DEGENERATE_REPEAT = 0.3  # a reply whose word trigrams are more than 30% repeats is a loop


@torch.no_grad()
def perplexities(loaded: LoadedModel, replies: Sequence[Generation], batch_size: int = 16) -> list[float]:
    """exp(mean NLL of each reply's tokens given its prompt), under the model with no hooks."""
    out: list[float] = []
    pad = loaded.tokenizer.pad_token_id
    for start in range(0, len(replies), batch_size):
        chunk = replies[start : start + batch_size]
        seqs = [list(g.prompt_ids) + list(g.token_ids) for g in chunk]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):  # left padding, as everywhere else
            ids[i, width - len(s) :] = torch.tensor(s)
            mask[i, width - len(s) :] = 1
        ids, mask = ids.to(loaded.device), mask.to(loaded.device)
        # Replies end at the right edge (left padding), so only the last `keep` positions need the
        # vocabulary projection: on a small model it costs more than all the layers below it.
        keep = max(len(g.token_ids) for g in chunk) + 1
        logits = loaded.model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), logits_to_keep=keep).logits.float()
        logp = logits[:, :-1].log_softmax(-1).gather(-1, ids[:, width - keep + 1 :, None]).squeeze(-1)  # [b, keep-1]
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
