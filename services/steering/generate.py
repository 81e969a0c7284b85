"""Batched, steered text generation for the CLI and the validation gate.

Prompts are rendered with the model's chat template (or "User:/Assistant:" text for a
base model), left-padded into one batch, and each row gets its own additions; the batch
decodes on the same core as the generator's engine (batch.py).
"""

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from .batch import Rows, copy_rows, decode, prefill, select
from .errors import SamplingError
from .hooks import RowSteering, row_switches, stack_rows
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
    # Steer only the first this many generated tokens, then decode unsteered (what was steered
    # stays in the cache, so the opening still leans the rest); None: the whole reply.
    steer_tokens: int | None = None


@dataclass(frozen=True)
class Generation:
    text: str
    new_tokens: int
    seconds: float  # wall time of the whole batch this row was part of
    prompt_ids: tuple[int, ...] = ()  # the rendered prompt's tokens, padding removed
    token_ids: tuple[int, ...] = ()  # the reply's tokens, end-of-text included


def render_prompt(loaded: LoadedModel, prompt: PromptLike) -> str:
    """A chat ending in a user turn gets the assistant's generation prompt; one ending in an
    assistant turn is continued from where it stops (an assistant prefill)."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    prefill = messages[-1]["role"] == "assistant"
    if loaded.has_chat_template:
        return loaded.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=not prefill, continue_final_message=prefill
        )
    turns = "\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages)
    return turns if prefill else f"{turns}\nAssistant:"


# The smallest temperature served: logits / temperature stays far from float32 overflow.
MIN_TEMPERATURE = 1e-2


def _refuse_bad_rows(bad: torch.Tensor, what: str) -> None:
    if bool(bad.any()):
        rows = bad.nonzero().squeeze(-1).tolist()
        raise SamplingError(f"row(s) {rows}: {what}; no token can be sampled from them")


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> torch.Tensor:
    """Next token per row from `[rows, vocab]` logits. Rows whose distribution is unusable
    (NaN, or nothing finite left) raise SamplingError naming the rows, instead of letting
    argmax pick garbage or multinomial fail for the whole batch; callers that must isolate
    rows sample one row at a time."""
    if temperature < 0 or (0 < temperature < MIN_TEMPERATURE):
        raise ValueError(f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE:g}, got {temperature!r}")
    _refuse_bad_rows(logits.isnan().any(-1) | ~logits.isfinite().any(-1), "the logits are NaN or nowhere finite")
    if temperature == 0:
        return logits.argmax(-1)
    probs = (logits.float() / temperature).softmax(-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        sorted_p[(sorted_p.cumsum(-1) - sorted_p) >= top_p] = 0  # the first token always stays
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    _refuse_bad_rows(~probs.isfinite().all(-1) | (probs.sum(-1) <= 0), "the probabilities are not finite")
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def generate(
    loaded: LoadedModel,
    prompts: Sequence[PromptLike],
    rows: Sequence[RowSteering | Mapping[int, torch.Tensor] | None] | None = None,
    settings: GenerationSettings = GenerationSettings(),
) -> list[Generation]:
    """Generate one reply per prompt; `rows[i]` is `{layer: addition}` for prompt i, a
    RowSteering (additions and how they are applied), or None.

    The engine's decode core (batch.py) run to the end: rows that reach end-of-text leave the
    batch at once, so a batch costs what its live rows cost.
    """
    return generate_seeds(loaded, prompts, rows, settings, [settings.seed])[0]


@torch.no_grad()
def generate_seeds(
    loaded: LoadedModel,
    prompts: Sequence[PromptLike],
    rows: Sequence[RowSteering | Mapping[int, torch.Tensor] | None] | None,
    settings: GenerationSettings,
    seeds: Sequence[int | None],
) -> list[list[Generation]]:
    """`generate` once per seed (`settings.seed` is not used): the replies per seed, each the
    same as `generate` with that seed gives. The prompts are prefilled once and every seed
    decodes from its own copy of that batch, since a prompt's keys and values do not depend
    on the seed."""
    if settings.steer_tokens is not None and settings.steer_tokens < 1:
        raise ValueError(f"steer_tokens must be at least 1 (or None for the whole reply), got {settings.steer_tokens}")
    if not prompts:
        return [[] for _ in seeds]
    rows = list(rows) if rows is not None else [None] * len(prompts)
    if len(rows) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(rows)} steering rows")
    tok, model = loaded.tokenizer, loaded.model
    texts = [render_prompt(loaded, p) for p in prompts]
    prompt_ids = tok(texts, add_special_tokens=not loaded.has_chat_template)["input_ids"]
    deltas = stack_rows(rows, loaded.hidden_size, model.dtype, loaded.device)
    prompt_rows, preserve_rows = row_switches(rows, loaded.device)
    if not settings.steer_prompt:
        prompt_rows[:] = False
    eos = torch.tensor(sorted(eos_ids(loaded)) or [-1], device=loaded.device)
    eos_set = set(eos.tolist())
    start = time.perf_counter()
    prefilled = prefill(model, loaded.layers, prompt_ids, deltas, tok.pad_token_id or 0, (prompt_rows, preserve_rows))
    prefill_seconds = time.perf_counter() - start
    out = []
    for k, seed in enumerate(seeds):
        start = time.perf_counter()
        batch = prefilled if k == len(seeds) - 1 else copy_rows(prefilled)
        replies = _decode(loaded, batch, len(prompts), settings, seed, eos)
        seconds = prefill_seconds + time.perf_counter() - start
        results = []
        for ids, reply in zip(prompt_ids, replies):
            text = tok.decode([t for t in reply if t not in eos_set], skip_special_tokens=True)
            if not loaded.has_chat_template:
                text = text.split(_BASE_STOP)[0]
            results.append(Generation(text.strip(), len(reply), seconds, tuple(ids), tuple(reply)))
        out.append(results)
    return out


def _decode(loaded: LoadedModel, batch: Rows, n: int, settings: GenerationSettings, seed: int | None,
            eos: torch.Tensor) -> list[list[int]]:
    """Sample and decode a prefilled batch of `n` rows to the end; each row's reply tokens."""
    generator = None
    if seed is not None:
        generator = torch.Generator(device=loaded.device).manual_seed(seed)
    live = list(range(n))  # batch position -> prompt index
    replies: list[list[int]] = [[] for _ in range(n)]
    for step in range(settings.max_new_tokens):
        nxt = sample(batch.logits, settings.temperature, settings.top_p, generator)  # [live]
        done = torch.isin(nxt, eos)
        for b, token in enumerate(nxt.tolist()):
            replies[live[b]].append(token)
        if step == settings.max_new_tokens - 1:
            break
        if done.any():  # finished rows leave the batch and its cache
            keep = (~done).nonzero().squeeze(-1).tolist()
            if not keep:
                break
            batch, live, nxt = select(batch, keep), [live[i] for i in keep], nxt[keep]
        if step + 1 == settings.steer_tokens:  # the tokens to steer are sampled: release every row
            batch.deltas = {}
        decode(loaded.model, loaded.layers, batch, nxt)
    return replies


def eos_ids(loaded: LoadedModel) -> list[int]:
    eos = loaded.model.generation_config.eos_token_id
    if eos is None:
        eos = loaded.tokenizer.eos_token_id
    return [eos] if isinstance(eos, int) else list(eos or [])
