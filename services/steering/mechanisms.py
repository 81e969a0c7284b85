"""What the skip gate and KL re-injection see on real replies: the unsteered first-token
distribution the gate decides on, and KL(steered || unsteered) at every token of a steered
reply, which the KL monitor's running mean watches. `scripts/calibrate_mechanisms.py` uses
these on child turns at the settings Blip's Chat serves."""

import statistics
from collections.abc import Sequence

import torch

from .derive import position_ids
from .generate import Generation, PromptLike, render_prompt
from .hooks import RowSteering, row_switches, stack_rows, steer
from .loading import LoadedModel


def _left_padded(loaded: LoadedModel, seqs: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), loaded.tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(list(s))
        mask[i, width - len(s):] = 1
    return ids.to(loaded.device), mask.to(loaded.device)


@torch.no_grad()
def first_token_logits(loaded: LoadedModel, prompts: Sequence[PromptLike], batch_size: int = 32) -> torch.Tensor:
    """The unsteered next-token logits after each rendered prompt `[prompts, vocab]`: what the gate
    decides on before a reply's first token."""
    out = []
    for start in range(0, len(prompts), batch_size):
        texts = [render_prompt(loaded, p) for p in prompts[start:start + batch_size]]
        enc = loaded.tokenizer(texts, add_special_tokens=not loaded.has_chat_template)
        ids, mask = _left_padded(loaded, enc["input_ids"])
        out.append(loaded.model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), logits_to_keep=1).logits[:, -1].float())
    return torch.cat(out)


@torch.no_grad()
def reply_kl(loaded: LoadedModel, replies: Sequence[Generation], row: RowSteering, batch_size: int = 16) -> list[list[float]]:
    """Per reply, KL(steered || unsteered) of the next-token distribution at each of its tokens,
    both models reading the steered reply (as the engine's KL shadow does). The steered pass
    steers every position: a configuration that steers generated tokens only is not measured."""
    if not row.steer_prompt:
        raise ValueError("reply_kl steers every position; this row steers generated tokens only")
    out: list[list[float]] = []
    for start in range(0, len(replies), batch_size):
        chunk = replies[start:start + batch_size]
        ids, mask = _left_padded(loaded, [list(g.prompt_ids) + list(g.token_ids) for g in chunk])
        keep = max(len(g.token_ids) for g in chunk) + 1
        kwargs = {"input_ids": ids, "attention_mask": mask, "position_ids": position_ids(mask), "logits_to_keep": keep}
        plain = loaded.model(**kwargs).logits.float().log_softmax(-1)
        rows = [row] * len(chunk)
        prompt_rows, preserve_rows = row_switches(rows, loaded.device)
        with steer(loaded.layers, stack_rows(rows, loaded.hidden_size, loaded.model.dtype, loaded.device),
                   steer_prompt=prompt_rows, preserve_norm=preserve_rows):
            steered = loaded.model(**kwargs).logits.float().log_softmax(-1)
        kl = (steered.exp() * (steered - plain)).sum(-1)  # [batch, keep]: position k predicts token k+1
        for i, g in enumerate(chunk):
            n = len(g.token_ids)
            # The logits that chose the reply's n tokens: the prompt's last position and the first n-1 tokens'.
            out.append([float(x) for x in kl[i, keep - 1 - n : keep - 1]])
    return out


def running_means(values: Sequence[float], window: int) -> list[float]:
    """The KL monitor's running mean once a whole window has been seen (one per token after it)."""
    return [statistics.fmean(values[i - window:i]) for i in range(window, len(values) + 1)]


def percentiles(values: Sequence[float], qs: Sequence[int] = (5, 10, 25, 50, 75)) -> dict[str, float]:
    if len(values) < 2:
        return {}
    cuts = statistics.quantiles(values, n=100)
    return {f"p{q}": round(cuts[q - 1], 4) for q in qs}
