"""How long the content guard takes to check one sentence, as the generator runs it (one torch thread).

    HF_HUB_OFFLINE=1 .venv/bin/python scripts/guard_latency.py [--sentences 200] [--rounds 3]

The sentences are the first ones of the held-apart set (`guard_train.HELD_APART_FILE`; their timing only; nothing is
chosen by them). Each round checks every sentence once, after one warm-up pass; the figure is the
p50 and p95 over all rounds. Take it on a quiet machine: reading the sentence (`steering.reader`) is nearly all of it.
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "services"))

from steering.guard import load_guard, load_labelled, split_sentences  # noqa: E402
from steering.guard_train import HELD_APART_FILE  # noqa: E402
from steering.settings import paths_from_env  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sentences", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    guard_dir = paths_from_env().guard
    guard = load_guard(guard_dir)
    sentences = [s for row in load_labelled(guard_dir, HELD_APART_FILE) for s in split_sentences(row["text"])][: args.sentences]
    for s in sentences:  # warm-up: the embedder's first calls are slower
        guard.check(s)
    times = []
    for _ in range(args.rounds):
        for s in sentences:
            start = time.perf_counter()
            guard.check(s)
            times.append((time.perf_counter() - start) * 1000)
    p50, p95 = np.percentile(times, [50, 95])
    print(f"guard check of one sentence: p50 {p50:.1f} ms, p95 {p95:.1f} ms ({len(sentences)} sentences x {args.rounds} rounds, 1 torch thread)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
