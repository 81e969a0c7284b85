"""The perceptibility harness (`steer perceive`) on tiny random models: pairs, both orders,
the figures, resuming after a kill, and what it refuses. The judge-model runs themselves
(SmolLM2 judged by Qwen 1.5B) are not part of `make test`."""

import json
from pathlib import Path

import pytest
import torch
from blip_served import STEERED
from steer_cli import steer
from tiny_models import HIDDEN_SIZE, tiny_loaded

from steering.errors import ConfigError
from steering.hooks import RowSteering
from steering.perceive import PairSet, PerceiveSettings, judge_batch, keep_earlier, markdown, run, summarize, write_results

TURNS = ("t5 t6 t7", "t8 t9", "t10 t11 t12 t13", "t14")


@pytest.fixture(scope="module")
def models():
    model = tiny_loaded(layers=(1, 2))
    judge = tiny_loaded(layers=(1, 2), seed=1, words=("A", "B"), name="tiny-judge")
    return model, judge


def _sets() -> list[PairSet]:
    g = torch.Generator().manual_seed(0)
    row = RowSteering({layer: 4 * torch.randn(HIDDEN_SIZE, generator=g) for layer in (1, 2)})
    return [PairSet("calm", "steer", 8.0, row, ""), PairSet("calm", "prompt", None, None, "t20 t21"),
            PairSet("happy", "both", 6.0, row, "t22")]


SETTINGS = PerceiveSettings(TURNS, "t3 t4", max_new_tokens=5)


def _judged(progress: Path) -> list[dict]:
    return [json.loads(line) for line in progress.read_text().splitlines() if '"judged"' in line]


def test_every_pair_is_judged_in_both_orders(models, tmp_path: Path) -> None:
    model, judge = models
    checks = {"calm": [("t5", "t6 t7", "t8"), ("t9", "t10", "t11 t12")]}
    results = run(model, judge, _sets(), SETTINGS, tmp_path / "p.jsonl", checks=checks)
    assert set(results["sets"]) == {"calm/steer", "calm/prompt", "happy/both"}
    assert results["judge_check"]["calm"]["pairs"] == 2 and "judge's own check" in markdown(results)
    assert len(results["pairs"]) == 3 * len(TURNS) and len({p["id"] for p in results["pairs"]}) == 3 * len(TURNS)
    for pair in results["pairs"][:2]:  # the figures are the judge's own, read again in both orders
        items = [(pair["turn"], pair["steered"], pair["plain"], pair["concept"]),
                 (pair["turn"], pair["plain"], pair["steered"], pair["concept"])]
        (p_ab, _), (p_ba, _) = judge_batch(judge, items)
        assert pair["p_steered_as_a"] == pytest.approx(p_ab, abs=1e-4)
        assert pair["p_steered_as_b"] == pytest.approx(1 - p_ba, abs=1e-4)
    # Pairs of a concept share the plain reply of their turn (same seed and batch layout).
    plain = {p["turn"]: p["plain"] for p in results["pairs"] if p["id"].startswith("calm-steer")}
    assert all(p["plain"] == plain[p["turn"]] for p in results["pairs"])
    # Steering moved the tiny model's replies, and a prompt-mode reply differs from the plain one.
    assert any(p["steered"] != p["plain"] for p in results["pairs"] if p["mode"] == "steer")
    for figures in results["sets"].values():
        assert figures["pairs"] == len(TURNS) and 0 <= figures["win_low"] <= figures["win_rate"] <= figures["win_high"] <= 1


def test_summary_separates_position_bias_from_preference() -> None:
    always_a = [{"p_steered_as_a": 0.9, "p_steered_as_b": 0.1, "letter_mass": 0.8}] * 10
    s = summarize(always_a)
    assert s["win_rate"] == 0 and s["a_share"] == 1.0 and s["order_agreement"] == 0 and s["steered_chosen"] == 0.5
    prefers = [{"p_steered_as_a": 0.8, "p_steered_as_b": 0.7, "letter_mass": 0.9}] * 20
    s = summarize(prefers)
    assert s["win_rate"] == 1.0 and s["a_share"] == 0.5 and s["order_agreement"] == 1.0
    assert 0.8 < s["win_low"] < 1.0 and s["win_high"] == 1.0


class _Killed(Exception):
    pass


class _KillAfter:
    """A progress bar that stops the run (as a kill would) once `n` pairs are judged."""

    def __init__(self, n: int) -> None:
        self.n, self.seen = n, 0

    def __call__(self, total: int) -> "_KillAfter":
        return self

    def update(self, k: int) -> None:
        self.seen += k
        if self.seen >= self.n:
            raise _Killed

    def close(self) -> None:
        pass


def test_a_killed_run_resumes_without_judging_a_pair_twice(models, tmp_path: Path) -> None:
    model, judge = models
    progress = tmp_path / "p.jsonl"
    with pytest.raises(_Killed):
        run(model, judge, _sets(), PerceiveSettings(TURNS, "t3 t4", max_new_tokens=5, judge_batch=2), progress, _KillAfter(4))
    first = _judged(progress)
    assert len(first) == 4
    with progress.open("a") as f:  # a line torn by the kill: dropped, its pair judged again
        f.write('{"kind": "judged", "id": "calm-prom')
    results = run(model, judge, _sets(), PerceiveSettings(TURNS, "t3 t4", max_new_tokens=5, judge_batch=2), progress)
    lines = progress.read_text().splitlines()
    judged = [json.loads(line) for line in lines[1 + 4 + 4:]]  # after the header, 4 reply sets and the first 4 pairs
    assert {j["id"] for j in judged}.isdisjoint({j["id"] for j in first}) and len(judged) == 3 * len(TURNS) - 4
    assert len(results["pairs"]) == 3 * len(TURNS)
    whole = run(model, judge, _sets(), PerceiveSettings(TURNS, "t3 t4", max_new_tokens=5, judge_batch=2), tmp_path / "whole.jsonl")
    assert results["sets"] == whole["sets"] and results["pairs"] == whole["pairs"]


def test_a_second_run_keeps_the_sets_it_did_not_judge(models, tmp_path: Path) -> None:
    model, judge = models
    sets = _sets()
    first = run(model, judge, sets[:2], SETTINGS, tmp_path / "p1.jsonl")
    write_results(tmp_path, first, tmp_path / "p1.jsonl")
    second = run(model, judge, sets[2:], SETTINGS, tmp_path / "p2.jsonl")
    merged, kept = keep_earlier(tmp_path / "perceive.json", second, sets)
    assert kept == ["calm/steer", "calm/prompt"] and list(merged["sets"]) == ["calm/steer", "calm/prompt", "happy/both"]
    assert merged["pairs"] == first["pairs"] + second["pairs"] and merged["sets"]["happy/both"] == second["sets"]["happy/both"]
    # A set served at another alpha since is judged afresh, not kept; nothing of a run with other settings is.
    moved = [PairSet("calm", "steer", 9.0, sets[0].row, ""), *sets[1:]]
    assert keep_earlier(tmp_path / "perceive.json", second, moved)[1] == ["calm/prompt"]
    assert keep_earlier(tmp_path / "perceive.json", second | {"settings": second["settings"] | {"seed": 1}}, sets) == (
        second | {"settings": second["settings"] | {"seed": 1}}, [])
    assert keep_earlier(tmp_path / "missing.json", second, sets) == (second, [])


def test_refusals(models, tmp_path: Path) -> None:
    model, judge = models
    with pytest.raises(ConfigError, match="itself or made from the same weights"):
        run(model, model, _sets(), SETTINGS, tmp_path / "self.jsonl")
    with pytest.raises(ConfigError, match="does not spell A and B"):
        run(judge, model, _sets(), SETTINGS, tmp_path / "letters.jsonl")
    progress = tmp_path / "p.jsonl"
    run(model, judge, _sets()[:1], SETTINGS, progress)
    with pytest.raises(ConfigError, match="other models, sets or settings"):
        run(model, judge, _sets()[:1], PerceiveSettings(TURNS, "t3 t4", max_new_tokens=6), progress)


@pytest.mark.parametrize("args, message", [
    (("--judge", "smollm2-135m-instruct"), "the judge must be another model than smollm2-135m-instruct"),
    (("--modes", "steer,shout"), "--modes takes a comma-separated subset of steer, prompt, both"),
    (("--turns", "99"), "--turns 99: there are 24 held-out turns"),
    (("--concepts", "hostile"), "not in the allowlist: hostile"),
])
def test_cli_errors(args: tuple[str, ...], message: str) -> None:
    res = steer("perceive", *args)
    assert res.returncode == 1 and "Traceback" not in res.stderr and message in res.stderr, res.stderr


def test_turns_are_held_out(paths) -> None:
    """The judged turns are none of the derivation pairs' contexts nor the gate's prompts."""
    turns = [json.loads(line)["text"].lower() for line in (paths.eval / "perceive_turns.jsonl").read_text().splitlines()]
    seen = {json.loads(line)["text"].lower() for line in (paths.eval / "prompts.jsonl").read_text().splitlines()}
    for f in paths.pairs.glob("*.json"):
        seen |= {p["context"].lower() for p in json.loads(f.read_text())["pairs"] if isinstance(p, dict) and "context" in p}
    assert len(turns) == len(set(turns)) == 24 and not set(turns) & seen


def test_sets_follow_the_record(smollm, paths) -> None:
    """On SmolLM2 the judged sets are the concepts Blip serves, each in the mode and at the alpha
    its record's Blip decision names, and steering alone only at its child-safe alpha."""
    from steering.perceive import blip_sets
    from steering.record import record_path
    from steering.vocabulary import REPLY_MODES

    record = json.loads(record_path(paths.model_vectors(smollm.name)).read_text())
    sets = {s.key: s for s in blip_sets(smollm, paths, None, REPLY_MODES)}
    served = {c for c, e in record["concepts"].items() if (e.get("blip") or {}).get("mode")}
    assert {key.split("/")[0] for key in sets} == served
    for concept in served:
        entry = record["concepts"][concept]
        chosen = sets[f"{concept}/{entry['blip']['mode']}"]
        assert chosen.alpha == entry["blip"]["alpha"] and (chosen.row is None) == (chosen.mode == "prompt")
        steer = sets.get(f"{concept}/steer")
        assert (steer.alpha if steer else None) == entry["child_recommended_alpha"]
        assert all(s.instruction == entry["modes"]["instruction"] for s in sets.values()
                   if s.concept == concept and s.mode != "steer")
    assert not blip_sets(smollm, paths, [STEERED], ["steer"])[0].instruction


def test_written_checks_spread_over_the_pairs(paths) -> None:
    from steering.pairs import load_concept
    from steering.perceive import written_checks

    checks = written_checks(paths.pairs, ["calm", "happy", "calm"], 8)
    assert set(checks) == {"calm", "happy"} and all(len(c) == 8 for c in checks.values())
    pairs = load_concept(paths.pairs, "calm").pairs
    assert checks["calm"][0] == (pairs[0].context, pairs[0].positive, pairs[0].negative)
    assert checks["calm"][-1][0] != pairs[7].context  # spread over the file, not its first eight
