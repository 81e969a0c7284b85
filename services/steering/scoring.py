"""How much a text expresses a concept, judged without the steering vector.

score(text, concept) = cos(e, centroid(concept exemplars)) - cos(e, centroid(neutral exemplars))
with e the text's all-MiniLM-L6-v2 embedding. The exemplars (`vectors/eval/exemplars.json`)
are short replies written for this purpose, separate from the derivation pairs, so the
scorer shares nothing with the vector it judges. `check_scorer` verifies on held-apart
labelled text (`vectors/eval/scorer_check.jsonl`) that each concept's text scores above
neutral text.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .embedding import embed, embed_fixed
from .errors import ConfigError, NotFoundError


@dataclass(frozen=True)
class ConceptScorer:
    neutral: np.ndarray  # [384], unit
    centroids: dict[str, np.ndarray]  # concept -> [384], unit

    def scores(self, texts: list[str], concept: str) -> np.ndarray:
        if concept not in self.centroids:
            raise NotFoundError(f"no scorer exemplars for concept {concept!r}")
        e = embed(texts)  # [n, 384], unit
        return e @ self.centroids[concept] - e @ self.neutral


def _unit_centroid(texts: list[str]) -> np.ndarray:
    c = embed_fixed(texts).mean(0)
    return c / np.linalg.norm(c)


def load_scorer(eval_dir: Path) -> ConceptScorer:
    path = Path(eval_dir) / "exemplars.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        neutral, concepts = data["neutral"], data["concepts"]
    except FileNotFoundError:
        raise NotFoundError(f"scorer exemplars {path} do not exist") from None
    except (ValueError, KeyError) as exc:
        raise ConfigError(f"{path}: malformed exemplars ({exc})") from None
    return ConceptScorer(
        neutral=_unit_centroid(neutral),
        centroids={name: _unit_centroid(texts) for name, texts in concepts.items()},
    )


@dataclass(frozen=True)
class ScorerCheck:
    concept: str
    concept_mean: float
    neutral_mean: float
    auc: float  # probability a concept text outscores a neutral text

    @property
    def passed(self) -> bool:
        return self.concept_mean > self.neutral_mean and self.auc >= 0.8


def check_scorer(scorer: ConceptScorer, eval_dir: Path) -> list[ScorerCheck]:
    rows = [json.loads(line) for line in (Path(eval_dir) / "scorer_check.jsonl").read_text().splitlines() if line.strip()]
    neutral = [r["text"] for r in rows if r["concept"] == "neutral"]
    results = []
    for concept in sorted(scorer.centroids):
        positives = [r["text"] for r in rows if r["concept"] == concept]
        if not positives:
            continue
        pos = scorer.scores(positives, concept)
        neg = scorer.scores(neutral, concept)
        auc = float((pos[:, None] > neg[None, :]).mean())
        results.append(ScorerCheck(concept, float(pos.mean()), float(neg.mean()), auc))
    return results
