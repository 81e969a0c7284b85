"""One Blip concept steered in bands the configuration search does not try, measured as validation measures it.

    HF_HUB_OFFLINE=1 .venv/bin/python scripts/screen_bands.py --concept playfulness \
        --bands 6-12,3-9 --rel 0.027,0.036,0.042 --seeds 6 --out vectors/candidates/<model>.<concept>-bands.json

Replies are sampled under Blip's system prompt, with the concept's instruction (`--mode both`, what Chat
serves) or without it (`--mode steer`), at each strength relative to the band's mean residual norm with
alpha in proportion to each layer's norm, and set against unsteered replies under the same system prompt:
d with its interval, perplexity ratio, looping and flagged, by validation's own `_sweep`. A look, not a
record: nothing is served from it, and only `steer validate` decides what Blip serves.
"""

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "services"))

from steering.atomic import write_text_atomic  # noqa: E402
from steering.config import SteerConfig  # noqa: E402
from steering.errors import SteeringError  # noqa: E402
from steering.guard import load_guard  # noqa: E402
from steering.profiles import BLIP_ALLOWLIST  # noqa: E402
from steering.registry import load_registry  # noqa: E402
from steering.scoring import load_scorer  # noqa: E402
from steering.settings import paths_from_env  # noqa: E402
from steering.validate import (SweepSettings, _sweep, alpha_grid, baseline, check_load, concept_prompts,  # noqa: E402
                               load_blip_setting, load_eval_prompts)
from steering.validate_model import model_vectors  # noqa: E402


def _band(text: str) -> tuple[int, ...]:
    lo, _, hi = text.partition("-")
    return tuple(range(int(lo), int(hi or lo) + 1))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--concept", required=True)
    p.add_argument("--bands", required=True, help="comma-separated first-last layers, e.g. 6-12,3-9")
    p.add_argument("--rel", default="0.027,0.036,0.042", help="strengths relative to the band's residual norm")
    p.add_argument("--seeds", type=int, default=6, help="sampling seeds per evaluation prompt")
    p.add_argument("--mode", choices=("both", "steer"), default="both")
    p.add_argument("--out", type=Path, help="write the points here as JSON")
    a = p.parse_args(argv)
    if a.seeds < 1:
        p.error("--seeds must be at least 1")
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
    try:
        entry = load_registry(paths.registry).get(a.model)
    except SteeringError as exc:
        p.error(str(exc))
    load, loaded = check_load(entry, paths.cache, None)
    if loaded is None:
        p.error(f"{a.model} did not load: {load.detail}")
    cv = model_vectors(loaded, paths)[0].get(a.concept)
    if cv is None:
        p.error(f"no usable {a.concept} vector on {a.model}; run `steer derive`")
    outside = sorted({layer for band in bands for layer in band} - set(cv.directions))
    if outside:
        p.error(f"{a.concept}'s vector has no direction at layers {outside}: it has {min(cv.directions)}-{max(cv.directions)}")
    seeds = tuple(range(a.seeds))
    settings = SweepSettings(prompts=load_eval_prompts(paths.eval), seeds=seeds, allowlist_seeds=seeds,
                             blip=load_blip_setting(paths.eval)).scaled(entry.sweep_scale)
    scorer, guard = load_scorer(paths.eval), load_guard(paths.guard)
    base = baseline(loaded, settings, guard, blip=True)
    prompts = concept_prompts(settings, a.concept, instructed=a.mode == "both")
    start, points = time.perf_counter(), []
    for layers in bands:
        config = SteerConfig(layers, scale="norm")
        swept, _ = _sweep(loaded, cv, scorer, settings, base, guard, config, alpha_grid(config, cv, rel), seeds, prompts)
        for point in swept:
            points.append({"config": config.as_dict(), "name": config.name, "mode": a.mode} | point)
            print(f"{config.name:16} {a.mode:5} alpha {point['alpha']:5} d {point['d']:+.2f} "
                  f"[{point['d_low']:+.2f}, {point['d_high']:+.2f}] n {point['n']}  ppl ratio {point['ppl_ratio']:.2f}  "
                  f"looping {point['degenerate']:.2f}  flagged {point['flags']:.2f}", flush=True)
    if a.out:
        write_text_atomic(a.out, json.dumps({
            "model": loaded.name, "fingerprint": loaded.fingerprint, "concept": a.concept,
            "vector_sha256": cv.content_sha256, "seeds": a.seeds, "prompts": len(settings.prompts),
            "command": "scripts/screen_bands.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "seconds": round(time.perf_counter() - start, 1), "points": points}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
