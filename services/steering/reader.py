"""What the content guard's harm model reads a sentence with: SmolLM2's own hidden states.

The packaged SmolLM2-135M-Instruct, cut after decoder layer READER_LAYER, reads the sentence as
the quote in a chat turn that begins READER_CONTEXT (the turn's start prefilled once, its keys and
values reused): the mean of the sentence's own tokens' states after that layer, before the final
norm, is its features. Said to a child, its tokens carry who hears it: out of fold on the guard's
tuning rows this reads harm better than the bare sentence (`scripts/guard_prompted_check.py`:
recall 0.926 against 0.898 at a precision of 0.95), at about the same cost a sentence. Read bare
(context None), the features are the mean over the sentence's tokens but the first (the
attention sink: large, and the same whatever the text); that in turn beat all-MiniLM-L6-v2's
embedding (`scripts/guard_features_check.py`: recall 0.91 against 0.81).

For speed the Linear layers run in torch's dynamic int8, all but the MLPs' `down_proj`: its
input holds the few huge activations of a language model, which one int8 scale per tensor
crushes (int8 there too loses most of the gain). Dynamic int8 scales each input by its own
largest value, so a sentence is read alone, never in a batch: its features do not depend on
what else is being checked. Always on the CPU, in float32, from the model cache; loaded once
per process.
"""

import copy
import hashlib
import warnings
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from transformers import DynamicCache

from .compat import cache_kwargs
from .loading import load_model
from .registry import load_registry
from .settings import paths_from_env

READER_MODEL = "smollm2-135m-instruct"
READER_LAYER = 14
# How the cut model runs: as packaged, dynamic int8 on every Linear, or on every Linear but down_proj.
FORMS = {"fp32": "float32", "int8": "dynamic int8", "int8-keep-down": "dynamic int8 but down_proj"}
READER_FORM = "int8-keep-down"
# What the sentence is read after: None reads it bare.
CHILD_CONTEXT = 'Someone said this to a seven-year-old child:\n"'
READER_CONTEXT: str | None = CHILD_CONTEXT


class SentenceReader:
    """Features `[n, hidden]` of sentences, from a cut and quantised copy of a loaded model."""

    def __init__(self, model: Any, tokenizer: Any, name: str, fingerprint: str, layer: int,
                 form: str = READER_FORM, context: str | None = None) -> None:
        body = model.model
        body.layers = body.layers[: layer + 1]
        body.config.num_hidden_layers = layer + 1
        linears = {n for n, m in body.named_modules()
                   if isinstance(m, torch.nn.Linear) and (form == "int8" or not n.endswith("down_proj"))}
        if form != "fp32":
            with warnings.catch_warnings():  # torch's notice that eager quantisation moves to torchao
                warnings.simplefilter("ignore")
                from torch.ao.quantization import quantize_dynamic

                quantize_dynamic(body, linears, dtype=torch.qint8, inplace=True)
        self._body = body.eval()
        self._tokenizer = tokenizer
        self.dim = int(body.config.hidden_size)
        # What the harm model records and checks: features from another reader mean nothing to it.
        self.name = f"{name} layer {layer}, {FORMS[form]}"
        self.fingerprint = fingerprint
        self._context_cache: Any = None
        if context is not None:
            body.norm = torch.nn.Identity()  # the layer's own states, as the out-of-fold check read them
            marker = "\x00"
            turn = tokenizer.apply_chat_template([{"role": "user", "content": context + marker}], tokenize=False)
            head = tokenizer(turn.split(marker)[0], return_tensors="pt")["input_ids"]
            self._context_cache = DynamicCache()
            with torch.inference_mode():
                body(input_ids=head, **cache_kwargs(body, self._context_cache), use_cache=True)
            self.name += f", in context {hashlib.sha256(context.encode()).hexdigest()[:12]}"

    @torch.inference_mode()
    def read(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, text in enumerate(texts):
            if self._context_cache is None:
                ids = self._tokenizer(text, return_tensors="pt")["input_ids"]
                hidden = self._body(input_ids=ids, use_cache=False).last_hidden_state[0].float()
                out[i] = (hidden[1:] if len(hidden) > 1 else hidden).mean(0).numpy()
            else:  # every token counts: the context, not the sentence's first token, takes the attention sink
                ids = self._tokenizer(text or " ", add_special_tokens=False, return_tensors="pt")["input_ids"]
                cache = copy.deepcopy(self._context_cache)  # the prefilled turn stays as it is for the next sentence
                hidden = self._body(input_ids=ids, **cache_kwargs(self._body, cache), use_cache=True).last_hidden_state
                out[i] = hidden[0].float().mean(0).numpy()
        return out


@lru_cache(maxsize=1)
def load_reader() -> SentenceReader:
    """The reader over the packaged model in the cache (`steer prepare` puts it there)."""
    paths = paths_from_env()
    loaded = load_model(load_registry(paths.registry).get(READER_MODEL), paths.cache, device="cpu", dtype="float32")
    return SentenceReader(loaded.model, loaded.tokenizer, loaded.name, loaded.fingerprint, READER_LAYER,
                          context=READER_CONTEXT)
