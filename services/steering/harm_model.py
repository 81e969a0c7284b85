"""The theme guard's learned layer: how harmful a sentence reads, from its meaning and its words.

Two small models trained by `python -m steering.guard_train` on the tuning replies and saved in
`vectors/guard/harm_model.safetensors`:

- an RBF support-vector machine over the sentence's features from `steering.reader` (SmolLM2's
  hidden states: the meaning, "see if it can swim" said of a kitten thrown in a pond),
  standardised by the training units' mean and spread and made unit length, and
- a logistic regression over TF-IDF of its words and word pairs (`steering.words`: short cues the
  embedding blurs, "your address", "our secret", "hope you").

The score is the machine's decision value plus `word_weight` times the regression's logit; a
sentence is harmful at `threshold` or above. Both were chosen by cross-validation on the tuning
replies only. The model says how harmful, not which theme: a flagged sentence is named for its
closest exemplar's theme, the exemplars read as the sentences are. Serving needs numpy, not
scikit-learn. The reader's name and weights' fingerprint are saved with the model, and features
from any other reader are refused.
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
_RETRAIN = "retrain it with `python -m steering.guard_train`"
_REQUIRED_META = ("gamma", "svm_intercept", "word_intercept", "word_weight", "threshold", "vocabulary", "train_sha256",
                  "reader", "reader_fingerprint", "exemplar_themes")
_ARRAYS = ("support", "dual_coef", "idf", "word_coef", "feature_mean", "feature_scale", "exemplars")


def combine(meaning: np.ndarray, words: np.ndarray, word_weight: float) -> np.ndarray:
    """The harm score from the machine's decision values and the words' logits."""
    return meaning + word_weight * words


def standardise(features: np.ndarray, mean: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Reader features `[n, d]` as the machine reads them: each dimension standardised, each row unit length."""
    z = (features - mean) / scale
    return (z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-9)).astype(np.float32)


@dataclass(frozen=True, eq=False)
class HarmModel:
    support: np.ndarray  # [n, d] support vectors (standardised unit features)
    dual_coef: np.ndarray  # [n] signed weights of the support vectors
    gamma: float  # RBF width: exp(-gamma * |x - s|^2)
    svm_intercept: float
    words: WordGrams
    word_coef: np.ndarray  # [len(vocabulary)]
    word_intercept: float
    word_weight: float  # how much the words count beside the meaning
    threshold: float  # a score at or above this is harmful
    train_sha256: str  # of the training rows, so a test can tell when the data moved under the model
    feature_mean: np.ndarray  # [d]: the training units' features, for `standardise`
    feature_scale: np.ndarray  # [d]
    exemplars: np.ndarray  # [m, d], standardised: the themes' exemplars, to name a flagged sentence's theme
    exemplar_themes: tuple[str, ...]  # [m]
    reader: str  # the features' reader (`SentenceReader.name`) and its weights' fingerprint
    reader_fingerprint: str
    metadata: dict[str, str] = field(default_factory=dict)
    # A listed word of a theme the model learns flags a text only when the text scores this or
    # more: the lists find the words, the model says whether they are meant. -inf: the lists alone.
    list_confirm: float = float("-inf")

    def scores(self, texts: Sequence[str], features: np.ndarray) -> np.ndarray:
        """`[n]` harm scores of `texts`, whose reader features are `features` `[n, d]`."""
        if not len(texts):
            return np.zeros(0, dtype=np.float32)
        vectors = standardise(features, self.feature_mean, self.feature_scale)
        sq = np.maximum(2.0 - 2.0 * (vectors @ self.support.T), 0.0)  # |x - s|^2 of unit vectors
        meaning = np.exp(-self.gamma * sq) @ self.dual_coef + self.svm_intercept
        words = self.words.transform(texts) @ self.word_coef + self.word_intercept
        return combine(meaning, words, self.word_weight)

    def theme_of(self, features: np.ndarray) -> str:
        """The theme of the exemplar closest to one sentence's features `[d]`."""
        vector = standardise(features[None], self.feature_mean, self.feature_scale)[0]
        return self.exemplar_themes[int(np.argmax(self.exemplars @ vector))]

    def check_reader(self, name: str, fingerprint: str) -> None:
        if (name, fingerprint) != (self.reader, self.reader_fingerprint):
            raise ModelLoadError(f"the harm model was trained on features of {self.reader} ({self.reader_fingerprint[:12]}), "
                                 f"not of {name} ({fingerprint[:12]}); {_RETRAIN}")

    def save(self, path: Path) -> None:
        metadata = {k: str(v) for k, v in self.metadata.items()}
        metadata.update(
            gamma=repr(self.gamma), svm_intercept=repr(self.svm_intercept), word_intercept=repr(self.word_intercept),
            word_weight=repr(self.word_weight), threshold=repr(self.threshold), list_confirm=repr(self.list_confirm),
            train_sha256=self.train_sha256,
            vocabulary=json.dumps(list(self.words.vocabulary), ensure_ascii=False), reader=self.reader,
            reader_fingerprint=self.reader_fingerprint, exemplar_themes=json.dumps(list(self.exemplar_themes)),
        )
        save_arrays(Path(path), {"support": self.support, "dual_coef": self.dual_coef, "idf": self.words.idf,
                                 "word_coef": self.word_coef, "feature_mean": self.feature_mean,
                                 "feature_scale": self.feature_scale, "exemplars": self.exemplars}, metadata)

    @classmethod
    def load(cls, path: Path) -> "HarmModel":
        path = Path(path)
        meta, tensors = load_arrays(path, "the theme guard's harm model does not exist", "harm model", _RETRAIN)
        return _checked(path, meta, tensors)


def _checked(path: Path, meta: dict[str, str], tensors: dict[str, np.ndarray]) -> HarmModel:
    missing = [k for k in _REQUIRED_META if k not in meta] + [k for k in _ARRAYS if k not in tensors]
    if missing:
        raise ModelLoadError(f"{path}: lacks {', '.join(missing)}; {_RETRAIN}")
    try:
        numbers = {k: float(meta[k]) for k in ("gamma", "svm_intercept", "word_intercept", "word_weight", "threshold")}
        list_confirm = float(meta.get("list_confirm", "-inf"))
        words = WordGrams(tuple(str(g) for g in json.loads(meta["vocabulary"])), tensors["idf"])
        exemplar_themes = tuple(str(t) for t in json.loads(meta["exemplar_themes"]))
    except (ValueError, TypeError) as exc:
        raise ModelLoadError(f"{path}: malformed metadata or vocabulary ({exc}); {_RETRAIN}") from None
    support, dual, coef = tensors["support"], tensors["dual_coef"], tensors["word_coef"]
    mean, scale, exemplars = tensors["feature_mean"], tensors["feature_scale"], tensors["exemplars"]
    d = mean.shape[0] if mean.ndim == 1 else -1
    if (support.ndim != 2 or support.shape[1] != d or dual.shape != (support.shape[0],) or coef.shape != (words.dim,)
            or scale.shape != (d,) or exemplars.shape != (len(exemplar_themes), d) or not exemplar_themes):
        raise ModelLoadError(f"{path}: weights have shapes {support.shape}, {dual.shape}, {coef.shape}, {mean.shape}, "
                             f"{scale.shape}, {exemplars.shape} for {len(exemplar_themes)} exemplars; {_RETRAIN}")
    arrays = (support, dual, coef, words.idf, mean, scale, exemplars, np.array(list(numbers.values())))
    if not all(np.isfinite(a).all() for a in arrays) or numbers["gamma"] <= 0 or (scale <= 0).any():
        raise ModelLoadError(f"{path}: non-finite weights, a non-positive gamma or feature scale; {_RETRAIN}")
    if np.isnan(list_confirm) or list_confirm == float("inf"):
        raise ModelLoadError(f"{path}: list_confirm is {list_confirm}; {_RETRAIN}")
    extra = {k: v for k, v in meta.items() if k not in (*_REQUIRED_META, "list_confirm")}
    return HarmModel(support, dual, numbers["gamma"], numbers["svm_intercept"], words, coef, numbers["word_intercept"],
                     numbers["word_weight"], numbers["threshold"], meta["train_sha256"], mean, scale, exemplars,
                     exemplar_themes, meta["reader"], meta["reader_fingerprint"], extra, list_confirm)
