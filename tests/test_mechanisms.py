"""What the gate and the KL monitor are calibrated from, on a tiny random model: the first-token
logits and the per-token KL of a steered reply, each against an independent computation."""

import pytest
import torch

from steering.generate import Generation, render_prompt
from steering.hooks import RowSteering
from steering.mechanisms import first_token_logits, reply_kl, running_means
from steering.validate import next_token_kl
from tiny_models import tiny_loaded


@pytest.fixture(scope="module")
def tiny():
    return tiny_loaded(layers=(1, 2))


def _reply(tiny, prompt: str, tokens: tuple[int, ...]) -> Generation:
    ids = tiny.tokenizer(render_prompt(tiny, prompt), add_special_tokens=False)["input_ids"]
    return Generation("", len(tokens), 0.0, tuple(ids), tokens)


def _row(tiny, scale: float) -> RowSteering:
    g = torch.Generator().manual_seed(0)
    return RowSteering({layer: scale * torch.randn(tiny.hidden_size, generator=g) for layer in (1, 2)})


def test_first_token_logits_are_each_prompt_s_own_despite_padding(tiny) -> None:
    prompts = ["t5 t6 t7 t8 t9", "t10"]
    batched = first_token_logits(tiny, prompts)
    for i, p in enumerate(prompts):
        enc = tiny.tokenizer(render_prompt(tiny, p), return_tensors="pt", add_special_tokens=False)
        alone = tiny.model(**enc).logits[0, -1].float()
        assert torch.allclose(batched[i], alone, atol=1e-4)


def test_reply_kl_is_zero_unsteered_and_starts_where_the_prompt_s_kl_is(tiny) -> None:
    replies = [_reply(tiny, "t5 t6 t7", (8, 9, 10, 11)), _reply(tiny, "t12", (13, 14))]  # padding exercised
    assert all(x == pytest.approx(0.0, abs=1e-6) for k in reply_kl(tiny, replies, _row(tiny, 0.0)) for x in k)
    row = _row(tiny, 2.0)
    kls = reply_kl(tiny, replies, row)
    assert [len(k) for k in kls] == [4, 2] and all(x > 0 for k in kls for x in k)
    # The first token's KL is the next-token KL after the prompt, computed on its own.
    first = next_token_kl(tiny, ["t5 t6 t7", "t12"], {layer: a for layer, a in row.additions.items()})
    assert [k[0] for k in kls] == pytest.approx(first, rel=1e-3, abs=1e-6)
    # A reply measured alone gives the same figures as in the padded batch.
    assert reply_kl(tiny, replies[1:], row)[0] == pytest.approx(kls[1], rel=1e-3, abs=1e-6)
    with pytest.raises(ValueError, match="generated tokens only"):
        reply_kl(tiny, replies, RowSteering(row.additions, steer_prompt=False))


def test_running_means_start_once_a_window_is_full() -> None:
    assert running_means([1.0, 2.0, 3.0, 4.0], 2) == [1.5, 2.5, 3.5]
    assert running_means([1.0], 2) == []
