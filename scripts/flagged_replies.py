"""The replies the guard flagged at a Blip concept's swept points, drawn as `steer validate` draws them.

    HF_HUB_OFFLINE=1 .venv/bin/python scripts/flagged_replies.py --concept enthusiasm --mode both

The record keeps only how many replies each theme flagged; this prints which. The sweep is sampled
exactly as validation samples it (the same prompts, seeds, batches and the record's configuration), so on
the fp32 model the replies are the record's own, bit for bit, and each point's d is printed to show
it; on the int8 twin a reply can depend on its batch. A look: nothing is written.
"""

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "services"))

from steering.config import SteerConfig  # noqa: E402
from steering.errors import SteeringError  # noqa: E402
from steering.guard import load_guard  # noqa: E402
from steering.profiles import BLIP_ALLOWLIST  # noqa: E402
from steering.record import read_record  # noqa: E402
from steering.scoring import load_scorer  # noqa: E402
from steering.settings import paths_from_env  # noqa: E402
from steering.validate import (SweepSettings, _point, _sample, alpha_grid, baseline, concept_prompts,  # noqa: E402
                               concept_settings, load_blip_setting, load_eval_prompts, tally)
from steering.validate_model import model_vectors  # noqa: E402

from screen_bands import registered_model  # noqa: E402  (scripts/ is on the path as the script's own folder)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--concept", required=True)
    p.add_argument("--mode", choices=("both", "steer"), default="both")
    a = p.parse_args(argv)
    if a.concept not in BLIP_ALLOWLIST:
        p.error(f"{a.concept} is not a Blip concept: {', '.join(sorted(BLIP_ALLOWLIST))}")
    paths = paths_from_env()
    entry, loaded = registered_model(p, paths, a.model)
    cv = model_vectors(loaded, paths)[0].get(a.concept)
    if cv is None:
        p.error(f"no usable {a.concept} vector on {a.model}; run `steer derive`")
    try:  # the configuration the record swept the concept with
        config = SteerConfig.from_dict(read_record(paths.model_vectors(a.model), a.model)["concepts"][a.concept]["config"])
    except (SteeringError, KeyError) as exc:
        p.error(f"{a.model}'s record has no swept {a.concept}: {exc}")
    settings = concept_settings(SweepSettings(prompts=load_eval_prompts(paths.eval), blip=load_blip_setting(paths.eval))
                                .scaled(entry.sweep_scale), cv)
    scorer, guard = load_scorer(paths.eval), load_guard(paths.guard)
    base = baseline(loaded, settings, guard, blip=True)
    print(f"unsteered under Blip's system prompt: {sum(base.flagged)} of {len(base.flagged)} flagged")
    prompts = concept_prompts(settings, a.concept, instructed=a.mode == "both")
    grid = alpha_grid(config, cv, settings.both_grid_rel if a.mode == "both" else settings.alpha_grid_rel)
    rows = [config.row(cv, alpha) for alpha, _ in grid for _ in prompts]
    by_seed = _sample(loaded, settings, prompts * len(grid), rows, settings.allowlist_seeds)
    n = len(prompts)
    for k, (alpha, rel) in enumerate(grid):
        replies = [g for seed_out in by_seed for g in seed_out[k * n : (k + 1) * n]]  # seed-major, as validation
        verdicts = guard.check_many([g.text for g in replies])
        point = _point(loaded, cv, scorer, base, guard, alpha, rel, replies, flags=tally(verdicts))
        print(f"{a.mode} at {alpha}: d {point['d']:+.4f}, {round(point['flags'] * point['n'])} of {point['n']} flagged")
        for reply, verdict in zip(replies, verdicts, strict=True):
            if verdict.flagged:
                print(f"  {', '.join(verdict.themes)}: {reply.text!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
