"""Would an offline profanity classifier from PyPI beat the guard's profanity lists?

Measures the lists (`themes.json`, profanity, idioms masked as the guard masks them) against
alt-profanity-check (a linear model over words, trained on toxic comments; at several
probability thresholds) and better-profanity (a word list with spelling variants), alone and
each added to the lists: recall of the rows to flag for profanity, and how many other rows
each flags (harmful rows of other themes, which the guard flags anyway, and harmless rows,
which it must not).

The decision is made on the tuning rows (`guard_train.load_rows`). With `--held-apart` the
same figures are printed for the held-apart sets as well, for the record; they choose nothing.
The two packages are not the guard's dependencies, so install them beside it first:

    .venv/bin/python -m pip install --no-deps --target /tmp/profanity alt-profanity-check==1.9.1 better-profanity==0.7.0
    PYTHONPATH=/tmp/profanity .venv/bin/python scripts/guard_profanity_check.py --held-apart
"""

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "services")]

from steering.guard import load_guard, load_labelled  # noqa: E402
from steering.guard_train import HELD_APART_FILE, load_rows  # noqa: E402
from steering.settings import paths_from_env  # noqa: E402

THRESHOLDS = (0.5, 0.7, 0.9)


def measure(rows: Sequence[dict], detectors: dict[str, Callable[[list[str]], np.ndarray]]) -> list[str]:
    texts = [r["text"] for r in rows]
    harmful = np.array([r["flag"] for r in rows])
    profane = harmful & np.array([r.get("theme") == "profanity" for r in rows])
    other, harmless = harmful & ~profane, ~harmful
    lines = [f"  {len(rows)} rows: {profane.sum()} to flag for profanity, {other.sum()} other harmful, {harmless.sum()} harmless"]
    for name, detect in detectors.items():
        start = time.perf_counter()
        flagged = detect(texts)
        ms = (time.perf_counter() - start) * 1000 / len(texts)
        recall = f"{flagged[profane].mean():.3f}" if profane.any() else "-"
        lines.append(f"  {name:34s} profanity recall {recall:>5s}, other harmful flagged {flagged[other].sum():3d}, "
                     f"harmless flagged {flagged[harmless].sum():3d}  ({ms:.2f} ms a text)")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--held-apart", action="store_true", help="also print the figures on the held-apart sets")
    args = parser.parse_args(argv)
    try:
        from better_profanity import profanity
        from profanity_check import predict_prob
    except ImportError as exc:
        print(f"error: {exc.name} is not installed; see this script's docstring for the command", file=sys.stderr)
        return 1
    guard_dir = paths_from_env().guard
    theme = next(t for t in load_guard(guard_dir, harm_model=False).themes if t.name == "profanity")

    def lists(texts: list[str]) -> np.ndarray:
        return np.array([theme.list_hit(t) is not None for t in texts])

    def classifier(threshold: float) -> Callable[[list[str]], np.ndarray]:
        return lambda texts: np.asarray(predict_prob(texts)) >= threshold

    def word_list(texts: list[str]) -> np.ndarray:
        return np.array([profanity.contains_profanity(t) for t in texts])

    def with_lists(other: Callable[[list[str]], np.ndarray]) -> Callable[[list[str]], np.ndarray]:
        return lambda texts: lists(texts) | other(texts)

    profanity.load_censor_words()
    detectors: dict[str, Callable[[list[str]], np.ndarray]] = {"lists": lists}
    detectors |= {f"alt-profanity-check >= {t}": classifier(t) for t in THRESHOLDS}
    detectors["better-profanity"] = word_list
    detectors |= {f"lists or alt-profanity-check >= {t}": with_lists(classifier(t)) for t in THRESHOLDS}
    detectors["lists or better-profanity"] = with_lists(word_list)

    sets = {"tuning rows (what decides)": load_rows(guard_dir)}
    if args.held_apart:
        sets |= {name: load_labelled(guard_dir, name) for name in (HELD_APART_FILE, "unsteered_heldout.jsonl")}
    for name, rows in sets.items():
        print(f"{name}:")
        print("\n".join(measure(rows, detectors)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
