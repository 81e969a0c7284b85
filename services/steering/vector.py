"""A concept's steering vector for one model: plain data, one unit direction per layer."""

import hashlib
from dataclasses import dataclass, field

import torch


@dataclass
class ConceptVector:
    concept: str
    model: str
    fingerprint: str
    directions: dict[int, torch.Tensor]  # layer -> unit vector [hidden], float32
    raw_norms: dict[int, float]  # layer -> |mean(pos) - mean(neg)| before normalising
    act_norms: dict[int, float]  # layer -> mean residual norm (position 0 excluded), the alpha scale
    method: str = "caa-mean-diff"
    pairs_sha256: str = ""
    pair_count: int = 0
    metadata: dict[str, str] = field(default_factory=dict)  # created, versions, anything else

    @property
    def hidden_size(self) -> int:
        return int(next(iter(self.directions.values())).shape[0])

    @property
    def layers(self) -> list[int]:
        return sorted(self.directions)

    @property
    def content_sha256(self) -> str:
        digest = hashlib.sha256()
        for layer in self.layers:
            digest.update(f"{layer}:".encode())
            # On the CPU whatever device the direction was built on: numpy reads host memory only.
            digest.update(self.directions[layer].detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        return digest.hexdigest()

    def additions(self, alpha: float, layers: tuple[int, ...] | list[int]) -> dict[int, torch.Tensor]:
        """`{layer: alpha * direction}` for the steering layers: what the hooks add per row."""
        missing = [layer for layer in layers if layer not in self.directions]
        if missing:
            raise ValueError(f"vector {self.concept!r} has no direction for layer(s) {missing}")
        return {layer: alpha * self.directions[layer] for layer in layers}
