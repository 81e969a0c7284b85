"""`python -m bench [--smoke]`: measure everything side by side and write
bench/results.json and bench/results.md (or under --out)."""

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import functools
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from generator.server import GeneratorConfig, build_service
from generator.job import Steering
from steering.atomic import write_text_atomic
from steering.gate import concept_token_ids
from steering.guard import load_guard
from steering.loading import LoadedModel, load_model
from steering.pairs import load_concept
from steering.profiles import Profile
from steering.errors import NotFoundError
from steering.registry import DTYPES, ModelEntry, load_registry
from steering.settings import paths_from_env
from steering.store import read_vector
from steering.threads import in_passing_thread, single_threaded
from steering.validate import residual_scale
from steering.vector import ConceptVector

from . import service_load, single, system
from .report import markdown, targets

PROMPTS = [
    "Tell me about your favourite animal.",
    "What should we build with blocks today?",
    "Why do leaves change colour?",
    "I finished my drawing of a rocket!",
]
# A child's conversations with Blip, one Chat call each, every turn new: each tagged, mapped by
# the policy, some steered, some not (nervous, delighted, sad, curious). The first warms up.
CONVERSATIONS = [
    ["Hi Blip!", "I drew a dragon today."],
    ["I'm scared about the spelling test tomorrow.", "I got a new puppy and he licked my face!",
     "My goldfish died this morning.", "How far away is the moon?"],
    ["I'm nervous about my first swimming lesson.", "We're going to the zoo on Saturday!",
     "My best friend moved to another town.", "Why do cats purr?"],
    ["I'm worried the thunder will be loud tonight.", "I lost my first tooth today!",
     "Nobody wanted to play with me at recess.", "How do bees make honey?"],
]


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench", description=__doc__)
    p.add_argument("--smoke", action="store_true", help="tiny sizes: checks the bench runs, measures nothing")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent, help="folder for the results")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--concept", default="happy", help="the single-stream concept")
    p.add_argument("--alpha", type=float, default=6.0)
    p.add_argument("--one-layer", type=int, default=15, help="the layer of the one-layer case")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N: in process and for the services")
    p.add_argument("--dtype", choices=DTYPES, help="override the registry's dtype (its vectors must match)")
    p.add_argument("--faster", default="smollm2-135m-instruct-int8",
                   help="a faster registered model to measure beside the first on one stream ('' for none)")
    p.add_argument("--others", default="qwen2.5-coder-0.5b-instruct",
                   help="comma-separated larger registered models measured on one stream after the runs above, "
                        "unsteered and steered at the same alpha relative to their residual norm; one that is "
                        "not installed is reported, not measured ('' for none)")
    p.add_argument("--turn-pause-s", type=float, default=3.0,
                   help="Blip's Chat: seconds between a reply's end and the child's next turn (hearing the reply "
                        "and answering; speaking a 48-token reply alone takes longer)")
    return p.parse_args()


def _model_args(a: argparse.Namespace) -> list[str]:
    """--device/--dtype for the processes the bench starts, so they run where it does."""
    return ["--device", a.device] + (["--dtype", a.dtype] if a.dtype else [])


def _steering(loaded: LoadedModel, cv: ConceptVector, alpha: float) -> Steering:
    """What the service would send the engine for this vector: the model's band, the gate's words."""
    words = concept_token_ids(loaded, cv, load_concept(paths_from_env().pairs, cv.concept).words)
    return Steering(cv.concept, {layer: cv.directions[layer] for layer in loaded.steering_layers}, alpha, alpha * 2,
                    words)


def _derive_seconds(model: str, concepts: list[str] | None, model_args: list[str]) -> dict:
    """Time `steer derive` for the concepts into a scratch copy of the store."""
    paths = paths_from_env()
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copytree(paths.pairs, Path(tmp) / "pairs")
        cmd = [service_load.service_python(), "-c", "import steercli; raise SystemExit(steercli.main())",
               "derive", "--model", model, *model_args]
        if concepts:
            cmd += ["--concepts", ",".join(concepts)]
        start = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "STEER_VECTORS_DIR": tmp})
        seconds = time.perf_counter() - start
        n = len(list((Path(tmp) / model).glob("*.safetensors")))
    return {"concepts": n, "seconds": round(seconds, 1)}


def _other_model(entry: ModelEntry, main: LoadedModel, a: argparse.Namespace, prompts: list[str], tokens: int,
                 runs: int, threads: int) -> dict:
    """One larger model on one stream, unsteered and steered with its own vector, in its own
    interleaved runs (it is several times slower, so it would stretch the runs above)."""
    try:
        loaded = in_passing_thread(functools.partial(load_model, device=a.device, dtype=a.dtype), entry,
                                   paths_from_env().cache, threads=threads)
    except NotFoundError as exc:
        return {"missing": str(exc)}
    alpha = round(a.alpha / residual_scale(main) * residual_scale(loaded), 2)
    own = paths_from_env().vectors / loaded.name / f"{a.concept}.safetensors"
    cases = single.faster_cases(loaded, read_vector(own) if own.exists() else None, alpha, tokens, threads)
    measured = single.measure(cases, single.prompt_ids(loaded, prompts), runs, threads)
    return {"alpha": alpha, "weight_bytes": system.weight_bytes(loaded.model),
            "cases": {name: round(statistics.median(m["runs_tokens_per_s"]), 2) for name, m in measured.items()}}


def main() -> int:
    a = _parse()
    smoke = a.smoke
    # This thread stays single-threaded, so the thread being measured holds the one OpenMP team
    # (steering/threads.py); loading and every measure get `threads`.
    threads = torch.get_num_threads()
    single_threaded()
    tokens, runs = (4, 1) if smoke else (40, 3)
    prompts = PROMPTS[:1] if smoke else PROMPTS[:3]
    levels = (1, 2) if smoke else (1, 2, 4, 8, 16)
    paths = paths_from_env()
    registry = load_registry(paths.registry)
    loaded = in_passing_thread(functools.partial(load_model, device=a.device, dtype=a.dtype), registry.get(a.model),
                               paths.cache, threads=threads)
    cv = read_vector(paths.vectors / loaded.name / f"{a.concept}.safetensors")
    results: dict = {"machine": system.machine(threads), "model": loaded.name, "device": str(loaded.device),
                     "dtype": str(loaded.model.dtype).removeprefix("torch."), "started": time.strftime("%Y-%m-%d %H:%M"),
                     "smoke": smoke, "settings": {"tokens": tokens, "runs": runs, "prompts": prompts,
                                                  "concept": a.concept, "alpha": a.alpha, "one_layer": a.one_layer,
                                                  "band": list(loaded.steering_layers)}}
    def log(msg: str) -> None:
        print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)

    log("single stream: ours and the peers")
    ids = single.prompt_ids(loaded, prompts)
    peers, missing = single.peer_cases(loaded, cv, a.alpha, tokens)
    cases = single.our_cases(loaded, cv, a.alpha, a.one_layer, tokens, paths.pairs, threads) + peers
    faster = None
    if a.faster:
        faster = in_passing_thread(functools.partial(load_model, device=a.device, dtype=a.dtype),
                                   registry.get(a.faster), paths.cache, threads=threads)
        own = paths.vectors / faster.name / f"{a.concept}.safetensors"
        cases += single.faster_cases(faster, read_vector(own) if own.exists() else None, a.alpha, tokens, threads)
    measured = single.measure(cases, ids, runs, threads)
    for m in measured.values():
        m["tokens_per_s"] = round(statistics.median(m["runs_tokens_per_s"]), 2)
    ours = measured["steered_band"]["texts"]
    for name in ("repeng", "steering_vectors"):
        if name in measured:  # the same vector, alpha and layers should give the same greedy text
            measured[name]["same_text_as_ours"] = measured[name]["texts"] == ours
    results["single_stream"] = measured
    results["peers_missing"] = missing

    log("time to first token in process: the prefix cache off and on")
    steering = _steering(loaded, cv, a.alpha)
    firsts = service_load.distinct(PROMPTS, 3 if smoke else 13)
    results["first_token"] = single.first_token(loaded, steering, single.prompt_ids(loaded, firsts), threads)
    if faster is not None and (own := paths.vectors / faster.name / f"{a.concept}.safetensors").exists():
        results["first_token_faster"] = single.first_token(faster, _steering(faster, read_vector(own), a.alpha),
                                                           single.prompt_ids(faster, firsts), threads)

    log("a long prompt joining a running stream: prefilled at once and in chunks")
    long_prompt = " ".join(PROMPTS) * (1 if smoke else 6) + " Which of these should we talk about first?"
    results["join_stall"] = single.join_stall(loaded, steering, ids[0], single.prompt_ids(loaded, [long_prompt])[0],
                                              1 if smoke else 3, threads)

    log("8 streams, one of them held by the content guard")
    results["guard_hold"] = single.guard_hold(loaded, load_guard(paths.guard), ids, 2 if smoke else 8,
                                              tokens if smoke else 48, runs, threads)

    log("derivation")
    results["derivation"] = _derive_seconds(loaded.name, ["happy"] if smoke else None, _model_args(a))

    log("services: tagger and generator processes")
    tagger = service_load.start("tagger.server", [])
    # Without the content guard, so that time to first token is the first token's (the guard holds
    # text to the end of its sentence; Blip's time to first sentence below measures it).
    generator = service_load.start("generator.personal", ["--models", loaded.name, "--no-guard",
                                                        "--max-batch", "16", "--max-queue", "32", *_model_args(a)])
    try:
        servable = asyncio.run(service_load.served_concepts(generator.address, loaded.name))
        log("concurrency through gRPC")
        results["concurrency"] = asyncio.run(
            service_load.concurrency(generator.address, PROMPTS, servable, levels, tokens, runs))
        log("time to first token: in process and through gRPC")
        service = build_service(GeneratorConfig(models=(loaded.name,), profile=Profile.PERSONAL,
                                                device=a.device, dtype=a.dtype, guard=False))
        try:
            results["grpc_ttft"] = asyncio.run(
                service_load.grpc_vs_in_process(service, generator.address,
                                                service_load.distinct(PROMPTS, 4 if smoke else 10, 10**5), a.concept))
        finally:
            for slot in service.slots.values():
                slot.engine.close()
        results["tagger"] = asyncio.run(service_load.tagger_latency(tagger.address, PROMPTS, 5 if smoke else 100))
        results["memory"] = {"generator_peak_mb": round(generator.peak_memory_mb()),
                             "tagger_peak_mb": round(tagger.peak_memory_mb())}
        generator.stop()  # one generator at a time: Blip's own measures Chat alone on the machine
        conversations = [c[:2] for c in CONVERSATIONS[:2]] if smoke else CONVERSATIONS
        results["chat_first_sentence"] = {}
        pause = 0.0 if smoke else a.turn_pause_s
        # (name, model, generator options, gate, pause). The first is Blip as it was before the prefix
        # cache, with the skip gate on by default; the last but one is today's with a child who
        # answers the instant a reply ends, leaving the engine no time to warm the next prompt.
        blips = [("gate_on_prefix_cache_off", loaded.name, ["--prefix-cache-mb", "0"], True, pause),
                 ("prefix_cache_off", loaded.name, ["--prefix-cache-mb", "0"], False, pause),
                 ("prefix_cache_on_no_warm", loaded.name, ["--no-warm"], False, pause),
                 ("prefix_cache_on", loaded.name, [], False, pause),
                 ("prefix_cache_on_no_pause", loaded.name, [], False, 0.0)]
        if faster is not None:  # the faster path, served by Blip (its own record decides what it serves)
            blips.append((f"{faster.name}_prefix_cache_on", faster.name, [], False, pause))
        for name, model, options, gate, wait in blips:
            log(f"Blip: time to first sentence through Chat, {name.replace('_', ' ')}")
            blip = service_load.start("generator.server", ["--models", model, "--tagger", tagger.address, *options,
                                                         *_model_args(a)])
            try:
                results["chat_first_sentence"][name] = asyncio.run(
                    service_load.chat_first_sentence(blip.address, conversations, 8 if smoke else 48, gate, wait))
            finally:
                blip.stop()
    finally:
        generator.stop()
        tagger.stop()

    others = {}
    for name in filter(None, a.others.split(",")):
        log(f"one stream on {name}")
        others[name] = _other_model(registry.get(name), loaded, a, prompts, tokens, 1 if smoke else 2, threads)

    log("memory bandwidth")
    bandwidth = in_passing_thread(functools.partial(system.memory_bandwidth_gb_s, device=loaded.device),
                                  64 if smoke else 512, threads=threads)
    weights = system.weight_bytes(loaded.model)
    roofline = bandwidth * 1e9 / weights
    achieved = results["single_stream"]["unsteered"]["tokens_per_s"]
    results["physical_limit"] = {"bandwidth_gb_s": round(bandwidth, 2), "weight_bytes": weights,
                                 "roofline_tokens_per_s": round(roofline, 2),
                                 "achieved_unsteered_tokens_per_s": achieved,
                                 "fraction_of_roofline": round(achieved / roofline, 3)}
    if faster is not None:
        fast_weights = system.weight_bytes(faster.model)
        fast_roofline = bandwidth * 1e9 / fast_weights
        plain = results["single_stream"]["transformers_generate"]["tokens_per_s"]
        results["faster"] = {
            "model": faster.name, "weight_bytes": fast_weights, "roofline_tokens_per_s": round(fast_roofline, 2),
            "cases": {name: {"tokens_per_s": m["tokens_per_s"], "vs_transformers_generate": round(m["tokens_per_s"] / plain, 3),
                             "fraction_of_roofline": round(m["tokens_per_s"] / fast_roofline, 3)}
                      for name, m in results["single_stream"].items() if name.startswith(faster.name)}}
    for other in others.values():
        if "weight_bytes" in other:
            other["roofline_tokens_per_s"] = round(bandwidth * 1e9 / other["weight_bytes"], 2)
    results["others"] = others
    results["targets"] = targets(results)

    a.out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(a.out / "results.json", json.dumps(results, indent=2) + "\n")
    write_text_atomic(a.out / "results.md", markdown(results))
    log(f"wrote {a.out / 'results.json'} and {a.out / 'results.md'}")
    print(markdown(results))
    return 0


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    raise SystemExit(main())
