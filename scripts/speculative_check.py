"""Could speculative decoding speed up the fp32 model without changing what it says?

Greedy speculative decoding keeps the fp32 model's own tokens: a cheap draft proposes K
tokens, the fp32 model checks all of them in one forward pass, and the longest agreeing run
is kept. It pays only when the draft is much cheaper than a step and agrees often. This
measures it on Blip's turns (its system prompt, the evaluation prompts), on the CPU.

Each round the draft decodes K tokens from a copy of the fp32 model's keys and values (its
own activations enter only at the K new positions), then one fp32 forward pass over the
round's token and the K drafted keeps the agreeing run. Drafts: the registered int8 twin
(`smollm2-135m-instruct-int8`, from GGUF Q4_1) and torch's dynamic int8 applied to the fp32
weights themselves. Against plain greedy decoding of the same prompts, in one run: time a
token, tokens a round, the share of drafted tokens kept, and whether the replies are the
same.

    HF_HUB_OFFLINE=1 .venv/bin/python scripts/speculative_check.py --out bench/speculative.json
"""

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "services"))

from steering.atomic import write_text_atomic  # noqa: E402
from steering.batch import copy_rows, decode, prefill  # noqa: E402
from steering.generate import render_prompt  # noqa: E402
from steering.loading import LoadedModel, load_model, quantize_dynamic_int8  # noqa: E402
from steering.registry import load_registry  # noqa: E402
from steering.settings import paths_from_env  # noqa: E402
from steering.validate import load_blip_setting, load_eval_prompts  # noqa: E402

T = TypeVar("T")
TARGET, TWIN = "smollm2-135m-instruct", "smollm2-135m-instruct-int8"


def prompt_ids(loaded: LoadedModel, system: str, turns: list[str]) -> list[list[int]]:
    chats = [[{"role": "system", "content": system}, {"role": "user", "content": t}] for t in turns]
    return [loaded.tokenizer(render_prompt(loaded, chat), add_special_tokens=not loaded.has_chat_template)["input_ids"]
            for chat in chats]


@torch.no_grad()
def greedy(loaded: LoadedModel, ids: list[int], tokens: int) -> list[int]:
    rows, out = prefill(loaded.model, loaded.layers, [ids], {}), []
    for _ in range(tokens):
        out.append(int(rows.logits[0].argmax()))
        decode(loaded.model, loaded.layers, rows, torch.tensor([out[-1]]))
    return out


@torch.no_grad()
def speculate(target: LoadedModel, draft: LoadedModel, ids: list[int], tokens: int, k: int) -> tuple[list[int], int]:
    """Greedy speculative decoding: each round the draft decodes k tokens from a copy of the fp32
    model's own keys and values (so only its k new positions are its own), and one fp32 forward
    pass over the round's token and the k drafted keeps the agreeing run. Returns the tokens and
    the number of rounds."""
    rows, rounds = prefill(target.model, target.layers, [ids], {}), 0
    out: list[int] = []
    while len(out) < tokens:
        out.append(int(rows.logits[0].argmax()))
        guess = copy_rows(rows)
        drafted = [out[-1]]
        for _ in range(k):
            decode(draft.model, draft.layers, guess, torch.tensor([drafted[-1]]))
            drafted.append(int(guess.logits[0].argmax()))
        logits = decode(target.model, target.layers, rows, torch.tensor([drafted]))[0]
        kept = 0
        while kept < k and int(logits[kept].argmax()) == drafted[kept + 1]:
            kept += 1
        out += drafted[1 : kept + 1]
        drop = k - kept
        if drop:
            rows.cache.crop(-drop)
            rows.mask, rows.positions = rows.mask[:, :-drop], rows.positions - drop
        rows.logits = logits[kept : kept + 1]
        rounds += 1
    return out[:tokens], rounds


def timed(run: Callable[[], T]) -> tuple[float, T]:
    start = time.perf_counter()
    result = run()
    return time.perf_counter() - start, result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=8, help="evaluation prompts to reply to")
    p.add_argument("--tokens", type=int, default=40, help="greedy tokens per reply")
    p.add_argument("--drafted", default="2,3,4", help="tokens drafted per round, comma-separated")
    p.add_argument("--out", type=Path)
    a = p.parse_args(argv)
    try:
        drafted = [int(k) for k in a.drafted.split(",")]
    except ValueError:
        p.error("--drafted takes comma-separated whole numbers, e.g. 2,3,4")
    if min(a.prompts, a.tokens, *drafted) < 1:
        p.error("--prompts, --tokens and every --drafted must be at least 1")
    paths = paths_from_env()
    registry = load_registry(paths.registry)
    target = load_model(registry.get(TARGET), paths.cache)
    own = load_model(registry.get(TARGET), paths.cache)
    quantize_dynamic_int8(own.model, own.layers)
    drafts = {TWIN: load_model(registry.get(TWIN), paths.cache), "dynamic int8 of the fp32 weights": own}
    system = load_blip_setting(paths.eval).system_prompt
    ids = prompt_ids(target, system, list(load_eval_prompts(paths.eval)[: a.prompts]))
    greedy(target, ids[0], 4)  # warm up
    plain_s, replies = timed(lambda: [greedy(target, i, a.tokens) for i in ids])
    total = len(ids) * a.tokens
    plain_ms = plain_s * 1000 / total
    result = {"model": target.name, "threads": torch.get_num_threads(), "prompts": len(ids), "tokens": a.tokens,
              "plain_ms_per_token": round(plain_ms, 1), "drafts": {}}
    print(f"fp32 greedy, one forward pass a token: {plain_ms:.1f} ms a token")
    for name, draft in drafts.items():
        runs = []
        for k in drafted:
            seconds, outs = timed(lambda: [speculate(target, draft, i, a.tokens, k) for i in ids])
            rounds = sum(r for _, r in outs)
            same = sum(o == r for (o, _), r in zip(outs, replies))
            ms = seconds * 1000 / total
            accepted = (total - rounds) / (rounds * k)  # drafted tokens kept, of those drafted
            runs.append({"drafted": k, "ms_per_token": round(ms, 1), "speedup": round(plain_ms / ms, 2),
                         "tokens_per_round": round(total / rounds, 2), "accepted": round(accepted, 3),
                         "replies_identical": f"{same} of {len(ids)}"})
            print(f"{name}, {k} drafted: {ms:.1f} ms a token ({plain_ms / ms:.2f}x), {total / rounds:.2f} tokens a "
                  f"round, {accepted:.2f} of drafted tokens kept, {same} of {len(ids)} replies identical")
        result["drafts"][name] = runs
    if a.out:
        result["command"] = "scripts/speculative_check.py " + " ".join(argv if argv is not None else sys.argv[1:])
        write_text_atomic(a.out, json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
