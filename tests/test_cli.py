"""The `steer` command as a user runs it: help everywhere, one-line errors, JSON output.
The console script runs once as a process; the rest call its `main` in process (steer_cli.py)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from steer_cli import steer as run

STEER = str(Path(sys.executable).parent / "steer")
COMMANDS = ("models", "prepare", "pieces", "derive", "pairs-consistency", "generate", "ab", "validate", "compare-twin", "compare-models", "report",
            "export-gguf", "import-gguf", "tag", "chat", "listen")


def test_the_console_script_runs_as_a_process() -> None:
    res = subprocess.run([STEER, "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "usage: steer" in res.stdout
    res = subprocess.run([STEER, "generate", "--prompts-file", "/nonexistent.jsonl"], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert res.stderr.strip() == "steer: error: prompts file /nonexistent.jsonl does not exist"


@pytest.mark.parametrize("command", ("", *COMMANDS))
def test_help(command: str) -> None:
    res = run(*([command] if command else []), "--help")
    assert res.returncode == 0
    assert "usage: steer" in res.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (("generate", "--model", "nope", "--prompt", "hi"), "unknown model 'nope'"),
        (("generate", "--prompts-file", "/nonexistent.jsonl"), "prompts file /nonexistent.jsonl does not exist"),
        (("generate", "--prompt", "hi", "--max-new-tokens", "0"), "--max-new-tokens must be at least 1"),
        (("generate", "--prompt", "hi", "--steer-tokens", "0"), "--steer-tokens must be at least 1"),
        (("validate", "--max-new-tokens", "0"), "--max-new-tokens must be at least 1"),
        (("validate", "--prompts", "17"), "prompts must be 1 to 16"),
        (("generate", "--prompt", "hi", "--concept", "nonexistent"), "no such vector file"),
        (("derive", "--concepts", "nonexistent"), "unknown concept 'nonexistent'"),
        (("derive", "--optimize", "--optimize-steps", "0"), "--optimize-steps at least 1"),
        (("import-gguf", "--concept", "x", "--in", "/nonexistent.gguf"), "no such file"),
        (("compare-models", "--models", "nope"), "unknown model 'nope'"),
    ],
)
def test_errors_are_one_line_without_traceback(args: tuple[str, ...], message: str) -> None:
    res = run(*args)
    assert res.returncode == 1
    assert "Traceback" not in res.stderr
    lines = [line for line in res.stderr.splitlines() if line.startswith("steer:")]
    assert len(lines) == 1 and message in lines[0], res.stderr


def test_bad_prompts_file_line(tmp_path: Path) -> None:
    f = tmp_path / "p.jsonl"
    f.write_text('{"text": "ok"}\nnot json\n')
    res = run("generate", "--prompts-file", str(f))
    assert res.returncode == 1 and f"{f}:2: each line must be a JSON object" in res.stderr


def test_models_lists_both_with_fingerprints() -> None:
    res = run("models", "--json")
    assert res.returncode == 0, res.stderr
    rows = {row["name"]: row for row in map(json.loads, res.stdout.splitlines())}
    assert set(rows) >= {"smollm2-135m-instruct", "gemma3-270m"}
    assert rows["smollm2-135m-instruct"]["default"] is True
    assert len(rows["smollm2-135m-instruct"]["fingerprint"]) == 64
    assert rows["smollm2-135m-instruct"]["vectors"] == 23
    # What Blip's Chat serves, from the record's own choices: every concept it chose a mode for.
    record = json.loads((Path(__file__).parents[1] / "vectors/smollm2-135m-instruct/validation.json").read_text())
    chosen = {c: e["blip"] for c, e in record["concepts"].items() if (e.get("blip") or {}).get("mode")}
    assert rows["smollm2-135m-instruct"]["chat"] == {
        c: b["mode"] + ("" if b["alpha"] is None else f" at {b['alpha']:g}") for c, b in sorted(chosen.items())}


def test_generate_json_one_object_per_prompt(tmp_path: Path) -> None:
    f = tmp_path / "p.jsonl"
    f.write_text('{"text": "Say hello."}\n\n{"text": "Name a colour."}\n')
    res = run("generate", "--prompts-file", str(f), "--concept", "happy", "--alpha", "4", "--max-new-tokens", "8", "--json")
    assert res.returncode == 0, res.stderr
    rows = [json.loads(line) for line in res.stdout.splitlines()]
    assert [r["prompt"] for r in rows] == ["Say hello.", "Name a colour."]
    assert all(r["text"] and r["concept"] == "happy" and r["alpha"] == 4 for r in rows)


def test_export_then_import_gguf(tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "happy.gguf"
    res = run("export-gguf", "--concept", "happy", "--out", str(out))
    assert res.returncode == 0, res.stderr
    vectors = tmp_path / "vectors"
    (vectors / "pairs").mkdir(parents=True)
    monkeypatch.setenv("STEER_VECTORS_DIR", str(vectors))

    def import_(*extra: str) -> subprocess.CompletedProcess:
        return run("import-gguf", "--concept", "happy_copy", "--in", str(out), *extra)

    env_run = import_()
    assert env_run.returncode == 0, env_run.stderr
    from steering.store import read_vector

    stored = vectors / "smollm2-135m-instruct" / "happy_copy.safetensors"
    before = stored.read_bytes()
    again = import_()  # a second import under the same name never overwrites silently
    assert again.returncode != 0 and "already holds a vector" in again.stderr and "Traceback" not in again.stderr
    assert stored.read_bytes() == before
    assert import_("--replace").returncode == 0
    imported = read_vector(stored)
    original = read_vector(Path(__file__).parents[1] / "vectors" / "smollm2-135m-instruct" / "happy.safetensors")
    assert imported.method == "gguf-import" and imported.fingerprint == original.fingerprint
    for layer in imported.layers:
        assert (imported.directions[layer] - original.directions[layer]).abs().max() < 1e-6


def test_compare_models_says_what_blip_serves(paths) -> None:
    """Each allowlist concept's row names the mode, alpha and d that `assess` serves from the
    committed record, and a concept Blip does not serve says so: SmolLM2 serves all eight, Gemma
    (an older record, without guard flags) one."""
    from steering.profiles import BLIP_ALLOWLIST
    from steering.record import assess, record_path
    from steering.store import load_store, stored_concepts

    served: dict[str, set[str]] = {}
    for name, hidden in (("smollm2-135m-instruct", 576), ("gemma3-270m", 640)):
        res = run("compare-models", "--models", name)
        assert res.returncode == 0, res.stderr
        rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in res.stdout.splitlines()[2:]}
        assert set(rows) == BLIP_ALLOWLIST
        model_dir = paths.model_vectors(name)
        record = json.loads(record_path(model_dir).read_text(encoding="utf-8"))
        vectors, refused = load_store(model_dir, stored_concepts(model_dir), fingerprint=record["fingerprint"], hidden_size=hidden)
        assert not refused
        state = assess(name, model_dir, record["fingerprint"], vectors)
        for concept, cells in rows.items():
            blip = state.concepts[concept].blip
            if blip is None:
                assert cells[2] == "nothing (answered plainly)", cells
                safe = state.concepts[concept].child_safe_alpha
                measured = all("flag_excess" in p for p in record["concepts"][concept]["sweep"])
                none = "none child-safe" if measured else "flags not measured"
                assert (cells[4] == none) if safe is None else cells[4].startswith(f"steer {safe:g} ("), cells
            else:
                assert cells[2] == f"{blip.mode} at {blip.alpha:g}" if blip.alpha is not None else cells[2] == str(blip.mode)
                assert cells[3].startswith(f"{blip.effect.d:.2f} [{blip.effect.low:.2f}, {blip.effect.high:.2f}]")
                assert blip.alpha is None or cells[4].startswith(f"{blip.ceiling:g} (")
        served[name] = {c for c in rows if state.concepts[c].blip}
    assert served == {"smollm2-135m-instruct": set(BLIP_ALLOWLIST), "gemma3-270m": {"sad"}}


def test_generate_defaults_to_the_records_recommended_alpha(paths) -> None:
    # Alphas do not transfer between models, so without --alpha a concept is steered at what its
    # own record recommends (as the services do), not at a fixed number.
    record = json.loads((paths.model_vectors("smollm2-135m-instruct") / "validation.json").read_text())
    recommended = record["concepts"]["happy"]["recommended_alpha"]
    res = run("generate", "--prompt", "Say hello.", "--concept", "happy", "--max-new-tokens", "4", "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["alpha"] == recommended and recommended != 6
    # Without a recommended alpha (calm fails steering alone): 0.036 of the band's residual norm, about 6 here.
    res = run("generate", "--prompt", "Say hello.", "--concept", "calm", "--max-new-tokens", "4", "--json")
    assert res.returncode == 0 and record["concepts"]["calm"]["recommended_alpha"] is None
    assert 5 < json.loads(res.stdout)["alpha"] < 7
