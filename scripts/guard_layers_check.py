"""Which of SmolLM2's layers should the guard's harm model read? Layer 14 against earlier layers and mixes.

The reader (`steering.reader`) averages the hidden state after decoder layer 14 over a sentence's
tokens (its first left out). This reads every tuning unit once through the same cut, int8-keep-down
model with every layer's hidden states, and scores, out of fold (`guard_train`'s 5 stratified
folds, one repeat, SVM C 4), each feature set named on the command line: `L14` (the final norm
applied, as the reader has it), `L<n>` (the hidden state after layer n, n < 14, no norm),
`L14max` (the maximum over tokens, not the mean), and `+` to join sets, each standardised and
scaled to unit length alone. The figure is the most recall at an out-of-fold precision of at
least 0.90, 0.92 and 0.95, listed words confirmed by the model as the guard does
(`choose_operating_point`), for word weights 0.25 and 0.5. Only the tuning rows are read.

    HF_HUB_OFFLINE=1 .venv/bin/python scripts/guard_layers_check.py "L14;L12;L10+L14;L8+L11+L14;L14+L14max;L12+L14"
"""

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "services"))

from steering import guard_train as gt  # noqa: E402
from steering.harm_model import standardise  # noqa: E402
from steering.loading import load_model  # noqa: E402
from steering.reader import READER_LAYER, READER_MODEL, SentenceReader  # noqa: E402
from steering.registry import load_registry  # noqa: E402
from steering.settings import paths_from_env  # noqa: E402

PRECISIONS = (0.9, 0.92, 0.95)
WEIGHTS = (0.25, 0.5)


@torch.inference_mode()
def read_layers(reader: SentenceReader, texts: list[str], layers: set[int]) -> dict[str, np.ndarray]:
    feats = {f"L{n}": np.zeros((len(texts), reader.dim), np.float32) for n in layers}
    feats |= {name: np.zeros((len(texts), reader.dim), np.float32) for name in (f"L{READER_LAYER}", f"L{READER_LAYER}max")}
    for i, text in enumerate(texts):
        ids = reader._tokenizer(text, return_tensors="pt")["input_ids"]
        out = reader._body(input_ids=ids, use_cache=False, output_hidden_states=True)
        keep = slice(1, None) if ids.shape[1] > 1 else slice(None)  # the attention sink left out
        for n in layers:
            feats[f"L{n}"][i] = out.hidden_states[n + 1][0, keep].float().mean(0).numpy()
        last = out.last_hidden_state[0, keep].float()
        feats[f"L{READER_LAYER}"][i], feats[f"L{READER_LAYER}max"][i] = last.mean(0).numpy(), last.max(0).values.numpy()
    return feats


def recall_at(data: gt.TrainingSet, flat: np.ndarray) -> dict[float, dict[float, float]]:
    oof = gt.out_of_fold(data, 4.0, repeats=1, features=flat)
    result = {}
    for weight in WEIGHTS:
        scores = np.array([gt.text_score(s, weight) for s in oof])
        result[weight] = {p: round(gt.choose_operating_point(scores, data.y, data.sure, data.rules, p)[2], 4) for p in PRECISIONS}
    return result


def main(argv: list[str]) -> int:
    configs = (argv[0] if argv else f"L{READER_LAYER}").split(";")
    parts = {p for c in configs for p in c.split("+")}
    layers = {int(p[1:]) for p in parts if p[1:].isdigit() and int(p[1:]) != READER_LAYER}
    if any(not (p[1:].isdigit() or p == f"L{READER_LAYER}max") or not p.startswith("L") for p in parts) or max(layers, default=0) >= READER_LAYER:
        print(f"error: feature sets are L<n> (n <= {READER_LAYER}) or L{READER_LAYER}max, joined by '+', separated by ';'", file=sys.stderr)
        return 2
    paths = paths_from_env()
    loaded = load_model(load_registry(paths.registry).get(READER_MODEL), paths.cache, device="cpu", dtype="float32")
    reader = SentenceReader(loaded.model, loaded.tokenizer, loaded.name, loaded.fingerprint, READER_LAYER)
    feats: dict[str, np.ndarray] = {}

    def read_once(texts: list[str]) -> np.ndarray:
        """Every feature set in one pass; the training set takes layer 14's (its scaling is unused here)."""
        feats.update(read_layers(reader, texts, layers))
        return feats[f"L{READER_LAYER}"]

    started = time.perf_counter()
    data = gt.training_set(paths.guard, read=read_once)  # the rows, units, lists' hits and folds' strata
    print(f"{len(data.rows)} tuning rows, {len(feats[f'L{READER_LAYER}'])} units read in {time.perf_counter() - started:.0f} s",
          flush=True)
    for config in configs:
        names = config.split("+")
        flat = np.hstack([standardise(feats[n], feats[n].mean(0), np.maximum(feats[n].std(0), 1e-6)) for n in names])
        print(config, json.dumps(recall_at(data, flat / np.sqrt(len(names)))), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
