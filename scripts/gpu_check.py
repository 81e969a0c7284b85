"""The end-to-end GPU check behind `scripts/gpu-check`: load, derive, validate, bench.

On a CUDA machine: load the model in the given dtype, derive a few concepts into a scratch
copy of the vector store (the real store is never touched), run the four validation checks
(load, hook_path, canary_kl, behavioural), time unsteered and steered generation at batch 1
and batch 8, print a summary and write it as JSON. Without CUDA: one line, exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "services"), str(REPO)]  # runs from a checkout, installed or not
os.environ.setdefault("HF_HUB_OFFLINE", "1")

NO_CUDA_EXIT = 2
# The behavioural check steers happy, sad and calm, so those three are always derived.
CONCEPTS = ("happy", "sad", "calm")
BENCH_PROMPTS = (
    "Tell me about your favourite animal.",
    "What should we build with blocks today?",
    "Why do leaves change colour?",
    "I finished my drawing of a rocket!",
)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="gpu-check", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="registered model (default: the registry's default, SmolLM2)")
    p.add_argument("--dtype", default="float16", choices=("float32", "float16", "bfloat16"))
    p.add_argument("--device", default="cuda", help="cuda or cuda:N (default cuda)")
    p.add_argument("--concepts", default=",".join(CONCEPTS), help="concepts to derive (happy, sad and calm are always added)")
    p.add_argument("--tokens", type=int, default=32, help="tokens per reply in the bench (default 32)")
    p.add_argument("--batches", default="1,8", help="bench batch sizes (default 1,8)")
    p.add_argument("--out", type=Path, help="write the summary here as JSON")
    return p.parse_args(argv)


def _plan(a: argparse.Namespace) -> str:
    return (f"load {a.model or 'the default model (SmolLM2)'} in {a.dtype} on {a.device}, derive {a.concepts} into a "
            f"scratch store, run the four validation checks and a {a.tokens}-token bench at batch {a.batches}"
            + (f", and write {a.out}" if a.out else ""))


def _bench(loaded: Any, rows: dict[int, Any], batches: list[int], tokens: int) -> list[dict[str, Any]]:
    """Tokens/s of greedy generation, unsteered and steered, after one warm-up per batch size."""
    from steering.generate import GenerationSettings, generate

    settings = GenerationSettings(max_new_tokens=tokens)
    out = []
    for batch in batches:
        prompts = [BENCH_PROMPTS[i % len(BENCH_PROMPTS)] for i in range(batch)]
        generate(loaded, prompts, None, GenerationSettings(max_new_tokens=4))  # kernels, allocator
        for name, steering in (("unsteered", None), ("steered", [rows] * batch)):
            results = generate(loaded, prompts, steering, settings)
            produced, seconds = sum(r.new_tokens for r in results), results[0].seconds
            out.append({"batch": batch, "case": name, "tokens": produced, "seconds": round(seconds, 3),
                        "tokens_per_s": round(produced / seconds, 1), "example": results[0].text[:120]})
    return out


def run(a: argparse.Namespace) -> tuple[dict[str, Any], bool]:
    import torch
    import transformers

    from steering.derive import derive_concept
    from steering.pairs import load_concept
    from steering.registry import load_registry, with_dtype
    from steering.settings import paths_from_env
    from steering.store import load_store, save_vector, vector_path
    from steering.validate import BEHAVIOUR_ALPHA_REL, activation_scale, check_load, run_model_checks

    torch.set_grad_enabled(False)
    real = paths_from_env()
    concepts = list(dict.fromkeys([*(c.strip() for c in a.concepts.split(",") if c.strip()), *CONCEPTS]))
    dev = torch.device(a.device)
    summary: dict[str, Any] = {
        "machine": {"gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
                    "cuda": torch.version.cuda, "torch": torch.__version__,
                    "transformers": transformers.__version__, "python": platform.python_version()},
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        store = Path(tmp)
        shutil.copytree(real.pairs, store / "pairs")
        shutil.copytree(real.eval, store / "eval")
        os.environ["STEER_VECTORS_DIR"] = str(store)  # every path below resolves into the scratch store
        paths = paths_from_env()
        entry = with_dtype(load_registry(paths.registry).get(a.model), a.dtype)
        load, loaded = check_load(entry, paths.cache, a.device)
        summary["model"] = {"name": entry.name, "dtype": a.dtype, "device": a.device}
        summary["checks"] = {"load": load.as_dict()}
        if loaded is None:
            return summary, False
        summary["model"].update(fingerprint=loaded.fingerprint, layers=list(loaded.steering_layers),
                                loaded_dtype=str(loaded.model.dtype).removeprefix("torch."))
        model_dir = paths.model_vectors(loaded.name)
        derived = {}
        for name in concepts:
            start = time.perf_counter()
            save_vector(derive_concept(loaded, load_concept(paths.pairs, name)), vector_path(model_dir, name))
            derived[name] = round(time.perf_counter() - start, 2)
        summary["derive_seconds"] = derived
        vectors, refused = load_store(model_dir, concepts, fingerprint=loaded.fingerprint,
                                      hidden_size=loaded.hidden_size, layers=loaded.steering_layers)
        summary["refused_vectors"] = refused
        for check in run_model_checks(loaded, vectors):
            summary["checks"][check.name] = check.as_dict()
        cv = vectors["happy"]
        alpha = BEHAVIOUR_ALPHA_REL * activation_scale(loaded, cv)
        summary["bench"] = {"concept": "happy", "alpha": round(alpha, 2), "max_new_tokens": a.tokens,
                            "runs": _bench(loaded, cv.additions(alpha, loaded.steering_layers),
                                           [int(b) for b in a.batches.split(",")], a.tokens)}
        if dev.type == "cuda":
            summary["gpu_memory_peak_mb"] = round(torch.cuda.max_memory_allocated(dev) / 2**20)
    checks = summary["checks"]
    passed = len(checks) == 4 and all(c["passed"] for c in checks.values()) and not summary["refused_vectors"]
    summary["passed"] = passed
    return summary, passed


def _print(summary: dict[str, Any]) -> None:
    m = summary["machine"]
    print(f"GPU {m['gpu']} (CUDA {m['cuda']}), torch {m['torch']}, transformers {m['transformers']}")
    model = summary.get("model", {})
    print(f"model {model.get('name')} in {model.get('loaded_dtype', model.get('dtype'))} on {model.get('device')}, "
          f"fingerprint {str(model.get('fingerprint', '-'))[:16]}")
    for name, seconds in summary.get("derive_seconds", {}).items():
        print(f"  derived {name:<8} {seconds:6.2f}s")
    for name, c in summary["checks"].items():
        print(f"  check {name:<12} {'pass' if c['passed'] else 'FAIL'}  {c['figure']:g}  {c['detail']}")
    for r in summary.get("bench", {}).get("runs", []):
        print(f"  bench batch {r['batch']:<2} {r['case']:<9} {r['tokens_per_s']:8.1f} tokens/s  ({r['tokens']} in {r['seconds']}s)")
    if "gpu_memory_peak_mb" in summary:
        print(f"  peak GPU memory {summary['gpu_memory_peak_mb']} MB")
    print("gpu-check: PASSED" if summary.get("passed") else "gpu-check: FAILED")


def main(argv: list[str] | None = None) -> int:
    a = _parse(argv)
    import torch

    if not torch.cuda.is_available():
        print(f"gpu-check: no CUDA device here (torch {torch.__version__} sees none); on a CUDA machine it would {_plan(a)}.")
        return NO_CUDA_EXIT
    from steering.atomic import write_text_atomic
    from steering.errors import SteeringError

    try:
        summary, passed = run(a)
    except SteeringError as exc:
        print(f"gpu-check: error: {exc}", file=sys.stderr)
        return 1
    _print(summary)
    if a.out:
        write_text_atomic(a.out, json.dumps(summary, indent=2) + "\n")
        print(f"wrote {a.out}")
    return 0 if passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
