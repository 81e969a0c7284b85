"""The skip gate's event names tokens a person can read, on the real SmolLM2 tokenizer."""

import torch

from steering.gate import decide, readable_token


def test_a_piece_of_a_multibyte_character_reads_as_its_bytes(smollm) -> None:
    tok = smollm.tokenizer
    pieces = [i for i in range(len(tok)) if "\ufffd" in tok.decode([i])]
    assert pieces, "SmolLM2's byte-level vocabulary has tokens that are parts of a UTF-8 character"
    for i in pieces[:50]:
        shown = readable_token(tok, i)
        assert "\ufffd" not in shown and "\\x" in shown, (i, shown)
    # Two pieces that make "é" when joined show as its two bytes, each escaped.
    whole = tok.encode("é", add_special_tokens=False)
    assert "".join(readable_token(tok, i) for i in whole) in ("é", "\\xc3\\xa9")
    assert readable_token(tok, tok.encode(" happy", add_special_tokens=False)[0]) == " happy"


def test_the_gate_event_carries_readable_top3(smollm) -> None:
    tok = smollm.tokenizer
    piece = next(i for i in range(len(tok)) if "\ufffd" in tok.decode([i]))
    logits = torch.full((len(tok),), -10.0)
    logits[piece] = 5.0
    result = decide(logits, frozenset(), tok)
    assert result.top3[0] == readable_token(tok, piece) and "\ufffd" not in "".join(result.top3)
