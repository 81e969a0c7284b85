"""Tiny random-weight causal LMs for tests: built from configs, never downloaded."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import transformers
from transformers import PreTrainedModel

try:
    from transformers import PreTrainedConfig
except ImportError:  # transformers 4.x (the AWQ environment) spells it PretrainedConfig
    from transformers import PretrainedConfig as PreTrainedConfig

if TYPE_CHECKING:
    from steering.loading import LoadedModel

ARCHITECTURES: tuple[str, ...] = (
    "llama",
    "mistral",
    "mixtral",
    "qwen2",
    "qwen3",
    "qwen3_moe",
    "gemma3",
    "gpt2",
    "gpt_neox",
    "phi3",
)

NUM_LAYERS = 4
HIDDEN_SIZE = 64
VOCAB_SIZE = 128
NUM_HEADS = 4
HEAD_DIM = HIDDEN_SIZE // NUM_HEADS

# Special ids inside the tiny vocab: the library defaults (e.g. 32000) would
# otherwise break the embedding's padding_idx or trigger config warnings.
_TOKEN_IDS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}

# Shared by the Llama-style configs. head_dim is explicit because Qwen3 and
# Gemma 3 default to 128/256 rather than hidden_size // heads.
_LLAMA_LIKE = {
    "vocab_size": VOCAB_SIZE,
    "hidden_size": HIDDEN_SIZE,
    "intermediate_size": 2 * HIDDEN_SIZE,
    "num_hidden_layers": NUM_LAYERS,
    "num_attention_heads": NUM_HEADS,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    **_TOKEN_IDS,
}
_MOE = {"num_experts_per_tok": 2, "router_jitter_noise": 0.0}


def _config_builders() -> dict[str, tuple[Callable[[], PreTrainedConfig], type[PreTrainedModel], str]]:
    """arch -> (config factory, causal LM class, expected layer template)."""
    t = transformers
    return {
        "llama": (lambda: t.LlamaConfig(**_LLAMA_LIKE, head_dim=HEAD_DIM), t.LlamaForCausalLM, "model.layers.{num}"),
        "mistral": (
            lambda: t.MistralConfig(**_LLAMA_LIKE, head_dim=HEAD_DIM, sliding_window=None),
            t.MistralForCausalLM,
            "model.layers.{num}",
        ),
        "mixtral": (
            lambda: t.MixtralConfig(**_LLAMA_LIKE, head_dim=HEAD_DIM, num_local_experts=4, **_MOE),
            t.MixtralForCausalLM,
            "model.layers.{num}",
        ),
        "qwen2": (lambda: t.Qwen2Config(**_LLAMA_LIKE), t.Qwen2ForCausalLM, "model.layers.{num}"),
        "qwen3": (lambda: t.Qwen3Config(**_LLAMA_LIKE, head_dim=HEAD_DIM), t.Qwen3ForCausalLM, "model.layers.{num}"),
        "qwen3_moe": (
            lambda: t.Qwen3MoeConfig(
                **_LLAMA_LIKE,
                head_dim=HEAD_DIM,
                num_experts=4,
                num_experts_per_tok=2,
                moe_intermediate_size=32,
            ),
            t.Qwen3MoeForCausalLM,
            "model.layers.{num}",
        ),
        "gemma3": (
            # A short window and one global layer so both attention kinds are exercised.
            lambda: t.Gemma3TextConfig(
                **_LLAMA_LIKE,
                head_dim=HEAD_DIM,
                sliding_window=8,
                layer_types=["sliding_attention"] * (NUM_LAYERS - 1) + ["full_attention"],
            ),
            t.Gemma3ForCausalLM,
            "model.layers.{num}",
        ),
        "gpt2": (
            lambda: t.GPT2Config(
                vocab_size=VOCAB_SIZE,
                n_embd=HIDDEN_SIZE,
                n_layer=NUM_LAYERS,
                n_head=NUM_HEADS,
                n_positions=256,
                **_TOKEN_IDS,
            ),
            t.GPT2LMHeadModel,
            "transformer.h.{num}",
        ),
        "gpt_neox": (
            lambda: t.GPTNeoXConfig(
                vocab_size=VOCAB_SIZE,
                hidden_size=HIDDEN_SIZE,
                intermediate_size=2 * HIDDEN_SIZE,
                num_hidden_layers=NUM_LAYERS,
                num_attention_heads=NUM_HEADS,
                max_position_embeddings=256,
                **_TOKEN_IDS,
            ),
            t.GPTNeoXForCausalLM,
            "gpt_neox.layers.{num}",
        ),
        "phi3": (lambda: t.Phi3Config(**_LLAMA_LIKE), t.Phi3ForCausalLM, "model.layers.{num}"),
    }


def tiny_model(arch: str, seed: int = 0) -> tuple[torch.nn.Module, str]:
    """A random-initialised, eval-mode, float32 causal LM and its expected layer template."""
    builders = _config_builders()
    if arch not in builders:
        raise ValueError(f"Unknown tiny architecture {arch!r}; expected one of {ARCHITECTURES}")
    make_config, model_class, template = builders[arch]
    config = make_config()
    # Eager attention is deterministic and supported by every architecture here.
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = model_class(config).to(torch.float32).eval()
    return model, template


def _fingerprint(name: str, seed: int) -> str:
    import hashlib

    return "f" * 64 if (name, seed) == ("tiny", 0) else hashlib.sha256(f"{name}/{seed}".encode()).hexdigest()


def tiny_loaded(arch: str = "llama", layers: tuple[int, ...] = (1, 2), seed: int = 0, words: tuple[str, ...] = (),
                name: str = "tiny") -> "LoadedModel":
    """A tiny random model with a word-level tokenizer (`t3` ... as words, the first of them
    spelled `words` instead), as a LoadedModel steered at `layers`: for structural tests of
    code that takes a loaded model. Another `seed` and `name` make another model."""
    from pathlib import Path

    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers import models as tokenizer_models
    from transformers import PreTrainedTokenizerFast

    from steering.layers import resolve_layers
    from steering.loading import LoadedModel
    from steering.registry import ModelEntry, Source

    model, template = tiny_model(arch, seed)
    names = [*words, *(f"t{i}" for i in range(3 + len(words), VOCAB_SIZE))]
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{word: i for i, word in enumerate(names, start=3)}}
    backend = Tokenizer(tokenizer_models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>",
                                        eos_token="</s>", padding_side="left")
    entry = ModelEntry(name=name, source=Source(kind="local", path=Path(f"unused/{name}")), layers=layers)
    return LoadedModel(entry=entry, model=model, tokenizer=tokenizer, fingerprint=_fingerprint(name, seed),
                       layers=resolve_layers(model, template), device=torch.device("cpu"))
