"""Blip's time to first sentence, one checkout of this project beside another, in one run.

`make bench` compares today's Blip with itself run as Blip ran before (gate on, prefix cache
off). This runs the code itself: each checkout's own generator (its engine, its record, what
its Chat serves) answers the bench's conversations through Chat in turn, with one tagger for
all, alternating the order each round so neither always runs first. Same model, same
machine, same minute.

    git worktree add /tmp/before 42bc5a5 && ln -s $PWD/.cache /tmp/before/.cache
    .venv/bin/python scripts/ttfs_side_by_side.py /tmp/before . --rounds 2

Prints each checkout's times (ms, the conversations' first turns left out as warm-up) and
their medians, and the ratio of the last checkout's median to the first's.
"""

import argparse
import asyncio
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "services")]

from bench.__main__ import CONVERSATIONS  # noqa: E402
from bench.service_load import chat_first_sentence, start  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkouts", nargs="+", type=Path, help="project checkouts (each with .cache holding the model)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--tokens", type=int, default=48, help="max tokens a reply (the bench's 48)")
    p.add_argument("--pause-s", type=float, default=3.0,
                   help="seconds between a reply's end and the child's next turn (the bench's 3)")
    a = p.parse_args()
    checkouts = [c.resolve() for c in a.checkouts]
    tagger = start("tagger.server", [], checkout=checkouts[-1])
    times: dict[Path, list[float]] = {c: [] for c in checkouts}
    try:
        for k in range(a.rounds):
            for checkout in checkouts if k % 2 == 0 else checkouts[::-1]:
                blip = start("generator.server", ["--models", a.model, "--tagger", tagger.address], checkout=checkout)
                try:
                    got = asyncio.run(chat_first_sentence(blip.address, CONVERSATIONS, a.tokens, pause_s=a.pause_s))
                finally:
                    blip.stop()
                times[checkout] += got["times_ms"]
                print(f"round {k + 1}, {checkout}: p50 {got['p50_ms']} ms over {got['turns']} turns", flush=True)
    finally:
        tagger.stop()
    for checkout, ts in times.items():
        print(f"{checkout}: median {statistics.median(ts):.0f} ms, n {len(ts)}: {[round(t) for t in ts]}")
    first, last = (statistics.median(times[c]) for c in (checkouts[0], checkouts[-1]))
    print(f"ratio, last / first: {last / first:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
