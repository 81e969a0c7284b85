"""The validation record: the only thing that decides whether a model or concept may be steered.

One JSON file per model (`vectors/<model>/validation.json`) written by `steer validate`.
It names the model fingerprint it was measured on and each vector's content hash. On
reading, nothing is taken on trust: the record's own hash must match its content, each
concept's status is decided again from its measured figures, the model fingerprint must
match the loaded model and each vector's hash must match the vector being served.
"""

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .atomic import write_text_atomic
from .vector import ConceptVector

RECORD_NAME = "validation.json"
GATE_D = 0.5  # Cohen's d a concept must exceed to be served
PPL_RATIO_MAX = 2.0  # steered perplexity at most twice the unsteered, under the unsteered model
DEGENERATE_EXCESS_MAX = 0.1  # at most 10 points more looping replies than unsteered
CHECKS = ("load", "hook_path", "canary_kl", "behavioural")


def record_path(model_dir: Path) -> Path:
    return Path(model_dir) / RECORD_NAME


def _digest(record: dict[str, Any]) -> str:
    body = {k: v for k, v in record.items() if k != "record_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def write_record(model_dir: Path, record: dict[str, Any]) -> Path:
    record = dict(record, record_sha256=_digest(record))
    path = record_path(model_dir)
    write_text_atomic(path, json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    return path


def coherent(point: dict[str, Any]) -> bool:
    return point["ppl_ratio"] <= PPL_RATIO_MAX and point["degenerate_excess"] <= DEGENERATE_EXCESS_MAX


def decide(sweep: list[dict[str, Any]]) -> tuple[str, float | None, float | None]:
    """(status, recommended_alpha, max_alpha) from a sweep ordered by alpha.

    max_alpha: the largest alpha up to which every swept alpha kept coherence.
    recommended_alpha: the smallest coherent alpha with d > GATE_D.
    A concept that never passes but whose d falls below -GATE_D (the steering pushes the
    other way, as RLHF does to hostile) is `inverted`; otherwise `failed`.
    """
    points = sorted(sweep, key=lambda p: p["alpha"])
    usable: list[dict[str, Any]] = []
    for point in points:
        if not coherent(point):
            break
        usable.append(point)
    max_alpha = usable[-1]["alpha"] if usable else None
    recommended = next((p["alpha"] for p in usable if p["d"] > GATE_D), None)
    if recommended is not None:
        return "passed", recommended, max_alpha
    judged = usable or points[:1]
    if any(p["d"] < -GATE_D for p in judged):
        return "inverted", None, max_alpha
    return "failed", None, max_alpha


def child_safe_alpha(sweep: list[dict[str, Any]]) -> float | None:
    """The largest swept alpha up to which steered replies raised no more guard flags and no
    more degenerate repeats than unsteered ones; None when even the smallest did, or when the
    sweep predates the guard (no flag figures)."""
    safe = None
    for point in sorted(sweep, key=lambda p: p["alpha"]):
        if "flag_excess" not in point or point["flag_excess"] > 0 or point["degenerate_excess"] > 0:
            break
        safe = point["alpha"]
    return safe


@dataclass(frozen=True)
class ConceptState:
    concept: str
    status: str  # passed, failed, inverted, unvalidated
    servable: bool
    reason: str
    recommended_alpha: float | None = None
    max_alpha: float | None = None
    child_safe_alpha: float | None = None  # None: not calibrated for children, or unsafe at every swept alpha


@dataclass(frozen=True)
class Steerability:
    model: str
    steerable: bool
    reason: str
    concepts: dict[str, ConceptState] = field(default_factory=dict)

    @property
    def servable(self) -> list[str]:
        return sorted(c for c, s in self.concepts.items() if s.servable)


def assess(model: str, model_dir: Path, fingerprint: str, vectors: dict[str, ConceptVector] | None = None) -> Steerability:
    """Decide from the stored record whether `model` (loaded with `fingerprint`) and each
    of `vectors` may be steered. Anything missing, stale or altered means no."""
    path = record_path(model_dir)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return Steerability(model, False, "unvalidated: no validation record; run `steer validate`")
    except ValueError:
        return Steerability(model, False, f"validation record {path} is not valid JSON")
    if record.get("record_sha256") != _digest(record):
        return Steerability(model, False, f"validation record {path} was altered after it was written; re-run `steer validate`")
    if record.get("fingerprint") != fingerprint:
        return Steerability(
            model, False,
            f"validation record is for fingerprint {str(record.get('fingerprint'))[:16]}, "
            f"the loaded model is {fingerprint[:16]}; re-run `steer validate`",
        )
    failed = [name for name in CHECKS if not record.get("checks", {}).get(name, {}).get("passed")]
    if failed:
        return Steerability(model, False, f"model checks failed: {', '.join(failed)}")
    states: dict[str, ConceptState] = {}
    for concept, cv in (vectors or {}).items():
        entry = record.get("concepts", {}).get(concept)
        if entry is None:
            states[concept] = ConceptState(concept, "unvalidated", False, "not in the validation record")
            continue
        status, recommended, max_alpha = decide(entry.get("sweep", []))
        child_safe = child_safe_alpha(entry.get("sweep", []))
        if status != entry.get("status") or child_safe != entry.get("child_safe_alpha"):
            reason = (f"recorded status {entry.get('status')!r} or child_safe_alpha {entry.get('child_safe_alpha')!r} "
                      f"disagrees with its own figures ({status}, {child_safe!r})")
            states[concept] = ConceptState(concept, status, False, reason)
        elif entry.get("vector_sha256") != cv.content_sha256:
            states[concept] = ConceptState(concept, status, False, "vector changed since validation; re-run `steer validate`")
        elif status != "passed":
            states[concept] = ConceptState(concept, status, False, f"effect-size gate: {status}", recommended, max_alpha, child_safe)
        else:
            states[concept] = ConceptState(concept, status, True, "passed", recommended, max_alpha, child_safe)
    return Steerability(model, True, "validated", states)
