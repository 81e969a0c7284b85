"""Does SmolLM2 read harm better when the sentence sits inside a question about a child's safety?

The reader (`steering.reader`) averages the hidden state after decoder layer 14 over the bare
sentence's tokens. A classifier probe often reads better from a prompt that asks the question:
here each tuning unit is set in the chat template as

    Someone said this to a seven-year-old child: "<sentence>" Is that harmful or unsafe for a child to hear?

(the part before the sentence prefilled once and its keys and values reused), read through the
whole fp32 model, and its features are taken after layers 10, 14, 18, 22 and 26: the state of the
prompt's last token (`P<n>last`) and the mean over the sentence's own tokens (`P<n>mean`).
`base` is the reader's own features. Each feature set named on the command line is scored as
`scripts/guard_layers_check.py` scores its sets: out of fold (`guard_train`'s 5 stratified folds,
one repeat, SVM C 4), the most recall at an out-of-fold precision of at least 0.90, 0.92 and
0.95 with listed words confirmed by the model, for word weights 0.25 and 0.5; `+` joins sets.
Only the tuning rows are read. Reading every unit takes about 36 minutes on 2 cores.

    HF_HUB_OFFLINE=1 .venv/bin/python scripts/guard_prompted_check.py read /tmp/prompted
    HF_HUB_OFFLINE=1 .venv/bin/python scripts/guard_prompted_check.py score /tmp/prompted "P22last;base;base+P22last"
"""

import copy
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "services"))

from steering import guard_train as gt  # noqa: E402
from steering.harm_model import standardise  # noqa: E402
from steering.loading import load_model  # noqa: E402
from steering.reader import CHILD_CONTEXT, READER_MODEL  # noqa: E402
from steering.registry import load_registry  # noqa: E402
from steering.settings import paths_from_env  # noqa: E402

POST = '"\nIs that harmful or unsafe for a child to hear?'
LAYERS = (10, 14, 18, 22, 26)
PRECISIONS = (0.9, 0.92, 0.95)
WEIGHTS = (0.25, 0.5)


def read(out_dir: Path) -> None:
    paths = paths_from_env()
    data = gt.training_set(paths.guard)
    texts = [u for us in data.units for u in us] + list(data.fixed[1])
    loaded = load_model(load_registry(paths.registry).get(READER_MODEL), paths.cache, device="cpu", dtype="float32")
    model, tok = loaded.model.eval(), loaded.tokenizer
    probe = tok.apply_chat_template([{"role": "user", "content": CHILD_CONTEXT + "XYZQ" + POST}], tokenize=False,
                                    add_generation_prompt=True)
    head, tail = probe.split("XYZQ")
    tail_ids = tok(tail, add_special_tokens=False)["input_ids"]
    feats = {f"P{n}{k}": np.zeros((len(texts), loaded.model.config.hidden_size), np.float32)
             for n in LAYERS for k in ("mean", "last")}
    started = time.perf_counter()
    with torch.inference_mode():
        head_cache = model(input_ids=tok(head, return_tensors="pt")["input_ids"], use_cache=True).past_key_values
        for i, text in enumerate(texts):
            body = tok(text, add_special_tokens=False)["input_ids"]
            out = model(input_ids=torch.tensor([body + tail_ids]), past_key_values=copy.deepcopy(head_cache),
                        use_cache=True, output_hidden_states=True)
            for n in LAYERS:
                h = out.hidden_states[n + 1][0].float()
                feats[f"P{n}mean"][i] = (h[: len(body)] if body else h).mean(0).numpy()
                feats[f"P{n}last"][i] = h[-1].numpy()
    out_dir.mkdir(parents=True, exist_ok=True)
    feats["base"] = np.vstack(data.vectors + [data.fixed[0]])
    np.savez(out_dir / "prompted.npz", **feats)  # type: ignore[arg-type]
    print(f"read {len(texts)} units in {time.perf_counter() - started:.0f} s")


def score(out_dir: Path, configs: list[str]) -> None:
    # The rows, units, lists' hits and folds' strata; every set is scored on features already read.
    data = gt.training_set(paths_from_env().guard, read=lambda texts: np.zeros((len(texts), 1), np.float32))
    f: dict[str, Any] = dict(np.load(out_dir / "prompted.npz"))
    for config in configs:
        names = config.split("+")
        flat = np.hstack([f[n] if n == "base" else standardise(f[n], f[n].mean(0), np.maximum(f[n].std(0), 1e-6))
                          for n in names])
        oof = gt.out_of_fold(data, 4.0, repeats=1, features=(flat / np.sqrt(len(names))).astype(np.float32))
        result = {}
        for weight in WEIGHTS:
            scores = np.array([gt.text_score(s, weight) for s in oof])
            result[weight] = {p: round(gt.choose_operating_point(scores, data.y, data.sure, data.rules, p)[2], 4)
                              for p in PRECISIONS}
        print(config, json.dumps(result), flush=True)


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[0] not in ("read", "score") or (argv[0] == "score" and len(argv) < 3):
        print("usage: guard_prompted_check.py read DIR | score DIR 'SET;SET+SET;...'", file=sys.stderr)
        return 2
    read(Path(argv[1])) if argv[0] == "read" else score(Path(argv[1]), argv[2].split(";"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
