"""Batched, steered text generation for the CLI and the validation gate.

Prompts are rendered with the model's chat template (or "User:/Assistant:" text for a
base model), left-padded into one batch, and each row gets its own additions.
"""

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from .hooks import stack_rows, steer
from .loading import LoadedModel

Message = Mapping[str, str]
PromptLike = str | Sequence[Message]
_BASE_STOP = "\nUser:"  # a base model goes on to write the user's next turn; cut it there


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    steer_prompt: bool = True  # also steer the prompt's positions, not only generated tokens


@dataclass(frozen=True)
class Generation:
    text: str
    new_tokens: int
    seconds: float  # wall time of the whole batch this row was part of


def render_prompt(loaded: LoadedModel, prompt: PromptLike) -> str:
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if loaded.has_chat_template:
        return loaded.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    turns = "\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages)
    return f"{turns}\nAssistant:"


@torch.no_grad()
def generate(
    loaded: LoadedModel,
    prompts: Sequence[PromptLike],
    rows: Sequence[Mapping[int, torch.Tensor] | None] | None = None,
    settings: GenerationSettings = GenerationSettings(),
) -> list[Generation]:
    """Generate one reply per prompt; `rows[i]` is `{layer: addition}` for prompt i, or None."""
    if not prompts:
        return []
    rows = list(rows) if rows is not None else [None] * len(prompts)
    if len(rows) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(rows)} steering rows")
    tok, model = loaded.tokenizer, loaded.model
    texts = [render_prompt(loaded, p) for p in prompts]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=not loaded.has_chat_template)
    enc = {k: v.to(loaded.device) for k, v in enc.items()}
    deltas = stack_rows(rows, loaded.hidden_size, model.dtype, loaded.device)
    sample = settings.temperature > 0
    kwargs = dict(
        max_new_tokens=settings.max_new_tokens,
        do_sample=sample,
        pad_token_id=tok.pad_token_id,
    )
    if sample:
        kwargs.update(temperature=settings.temperature, top_p=settings.top_p, top_k=0)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    if settings.seed is not None:
        torch.manual_seed(settings.seed)
    start = time.perf_counter()
    with steer(loaded.layers, deltas, steer_prompt=settings.steer_prompt):
        out = model.generate(**enc, **kwargs)
    seconds = time.perf_counter() - start
    new = out[:, enc["input_ids"].shape[1] :]
    results = []
    eos = set(_eos_ids(loaded))
    for row in new.tolist():
        n = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        text = tok.decode(row[:n], skip_special_tokens=True)
        if not loaded.has_chat_template:
            text = text.split(_BASE_STOP)[0]
        results.append(Generation(text=text.strip(), new_tokens=n, seconds=seconds))
    return results


def _eos_ids(loaded: LoadedModel) -> list[int]:
    eos = loaded.model.generation_config.eos_token_id
    if eos is None:
        eos = loaded.tokenizer.eos_token_id
    return [eos] if isinstance(eos, int) else list(eos or [])
