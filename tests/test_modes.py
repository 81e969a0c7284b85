"""Blip's three modes (steering, a register instruction, both): measured by validation under
Blip's system prompt, decided from the record's own figures, and served by Chat."""

import asyncio
import json
import shutil
import tomllib

import grpc
import pytest

from generator.policy import DEFAULT_POLICY
from generator.server import GeneratorConfig, build_service, serve
from protos.steering.v1 import generator_pb2 as pb
from protos.steering.v1 import generator_pb2_grpc, tagger_pb2
from serving.server import ServerSettings
from steering.generate import render_prompt
from steering.profiles import BLIP_ALLOWLIST, Profile
from steering.record import assess, blip_decision, record_path, redecide, write_record
from steering.store import load_store
from steering.validate import load_blip_setting
from steering.vocabulary import Mode
from tagger.server import serve as serve_tagger

from grpc_helpers import chat


def _point(alpha: float, d: float, ppl: float = 1.0, flag_excess: float = 0.0) -> dict:
    return {"alpha": alpha, "alpha_rel": 0.0, "d": d, "n": 96, "n_control": 96, "ppl_ratio": ppl, "degenerate": 0.0,
            "degenerate_excess": 0.0, "flags": max(flag_excess, 0.0), "flag_excess": flag_excess, "flag_themes": {}}


def _entry(steer: list[dict], prompt: dict | None = None, both: list[dict] | None = None) -> dict:
    entry: dict = {"sweep": steer}
    if prompt is not None:
        entry["modes"] = {"system_prompt": "s", "instruction": "Sound happy.", "prompt": prompt, "both": both or [], "examples": {}}
    return entry


def test_blip_serves_the_mode_with_the_largest_d_among_those_that_pass() -> None:
    steer = [_point(4, 0.6), _point(8, 0.95)]  # 8 passes: its interval is about 0.65 to 1.25
    assert blip_decision(_entry(steer))["mode"] == "steer" and blip_decision(_entry(steer))["alpha"] == 8
    # The instruction alone moves the register further: prompt mode, no alpha.
    chosen = blip_decision(_entry(steer, _point(0, 1.4), [_point(6, 1.2)]))
    assert (chosen["mode"], chosen["alpha"], chosen["n"]) == ("prompt", None, 96) and chosen["d_low"] > 0.5
    # Both together at their own best child-safe alpha, where it beats the other two.
    assert blip_decision(_entry(steer, _point(0, 1.4), [_point(6, 1.6), _point(8, 2.0)]))["alpha"] == 8
    # A mode counts only where it is coherent and child-safe: an extra flag at 8 leaves 6.
    chosen = blip_decision(_entry(steer, _point(0, 1.4), [_point(6, 1.6), _point(8, 2.0, flag_excess=0.0104)]))
    assert (chosen["mode"], chosen["alpha"]) == ("both", 6)
    assert blip_decision(_entry(steer, _point(0, 3.0, ppl=2.5)))["mode"] == "steer"  # the instruction broke the text
    assert blip_decision(_entry(steer, _point(0, 3.0, flag_excess=0.0104)))["mode"] == "steer"
    # Nothing passes the gate: the concept's tags are answered plainly.
    weak = _entry([_point(4, 0.3), _point(8, 0.6)], _point(0, 0.62), [_point(6, 0.7, ppl=2.2)])
    assert blip_decision(weak) == {"mode": None, "alpha": None, "d": None, "d_low": None, "d_high": None, "n": None}


def test_blip_json_speaks_with_the_policy_s_system_prompt() -> None:
    """Validation measures the modes under the system prompt Chat serves; the two files must agree."""
    setting = load_blip_setting(DEFAULT_POLICY.parents[2] / "vectors" / "eval")
    policy = tomllib.loads(DEFAULT_POLICY.read_text(encoding="utf-8"))
    assert setting.system_prompt == policy["system_prompt"]
    assert set(setting.instructions) == BLIP_ALLOWLIST


def _with_modes(record: dict, concept: str, prompt_d: float, both_d: float, instruction: str) -> None:
    """Give a concept's entry modes whose figures make one mode win (prompt_d or both_d large)."""
    entry = record["concepts"][concept]
    alphas = [p["alpha"] for p in entry["sweep"]][1:3]
    entry["modes"] = {"system_prompt": "s", "instruction": instruction, "prompt": _point(0.0, prompt_d),
                      "both": [_point(a, both_d + k) for k, a in enumerate(alphas)], "examples": {}}


@pytest.fixture(scope="module")
def moded(paths, tmp_path_factory):
    """A copy of the vector store whose record serves happy by prompt and calm by both."""
    src, dst = paths.vectors, tmp_path_factory.mktemp("moded") / "vectors"
    for sub in ("pairs", "eval", "guard"):
        shutil.copytree(src / sub, dst / sub)
    model_dir = dst / "smollm2-135m-instruct"
    shutil.copytree(src / model_dir.name, model_dir, ignore=shutil.ignore_patterns("plots"))
    record = json.loads(record_path(model_dir).read_text())
    _with_modes(record, "happy", prompt_d=4.0, both_d=0.1, instruction="Sound really happy and cheerful.")
    _with_modes(record, "calm", prompt_d=0.1, both_d=4.0, instruction="Be calm.")
    write_record(model_dir, redecide(record))
    return dst


def test_the_record_s_mode_is_decided_again_when_read(moded, tmp_path) -> None:
    model_dir = tmp_path / "model"  # tampered below: a copy of its own
    shutil.copytree(moded / "smollm2-135m-instruct", model_dir)
    record = json.loads(record_path(model_dir).read_text())
    vectors, _ = load_store(model_dir, ["happy", "calm"], fingerprint=record["fingerprint"], hidden_size=576)
    states = assess("smollm2-135m-instruct", model_dir, record["fingerprint"], vectors).concepts
    assert states["happy"].blip.mode is Mode.PROMPT and states["happy"].blip.alpha is None
    assert states["calm"].blip.mode is Mode.BOTH and states["calm"].blip.instruction == "Be calm."
    # A mode written into the record that its own figures do not give is not served.
    record["concepts"]["happy"]["blip"] = dict(record["concepts"]["happy"]["blip"], mode="both", alpha=4.1)
    write_record(model_dir, {k: v for k, v in record.items() if k != "record_sha256"})
    state = assess("smollm2-135m-instruct", model_dir, record["fingerprint"], vectors).concepts["happy"]
    assert state.blip is None and not state.servable and "Blip mode" in state.reason


def test_chat_serves_each_concept_in_its_recorded_mode(moded, monkeypatch) -> None:
    """Through gRPC with the real tagger: happy's turn gets the instruction and no steering,
    calm's the instruction and steering at the alpha measured for the two together; the
    instruction is in the prompt (its token count says so) and Started names the mode."""
    monkeypatch.setenv("STEER_VECTORS_DIR", str(moded))
    service = build_service(GeneratorConfig(profile=Profile.BLIP))
    try:
        turns = ["I got a gold star today and I'm so happy!", "I'm all snuggled up in bed, can you tell me a quiet story?"]
        async def body():
            tagger = await serve_tagger(ServerSettings())
            try:
                return await chat(service, turns, f"127.0.0.1:{tagger.port}", max_tokens=8)
            finally:
                await tagger.stop()

        events = asyncio.run(body())
        slot = service.slot("")
        info = {c.name: c for c in asyncio.run(_list_models(service)).models[0].concepts}
    finally:
        service.close()
    labels = [tagger_pb2.Emotion.Name(e.tag.label).removeprefix("EMOTION_").lower() for e in events if e.WhichOneof("event") == "tag"]
    concepts = [service.policy.concept_for(label) for label in labels]
    assert concepts == ["happy", "calm"], f"the tagger read the turns as {labels}"
    starts = [e.reply.started for e in events if e.WhichOneof("event") == "reply" and e.reply.WhichOneof("event") == "started"]
    happy, calm = starts
    assert (happy.concept, happy.mode, happy.alpha, list(happy.layers)) == ("happy", "prompt", 0.0, [])
    both = slot.steerability.concepts["calm"].blip
    assert (calm.concept, calm.mode) == ("calm", "both") and calm.alpha == pytest.approx(both.alpha)
    assert list(calm.layers) and both.alpha in [p["alpha"] for p in _recorded(moded)["calm"]["modes"]["both"]]
    system = service.policy.system_prompt
    expected_tokens = len(slot.loaded.tokenizer(render_prompt(slot.loaded, [
        {"role": "system", "content": f"{system} Sound really happy and cheerful."}, {"role": "user", "content": turns[0]}]),
        add_special_tokens=False)["input_ids"])
    assert happy.prompt_tokens == expected_tokens
    assert (info["happy"].chat_mode, info["happy"].chat_alpha, info["happy"].chat_d) == ("prompt", 0.0, pytest.approx(4.0))
    assert both.effect.d == pytest.approx(5.0)  # the stronger of the two both points
    assert info["calm"].chat_mode == "both" and info["calm"].chat_replies == 96


def _recorded(vectors_dir) -> dict:
    return json.loads(record_path(vectors_dir / "smollm2-135m-instruct").read_text())["concepts"]


@pytest.fixture(scope="module")
def vectors(smollm, paths):
    return load_store(paths.model_vectors(smollm.name), ["calm"], fingerprint=smollm.fingerprint,
                      hidden_size=smollm.hidden_size, layers=smollm.steering_layers)[0]


async def _list_models(service) -> pb.ListModelsResponse:
    running = await serve(ServerSettings(), GeneratorConfig(), service=service)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.server.port}") as channel:
            return await generator_pb2_grpc.GeneratorStub(channel).ListModels(pb.ListModelsRequest())
    finally:
        await running.stop()


def test_validation_measures_the_modes_under_blip_s_system_prompt(smollm, paths, vectors) -> None:
    """A small real run: the allowlist concept is swept under Blip's system prompt against the
    Blip baseline, the instruction alone is one unsteered point, both are swept at the grid's
    middle strengths, and the decision is the record's own rule."""
    from steering.guard import load_guard
    from steering.scoring import load_scorer
    from steering.validate import SweepSettings, baseline, load_eval_prompts, sweep_concept

    settings = SweepSettings(prompts=load_eval_prompts(paths.eval)[:2], seeds=(0,), allowlist_seeds=(0,), search=False,
                             max_new_tokens=6, blip=load_blip_setting(paths.eval))
    guard = load_guard(paths.guard)
    plain, blip = baseline(smollm, settings, guard), baseline(smollm, settings, guard, blip=True)
    assert [g.text for g in plain.replies] != [g.text for g in blip.replies]  # the system prompt changed the replies
    entry = sweep_concept(smollm, vectors["calm"], load_scorer(paths.eval), settings, plain, guard, blip_base=blip)
    modes = entry["modes"]
    assert modes["instruction"] == settings.blip.instructions["calm"] and modes["system_prompt"] == settings.blip.system_prompt
    assert modes["prompt"]["alpha"] == 0.0 and modes["prompt"]["n"] == 2
    assert [p["alpha_rel"] for p in modes["both"]] == list(settings.both_grid_rel) and all(p["alpha"] > 0 for p in modes["both"])
    assert entry["blip"] == blip_decision(entry)
    assert len({modes["examples"]["prompt"], entry["examples"][str(entry["sweep"][0]["alpha"])]}) == 2
    with pytest.raises(ValueError, match="Blip's system prompt"):
        sweep_concept(smollm, vectors["calm"], load_scorer(paths.eval), settings, plain, guard)
