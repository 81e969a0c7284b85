"""Mixtral-family MoE models: layer resolution, steering hooks and loading under both expert namings.

transformers 5 builds Mixtral's expert block as `mlp` holding fused expert tensors
(`experts.gate_up_proj`, `experts.down_proj`); checkpoints saved before 5 name it
`block_sparse_moe` with separate `experts.E.w1/w2/w3` weights, which transformers converts on
load. Granite MoE models still name the module itself `block_sparse_moe`. Tiny random models
only: these tests check structure and plumbing, not behaviour.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, pre_tokenizers
from tokenizers import models as tokenizer_models
from transformers import PreTrainedTokenizerFast

from steering.errors import ModelLoadError
from steering.hooks import steer
from steering.layers import DecoderLayers, layer_output_tensor, resolve_layers
from steering.loading import CACHE_MARKER, LoadedModel, cache_dir_for, fingerprint, load_model
from steering.registry import ModelEntry, load_registry
from tiny_models import HIDDEN_SIZE, NUM_LAYERS, VOCAB_SIZE, tiny_model

BATCH, SEQ = 2, 7
TEMPLATE = "model.layers.{num}"
_FUSED_EXPERT = re.compile(r"(model\.layers\.\d+)\.mlp\.(gate\.weight|experts\.gate_up_proj|experts\.down_proj)")


# ---- tiny models and checkpoints ------------------------------------------------------------


@pytest.fixture(scope="module")
def mixtral() -> transformers.MixtralForCausalLM:
    model, _ = tiny_model("mixtral")
    return model


@pytest.fixture(scope="module")
def input_ids() -> torch.Tensor:
    return torch.randint(3, VOCAB_SIZE, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))


def _granite(kind: str) -> torch.nn.Module:
    """A tiny Granite MoE model: these keep `block_sparse_moe` as the module's own name."""
    common = {
        "vocab_size": VOCAB_SIZE,
        "hidden_size": HIDDEN_SIZE,
        "intermediate_size": 32,
        "num_hidden_layers": NUM_LAYERS,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "max_position_embeddings": 256,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    shared = {**common, "shared_intermediate_size": 32}
    t = transformers
    config, model_class = {
        "granitemoe": (lambda: t.GraniteMoeConfig(**common), t.GraniteMoeForCausalLM),
        "granitemoeshared": (lambda: t.GraniteMoeSharedConfig(**shared), t.GraniteMoeSharedForCausalLM),
        # Mamba and attention blocks alternate; both carry the MoE under the same name.
        "granitemoehybrid": (
            lambda: t.GraniteMoeHybridConfig(
                **shared,
                layer_types=["mamba", "attention"] * (NUM_LAYERS // 2),
                mamba_n_heads=4,
                mamba_d_head=32,
                mamba_d_state=16,
                mamba_n_groups=1,
                mamba_chunk_size=16,
            ),
            t.GraniteMoeHybridForCausalLM,
        ),
    }[kind]
    config = config()
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    return model_class(config).to(torch.float32).eval()


def legacy_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights under the pre-5 Mixtral names, one w1/w2/w3 per expert.

    transformers' "mixtral" conversion (conversion_mapping.py) stacks per-expert weights on
    dim 0 and concatenates w1 (gate) then w3 (up) on dim 1, without transposing:
    gate_up_proj[e] = cat(w1_e, w3_e) is [2 * intermediate, hidden], down_proj[e] = w2_e is
    [hidden, intermediate]. This inverts it.
    """
    out: dict[str, torch.Tensor] = {}
    for key, tensor in model.state_dict().items():
        match = _FUSED_EXPERT.fullmatch(key)
        if match is None:
            out[key] = tensor.clone()
            continue
        block, part = f"{match[1]}.block_sparse_moe", match[2]
        if part == "gate.weight":  # the router keeps its name
            out[f"{block}.gate.weight"] = tensor.clone()
        elif part == "experts.gate_up_proj":
            gate, up = tensor.chunk(2, dim=1)
            for expert in range(tensor.shape[0]):
                out[f"{block}.experts.{expert}.w1.weight"] = gate[expert].clone()
                out[f"{block}.experts.{expert}.w3.weight"] = up[expert].clone()
        else:
            for expert in range(tensor.shape[0]):
                out[f"{block}.experts.{expert}.w2.weight"] = tensor[expert].clone()
    return out


def _tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the tiny vocab: the loader converts the tokenizer too."""
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, VOCAB_SIZE)}}
    tokenizer = Tokenizer(tokenizer_models.WordLevel(vocab, unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def write_checkpoint(directory: Path, model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> Path:
    """A checkpoint directory (config, tokenizer, one safetensors file) holding exactly `weights`."""
    directory.mkdir(parents=True)
    config = copy.deepcopy(model.config)
    config.architectures = [type(model).__name__]
    config.save_pretrained(directory)
    _tiny_tokenizer().save_pretrained(directory)
    tensors = {key: value.contiguous() for key, value in weights.items()}
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    return directory


def local_entry(root: Path, name: str, directory: Path) -> ModelEntry:
    """The registry entry for a local checkpoint, read from a models.toml like the real one."""
    registry = root / f"{name}.toml"
    registry.write_text(f'[models.{name}]\nsource = {{ kind = "local", path = "{directory}" }}\n')
    return load_registry(registry).get(name)


# ---- steering checks shared by every model here ---------------------------------------------


def _recorder(into: list[torch.Tensor]):
    def record(_module: torch.nn.Module, _args: object, output: object) -> None:
        into.append(layer_output_tensor(output).detach().clone())

    return record


def _run(
    model: torch.nn.Module, layers: DecoderLayers, input_ids: torch.Tensor, deltas: dict[int, torch.Tensor]
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """Logits, and every layer's output before and after the steering hooks.

    Forward hooks run in registration order and each sees the output the previous one
    returned, so recorders registered around steer()'s hooks see both sides of them.
    """
    before: list[torch.Tensor] = []
    after: list[torch.Tensor] = []
    handles = [layer.register_forward_hook(_recorder(before)) for layer in layers]
    try:
        with steer(layers, deltas):
            handles += [layer.register_forward_hook(_recorder(after)) for layer in layers]
            with torch.no_grad():
                logits = model(input_ids=input_ids).logits
    finally:
        for handle in handles:
            handle.remove()
    return logits, before, after


def assert_steering_adds_exactly_the_delta(model: torch.nn.Module, layers: DecoderLayers, input_ids: torch.Tensor) -> None:
    """steer() adds each row's delta to the hooked layers' outputs and nothing else."""
    hidden = model.config.hidden_size
    generator = torch.Generator().manual_seed(1)
    hooked = (1, len(layers) - 1)
    # Row 0 is steered, row 1 is not: one batch carries both, as in serving.
    deltas = {layer: torch.stack([4 * torch.randn(hidden, generator=generator), torch.zeros(hidden)]) for layer in hooked}

    base_logits, base_outputs, _ = _run(model, layers, input_ids, {})
    logits, before, after = _run(model, layers, input_ids, deltas)

    assert len(before) == len(after) == len(layers)
    for index, (raw, steered) in enumerate(zip(before, after, strict=True)):
        assert steered.shape == raw.shape == (BATCH, SEQ, hidden)
        assert steered.dtype == raw.dtype == torch.float32
        expected = raw + deltas[index][:, None, :] if index in hooked else raw
        assert torch.equal(steered, expected), f"layer {index}"
    # Layers up to the first hooked one see the same input with and without steering.
    for index in range(hooked[0] + 1):
        torch.testing.assert_close(before[index], base_outputs[index], rtol=0, atol=1e-6)
    torch.testing.assert_close(after[hooked[0]], base_outputs[hooked[0]] + deltas[hooked[0]][:, None, :], rtol=0, atol=1e-6)

    assert logits.shape == base_logits.shape == (BATCH, SEQ, model.config.vocab_size)
    assert logits.dtype == base_logits.dtype
    assert (logits[0] - base_logits[0]).abs().max() > 1e-2  # steering moved the steered row
    # The unsteered row only shares expert batches with the steered one (routing is per token).
    torch.testing.assert_close(logits[1], base_logits[1], rtol=0, atol=1e-5)


# ---- 1a: transformers 5 layout, expert block named `mlp` with fused experts -----------------


def test_current_layout_names_the_moe_block_mlp(mixtral: torch.nn.Module) -> None:
    block = mixtral.model.layers[0]
    assert type(block.mlp).__name__ == "MixtralSparseMoeBlock"
    assert not hasattr(block, "block_sparse_moe")
    intermediate = mixtral.config.intermediate_size
    assert block.mlp.experts.gate_up_proj.shape == (4, 2 * intermediate, HIDDEN_SIZE)
    assert block.mlp.experts.down_proj.shape == (4, HIDDEN_SIZE, intermediate)


def test_current_layout_resolves_and_steers(mixtral: torch.nn.Module, input_ids: torch.Tensor) -> None:
    layers = resolve_layers(mixtral)
    assert layers.template == TEMPLATE
    assert len(layers) == mixtral.config.num_hidden_layers == NUM_LAYERS
    assert layers.modules == tuple(mixtral.model.layers)
    assert_steering_adds_exactly_the_delta(mixtral, layers, input_ids)


# ---- 1b: the pre-5 checkpoint layout, expert block named `block_sparse_moe` ----------------


def test_legacy_split_matches_what_transformers_writes(mixtral: torch.nn.Module, tmp_path: Path) -> None:
    """Our split agrees with transformers' own reverse mapping (save_pretrained's default)."""
    mixtral.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    ours = legacy_state_dict(mixtral)
    assert "model.layers.0.block_sparse_moe.experts.3.w2.weight" in ours
    assert not any(".mlp." in key for key in ours)
    assert sorted(saved) == sorted(ours)
    for key, tensor in ours.items():
        assert torch.equal(saved[key], tensor), key


@pytest.mark.parametrize("layout", ["legacy", "fused"])
def test_checkpoint_loads_identically_and_steers(
    mixtral: torch.nn.Module, input_ids: torch.Tensor, tmp_path: Path, layout: str
) -> None:
    if layout == "legacy":
        directory = write_checkpoint(tmp_path / "ckpt", mixtral, legacy_state_dict(mixtral))
    else:
        directory = write_checkpoint(tmp_path / "ckpt", mixtral, dict(mixtral.state_dict()))
        assert "model.layers.0.mlp.experts.gate_up_proj" in load_file(directory / "model.safetensors")
    loaded: LoadedModel = load_model(local_entry(tmp_path, "tiny-mixtral", directory), tmp_path / "cache")
    model = loaded.model

    assert type(model.model.layers[0].mlp).__name__ == "MixtralSparseMoeBlock"
    reference = mixtral.state_dict()
    assert sorted(model.state_dict()) == sorted(reference)
    for key, tensor in model.state_dict().items():
        assert torch.equal(tensor, reference[key]), key
    model.set_attn_implementation("eager")  # the reference runs eager attention
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=input_ids).logits, mixtral(input_ids=input_ids).logits, rtol=0, atol=0)

    assert loaded.layers.template == TEMPLATE and loaded.num_layers == NUM_LAYERS
    assert loaded.layers.modules == tuple(model.model.layers)
    assert_steering_adds_exactly_the_delta(model, loaded.layers, input_ids)


# ---- 1c: models that still name the module `block_sparse_moe` -------------------------------


@pytest.mark.parametrize("kind", ["granitemoe", "granitemoeshared", "granitemoehybrid"])
def test_block_sparse_moe_module_resolves_and_steers(kind: str, input_ids: torch.Tensor) -> None:
    model = _granite(kind)
    block = model.model.layers[0]
    assert "Moe" in type(block.block_sparse_moe).__name__
    layers = resolve_layers(model)
    assert layers.template == TEMPLATE
    assert len(layers) == model.config.num_hidden_layers == NUM_LAYERS
    assert_steering_adds_exactly_the_delta(model, layers, input_ids)


def test_moe_marker_alone_identifies_the_channel_mixer() -> None:
    """Granite MoE blocks have no `mlp` anywhere: only the "moe" marker recognises them."""
    model = _granite("granitemoe")
    names = [name for name, _ in model.model.layers[0].named_modules() if name]
    assert "block_sparse_moe" in names
    assert not any("mlp" in name or "ffn" in name or "feed_forward" in name for name in names)
    assert resolve_layers(model).template == TEMPLATE


# ---- 2: checkpoints whose weights do not all load are refused -------------------------------


def test_checkpoint_with_keys_no_converter_maps_is_refused(mixtral: torch.nn.Module, tmp_path: Path) -> None:
    weights = {key.replace(".block_sparse_moe.", ".moe_block."): value for key, value in legacy_state_dict(mixtral).items()}
    directory = write_checkpoint(tmp_path / "ckpt", mixtral, weights)
    entry = local_entry(tmp_path, "renamed", directory)
    with pytest.raises(ModelLoadError) as info:
        load_model(entry, tmp_path / "cache")
    message = str(info.value)
    # The expert converters still merge moe_block.experts.*; the block name stays unplaced.
    moved = 3 * NUM_LAYERS  # gate, gate_up_proj, down_proj per layer
    assert f"{moved} model weight(s) missing from the checkpoint, which would be randomly initialised" in message
    assert "model.layers.0.mlp.experts.down_proj" in message
    assert f"{moved} checkpoint key(s) with no place in MixtralForCausalLM, which would be dropped" in message
    assert "model.layers.0.moe_block.experts.down_proj" in message
    assert f"... ({moved - 3} more)" in message
    assert f"this is transformers {transformers.__version__}" in message
    assert "re-export it there with save_pretrained" in message
    # Refused during conversion: nothing was cached for a later load to pick up.
    assert not cache_dir_for(entry, fingerprint(entry), tmp_path / "cache").exists()


@pytest.mark.parametrize(
    ("deleted", "expected"),
    [
        ("model.layers.1.self_attn.q_proj.weight", "1 model weight(s) missing from the checkpoint"),
        # One expert short: the per-expert merge itself fails.
        ("model.layers.1.block_sparse_moe.experts.2.w1.weight", "could not load the weights"),
    ],
)
def test_checkpoint_missing_a_weight_is_refused(mixtral: torch.nn.Module, tmp_path: Path, deleted: str, expected: str) -> None:
    weights = legacy_state_dict(mixtral)
    del weights[deleted]
    directory = write_checkpoint(tmp_path / "ckpt", mixtral, weights)
    with pytest.raises(ModelLoadError) as info:
        load_model(local_entry(tmp_path, "short", directory), tmp_path / "cache")
    message = str(info.value)
    assert expected in message
    assert "Fix:" in message and "restore the complete checkpoint" in message
    if "q_proj" in deleted:
        assert deleted in message


def test_checkpoint_with_a_wrongly_shaped_weight_is_refused(mixtral: torch.nn.Module, tmp_path: Path) -> None:
    weights = legacy_state_dict(mixtral)
    weights["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(HIDDEN_SIZE, HIDDEN_SIZE // 2)
    directory = write_checkpoint(tmp_path / "ckpt", mixtral, weights)
    with pytest.raises(ModelLoadError, match=r"(?s)could not load the weights of 'misshapen'.*LOAD REPORT.*Fix:"):
        load_model(local_entry(tmp_path, "misshapen", directory), tmp_path / "cache")


def test_bad_cached_copy_is_refused_at_load(mixtral: torch.nn.Module, tmp_path: Path) -> None:
    """A cache filled before the check existed is checked again when loaded."""
    source = write_checkpoint(tmp_path / "ckpt", mixtral, legacy_state_dict(mixtral))
    entry = local_entry(tmp_path, "stale", source)
    fp = fingerprint(entry)
    weights = {key: value for key, value in mixtral.state_dict().items() if key != "model.norm.weight"}
    cached = write_checkpoint(cache_dir_for(entry, fp, tmp_path / "cache"), mixtral, weights)
    (cached / CACHE_MARKER).write_text(f'{{"model": "stale", "fingerprint": "{fp}"}}')
    with pytest.raises(ModelLoadError, match=r"1 model weight\(s\) missing from the checkpoint.*: model\.norm\.weight"):
        load_model(entry, tmp_path / "cache")


def test_tied_embeddings_are_not_reported_missing(tmp_path: Path) -> None:
    """Tied checkpoints (SmolLM2's too) carry no lm_head.weight; that is not a missing weight."""
    model, _ = tiny_model("llama")
    config = copy.deepcopy(model.config)
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    tied = transformers.LlamaForCausalLM(config).eval()
    weights = {key: value for key, value in tied.state_dict().items() if key != "lm_head.weight"}
    directory = write_checkpoint(tmp_path / "ckpt", tied, weights)
    loaded = load_model(local_entry(tmp_path, "tied", directory), tmp_path / "cache")
    assert loaded.model.lm_head.weight is loaded.model.model.embed_tokens.weight
    assert torch.equal(loaded.model.lm_head.weight, tied.model.embed_tokens.weight)
