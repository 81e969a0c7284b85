"""The validation gate on the real SmolLM2: each check fails when it should, and the stored
record (never a flag) decides what may be steered."""

import dataclasses
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from steering.record import assess, d_interval, decide, record_path, write_record
from steering.scoring import check_scorer, load_scorer
from steering.store import load_store, read_vector, save_vector, stored_concepts, vector_path
from steering.validate import check_behavioural, check_canary, check_hook_path, cohens_d
from blip_served import STEERED
from steer_cli import steer


@pytest.fixture(scope="module")
def vectors(smollm, paths):
    model_dir = paths.model_vectors(smollm.name)
    good, refused = load_store(model_dir, stored_concepts(model_dir), fingerprint=smollm.fingerprint,
                               hidden_size=smollm.hidden_size, layers=smollm.steering_layers)
    assert not refused
    return good


def test_hook_path_check_passes_and_fails(smollm) -> None:
    ok = check_hook_path(smollm)
    assert ok.passed and ok.figure == 30 and "LlamaDecoderLayer" in ok.detail
    broken = dataclasses.replace(smollm, entry=dataclasses.replace(smollm.entry, layer_template="model.layers.{num}.mlp"))
    bad = check_hook_path(broken)
    assert not bad.passed and "not a whole block" in bad.detail
    missing = dataclasses.replace(smollm, entry=dataclasses.replace(smollm.entry, layers=(12, 40)))
    bad = check_hook_path(missing)
    assert not bad.passed and "outside 0..29" in bad.detail


def test_canary_passes_with_a_random_vector_and_fails_with_a_zero_vector(smollm) -> None:
    ok = check_canary(smollm)
    assert ok.passed and ok.figure > 0.05
    zero = check_canary(smollm, direction=torch.zeros(smollm.hidden_size))
    assert not zero.passed and zero.figure == 0.0


def test_behavioural_check_fails_for_zero_vectors(smollm, vectors) -> None:
    assert check_behavioural(smollm, vectors).passed
    zeroed = {}
    for name in ("happy", "sad", "calm"):
        cv = vectors[name]
        zeroed[name] = dataclasses.replace(cv, directions={k: torch.zeros_like(v) for k, v in cv.directions.items()})
    bad = check_behavioural(smollm, zeroed)
    assert not bad.passed and bad.figure == 0 and "SAME" in bad.detail


def test_cohens_d() -> None:
    assert cohens_d([2, 4, 6], [1, 3, 5]) == pytest.approx(0.5)
    assert cohens_d([1, 3, 5], [2, 4, 6]) == pytest.approx(-0.5)


def _point(alpha: float, d: float, ppl: float = 1.2, degenerate: float = 0.0, n: int = 96) -> dict:
    return {"alpha": alpha, "alpha_rel": alpha / 170, "d": d, "ppl_ratio": ppl, "degenerate_excess": degenerate, "n": n, "n_control": n}


def test_d_interval() -> None:
    low, high = d_interval(0.5, 32, 32)
    assert low == pytest.approx(0.0, abs=0.01) and high == pytest.approx(1.0, abs=0.01)
    low, high = d_interval(0.8, 96, 96)
    assert 0.5 < low < 0.51 and high == pytest.approx(1.1, abs=0.01)
    assert d_interval(3.0, 1, 96) == (-math.inf, math.inf)  # too few replies to say anything


def test_decide() -> None:
    # The best d whose whole interval clears the gate is recommended, not merely the first to pass.
    assert decide([_point(4, 0.3), _point(6, 0.8), _point(8, 1.2)]) == ("passed", 8, 8)
    # Literary concepts: clean at 4, destabilised at 6 -> max alpha 4, and it must pass there.
    assert decide([_point(4, 0.9), _point(6, 1.5, ppl=3.1), _point(8, 2.0, ppl=5)]) == ("passed", 4, 4)
    # Loops count as incoherence even when perplexity looks fine.
    assert decide([_point(4, 0.2), _point(6, 0.9, degenerate=0.4)]) == ("failed", None, 4)
    assert decide([_point(4, -0.7), _point(6, -1.1)]) == ("inverted", None, 6)
    assert decide([_point(4, 0.1, ppl=2.5)]) == ("failed", None, None)


def test_the_gate_needs_the_whole_interval_above_it() -> None:
    # d 0.8 on 32 replies a side: interval about 0.29 to 1.31, so it does not pass; on 96 it does.
    assert decide([_point(4, 0.8, n=32)]) == ("failed", None, 4)
    assert decide([_point(4, 0.8, n=96)]) == ("passed", 4, 4)
    # Points that predate their own counts take the record's; without any they never pass.
    old = {k: v for k, v in _point(4, 3.0).items() if k not in ("n", "n_control")}
    assert decide([old], replies=96)[0] == "passed" and decide([old])[0] == "failed"


def test_for_a_child_only_safe_alphas_are_served() -> None:
    def point(alpha: float, d: float, flag_excess: float = 0.0, loops: float = 0.0) -> dict:
        return _point(alpha, d, degenerate=loops) | {"flag_excess": flag_excess}

    sweep = [point(4, 0.6), point(6, 1.0), point(8, 1.3, flag_excess=0.01)]
    assert decide(sweep) == ("passed", 8, 8)
    assert decide(sweep, child=True) == ("passed", 6, 8)  # 8 raised a flag: a child gets 6
    # Only 4 is safe and its interval (0.31 to 0.89) does not clear the gate: a child gets nothing,
    # while the status still says what the sweep showed.
    unsafe = [point(4, 0.6), point(6, 1.0, loops=0.01), point(8, 1.3, flag_excess=0.01)]
    assert decide(unsafe, child=True) == ("passed", None, 8)
    assert decide([_point(4, 1.0), _point(6, 1.0)]) == ("passed", 4, 6)  # ties go to the gentler alpha


def test_scorer_ranks_concept_text_above_neutral(paths) -> None:
    results = check_scorer(load_scorer(paths.eval), paths.eval)
    assert len(results) == 23
    failing = [r for r in results if not r.passed]
    assert not failing, failing
    assert min(r.auc for r in results) >= 0.8


def _copy_store(paths, smollm, tmp_path: Path) -> Path:
    model_dir = tmp_path / smollm.name
    shutil.copytree(paths.model_vectors(smollm.name), model_dir, ignore=shutil.ignore_patterns("plots"))
    return model_dir


def test_committed_record_makes_smollm_steerable(smollm, paths, vectors) -> None:
    state = assess(smollm.name, paths.model_vectors(smollm.name), smollm.fingerprint, vectors)
    assert state.steerable, state.reason
    assert "happy" in state.servable
    record = json.loads(record_path(paths.model_vectors(smollm.name)).read_text())
    for name, entry in record["concepts"].items():
        assert state.concepts[name].status == entry["status"]
        assert state.concepts[name].servable == (entry["status"] == "passed")


def test_tampered_record_is_refused(smollm, paths, vectors, tmp_path) -> None:
    model_dir = _copy_store(paths, smollm, tmp_path)
    record = json.loads(record_path(model_dir).read_text())
    blocked = next((n for n, c in record["concepts"].items() if c["status"] != "passed"), None)
    # 1. Editing the file by hand breaks its hash: nothing is steerable.
    edited = dict(record, concepts={**record["concepts"]})
    if blocked:
        edited["concepts"][blocked] = dict(record["concepts"][blocked], status="passed")
    edited["checks"] = dict(record["checks"], canary_kl=dict(record["checks"]["canary_kl"], passed=True))
    edited["fingerprint"] = record["fingerprint"]
    edited["model"] = record["model"] + " "
    record_path(model_dir).write_text(json.dumps(edited))
    state = assess(smollm.name, model_dir, smollm.fingerprint, vectors)
    assert not state.steerable and "altered" in state.reason
    # 2. A status rewritten with a valid hash still has to agree with its own figures.
    if blocked:
        forged = dict(record, concepts={**record["concepts"], blocked: dict(record["concepts"][blocked], status="passed")})
        forged.pop("record_sha256")
        write_record(model_dir, forged)
        state = assess(smollm.name, model_dir, smollm.fingerprint, vectors)
        assert state.steerable and not state.concepts[blocked].servable
        assert "disagrees with its own figures" in state.concepts[blocked].reason
    # 3. A record for another model fingerprint does not count.
    other = dict(record, fingerprint="0" * 64)
    other.pop("record_sha256")
    write_record(model_dir, other)
    state = assess(smollm.name, model_dir, smollm.fingerprint, vectors)
    assert not state.steerable and "fingerprint" in state.reason


def test_changed_vector_or_other_model_vector_is_refused(smollm, paths, vectors, tmp_path) -> None:
    model_dir = _copy_store(paths, smollm, tmp_path)
    cv = read_vector(vector_path(model_dir, "happy"))
    changed = dataclasses.replace(cv, directions={k: -v for k, v in cv.directions.items()})
    save_vector(changed, vector_path(model_dir, "happy"))
    good, _ = load_store(model_dir, ["happy"], fingerprint=smollm.fingerprint, hidden_size=576, layers=smollm.steering_layers)
    state = assess(smollm.name, model_dir, smollm.fingerprint, good)
    assert not state.concepts["happy"].servable and "vector changed since validation" in state.concepts["happy"].reason
    save_vector(dataclasses.replace(cv, concept="sad", fingerprint="f" * 64), vector_path(model_dir, "sad"))
    good, refused = load_store(model_dir, ["sad"], fingerprint=smollm.fingerprint, hidden_size=576)
    assert not good and "fingerprint" in refused["sad"]


def test_missing_record_means_unvalidated(smollm, paths, vectors, tmp_path) -> None:
    model_dir = _copy_store(paths, smollm, tmp_path)
    record_path(model_dir).unlink()
    state = assess(smollm.name, model_dir, smollm.fingerprint, vectors)
    assert not state.steerable and state.reason.startswith("unvalidated")


def test_steer_models_shows_state_of_validated_and_new_models(tmp_path, monkeypatch) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2))
    model.save_pretrained(tmp_path / "tiny")
    registry = (Path(__file__).parents[1] / "models.toml").read_text()
    registry += '\n[models.tiny-new]\nsource = { kind = "local", path = "' + str(tmp_path / "tiny") + '" }\n'
    (tmp_path / "models.toml").write_text(registry)
    monkeypatch.setenv("STEER_REGISTRY", str(tmp_path / "models.toml"))
    res = steer("models", "--json")
    assert res.returncode == 0, res.stderr
    rows = {r["name"]: r for r in map(json.loads, res.stdout.splitlines())}
    assert rows["smollm2-135m-instruct"]["steerable"] is True and "happy" in rows["smollm2-135m-instruct"]["servable"]
    assert rows["tiny-new"]["steerable"] is False and rows["tiny-new"]["state"].startswith("unvalidated")


@torch.no_grad()
def test_perplexity_reads_only_the_replies_positions(smollm) -> None:
    """Projecting only the reply's positions to the vocabulary, after the keys and values of
    each prompt computed once for all its replies, gives the perplexity of the whole sequence's
    logits, for replies of different lengths under left padding and prompts split across batches."""
    from steering.coherence import perplexities
    from steering.generate import Generation

    tok = smollm.tokenizer
    rows = [("Tell me about cats.", "Cats are small and soft."), ("Hi", "Hello there! How are you doing today, my friend?"),
            ("What is two plus two?", "Four."), ("Tell me about cats.", "They purr."),
            ("What is two plus two?", "Two plus two is four, and four plus four is eight.")]
    gens = [Generation(r, 0, 0.0, tuple(tok(p)["input_ids"]), tuple(tok(r)["input_ids"])) for p, r in rows]
    fast = perplexities(smollm, gens, batch_size=2)
    for g, got in zip(gens, fast):
        ids = torch.tensor([list(g.prompt_ids) + list(g.token_ids)])
        logp = smollm.model(input_ids=ids).logits.float()[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        expected = math.exp(-logp[0, -len(g.token_ids):].mean().item())
        assert got == pytest.approx(expected, rel=1e-3)


def test_seeds_sampled_from_one_prefill_get_the_replies_each_seed_gets_alone(smollm, vectors) -> None:
    """generate_seeds prefills once and decodes a copy per seed; each seed's replies are the
    ones `generate` samples with that seed, steered rows included."""
    from steering.generate import GenerationSettings, generate, generate_seeds
    from steering.validate import default_config

    prompts = ["Tell me about your day.", "What should I draw?", "I lost my tooth!"]
    rows = [None, default_config(smollm).row(vectors["happy"], 6.0), None]
    together = generate_seeds(smollm, prompts, rows, GenerationSettings(max_new_tokens=6, temperature=0.8), [0, 1])
    for seed, replies in zip([0, 1], together):
        alone = generate(smollm, prompts, rows, GenerationSettings(6, 0.8, seed=seed))
        assert [g.token_ids for g in replies] == [g.token_ids for g in alone]
    assert together[0] != together[1]  # the seeds differ


def test_redecide_takes_old_decisions_again_by_todays_rules(smollm, paths, vectors, tmp_path) -> None:
    """A record written under an older rule (here: no child_recommended_alpha, the first passing
    alpha recommended) is refused until `steer report --redecide` takes its decisions again;
    no figure changes."""
    from steering.record import redecide

    model_dir = _copy_store(paths, smollm, tmp_path)
    record = json.loads(record_path(model_dir).read_text())
    old = json.loads(json.dumps(record))
    for entry in old["concepts"].values():
        entry.pop("child_recommended_alpha")
        entry["recommended_alpha"] = next((p["alpha"] for p in entry["sweep"] if p["d"] > 0.5), None)
    write_record(model_dir, {k: v for k, v in old.items() if k != "record_sha256"})
    state = assess(smollm.name, model_dir, smollm.fingerprint, vectors)
    assert not state.concepts[STEERED].servable and "disagrees with its own figures" in state.concepts[STEERED].reason
    new = redecide(old)
    assert all(new["concepts"][c]["sweep"] == record["concepts"][c]["sweep"] for c in record["concepts"])
    write_record(model_dir, new)
    state = assess(smollm.name, model_dir, smollm.fingerprint, vectors)
    assert state.concepts[STEERED].servable and state.concepts[STEERED].child_recommended_alpha is not None


def test_a_partial_revalidation_keeps_only_entries_measured_alike(paths, tmp_path) -> None:
    """`validate --concepts happy` keeps the stored record's other concepts when the fingerprint,
    layers, sweep settings and baseline are the same (decided again by today's rules), and none
    when any of them differs."""
    from steering.record import merge_earlier

    model_dir = tmp_path / "m"
    model_dir.mkdir()
    shutil.copy(record_path(paths.model_vectors("smollm2-135m-instruct")), record_path(model_dir))
    stored = json.loads(record_path(model_dir).read_text())
    remeasured = {k: v for k, v in stored.items() if k != "record_sha256"}
    remeasured["concepts"] = {"happy": stored["concepts"]["happy"]}
    merged, kept = merge_earlier(model_dir, remeasured)
    assert kept == sorted(c for c in stored["concepts"] if c != "happy") and kept
    assert set(merged["concepts"]) == set(stored["concepts"])
    assert merged["concepts"]["sad"]["sweep"] == stored["concepts"]["sad"]["sweep"]
    for change in ({"settings": dict(remeasured["settings"], max_new_tokens=8)}, {"fingerprint": "0" * 64},
                   {"baseline": dict(remeasured["baseline"], ppl_median=1.0)}):
        merged, kept = merge_earlier(model_dir, dict(remeasured, **change))
        assert kept == [] and set(merged["concepts"]) == {"happy"}, change
    assert merge_earlier(tmp_path / "nothing-here", remeasured) == (remeasured, [])


def test_the_baseline_is_sampled_once_on_the_longer_seed_list() -> None:
    """Each concept's control is the baseline's first replies, so the two seed lists must share
    their start: the allowlist's six seeds begin with the other concepts' two."""
    from steering.validate import SweepSettings, baseline_seeds

    assert baseline_seeds(SweepSettings(prompts=("hi",))) == (0, 1, 2, 3, 4, 5)
    assert baseline_seeds(SweepSettings(prompts=("hi",), seeds=(0, 1, 2), allowlist_seeds=(0,))) == (0, 1, 2)
    with pytest.raises(ValueError, match="must share their start"):
        baseline_seeds(SweepSettings(prompts=("hi",), seeds=(1, 2), allowlist_seeds=(0, 1, 2)))


def test_the_record_carries_each_concepts_configuration_and_its_layers_must_exist(smollm, paths, vectors, tmp_path) -> None:
    from steering.config import SteerConfig

    model_dir = _copy_store(paths, smollm, tmp_path)
    record = json.loads(record_path(model_dir).read_text())
    config = SteerConfig((20, 21, 22), scale="norm", preserve_norm=True)
    cv = vectors["happy"]
    cut = dataclasses.replace(cv, directions={k: v for k, v in cv.directions.items() if k != 22})
    record["concepts"]["happy"] = dict(record["concepts"]["happy"], config=config.as_dict(), vector_sha256=cv.content_sha256)
    record["concepts"]["sad"] = dict(record["concepts"]["sad"], config=config.as_dict(), vector_sha256=cut.content_sha256)
    record.pop("record_sha256")
    write_record(model_dir, record)
    state = assess(smollm.name, model_dir, smollm.fingerprint, {"happy": cv, "sad": dataclasses.replace(cut, concept="sad")})
    assert state.concepts["happy"].config == config
    assert not state.concepts["sad"].servable and "no direction for some of the validated layers" in state.concepts["sad"].reason


def test_the_search_screens_bands_and_variants_and_sweeps_the_best(smollm, paths, vectors) -> None:
    """A small run of the real search: the default configuration first, then every candidate
    band with alpha relative to each layer's norm, then the best of those norm-preserving and
    on generated tokens only; the chosen one is the screen's best and is what the sweep used."""
    from steering.config import SteerConfig, candidate_bands
    from steering.guard import load_guard
    from steering.validate import SweepSettings, _screen_key, baseline, load_eval_prompts, sweep_concept

    settings = SweepSettings(prompts=load_eval_prompts(paths.eval)[:2], seeds=(0,), allowlist_seeds=(0,), screen_seeds=(0,),
                             alpha_grid_rel=(0.024, 0.036), max_new_tokens=6)
    guard = load_guard(paths.guard)
    entry = sweep_concept(smollm, vectors["calm"], load_scorer(paths.eval), settings, baseline(smollm, settings, guard), guard)
    screened = entry["search"]
    bands = candidate_bands(smollm.steering_layers, smollm.num_layers)
    assert [s["name"] for s in screened[:4]] == ["12-18 uniform all"] + [f"{b[0]}-{b[-1]} norm all" for b in bands]
    first_best = SteerConfig.from_dict(max(screened[:4], key=_screen_key)["config"])
    assert [SteerConfig.from_dict(s["config"]) for s in screened[4:]] == [
        first_best.with_(preserve_norm=True), first_best.with_(positions="generated")]
    assert all(s["n"] == 2 and s["alpha_rel"] == 0.036 for s in screened)
    chosen = SteerConfig.from_dict(entry["config"])
    assert chosen == SteerConfig.from_dict(max(screened, key=_screen_key)["config"])
    assert [p["alpha"] for p in entry["sweep"]] == [round(r * chosen.activation_scale(vectors["calm"]), 1) for r in (0.024, 0.036)]
