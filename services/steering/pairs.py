"""Concept files: the contrastive pairs we wrote, one JSON file per concept under vectors/pairs/."""

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError, NotFoundError


@dataclass(frozen=True)
class Pair:
    context: str  # the user turn the reply answers
    positive: str  # a reply that expresses the concept
    negative: str  # the same reply, flat


@dataclass(frozen=True)
class Concept:
    name: str
    description: str
    valence: float  # Russell's circumplex, -1..1
    arousal: float
    words: tuple[str, ...]
    pairs: tuple[Pair, ...]

    @property
    def pairs_sha256(self) -> str:
        canonical = json.dumps([[p.context, p.positive, p.negative] for p in self.pairs], ensure_ascii=False)
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def concept_names(pairs_dir: Path) -> list[str]:
    return sorted(p.stem for p in Path(pairs_dir).glob("*.json"))


def load_concept(pairs_dir: Path, name: str) -> Concept:
    path = Path(pairs_dir) / f"{name}.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        known = ", ".join(concept_names(pairs_dir)) or "none"
        raise NotFoundError(f"unknown concept {name!r}; concepts with pairs: {known}") from None
    except ValueError as exc:
        raise ConfigError(f"{path} is not valid JSON: {exc}") from None
    try:
        pairs = tuple(Pair(p["context"], p["positive"], p["negative"]) for p in data["pairs"])
        return Concept(
            name=data["concept"],
            description=data.get("description", ""),
            valence=float(data.get("valence", 0.0)),
            arousal=float(data.get("arousal", 0.0)),
            words=tuple(data.get("words", ())),
            pairs=pairs,
        )
    except (KeyError, TypeError) as exc:
        raise ConfigError(f"{path}: missing or malformed field {exc}") from None
