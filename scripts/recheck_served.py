"""Blip's served points redrawn on seeds the record never used: does each one's d hold, and how often does the guard flag?

    HF_HUB_OFFLINE=1 .venv/bin/python scripts/recheck_served.py --first-seed 6 --seeds 30 \
        --out vectors/candidates/smollm2-135m-instruct.served-recheck.json

The record picks each concept's served point as the best of a grid on 96 replies (validation's seeds
0-5), and calls it child-safe when those 96 raise no more flags than 96 unsteered ones. Both are
choices made on the replies they are judged by. This redraws every concept Blip serves, at its
recorded mode, configuration and alpha, on other seeds, beside the unsteered replies under Blip's
system prompt and the instruction alone (prompting, unsteered), with the same scorer, perplexity,
loop and guard rules as validation. Each flag count comes with its 95% Wilson interval and the
flagged replies themselves, so a rate of about one in a hundred can be told from none, and read.

`--candidate CONCEPT:MODE:ALPHA:FILE` adds a vector that is not served (a file `steer derive` wrote,
for this model) at the concept's recorded configuration. All arms are sampled in shared batches, so
a reply also depends on what else is in its batch; the seeds are fresh either way. A look, not a
record: nothing is served from it.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "services"))

from steering.atomic import write_text_atomic  # noqa: E402
from steering.binomial import wilson  # noqa: E402
from steering.config import SteerConfig  # noqa: E402
from steering.errors import SteeringError  # noqa: E402
from steering.guard import load_guard  # noqa: E402
from steering.profiles import BLIP_ALLOWLIST  # noqa: E402
from steering.record import read_record  # noqa: E402
from steering.scoring import load_scorer  # noqa: E402
from steering.settings import paths_from_env  # noqa: E402
from steering.store import read_vector  # noqa: E402
from steering.validate import (Baseline, SweepSettings, _point, _sample, concept_prompts, flag_rate,  # noqa: E402
                               load_blip_setting, load_eval_prompts)
from steering.validate_model import model_vectors  # noqa: E402
from steering.vector import ConceptVector  # noqa: E402

from screen_bands import registered_model  # noqa: E402  (scripts/ is on the path as the script's own folder)


def _flag_figures(flagged: list[bool], texts: list[str], themes: dict[str, int]) -> dict[str, Any]:
    low, high = wilson(sum(flagged), len(flagged))
    return {"flagged": sum(flagged), "flag_low": round(low, 4), "flag_high": round(high, 4), "flag_themes": themes,
            "flagged_replies": [t for t, f in zip(texts, flagged, strict=True) if f]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--seeds", type=int, default=30, help="sampling seeds per evaluation prompt")
    p.add_argument("--first-seed", type=int, default=6, help="the first seed (validation's are 0-5)")
    p.add_argument("--concepts", default=",".join(sorted(BLIP_ALLOWLIST)), help="comma-separated Blip concepts (default: all)")
    p.add_argument("--candidate", action="append", default=[], metavar="CONCEPT:MODE:ALPHA:FILE",
                   help="a vector file that is not served, at this mode and alpha, at the concept's recorded configuration")
    p.add_argument("--out", type=Path, help="write the arms here as JSON")
    a = p.parse_args(argv)
    if a.seeds < 1 or a.first_seed < 0:
        p.error("--seeds must be at least 1 and --first-seed at least 0")
    concepts = sorted(set(a.concepts.split(",")))
    unknown = [c for c in concepts if c not in BLIP_ALLOWLIST]
    if unknown:
        p.error(f"--concepts {','.join(unknown)}: not Blip concepts: {', '.join(sorted(BLIP_ALLOWLIST))}")
    paths = paths_from_env()
    try:
        record = read_record(paths.model_vectors(a.model), a.model)
    except SteeringError as exc:
        p.error(str(exc))
    candidates = []
    for text in a.candidate:
        concept, mode, alpha, file = (text.split(":", 3) + ["", "", ""])[:4]
        try:
            candidates.append((concept, mode, float(alpha), Path(file)))
        except ValueError:
            p.error(f"--candidate {text}: ALPHA must be a number (CONCEPT:MODE:ALPHA:FILE)")
        if concept not in BLIP_ALLOWLIST:
            p.error(f"--candidate {text}: {concept!r} is not a Blip concept: {', '.join(sorted(BLIP_ALLOWLIST))}")
        if mode not in ("steer", "both"):
            p.error(f"--candidate {text}: MODE must be steer or both (the instruction alone is measured anyway)")
        if not Path(file).is_file():
            p.error(f"--candidate {text}: no such vector file {file!r}")
    entry, loaded = registered_model(p, paths, a.model)
    vectors = model_vectors(loaded, paths)[0]
    seeds = tuple(range(a.first_seed, a.first_seed + a.seeds))
    settings = SweepSettings(prompts=load_eval_prompts(paths.eval), seeds=seeds, allowlist_seeds=seeds,
                             blip=load_blip_setting(paths.eval)).scaled(entry.sweep_scale)
    if settings.blip is None:
        p.error(f"{paths.eval} holds no Blip system prompt to sample under")
    scorer, guard = load_scorer(paths.eval), load_guard(paths.guard)

    # (label, concept, vector, mode, alpha, config): the concepts Blip serves, their instruction alone, the candidates.
    arms: list[tuple[str, str, ConceptVector, str, float, SteerConfig]] = []
    for concept in concepts:
        recorded, cv = record["concepts"].get(concept, {}), vectors.get(concept)
        if cv is None or "config" not in recorded:
            print(f"{concept}: no usable vector or recorded configuration; left out", flush=True)
            continue
        config = SteerConfig.from_dict(recorded["config"])
        arms.append(("prompt", concept, cv, "prompt", 0.0, config))
        served = recorded.get("blip")
        if served and served.get("mode") in ("steer", "both"):
            arms.append(("served", concept, cv, served["mode"], served["alpha"], config))
    for concept, mode, alpha, file in candidates:
        cv = read_vector(file)
        if cv.concept != concept or cv.fingerprint != loaded.fingerprint:
            p.error(f"--candidate {file}: holds {cv.concept} for another model or fingerprint, not {concept} on {a.model}")
        config = SteerConfig.from_dict(record["concepts"][concept]["config"])
        arms.append((f"candidate {file.name}", concept, cv, mode, alpha, config))

    start = time.perf_counter()
    unsteered = [settings.blip.messages(q) for q in settings.prompts]  # Blip's system prompt, no instruction
    prompts = list(unsteered) + [q for _, c, _, mode, _, _ in arms for q in concept_prompts(settings, c, instructed=mode != "steer")]
    rows = [None] * len(unsteered) + [config.row(cv, alpha) if alpha else None
                                      for _, _, cv, _, alpha, config in arms for _ in settings.prompts]
    by_seed = _sample(loaded, settings, prompts, rows, seeds)
    n = len(settings.prompts)

    def replies_of(k: int) -> list:  # seed-major, as validation orders them
        return [g for seed_out in by_seed for g in seed_out[k * n : (k + 1) * n]]

    base_replies = replies_of(0)
    base_flagged, base_themes = flag_rate(guard, base_replies)
    base = Baseline.of(loaded, base_replies, base_flagged)
    out: list[dict[str, Any]] = [{"arm": "unsteered", "n": len(base_replies),
                                  "degenerate": round(statistics.fmean(base.degenerate), 4),
                                  **_flag_figures(base_flagged, [g.text for g in base_replies], base_themes)}]
    print(f"unsteered: {sum(base_flagged)} of {len(base_flagged)} flagged", flush=True)
    for k, (label, concept, cv, mode, alpha, config) in enumerate(arms, start=1):
        replies = replies_of(k)
        flagged, themes = flag_rate(guard, replies)
        point = _point(loaded, cv, scorer, base, guard, alpha, 0.0, replies, flags=(flagged, themes))
        recorded = record["concepts"][concept].get("blip") if label == "served" else None
        out.append({"arm": label, "concept": concept, "mode": mode, "alpha": alpha, "config": config.as_dict(),
                    "recorded_d": recorded and recorded["d"],
                    **{key: point[key] for key in ("d", "d_low", "d_high", "n", "ppl_ratio", "degenerate")},
                    **_flag_figures(flagged, [g.text for g in replies], themes)})
        print(f"{concept:12} {label:10} {mode:6} alpha {alpha:4} d {point['d']:+.2f} [{point['d_low']:+.2f}, {point['d_high']:+.2f}] "
              f"n {point['n']} (recorded {recorded['d'] if recorded else '-'})  ppl ratio {point['ppl_ratio']:.2f}  "
              f"looping {point['degenerate']:.3f}  flagged {sum(flagged)} of {len(flagged)} {themes or ''}", flush=True)
    if a.out:
        write_text_atomic(a.out, json.dumps({
            "model": loaded.name, "fingerprint": loaded.fingerprint, "seeds": list(seeds), "prompts": n,
            "command": "scripts/recheck_served.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "seconds": round(time.perf_counter() - start, 1), "arms": out}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
