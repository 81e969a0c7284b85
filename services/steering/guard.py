"""The theme guard: does a reply carry a theme that must not reach a child?

The fifteen themes (`vectors/guard/themes.json`, reviewed and checked in) each hold words,
phrases, masked harmless idioms and exemplar sentences. A text is flagged, in this order, when

- a listed word or phrase occurs in it (whole words, any case), unless the occurrence sits inside
  one of the theme's harmless idioms ("killed it at practice", "kill some time", "bloody brilliant"),
  and, for every theme but swearing (LISTS_ONLY), the harm model scores the text at its
  `list_confirm` or above: "Real guns are never toys; tell a grown-up" names a gun and means no
  harm, so a listed word is where to look, and the model says whether it is meant,
- or the harm model (`harm_model`, trained by `python -m steering.guard_train` on the tuning
  replies and the themes' exemplars) scores one of its sentences, or the whole text when it holds
  several, at its threshold or above. It reads each sentence through SmolLM2's own hidden states
  (`steering.reader`) and its words together, so it tells what a list cannot: "throw the kitten
  in the pond" from "the fox caught a rabbit", a wolf that eats a boy from the wolf that blows a
  house down, anger named to calm it from an urging to hit. Its hits are named for the closest
  exemplar's theme.

Where a word list cannot tell the cases apart, the lists stay out of it and the model decides:
"hit", "angry", "wolf", "dragon", "vampire", "secret" and "meet" are in no list. "bloody" is
listed as swearing, with its intensifier uses masked ("bloody good", "bloody freezing"), so its
gore sense ("a bloody knife") is flagged too, under profanity when no other theme catches it.
"kill" is listed, with time-killing and "could kill for" masked. Until 2026-12 the exemplars
also flagged a sentence whose all-MiniLM-L6-v2 embedding came close to one; out of fold that
route added almost nothing beside the model (README, "The theme guard"), and dropping
it keeps a sentence's check within its time.

`measure()` reports precision and recall on labelled replies.
"""

import json
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .coherence import DEGENERATE_REPEAT, repeat_rate
from .errors import ConfigError, NotFoundError
from .harm_model import HARM_MODEL_FILE, HarmModel
from .reader import SentenceReader, load_reader

THEMES_FILE = "themes.json"
LABELLED_FILE = "labelled.jsonl"
# A sentence ends at . ! ? (with closing quotes) or a line break.
_SENTENCE_END = re.compile(r"""(?<=[.!?])["')\]]*\s+|\n+""")
# A growing reply has completed a sentence when its text ends like this.
_ENDS_SENTENCE = re.compile(r"""[.!?]["')\]]*\s*$|\n\s*$""")
LISTS_ONLY = ("profanity",)  # themes the lists alone decide: the model does not learn swearing
LOOP_MIN_WORDS = 12  # fewer words than this are too short to call a loop
SENTENCE_REPEATS_MAX = 2  # the same sentence a third time in one reply is a loop


@dataclass(frozen=True)
class Theme:
    name: str
    pattern: re.Pattern[str] | None  # words and phrases, whole words, any case
    idioms: re.Pattern[str] | None  # harmless uses of a listed word, masked before matching

    def list_hit(self, text: str) -> re.Match[str] | None:
        """The first listed word or phrase in `text` outside the theme's harmless idioms."""
        masked = self.idioms.sub(" ", text) if self.idioms else text
        return self.pattern.search(masked) if self.pattern else None


@dataclass(frozen=True)
class Verdict:
    flagged: bool
    themes: tuple[str, ...] = ()
    reasons: tuple[str, ...] = ()  # what matched, for logs and the report: "violence_weapons list: 'gun'"
    loop: bool = False  # the reply repeats itself (check_reply only)

    @property
    def reason(self) -> str:
        return "themes" if self.themes else "repetition" if self.loop else ""


@dataclass(frozen=True)
class ThemeGuard:
    themes: tuple[Theme, ...]
    harm: HarmModel | None = None  # the learned layer; None only while it is being trained
    reader: SentenceReader | None = None  # reads the sentences for the harm model; set with it

    def check(self, text: str) -> Verdict:
        return self.check_many([text])[0]

    def check_reply(self, sent: str, new: str) -> Verdict:
        """A growing reply: `sent` already passed, `new` is about to be sent. The lists run over
        the whole reply (a phrase may straddle the two), the harm model over the new sentences
        (with the unfinished one `sent` ends in), and the whole reply must not have fallen into a loop."""
        reply = sent + new
        sentences, earlier = split_sentences(new), split_sentences(sent)
        tail = earlier[-1] if earlier and not ends_sentence(sent) else ""
        read = tail + new
        verdict = self._verdict(reply, scored_units(read, split_sentences(read)))
        if verdict.flagged:
            return verdict
        rate = repeat_rate(reply) if len(reply.split()) >= LOOP_MIN_WORDS else 0.0
        if rate > DEGENERATE_REPEAT:
            return Verdict(True, (), (f"repetition: {rate:.2f} of word trigrams repeat",), loop=True)
        # Short loops ("What's your own?", a line of one emoji) repeat whole sentences.
        seen = Counter(_normalised(x) for x in earlier)
        for sentence in sentences:
            key = _normalised(sentence)
            if key and seen[key] >= SENTENCE_REPEATS_MAX:
                return Verdict(True, (), (f"repetition: {sentence!r} a third time",), loop=True)
            seen[key] += 1
        return verdict

    def check_many(self, texts: Sequence[str]) -> list[Verdict]:
        return [self._verdict(t, scored_units(t, split_sentences(t))) for t in texts]

    def list_hits(self, text: str) -> list[tuple[str, str]]:
        """(theme, the words) for every theme whose lists match `text`."""
        hits = ((theme.name, theme.list_hit(text)) for theme in self.themes)
        return [(name, hit.group(0)) for name, hit in hits if hit]

    def _verdict(self, text: str, units: list[str]) -> Verdict:
        """`units`: what the harm model reads (`scored_units`). The lists, then the model, which
        also says whether a listed word of a theme it learns is meant."""
        hits = self.list_hits(text)
        if self.harm is None or self.reader is None or not units:
            return _listed(hits)  # without the model a listed word is all there is
        sure = [(t, w) for t, w in hits if t in LISTS_ONLY]
        if sure:
            return _listed(sure)
        features = self.reader.read(units)
        scores = self.harm.scores(units, features)
        best = int(np.argmax(scores))
        if hits and scores[best] >= self.harm.list_confirm:
            return Verdict(True, tuple(t for t, _ in hits),
                           tuple(f"{t} list: {w!r}, model {float(scores[best]):.2f}" for t, w in hits))
        if scores[best] < self.harm.threshold:
            return Verdict(False)
        theme = self.harm.theme_of(features[best])
        return Verdict(True, (theme,), (f"{theme} model: {units[best]!r} ({float(scores[best]):.2f})",))


def _listed(hits: list[tuple[str, str]]) -> Verdict:
    """Flagged by these list hits (theme, words) alone; not flagged when there are none."""
    return Verdict(bool(hits), tuple(t for t, _ in hits), tuple(f"{t} list: {w!r}" for t, w in hits))


def scored_units(text: str, sentences: list[str]) -> list[str]:
    """What the harm model reads: each sentence, and the whole text when it
    holds more than one (a request can be split over two sentences: "Which park? Near your house?")."""
    return [*sentences, text.strip()] if len(sentences) > 1 else list(sentences)


def _normalised(sentence: str) -> str:
    return " ".join(sentence.lower().split()).strip(" .!?,;:\"'")


def ends_sentence(text: str) -> bool:
    return bool(_ENDS_SENTENCE.search(text))


def split_sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(text) if s.strip()]


def holds_sentence(text: str) -> bool:
    """`text` ends a sentence, or holds a whole one and has begun the next."""
    return ends_sentence(text) or len(split_sentences(text)) > 1


def _alternation(items: Sequence[str]) -> re.Pattern[str] | None:
    items = [i.strip() for i in items if i.strip()]
    if not items:
        return None
    # Longest first so "shot dead" wins over "shot"; spaces match any run of whitespace.
    body = "|".join(re.escape(i).replace(r"\ ", r"\s+") for i in sorted(set(items), key=len, reverse=True))
    return re.compile(rf"(?<![\w'])(?:{body})(?![\w'])", re.IGNORECASE)


def load_guard(guard_dir: Path, harm_model: bool = True) -> ThemeGuard:
    """The guard in `guard_dir`; `harm_model=False` leaves out the learned layer (its training
    measures what the lists already catch)."""
    path = Path(guard_dir) / THEMES_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise NotFoundError(f"the theme guard's file {path} does not exist") from None
    except ValueError as exc:
        raise ConfigError(f"{path} is not valid JSON: {exc}") from None
    raw, safe = data.get("themes"), data.get("safe_exemplars")
    if not isinstance(raw, dict) or not raw or not isinstance(safe, list) or not safe:
        raise ConfigError(f"{path} needs a non-empty 'themes' object and 'safe_exemplars' (a non-empty list)")
    # Before the reader loads: a missing or damaged model fails at once.
    harm = HarmModel.load(Path(guard_dir) / HARM_MODEL_FILE) if harm_model else None
    themes = []
    for name, spec in raw.items():
        if not spec.get("exemplars"):  # the harm model learns from them and names its hits by them
            raise ConfigError(f"{path}: theme {name!r} has no exemplar sentences")
        themes.append(Theme(
            name=name,
            pattern=_alternation([*spec.get("words", []), *spec.get("phrases", [])]),
            idioms=_alternation(spec.get("idioms", [])),
        ))
    reader = None
    if harm is not None:
        reader = load_reader()
        harm.check_reader(reader.name, reader.fingerprint)
    return ThemeGuard(tuple(themes), harm, reader)


@dataclass(frozen=True)
class GuardMeasure:
    precision: float
    recall: float
    flagged: int  # labelled flagged
    harmless: int  # labelled harmless
    true_positives: int
    false_positives: list[str]
    misses: list[str]
    recall_by_theme: dict[str, float]

    def as_dict(self) -> dict:
        return {
            "precision": round(self.precision, 4), "recall": round(self.recall, 4),
            "flagged": self.flagged, "harmless": self.harmless, "true_positives": self.true_positives,
            "false_positives": self.false_positives, "misses": self.misses,
            "recall_by_theme": {k: round(v, 4) for k, v in self.recall_by_theme.items()},
        }


def load_labelled(guard_dir: Path, name: str = LABELLED_FILE) -> list[dict]:
    lines = (Path(guard_dir) / name).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def measure(guard: ThemeGuard, labelled: Sequence[dict]) -> GuardMeasure:
    verdicts = guard.check_many([row["text"] for row in labelled])
    tp = [r for r, v in zip(labelled, verdicts) if r["flag"] and v.flagged]
    fp = [r["text"] for r, v in zip(labelled, verdicts) if not r["flag"] and v.flagged]
    misses = [r["text"] for r, v in zip(labelled, verdicts) if r["flag"] and not v.flagged]
    positives = [r for r in labelled if r["flag"]]
    by_theme: dict[str, float] = {}
    for theme in sorted({r["theme"] for r in positives}):
        rows = [r for r in positives if r["theme"] == theme]
        by_theme[theme] = sum(r in tp for r in rows) / len(rows)
    flagged = len(tp) + len(fp)
    return GuardMeasure(
        precision=len(tp) / flagged if flagged else 1.0,
        recall=len(tp) / len(positives) if positives else 1.0,
        flagged=len(positives),
        harmless=len(labelled) - len(positives),
        true_positives=len(tp),
        false_positives=fp,
        misses=misses,
        recall_by_theme=by_theme,
    )
