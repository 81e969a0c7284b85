"""How a concept is steered: which layers, how alpha is spread over them, which positions,
and whether each steered state keeps its norm. Validation searches a few of these per
concept and the record stores the one chosen; the engine applies it per row.

`alpha` keeps one meaning throughout: the mean strength per steered layer. With
`scale="norm"` each layer gets alpha in proportion to its own residual norm (later layers,
whose states are longer, get more), with the same mean over the band.
"""

import statistics
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

import torch

from .hooks import RowSteering
from .vector import ConceptVector

Scale = Literal["uniform", "norm"]
Positions = Literal["all", "generated"]


@dataclass(frozen=True)
class SteerConfig:
    layers: tuple[int, ...]
    scale: Scale = "uniform"  # the same alpha at every layer, or alpha relative to each layer's norm
    positions: Positions = "all"  # steer the prompt's positions too, or generated tokens only
    preserve_norm: bool = False  # rescale each steered state back to its norm before the addition

    def __post_init__(self) -> None:
        if not self.layers:
            raise ValueError("a steering configuration needs at least one layer")
        if self.scale not in ("uniform", "norm"):
            raise ValueError(f"scale must be 'uniform' or 'norm', got {self.scale!r}")
        if self.positions not in ("all", "generated"):
            raise ValueError(f"positions must be 'all' or 'generated', got {self.positions!r}")

    @property
    def name(self) -> str:
        """Short and readable: `12-18 norm all +np`."""
        band = f"{self.layers[0]}-{self.layers[-1]}" if list(self.layers) == list(range(self.layers[0], self.layers[-1] + 1)) \
            else ",".join(map(str, self.layers))
        return f"{band} {self.scale} {self.positions}" + (" +np" if self.preserve_norm else "")

    def activation_scale(self, cv: ConceptVector) -> float:
        """Mean residual norm over the band: what relative alphas are taken of."""
        return statistics.fmean(cv.act_norms[layer] for layer in self.layers)

    def layer_alphas(self, cv: ConceptVector, alpha: float) -> dict[int, float]:
        if self.scale == "uniform":
            return {layer: alpha for layer in self.layers}
        mean = self.activation_scale(cv)
        return {layer: alpha * cv.act_norms[layer] / mean for layer in self.layers}

    def row(self, cv: ConceptVector, alpha: float) -> RowSteering:
        """One row's steering at `alpha` (the mean per-layer strength)."""
        return RowSteering(self.additions(cv, alpha), self.positions == "all", self.preserve_norm)

    def additions(self, cv: ConceptVector, alpha: float) -> dict[int, torch.Tensor]:
        missing = [layer for layer in self.layers if layer not in cv.directions]
        if missing:
            raise ValueError(f"vector {cv.concept!r} has no direction for layer(s) {missing}")
        return {layer: a * cv.directions[layer] for layer, a in self.layer_alphas(cv, alpha).items()}

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {"layers": list(self.layers)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SteerConfig":
        return cls(tuple(int(x) for x in data["layers"]), data.get("scale", "uniform"), data.get("positions", "all"),
                   bool(data.get("preserve_norm", False)))

    def with_(self, **changes: Any) -> "SteerConfig":
        return replace(self, **changes)


def candidate_bands(default: tuple[int, ...], num_layers: int) -> list[tuple[int, ...]]:
    """The bands validation tries: the model's default band, the same width half a band
    later, and a band half a width wider on each side; all inside the stack."""
    lo, hi = default[0], default[-1]
    half = max(1, len(default) // 2)
    bands = [(lo, hi), (lo + half, hi + half), (lo - half, hi + half)]
    out: list[tuple[int, ...]] = []
    for a, b in bands:
        band = tuple(range(max(a, 1), min(b, num_layers - 2) + 1))  # never the embedding-side or last layer
        if band and band not in out:
            out.append(band)
    return out
