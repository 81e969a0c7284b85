"""A model's whole validation, as `steer validate` runs it: load and check the model, measure
the unsteered baselines, sweep each concept, merge with the earlier record, and write the
record, the report and the plots. The command line parses its options and prints; this
module does the work."""

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .atomic import remove_orphans
from .errors import ConfigError, NotFoundError, SteeringError
from .registry import ModelEntry
from .settings import Paths
from .validate import Check, SweepSettings
from .vector import ConceptVector


@dataclass(frozen=True)
class ValidationOptions:
    concepts: Sequence[str] = ()  # empty: every stored vector, and the record is written afresh
    seeds: int = 2
    allowlist_seeds: int = 6
    batch_size: int = 64
    max_new_tokens: int = 24
    prompts: int | None = None  # the first this many evaluation prompts; None: all of them
    search: bool = True
    negative: bool = False
    plots: bool = True
    progress: bool = True


@dataclass
class ValidationRun:
    model: str
    checks: list[Check]
    results: dict[str, dict[str, Any]]  # concept -> its record entry, for the concepts swept this run
    record: dict[str, Any]
    written: list[Path] = field(default_factory=list)  # the record, the report, then any plots
    kept: list[str] = field(default_factory=list)  # concepts carried over from the earlier record
    refused: dict[str, str] = field(default_factory=dict)  # stored vectors that could not be used, and why

    @property
    def failed(self) -> Check | None:
        """The first model check that failed: nothing was swept, and the model is not steerable."""
        return next((c for c in self.checks if not c.passed), None)


def model_vectors(loaded, paths: Paths) -> tuple[dict[str, ConceptVector], dict[str, str]]:
    """The model's stored vectors that fit it, and the refused ones with their reasons."""
    from .store import load_store, stored_concepts

    model_dir = paths.model_vectors(loaded.name)
    return load_store(model_dir, stored_concepts(model_dir), fingerprint=loaded.fingerprint,
                      hidden_size=loaded.hidden_size, layers=loaded.steering_layers)


def write_plots(paths: Paths, model: str, record: dict[str, Any], vectors: dict[str, ConceptVector]) -> list[Path]:
    from .pairs import load_concept
    from .report import write_plots as plot

    concepts = {name: load_concept(paths.pairs, name) for name in vectors}
    return plot(paths.model_vectors(model), record, vectors, concepts, record["layers"])


def validate_model(entry: ModelEntry, paths: Paths, device: str | None, options: ValidationOptions,
                   on_check: Callable[[Check], None] | None = None) -> ValidationRun:
    """Validate `entry` and write what it measured: the record and report always, the plots
    when every model check passed (`failed` says when one did not). Raises NotFoundError before
    any sweep for a concept without a usable vector."""
    from tqdm import tqdm

    from .guard import load_guard
    from .profiles import BLIP_ALLOWLIST
    from .record import merge_earlier, write_record
    from .report import write_report
    from .scoring import load_scorer
    from .validate import (baseline, check_load, load_blip_setting, load_eval_prompts, model_record, run_model_checks,
                           sweep_concept)

    start = time.perf_counter()
    prompts = load_eval_prompts(paths.eval)
    if options.prompts is not None and not 1 <= options.prompts <= len(prompts):  # before minutes of loading
        raise ConfigError(f"prompts must be 1 to {len(prompts)} (the evaluation prompts in {paths.eval}), "
                          f"not {options.prompts}")
    load, loaded = check_load(entry, paths.cache, device)
    if on_check:
        on_check(load)
    if loaded is None:
        raise SteeringError(f"validation of {entry.name} stopped: the model did not load ({load.detail})")
    model_dir = paths.model_vectors(loaded.name)
    for folder in (model_dir, model_dir / "plots"):  # what a killed earlier run left half-written
        if folder.is_dir():
            remove_orphans(folder)
    vectors, refused = model_vectors(loaded, paths)
    checks = [load, *run_model_checks(loaded, vectors, on_check=on_check)]
    names = list(options.concepts) or sorted(vectors)
    unknown = [n for n in names if n not in vectors]
    if unknown:
        why = "; ".join(f"{n}: {refused.get(n, 'not stored')}" for n in unknown)
        raise NotFoundError(f"no usable vector on {loaded.name} for {why}; run `steer derive`")
    settings = SweepSettings(prompts=prompts[: options.prompts], seeds=tuple(range(options.seeds)),
                             allowlist_seeds=tuple(range(options.allowlist_seeds)), batch_size=options.batch_size,
                             max_new_tokens=options.max_new_tokens, search=options.search,
                             blip=load_blip_setting(paths.eval)).scaled(entry.sweep_scale)
    results: dict[str, dict[str, Any]] = {}
    base = blip_base = None
    if all(c.passed for c in checks):
        scorer = load_scorer(paths.eval)
        guard = load_guard(paths.guard)
        with tqdm(total=len(names) + 1, unit="concept", desc=f"validate {loaded.name}", disable=not options.progress) as bar:
            bar.set_postfix_str("unsteered baseline")
            base = baseline(loaded, settings, guard)
            if BLIP_ALLOWLIST & set(names):  # the control of the allowlist concepts, measured as Blip speaks
                blip_base = baseline(loaded, settings, guard, blip=True)
            bar.update()
            for name in names:
                bar.set_postfix_str(name)
                results[name] = sweep_concept(loaded, vectors[name], scorer, settings, base, guard, options.negative,
                                              blip_base)
                bar.update()
    record = model_record(loaded, checks, results, settings, base, time.perf_counter() - start, blip_base)
    kept: list[str] = []
    if options.concepts:
        record, kept = merge_earlier(model_dir, record)
    run = ValidationRun(loaded.name, checks, results, record, [write_record(model_dir, record),
                                                              write_report(model_dir, record)], kept, refused)
    if options.plots and run.failed is None:
        run.written += write_plots(paths, loaded.name, record, vectors)
    return run
