"""The emotion tagger: MiniLM sentence embeddings and a linear softmax over Blip's labels.

Inference is numpy only (no scikit-learn, no grpc): `softmax(features @ coef.T + intercept)`.
Training lives in `tagger.train`, which writes the checked-in `model/classifier.safetensors`.

Features of a turn: four embedding blocks of 384,
1. the turn: the unit-length mean of `embed(turn)` and `embed(TURN_PREFIX + turn)` (a second
   view of the same words; averaging both views measured about +1 point of cross-validated
   accuracy on train);
2. `CONTEXT_WEIGHT * embed(last 3 context turns joined)` (zeros without context), so the turn
   dominates: the label describes the turn, the context only disambiguates short replies such
   as "He's eight";
3. the element-wise max over the turn's word-piece vectors (the same forward pass as
   `embed(turn)`, before mean pooling), unit length: it keeps a single strong word ("cried",
   "can't wait") that mean pooling dilutes (about +1 point in cross-validation on train);
4. the unit-length mean of the turn's word-piece vectors after layer `LOW_LAYER` of 6 (the same
   forward pass again): the last layer is tuned for topic similarity, so "I didn't miss any
   words" sits near sad turns about tests; a lower layer keeps more of the words themselves
   (+1.5 points of 5-fold cross-validated accuracy on all 1420 labelled turns of then, on
   each of 5 fold seeds; layers 2, 3 and 5 gained less, adding the context or the prefixed
   view at that layer nothing).

then a word block: `WORD_WEIGHT *` TF-IDF over the turn's words and word pairs (`steering.words`),
whose vocabulary is fitted on the train turns and saved in the model file.
"""

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from steering.embedding import load_embedder
from steering.errors import ConfigError, ModelLoadError, NotFoundError
from steering.tensor_file import load_arrays, save_arrays
from steering.vocabulary import CONTEXT_TURNS, EMOTIONS, NONE, TAGS
from steering.words import WordGrams

LABELS = EMOTIONS
CLASSES = TAGS

EMBED_DIM = 384  # all-MiniLM-L6-v2
FEATURE_DIM = 4 * EMBED_DIM  # embedding blocks: turn, context, max-pooled word pieces, low-layer mean
LOW_LAYER = 4  # hidden layer (of 6) whose mean over the turn's word pieces is block 4
CONTEXT_WEIGHT = 0.5
TURN_PREFIX = "A child says: "  # a second view of the turn, averaged with the plain one
# Scale of the unit-length word block next to the embedding blocks; 1.0 and 1.3 tied in
# cross-validation on train (0.895, 0.897), 0.7 was worse (0.885).
WORD_WEIGHT = 1.0
FORMAT_VERSION = "4"
# Torch threads for serving: a turn is a few dozen tokens, too small for threads to pay off, and
# on a small shared machine two threads fighting other work measured 25x slower (490 vs 20 ms).
INFERENCE_THREADS = 1
_BATCH = 64  # lines of a JSONL file embedded per call
# Written into every model file and checked on load: a model only fits the features it was trained on.
_FEATURE_META = {
    "format_version": FORMAT_VERSION,
    "embedder": "all-MiniLM-L6-v2",
    "context_turns": str(CONTEXT_TURNS),
    "context_weight": repr(CONTEXT_WEIGHT),
    "turn_prefix": TURN_PREFIX,
    "turn_pooling": "mean(plain, prefixed) + max word piece",
    "low_layer": str(LOW_LAYER),
    "words": "tf-idf word 1-2 grams, sublinear tf, smoothed idf, l2",
    "word_weight": repr(WORD_WEIGHT),
}
_REQUIRED_META = ("classes", "threshold", "train_sha256", "vocabulary", *_FEATURE_META)
_RETRAIN = "retrain with `python -m tagger.train`"


@dataclass(frozen=True)
class Prediction:
    label: str  # NONE when the best class is NONE or its probability is below the threshold
    confidence: float  # probability of the best class, before the threshold
    scores: dict[str, float]  # every class, best first


def context_text(context: Sequence[str]) -> str:
    """The last `CONTEXT_TURNS` non-blank context turns, oldest first, joined by spaces."""
    turns = [turn.strip() for turn in context if turn.strip()]
    return " ".join(turns[-CONTEXT_TURNS:]) if turns else ""


def _unit(v: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(v, axis=-1, keepdims=True)
    return v / np.maximum(norms, 1e-12)


def _encode(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`(mean, max, low)`, each `[n, 384]` float32, from one forward pass of the embedder.

    `mean` is the unit-length mean over all word pieces of the last layer, what
    `steering.embedding.embed` returns; `max` is the unit-length element-wise max over the last
    layer's word pieces between [CLS] and [SEP]; `low` is the unit-length mean over all word
    pieces after layer `LOW_LAYER`.
    """
    import torch  # loaded with the embedder

    n = len(texts)
    means, maxes, lows = (np.empty((n, EMBED_DIM), dtype=np.float32) for _ in range(3))
    if not n:
        return means, maxes, lows
    embedder = load_embedder()
    model, tokenizer = embedder[0].auto_model, embedder.tokenizer
    order = sorted(range(n), key=lambda i: len(texts[i]))  # similar lengths share a batch: less padding
    with torch.inference_mode():
        for start in range(0, n, _BATCH):
            rows = order[start : start + _BATCH]
            batch = tokenizer(
                [texts[i] for i in rows], padding=True, truncation=True, max_length=embedder.max_seq_length, return_tensors="pt"
            ).to(embedder.device)
            hidden = model(**batch, output_hidden_states=True).hidden_states  # layers 0..6, each [b, tokens, 384]
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden[-1].dtype)  # [b, tokens, 1]
            counts = mask.sum(dim=1)
            lengths = batch["attention_mask"].sum(dim=1)
            inner = mask.clone()  # the word pieces between [CLS] and [SEP], when there are any
            has_inner = lengths > 2
            inner[has_inner, 0] = 0
            inner[has_inner.nonzero().squeeze(1), lengths[has_inner] - 1] = 0
            last = hidden[-1]
            means[rows] = ((last * mask).sum(dim=1) / counts).float().cpu().numpy()
            maxes[rows] = last.masked_fill(inner == 0, float("-inf")).amax(dim=1).float().cpu().numpy()
            lows[rows] = ((hidden[LOW_LAYER] * mask).sum(dim=1) / counts).float().cpu().numpy()
    return _unit(means), _unit(maxes), _unit(lows)


def features(texts: Sequence[str], contexts: Sequence[Sequence[str]] | None = None) -> np.ndarray:
    """`[n, FEATURE_DIM]` float32 embedding features; one embedding call for turns, prefixed turns and contexts.

    A model's full features append its word block: `TaggerModel.full_features`.
    """
    contexts = contexts if contexts is not None else [()] * len(texts)
    if len(contexts) != len(texts):
        raise ValueError(f"{len(texts)} texts but {len(contexts)} contexts")
    n = len(texts)
    joined = [context_text(c) for c in contexts]
    with_context = [i for i, c in enumerate(joined) if c]
    means, maxes, lows = _encode([*texts, *(TURN_PREFIX + t for t in texts), *(joined[i] for i in with_context)])
    out = np.zeros((n, FEATURE_DIM), dtype=np.float32)
    out[:, :EMBED_DIM] = _unit(means[:n] + means[n : 2 * n])
    if with_context:
        out[with_context, EMBED_DIM : 2 * EMBED_DIM] = CONTEXT_WEIGHT * means[2 * n :]
    out[:, 2 * EMBED_DIM : 3 * EMBED_DIM] = maxes[:n]
    out[:, 3 * EMBED_DIM :] = lows[:n]
    return out


def with_words(words: WordGrams, texts: Sequence[str], embedded: np.ndarray) -> np.ndarray:
    """`[n, FEATURE_DIM + words.dim]`: the embedding features `embedded` of `texts`, then their word block."""
    return np.hstack([embedded, WORD_WEIGHT * words.transform(texts)])


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=1, keepdims=True)


@dataclass(frozen=True, eq=False)
class TaggerModel:
    coef: np.ndarray  # [n_classes, FEATURE_DIM + words.dim] float32
    intercept: np.ndarray  # [n_classes] float32
    classes: tuple[str, ...]
    threshold: float  # below this probability the label is NONE
    train_sha256: str  # of the training rows (tagger.train.train_sha256)
    words: WordGrams  # vocabulary and idf of the train turns
    metadata: Mapping[str, str] = field(default_factory=dict)  # C, versions, created

    def full_features(self, texts: Sequence[str], embedded: np.ndarray) -> np.ndarray:
        """The embedding features `embedded` of `texts` with this model's word block appended."""
        return with_words(self.words, texts, embedded)

    def probabilities(self, x: np.ndarray) -> np.ndarray:
        """`[n, n_classes]` class probabilities for full features `x` (`full_features`)."""
        logits = x.astype(np.float64) @ self.coef.T.astype(np.float64) + self.intercept.astype(np.float64)
        return _softmax(logits)

    def decide(self, probs: np.ndarray) -> Prediction:
        """Turn one row of probabilities into a prediction, applying the threshold."""
        order = np.argsort(-probs, kind="stable")
        best = self.classes[order[0]]
        confidence = float(probs[order[0]])
        label = NONE if best == NONE or confidence < self.threshold else best
        return Prediction(label, confidence, {self.classes[i]: float(probs[i]) for i in order})

    def predict_features(self, x: np.ndarray) -> list[Prediction]:
        return [self.decide(row) for row in self.probabilities(x)]

    def predict(self, text: str, context: Sequence[str] = ()) -> Prediction:
        return self.predict_many([text], [context])[0]

    def predict_many(self, texts: Sequence[str], contexts: Sequence[Sequence[str]] | None = None) -> list[Prediction]:
        if not texts:
            return []
        return self.predict_features(self.full_features(texts, features(texts, contexts)))

    def with_threshold(self, threshold: float) -> "TaggerModel":
        return replace(self, threshold=float(threshold))

    def save(self, path: Path) -> None:
        metadata = {k: str(v) for k, v in self.metadata.items()}
        metadata.update(
            _FEATURE_META,
            classes=json.dumps(list(self.classes)),
            threshold=repr(float(self.threshold)),
            train_sha256=self.train_sha256,
            vocabulary=json.dumps(list(self.words.vocabulary), ensure_ascii=False),
        )
        save_arrays(Path(path), {"coef": self.coef, "intercept": self.intercept, "idf": self.words.idf}, metadata)

    @classmethod
    def load(cls, path: Path) -> "TaggerModel":
        path = Path(path)
        meta, tensors = load_arrays(path, "no tagger model file", "tagger model", _RETRAIN)
        return _checked(path, meta, tensors)


def _checked(path: Path, meta: dict[str, str], tensors: dict[str, np.ndarray]) -> TaggerModel:
    """Build a model from a file's parts, refusing anything that does not fit the current code."""
    missing = [key for key in _REQUIRED_META if key not in meta] + [k for k in ("coef", "intercept", "idf") if k not in tensors]
    if missing:
        raise ModelLoadError(f"{path}: lacks {', '.join(missing)}; {_RETRAIN}")
    stale = [key for key, value in _FEATURE_META.items() if meta[key] != value]
    if stale:
        raise ModelLoadError(f"{path}: built for other features ({', '.join(stale)} differ); {_RETRAIN}")
    try:
        classes = tuple(str(c) for c in json.loads(meta["classes"]))
        threshold = float(meta["threshold"])
        words = WordGrams(tuple(str(g) for g in json.loads(meta["vocabulary"])), tensors["idf"])
    except (ValueError, TypeError):
        raise ModelLoadError(f"{path}: metadata 'classes', 'threshold' or 'vocabulary' is malformed; {_RETRAIN}") from None
    coef, intercept = tensors["coef"], tensors["intercept"]
    if sorted(classes) != sorted(CLASSES):
        raise ModelLoadError(f"{path}: classes {classes} are not {CLASSES}; {_RETRAIN}")
    if coef.shape != (len(classes), FEATURE_DIM + words.dim) or intercept.shape != (len(classes),):
        raise ModelLoadError(f"{path}: weights have shapes {coef.shape} and {intercept.shape}; {_RETRAIN}")
    if not (np.isfinite(coef).all() and np.isfinite(intercept).all() and np.isfinite(words.idf).all() and 0.0 <= threshold <= 1.0):
        raise ModelLoadError(f"{path}: non-finite weights or a threshold outside [0, 1]; {_RETRAIN}")
    extra = {k: v for k, v in meta.items() if k not in _REQUIRED_META}
    return TaggerModel(coef, intercept, classes, threshold, meta["train_sha256"], words, extra)


def default_model_path() -> Path:
    """The checked-in model, trained by `python -m tagger.train`."""
    return Path(__file__).resolve().parent / "model" / "classifier.safetensors"


@lru_cache(maxsize=1)
def load_default() -> TaggerModel:
    return TaggerModel.load(default_model_path())


# --- JSONL -------------------------------------------------------------------------------


def read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """`(line number, object)` for each non-blank line; anything but a JSON object is a ConfigError."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise NotFoundError(f"{path} does not exist") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as exc:
            raise ConfigError(f"{path}:{number}: not valid JSON ({exc.args[0] if exc.args else exc})") from None
        if not isinstance(obj, dict):
            raise ConfigError(f"{path}:{number}: each line must be a JSON object")
        yield number, obj


def turn_fields(obj: Mapping[str, Any], where: str) -> tuple[str, tuple[str, ...]]:
    """`(text, context)` of one JSON turn; `where` ("file:line") prefixes the error."""
    text = obj.get("text")
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f'{where}: needs a non-empty string "text" field')
    context = obj.get("context", [])
    if not isinstance(context, list) or not all(isinstance(turn, str) for turn in context):
        raise ConfigError(f'{where}: "context" must be a list of strings (earlier turns, oldest first)')
    return text, tuple(context)


def tag_jsonl(path: Path, out: TextIO, model: TaggerModel | None = None) -> int:
    """Tag each `{"text", optional "context"}` line of `path`; write one JSON line each; return the count.

    Every line is checked before anything is written, so a bad line leaves `out` empty.
    """
    model = model if model is not None else load_default()
    turns = [turn_fields(obj, f"{path}:{number}") for number, obj in read_jsonl(path)]
    for start in range(0, len(turns), _BATCH):
        batch = turns[start : start + _BATCH]
        predictions = model.predict_many([t for t, _ in batch], [c for _, c in batch])
        for (text, _), p in zip(batch, predictions, strict=True):
            record = {
                "text": text,
                "label": p.label,
                "confidence": round(p.confidence, 6),
                "scores": {k: round(v, 6) for k, v in p.scores.items()},
            }
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
    return len(turns)
