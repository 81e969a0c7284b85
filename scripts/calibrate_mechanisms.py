"""Do the skip gate and KL re-injection do anything for a child? Measured on the tagger's fresh
held-out child turns, each answered as Blip's Chat answers its tag: the policy's concept, in
the mode and at the alpha its validation record serves, under Blip's system prompt.

Per concept Chat steers (steer or both mode), on the turns whose tag maps to it:
- the skip gate: how often it skips at several thresholds, the d that steering buys on the
  turns it does not skip, and on the turns it skips whether the unsteered reply was already
  on-register (d of the skipped unsteered replies against steered replies to the same turns);
- KL under steering: KL(steered || unsteered) at every token of the steered replies, the
  running mean the KL monitor watches (its window), how often it falls under the threshold,
  and d in each half of the replies (does the steering fade?).

    python scripts/calibrate_mechanisms.py [--model M] [--seeds 2] [--max-new-tokens 48] [--concepts C,...]

writes `vectors/<model>/mechanisms.json`; with --concepts it measures only those and keeps the
other concepts' entries of a stored file measured alike (same model, turns, seeds and tokens).
It does not measure what a re-injection buys.
"""

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "services"))

from generator.job import GateConfig, KlConfig  # noqa: E402
from generator.server import GeneratorConfig, build_service  # noqa: E402
from generator.service import concept_config  # noqa: E402
from steering.atomic import write_text_atomic  # noqa: E402
from steering.errors import SteeringError  # noqa: E402
from steering.gate import decide  # noqa: E402
from steering.generate import GenerationSettings, generate  # noqa: E402
from steering.mechanisms import first_token_logits, percentiles, reply_kl, running_means  # noqa: E402
from steering.profiles import Profile  # noqa: E402
from steering.record import d_interval  # noqa: E402
from steering.scoring import load_scorer  # noqa: E402
from steering.settings import paths_from_env  # noqa: E402
from steering.validate import cohens_d  # noqa: E402
from steering.vocabulary import Mode, instructed  # noqa: E402

TURNS = ROOT / "services" / "tagger" / "data" / "heldout_fresh2.jsonl"
THRESHOLDS = (0.1, 0.25, 0.5)


def effect(treated: list[float], control: list[float]) -> dict | None:
    if min(len(treated), len(control)) < 2:
        return None
    d = cohens_d(treated, control)
    low, high = d_interval(d, len(treated), len(control))
    return {"d": round(d, 3), "d_low": round(low, 3), "d_high": round(high, 3), "n": len(treated), "n_control": len(control)}


def kept_entries(path: Path, result: dict) -> dict:
    """The concept entries of the stored file at `path` when it was measured as `result` is."""
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    alike = ("model", "fingerprint", "turns_file", "seeds", "max_new_tokens", "temperature", "gate_threshold", "kl_threshold", "kl_window")
    return old.get("concepts", {}) if all(old.get(k) == result[k] for k in alike) else {}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--concepts", default="", help="comma-separated policy concepts to measure again (default: all)")
    args = p.parse_args(argv)
    start = time.perf_counter()
    service = build_service(GeneratorConfig(models=(args.model,) if args.model else (), profile=Profile.BLIP))
    try:
        slot = service.slot(args.model)
        loaded = slot.loaded
        scorer = load_scorer(paths_from_env().eval)
        turns = [json.loads(line) for line in TURNS.read_text(encoding="utf-8").splitlines() if line.strip()]
        gate_default, kl_default = GateConfig(), KlConfig()
        concepts: dict[str, dict] = {}
        served = sorted({c for c in service.policy.concepts.values() if c})
        chosen = [c.strip() for c in args.concepts.split(",") if c.strip()] or served
        if unknown := sorted(set(chosen) - set(served)):
            p.error(f"--concepts: {', '.join(unknown)} is not a concept of the policy; choose from {', '.join(served)}")
        for concept in chosen:
            try:
                serving = service.chat_serving(slot, concept)
            except SteeringError as exc:
                concepts[concept] = {"served": False, "why": str(exc)}
                continue
            tags = sorted(t for t, c in service.policy.concepts.items() if c == concept)
            texts = [t["text"] for t in turns if t["label"] in tags]
            entry: dict = {"served": True, "mode": str(serving.mode), "alpha": serving.alpha, "tags": tags, "turns": len(texts)}
            concepts[concept] = entry
            if serving.mode is Mode.PROMPT or serving.alpha is None:
                entry["why"] = "served by its instruction alone: nothing for the gate or the KL monitor to act on"
                continue
            system = instructed(service.policy.system_prompt, serving.instruction)
            prompts = [[{"role": "system", "content": system}, {"role": "user", "content": t}] for t in texts]
            words = slot.concept_words(concept)
            logits = first_token_logits(loaded, prompts)
            gates = {thr: [decide(row, words, loaded.tokenizer, thr) for row in logits] for thr in THRESHOLDS}
            entry["gate_skip_rate"] = {str(thr): round(statistics.fmean(g.skip for g in gs), 4) for thr, gs in gates.items()}
            entry["gate_words"] = sorted({g.token.strip() for gs in gates.values() for g in gs if g.skip})
            skipped = [g.skip for g in gates[gate_default.threshold]]

            state = slot.steerability.concepts[concept]
            row = concept_config(slot, state).row(slot.vectors[concept], serving.alpha)
            plain, steered = [], []
            for seed in range(args.seeds):
                settings = GenerationSettings(args.max_new_tokens, 0.8, 1.0, seed)
                plain += generate(loaded, prompts, None, settings)
                steered += generate(loaded, prompts, [row] * len(prompts), settings)
            skip_of = skipped * args.seeds
            s_plain = [float(x) for x in scorer.scores([g.text for g in plain], concept)]
            s_steer = [float(x) for x in scorer.scores([g.text for g in steered], concept)]
            entry["d_all"] = effect(s_steer, s_plain)
            entry["d_where_steered"] = effect([s for s, k in zip(s_steer, skip_of) if not k], [s for s, k in zip(s_plain, skip_of) if not k])
            # Negative: the skipped turns' unsteered replies are less on-register than steering makes them.
            entry["d_skipped_unsteered_vs_steered"] = effect([s for s, k in zip(s_plain, skip_of) if k], [s for s, k in zip(s_steer, skip_of) if k])

            kls = reply_kl(loaded, steered, row)
            window = kl_default.window
            means = [m for k in kls for m in running_means(k, window)]
            entry["kl_per_token"] = percentiles([x for k in kls for x in k])
            entry["kl_running_mean"] = percentiles(means) | {"window": window, "replies": len(kls), "windows": len(means)}
            entry["kl_running_mean_below_threshold"] = {
                str(thr): round(statistics.fmean(m < thr for m in means), 4) if means else None for thr in (0.01, 0.02, kl_default.threshold)}
            entry["replies_with_a_fade"] = round(statistics.fmean(any(m < kl_default.threshold for m in running_means(k, window)) for k in kls), 4)
            halves: dict[str, dict | float | None] = {}
            for name, part in (("first", slice(0, args.max_new_tokens // 2)), ("second", slice(args.max_new_tokens // 2, None))):
                texts_s = [loaded.tokenizer.decode(list(g.token_ids[part]), skip_special_tokens=True) for g in steered]
                texts_p = [loaded.tokenizer.decode(list(g.token_ids[part]), skip_special_tokens=True) for g in plain]
                keep = [i for i in range(len(texts_s)) if texts_s[i].strip() and texts_p[i].strip()]
                ss = [float(x) for x in scorer.scores([texts_s[i] for i in keep], concept)]
                sp = [float(x) for x in scorer.scores([texts_p[i] for i in keep], concept)]
                halves[name] = effect(ss, sp)
                means_half = [statistics.fmean(k[part]) for k in kls if k[part]]
                halves[name + "_mean_kl"] = round(statistics.fmean(means_half), 4) if means_half else None
            entry["halves"] = halves
            print(f"{concept}: {json.dumps(entry)}", flush=True)
        result = {
            "model": loaded.name, "fingerprint": loaded.fingerprint, "turns_file": str(TURNS.relative_to(ROOT)),
            "seeds": args.seeds, "max_new_tokens": args.max_new_tokens, "temperature": 0.8,
            "gate_threshold": gate_default.threshold, "kl_threshold": kl_default.threshold, "kl_window": kl_default.window,
            "duration_s": round(time.perf_counter() - start, 1), "concepts": concepts,
        }
        path = paths_from_env().model_vectors(loaded.name) / "mechanisms.json"
        if len(chosen) < len(served):  # duration_s is then the time of the concepts measured now
            result["concepts"] = kept_entries(path, result) | concepts
            result["measured_now"] = chosen
        write_text_atomic(path, json.dumps(result, indent=2) + "\n")
        print(f"wrote {path} in {result['duration_s']:.0f} s")
    finally:
        service.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
