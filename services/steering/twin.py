"""Compare a quantised twin's own vectors with the ones forced onto it from its full-precision model.

Per concept: the cosine between the twin's direction and the reference's at every stored
layer, and the effect size d the twin reaches over the evaluation prompts with its own
vector and with the reference's vector forced onto it, at the same swept alphas. This is
the measured reason vectors must come from the model used at inference.
"""

import datetime as dt
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from .atomic import write_text_atomic
from .errors import NotFoundError
from .guard import ThemeGuard, load_guard
from .loading import LoadedModel
from .scoring import ConceptScorer, load_scorer
from .settings import Paths
from .store import load_store, load_vector, stored_concepts, vector_path
from .validate import SweepSettings, baseline, load_eval_prompts, sweep_concept
from .vector import ConceptVector


def layer_cosines(own: ConceptVector, reference: ConceptVector) -> dict[int, float]:
    layers = [layer for layer in own.layers if layer in reference.directions]
    return {
        layer: round(float(torch.nn.functional.cosine_similarity(own.directions[layer], reference.directions[layer], dim=0)), 4)
        for layer in layers
    }


def compare_twin(
    twin: LoadedModel,
    reference_name: str,
    own: dict[str, ConceptVector],
    forced: dict[str, ConceptVector],
    scorer: ConceptScorer,
    guard: ThemeGuard,
    settings: SweepSettings,
    effect_concepts: Sequence[str],
    on_concept: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """`own` and `forced` are keyed by concept; `forced` were loaded with force (and say so)."""
    cosines = {c: layer_cosines(own[c], forced[c]) for c in sorted(own) if c in forced}
    steering = list(twin.steering_layers)
    mean_by_layer = {
        layer: round(sum(c[layer] for c in cosines.values()) / len(cosines), 4)
        for layer in sorted({layer for c in cosines.values() for layer in c})
    }
    effects: dict[str, Any] = {}
    if effect_concepts:
        base = baseline(twin, settings, guard)
        for concept in effect_concepts:
            if on_concept:
                on_concept(concept)
            mine = sweep_concept(twin, own[concept], scorer, settings, base, guard)
            theirs = sweep_concept(twin, forced[concept], scorer, settings, base, guard)
            effects[concept] = {
                "own": [{"alpha": p["alpha"], "d": p["d"], "ppl_ratio": p["ppl_ratio"]} for p in mine["sweep"]],
                "forced": [{"alpha": p["alpha"], "d": p["d"], "ppl_ratio": p["ppl_ratio"]} for p in theirs["sweep"]],
            }
    return {
        "model": twin.name,
        "fingerprint": twin.fingerprint,
        "reference": reference_name,
        "forced": {c: forced[c].metadata.get("forced_onto") == twin.fingerprint for c in forced},
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "steering_layers": steering,
        "cosine_by_concept": {c: {str(k): v for k, v in layers.items()} for c, layers in cosines.items()},
        "cosine_mean_by_layer": {str(k): v for k, v in mean_by_layer.items()},
        "cosine_min_steering": min(cosines[c][layer] for c in cosines for layer in steering if layer in cosines[c]),
        "effect": effects,
        "settings": {"prompts": len(settings.prompts), "seeds": list(settings.seeds),
                     "alpha_grid_rel": list(settings.alpha_grid_rel), "max_new_tokens": settings.max_new_tokens},
    }


def twin_markdown(result: dict[str, Any]) -> str:
    lines = [
        f"# {result['model']}: its own vectors against {result['reference']}'s, forced",
        "",
        f"Written by `steer compare-twin` on {result['created']}. Every vector from {result['reference']} was "
        f"loaded with `--force` onto fingerprint {result['fingerprint'][:16]} (recorded in each vector's metadata as `forced_onto`).",
        "",
        "## Cosine between the twin's direction and the reference's, mean over concepts",
        "",
        "| layer | " + " | ".join(result["cosine_mean_by_layer"]) + " |",
        "|---|" + "---|" * len(result["cosine_mean_by_layer"]),
        "| cosine | " + " | ".join(f"{v:.3f}" for v in result["cosine_mean_by_layer"].values()) + " |",
        "",
        f"Lowest cosine at a steering layer, any concept: {result['cosine_min_steering']:.3f}.",
        "",
    ]
    if result["effect"]:
        lines += [
            "## Effect size d on the twin, own vector against the forced one",
            "",
            "| concept | alpha | d own | d forced | ppl ratio own | ppl ratio forced |",
            "|---|---|---|---|---|---|",
        ]
        for concept, e in result["effect"].items():
            for own, forced in zip(e["own"], e["forced"]):
                lines.append(f"| {concept} | {own['alpha']:g} / {forced['alpha']:g} | {own['d']:+.2f} | {forced['d']:+.2f} "
                             f"| {own['ppl_ratio']:.2f} | {forced['ppl_ratio']:.2f} |")
        lines.append("")
    return "\n".join(lines)


def run_comparison(twin: LoadedModel, reference: str, paths: Paths, effect_concepts: Sequence[str], seeds: int,
                   on_concept: Callable[[str], None] | None = None,
                   on_forced: Callable[[ConceptVector], None] | None = None) -> tuple[dict[str, Any], list[Path], dict[str, str]]:
    """`steer compare-twin`: every concept stored for both models, the reference's vectors
    forced onto the twin (each records it, and `on_forced` hears of each before any is used),
    compared and written to twin.json and twin.md. Returns the result, the files written, and
    the twin's refused vectors with their reasons."""
    ref_dir, own_dir = paths.model_vectors(reference), paths.model_vectors(twin.name)
    names = [c for c in stored_concepts(own_dir) if c in set(stored_concepts(ref_dir))]
    if not names:
        raise NotFoundError(f"no concept has vectors for both {twin.name} and {reference}; run `steer derive` for each")
    fp, hidden, layers = twin.fingerprint, twin.hidden_size, twin.steering_layers
    own, refused = load_store(own_dir, names, fingerprint=fp, hidden_size=hidden, layers=layers)
    # The force is the point here; each vector records it in its metadata.
    forced = {name: load_vector(vector_path(ref_dir, name), fingerprint=fp, hidden_size=hidden, layers=layers, force=True)
              for name in names}
    if on_forced:
        for cv in forced.values():
            on_forced(cv)
    missing = [c for c in effect_concepts if c not in own]
    if missing:
        raise NotFoundError(f"no usable twin vector for {', '.join(missing)}")
    # Both vectors are swept with the same (default) configuration: the comparison is of the vectors.
    sweep_seeds = tuple(range(seeds))
    settings = SweepSettings(prompts=load_eval_prompts(paths.eval), seeds=sweep_seeds, allowlist_seeds=sweep_seeds,
                             search=False)
    start = time.perf_counter()
    result = compare_twin(twin, reference, own, forced, load_scorer(paths.eval), load_guard(paths.guard), settings,
                          effect_concepts, on_concept)
    result["duration_s"] = round(time.perf_counter() - start, 1)
    written = [own_dir / "twin.json", own_dir / "twin.md"]
    write_text_atomic(written[0], json.dumps(result, indent=2) + "\n")
    write_text_atomic(written[1], twin_markdown(result))
    return result, written, refused
