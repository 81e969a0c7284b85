"""The bench's smoke run: tiny sizes, only checks that it runs end to end and writes
well-formed results. Timings are never asserted in tests. Two minutes of five processes
starting and loading models: `make reliability` runs it, `make test` leaves it out. And the
count of weight bytes a step reads, on a tiny model (it is in `make test`)."""

import json
import math
import subprocess
import sys

import pytest

from steering.settings import REPO_ROOT


def _positive(x: object) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.mark.heavy
def test_bench_smoke_writes_well_formed_results(tmp_path) -> None:
    proc = subprocess.run([sys.executable, "-m", "bench", "--smoke", "--out", str(tmp_path)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads((tmp_path / "results.json").read_text())
    assert r["smoke"] is True and r["machine"]["cores"] >= 1
    single = r["single_stream"]
    for case in ("unsteered", "steered_one_layer", "steered_band", "steered_band_kl", "steered_band_gate",
                 "transformers_generate"):
        assert _positive(single[case]["tokens_per_s"]), case
    # The peers live in .venv-bench only; here they are reported as missing, not faked.
    for peer in ("repeng", "steering_vectors"):
        assert peer in single or "make bench" in r["peers_missing"][peer]
    assert set(r["concurrency"]) == {"1", "2"}
    assert all(_positive(c["tokens_per_s"]) and c["ttft_ms_p95"] >= c["ttft_ms_p50"] > 0 for c in r["concurrency"].values())
    assert _positive(r["grpc_ttft"]["grpc_ms_p50"]) and _positive(r["tagger"]["p50_ms"])
    for side in ("prefix_cache_off", "prefix_cache_on"):
        chat = r["chat_first_sentence"][side]
        assert chat["turns"] == 2 and chat["p95_ms"] >= chat["p50_ms"] > 0
        assert r["first_token"][side]["runs"] == 2 and _positive(r["first_token"][side]["p50_ms"])
    assert r["derivation"]["concepts"] == 1 and _positive(r["derivation"]["seconds"])
    assert _positive(r["memory"]["generator_peak_mb"]) and _positive(r["memory"]["tagger_peak_mb"])
    assert _positive(r["physical_limit"]["roofline_tokens_per_s"])
    assert all(_positive(x) for x in r["guard_hold"]["others_tokens_per_s"].values())
    assert all(_positive(c["runner_longest_gap_ms"]) for c in r["join_stall"].values() if isinstance(c, dict))
    fast = r["faster"]
    assert fast["weight_bytes"] < r["physical_limit"]["weight_bytes"]  # the int8 weights are counted, and smaller
    assert f"{fast['model']}_unsteered" in fast["cases"] and "A faster path" in (tmp_path / "results.md").read_text()
    # A larger model is measured where it is installed, and otherwise said to be missing and why.
    for name, other in r["others"].items():
        if "missing" in other:
            assert "install" in other["missing"] and f"{name}: not measured" in (tmp_path / "results.md").read_text()
        else:
            assert all(_positive(x) for x in other["cases"].values()) and _positive(other["roofline_tokens_per_s"])
            assert other["weight_bytes"] > r["physical_limit"]["weight_bytes"]
    names = {t["name"] for t in r["targets"]}
    assert "steering overhead, whole band" in names and any(n.startswith("gRPC added") for n in names)
    table = (tmp_path / "results.md").read_text()
    assert "## Targets" in table and "| unsteered |" in table and "time to first sentence" in table


def test_weight_bytes_counts_every_int8_weight_once_and_one_row_of_an_unread_embedding() -> None:
    """A tiny Llama quantised as the int8 twin is (every Linear of the blocks, and the tied head
    as its own int8 copy): each int8 weight counts (their unpacked copies are fresh tensors, so
    an address reused after one is freed must not hide the next), and the embedding, which no
    head reads now, one row."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from bench.system import weight_bytes
    from steering.layers import resolve_layers
    from steering.loading import quantize_dynamic_int8

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = LlamaForCausalLM(config).eval()
    quantize_dynamic_int8(model, resolve_layers(model))
    linears = [m for m in model.modules() if isinstance(m, torch.ao.nn.quantized.dynamic.Linear)]
    assert len(linears) == 3 * 7 + 1  # q, k, v, o, gate, up, down per layer, and the head
    int8 = sum(m.weight().numel() for m in linears)  # one byte each; Llama's Linears have no bias
    norms = sum(p.numel() * 4 for name, p in model.named_parameters() if "norm" in name)
    assert weight_bytes(model) == int8 + norms + config.hidden_size * 4
