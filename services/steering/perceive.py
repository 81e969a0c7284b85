"""`steer perceive`: does the steering register with a listener? A blinded pairwise judge.

For each concept and mode Blip can serve it in, replies to held-out child turns are sampled
steered (or instructed) and plain, in pairs that share the turn and the seed: both arms are
one batch each with the same rows, seed and settings. Another model, never the one judged,
is asked which reply of a pair sounds more <concept>, once with the steered reply as A and
once as B; its choice is read from its next-token logits for "A" and "B", not from text.

Every generated reply and every judged pair is appended to a progress file as it is made,
so a killed run loses at most the pairs in flight and a re-run carries on from there.
"""

import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from .atomic import atomic_path, write_text_atomic
from .batch import prefill
from .config import SteerConfig
from .binomial import wilson
from .errors import ConfigError, NotFoundError
from .generate import GenerationSettings, PromptLike, generate, render_prompt
from .hooks import RowSteering
from .loading import LoadedModel
from .pairs import load_concept
from .profiles import BLIP_ALLOWLIST
from .questions import question
from .record import Steerability, assess, decide, read_record, record_replies
from .settings import Paths
from .validate_model import model_vectors
from .vector import ConceptVector
from .vocabulary import REPLY_MODES, instructed

# The judge's reply is begun for it, and its next token read: " A" or " B". Begun this way the
# 1.5B chose "A" in 48% of 48 judgments of written pairs (the two orders agreeing in 79%),
# against 90% (21%) when asked to answer with a bare letter; both picked the register's reply
# in 23 of 24 pairs once the orders are averaged.
ANSWER_START = "The answer is"
_LETTERS = (" A", " B")
# (turn, the reply in the concept's register, a plain reply): written pairs whose answer is known
Written = tuple[str, str, str]
JUDGE_SYSTEM = "You compare two replies that a children's companion gave to a seven-year-old. Judge only how they sound."


@dataclass(frozen=True)
class PairSet:
    """One concept in one mode: how its steered reply is made."""

    concept: str
    mode: str  # steer (vector only), prompt (instruction only), both
    alpha: float | None  # None in prompt mode
    row: RowSteering | None  # the steered reply's steering; None in prompt mode
    instruction: str  # appended to the system prompt for the steered reply; "" in steer mode

    @property
    def key(self) -> str:
        return f"{self.concept}/{self.mode}"


@dataclass(frozen=True)
class PerceiveSettings:
    turns: tuple[str, ...]
    system_prompt: str  # Blip's, as Chat speaks
    seed: int = 0
    max_new_tokens: int = 40  # about two short sentences: what Blip says in one breath
    temperature: float = 0.8
    judge_batch: int = 4  # pairs per judge forward pass (both orders: twice as many rows)


def _messages(system: str, turn: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": system}, {"role": "user", "content": turn}]


def judge_messages(turn: str, first: str, second: str, concept: str) -> list[dict[str, str]]:
    user = (f'The child said: "{turn}"\n\nReply A: "{first.strip()}"\n\nReply B: "{second.strip()}"\n\n'
            f"{question(concept)} Answer with one letter: A or B.")
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": user},
            {"role": "assistant", "content": ANSWER_START}]


def letter_ids(judge: LoadedModel) -> tuple[int, int]:
    """The judge's token ids for " A" and " B" after ANSWER_START; refused unless each is one token of its own."""
    ids = [judge.tokenizer.encode(letter, add_special_tokens=False) for letter in _LETTERS]
    if any(len(i) != 1 for i in ids) or ids[0] == ids[1]:
        raise ConfigError(f"judge {judge.name}: its tokenizer does not spell A and B as two single tokens ({ids})")
    return ids[0][0], ids[1][0]


def refuse_self_judging(model: LoadedModel, judge: LoadedModel) -> None:
    """A model never judges its own replies, nor does a copy of it (same weights, e.g. its twin)."""
    if judge.name == model.name or judge.fingerprint == model.fingerprint or judge.entry.source == model.entry.source:
        raise ConfigError(f"the judge {judge.name} is {model.name} itself or made from the same weights; "
                          "choose another registered instruct model (--judge)")


def written_checks(pairs_dir: Path, concepts: Sequence[str], n: int) -> dict[str, list[Written]]:
    """`n` of each concept's derivation pairs, spread over its file: (context, positive, negative)."""
    out = {}
    for concept in sorted(set(concepts)):
        pairs = load_concept(pairs_dir, concept).pairs
        step = max(1, len(pairs) // n) if n else 1
        out[concept] = [(p.context, p.positive, p.negative) for p in pairs[::step][:n]]
    return out


def load_turns(eval_dir: Path) -> tuple[str, ...]:
    """The held-out child turns (`perceive_turns.jsonl`: none is a derivation pair's context or a gate prompt)."""
    path = Path(eval_dir) / "perceive_turns.jsonl"
    try:
        return tuple(json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    except FileNotFoundError:
        raise NotFoundError(f"the held-out turns {path} do not exist") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path}: each line must be a JSON object with a \"text\" ({exc})") from None


def blip_sets(model: LoadedModel, paths: Paths, concepts: Sequence[str] | None, modes: Sequence[str]) -> list[PairSet]:
    """The sets to judge on `model`, from its validation record: `concepts` (default: every one
    Blip serves) in each of `modes` the record supports."""
    model_dir = paths.model_vectors(model.name)
    vectors, _ = model_vectors(model, paths)
    steerability = assess(model.name, model_dir, model.fingerprint, vectors)
    if not steerability.steerable:
        raise ConfigError(f"{model.name} is not steerable: {steerability.reason}")
    record = read_record(model_dir, model.name)
    if concepts is None:
        concepts = sorted(c for c in BLIP_ALLOWLIST if c in steerability.concepts and steerability.concepts[c].blip is not None)
    unknown = sorted(set(concepts) - BLIP_ALLOWLIST)
    if unknown:
        raise ConfigError(f"perceive measures Blip's concepts only; not in the allowlist: {', '.join(unknown)}")
    sets = sets_from_record(model, steerability, record, vectors, concepts, modes)
    if not sets:
        raise ConfigError(f"nothing to judge: none of {', '.join(concepts) or 'no concept'} is served on {model.name} "
                          f"in {', '.join(modes)}")
    return sets


def sets_from_record(model: LoadedModel, steerability: Steerability, record: dict[str, Any],
                     vectors: dict[str, ConceptVector], concepts: Sequence[str], modes: Sequence[str]) -> list[PairSet]:
    """Each concept in each asked mode its record lets Blip serve it in: steering alone at its
    child-safe recommended alpha, the instruction alone, the instruction with steering at that
    mode's own child-safe recommended alpha; steered as validation swept it (its `config`)."""
    replies = record_replies(record)
    sets = []
    for concept in concepts:
        state = steerability.concepts.get(concept)
        if state is None or concept not in vectors:
            raise ConfigError(f"{concept} has no validated vector on {model.name}")
        cv, entry = vectors[concept], record["concepts"][concept]
        config = state.config or SteerConfig(model.steering_layers)
        alpha = state.child_recommended_alpha
        if "steer" in modes and alpha is not None:
            sets.append(PairSet(concept, "steer", alpha, config.row(cv, alpha), ""))
        blip_modes = entry.get("modes")
        if blip_modes:
            if "prompt" in modes:
                sets.append(PairSet(concept, "prompt", None, None, blip_modes["instruction"]))
            both = decide(blip_modes["both"], replies=replies, child=True)[1]
            if "both" in modes and both is not None:
                sets.append(PairSet(concept, "both", both, config.row(cv, both), blip_modes["instruction"]))
    return sets


# The progress file ----------------------------------------------------------------------


def _read_progress(path: Path) -> list[dict[str, Any]]:
    """Its complete lines. A line torn by a kill mid-write (and anything after it) is cut off
    the file, so the next append starts on a line of its own; that pair is judged again."""
    if not path.exists():
        return []
    rows, good = [], 0
    data = path.read_bytes()
    for line in data.splitlines(keepends=True):
        try:
            if not line.endswith(b"\n"):
                raise ValueError("no end of line")
            rows.append(json.loads(line))
        except ValueError:
            break
        good += len(line)
    if good < len(data):
        with path.open("r+b") as f:
            f.truncate(good)
            os.fsync(f.fileno())
    return rows


def _append(path: Path, row: dict[str, Any]) -> None:
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _header(model: LoadedModel, judge: LoadedModel, sets: Sequence[PairSet], settings: PerceiveSettings) -> dict[str, Any]:
    return {"kind": "settings", "model": model.name, "model_fingerprint": model.fingerprint, "judge": judge.name,
            "judge_fingerprint": judge.fingerprint, "settings": asdict(settings),
            "sets": [{"concept": s.concept, "mode": s.mode, "alpha": s.alpha, "instruction": s.instruction} for s in sets]}


# Replies and judgments ------------------------------------------------------------------


def _sample(model: LoadedModel, prompts: list[PromptLike], rows: list[RowSteering | None], settings: PerceiveSettings) -> list[str]:
    gen = GenerationSettings(max_new_tokens=settings.max_new_tokens, temperature=settings.temperature, seed=settings.seed)
    return [g.text.strip() for g in generate(model, prompts, rows, gen)]


def _replies(model: LoadedModel, sets: Sequence[PairSet], settings: PerceiveSettings, done: dict[str, list[str]],
             save: Callable[[dict[str, Any]], None]) -> dict[str, list[str]]:
    """The plain replies (one batch, shared by every set) and each set's steered ones."""
    turns = list(settings.turns)
    wanted: list[tuple[str, list[PromptLike], list[RowSteering | None]]] = [
        ("plain", [_messages(settings.system_prompt, t) for t in turns], [None] * len(turns))]
    for s in sets:
        system = instructed(settings.system_prompt, s.instruction)
        wanted.append((s.key, [_messages(system, t) for t in turns], [s.row] * len(turns)))
    replies = dict(done)
    for key, prompts, rows in wanted:
        if key not in replies:
            replies[key] = _sample(model, prompts, rows, settings)
            save({"kind": "replies", "set": key, "replies": replies[key]})
    return replies


@torch.no_grad()
def judge_batch(judge: LoadedModel, items: Sequence[tuple[str, str, str, str]]) -> list[tuple[float, float]]:
    """For each (turn, first, second, concept): P(A) among {A, B} from the judge's next-token
    logits, and the probability mass A and B hold together (how surely it answered a letter)."""
    a, b = letter_ids(judge)
    tok = judge.tokenizer
    texts = [render_prompt(judge, judge_messages(*item)) for item in items]
    ids = tok(texts, add_special_tokens=not judge.has_chat_template)["input_ids"]
    logits = prefill(judge.model, judge.layers, ids, {}, tok.pad_token_id or 0).logits.float()
    probs = logits.softmax(-1)
    pair = logits[:, [a, b]].softmax(-1)[:, 0]
    mass = probs[:, a] + probs[:, b]
    return [(float(p), float(m)) for p, m in zip(pair, mass)]


def _chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def run(model: LoadedModel, judge: LoadedModel, sets: Sequence[PairSet], settings: PerceiveSettings, progress: Path,
        bar: Callable[[int], Any] | None = None, checks: dict[str, list[Written]] | None = None) -> dict[str, Any]:
    """Make and judge every pair (carrying on from `progress` when it was started with the same
    models and settings) and return the results; `bar(total)` gives a progress bar to update.
    `checks`: per concept, written pairs the judge is asked about first, whose answer is known
    (the derivation pairs' replies): how well the judge tells the register at all."""
    refuse_self_judging(model, judge)
    letter_ids(judge)
    checks = checks or {}
    header = json.loads(json.dumps(_header(model, judge, sets, settings) | {"checks": checks}))  # as read back
    rows = _read_progress(progress)
    if rows and rows[0] != header:
        raise ConfigError(f"{progress} holds a run with other models, sets or settings; delete it to start afresh")
    if not rows:
        progress.parent.mkdir(parents=True, exist_ok=True)
        progress.write_text("", encoding="utf-8")
        _append(progress, header)
    start = time.perf_counter()
    replies = _replies(model, sets, settings, {r["set"]: r["replies"] for r in rows if r["kind"] == "replies"},
                       lambda row: _append(progress, row))
    judged = {r["id"]: r for r in rows if r["kind"] == "judged"}
    # (id, set key, turn index, (turn, steered, plain, concept)); the written checks first.
    jobs = [(f"check-{concept}-{i:02d}", f"check/{concept}", i, (*written, concept))
            for concept, pairs in checks.items() for i, written in enumerate(pairs)]
    jobs += [(f"{s.concept}-{s.mode}-{i:02d}", s.key, i, (turn, replies[s.key][i], replies["plain"][i], s.concept))
             for s in sets for i, turn in enumerate(settings.turns)]
    todo = [job for job in jobs if job[0] not in judged]
    progress_bar = bar(len(jobs)) if bar else None
    if progress_bar is not None:
        progress_bar.update(len(jobs) - len(todo))
    for chunk in _chunks(todo, settings.judge_batch):
        items = []
        for *_, (turn, steered, plain, concept) in chunk:
            items += [(turn, steered, plain, concept), (turn, plain, steered, concept)]
        out = judge_batch(judge, items)
        for k, (job_id, key, i, _) in enumerate(chunk):
            (p_first, mass_first), (p_second, mass_second) = out[2 * k], out[2 * k + 1]
            row = {"kind": "judged", "id": job_id, "set": key, "turn": i,
                   "p_steered_as_a": round(p_first, 5), "p_steered_as_b": round(1 - p_second, 5),
                   "letter_mass": round((mass_first + mass_second) / 2, 5)}
            _append(progress, row)
            judged[job_id] = row
        if progress_bar is not None:
            progress_bar.update(len(chunk))
    if progress_bar is not None:
        progress_bar.close()
    results = results_of(header, sets, settings, replies, judged)
    results["judge_check"] = {concept: summarize([j for j in judged.values() if j["set"] == f"check/{concept}"])
                              for concept in checks}
    results["seconds_this_run"] = round(time.perf_counter() - start, 1)
    return results


# Figures ----------------------------------------------------------------------------------


def summarize(judged: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per set: the steered reply wins a pair when the judge gives it more than half the
    probability on average over both orders (so a judge that always says "A" scores no wins
    and no losses beyond chance); its win rate over pairs with the 95% Wilson interval; the
    position bias (the share of the 2n choices that were "A", 0.5 = none); and the agreement
    between the two orders (the same reply chosen both times)."""
    n = len(judged)
    wins = sum((j["p_steered_as_a"] + j["p_steered_as_b"]) / 2 > 0.5 for j in judged)
    first = [j["p_steered_as_a"] > 0.5 for j in judged]  # steered chosen, shown as A
    second = [j["p_steered_as_b"] > 0.5 for j in judged]  # steered chosen, shown as B
    low, high = wilson(wins, n)
    return {
        "pairs": n,
        "win_rate": round(wins / n, 4) if n else None,
        "win_low": round(low, 4),
        "win_high": round(high, 4),
        "steered_chosen": round((sum(first) + sum(second)) / (2 * n), 4) if n else None,
        "a_share": round((sum(first) + sum(not c for c in second)) / (2 * n), 4) if n else None,
        "order_agreement": round(sum(f == s for f, s in zip(first, second)) / n, 4) if n else None,
        "letter_mass": round(sum(j["letter_mass"] for j in judged) / n, 4) if n else None,
    }


def results_of(header: dict[str, Any], sets: Sequence[PairSet], settings: PerceiveSettings,
               replies: dict[str, list[str]], judged: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """perceive.json: the run's settings, per set its figures, and every pair with its judgments
    (the listening page reads the pairs)."""
    out_sets, pairs = {}, []
    for s in sets:
        mine = sorted((j for j in judged.values() if j["set"] == s.key), key=lambda j: j["turn"])
        out_sets[s.key] = {"concept": s.concept, "mode": s.mode, "alpha": s.alpha, "instruction": s.instruction,
                           **summarize(mine)}
        for j in mine:
            i = j["turn"]
            pairs.append({"id": j["id"], "concept": s.concept, "mode": s.mode, "turn": settings.turns[i],
                          "steered": replies[s.key][i], "plain": replies["plain"][i],
                          "p_steered_as_a": j["p_steered_as_a"], "p_steered_as_b": j["p_steered_as_b"]})
    return {"model": header["model"], "model_fingerprint": header["model_fingerprint"], "judge": header["judge"],
            "judge_fingerprint": header["judge_fingerprint"], "settings": header["settings"], "sets": out_sets,
            "pairs": pairs}


def markdown(results: dict[str, Any]) -> str:
    s = results["settings"]
    lines = [
        f"# Perceptibility: {results['model']}, judged by {results['judge']}", "",
        f"{len(s['turns'])} held-out child turns, each answered once steered (or instructed) and once plain under "
        f"Blip's system prompt, the pair sharing turn and seed (temperature {s['temperature']:g}, "
        f"{s['max_new_tokens']} tokens). The judge saw every pair twice, the steered reply as A and as B, and "
        "its choice is read from its next-token logits for A and B. A win: the judge gave the steered reply more "
        "than half the probability, averaged over both orders. An interval that includes 0.5 means the judge "
        "could not tell the replies apart.", "",
        "| concept | mode | alpha | pairs | steered wins [95%] | steered chosen (of 2n) | position bias: A chosen "
        "| orders agree | mass on A/B |",
        "| --- | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    if results.get("judge_check"):
        lines[-2:-2] = [
            "First the judge's own check: for each concept, written pairs from its derivation set (a reply in the "
            "register and a plain one to the same turn), asked the same way. A judge that cannot pick the written "
            "reply cannot say whether steering is heard.", "",
            "| concept | written pairs | judge picks the register [95%] | position bias: A chosen | orders agree |",
            "| --- | ---: | --- | ---: | ---: |",
            *(f"| {c} | {r['pairs']} | {r['win_rate']:.2f} [{r['win_low']:.2f}, {r['win_high']:.2f}] | {r['a_share']:.2f} "
              f"| {r['order_agreement']:.2f} |" for c, r in results["judge_check"].items()),
            "",
        ]
    for r in results["sets"].values():
        alpha = "-" if r["alpha"] is None else f"{r['alpha']:g}"
        told = "" if r["win_low"] > 0.5 or r["win_high"] < 0.5 else " (cannot tell)"
        lines.append(f"| {r['concept']} | {r['mode']} | {alpha} | {r['pairs']} | {r['win_rate']:.2f} "
                     f"[{r['win_low']:.2f}, {r['win_high']:.2f}]{told} | {r['steered_chosen']:.2f} | {r['a_share']:.2f} "
                     f"| {r['order_agreement']:.2f} | {r['letter_mass']:.2f} |")
    return "\n".join(lines) + "\n"


def _set_order(key: str) -> tuple[str, int]:
    concept, mode = key.split("/")
    return concept, REPLY_MODES.index(mode) if mode in REPLY_MODES else len(REPLY_MODES)


def keep_earlier(path: Path, results: dict[str, Any], served: Sequence[PairSet]) -> tuple[dict[str, Any], list[str]]:
    """`results` with the sets an earlier perceive.json at `path` holds and this run did not
    judge, and their keys, so judging one concept again drops no other. Only from a run of the
    same model and judge (fingerprints) and settings, and only sets `served` still has as they
    were judged (the same alpha and instruction): a set whose configuration changed is dropped."""
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return results, []
    if any(old.get(k) != results[k] for k in ("model", "model_fingerprint", "judge", "judge_fingerprint", "settings")):
        return results, []
    fields = ("concept", "mode", "alpha", "instruction")
    now = {s.key: (s.concept, s.mode, s.alpha, s.instruction) for s in served}
    kept = sorted((k for k, v in old.get("sets", {}).items()
                   if k not in results["sets"] and now.get(k) == tuple(v.get(f) for f in fields)), key=_set_order)
    if not kept:
        return results, []
    sets = {**{k: old["sets"][k] for k in kept}, **results["sets"]}
    pairs = [p for p in old.get("pairs", []) if f"{p['concept']}/{p['mode']}" in kept] + results["pairs"]
    concepts = {k.split("/")[0] for k in kept}
    checks = {c: r for c, r in old.get("judge_check", {}).items() if c in concepts} | results.get("judge_check", {})
    order = sorted(sets, key=_set_order)
    merged = results | {"sets": {k: sets[k] for k in order},
                        "pairs": sorted(pairs, key=lambda p: _set_order(f"{p['concept']}/{p['mode']}")),
                        "judge_check": dict(sorted(checks.items()))}
    return merged, kept


def write_results(model_dir: Path, results: dict[str, Any], progress: Path) -> list[Path]:
    """perceive.json, perceive.md and plots/perceive.png, each written whole; then the progress
    file, whose every pair they now hold, goes."""
    write_text_atomic(model_dir / "perceive.json", json.dumps(results, indent=1) + "\n")
    write_text_atomic(model_dir / "perceive.md", markdown(results))
    written = [model_dir / "perceive.json", model_dir / "perceive.md", plot(results, model_dir / "plots" / "perceive.png")]
    progress.unlink(missing_ok=True)
    return written


def plot(results: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = list(results["sets"].values())
    fig, ax = plt.subplots(figsize=(max(4.0, 0.8 * len(sets) + 1.5), 3.6))  # room for "enthusiasm"
    x = range(len(sets))
    rates = [r["win_rate"] for r in sets]
    ax.errorbar(x, rates, yerr=[[r["win_rate"] - r["win_low"] for r in sets], [r["win_high"] - r["win_rate"] for r in sets]],
                fmt="o", capsize=3)
    ax.axhline(0.5, color="grey", linestyle="--", linewidth=1)
    ax.set_xticks(list(x), [f"{r['concept']}\n{r['mode']}" for r in sets], fontsize=7)
    ax.set_ylim(0, 1)
    ax.set_ylabel("steered reply wins (95%)")
    ax.set_title(f"{results['model']} judged by {results['judge']}", fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path
