"""The theme guard: does a reply carry a theme that must not reach a child?

The fifteen themes (`vectors/guard/themes.json`, reviewed and checked in) each hold words,
phrases, masked harmless idioms and exemplar sentences. A text is flagged, in this order, when

- a listed word or phrase occurs in it (whole words, any case), unless the occurrence sits inside
  one of the theme's harmless idioms ("killed it at practice", "kill some time", "bloody brilliant"),
- one of its sentences is close to one of the theme's exemplars: the cosine of their
  all-MiniLM-L6-v2 embeddings (the tagger's model) reaches the themes file's threshold, and beats
  the sentence's closest safe exemplar (a child's kind of sadness, dinosaurs, a costume, a
  storybook wolf) by the file's margin, kept wide so that this route stays precise, or
- the harm model (`harm_model`, trained by `python -m steering.guard_train`) scores one of its
  sentences, or the whole text when it holds several, at its threshold or above. It reads the
  meaning and the words together, so it tells what a list cannot: "throw the kitten in the pond"
  from "the fox caught a rabbit", a wolf that eats a boy from the wolf that blows a house down,
  anger named to calm it from an urging to hit. Its hits are named for the closest exemplar's theme.

Where a word list cannot tell the cases apart, the lists stay out of it and the model decides:
"hit", "angry", "wolf", "dragon", "vampire", "secret" and "meet" are in no list. "bloody" is
listed as swearing, with its intensifier uses masked ("bloody good", "bloody freezing"), so its
gore sense ("a bloody knife") is flagged too, under profanity when no other theme catches it.
"kill" is listed, with time-killing and "could kill for" masked.

`measure()` reports precision and recall on labelled replies.
"""

import json
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .coherence import DEGENERATE_REPEAT, repeat_rate
from .embedding import embed, embed_fixed
from .errors import ConfigError, NotFoundError
from .harm_model import HARM_MODEL_FILE, HarmModel

THEMES_FILE = "themes.json"
LABELLED_FILE = "labelled.jsonl"
# A sentence ends at . ! ? (with closing quotes) or a line break.
_SENTENCE_END = re.compile(r"""(?<=[.!?])["')\]]*\s+|\n+""")
# A growing reply has completed a sentence when its text ends like this.
_ENDS_SENTENCE = re.compile(r"""[.!?]["')\]]*\s*$|\n\s*$""")
LOOP_MIN_WORDS = 12  # fewer words than this are too short to call a loop
SENTENCE_REPEATS_MAX = 2  # the same sentence a third time in one reply is a loop


@dataclass(frozen=True)
class Theme:
    name: str
    pattern: re.Pattern[str] | None  # words and phrases, whole words, any case
    idioms: re.Pattern[str] | None  # harmless uses of a listed word, masked before matching
    exemplars: np.ndarray | None  # [n, 384], unit; None when the theme is matched by its lists only

    def list_hit(self, text: str) -> re.Match[str] | None:
        """The first listed word or phrase in `text` outside the theme's harmless idioms."""
        masked = self.idioms.sub(" ", text) if self.idioms else text
        return self.pattern.search(masked) if self.pattern else None


@dataclass(frozen=True)
class Verdict:
    flagged: bool
    themes: tuple[str, ...] = ()
    reasons: tuple[str, ...] = ()  # what matched, for logs and the report: "list: 'gun'", "like: 'The robber...' 0.71"
    loop: bool = False  # the reply repeats itself (check_reply only)

    @property
    def reason(self) -> str:
        return "themes" if self.themes else "repetition" if self.loop else ""


@dataclass(frozen=True)
class ThemeGuard:
    themes: tuple[Theme, ...]
    threshold: float  # exemplar cosine at which a sentence is flagged
    safe: np.ndarray  # [n, 384], unit: sentences a child may hear
    safe_margin: float  # how much closer to a theme's exemplar than to any safe one
    exemplar_texts: dict[str, list[str]] = field(default_factory=dict)
    harm: HarmModel | None = None  # the learned layer; None only while it is being trained

    def check(self, text: str) -> Verdict:
        return self.check_many([text])[0]

    def check_reply(self, sent: str, new: str) -> Verdict:
        """A growing reply: `sent` already passed, `new` is about to be sent. The lists run over
        the whole reply (a phrase may straddle the two), the exemplars and the harm model over
        the new sentences, and the whole reply must not have fallen into a loop."""
        reply = sent + new
        sentences = split_sentences(new)
        units = scored_units(new, sentences)
        verdict = self._verdict(reply, units, _embed(units), len(sentences))
        if verdict.flagged:
            return verdict
        rate = repeat_rate(reply) if len(reply.split()) >= LOOP_MIN_WORDS else 0.0
        if rate > DEGENERATE_REPEAT:
            return Verdict(True, (), (f"repetition: {rate:.2f} of word trigrams repeat",), loop=True)
        # Short loops ("What's your own?", a line of one emoji) repeat whole sentences.
        seen = Counter(_normalised(x) for x in split_sentences(sent))
        for sentence in sentences:
            key = _normalised(sentence)
            if key and seen[key] >= SENTENCE_REPEATS_MAX:
                return Verdict(True, (), (f"repetition: {sentence!r} a third time",), loop=True)
            seen[key] += 1
        return verdict

    def check_many(self, texts: Sequence[str]) -> list[Verdict]:
        """One verdict per text; all sentences of all texts are embedded in one batch."""
        sentences = [split_sentences(t) for t in texts]
        units = [scored_units(t, ss) for t, ss in zip(texts, sentences)]
        vectors = _embed([u for us in units for u in us])
        verdicts = []
        start = 0
        for text, ss, us in zip(texts, sentences, units):
            verdicts.append(self._verdict(text, us, vectors[start : start + len(us)], len(ss)))
            start += len(us)
        return verdicts

    def _verdict(self, text: str, units: list[str], vectors: np.ndarray, n_sentences: int) -> Verdict:
        """`units` are the sentences (the first `n_sentences`), then the text itself when it holds
        more than one; `vectors` their embeddings. Lists, then exemplars, then the harm model."""
        themes: list[str] = []
        reasons: list[str] = []
        sentences, sentence_vectors = units[:n_sentences], vectors[:n_sentences]
        safe_sims = (sentence_vectors @ self.safe.T).max(1) if n_sentences else np.zeros(0)
        for theme in self.themes:
            hit = theme.list_hit(text)
            if hit:
                themes.append(theme.name)
                reasons.append(f"{theme.name} list: {hit.group(0)!r}")
                continue
            if n_sentences and theme.exemplars is not None:
                sims = (sentence_vectors @ theme.exemplars.T).max(1)  # [sentences]: closest exemplar of the theme
                hits = (sims >= self.threshold) & (sims - safe_sims >= self.safe_margin)
                if hits.any():
                    best = int(np.argmax(np.where(hits, sims, -1.0)))
                    themes.append(theme.name)
                    reasons.append(f"{theme.name} like: {sentences[best]!r} ({float(sims[best]):.2f})")
        if not themes and self.harm is not None and units:
            scores = self.harm.scores(units, vectors)
            best = int(np.argmax(scores))
            if scores[best] >= self.harm.threshold:
                theme_name = self._nearest_theme(vectors[best])
                themes.append(theme_name)
                reasons.append(f"{theme_name} model: {units[best]!r} ({float(scores[best]):.2f})")
        return Verdict(bool(themes), tuple(themes), tuple(reasons))

    def _nearest_theme(self, vector: np.ndarray) -> str:
        """The model says how harmful, not which theme: name the theme of the closest exemplar."""
        named = [(float((t.exemplars @ vector).max()), t.name) for t in self.themes if t.exemplars is not None]
        return max(named)[1] if named else "harm"


def scored_units(text: str, sentences: list[str]) -> list[str]:
    """What the exemplars and the harm model read: each sentence, and the whole text when it
    holds more than one (a request can be split over two sentences: "Which park? Near your house?")."""
    return [*sentences, text.strip()] if len(sentences) > 1 else list(sentences)


def _embed(texts: list[str]) -> np.ndarray:
    return embed(texts) if texts else np.zeros((0, 384), dtype=np.float32)


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
    measures what the lists and exemplars already catch)."""
    path = Path(guard_dir) / THEMES_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise NotFoundError(f"the theme guard's file {path} does not exist") from None
    except ValueError as exc:
        raise ConfigError(f"{path} is not valid JSON: {exc}") from None
    raw = data.get("themes")
    threshold, margin, safe = data.get("similarity_threshold"), data.get("safe_margin"), data.get("safe_exemplars")
    if not isinstance(raw, dict) or not raw or not isinstance(threshold, (int, float)) or not 0 < threshold < 1:
        raise ConfigError(f"{path} needs a non-empty 'themes' object and a 'similarity_threshold' between 0 and 1")
    if not isinstance(margin, (int, float)) or not 0 <= margin < 1 or not isinstance(safe, list) or not safe:
        raise ConfigError(f"{path} needs 'safe_exemplars' (a non-empty list) and a 'safe_margin' between 0 and 1")
    # Before the exemplars are embedded: a missing or damaged model fails at once.
    harm = HarmModel.load(Path(guard_dir) / HARM_MODEL_FILE) if harm_model else None
    themes = []
    exemplar_texts = {}
    for name, spec in raw.items():
        exemplars = [str(e) for e in spec.get("exemplars", [])]
        if not exemplars:
            raise ConfigError(f"{path}: theme {name!r} has no exemplar sentences")
        exemplar_texts[name] = exemplars
        themes.append(Theme(
            name=name,
            pattern=_alternation([*spec.get("words", []), *spec.get("phrases", [])]),
            idioms=_alternation(spec.get("idioms", [])),
            # Profanity is a matter of words: an embedding sees the topic ("pick a colour") instead.
            exemplars=embed_fixed(exemplars) if spec.get("match_exemplars", True) else None,
        ))
    return ThemeGuard(tuple(themes), float(threshold), embed_fixed([str(x) for x in safe]), float(margin), exemplar_texts,
                      harm)


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
