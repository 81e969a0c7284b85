"""What should the guard's harm model read a sentence with? all-MiniLM-L6-v2 against SmolLM2's hidden states.

The harm model is an SVM (and a word model) on a sentence's features. Until 2026-12 they were its
all-MiniLM-L6-v2 embedding; this sets beside it SmolLM2-135M-Instruct's hidden state after decoder
layer `--layer` (its first token left out: it is the attention sink, large and the same for every
text), averaged over the sentence's tokens, each dimension standardised over the training units,
then made unit length (what `steering.reader` gives the guard now). SmolLM2 is read three ways:

- `fp32`: the packaged weights as they are;
- `int8`: torch's dynamic int8 on every Linear of the layers read (as the int8 twin does);
- `int8-keep-down`: dynamic int8 on every Linear but the MLPs' `down_proj`, kept fp32. Its input
  is where a language model's few huge activations live, which one int8 scale per tensor crushes.

Each is scored as `guard_train` scores the guard: the same stratified folds (one repeat, not three,
for time), the saved model's SVM C and word weight, a text's score its most harmful unit's, with
what the lists flag; the figure is the most recall at an out-of-fold precision of at least 0.85 to
0.95. Only the tuning rows are read; the held-apart sets never are. Every form reads one sentence
at a time, as the guard does. Also timed: one sentence's features, one torch
thread (as the generator runs the guard), over the tuning rows' sentences.

    HF_HUB_OFFLINE=1 .venv/bin/python scripts/guard_features_check.py --out bench/guard_features.json
"""

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "services"))

from steering import guard_train as gt  # noqa: E402
from steering.atomic import write_text_atomic  # noqa: E402
from steering.embedding import embed  # noqa: E402
from steering.guard import split_sentences  # noqa: E402
from steering.harm_model import HARM_MODEL_FILE, HarmModel  # noqa: E402
from steering.loading import load_model  # noqa: E402
from steering.reader import FORMS, SentenceReader  # noqa: E402
from steering.registry import load_registry  # noqa: E402
from steering.settings import paths_from_env  # noqa: E402

PRECISIONS = (0.85, 0.9, 0.92, 0.95)


def standardised(x: np.ndarray) -> np.ndarray:
    z = (x - x.mean(0)) / x.std(0).clip(1e-6)
    return z / np.linalg.norm(z, axis=1, keepdims=True).clip(1e-9)


def out_of_fold(data: gt.TrainingSet, unit_vectors: np.ndarray, c: float, weight: float) -> dict[str, float]:
    """Recall at each of PRECISIONS, out of fold, with `unit_vectors` (every row's units, then the
    exemplars), beside what the lists flag."""
    oof = gt.out_of_fold(data, c, repeats=1, features=unit_vectors)
    scores = np.array([gt.text_score(s, weight) for s in oof])
    return {str(p): round(gt.choose_threshold(scores, data.y, data.rules, p)[1], 4) for p in PRECISIONS}


def latency_ms(run: Callable[[str], object], sentences: Sequence[str]) -> float:
    for s in sentences[:20]:
        run(s)
    times = []
    for s in sentences:
        start = time.perf_counter()
        run(s)
        times.append(time.perf_counter() - start)
    return round(statistics.median(times) * 1000, 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--layer", type=int, default=14, help="read the hidden state after this decoder layer")
    parser.add_argument("--forms", default=",".join(FORMS), help=f"comma-separated, of {', '.join(FORMS)}")
    parser.add_argument("--sentences", type=int, default=200, help="sentences timed")
    parser.add_argument("--out", type=Path, help="write the figures here as JSON")
    args = parser.parse_args(argv)
    forms = args.forms.split(",")
    if not set(forms) <= set(FORMS) or args.layer < 0:
        parser.error(f"--forms takes {', '.join(FORMS)}; --layer a layer number")
    paths = paths_from_env()
    saved = HarmModel.load(paths.guard / HARM_MODEL_FILE)
    c, weight = float(saved.metadata["svm_C"]), saved.word_weight
    started = time.perf_counter()
    data = gt.training_set(paths.guard)
    texts = [u for us in data.units for u in us] + list(data.fixed[1])
    sentences = [s for row in data.rows for s in split_sentences(row["text"])][: args.sentences]
    torch.set_num_threads(1)
    results: dict[str, dict[str, Any]] = {"all-MiniLM-L6-v2": {"latency_ms_p50": latency_ms(lambda s: embed([s]), sentences)}}
    torch.set_num_threads(2)
    results["all-MiniLM-L6-v2"]["recall_at_precision"] = out_of_fold(data, embed(texts), c, weight)
    print("all-MiniLM-L6-v2", results["all-MiniLM-L6-v2"], flush=True)
    entry = load_registry(paths.registry).get(args.model)
    for form in forms:
        loaded = load_model(entry, paths.cache, device="cpu", dtype="float32")
        reader = SentenceReader(loaded.model, loaded.tokenizer, loaded.name, loaded.fingerprint, args.layer, form)
        x = standardised(reader.read(texts))
        torch.set_num_threads(1)
        lat = latency_ms(lambda s: reader.read([s]), sentences)
        torch.set_num_threads(2)
        results[f"{args.model} layer {args.layer} {form}"] = {"latency_ms_p50": lat,
                                                            "recall_at_precision": out_of_fold(data, x, c, weight)}
        print(form, results[f"{args.model} layer {args.layer} {form}"], flush=True)
    if args.out:
        write_text_atomic(args.out, json.dumps({
            "command": "scripts/guard_features_check.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "rows": len(data.rows), "units": len(texts), "to_flag": int(data.y.sum()), "svm_C": c, "word_weight": weight,
            "folds": f"{gt.FOLDS}-fold stratified, one repeat", "latency": f"p50 of {len(sentences)} tuning sentences, one torch thread",
            "seconds": round(time.perf_counter() - started, 1), "results": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
