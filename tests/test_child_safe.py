"""Child-safe ceilings: measured per concept by `steer validate`, kept honest by the record's
hash and figures, and enforced by the Blip profile, whose content guard cannot be switched off."""

import json
import shutil

import pytest

from generator.server import GeneratorConfig, build_service, main as generator_main
from generator.service import GenerateSpec
from steering.errors import ConfigError, FailedPrecondition, InvalidArgument
from steering.profiles import BLIP_ALLOWLIST, Profile, alpha_ceiling
from steering.record import assess, child_safe_alpha, decide, record_path, redecide, write_record
from steering.settings import paths_from_env
from steering.store import load_store


def _point(alpha: float, flag_excess: float = 0.0, degenerate_excess: float = 0.0, ppl: float = 1.0) -> dict:
    return {"alpha": alpha, "d": 1.0, "ppl_ratio": ppl, "degenerate_excess": degenerate_excess, "flag_excess": flag_excess}


def test_child_safe_alpha_is_the_largest_coherent_alpha_without_excess() -> None:
    assert child_safe_alpha([_point(4), _point(6), _point(8, flag_excess=0.03)]) == 6
    # Judged point by point: one looping reply at 4 does not make 6 unsafe, nor 8's flag 12.
    assert child_safe_alpha([_point(4, degenerate_excess=0.01), _point(6)]) == 6
    assert child_safe_alpha([_point(4), _point(8, flag_excess=0.01), _point(12)]) == 12
    assert child_safe_alpha([_point(4, flag_excess=0.01), _point(6, degenerate_excess=0.01)]) is None
    assert child_safe_alpha([_point(4), _point(6, ppl=2.5), _point(8)]) == 4  # past coherence nothing counts
    assert child_safe_alpha([_point(6), _point(4)]) == 6  # ordered by alpha, not by position
    old = {k: v for k, v in _point(4).items() if k != "flag_excess"}
    assert child_safe_alpha([old]) is None  # a record from before the guard is not child-safe


@pytest.fixture(scope="module")
def blip():
    service = build_service(GeneratorConfig(profile=Profile.BLIP))
    yield service
    service.close()


@pytest.fixture(scope="module")
def personal():
    service = build_service(GeneratorConfig(profile=Profile.PERSONAL, guard=False))
    yield service
    service.close()


def _states(service):
    """The concepts this service's profile serves."""
    slot = service.slot("")
    return slot, {c: s for c, s in slot.steerability.concepts.items() if service.ceiling(s)}


def test_the_record_names_a_ceiling_for_every_blip_concept_it_serves(blip) -> None:
    slot, states = _states(blip)
    with_ceiling = {c: s for c, s in states.items() if s.child_safe_alpha is not None}
    print("\n" + "\n".join(f"{c}: max {s.max_alpha} child-safe {s.child_safe_alpha} ceiling {blip.ceiling(s)}"
                           for c, s in sorted(states.items())))
    assert with_ceiling, "no Blip concept has a child-safe alpha: re-run `steer validate`"
    for concept, state in with_ceiling.items():
        assert blip.ceiling(state) == min(state.max_alpha, state.child_safe_alpha)
        # Served by default where the whole 95% interval of d clears the gate, on the allowlist's replies.
        served = state.effect_at(state.child_recommended_alpha)
        assert served.alpha <= blip.ceiling(state) and served.low > 0.5 and served.n >= 96


def test_blip_refuses_alphas_above_the_ceiling_and_defaults_below_it(blip, personal) -> None:
    slot, states = _states(blip)
    for concept, state in slot.steerability.concepts.items():
        if state.servable and concept not in states:  # passed the gate, but not at a child-safe alpha
            with pytest.raises(FailedPrecondition, match="child-safe"):
                blip.concept_state(slot, concept)
    for concept, state in states.items():
        ceiling = blip.ceiling(state)
        steering = blip._steering(slot, concept, None)  # the default alpha
        assert steering.alpha <= ceiling and steering.max_alpha == ceiling
        with pytest.raises(InvalidArgument, match="child-safe ceiling|max_alpha"):
            blip._steering(slot, concept, ceiling + 0.5)
        # The personal profile serves up to the validated max_alpha.
        pslot = personal.slot("")
        assert personal._steering(pslot, concept, state.max_alpha).alpha == state.max_alpha


def test_every_blip_job_carries_the_guard(blip) -> None:
    slot, job = blip.build_job(GenerateSpec(prompt="Hello!"), lambda _e: None, None)
    assert job.guard is blip.guard and job.guard is not None


def test_the_guard_cannot_be_switched_off_in_blip(personal, capsys) -> None:
    with pytest.raises(ConfigError, match="always runs the content guard"):
        build_service(GeneratorConfig(profile=Profile.BLIP, guard=False))
    with pytest.raises(SystemExit) as exc:  # Blip's program has no such option; the personal one does
        generator_main(["--no-guard"])
    assert exc.value.code == 2 and "unrecognized arguments: --no-guard" in capsys.readouterr().err
    assert personal.guard is None


def test_a_tampered_child_safe_alpha_is_not_served(paths, tmp_path) -> None:
    model_dir = paths.model_vectors("smollm2-135m-instruct")
    record = json.loads(record_path(model_dir).read_text())
    concept = next(c for c, e in record["concepts"].items() if e.get("child_safe_alpha") is not None and c in BLIP_ALLOWLIST)
    copy = tmp_path / "model"
    shutil.copytree(model_dir, copy, ignore=shutil.ignore_patterns("plots"))
    record["concepts"][concept]["child_safe_alpha"] = record["concepts"][concept]["max_alpha"] * 3
    write_record(copy, {k: v for k, v in record.items() if k != "record_sha256"})  # re-hashed: only the figures disagree
    vectors, _ = load_store(copy, [concept], fingerprint=record["fingerprint"], hidden_size=576)
    state = assess("smollm2-135m-instruct", copy, record["fingerprint"], vectors).concepts[concept]
    assert not state.servable and "child_safe_alpha" in state.reason


def test_alpha_ceiling_is_the_lower_of_the_two_in_blip_only(blip) -> None:
    _, states = _states(blip)
    state = next(s for s in states.values() if s.child_safe_alpha is not None)
    assert alpha_ceiling(state, Profile.BLIP) == min(state.max_alpha, state.child_safe_alpha)
    assert alpha_ceiling(state, Profile.PERSONAL) == state.max_alpha


def test_steering_away_is_decided_on_its_own_sweep() -> None:
    def point(alpha: float, d: float, ppl: float = 1.0) -> dict:
        return {"alpha": alpha, "d": d, "ppl_ratio": ppl, "degenerate_excess": 0.0, "n": 96, "n_control": 96}

    # Away from the concept the score must fall: d of -0.9 passes, and max_alpha is a magnitude.
    assert decide([point(-4, -0.2), point(-6, -0.9), point(-8, -1.2, ppl=3.0)], sign=-1.0) == ("passed", -6, 6)
    assert decide([point(-4, 0.8), point(-6, 0.9)], sign=-1.0)[0] == "inverted"  # pushed the other way
    assert decide([point(-4, -0.2)], sign=-1.0)[0] == "failed"
    assert decide([point(4, 0.9)]) == ("passed", 4, 4)


def test_blip_never_steers_away_from_a_concept(blip) -> None:
    slot, states = _states(blip)
    assert states, "Blip serves no concept: nothing to steer away from"
    for concept, state in states.items():
        for alpha in (-1e-3, -1.0, -state.max_alpha):
            with pytest.raises(InvalidArgument, match="only steers toward a concept"):
                blip._steering(slot, concept, alpha)


def test_personal_steers_away_only_where_the_record_validated_it(personal, tmp_path, monkeypatch) -> None:
    """No direction away from a concept passes in the committed record, so every negative alpha is
    refused there; the serving of a validated one is shown on a copy of the record whose happy
    sweep away (or, where none is recorded, its positive sweep mirrored) is shifted past the gate
    and decided again."""
    slot = personal.slot("")
    assert all(s.negative_max_alpha is None for s in slot.steerability.concepts.values())
    for concept in [c for c, s in slot.steerability.concepts.items() if s.servable]:
        with pytest.raises(FailedPrecondition, match="negative direction"):
            personal._steering(slot, concept, -1.0)
    src, dst = paths_from_env().vectors, tmp_path / "vectors"
    for sub in ("pairs", "eval", "guard"):
        shutil.copytree(src / sub, dst / sub)
    model_dir = dst / "smollm2-135m-instruct"
    shutil.copytree(src / model_dir.name, model_dir, ignore=shutil.ignore_patterns("plots"))
    record = json.loads(record_path(model_dir).read_text())
    happy = record["concepts"]["happy"]
    if "negative" not in happy:  # not swept since happy was last re-validated: its positive sweep, mirrored
        happy["negative"] = {"sweep": [dict(p, alpha=-p["alpha"], d=-p["d"]) for p in happy["sweep"]]}
    for point in happy["negative"]["sweep"]:
        point["d"] -= 0.3
    write_record(model_dir, redecide(record))
    monkeypatch.setenv("STEER_VECTORS_DIR", str(dst))
    shifted = build_service(GeneratorConfig(profile=Profile.PERSONAL, guard=False))
    try:
        slot = shifted.slot("")
        servable = {c: s for c, s in slot.steerability.concepts.items() if s.servable}
        away = {c: s for c, s in servable.items() if s.negative_max_alpha is not None}
        assert set(away) == {"happy"}
        state = away["happy"]
        assert shifted._steering(slot, "happy", -state.negative_max_alpha).alpha == -state.negative_max_alpha
        with pytest.raises(InvalidArgument, match="away from it"):
            shifted._steering(slot, "happy", -state.negative_max_alpha - 0.5)
        for concept in set(servable) - set(away):
            with pytest.raises(FailedPrecondition, match="negative direction"):
                shifted._steering(slot, concept, -1.0)
    finally:
        shifted.close()


def test_every_tag_the_tagger_emits_maps_to_a_concept_blip_serves(blip) -> None:
    """The shipped policy sends no tag to a concept Blip's Chat would answer plainly, and the
    nervous child gets empathy, as the write-up asks, served from the record."""
    from steering.vocabulary import TAGS

    assert set(blip.policy.concepts) == set(TAGS)
    assert blip.policy.concept_for("anxious") == "empathy"
    assert blip.slot("").steerability.concepts["empathy"].blip is not None
    assert blip.unserved_policy_tags() == {}
