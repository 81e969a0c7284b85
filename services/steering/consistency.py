"""Pair consistency: how well a concept's individual pair differences agree with each other.

CAA's direction is the mean of the pairs' differences (positive minus negative activation).
If the pairs isolate one register, each pair's difference points roughly the same way; a pair
that differs in topic or length instead adds its own direction. Per steering layer, each pair's
difference is compared with the mean difference of the *other* pairs (leave-one-out, so a pair
does not agree with itself); a pair's cosine is averaged over the steering layers.
"""

import datetime as dt
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from .atomic import write_text_atomic
from .derive import pair_activations
from .errors import ConfigError
from .loading import LoadedModel
from .pairs import Concept

FILENAME = "consistency.json"
_WEAKEST = 3  # pairs listed per concept, the ones to rewrite first


def _pair_count(diffs: torch.Tensor) -> int:
    if diffs.shape[0] < 2:
        raise ConfigError("pair consistency needs at least two pairs")
    return diffs.shape[0]


def leave_one_out_cosines(diffs: torch.Tensor) -> torch.Tensor:
    """`diffs` `[n_pairs, ..., hidden]` -> each pair's cosine to the mean of the others `[n_pairs, ...]`."""
    n = _pair_count(diffs)
    diffs = diffs.double()  # sum minus self cancels where one pair dominates: keep the digits
    others = (diffs.sum(0, keepdim=True) - diffs) / (n - 1)
    return torch.nn.functional.cosine_similarity(diffs, others, dim=-1)


def mean_pairwise_cosine(diffs: torch.Tensor) -> torch.Tensor:
    """`diffs` `[n_pairs, ..., hidden]` -> mean cosine over all pairs i != j `[...]`. Unlike the
    leave-one-out figure it does not rise with the number of pairs, so pair sets of different
    sizes compare fairly."""
    n = _pair_count(diffs)
    unit = torch.nn.functional.normalize(diffs.double(), dim=-1)
    total = unit.sum(0)
    # sum over i != j of u_i.u_j = |sum u|^2 - sum |u_i|^2
    return ((total * total).sum(-1) - (unit * unit).sum((0, -1))) / (n * (n - 1))


def concept_consistency(
    loaded: LoadedModel,
    concept: Concept,
    batch_size: int = 8,
    on_batch: Callable[[int], None] | None = None,
) -> dict:
    """The consistency entry of one concept at the model's steering layers."""
    layers = list(loaded.steering_layers)
    pos, neg, _, _ = pair_activations(loaded, concept, batch_size, on_batch)
    diffs = (pos - neg)[:, layers]  # [n_pairs, n_steering_layers, hidden]
    cos = leave_one_out_cosines(diffs)  # [n_pairs, n_steering_layers]
    per_pair = cos.mean(1)
    weakest = per_pair.argsort()[:_WEAKEST].tolist()
    return {
        "pairs": len(concept.pairs),
        "pairs_sha256": concept.pairs_sha256,
        "consistency": round(float(per_pair.mean()), 4),
        "agreeing": round(float((per_pair > 0).double().mean()), 4),
        "pairwise": round(float(mean_pairwise_cosine(diffs).mean()), 4),
        "per_layer": {str(layer): round(float(c), 4) for layer, c in zip(layers, cos.mean(0))},
        "weakest": [{"index": i, "context": concept.pairs[i].context, "cosine": round(float(per_pair[i]), 4)} for i in weakest],
    }


def measure(loaded: LoadedModel, concepts: Sequence[Concept], earlier: dict | None = None, **kwargs) -> dict:
    """The consistency record of `concepts` on `loaded`; concepts measured before on the same
    fingerprint and layers (`earlier`, a previous record) and not re-measured are kept."""
    layers = list(loaded.steering_layers)
    kept = {}
    if earlier and earlier.get("fingerprint") == loaded.fingerprint and earlier.get("layers") == layers:
        kept = {c: e for c, e in earlier.get("concepts", {}).items() if c not in {x.name for x in concepts}}
    measured = {c.name: concept_consistency(loaded, c, **kwargs) for c in concepts}
    return {
        "model": loaded.name,
        "fingerprint": loaded.fingerprint,
        "layers": layers,
        "method": "consistency: leave-one-out cosine of each pair's difference to the others' mean, averaged over "
                  "layers and pairs; agreeing: share of pairs with a positive one; pairwise: mean cosine between "
                  "two different pairs' differences (independent of the number of pairs)",
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "concepts": dict(sorted({**kept, **measured}.items())),
    }


def read_record(model_dir: Path) -> dict | None:
    try:
        return json.loads((Path(model_dir) / FILENAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def write_record(model_dir: Path, record: dict) -> Path:
    path = Path(model_dir) / FILENAME
    write_text_atomic(path, json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    return path


def table(record: dict) -> str:
    lines = [f"{'concept':<14} {'pairs':>5} {'consistency':>11} {'agreeing':>8} {'pairwise':>8}  weakest pair"]
    for name, e in record["concepts"].items():
        weakest = e["weakest"][0] if e["weakest"] else None
        note = f"{weakest['cosine']:+.3f} #{weakest['index']} {weakest['context']}" if weakest else ""
        lines.append(f"{name:<14} {e['pairs']:>5} {e['consistency']:>11.3f} {e['agreeing']:>8.0%} {e['pairwise']:>8.3f}  {note}")
    return "\n".join(lines)
