"""The top-3 skip gate: when the unsteered model is already about to say a concept word,
steering that reply would only push it further, so the reply is left unsteered.

A concept's words are its checked-in word list (`vectors/pairs/<concept>.json`, "words")
plus the tokens its vector promotes through the unembedding (logit lens: the directions
averaged over the steering layers, through the final norm's scale and the output matrix).
"""

import re
from dataclasses import dataclass
from functools import lru_cache

import torch

from .loading import LoadedModel, head_weight
from .vector import ConceptVector

DEFAULT_THRESHOLD = 0.25  # a concept word in the top 3 with at least this probability skips steering
LOGIT_LENS_TOP = 10
_ALPHA = re.compile(r"^[a-z]{3,}$")


@dataclass(frozen=True)
class GateResult:
    skip: bool
    token: str  # the concept word that triggered a skip, else ""
    probability: float
    top3: tuple[str, ...]


@lru_cache(maxsize=4)
def _vocab_texts(tokenizer) -> tuple[str, ...]:
    """Each token id's text as decoded alone (computed once per tokenizer)."""
    return tuple(tokenizer.batch_decode([[i] for i in range(len(tokenizer))]))


def _word_start(text: str) -> bool:
    """A whole word that begins with a space: sub-word pieces ("asonry") are not words."""
    return text.startswith(" ") and bool(_ALPHA.match(text[1:].lower()))


def logit_lens_tokens(loaded: LoadedModel, cv: ConceptVector, top: int = LOGIT_LENS_TOP) -> set[int]:
    """Tokens whose logits the concept direction raises most (alphabetic words only)."""
    direction = torch.stack([cv.directions[layer] for layer in loaded.steering_layers]).mean(0)
    head = head_weight(loaded.model)  # [vocab, hidden]
    norm = getattr(loaded.model.base_model, "norm", None)
    if norm is not None and getattr(norm, "weight", None) is not None:
        w = norm.weight.detach().float()
        # Gemma's RMSNorm scales by (1 + weight); Llama's by weight.
        scale = 1 + w if "Gemma" in type(norm).__name__ else w
        direction = direction.to(scale.device) * scale
    logits = head.float() @ direction.to(head.device, torch.float32)
    texts = _vocab_texts(loaded.tokenizer)
    out: set[int] = set()
    for idx in logits.argsort(descending=True).tolist():
        if idx < len(texts) and _word_start(texts[idx]):
            out.add(idx)
            if len(out) >= top:
                break
    return out


def concept_token_ids(loaded: LoadedModel, cv: ConceptVector, words: tuple[str, ...]) -> frozenset[int]:
    wanted = {w.strip().lower() for w in words}
    listed = {i for i, text in enumerate(_vocab_texts(loaded.tokenizer)) if text.strip().lower() in wanted}
    return frozenset(listed | logit_lens_tokens(loaded, cv))


@lru_cache(maxsize=1)
def _byte_level_chars() -> dict[str, int]:
    """GPT-2 byte-level BPE spells each byte as one printable character; this maps them back."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {c: b for b, c in bytes_to_unicode().items()}


def readable_token(tokenizer, token_id: int) -> str:
    """A token as a person can read it: its text, or, for a piece of a multi-byte character
    (which decodes to U+FFFD alone), its bytes escaped like "\\xe2\\x80"."""
    text = tokenizer.decode([token_id])
    if "\ufffd" not in text:
        return text
    piece = tokenizer.convert_ids_to_tokens(token_id)
    chars = _byte_level_chars()
    if isinstance(piece, str) and piece and all(c in chars for c in piece):
        return bytes(chars[c] for c in piece).decode("utf-8", errors="backslashreplace")
    return str(piece)  # SentencePiece byte tokens already read as "<0xE2>"


def decide(logits: torch.Tensor, concept_ids: frozenset[int], tokenizer, threshold: float = DEFAULT_THRESHOLD) -> GateResult:
    """Gate on one row's unsteered next-token logits `[vocab]`."""
    probs = logits.float().softmax(-1)
    top = probs.topk(3)
    ids = top.indices.tolist()
    texts = tuple(readable_token(tokenizer, i) for i in ids)
    for i, p, text in zip(ids, top.values.tolist(), texts):
        if i in concept_ids and p >= threshold:
            return GateResult(True, text, p, texts)
    return GateResult(False, "", float(top.values[0]), texts)
