"""Find the decoder layers of a causal LM so steering hooks can attach to them.

Steering adds a vector to each decoder layer's output (the residual stream), so we
need the exact list of decoder blocks, in order. Architectures keep that list under
different attribute paths; a handful of templates cover most of them, and a guess
from the module tree covers wrappers and unfamiliar models. Whatever resolves is
validated, because hooking the wrong modules (an MLP, an experts list, fused
blocks) would silently steer nothing useful.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

__all__ = [
    "KNOWN_TEMPLATES",
    "DecoderLayers",
    "LayerPathError",
    "layer_output_tensor",
    "recorded_outputs",
    "replace_layer_output",
    "resolve_layers",
]

NUM_FIELD = "{num}"

# Tried in order; the first that resolves to valid decoder blocks wins.
KNOWN_TEMPLATES: tuple[str, ...] = (
    "model.layers.{num}",  # Llama, Mistral, Mixtral, Qwen2/3, Gemma, Phi-3, ...
    "model.language_model.layers.{num}",  # transformers 5 multimodal (Gemma 3, Llava, Qwen-VL)
    "language_model.model.layers.{num}",  # older multimodal checkpoints
    "model.text_model.layers.{num}",  # Idefics3 / SmolVLM style
    "transformer.h.{num}",  # GPT-2, GPT-J, Bloom, Falcon, CodeGen
    "gpt_neox.layers.{num}",  # GPT-NeoX, Pythia
    "model.decoder.layers.{num}",  # OPT
    "transformer.blocks.{num}",  # MPT
    "transformer.encoder.layers.{num}",  # ChatGLM
    "base_model.model.model.layers.{num}",  # PEFT-wrapped Llama-style models
)

# Name fragments (lower case) that identify a block's sub-parts. A decoder block
# needs a token mixer and a channel mixer; "mamba"/"mixer" admit hybrid SSM blocks.
_ATTENTION_MARKERS: tuple[str, ...] = ("attn", "attention", "mamba", "mixer")
# OPT keeps fc1/fc2 directly on the block instead of an mlp child. "moe" admits blocks whose
# experts sit under `block_sparse_moe` (Granite MoE); transformers 5 Mixtral names it `mlp`.
_MLP_MARKERS: tuple[str, ...] = ("mlp", "moe", "feed_forward", "ffn", "fc1")
# A module or ModuleList whose path passes through one of these is a sub-part of a block.
_SUBBLOCK_MARKERS: tuple[str, ...] = ("expert", "attn", "attention", "mlp", "moe", "ffn", "feed_forward")
_PREFERRED_CLASS_MARKERS: tuple[str, ...] = ("DecoderLayer", "Block", "Layer")
_MAX_CANDIDATES_SHOWN = 12
_FIX_HINT = (
    'Fix: pass the path of the decoder layers as `layer_template` in the registry entry, '
    'with {num} where the layer index goes, e.g. "model.layers.{num}".'
)


class LayerPathError(ValueError):
    """The decoder layers could not be found, or what was found is not decoder layers."""


@dataclass(frozen=True)
class DecoderLayers:
    """The decoder blocks of a model, in forward order, and the template that found them."""

    template: str
    modules: tuple[torch.nn.Module, ...]

    def __len__(self) -> int:
        return len(self.modules)

    def __getitem__(self, index: int) -> torch.nn.Module:
        return self.modules[index]

    def __iter__(self) -> Iterator[torch.nn.Module]:
        return iter(self.modules)


def resolve_layers(model: torch.nn.Module, template: str | None = None) -> DecoderLayers:
    """Return the model's decoder layers.

    An explicit ``template`` (containing ``{num}``) always wins. Otherwise the
    KNOWN_TEMPLATES are tried in order, then a guess from ``model.named_modules()``.
    Raises LayerPathError when nothing resolves or what resolved is not decoder blocks.
    """
    if template is not None:
        modules = _resolve_template(model, template)
        if not modules:
            raise LayerPathError(
                f"Layer template {template!r} matched no module in {type(model).__name__} "
                f"(nothing at {_format_template(template, 0)!r}).{_fused_hint(model)}\n"
                f"{_describe_candidates(model)}\n{_FIX_HINT}"
            )
        problem = _validation_problem(model, template, modules)
        if problem is not None:
            raise LayerPathError(f"{problem}\n{_describe_candidates(model)}\n{_FIX_HINT}")
        return DecoderLayers(template=template, modules=modules)

    # Keep the first problem: a known template that resolved but failed (e.g. fused
    # blocks at model.layers) explains the failure better than a later guess would.
    first_problem: str | None = None
    for known in KNOWN_TEMPLATES:
        modules = _resolve_template(model, known)
        if not modules:
            continue
        problem = _validation_problem(model, known, modules)
        if problem is None:
            return DecoderLayers(template=known, modules=modules)
        first_problem = first_problem or problem

    guesses = _guess_templates(model)
    for guess in guesses:
        modules = _resolve_template(model, guess)
        problem = _validation_problem(model, guess, modules)
        if problem is None:
            return DecoderLayers(template=guess, modules=modules)
        first_problem = first_problem or problem

    if first_problem is None:
        first_problem = (
            f"Could not find the decoder layers of {type(model).__name__}: none of the known "
            f"templates ({', '.join(KNOWN_TEMPLATES)}) resolved and no ModuleList of "
            "same-class blocks was found to guess from."
        )
    raise LayerPathError(f"{first_problem}\n{_describe_candidates(model)}\n{_FIX_HINT}")


def layer_output_tensor(output: object) -> torch.Tensor:
    """Return the hidden states from a decoder layer's forward output.

    transformers 5 decoder layers return a plain Tensor; older layers (and some
    custom ones) return a tuple whose first element is the hidden states.
    """
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(
        "Expected a decoder layer output that is a Tensor or a tuple whose first element "
        f"is the hidden-states Tensor, got {_describe_output(output)}."
    )


@contextmanager
def recorded_outputs(layers: DecoderLayers, indices: Iterable[int]) -> Iterator[dict[int, torch.Tensor]]:
    """`{layer: its latest output [batch, seq, hidden], detached}` for the forward passes run
    inside the block; the hooks are gone on every exit path. The one way we read activations."""
    seen: dict[int, torch.Tensor] = {}

    def recorder(layer: int):
        def hook(_module: torch.nn.Module, _inputs: tuple, output: object) -> None:
            seen[layer] = layer_output_tensor(output).detach()

        return hook

    handles = [layers[i].register_forward_hook(recorder(i)) for i in indices]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def replace_layer_output(output: object, hidden: torch.Tensor) -> object:
    """Return ``output`` with its hidden states replaced by ``hidden``, same structure."""
    current = layer_output_tensor(output)
    # A shape change here always means a broadcasting bug in the steering code.
    if hidden.shape != current.shape:
        raise ValueError(
            f"Replacement hidden states have shape {tuple(hidden.shape)} but the layer "
            f"produced {tuple(current.shape)}."
        )
    if isinstance(output, torch.Tensor):
        return hidden
    if isinstance(output, list):
        return [hidden, *output[1:]]
    return (hidden, *output[1:])  # type: ignore[index]  # tuple, checked above


def _format_template(template: str, num: int) -> str:
    if NUM_FIELD not in template:
        raise LayerPathError(
            f"Layer template {template!r} has no {NUM_FIELD} placeholder for the layer index; "
            f'write it like "{template}.{NUM_FIELD}" (e.g. "model.layers.{NUM_FIELD}").'
        )
    try:
        return template.format(num=num)
    except (KeyError, IndexError, ValueError) as error:
        raise LayerPathError(
            f"Layer template {template!r} is not a valid format string with only "
            f"{NUM_FIELD} as a field: {error}"
        ) from error


def _resolve_template(model: torch.nn.Module, template: str) -> tuple[torch.nn.Module, ...]:
    """Modules at template.format(num=0), 1, ... up to the first missing index."""
    modules: list[torch.nn.Module] = []
    while True:
        path = _format_template(template, len(modules))
        try:
            modules.append(model.get_submodule(path))
        except AttributeError:
            return tuple(modules)


def _expected_layer_count(model: torch.nn.Module) -> tuple[str, int] | None:
    """(attribute, value) of the config's layer count, if the model has a config."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    configs = [config]
    get_text_config = getattr(config, "get_text_config", None)
    if callable(get_text_config):
        # Multimodal configs keep the decoder's layer count on the text config.
        try:
            configs.append(get_text_config(decoder=True))
        except (TypeError, ValueError, AttributeError):
            pass
    for candidate in configs:
        for attribute in ("num_hidden_layers", "n_layer"):
            value = getattr(candidate, attribute, None)
            if isinstance(value, int) and not isinstance(value, bool):
                return attribute, value
    return None


def _name_parts(name: str) -> list[str]:
    return name.lower().split(".")


def _has_part(module: torch.nn.Module, markers: tuple[str, ...]) -> bool:
    """Whether any nested submodule's path has a component containing a marker."""
    for name, _ in module.named_modules():
        if name and any(marker in part for part in _name_parts(name) for marker in markers):
            return True
    return False


def _fused_classes(module: torch.nn.Module) -> list[str]:
    return sorted({type(m).__name__ for _, m in module.named_modules() if "fused" in type(m).__name__.lower()})


def _fused_hint(model: torch.nn.Module) -> str:
    """AutoAWQ's fusing replaces `model.model` wholesale, so the layers vanish from their path."""
    fused = _fused_classes(model)
    if not fused:
        return ""
    return (
        f" The model holds fused modules ({', '.join(fused)}): it was loaded with fused layers, which "
        "remove the per-block outputs steering hooks need; load with fuse_layers=False."
    )


def _block_problem(module: torch.nn.Module, path: str) -> str | None:
    """Why ``module`` (found at ``path``) is not a decoder block, or None if it looks like one."""
    # AutoAWQ's fused blocks (LlamaLikeBlock, MixtralBlock) keep attn/mlp children, so the
    # marker test below would pass them; their fused modules give them away.
    fused = _fused_classes(module)
    if fused:
        return (
            f"it looks like a fused block (it holds {', '.join(fused)}): fused layers remove the per-block "
            "outputs steering hooks need and ignore our padding masks and position ids. If the model was "
            "loaded with fused layers (e.g. AWQ with fuse_layers=True), load with fuse_layers=False"
        )
    has_attention = _has_part(module, _ATTENTION_MARKERS)
    has_mlp = _has_part(module, _MLP_MARKERS)
    if has_attention and has_mlp:
        return None
    # A path through an attention/MLP/experts module means the template went one level too deep.
    sub_parts = [part for part in _name_parts(path) if any(marker in part for marker in _SUBBLOCK_MARKERS)]
    if sub_parts:
        return (
            f"it is part of a decoder block (inside {sub_parts[0]!r}), not a whole block; "
            "the template should stop at the block that contains it"
        )
    class_name = type(module).__name__
    if not has_attention and not has_mlp:
        children = ", ".join(name for name, _ in module.named_children()) or "none"
        looks_fused = "fused" in class_name.lower() or "fused" in children.lower()
        return (
            f"{'it looks like a fused block: ' if looks_fused else ''}it has neither an attention "
            f"nor an MLP/MoE submodule (children: {children}). If the model was loaded with fused "
            "layers (e.g. AWQ with fuse_layers=True), fused layers remove the per-block outputs "
            "steering hooks need: load with fuse_layers=False"
        )
    missing = "attention" if not has_attention else "MLP/MoE"
    return f"it has no {missing} submodule"


def _validation_problem(
    model: torch.nn.Module, template: str, modules: tuple[torch.nn.Module, ...]
) -> str | None:
    """Why ``modules`` are not the model's decoder layers, or None if they are."""
    if not modules:
        return f"Layer template {template!r} matched no module."
    for index, module in enumerate(modules):
        path = _format_template(template, index)
        problem = _block_problem(module, path)
        if problem is not None:
            return (
                f"Layer template {template!r} resolved to {len(modules)} module(s), but "
                f"{path!r} is a {type(module).__name__}, which is "
                f"not a decoder block: {problem}."
            )
    expected = _expected_layer_count(model)
    if expected is not None and expected[1] != len(modules):
        attribute, count = expected
        return (
            f"Layer template {template!r} resolved to {len(modules)} "
            f"{type(modules[0]).__name__} module(s), but config.{attribute} is {count}; "
            "the template points at a different stack (or the model was truncated)."
        )
    return None


def _is_preferred_class(class_name: str) -> bool:
    return any(marker in class_name for marker in _PREFERRED_CLASS_MARKERS)


def _guess_templates(model: torch.nn.Module) -> list[str]:
    """Templates for plausible decoder ModuleLists, best first.

    Candidates are ModuleLists of one child class that are not inside an attention,
    MLP or experts block; they rank by decoder-like class name, then length.
    """
    ranked: list[tuple[bool, int, str]] = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.ModuleList) or len(module) == 0:
            continue
        if any(marker in part for part in _name_parts(name) for marker in _SUBBLOCK_MARKERS):
            continue
        classes = {type(child) for child in module}
        if len(classes) != 1:
            continue
        class_name = next(iter(classes)).__name__
        template = f"{name}.{NUM_FIELD}" if name else NUM_FIELD
        ranked.append((_is_preferred_class(class_name), len(module), template))
    ranked.sort(key=lambda entry: (entry[0], entry[1]), reverse=True)
    return [template for _, _, template in ranked]


def _describe_candidates(model: torch.nn.Module) -> str:
    """List the ModuleLists in the model so the error shows what could be meant."""
    lines: list[str] = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.ModuleList):
            continue
        class_names = sorted({type(child).__name__ for child in module}) or ["empty"]
        lines.append(f"  - {name or '<root>'} (length {len(module)}, children: {'/'.join(class_names)})")
    if not lines:
        return f"No torch.nn.ModuleList was found anywhere in {type(model).__name__}."
    shown = lines[:_MAX_CANDIDATES_SHOWN]
    if len(lines) > len(shown):
        shown.append(f"  ... and {len(lines) - len(shown)} more")
    return "Candidate ModuleLists found in the model:\n" + "\n".join(shown)


def _describe_output(output: object) -> str:
    if isinstance(output, (tuple, list)):
        inner = ", ".join(type(item).__name__ for item in output[:3])
        return f"{type(output).__name__}({inner}{', ...' if len(output) > 3 else ''})"
    return type(output).__name__
