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


def decide(sweep: list[dict[str, Any]], sign: float = 1.0) -> tuple[str, float | None, float | None]:
    """(status, recommended_alpha, max_alpha) from one direction's sweep.

    `sign` is the direction: +1 steers toward the concept (alphas > 0), -1 away from it
    (alphas < 0, where the effect that counts is a fall in the concept's score, -d).
    max_alpha: the largest |alpha| up to which every swept alpha kept coherence.
    recommended_alpha: the smallest coherent alpha (signed) whose effect exceeds GATE_D.
    A direction that never passes but whose effect runs the other way beyond GATE_D (as RLHF
    does to hostile) is `inverted`; otherwise `failed`.
    """
    points = sorted(sweep, key=lambda p: abs(p["alpha"]))
    usable: list[dict[str, Any]] = []
    for point in points:
        if not coherent(point):
            break
        usable.append(point)
    max_alpha = abs(usable[-1]["alpha"]) if usable else None
    recommended = next((p["alpha"] for p in usable if sign * p["d"] > GATE_D), None)
    if recommended is not None:
        return "passed", recommended, max_alpha
    judged = usable or points[:1]
    if any(sign * p["d"] < -GATE_D for p in judged):
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
    # Steering away from the concept (alpha < 0) is its own direction with its own sweep; it is
    # served (personal profile only) up to this |alpha| when that sweep passed, else never.
    negative_status: str = "unvalidated"
    negative_max_alpha: float | None = None


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
        negative = entry.get("negative")
        neg_status, _, neg_max = decide(negative.get("sweep", []), sign=-1.0) if negative else ("unvalidated", None, None)
        if status != entry.get("status") or child_safe != entry.get("child_safe_alpha"):
            reason = (f"recorded status {entry.get('status')!r} or child_safe_alpha {entry.get('child_safe_alpha')!r} "
                      f"disagrees with its own figures ({status}, {child_safe!r})")
            states[concept] = ConceptState(concept, status, False, reason)
        elif negative and neg_status != negative.get("status"):
            reason = f"recorded negative-direction status {negative.get('status')!r} disagrees with its own figures ({neg_status})"
            states[concept] = ConceptState(concept, status, False, reason)
        elif entry.get("vector_sha256") != cv.content_sha256:
            states[concept] = ConceptState(concept, status, False, "vector changed since validation; re-run `steer validate`")
        else:
            passed = status == "passed"
            states[concept] = ConceptState(
                concept, status, passed, "passed" if passed else f"effect-size gate: {status}", recommended, max_alpha,
                child_safe, neg_status, neg_max if passed and neg_status == "passed" else None,
            )
    return Steerability(model, True, "validated", states)
