"""Per-concept steering configurations: the per-row switches in the hooks (tiny models), how a
configuration spreads alpha over its band, the candidate bands, and the record round trip."""

import pytest
import torch

from steering.config import SteerConfig, candidate_bands
from steering.hooks import RowSteering, row_switches, stack_rows, steer
from steering.layers import layer_output_tensor, resolve_layers
from steering.vector import ConceptVector
from tiny_models import tiny_model

torch.set_grad_enabled(False)


def _outputs(model: torch.nn.Module, layers, ids: torch.Tensor, layer: int) -> torch.Tensor:
    seen: dict[str, torch.Tensor] = {}
    handle = layers[layer].register_forward_hook(lambda _m, _i, out: seen.__setitem__("h", layer_output_tensor(out).clone()))
    try:
        model(input_ids=ids)
    finally:
        handle.remove()
    return seen["h"]


def _unit(hidden: int, seed: int) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(hidden, generator=torch.Generator().manual_seed(seed)), dim=0)


def test_rows_of_different_configurations_share_a_batch_and_stay_apart() -> None:
    """Row 0 steers every position, row 1 only the last (generated-only prefill), row 2 keeps
    each state's norm, row 3 is unsteered: each gets exactly its own arithmetic at the hooked
    layer, and the unsteered row is untouched bit for bit."""
    model, _ = tiny_model("llama")
    layers = resolve_layers(model)
    hidden = model.config.hidden_size
    ids = torch.randint(3, model.config.vocab_size, (4, 6), generator=torch.Generator().manual_seed(2))
    base = _outputs(model, layers, ids, 1)
    v = 3.0 * _unit(hidden, 0)
    rows = [RowSteering({1: v}), RowSteering({1: v}, steer_prompt=False), RowSteering({1: v}, preserve_norm=True), None]
    prompt, preserve = row_switches(rows, torch.device("cpu"))
    assert prompt.tolist() == [True, False, True, True] and preserve.tolist() == [False, False, True, False]
    with steer(layers, stack_rows(rows, hidden, torch.float32, torch.device("cpu")), steer_prompt=prompt, preserve_norm=preserve):
        got = _outputs(model, layers, ids, 1)
    assert torch.equal(got[0], base[0] + v)
    assert torch.equal(got[1, :-1], base[1, :-1]) and torch.equal(got[1, -1], base[1, -1] + v)
    added = base[2] + v
    torch.testing.assert_close(got[2], added * (base[2].norm(dim=-1, keepdim=True) / added.norm(dim=-1, keepdim=True)))
    torch.testing.assert_close(got[2].norm(dim=-1), base[2].norm(dim=-1))
    assert not torch.allclose(got[2], base[2])  # the direction turned
    assert torch.equal(got[3], base[3])


def test_a_norm_preserving_row_is_untouched_where_nothing_is_added() -> None:
    """Rows of different bands share a batch: a norm-preserving row whose band leaves out a
    layer another row steers stays bit for bit at that layer."""
    model, _ = tiny_model("llama")
    layers = resolve_layers(model)
    hidden = model.config.hidden_size
    ids = torch.randint(3, model.config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(3))
    base = _outputs(model, layers, ids, 0)
    rows = [RowSteering({1: 2.0 * _unit(hidden, 1)}, preserve_norm=True), RowSteering({0: 2.0 * _unit(hidden, 2)})]
    prompt, preserve = row_switches(rows, torch.device("cpu"))
    with steer(layers, stack_rows(rows, hidden, torch.float32, torch.device("cpu")), steer_prompt=prompt, preserve_norm=preserve):
        got = _outputs(model, layers, ids, 0)
    assert torch.equal(got[0], base[0])
    assert not torch.equal(got[1], base[1])


def _vector(layers: int = 30, hidden: int = 8) -> ConceptVector:
    directions = {i: _unit(hidden, i) for i in range(layers)}
    return ConceptVector("calm", "m", "f" * 64, directions, {i: 1.0 for i in range(layers)},
                         {i: 50.0 + 10.0 * i for i in range(layers)})


def test_alpha_is_the_mean_strength_per_layer_in_both_scales() -> None:
    cv = _vector()
    uniform = SteerConfig((12, 13, 14))
    assert uniform.layer_alphas(cv, 6.0) == {12: 6.0, 13: 6.0, 14: 6.0}
    by_norm = SteerConfig((12, 13, 14), scale="norm")
    shares = by_norm.layer_alphas(cv, 6.0)
    assert shares[14] > shares[13] > shares[12]  # later layers, longer states, more alpha
    assert sum(shares.values()) / 3 == pytest.approx(6.0)
    assert shares[14] / shares[12] == pytest.approx(cv.act_norms[14] / cv.act_norms[12])
    adds = by_norm.additions(cv, 6.0)
    assert adds[13].norm() == pytest.approx(shares[13])
    row = SteerConfig((12,), positions="generated", preserve_norm=True).row(cv, 2.0)
    assert (row.steer_prompt, row.preserve_norm) == (False, True)
    assert by_norm.activation_scale(cv) == pytest.approx(180.0)  # mean of 170, 180, 190
    with pytest.raises(ValueError, match="no direction for layer"):
        SteerConfig((12, 40)).additions(cv, 1.0)


def test_configurations_refuse_nonsense_and_round_trip_through_the_record() -> None:
    config = SteerConfig((15, 16, 17), scale="norm", positions="generated", preserve_norm=True)
    assert SteerConfig.from_dict(config.as_dict()) == config
    assert config.name == "15-17 norm generated +np"
    assert SteerConfig.from_dict({"layers": [12, 13]}) == SteerConfig((12, 13))  # older fields default
    for bad in ({"layers": ()}, {"layers": (1,), "scale": "log"}, {"layers": (1,), "positions": "prompt"}):
        with pytest.raises(ValueError):
            SteerConfig(**bad)


def test_candidate_bands_cover_the_middle_of_the_stack_and_stay_inside_it() -> None:
    # SmolLM2: 30 layers, default band 12-18.
    assert candidate_bands(tuple(range(12, 19)), 30) == [tuple(range(12, 19)), tuple(range(15, 22)), tuple(range(9, 22))]
    # A tiny stack: never the first or the last layer, and no band twice.
    bands = candidate_bands((1, 2), 4)
    assert all(1 <= layer <= 2 for band in bands for layer in band)
    assert len(bands) == len(set(bands))
