"""Structural tests for decoder-layer resolution on tiny random models."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers

from steering.layers import (
    KNOWN_TEMPLATES,
    DecoderLayers,
    LayerPathError,
    layer_output_tensor,
    recorded_outputs,
    replace_layer_output,
    resolve_layers,
)
from tiny_models import ARCHITECTURES, HEAD_DIM, HIDDEN_SIZE, NUM_LAYERS, VOCAB_SIZE, tiny_model

BATCH, SEQ = 2, 7


def _config_layer_count(model: torch.nn.Module) -> int:
    config = model.config
    count = getattr(config, "num_hidden_layers", None)
    return count if count is not None else config.n_layer


class Wrapper(torch.nn.Module):
    """A container whose attribute names defeat every known template."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner


class FusedLlamaBlock(torch.nn.Module):
    """Stands in for a fused (AWQ-style) block: no separate attention or MLP modules."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(hidden_size, hidden_size)

    def forward(self, hidden_states: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        return self.linear(hidden_states)


class Bare(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)


@pytest.fixture(scope="module")
def llama() -> torch.nn.Module:
    model, _ = tiny_model("llama")
    return model


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_resolves_known_template(arch: str) -> None:
    model, expected_template = tiny_model(arch)
    layers = resolve_layers(model)
    assert isinstance(layers, DecoderLayers)
    assert layers.template == expected_template
    assert expected_template in KNOWN_TEMPLATES
    assert len(layers) == _config_layer_count(model) == NUM_LAYERS
    for index in range(len(layers)):
        assert layers[index] is model.get_submodule(expected_template.format(num=index))
    assert list(layers) == list(layers.modules)
    assert len({id(module) for module in layers.modules}) == NUM_LAYERS


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_explicit_expected_template(arch: str) -> None:
    model, expected_template = tiny_model(arch)
    layers = resolve_layers(model, expected_template)
    assert layers.template == expected_template
    assert layers.modules == resolve_layers(model).modules


def test_explicit_template_wins_over_known_templates(llama: torch.nn.Module) -> None:
    draft, _ = tiny_model("llama", seed=1)
    container = torch.nn.Module()
    container.model = llama.model  # matches the first known template
    container.draft = draft

    assert resolve_layers(container).template == "model.layers.{num}"
    assert resolve_layers(container).modules == tuple(llama.model.layers)

    explicit = resolve_layers(container, "draft.model.layers.{num}")
    assert explicit.template == "draft.model.layers.{num}"
    assert explicit.modules == tuple(draft.model.layers)
    assert explicit[0] is not llama.model.layers[0]


def test_wrapped_model_is_guessed_from_module_tree(llama: torch.nn.Module) -> None:
    wrapper = Wrapper(llama)
    for known in KNOWN_TEMPLATES:
        with pytest.raises(AttributeError):
            wrapper.get_submodule(known.format(num=0))

    guessed = resolve_layers(wrapper)
    assert guessed.template == "inner.model.layers.{num}"
    assert guessed.modules == tuple(llama.model.layers)

    explicit = resolve_layers(wrapper, "inner.model.layers.{num}")
    assert explicit.template == "inner.model.layers.{num}"
    assert explicit.modules == guessed.modules


def test_guess_prefers_decoder_blocks_over_longer_lists(llama: torch.nn.Module) -> None:
    wrapper = Wrapper(llama)
    # Longer, but Linear is neither decoder-like by name nor a decoder block.
    wrapper.heads = torch.nn.ModuleList(torch.nn.Linear(HIDDEN_SIZE, HIDDEN_SIZE) for _ in range(9))
    assert resolve_layers(wrapper).template == "inner.model.layers.{num}"


def test_guess_ignores_expert_lists(llama: torch.nn.Module) -> None:
    wrapper = Wrapper(llama)
    # Valid decoder blocks, longer than the real stack, but under an experts path.
    block = llama.model.layers[0]
    wrapper.experts = torch.nn.ModuleList(copy.deepcopy(block) for _ in range(NUM_LAYERS + 2))
    assert resolve_layers(wrapper).template == "inner.model.layers.{num}"


def test_multimodal_language_model_template() -> None:
    text_config = transformers.Gemma3TextConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=HIDDEN_SIZE,
        intermediate_size=2 * HIDDEN_SIZE,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=HEAD_DIM,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    vision_config = transformers.SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=28,
        patch_size=14,
    )
    config = transformers.Gemma3Config(text_config=text_config, vision_config=vision_config, mm_tokens_per_image=4)
    torch.manual_seed(0)
    model = transformers.Gemma3ForConditionalGeneration(config).eval()

    layers = resolve_layers(model)
    assert layers.template == "model.language_model.layers.{num}"
    assert len(layers) == NUM_LAYERS
    assert type(layers[0]).__name__ == "Gemma3DecoderLayer"

    # The vision encoder's blocks look like decoder blocks but the count gives them away.
    with pytest.raises(LayerPathError) as info:
        resolve_layers(model, "model.vision_tower.encoder.layers.{num}")
    message = str(info.value)
    assert "resolved to 2 SiglipEncoderLayer" in message
    assert f"config.num_hidden_layers is {NUM_LAYERS}" in message


def test_missing_template_names_template_and_candidates(llama: torch.nn.Module) -> None:
    with pytest.raises(LayerPathError) as info:
        resolve_layers(llama, "model.blocks.{num}")
    message = str(info.value)
    assert "'model.blocks.{num}'" in message
    assert "matched no module" in message
    assert f"model.layers (length {NUM_LAYERS}, children: LlamaDecoderLayer)" in message
    assert "layer_template" in message
    assert '"model.layers.{num}"' in message
    assert isinstance(info.value, ValueError)


def test_template_without_placeholder_is_rejected(llama: torch.nn.Module) -> None:
    with pytest.raises(LayerPathError, match=r"no \{num\} placeholder"):
        resolve_layers(llama, "model.layers")


@pytest.mark.parametrize(
    ("arch", "template", "class_name", "sub_part"),
    [
        ("llama", "model.layers.{num}.mlp", "LlamaMLP", "mlp"),
        ("llama", "model.layers.{num}.self_attn", "LlamaAttention", "self_attn"),
        ("llama", "model.layers.{num}.self_attn.q_proj", "Linear", "self_attn"),
        ("mixtral", "model.layers.{num}.mlp.experts", "MixtralExperts", "mlp"),
        ("gpt2", "transformer.h.{num}.attn", "GPT2Attention", "attn"),
    ],
)
def test_template_at_non_decoder_modules_is_rejected(arch: str, template: str, class_name: str, sub_part: str) -> None:
    model, _ = tiny_model(arch)
    with pytest.raises(LayerPathError) as info:
        resolve_layers(model, template)
    message = str(info.value)
    assert f"'{template}' resolved to {NUM_LAYERS} module(s)" in message
    assert f"'{template.format(num=0)}' is a {class_name}, which is not a decoder block" in message
    assert f"part of a decoder block (inside '{sub_part}')" in message
    assert "fuse_layers" not in message
    assert "layer_template" in message


def test_block_missing_mlp_is_rejected() -> None:
    model, _ = tiny_model("llama")
    for layer in model.model.layers:
        del layer.mlp
    with pytest.raises(LayerPathError) as info:
        resolve_layers(model)
    message = str(info.value)
    assert "'model.layers.0' is a LlamaDecoderLayer, which is not a decoder block" in message
    assert "it has no MLP/MoE submodule" in message


def test_fused_layers_are_rejected() -> None:
    model, _ = tiny_model("llama")
    model.model.layers = torch.nn.ModuleList(FusedLlamaBlock(HIDDEN_SIZE) for _ in range(NUM_LAYERS))
    for template in (None, "model.layers.{num}"):
        with pytest.raises(LayerPathError) as info:
            resolve_layers(model, template)
        message = str(info.value)
        assert "'model.layers.0' is a FusedLlamaBlock, which is not a decoder block" in message
        assert "it looks like a fused block" in message
        assert "fused layers remove the per-block outputs steering hooks need" in message
        assert "fuse_layers=False" in message


def test_layer_count_must_match_config() -> None:
    model, _ = tiny_model("llama")
    model.model.layers = torch.nn.ModuleList(list(model.model.layers)[:-1])
    with pytest.raises(LayerPathError) as info:
        resolve_layers(model)
    message = str(info.value)
    assert f"resolved to {NUM_LAYERS - 1} LlamaDecoderLayer module(s)" in message
    assert f"config.num_hidden_layers is {NUM_LAYERS}" in message


def test_model_without_module_lists_raises() -> None:
    with pytest.raises(LayerPathError) as info:
        resolve_layers(Bare())
    message = str(info.value)
    assert "Could not find the decoder layers of Bare" in message
    assert "No torch.nn.ModuleList was found anywhere in Bare" in message
    assert "layer_template" in message


def test_output_round_trip_tensor() -> None:
    hidden = torch.randn(BATCH, SEQ, HIDDEN_SIZE)
    assert layer_output_tensor(hidden) is hidden
    replacement = hidden + 1.0
    assert replace_layer_output(hidden, replacement) is replacement


def test_output_round_trip_tuple() -> None:
    hidden = torch.randn(BATCH, SEQ, HIDDEN_SIZE)
    extra = object()
    output = (hidden, None, extra)
    assert layer_output_tensor(output) is hidden

    replacement = hidden * 2.0
    replaced = replace_layer_output(output, replacement)
    assert isinstance(replaced, tuple)
    assert len(replaced) == 3
    assert replaced[0] is replacement
    assert replaced[1] is None
    assert replaced[2] is extra
    assert output[0] is hidden  # the original is left alone


def test_output_helpers_reject_bad_input() -> None:
    with pytest.raises(TypeError, match="got str"):
        layer_output_tensor("hidden")
    with pytest.raises(TypeError, match="tuple"):
        layer_output_tensor(())
    hidden = torch.randn(BATCH, SEQ, HIDDEN_SIZE)
    with pytest.raises(ValueError, match=r"shape \(2, 7\)"):
        replace_layer_output(hidden, hidden[:, :, 0])


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_forward_hook_sees_hidden_states(arch: str) -> None:
    model, _ = tiny_model(arch)
    layers = resolve_layers(model)
    shapes: list[tuple[int, ...]] = []

    def record(module: torch.nn.Module, args: object, output: object) -> object:
        hidden = layer_output_tensor(output)
        shapes.append(tuple(hidden.shape))
        return replace_layer_output(output, hidden)

    handle = layers[1].register_forward_hook(record)
    try:
        input_ids = torch.randint(3, VOCAB_SIZE, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            logits = model(input_ids=input_ids).logits
    finally:
        handle.remove()
    assert shapes == [(BATCH, SEQ, HIDDEN_SIZE)]
    assert logits.shape == (BATCH, SEQ, VOCAB_SIZE)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_recorded_outputs_are_the_hidden_states_and_the_hooks_leave(arch: str) -> None:
    model, _ = tiny_model(arch)
    layers = resolve_layers(model)
    ids = torch.randint(0, VOCAB_SIZE, (2, 5))
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
    # transformers may keep hooks of its own for output_hidden_states: ours must add none.
    before = [dict(layers[i]._forward_hooks) for i in range(len(layers))]
    with torch.no_grad(), recorded_outputs(layers, [0, NUM_LAYERS - 1]) as outputs:
        model(input_ids=ids)
    assert sorted(outputs) == [0, NUM_LAYERS - 1]
    assert torch.equal(outputs[0], hidden[1])  # hidden_states[0] is the embeddings
    assert outputs[NUM_LAYERS - 1].shape == (2, 5, HIDDEN_SIZE)
    assert [dict(layers[i]._forward_hooks) for i in range(len(layers))] == before
    with pytest.raises(RuntimeError), recorded_outputs(layers, range(len(layers))):
        raise RuntimeError("a forward pass failed")
    assert [dict(layers[i]._forward_hooks) for i in range(len(layers))] == before
