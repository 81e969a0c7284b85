"""On a CUDA machine: the real SmolLM2 in float16 on the GPU. Hooks fire and add exactly the
delta in float16, derivation keeps float32 statistics on the CPU, and steered text differs.
Skipped, with the reason printed, wherever CUDA is absent (scripts/gpu-check is the end-to-end run)."""

import pytest
import torch

from steering.derive import derive_concept
from steering.generate import GenerationSettings, generate
from steering.hooks import steer
from steering.layers import layer_output_tensor
from steering.loading import LoadedModel, load_model
from steering.pairs import load_concept
from steering.registry import load_registry
from steering.store import read_vector, vector_path

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason=f"needs a CUDA GPU: loads SmolLM2 in float16 on cuda (torch {torch.__version__} sees none here)",
)
SMOLLM = "smollm2-135m-instruct"
torch.set_grad_enabled(False)


@pytest.fixture(scope="module")
def gpu_model(paths) -> LoadedModel:
    return load_model(load_registry(paths.registry).get(SMOLLM), paths.cache, device="cuda", dtype="float16")


def test_loads_on_cuda_in_float16(gpu_model: LoadedModel) -> None:
    assert gpu_model.device.type == "cuda" and gpu_model.entry.dtype == "float16"
    assert {p.device.type for p in gpu_model.model.parameters()} == {"cuda"}
    assert {p.dtype for p in gpu_model.model.parameters()} == {torch.float16}


def _layer_output(loaded: LoadedModel, layer: int, enc: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's output (as later layers see it, after any steering hook) and the logits."""
    seen: list[torch.Tensor] = []
    handle = loaded.layers[layer].register_forward_hook(lambda _m, _i, out: seen.append(layer_output_tensor(out).clone()))
    try:
        logits = loaded.model(**enc).logits
    finally:
        handle.remove()
    return seen[0], logits


def test_hooks_fire_and_add_the_delta_in_float16(gpu_model: LoadedModel) -> None:
    layer = gpu_model.steering_layers[0]
    enc = gpu_model.tokenizer(["Hello there.", "Tell me a story."], return_tensors="pt", padding=True).to("cuda")
    delta = torch.zeros(2, gpu_model.hidden_size)  # float32 on the CPU, as vectors are stored
    delta[0] = 4.0 * torch.nn.functional.normalize(torch.randn(gpu_model.hidden_size), dim=0)
    base, base_logits = _layer_output(gpu_model, layer, enc)
    with steer(gpu_model.layers, {layer: delta}) as active:
        assert active.deltas[layer].dtype == torch.float16 and active.deltas[layer].device.type == "cuda"
        steered, logits = _layer_output(gpu_model, layer, enc)  # registered after the steering hook
    assert steered.dtype == logits.dtype == torch.float16 and steered.device.type == "cuda"
    assert torch.equal(steered, base + delta.to("cuda", torch.float16)[:, None, :])
    assert torch.equal(steered[1], base[1])  # the unsteered row is untouched
    assert not torch.equal(logits[0], base_logits[0])
    assert not gpu_model.layers[layer]._forward_hooks  # removed on exit


def test_derivation_on_cuda_matches_the_float32_vector(gpu_model: LoadedModel, paths) -> None:
    cv = derive_concept(gpu_model, load_concept(paths.pairs, "happy"))
    stored = read_vector(vector_path(paths.model_vectors(SMOLLM), "happy"))  # derived in float32 on the CPU
    for layer in gpu_model.steering_layers:
        d = cv.directions[layer]
        assert d.dtype == torch.float32 and d.device.type == "cpu" and torch.isfinite(d).all()
        assert abs(float(d.norm()) - 1.0) < 1e-4
        cos = float(torch.dot(d, stored.directions[layer]))
        assert cos > 0.95, f"layer {layer}: cosine {cos:.3f} between the fp16 GPU and fp32 CPU directions"
    assert all(n > 0 for n in cv.act_norms.values())


def test_steered_text_differs_from_unsteered(gpu_model: LoadedModel, paths) -> None:
    cv = derive_concept(gpu_model, load_concept(paths.pairs, "happy"))
    rows = cv.additions(8.0, gpu_model.steering_layers)
    prompts = ["Tell me about your morning.", "What did you do at the weekend?"]
    out = generate(gpu_model, prompts + prompts, [None, None, rows, rows], GenerationSettings(max_new_tokens=24))
    assert all(g.text for g in out)
    assert out[0].text != out[2].text and out[1].text != out[3].text
