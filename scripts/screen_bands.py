"""One Blip concept steered in bands the configuration search does not try, measured as validation measures it.

    HF_HUB_OFFLINE=1 .venv/bin/python scripts/screen_bands.py --concept playfulness \
        --bands 6-12,3-9 --rel 0.027,0.036,0.042 --seeds 6 --out vectors/candidates/<model>.<concept>-bands.json

Replies are sampled under Blip's system prompt, with the concept's instruction (`--mode both`, what Chat
serves) or without it (`--mode steer`), at each strength relative to the band's mean residual norm with
alpha in proportion to each layer's norm (or the same at every layer, `--scale uniform`), and set against
unsteered replies under the same system prompt:
d with its interval, perplexity ratio, looping and flagged, by validation's own `_sweep`. A look, not a
record: nothing is served from it, and only `steer validate` decides what Blip serves.

By default the concept's stored vector is steered. `--direction` derives one here instead, from the
concept's pairs or `--pairs FILE`: `caa` (the stored method, mean difference at each side's last
token), `pca` (the first principal component of the pairs' last-token differences, as repeng's
default, turned to agree with their mean), `reply-mean` (the mean difference of each side's
activations averaged over its reply's tokens rather than read at its last) or `mean-centred`
(the mean of the positive sides less the mean of both sides of every stored concept's pairs,
Jorgensen et al.'s mean-centring: what sets the concept apart from assistant replies in general)
or `optimized` (BiPO: the directions at the bands' layers trained from the mean difference so the
steered model prefers the pairs' positive replies, `--train-rel` and `--steps`; optimize.py).

`--release K` steers the prompt and only each reply's first K tokens, then lets the model go on
unsteered: a strong push that sets the opening, with the rest of the reply the model's own.
"""

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "services"))

from steering.atomic import write_text_atomic  # noqa: E402
from steering.config import SteerConfig  # noqa: E402
from steering.derive import derive_concept, pair_activations, render_reply  # noqa: E402
from steering.errors import SteeringError  # noqa: E402
from steering.guard import load_guard  # noqa: E402
from steering.layers import recorded_outputs  # noqa: E402
from steering.loading import LoadedModel  # noqa: E402
from steering.optimize import optimized_vector  # noqa: E402
from steering.pairs import Concept, concept_names, load_concept  # noqa: E402
from steering.profiles import BLIP_ALLOWLIST  # noqa: E402
from steering.registry import ModelEntry, load_registry  # noqa: E402
from steering.scoring import load_scorer  # noqa: E402
from steering.settings import Paths, paths_from_env  # noqa: E402
from steering.validate import (SweepSettings, _sweep, alpha_grid, baseline, check_load, concept_prompts,  # noqa: E402
                               load_blip_setting, load_eval_prompts)
from steering.validate_model import model_vectors  # noqa: E402
from steering.vector import ConceptVector  # noqa: E402

DIRECTIONS = ("caa", "pca", "reply-mean", "mean-centred", "optimized")


def _band(text: str) -> tuple[int, ...]:
    lo, _, hi = text.partition("-")
    return tuple(range(int(lo), int(hi or lo) + 1))


@torch.no_grad()
def reply_means(loaded: LoadedModel, concept: Concept, side: str) -> torch.Tensor:
    """Each pair's `side` averaged over its reply's tokens at every layer: [pairs, layers, hidden]."""
    tok, n = loaded.tokenizer, len(loaded.layers)
    out = torch.empty(len(concept.pairs), n, loaded.hidden_size)
    with recorded_outputs(loaded.layers, range(n)) as captured:
        for i, pair in enumerate(concept.pairs):
            text = render_reply(loaded, pair.context, getattr(pair, side))
            start = len(tok(render_reply(loaded, pair.context, ""), add_special_tokens=False)["input_ids"])
            ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"].to(loaded.device)
            loaded.model(input_ids=ids, use_cache=False, logits_to_keep=1)
            for layer in range(n):
                out[i, layer] = captured[layer][0, start:].float().mean(0).cpu()
    return out


def background_mean(loaded: LoadedModel, concepts: Sequence[Concept]) -> torch.Tensor:
    """The mean last-token activation over both sides of every pair of `concepts`: [layers, hidden]."""
    total, count = None, 0
    for concept in concepts:
        pos, neg, _, _ = pair_activations(loaded, concept)
        part = pos.sum(0) + neg.sum(0)
        total, count = (part if total is None else total + part), count + 2 * len(concept.pairs)
    if total is None:
        raise ValueError("mean-centring needs at least one background concept")
    return total / count


def derived(loaded: LoadedModel, concept: Concept, direction: str, background: Sequence[Concept] = (),
            train: tuple[tuple[int, ...], float, int] | None = None) -> ConceptVector:
    """The concept's vector by `direction`, with the stored method's norms (alpha's scale).
    `background`: the concepts whose pairs give mean-centring its dataset mean. `train`: for
    `optimized`, the layers, the strength relative to their mean residual norm and the steps;
    its other layers keep the mean difference."""
    cv = derive_concept(loaded, concept)
    if direction == "caa":
        return cv
    if direction == "optimized":
        if train is None:
            raise ValueError("an optimized direction needs the layers and strength it is trained at")
        layers, rel, steps = train
        start = time.perf_counter()
        return optimized_vector(loaded, concept, cv, layers, rel, steps, on_step=lambda k, loss: print(
            f"step {k + 1}/{steps} loss {loss:.3f} ({time.perf_counter() - start:.0f} s)", flush=True))
    if direction == "mean-centred":
        pos, _, _, _ = pair_activations(loaded, concept)
        diff = pos.mean(0) - background_mean(loaded, background)
    elif direction == "reply-mean":
        diff = reply_means(loaded, concept, "positive").mean(0) - reply_means(loaded, concept, "negative").mean(0)
    else:
        pos, neg, _, _ = pair_activations(loaded, concept)
        diffs = pos - neg  # [pairs, layers, hidden]
        diff = torch.stack([torch.linalg.svd(d - d.mean(0), full_matrices=False)[2][0] for d in diffs.unbind(1)])
        diff *= torch.sign((diff * diffs.mean(0)).sum(-1, keepdim=True))
    unit = diff / diff.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    return ConceptVector(**{**cv.__dict__, "directions": {i: unit[i].contiguous() for i in range(len(unit))},
                            "method": f"{direction}, screened only"})


def registered_model(parser: argparse.ArgumentParser, paths: Paths, name: str) -> tuple[ModelEntry, LoadedModel]:
    """The registered model `name` and its entry, loaded; the parser's error (no traceback) when it
    is not registered or does not load."""
    try:
        entry = load_registry(paths.registry).get(name)
    except SteeringError as exc:
        parser.error(str(exc))
    load, loaded = check_load(entry, paths.cache, None)
    if loaded is None:
        parser.error(f"{name} did not load: {load.detail}")
    return entry, loaded


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--concept", required=True)
    p.add_argument("--bands", required=True, help="comma-separated first-last layers, e.g. 6-12,3-9")
    p.add_argument("--rel", default="0.027,0.036,0.042", help="strengths relative to the band's residual norm")
    p.add_argument("--scale", choices=("norm", "uniform"), default="norm",
                   help="alpha in proportion to each layer's residual norm (default) or the same at every layer")
    p.add_argument("--seeds", type=int, default=6, help="sampling seeds per evaluation prompt")
    p.add_argument("--first-seed", type=int, default=0,
                   help="seeds run from this one: another first seed draws fresh replies, to confirm a point "
                        "chosen on validation's seeds (which start at 0)")
    p.add_argument("--mode", choices=("both", "steer"), default="both")
    p.add_argument("--release", type=int, metavar="K",
                   help="steer the prompt and only the first K generated tokens, then go on unsteered")
    p.add_argument("--direction", choices=DIRECTIONS, help="derive the vector here this way (default: the stored one)")
    p.add_argument("--pairs", type=Path, help="with --direction: this pairs file, not the concept's own")
    p.add_argument("--train-rel", type=float, default=0.036,
                   help="--direction optimized: the strength trained at, relative to the bands' residual norm")
    p.add_argument("--steps", type=int, default=30, help="--direction optimized: optimisation steps")
    p.add_argument("--out", type=Path, help="write the points here as JSON")
    a = p.parse_args(argv)
    if a.seeds < 1 or a.first_seed < 0:
        p.error("--seeds must be at least 1 and --first-seed at least 0")
    if a.release is not None and a.release < 1:
        p.error("--release must be at least 1 (leave it out to steer whole replies)")
    if a.train_rel <= 0 or a.steps < 1:
        p.error("--train-rel must be above 0 and --steps at least 1")
    if a.pairs and not a.direction:
        p.error("--pairs needs --direction: the stored vector has its own pairs")
    if a.concept not in BLIP_ALLOWLIST:
        p.error(f"{a.concept} is not a Blip concept: {', '.join(sorted(BLIP_ALLOWLIST))}")
    try:
        bands = [_band(b) for b in a.bands.split(",")]
        rel = [float(r) for r in a.rel.split(",")]
    except ValueError:
        p.error("--bands takes first-last layer pairs (6-12,3-9) and --rel numbers (0.027,0.036)")
    if not all(bands):
        p.error(f"--bands {a.bands}: each band's first layer must not come after its last")
    paths = paths_from_env()
    entry, loaded = registered_model(p, paths, a.model)
    if a.direction:
        try:
            concept = load_concept(a.pairs.parent, a.pairs.stem) if a.pairs else load_concept(paths.pairs, a.concept)
        except SteeringError as exc:
            p.error(str(exc))
        background = ([load_concept(paths.pairs, name) for name in concept_names(paths.pairs)]
                      if a.direction == "mean-centred" else [])
        train = (tuple(sorted({layer for band in bands for layer in band})), a.train_rel, a.steps)
        cv: ConceptVector | None = derived(loaded, concept, a.direction, background, train)
    else:
        cv = model_vectors(loaded, paths)[0].get(a.concept)
    if cv is None:
        p.error(f"no usable {a.concept} vector on {a.model}; run `steer derive`")
    outside = sorted({layer for band in bands for layer in band} - set(cv.directions))
    if outside:
        p.error(f"{a.concept}'s vector has no direction at layers {outside}: it has {min(cv.directions)}-{max(cv.directions)}")
    seeds = tuple(range(a.first_seed, a.first_seed + a.seeds))
    settings = SweepSettings(prompts=load_eval_prompts(paths.eval), seeds=seeds, allowlist_seeds=seeds,
                             blip=load_blip_setting(paths.eval), steer_tokens=a.release).scaled(entry.sweep_scale)
    scorer, guard = load_scorer(paths.eval), load_guard(paths.guard)
    base = baseline(loaded, settings, guard, blip=True)
    prompts = concept_prompts(settings, a.concept, instructed=a.mode == "both")
    start, points = time.perf_counter(), []
    for layers in bands:
        config = SteerConfig(layers, scale=a.scale)
        swept, _ = _sweep(loaded, cv, scorer, settings, base, guard, config, alpha_grid(config, cv, rel), seeds, prompts)
        for point in swept:
            points.append({"config": config.as_dict(), "name": config.name, "mode": a.mode, "release": a.release} | point)
            print(f"{config.name:16} {a.mode:5} release {a.release or '-'} alpha {point['alpha']:5} d {point['d']:+.2f} "
                  f"[{point['d_low']:+.2f}, {point['d_high']:+.2f}] n {point['n']}  ppl ratio {point['ppl_ratio']:.2f}  "
                  f"looping {point['degenerate']:.2f}  flagged {point['flags']:.2f}", flush=True)
    if a.out:
        write_text_atomic(a.out, json.dumps({
            "model": loaded.name, "fingerprint": loaded.fingerprint, "concept": a.concept,
            "direction": a.direction or "stored", "method": cv.method, "pairs": len(concept.pairs) if a.direction else cv.pair_count,
            "vector_sha256": cv.content_sha256, "seeds": a.seeds, "first_seed": a.first_seed, "prompts": len(settings.prompts),
            "command": "scripts/screen_bands.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "seconds": round(time.perf_counter() - start, 1), "points": points}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
