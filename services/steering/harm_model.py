"""The theme guard's learned layer: how harmful a sentence reads, from its meaning and its words.

Two small models trained by `python -m steering.guard_train` on the tuning replies and saved in
`vectors/guard/harm_model.safetensors`:

- an RBF support-vector machine over the sentence's all-MiniLM-L6-v2 embedding (the meaning:
  "see if it can swim" said of a kitten thrown in a pond), and
- a logistic regression over TF-IDF of its words and word pairs (`steering.words`: short cues the
  embedding blurs, "your address", "our secret", "hope you").

The score is the machine's decision value plus `word_weight` times the regression's logit; a
sentence is harmful at `threshold` or above. Both were chosen by cross-validation on the tuning
replies only. Serving needs numpy, not scikit-learn.
"""

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import ModelLoadError
from .tensor_file import load_arrays, save_arrays
from .words import WordGrams

HARM_MODEL_FILE = "harm_model.safetensors"
EMBED_DIM = 384
_RETRAIN = "retrain it with `python -m steering.guard_train`"
_REQUIRED_META = ("gamma", "svm_intercept", "word_intercept", "word_weight", "threshold", "vocabulary", "train_sha256")


def combine(meaning: np.ndarray, words: np.ndarray, word_weight: float) -> np.ndarray:
    """The harm score from the machine's decision values and the words' logits."""
    return meaning + word_weight * words


@dataclass(frozen=True, eq=False)
class HarmModel:
    support: np.ndarray  # [n, 384] support vectors (unit sentence embeddings)
    dual_coef: np.ndarray  # [n] signed weights of the support vectors
    gamma: float  # RBF width: exp(-gamma * |x - s|^2)
    svm_intercept: float
    words: WordGrams
    word_coef: np.ndarray  # [len(vocabulary)]
    word_intercept: float
    word_weight: float  # how much the words count beside the meaning
    threshold: float  # a score at or above this is harmful
    train_sha256: str  # of the training rows, so a test can tell when the data moved under the model
    metadata: dict[str, str] = field(default_factory=dict)

    def scores(self, texts: Sequence[str], vectors: np.ndarray) -> np.ndarray:
        """`[n]` harm scores of `texts`, whose unit embeddings are `vectors` `[n, 384]`."""
        if not len(texts):
            return np.zeros(0, dtype=np.float32)
        sq = np.maximum(2.0 - 2.0 * (vectors @ self.support.T), 0.0)  # |x - s|^2 of unit vectors
        meaning = np.exp(-self.gamma * sq) @ self.dual_coef + self.svm_intercept
        words = self.words.transform(texts) @ self.word_coef + self.word_intercept
        return combine(meaning, words, self.word_weight)

    def save(self, path: Path) -> None:
        metadata = {k: str(v) for k, v in self.metadata.items()}
        metadata.update(
            gamma=repr(self.gamma), svm_intercept=repr(self.svm_intercept), word_intercept=repr(self.word_intercept),
            word_weight=repr(self.word_weight), threshold=repr(self.threshold), train_sha256=self.train_sha256,
            vocabulary=json.dumps(list(self.words.vocabulary), ensure_ascii=False),
        )
        save_arrays(Path(path), {"support": self.support, "dual_coef": self.dual_coef, "idf": self.words.idf,
                                 "word_coef": self.word_coef}, metadata)

    @classmethod
    def load(cls, path: Path) -> "HarmModel":
        path = Path(path)
        meta, tensors = load_arrays(path, "the theme guard's harm model does not exist", "harm model", _RETRAIN)
        return _checked(path, meta, tensors)


def _checked(path: Path, meta: dict[str, str], tensors: dict[str, np.ndarray]) -> HarmModel:
    missing = [k for k in _REQUIRED_META if k not in meta] + [k for k in ("support", "dual_coef", "idf", "word_coef") if k not in tensors]
    if missing:
        raise ModelLoadError(f"{path}: lacks {', '.join(missing)}; {_RETRAIN}")
    try:
        numbers = {k: float(meta[k]) for k in ("gamma", "svm_intercept", "word_intercept", "word_weight", "threshold")}
        words = WordGrams(tuple(str(g) for g in json.loads(meta["vocabulary"])), tensors["idf"])
    except (ValueError, TypeError) as exc:
        raise ModelLoadError(f"{path}: malformed metadata or vocabulary ({exc}); {_RETRAIN}") from None
    support, dual, coef = tensors["support"], tensors["dual_coef"], tensors["word_coef"]
    if support.ndim != 2 or support.shape[1] != EMBED_DIM or dual.shape != (support.shape[0],) or coef.shape != (words.dim,):
        raise ModelLoadError(f"{path}: weights have shapes {support.shape}, {dual.shape}, {coef.shape}; {_RETRAIN}")
    arrays = (support, dual, coef, words.idf, np.array(list(numbers.values())))
    if not all(np.isfinite(a).all() for a in arrays) or numbers["gamma"] <= 0:
        raise ModelLoadError(f"{path}: non-finite weights or a non-positive gamma; {_RETRAIN}")
    extra = {k: v for k, v in meta.items() if k not in _REQUIRED_META}
    return HarmModel(support, dual, numbers["gamma"], numbers["svm_intercept"], words, coef, numbers["word_intercept"],
                     numbers["word_weight"], numbers["threshold"], meta["train_sha256"], extra)
