"""The validation gate: four model checks, then per concept an effect-size gate and an
alpha sweep that finds how hard the concept can be pushed before the text breaks.

All generation is batched with per-row vectors: one batch holds every swept alpha of a
concept for every evaluation prompt.
"""

import datetime as dt
import json
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from .coherence import is_degenerate, perplexities
from .config import SteerConfig, candidate_bands
from .derive import layer_activations, position_ids
from .errors import ConfigError, NotFoundError
from .generate import Generation, GenerationSettings, PromptLike, generate, generate_seeds
from .guard import ThemeGuard, Verdict
from .layers import recorded_outputs, resolve_layers
from .loading import LoadedModel, load_model
from .optimize import grid_scale
from .profiles import BLIP_ALLOWLIST
from .record import blip_decision, coherent, d_interval, decisions, negative_decisions, safe_for_children
from .registry import ModelEntry
from .scoring import ConceptScorer
from .vector import ConceptVector
from .vocabulary import instructed

# The write-up's canary is a random unit vector at alpha 4 on its models' scale. Residual
# norms differ about 50-fold between our models, so the canary's alpha is taken relative to
# the model's own mean residual norm at the steering layers: 0.024 of it, which is alpha 4
# on SmolLM2 (norm about 170).
CANARY_ALPHA_REL = 0.024
CANARY_KL_MIN = 0.05
CANARY_PROMPTS = (
    "Tell me about your favourite place.",
    "What should I have for breakfast?",
    "How do bees make honey?",
    "Can you help me with my homework?",
)
BEHAVIOUR_PAIRS = (
    ("Tell me about your morning.", "happy"),
    ("What did you do at the weekend?", "sad"),
    ("I have a spelling test tomorrow.", "calm"),
)
# Swept strengths relative to the steering layers' mean residual norm. On SmolLM2
# (norm about 170) they are alphas of about 4, 6, 8 and 12.
ALPHA_GRID_REL = (0.024, 0.036, 0.048, 0.072)
BEHAVIOUR_ALPHA_REL = 0.048
# Prompt and steering together are swept at the grid's middle strengths only: the instruction
# already moves the register, and the grid's ends cost a third of a concept's validation more.
# 0.042 between them: at 0.048 warmth and enthusiasm lose coherence, at 0.036 they miss the gate.
BOTH_GRID_REL = (0.036, 0.042, 0.048)


@dataclass(frozen=True)
class BlipSetting:
    """How Blip speaks (`vectors/eval/blip.json`): its system prompt, and per allowlist concept the
    one-sentence register instruction that prompt mode adds to it."""

    system_prompt: str
    instructions: Mapping[str, str]

    def messages(self, prompt: str, concept: str | None = None) -> list[dict[str, str]]:
        """A child's prompt under Blip's system prompt, with `concept`'s instruction when given."""
        system = instructed(self.system_prompt, self.instructions[concept] if concept else "")
        return [{"role": "system", "content": system}, {"role": "user", "content": prompt}]


def load_blip_setting(eval_dir: Path) -> BlipSetting:
    path = Path(eval_dir) / "blip.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        setting = BlipSetting(str(data["system_prompt"]), {str(k): str(v) for k, v in data["instructions"].items()})
    except FileNotFoundError:
        raise NotFoundError(f"Blip's setting {path} does not exist") from None
    except (ValueError, KeyError, AttributeError) as exc:
        raise ConfigError(f"{path}: malformed Blip setting ({exc})") from None
    missing = sorted(BLIP_ALLOWLIST - set(setting.instructions))
    if missing or not setting.system_prompt.strip():
        raise ConfigError(f"{path}: needs a system_prompt and an instruction for every allowlist concept (missing: {missing})")
    return setting


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    figure: float
    threshold: float | None = None
    detail: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "figure": self.figure, "threshold": self.threshold, "detail": self.detail}


@dataclass(frozen=True)
class SweepSettings:
    prompts: tuple[str, ...]
    seeds: tuple[int, ...] = (0, 1)
    # What a child hears is measured on three times the replies (96 a side on 16 prompts), so a
    # Blip concept's d has a 95% interval about +-0.3 wide instead of +-0.5. Both seed lists
    # start at 0: the unsteered baseline is sampled once, on the longer, and each concept is
    # compared with its first replies, the ones drawn with the same seeds.
    allowlist_seeds: tuple[int, ...] = tuple(range(6))
    alpha_grid_rel: tuple[float, ...] = ALPHA_GRID_REL
    max_new_tokens: int = 24  # about 18 words: enough to judge the register, and the whole gate fits in 30 min on 2 cores
    temperature: float = 0.8
    top_p: float = 1.0  # nucleus sampling sorts the whole vocabulary per row per token: too slow here
    batch_size: int = 64
    # The configuration search (see search_config): each candidate is tried at one strength on the
    # replies of the concept's first seeds (as many as screen_seeds for a Blip concept, one for the
    # others), then the chosen one is swept over the whole grid. False: the model's default band at
    # a uniform alpha, as before.
    search: bool = True
    screen_alpha_rel: float = 0.036
    screen_seeds: tuple[int, ...] = (0, 1)
    # Given, an allowlist concept is measured as Blip speaks: every arm under Blip's system prompt
    # against unsteered replies under it, and beside steering, the instruction alone (prompt mode)
    # and the instruction with steering at `both_grid_rel` (both). None: as every other concept.
    blip: BlipSetting | None = None
    both_grid_rel: tuple[float, ...] = BOTH_GRID_REL
    # Steer only each reply's first this many tokens (GenerationSettings.steer_tokens). Validation
    # steers whole replies, as the services do; `scripts/screen_bands.py --release` looks at this.
    steer_tokens: int | None = None

    def scaled(self, scale: float) -> "SweepSettings":
        """Every swept strength times `scale` (the registry's `sweep_scale`), rounded as the record shows it."""
        if scale == 1.0:
            return self
        alphas, both = (tuple(round(x * scale, 4) for x in grid) for grid in (self.alpha_grid_rel, self.both_grid_rel))
        return replace(self, alpha_grid_rel=alphas, both_grid_rel=both, screen_alpha_rel=round(self.screen_alpha_rel * scale, 4))


def concept_settings(settings: SweepSettings, cv: ConceptVector) -> SweepSettings:
    """The settings `cv` is swept with: a trained direction at its own, lower strengths (`optimize.grid_scale`)."""
    return settings.scaled(grid_scale(cv))


def blip_measured(settings: SweepSettings, concept: str) -> bool:
    return settings.blip is not None and concept in BLIP_ALLOWLIST


def concept_prompts(settings: SweepSettings, concept: str, instructed: bool = False) -> list[PromptLike]:
    """The evaluation prompts as a concept's replies are sampled: under Blip's system prompt (with
    the concept's instruction when `instructed`) for an allowlist concept measured as Blip speaks."""
    if settings.blip is None or not blip_measured(settings, concept):
        return list(settings.prompts)
    return [settings.blip.messages(p, concept if instructed else None) for p in settings.prompts]


def seeds_for(settings: SweepSettings, concept: str) -> tuple[int, ...]:
    return settings.allowlist_seeds if concept in BLIP_ALLOWLIST else settings.seeds


def screen_seeds_for(settings: SweepSettings, concept: str) -> tuple[int, ...]:
    """The first of the concept's own seeds (so the baseline always has their replies): as many as
    `screen_seeds` for a Blip concept, one for the others."""
    return seeds_for(settings, concept)[: len(settings.screen_seeds) if concept in BLIP_ALLOWLIST else 1]


def baseline_seeds(settings: SweepSettings) -> tuple[int, ...]:
    """The seeds the unsteered baseline is sampled with: the longer list, which starts with the other."""
    shorter, longer = sorted((settings.seeds, settings.allowlist_seeds), key=len)
    if longer[: len(shorter)] != shorter:
        raise ValueError(f"seed lists {settings.seeds} and {settings.allowlist_seeds} must share their start")
    return longer


def activation_scale(loaded: LoadedModel, cv: ConceptVector) -> float:
    """Mean residual norm over the model's default band (the canary's and behavioural check's scale)."""
    return default_config(loaded).activation_scale(cv)


def alpha_grid(config: SteerConfig, cv: ConceptVector, rel: Sequence[float]) -> list[tuple[float, float]]:
    """(alpha, alpha relative to the band's mean residual norm) pairs, alphas rounded for people to read."""
    scale = config.activation_scale(cv)
    return [(round(r * scale, 1), r) for r in rel]


# The four model checks ----------------------------------------------------------------


def check_load(entry: ModelEntry, cache: Path, device: str | None) -> tuple[Check, LoadedModel | None]:
    start = time.perf_counter()
    try:
        loaded = load_model(entry, cache, device=device)
        loaded.tokenizer("ok")
    except Exception as exc:  # any failure to load is this check's verdict, not a crash
        return Check("load", False, time.perf_counter() - start, detail=f"{type(exc).__name__}: {exc}"), None
    seconds = time.perf_counter() - start
    return Check("load", True, round(seconds, 2), detail=f"{loaded.name} on {loaded.device}, {loaded.model.dtype}"), loaded


@torch.no_grad()
def check_hook_path(loaded: LoadedModel) -> Check:
    """The template resolves to decoder blocks, and each steering layer's hook really fires
    in the forward pass with a [batch, seq, hidden] output (fused layers never do)."""
    try:
        layers = resolve_layers(loaded.model, loaded.entry.layer_template)
    except ValueError as exc:
        return Check("hook_path", False, 0, detail=str(exc))
    bad = [i for i in loaded.steering_layers if not 0 <= i < len(layers)]
    if bad:
        return Check("hook_path", False, len(layers), detail=f"steering layers {bad} are outside 0..{len(layers) - 1}")
    with recorded_outputs(layers, loaded.steering_layers) as outputs:
        enc = loaded.tokenizer(["Hello there."], return_tensors="pt").to(loaded.device)
        loaded.model(**enc)
    fired = {i: tuple(out.shape) for i, out in outputs.items()}
    silent = [i for i in loaded.steering_layers if i not in fired]
    wrong = [i for i, shape in fired.items() if len(shape) != 3 or shape[-1] != loaded.hidden_size]
    ok = not silent and not wrong
    detail = f"{layers.template}: {len(layers)} x {type(layers[0]).__name__}"
    if silent:
        detail += f"; hooks on layers {silent} never fired (fused layers? load with fuse_layers=False)"
    if wrong:
        detail += f"; layers {wrong} do not output [batch, seq, {loaded.hidden_size}]"
    return Check("hook_path", ok, len(layers), detail=detail)


@torch.no_grad()
def next_token_kl(loaded: LoadedModel, prompts: Sequence[str], additions: dict[int, torch.Tensor]) -> list[float]:
    """KL(steered || unsteered) of the next-token distribution after each prompt."""
    from .generate import render_prompt
    from .hooks import steer

    texts = [render_prompt(loaded, p) for p in prompts]
    enc = loaded.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=not loaded.has_chat_template)
    enc = {k: v.to(loaded.device) for k, v in enc.items()}
    pos = {"position_ids": position_ids(enc["attention_mask"])}
    plain = loaded.model(**enc, **pos, logits_to_keep=1).logits[:, -1].float().log_softmax(-1)
    rows = {layer: v.expand(len(prompts), -1) for layer, v in additions.items()}
    with steer(loaded.layers, rows):
        steered = loaded.model(**enc, **pos, logits_to_keep=1).logits[:, -1].float().log_softmax(-1)
    kl = (steered.exp() * (steered - plain)).sum(-1)
    return [float(x) for x in kl]


def residual_scale(loaded: LoadedModel, prompts: Sequence[str] = CANARY_PROMPTS) -> float:
    """Mean residual norm at the steering layers over `prompts` (attention sink left out)."""
    from .generate import render_prompt

    _, norm_sum, norm_count = layer_activations(loaded, [render_prompt(loaded, p) for p in prompts])
    layers = list(loaded.steering_layers)
    return float((norm_sum[layers] / norm_count[layers].clamp(min=1)).mean())


def check_canary(loaded: LoadedModel, direction: torch.Tensor | None = None, seed: int = 0) -> Check:
    """A seeded random unit vector at alpha 4 (on SmolLM2's scale) must move the next-token distribution."""
    if direction is None:
        g = torch.Generator().manual_seed(seed)
        direction = torch.nn.functional.normalize(torch.randn(loaded.hidden_size, generator=g), dim=0)
    alpha = round(CANARY_ALPHA_REL * residual_scale(loaded), 2)
    additions = {layer: alpha * direction for layer in loaded.steering_layers}
    kl = statistics.fmean(next_token_kl(loaded, CANARY_PROMPTS, additions))
    return Check("canary_kl", kl > CANARY_KL_MIN, round(kl, 5), CANARY_KL_MIN,
                 f"random unit vector (seed {seed}) x alpha {alpha:g} ({CANARY_ALPHA_REL:g} of the residual norm) "
                 f"on layers {list(loaded.steering_layers)}")


def check_behavioural(loaded: LoadedModel, vectors: dict[str, ConceptVector]) -> Check:
    """Greedy steered text differs from unsteered on three prompt/concept pairs."""
    missing = [c for _, c in BEHAVIOUR_PAIRS if c not in vectors]
    if missing:
        return Check("behavioural", False, 0, 3, f"no usable vector for {missing}; run `steer derive`")
    prompts = [p for p, _ in BEHAVIOUR_PAIRS]
    rows: list[dict[int, torch.Tensor] | None] = [None] * 3  # the prompts unsteered, then steered
    for _, concept in BEHAVIOUR_PAIRS:
        cv = vectors[concept]
        rows.append(cv.additions(BEHAVIOUR_ALPHA_REL * activation_scale(loaded, cv), loaded.steering_layers))
    out = generate(loaded, prompts + prompts, rows, GenerationSettings(max_new_tokens=24))
    differ = [out[i].text != out[3 + i].text for i in range(3)]
    detail = "; ".join(f"{c}: {'differs' if d else 'SAME'}" for (_, c), d in zip(BEHAVIOUR_PAIRS, differ))
    return Check("behavioural", all(differ), sum(differ), 3, detail)


# The effect-size gate and the alpha sweep ----------------------------------------------


def cohens_d(treated: Sequence[float], control: Sequence[float]) -> float:
    n1, n0 = len(treated), len(control)
    v1, v0 = statistics.variance(treated), statistics.variance(control)
    pooled = (((n1 - 1) * v1 + (n0 - 1) * v0) / (n1 + n0 - 2)) ** 0.5
    diff = statistics.fmean(treated) - statistics.fmean(control)
    return diff / pooled if pooled > 0 else (0.0 if diff == 0 else float("inf") * (1 if diff > 0 else -1))


@dataclass
class Baseline:
    """Unsteered replies to the evaluation prompts, seed-major (every prompt for the first seed,
    then the next), with each reply's perplexity, loop and guard verdicts."""

    replies: list[Generation]
    ppl: list[float]
    degenerate: list[bool]
    flagged: list[bool]
    scores: dict[str, list[float]] = field(default_factory=dict)

    @classmethod
    def of(cls, loaded: LoadedModel, replies: list[Generation], flagged: list[bool]) -> "Baseline":
        """Unsteered `replies` with their perplexities and loop verdicts; `flagged`: the guard's."""
        return cls(replies, perplexities(loaded, replies), [is_degenerate(g.text) for g in replies], flagged)

    def scores_for(self, scorer: ConceptScorer, concept: str) -> list[float]:
        if concept not in self.scores:
            self.scores[concept] = [float(x) for x in scorer.scores([g.text for g in self.replies], concept)]
        return self.scores[concept]


def _sample(loaded: LoadedModel, settings: SweepSettings, prompts: Sequence[PromptLike], rows: list,
            seeds: Sequence[int]) -> list[list[Generation]]:
    """The replies per seed; each batch is prefilled once for all the seeds."""
    out: list[list[Generation]] = [[] for _ in seeds]
    gen = GenerationSettings(settings.max_new_tokens, settings.temperature, settings.top_p,
                             steer_tokens=settings.steer_tokens)
    for start in range(0, len(prompts), settings.batch_size):
        chunk = slice(start, start + settings.batch_size)
        for replies, more in zip(out, generate_seeds(loaded, prompts[chunk], rows[chunk], gen, seeds), strict=True):
            replies += more
    return out


def flag_rate(guard: ThemeGuard, replies: Sequence[Generation]) -> tuple[list[bool], dict[str, int]]:
    """Whether the guard flags each reply, and how many replies each theme flagged."""
    return tally(guard.check_many([g.text for g in replies]))


def tally(verdicts: Sequence[Verdict]) -> tuple[list[bool], dict[str, int]]:
    """Whether each verdict flags, and how many flagged each theme."""
    themes: dict[str, int] = {}
    for v in verdicts:
        for theme in v.themes:
            themes[theme] = themes.get(theme, 0) + 1
    return [v.flagged for v in verdicts], dict(sorted(themes.items()))


def baseline(loaded: LoadedModel, settings: SweepSettings, guard: ThemeGuard, blip: bool = False) -> Baseline:
    """Unsteered replies to the evaluation prompts; with `blip`, under Blip's system prompt (the
    control of the allowlist concepts measured as Blip speaks)."""
    if blip and settings.blip is None:
        raise ValueError("a Blip baseline needs the settings' Blip system prompt")
    prompts = [settings.blip.messages(p) for p in settings.prompts] if blip and settings.blip else list(settings.prompts)
    seeds = settings.allowlist_seeds if blip else baseline_seeds(settings)
    replies = [g for seed_out in _sample(loaded, settings, prompts, [None] * len(prompts), seeds) for g in seed_out]
    return Baseline.of(loaded, replies, flag_rate(guard, replies)[0])


def _point(
    loaded: LoadedModel, cv: ConceptVector, scorer: ConceptScorer, base: Baseline, guard: ThemeGuard,
    alpha: float, rel: float, replies: list[Generation], flags: tuple[list[bool], dict[str, int]] | None = None,
) -> dict[str, Any]:
    """One swept point's figures from its replies (seed-major, like the baseline), each against
    the baseline's replies drawn with the same seeds. `flags`: `flag_rate`'s for the replies,
    where the caller has them already (the guard is the slow part)."""
    n_control = len(replies)
    control = base.scores_for(scorer, cv.concept)[:n_control]
    scores = [float(x) for x in scorer.scores([g.text for g in replies], cv.concept)]
    ppl = perplexities(loaded, replies)
    ratios = [s / b for s, b in zip(ppl, base.ppl[:n_control], strict=True)]
    degenerate = statistics.fmean(is_degenerate(g.text) for g in replies)
    flagged, themes = flags if flags is not None else flag_rate(guard, replies)
    rate = statistics.fmean(flagged)
    d = cohens_d(scores, control)
    low, high = d_interval(d, len(scores), len(control))
    return {
        "alpha": alpha,
        "alpha_rel": rel,
        "d": round(d, 4),
        "d_low": round(low, 4),
        "d_high": round(high, 4),
        "n": len(scores),
        "n_control": len(control),
        "score_mean": round(statistics.fmean(scores), 5),
        "ppl_median": round(statistics.median(ppl), 3),
        "ppl_ratio": round(statistics.median(ratios), 4),
        "degenerate": round(degenerate, 4),
        "degenerate_excess": round(degenerate - statistics.fmean(base.degenerate[:n_control]), 4),
        "flags": round(rate, 4),
        "flag_excess": round(rate - statistics.fmean(base.flagged[:n_control]), 4),
        "flag_themes": themes,
    }


def _sweep(
    loaded: LoadedModel, cv: ConceptVector, scorer: ConceptScorer, settings: SweepSettings, base: Baseline,
    guard: ThemeGuard, config: SteerConfig, grid: list[tuple[float, float]], seeds: tuple[int, ...],
    prompts: Sequence[PromptLike] | None = None,
) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """A point per (alpha, relative alpha) of `grid` with `config`, and an example reply per alpha
    (alpha 0: unsteered). Every alpha of the grid is one batch per seed. `prompts`: the settings'."""
    prompts = list(settings.prompts) if prompts is None else list(prompts)
    n = len(prompts)
    rows = [config.row(cv, alpha) if alpha else None for alpha, _ in grid for _ in prompts]
    by_seed = _sample(loaded, settings, prompts * len(grid), rows, seeds)
    sweep, examples = [], {}
    for k, (alpha, rel) in enumerate(grid):
        replies = [g for seed_out in by_seed for g in seed_out[k * n : (k + 1) * n]]  # seed-major, like the baseline
        sweep.append(_point(loaded, cv, scorer, base, guard, alpha, rel, replies))
        examples[str(alpha)] = replies[0].text
    return sweep, examples


def default_config(loaded: LoadedModel) -> SteerConfig:
    """What every concept was steered with before the search: the model's band, alpha uniform."""
    return SteerConfig(loaded.steering_layers)


def _screen_key(point: dict[str, Any]) -> tuple[bool, bool, float]:
    """Coherent first, then no more flags or loops than unsteered, then the larger d."""
    return coherent(point), safe_for_children(point), point["d"]


def search_config(
    loaded: LoadedModel, cv: ConceptVector, scorer: ConceptScorer, settings: SweepSettings, base: Baseline,
    guard: ThemeGuard, prompts: Sequence[PromptLike] | None = None,
) -> tuple[SteerConfig, list[dict[str, Any]]]:
    """The concept's steering configuration, and every candidate's screened point.

    Round one tries the default band at a uniform alpha (what was served before), then each
    candidate band (`candidate_bands`) with alpha relative to each layer's residual norm.
    Round two takes round one's best and tries it norm-preserving, and on generated tokens
    only. Each candidate is one point at `screen_alpha_rel` of its band's norm on the first
    seeds' replies; the best by `_screen_key` is chosen. A cheap screen: the chosen
    configuration's own sweep, on all the replies, is what the gate decides on.
    """
    seeds = screen_seeds_for(settings, cv.concept)
    screened: list[tuple[SteerConfig, dict[str, Any]]] = []

    def screen(config: SteerConfig) -> None:
        if any(layer not in cv.directions for layer in config.layers):
            return
        [(alpha, rel)] = alpha_grid(config, cv, [settings.screen_alpha_rel])
        point = _sweep(loaded, cv, scorer, settings, base, guard, config, [(alpha, rel)], seeds, prompts)[0][0]
        screened.append((config, point))

    default = default_config(loaded)
    screen(default)
    for band in candidate_bands(default.layers, loaded.num_layers):
        screen(SteerConfig(band, scale="norm"))
    best = max(screened, key=lambda cp: _screen_key(cp[1]))[0]
    screen(best.with_(preserve_norm=True))
    screen(best.with_(positions="generated"))
    best = max(screened, key=lambda cp: _screen_key(cp[1]))[0]
    return best, [{"config": c.as_dict(), "name": c.name} | p for c, p in screened]


def sweep_concept(
    loaded: LoadedModel,
    cv: ConceptVector,
    scorer: ConceptScorer,
    settings: SweepSettings,
    base: Baseline,
    guard: ThemeGuard,
    negative: bool = False,
    blip_base: Baseline | None = None,
) -> dict[str, Any]:
    """The concept's record entry. With `negative`, steering away from the concept (alpha < 0)
    is swept too, as a direction of its own: only a passed negative sweep lets the personal
    profile serve a negative alpha, and the Blip profile never does.

    An allowlist concept measured as Blip speaks (`settings.blip`) is swept under Blip's system
    prompt against `blip_base`, and its entry's `modes` holds the two other ways Blip can reach
    the register: the instruction alone, and the instruction with steering."""
    concept = cv.concept
    settings = concept_settings(settings, cv)
    as_blip = blip_measured(settings, concept)
    if as_blip and blip_base is None:
        raise ValueError(f"{concept} is measured as Blip speaks: it needs the baseline under Blip's system prompt")
    control = blip_base if as_blip and blip_base is not None else base
    prompts = concept_prompts(settings, concept)
    config, screened = (search_config(loaded, cv, scorer, settings, control, guard, prompts) if settings.search
                        else (default_config(loaded), []))
    grid = alpha_grid(config, cv, settings.alpha_grid_rel)
    seeds = seeds_for(settings, concept)
    sweep, examples = _sweep(loaded, cv, scorer, settings, control, guard, config, grid, seeds, prompts)
    entry = {
        **decisions(sweep),
        "vector_sha256": cv.content_sha256,
        "config": config.as_dict(),
        "activation_scale": round(config.activation_scale(cv), 3),
        "sweep": sweep,
        "example_prompt": settings.prompts[0],
        "examples": examples,
    }
    if screened:
        entry["search"] = screened
    if (scale := grid_scale(cv)) != 1.0:
        entry["grid_scale"] = scale
    if as_blip and settings.blip is not None:
        instructed = concept_prompts(settings, concept, instructed=True)
        [prompt_point], prompt_example = _sweep(loaded, cv, scorer, settings, control, guard, config, [(0.0, 0.0)], seeds, instructed)
        both, both_examples = _sweep(loaded, cv, scorer, settings, control, guard, config,
                                     alpha_grid(config, cv, settings.both_grid_rel), seeds, instructed)
        entry["modes"] = {
            "system_prompt": settings.blip.system_prompt,
            "instruction": settings.blip.instructions[concept],
            "prompt": prompt_point,
            "both": both,
            "examples": {"prompt": prompt_example["0.0"], **{f"both {a}": t for a, t in both_examples.items()}},
        }
        entry["blip"] = blip_decision(entry)
    if negative:
        away = [(-alpha, rel) for alpha, rel in grid]
        neg_sweep, neg_examples = _sweep(loaded, cv, scorer, settings, control, guard, config, away, seeds, prompts)
        entry["negative"] = {
            **negative_decisions(neg_sweep),
            "sweep": neg_sweep,
            "examples": neg_examples,
        }
    return entry


def _baseline_figures(base: Baseline, n: int) -> dict[str, Any]:
    return {
        "ppl_median": round(statistics.median(base.ppl[:n]), 3),
        "replies": n,
        "degenerate": round(statistics.fmean(base.degenerate[:n]), 4),
        "flags": round(statistics.fmean(base.flagged[:n]), 4),
    }


def model_record(loaded: LoadedModel, checks: list[Check], concepts: dict[str, dict[str, Any]], settings: SweepSettings,
                 base: Baseline | None, seconds: float, blip_base: Baseline | None = None) -> dict[str, Any]:
    record = {
        "model": loaded.name,
        "fingerprint": loaded.fingerprint,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "duration_s": round(seconds, 1),
        "layers": list(loaded.steering_layers),
        "checks": {c.name: c.as_dict() for c in checks},
        "settings": {
            "prompts": len(settings.prompts),
            "seeds": list(settings.seeds),
            "allowlist_seeds": list(settings.allowlist_seeds),
            "alpha_grid_rel": list(settings.alpha_grid_rel),
            "max_new_tokens": settings.max_new_tokens,
            "temperature": settings.temperature,
            "top_p": settings.top_p,
            "search": settings.search,
            "screen_alpha_rel": settings.screen_alpha_rel,
            "screen_seeds": list(settings.screen_seeds),
            "blip_system_prompt": settings.blip.system_prompt if settings.blip else None,
            "both_grid_rel": list(settings.both_grid_rel),
        },
        # Over the first seeds' replies, the control of every concept off the allowlist, so a partial
        # re-validation can tell that its baseline is the earlier record's; and over all of them.
        "baseline": None if base is None else _baseline_figures(base, len(settings.prompts) * len(settings.seeds)),
        "baseline_allowlist": None if base is None else _baseline_figures(base, len(base.replies)),
        "concepts": concepts,
    }
    if blip_base is not None:  # the control of the allowlist concepts measured as Blip speaks
        record["baseline_blip"] = _baseline_figures(blip_base, len(blip_base.replies))
    return record


def load_eval_prompts(eval_dir: Path) -> tuple[str, ...]:
    lines = (Path(eval_dir) / "prompts.jsonl").read_text(encoding="utf-8").splitlines()
    return tuple(json.loads(line)["text"] for line in lines if line.strip())


def run_model_checks(loaded: LoadedModel, vectors: dict[str, ConceptVector], on_check: Callable[[Check], None] | None = None) -> list[Check]:
    checks = []
    for fn in (lambda: check_hook_path(loaded), lambda: check_canary(loaded), lambda: check_behavioural(loaded, vectors)):
        check = fn()
        checks.append(check)
        if on_check:
            on_check(check)
        if not check.passed:
            break
    return checks
