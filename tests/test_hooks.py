"""Hook arithmetic on tiny models of every covered architecture, and first-token steering
with a KV cache on the real SmolLM2."""

import pytest
import torch

from steering.hooks import stack_rows, steer
from steering.layers import layer_output_tensor, resolve_layers
from tiny_models import ARCHITECTURES, tiny_model

torch.set_grad_enabled(False)
MOE = {"mixtral", "qwen3_moe"}


def _layer_outputs(model: torch.nn.Module, layers, ids: torch.Tensor) -> list[torch.Tensor]:
    seen: list[torch.Tensor | None] = [None] * len(layers)

    def grab(i: int):
        def hook(_m, _i, out):
            seen[i] = layer_output_tensor(out).clone()

        return hook

    handles = [layers[i].register_forward_hook(grab(i)) for i in range(len(layers))]
    try:
        logits = model(input_ids=ids).logits
    finally:
        for h in handles:
            h.remove()
    return seen + [logits]


def _input_ids(model: torch.nn.Module, batch: int = 3, seq: int = 5) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(3, model.config.vocab_size, (batch, seq), generator=g)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_hook_adds_alpha_v_per_row(arch: str) -> None:
    model, _ = tiny_model(arch)
    layers = resolve_layers(model)
    ids = _input_ids(model)
    base = _layer_outputs(model, layers, ids)
    hidden = base[0].shape[-1]
    target = 1
    delta = torch.zeros(3, hidden)
    delta[0] = 4.0 * torch.nn.functional.normalize(torch.randn(hidden), dim=0)
    delta[2] = -2.5 * torch.nn.functional.normalize(torch.randn(hidden), dim=0)  # row 1 has none
    with steer(layers, {target: delta}):
        patched = _layer_outputs(model, layers, ids)
    # Layers before the hooked one are untouched; the hooked layer's output is exactly original + delta.
    assert torch.equal(patched[0], base[0])
    assert torch.equal(patched[target], base[target] + delta[:, None, :])
    # A row with no vector is unchanged all the way to the logits: bit for bit, except that MoE
    # layers group tokens by expert across the batch, so other rows' routing changes the
    # matmul shapes and leaves float noise.
    if arch in MOE:
        torch.testing.assert_close(patched[-1][1], base[-1][1], atol=1e-5, rtol=1e-5)
    else:
        assert torch.equal(patched[-1][1], base[-1][1])
    assert not torch.allclose(patched[-1][0], base[-1][0])
    # Hooks are gone afterwards.
    assert all(not layers[i]._forward_hooks for i in range(len(layers)))
    assert torch.equal(_layer_outputs(model, layers, ids)[-1], base[-1])


@pytest.mark.parametrize("arch", ["llama", "gpt2", "mixtral"])
def test_several_layers_add_up(arch: str) -> None:
    model, _ = tiny_model(arch)
    layers = resolve_layers(model)
    ids = _input_ids(model, batch=2)
    hidden = model.config.get_text_config().hidden_size
    v = torch.nn.functional.normalize(torch.randn(hidden), dim=0)
    with steer(layers, {0: 3.0 * v.expand(2, hidden), 2: 3.0 * v.expand(2, hidden)}):
        both = _layer_outputs(model, layers, ids)
    with steer(layers, {0: 3.0 * v.expand(2, hidden)}):
        first = _layer_outputs(model, layers, ids)
    assert torch.equal(both[0], first[0])  # layer 0 identical either way
    assert torch.equal(both[2], first[2] + 3.0 * v)  # layer 2 adds on top of what layer 0 did


def test_hooks_removed_on_exception() -> None:
    model, _ = tiny_model("llama")
    layers = resolve_layers(model)
    with pytest.raises(RuntimeError, match="client went away"):
        with steer(layers, {1: torch.ones(1, 64)}):
            assert layers[1]._forward_hooks
            raise RuntimeError("client went away")
    assert not any(layers[i]._forward_hooks for i in range(len(layers)))


def test_hooks_removed_on_early_exit_from_generator() -> None:
    model, _ = tiny_model("llama")
    layers = resolve_layers(model)

    def stream():
        with steer(layers, {1: torch.ones(1, 64)}):
            for i in range(10):
                yield i

    gen = stream()
    next(gen)
    assert layers[1]._forward_hooks
    gen.close()  # a cancelled stream
    assert not layers[1]._forward_hooks


def test_registration_is_all_or_nothing() -> None:
    model, _ = tiny_model("llama")
    layers = resolve_layers(model)
    with pytest.raises(ValueError, match="out of range"):
        with steer(layers, {0: torch.ones(1, 64), 99: torch.ones(1, 64)}):
            pass
    with pytest.raises(ValueError, match=r"\[batch, hidden\]"):
        with steer(layers, {0: torch.ones(1, 64), 1: torch.ones(64)}):
            pass
    assert not any(layers[i]._forward_hooks for i in range(len(layers)))


def test_batch_mismatch_is_an_error_not_a_broadcast() -> None:
    model, _ = tiny_model("llama")
    layers = resolve_layers(model)
    with steer(layers, {1: torch.ones(2, 64)}):
        with pytest.raises(ValueError, match="has 2 rows but the batch has 3"):
            model(input_ids=_input_ids(model, batch=3))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_model_stays_in_its_dtype(dtype: torch.dtype) -> None:
    """What a GPU runs (fp16/bf16), checked on the CPU: float32 additions are cast to the
    model's dtype, the residual stream keeps that dtype, and the delta added is exactly alpha * v."""
    model, _ = tiny_model("llama")
    model = model.to(dtype)
    layers = resolve_layers(model)
    ids = _input_ids(model, batch=2)
    base = _layer_outputs(model, layers, ids)
    hidden = base[0].shape[-1]
    delta = torch.zeros(2, hidden)  # float32, as vectors are stored
    delta[0] = 4.0 * torch.nn.functional.normalize(torch.randn(hidden), dim=0)
    with steer(layers, {1: delta}) as active:
        assert active.deltas[1].dtype == dtype
        patched = _layer_outputs(model, layers, ids)
    assert all(t.dtype == dtype for t in patched[:-1]), [t.dtype for t in patched]
    assert patched[-1].dtype == dtype  # logits too: nothing was promoted to float32
    assert torch.equal(patched[0], base[0])
    assert torch.equal(patched[1], base[1] + delta.to(dtype)[:, None, :])
    assert torch.equal(patched[1][1], base[1][1])  # the row without a vector is untouched
    assert not torch.equal(patched[1][0], base[1][0])


def test_addition_never_promotes_the_residual_stream() -> None:
    """Additions swapped in mid-stream in float32 (as the engine's re-injection may do) are
    added in the layer output's dtype, so a bfloat16 model stays bfloat16."""
    model, _ = tiny_model("llama")
    model = model.to(torch.bfloat16)
    layers = resolve_layers(model)
    ids = _input_ids(model, batch=1)
    base = _layer_outputs(model, layers, ids)
    delta = torch.ones(1, base[1].shape[-1])
    with steer(layers, {1: delta.to(torch.bfloat16)}) as active:
        active.deltas[1] = delta  # float32
        patched = _layer_outputs(model, layers, ids)
        assert active.deltas[1].dtype == torch.bfloat16  # cast once, then reused
    assert patched[1].dtype == patched[-1].dtype == torch.bfloat16
    assert torch.equal(patched[1], base[1] + delta.to(torch.bfloat16)[:, None, :])


def test_stack_rows() -> None:
    v = torch.arange(4.0)
    deltas = stack_rows([{1: v}, None, {1: 2 * v, 3: v}], 4, torch.float32, torch.device("cpu"))
    assert sorted(deltas) == [1, 3]
    assert torch.equal(deltas[1], torch.stack([v, torch.zeros(4), 2 * v]))
    assert torch.equal(deltas[3], torch.stack([torch.zeros(4), torch.zeros(4), v]))


def test_first_generated_token_is_steered_with_kv_cache(smollm) -> None:
    """With prompt steering off, the prompt's earlier positions are untouched, the logits of
    the first new token are steered, and so are the next token's through the KV cache."""
    tok, model = smollm.tokenizer, smollm.model
    enc = tok(["Tell me about your weekend."], return_tensors="pt")
    hidden = smollm.hidden_size
    v = torch.nn.functional.normalize(torch.randn(hidden, generator=torch.Generator().manual_seed(0)), dim=0)
    deltas = {layer: 8.0 * v[None, :] for layer in smollm.steering_layers}

    plain = model(**enc, use_cache=True)
    with steer(smollm.layers, deltas, steer_prompt=False):
        steered = model(**enc, use_cache=True)
    # Prompt positions before the last: identical. Last position (first new token): steered.
    assert torch.equal(steered.logits[0, :-1], plain.logits[0, :-1])
    first_kl = torch.nn.functional.kl_div(
        steered.logits[0, -1].log_softmax(-1), plain.logits[0, -1].log_softmax(-1), log_target=True, reduction="sum"
    )
    assert first_kl > 0.05

    # Decode one more token from each cache: the steered cache plus steering keeps moving it.
    nxt = plain.logits[0, -1].argmax().view(1, 1)
    mask = torch.ones(1, enc["input_ids"].shape[1] + 1, dtype=torch.long)
    plain2 = model(input_ids=nxt, attention_mask=mask, cache=plain.past_key_values)
    with steer(smollm.layers, deltas, steer_prompt=False):
        steered2 = model(input_ids=nxt, attention_mask=mask, cache=steered.past_key_values)
    assert not torch.allclose(steered2.logits, plain2.logits, atol=1e-3)


def test_steer_prompt_option_steers_every_position(smollm) -> None:
    enc = smollm.tokenizer(["Tell me about your weekend."], return_tensors="pt")
    v = torch.ones(1, smollm.hidden_size) / smollm.hidden_size**0.5
    plain = smollm.model(**enc).logits
    with steer(smollm.layers, {14: 8.0 * v}, steer_prompt=True):
        steered = smollm.model(**enc).logits
    assert not torch.allclose(steered[0, 1], plain[0, 1], atol=1e-4)


def test_generate_steers_rows_independently(smollm) -> None:
    """Two identical prompts in one batch: the unsteered row matches a solo unsteered run."""
    from steering.generate import GenerationSettings, generate

    v = torch.nn.functional.normalize(torch.randn(smollm.hidden_size, generator=torch.Generator().manual_seed(3)), dim=0)
    add = {layer: 6.0 * v for layer in smollm.steering_layers}
    settings = GenerationSettings(max_new_tokens=12)
    prompt = "What is your favourite animal?"
    solo = generate(smollm, [prompt], [None], settings)[0]
    pair = generate(smollm, [prompt, prompt], [None, add], settings)
    assert pair[0].text == solo.text
    assert pair[1].text != solo.text


def test_steer_tokens_steers_the_opening_then_releases(smollm) -> None:
    """`steer_tokens=k`: the first k tokens are the fully steered reply's, the rest goes on
    unsteered (so it differs), an unsteered row in the batch is untouched, and a k past the
    reply's length is whole-reply steering."""
    from dataclasses import replace

    from steering.generate import GenerationSettings, generate

    v = torch.nn.functional.normalize(torch.randn(smollm.hidden_size, generator=torch.Generator().manual_seed(3)), dim=0)
    add = {layer: 8.0 * v for layer in smollm.steering_layers}
    settings = GenerationSettings(max_new_tokens=16)
    prompt = "What is your favourite animal?"
    plain, full = generate(smollm, [prompt, prompt], [None, add], settings)
    plain_too, released = generate(smollm, [prompt, prompt], [None, add], replace(settings, steer_tokens=3))
    assert plain_too.token_ids == plain.token_ids
    assert released.token_ids[:3] == full.token_ids[:3]
    assert released.token_ids != full.token_ids
    assert generate(smollm, [prompt], [add], replace(settings, steer_tokens=16))[0].token_ids == full.token_ids
    with pytest.raises(ValueError, match="steer_tokens must be at least 1"):
        generate(smollm, [prompt], [add], replace(settings, steer_tokens=0))


def test_interrupt_when_abandons_only_this_thread_s_pass_between_layers_and_leaves_no_hook() -> None:
    import threading

    from steering.hooks import Interrupted, interrupt_when

    model, template = tiny_model("llama")
    layers = resolve_layers(model, template)
    ids = _input_ids(model, batch=1)
    plain = model(input_ids=ids).logits
    entered: list[int] = []
    with interrupt_when(layers, lambda: len(entered) >= 1):
        probe = layers[0].register_forward_pre_hook(lambda _m, _a: entered.append(0))
        with pytest.raises(Interrupted):
            model(input_ids=ids)
        probe.remove()
        assert entered == [0]  # the first layer ran; the second never started
        other: list[torch.Tensor] = []  # another thread's pass through the same modules goes on
        thread = threading.Thread(target=lambda: other.append(model(input_ids=ids).logits))
        thread.start()
        thread.join()
        torch.testing.assert_close(other[0], plain)
    assert not any(layer._forward_pre_hooks for layer in layers)
    torch.testing.assert_close(model(input_ids=ids).logits, plain)
