"""`python -m steering.guard_train`: fit the theme guard's harm model on the tuning replies.

The training rows are those of TRAIN_FILES in `vectors/guard/`, with the themes' exemplars
(harmful) and the safe exemplars (harmless) of `themes.json`. `former_heldout.jsonl`,
`second_heldout.jsonl`, `third_heldout.jsonl` and `fourth_heldout.jsonl` were the first four
held-apart sets, each until it had been measured three or four times; they are tuning data now.
The held-apart sets, `sixth_heldout.jsonl` and `unsteered_heldout.jsonl`, are never read here, nor
is NEXT_TRAIN_FILES: the fifth set, measured four times, stays apart while it holds the only
held-apart rows of the `sexual` theme, and joins the tuning data once a fresh set measures that
theme. Profanity rows are left out: swearing is the lists' job, and the reader sees a sentence's
topic, not its words.

What is chosen (the words' weight beside the meaning, the threshold, and the score at which the
model confirms a listed word of a theme it learns) is chosen on out-of-fold scores, 5-fold
stratified by theme and repeated three times with fixed seeds, together with what the lists
catch: the pair that reaches the most recall at a cross-validated precision of at least
TARGET_PRECISION, with the highest threshold that reaches it. The model is then refitted
on every row and written atomically to `vectors/guard/harm_model.safetensors`.
"""

import argparse
import hashlib
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import sklearn
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import RepeatedStratifiedKFold
from sklearn.svm import SVC

from .errors import ConfigError, SteeringError
from .guard import LISTS_ONLY, THEMES_FILE, load_guard, load_labelled, scored_units, split_sentences
from .harm_model import HARM_MODEL_FILE, HarmModel, combine, standardise
from .reader import load_reader
from .settings import paths_from_env
from .words import WordGrams

TRAIN_FILES = (
    "tuning.jsonl", "tuning_extra.jsonl", "tuning_more.jsonl", "tuning_weak.jsonl", "former_heldout.jsonl", "second_heldout.jsonl",
    "third_heldout.jsonl", "tuning_near.jsonl", "tuning_fresh.jsonl", "labelled.jsonl", "model_replies.jsonl",
    "unsteered_replies.jsonl", "unsteered_replies_more.jsonl", "fourth_heldout.jsonl", "tuning_stories.jsonl",
    "tuning_horror.jsonl", "tuning_people.jsonl",
)
HELD_APART_FILE = "sixth_heldout.jsonl"  # the labelled set the guard is measured on, never trained on
# Not trained on yet and still measured (the fifth set alone measures `sexual`): tuning data later.
NEXT_TRAIN_FILES = ("fifth_heldout.jsonl",)
SVM_CS = (4.0, 16.0)  # the machine's regularisation, chosen by cross-validation
WORD_C = 8.0
WORD_WEIGHTS = (0.25, 0.5, 1.0)
TARGET_PRECISION = 0.95
FOLDS, REPEATS = 5, 3


def load_rows(guard_dir: Path) -> list[dict]:
    rows = []
    for name in TRAIN_FILES:
        for number, row in enumerate(load_labelled(guard_dir, name), 1):
            if not isinstance(row.get("text"), str) or not isinstance(row.get("flag"), bool):
                raise ConfigError(f"{guard_dir / name}:{number}: needs a 'text' string and a 'flag' true or false")
            if row["flag"] and not isinstance(row.get("theme"), str):
                raise ConfigError(f"{guard_dir / name}:{number}: a flagged row needs its 'theme'")
            rows.append({"text": row["text"], "flag": row["flag"], "theme": row.get("theme") if row["flag"] else None, "file": name})
    return rows


def train_sha256(rows: Sequence[dict], themes_text: str) -> str:
    # The themes file by content, not layout: re-wrapping a list does not stale the model.
    digest = hashlib.sha256(json.dumps(json.loads(themes_text), sort_keys=True, ensure_ascii=False).encode())
    for row in rows:
        digest.update((json.dumps([row["file"], row["text"], row["flag"], row["theme"]], ensure_ascii=False) + "\n").encode())
    return digest.hexdigest()


def guard_sha256(guard_dir: Path) -> str:
    """What the saved model records: a test compares it with the data of now."""
    return train_sha256(load_rows(guard_dir), (Path(guard_dir) / THEMES_FILE).read_text(encoding="utf-8"))


def _fit(x: np.ndarray, texts: Sequence[str], y: np.ndarray, c: float) -> tuple[SVC, WordGrams, LogisticRegression]:
    svm = SVC(C=c, kernel="rbf", gamma="scale", class_weight="balanced").fit(x, y)
    words = WordGrams.fit(texts)
    logistic = LogisticRegression(C=WORD_C, max_iter=5000, class_weight="balanced").fit(words.transform(texts), y)
    return svm, words, logistic


def _samples(idx: Sequence[int], rows: Sequence[dict], units: Sequence[list[str]], vectors: Sequence[np.ndarray],
             fixed: tuple[np.ndarray, list[str], np.ndarray]) -> tuple[np.ndarray, list[str], np.ndarray]:
    """A flagged row teaches with its whole text; a harmless one with every sentence as well."""
    xs, texts, ys = [fixed[0]], list(fixed[1]), [fixed[2]]
    for i in idx:
        row = rows[i]
        if row["theme"] in LISTS_ONLY:
            continue
        us, vs = units[i], vectors[i]
        keep = range(len(us)) if not row["flag"] else [len(us) - 1]  # the last unit is the whole text
        xs.append(vs[list(keep)])
        texts += [us[k] for k in keep]
        ys.append(np.full(len(keep), int(row["flag"])))
    return np.vstack(xs), texts, np.concatenate(ys)


def _unit_scores(svm: SVC, words: WordGrams, logistic: LogisticRegression, us: list[str], vs: np.ndarray) -> np.ndarray:
    """[units, 2]: the machine's decision value and the words' logit."""
    return np.stack([svm.decision_function(vs), logistic.decision_function(words.transform(us))], axis=1)


def text_score(unit_scores: np.ndarray, weight: float) -> float:
    """A text's harm score: its most harmful unit's, from `_unit_scores`."""
    return float(combine(unit_scores[:, 0], unit_scores[:, 1], weight).max())


def choose_threshold(scores: np.ndarray, y: np.ndarray, rules: np.ndarray,
                     target: float = TARGET_PRECISION) -> tuple[float, float, float]:
    """(threshold, recall, precision): the most recall at precision >= `target`, with the highest
    threshold that reaches it."""
    best = (float(np.max(scores)) + 1.0, 0.0, 1.0)
    for t in np.unique(scores):
        flagged = rules | (scores >= t)
        tp = int((flagged & y).sum())
        precision = tp / max(1, int(flagged.sum()))
        recall = tp / max(1, int(y.sum()))
        if precision >= target and (recall > best[1] or (recall == best[1] and t > best[0])):
            best = (float(t), recall, precision)
    return best


def choose_operating_point(scores: np.ndarray, y: np.ndarray, sure: np.ndarray, listed: np.ndarray,
                           target: float = TARGET_PRECISION) -> tuple[float, float, float, float]:
    """(threshold, list_confirm, recall, precision): where the lists' hits of themes the model
    learns (`listed` but not `sure`) flag only at a score of list_confirm or more, the pair that
    reaches the most recall at precision >= `target` (then the most precision)."""
    doubtful = scores[listed & ~sure]
    confirms = [float("-inf")] + (sorted(set(np.quantile(doubtful, np.linspace(0, 1, 41)).tolist())) if len(doubtful) else [])
    best = (float(np.max(scores)) + 1.0, float("-inf"), 0.0, 1.0)
    for confirm in confirms:
        threshold, recall, precision = choose_threshold(scores, y, sure | (listed & (scores >= confirm)), target)
        if (recall, precision) > (best[2], best[3]):
            best = (threshold, confirm, recall, precision)
    return best


def report_lines(rows: Sequence[dict], flagged: np.ndarray) -> list[str]:
    y = np.array([r["flag"] for r in rows])
    tp, fp = int((flagged & y).sum()), int((flagged & ~y).sum())
    lines = [f"  all {len(rows)} rows: precision {tp / max(1, tp + fp):.3f}, recall {tp / max(1, int(y.sum())):.3f}, "
             f"{fp} false positives of {int((~y).sum())} harmless"]
    for name in TRAIN_FILES:
        m = np.array([r["file"] == name for r in rows])
        t, f = int((flagged & y & m).sum()), int((flagged & ~y & m).sum())
        lines.append(f"  {name}: precision {t / max(1, t + f):.3f}, recall {t / max(1, int((y & m).sum())):.3f}, {f} false positives")
    themes = sorted({r["theme"] for r in rows if r["flag"]})
    per = {t: float(np.mean([flagged[i] for i, r in enumerate(rows) if r["theme"] == t])) for t in themes}
    lines.append("  recall by theme: " + ", ".join(f"{t} {v:.2f}" for t, v in per.items()))
    return lines


@dataclass(frozen=True)
class TrainingSet:
    """The tuning rows as the harm model learns from them and is scored on them."""

    rows: list[dict]
    themes_text: str
    fixed: tuple[np.ndarray, list[str], np.ndarray]  # the exemplars: standardised features, texts, labels
    exemplar_themes: list[str]  # the harmful exemplars' themes (they come first in `fixed`)
    units: list[list[str]]  # per row, what the guard scores (scored_units)
    vectors: list[np.ndarray]  # per row, its units' standardised reader features
    feature_mean: np.ndarray  # the standardisation, over every unit and exemplar (no labels in it)
    feature_scale: np.ndarray
    rules: np.ndarray  # per row, whether the lists alone flag it
    sure: np.ndarray  # per row, whether a theme the lists alone decide (LISTS_ONLY) flags it
    y: np.ndarray  # per row, whether it must be flagged
    strata: list[str]  # per row, its theme or "harmless" (the folds' strata)


def per_row(units: Sequence[list[str]], flat: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    """Features of every row's units then of the exemplars `[n, d]`, as each row's and the exemplars'."""
    offsets = np.cumsum([0] + [len(us) for us in units])
    return [flat[offsets[i] : offsets[i + 1]] for i in range(len(units))], flat[offsets[-1] :]


def training_set(guard_dir: Path, read: Callable[[list[str]], np.ndarray] | None = None) -> TrainingSet:
    """`read`: the texts' features `[n, d]`, in place of the reader's (a script that scores
    features it read before passes a reading it will not use)."""
    guard_dir = Path(guard_dir)
    rows = load_rows(guard_dir)
    themes_text = (guard_dir / THEMES_FILE).read_text(encoding="utf-8")
    spec = json.loads(themes_text)
    rules_guard = load_guard(guard_dir, harm_model=False)
    harmful = [(name, e) for name, t in spec["themes"].items() if name not in LISTS_ONLY for e in t["exemplars"]]
    fixed_texts = [e for _, e in harmful] + list(spec["safe_exemplars"])
    units = [scored_units(r["text"], split_sentences(r["text"])) or [r["text"].strip()] for r in rows]
    raw = (read or load_reader().read)([u for us in units for u in us] + fixed_texts)
    mean, scale = raw.mean(0), np.maximum(raw.std(0), 1e-6)
    flat = standardise(raw, mean, scale)
    vectors, exemplars = per_row(units, flat)
    fixed = (exemplars, fixed_texts, np.array([1] * len(harmful) + [0] * len(spec["safe_exemplars"])))
    hits = [rules_guard.list_hits(r["text"]) for r in rows]
    rules = np.array([bool(h) for h in hits])
    sure = np.array([any(t in LISTS_ONLY for t, _ in h) for h in hits])
    return TrainingSet(rows, themes_text, fixed, [name for name, _ in harmful], units, vectors, mean, scale, rules,
                       sure, np.array([r["flag"] for r in rows]), [r["theme"] or "harmless" for r in rows])


def out_of_fold(data: TrainingSet, c: float, repeats: int = REPEATS, features: np.ndarray | None = None) -> list[np.ndarray]:
    """Per row, its units' scores (`_unit_scores`) from models fitted without it, averaged over
    the repeats of the stratified folds. `features`: standardised features of every unit then
    every exemplar, in place of the reader's (the scripts that weigh other readers)."""
    vectors, fixed = data.vectors, data.fixed
    if features is not None:
        vectors, exemplars = per_row(data.units, features)
        fixed = (exemplars, data.fixed[1], data.fixed[2])
    oof = [np.zeros((len(us), 2)) for us in data.units]
    folds = RepeatedStratifiedKFold(n_splits=FOLDS, n_repeats=repeats, random_state=0)
    for train_idx, test_idx in folds.split(np.zeros(len(data.rows)), data.strata):
        svm, words, logistic = _fit(*_samples(train_idx, data.rows, data.units, vectors, fixed), c)
        for i in test_idx:
            oof[i] += _unit_scores(svm, words, logistic, data.units[i], vectors[i]) / repeats
    return oof


def train(guard_dir: Path, show: bool = False, target: float = TARGET_PRECISION) -> tuple[HarmModel, list[str]]:
    data = training_set(guard_dir)
    rows, themes_text, fixed, units, vectors = data.rows, data.themes_text, data.fixed, data.units, data.vectors
    rules, sure, y = data.rules, data.sure, data.y
    fixed_texts = fixed[1]

    choices = []
    for c in SVM_CS:
        oof = out_of_fold(data, c)
        for weight in WORD_WEIGHTS:
            scores = np.array([text_score(s, weight) for s in oof])
            choices.append((*choose_operating_point(scores, y, sure, rules, target), weight, c, scores))
    threshold, confirm, recall, precision, weight, svm_c, scores = max(choices, key=lambda ch: (ch[2], ch[3]))
    flagged = sure | (rules & (scores >= confirm)) | (scores >= threshold)
    curve = [(p, *choose_operating_point(scores, y, sure, rules, p)[:3]) for p in (0.85, 0.9, 0.92, 0.95, 0.97)]
    lines = [f"trained on {len(rows)} rows ({', '.join(TRAIN_FILES)}) and {len(fixed_texts)} exemplars; "
             f"svm C {svm_c}, word weight {weight}, threshold {threshold:.3f}, a listed word confirmed at {confirm:.3f}",
             "lists alone (no model), on every row:"] + report_lines(rows, rules) + [
             f"the guard with the model, out of fold ({FOLDS}-fold x {REPEATS}):"] + report_lines(rows, flagged) + [
             "  recall at a precision of at least: "
             + ", ".join(f"{p} -> {r:.3f} (threshold {t:.2f}, lists confirmed at {c:.2f})" for p, t, c, r in curve)]
    if show:
        lines += [f"  FP  {scores[i]:6.2f} {rows[i]['text'][:110]!r}" for i in np.flatnonzero(flagged & ~y)]
        lines += [f"  MISS {scores[i]:6.2f} {rows[i]['theme']}: {rows[i]['text'][:110]!r}" for i in np.flatnonzero(~flagged & y)]

    x, texts, ty = _samples(range(len(rows)), rows, units, vectors, fixed)
    svm, words, logistic = _fit(x, texts, ty, svm_c)
    reader = load_reader()
    model = HarmModel(
        support=svm.support_vectors_.astype(np.float32), dual_coef=svm.dual_coef_[0].astype(np.float32),
        gamma=float(svm._gamma), svm_intercept=float(svm.intercept_[0]), words=words,
        word_coef=logistic.coef_[0].astype(np.float32), word_intercept=float(logistic.intercept_[0]),
        word_weight=float(weight), threshold=threshold, list_confirm=confirm, train_sha256=train_sha256(rows, themes_text),
        feature_mean=data.feature_mean.astype(np.float32), feature_scale=data.feature_scale.astype(np.float32),
        exemplars=fixed[0][: len(data.exemplar_themes)].astype(np.float32), exemplar_themes=tuple(data.exemplar_themes),
        reader=reader.name, reader_fingerprint=reader.fingerprint,
        metadata={"train_rows": str(len(rows)), "cv_precision": f"{precision:.4f}", "cv_recall": f"{recall:.4f}",
                  "svm_C": str(svm_c), "word_C": str(WORD_C), "sklearn_version": sklearn.__version__,
                  "trained_at": datetime.now(timezone.utc).isoformat(timespec="seconds")},
    )
    # The numpy scorer, from the reader's raw features, must agree with scikit-learn's on what it was fitted on.
    check = model.scores(fixed_texts[:50], reader.read(fixed_texts[:50]))
    expect = combine(svm.decision_function(fixed[0][:50]), logistic.decision_function(words.transform(fixed_texts[:50])), weight)
    if not np.allclose(check, expect, atol=1e-3):
        raise SteeringError(f"the saved harm model scores differ from scikit-learn's by {np.abs(check - expect).max():.4f}")
    return model, lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m steering.guard_train", description=__doc__.splitlines()[0])
    parser.add_argument("--guard-dir", type=Path, default=None, help="default: the vector store's guard/")
    parser.add_argument("--no-save", action="store_true", help="report the cross-validation, write nothing")
    parser.add_argument("--precision", type=float, default=TARGET_PRECISION,
                        help=f"the cross-validated precision the threshold must keep (default {TARGET_PRECISION})")
    parser.add_argument("--show", action="store_true", help="list the out-of-fold false positives and misses")
    args = parser.parse_args(argv)
    guard_dir = args.guard_dir or paths_from_env().guard
    try:
        model, lines = train(guard_dir, show=args.show, target=args.precision)
        if not args.no_save:
            model.save(guard_dir / HARM_MODEL_FILE)
    except SteeringError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print("\n".join(lines))
    print(f"saved {guard_dir / HARM_MODEL_FILE}" if not args.no_save else "not saved (--no-save)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
