"""A cache of prompt prefixes' keys and values, so a prompt that begins like an earlier one
prefills only what is new: the system prompt every request shares, and in a conversation
everything up to the child's latest turn.

An entry is one prefilled row's keys and values for its prompt less the last token (whose
position may be steered even when the rest of the prompt is not). It answers for its whole
length and for every shorter prefix at a multiple of `block` tokens, so two prompts that share
only a system prompt still share most of it. Entries are keyed by how the prompt positions were
steered as well as by the tokens: a row that steers its prompt has its own entries.

Tensors handed out are views into the stored ones; the batch code never writes into a cache
tensor (it concatenates, pads and indexes into new ones), so a stored entry stays as it was.
Memory is bounded by `budget_bytes`; the least recently used entries go first.
"""

import hashlib
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

from steering.batch import Past, past_length
from steering.hooks import RowSteering

# How the prompt positions of a row were steered; None: not at all.
SteeringKey = Hashable | None


@dataclass
class _Entry:
    past: Past
    bytes: int
    keys: list[tuple[SteeringKey, tuple[int, ...]]] = field(default_factory=list)


def _prefix(past: Past, length: int) -> Past:
    return [(k[..., :length, :], v[..., :length, :]) for k, v in past]


class PrefixCache:
    def __init__(self, budget_bytes: int, block: int = 8) -> None:
        if budget_bytes < 0 or block < 1:
            raise ValueError("the prefix cache needs budget_bytes >= 0 and block >= 1")
        self.budget_bytes, self.block = budget_bytes, block
        self.used_bytes = 0
        self._entries: OrderedDict[int, _Entry] = OrderedDict()  # least recently used first
        self._index: dict[tuple[SteeringKey, tuple[int, ...]], tuple[int, int]] = {}  # -> (entry id, length)
        self._lengths: dict[int, int] = {}  # how many index keys have each length
        self._next_id = 0

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, steering: SteeringKey, tokens: Sequence[int]) -> Past | None:
        """The longest cached prefix of `tokens` shorter than all of them (the last token is
        always prefilled, for its logits), or None."""
        ids = tuple(tokens)
        for length in sorted((n for n in self._lengths if n < len(ids)), reverse=True):
            hit = self._index.get((steering, ids[:length]))
            if hit is not None:
                entry_id, _ = hit
                self._entries.move_to_end(entry_id)
                return _prefix(self._entries[entry_id].past, length)
        return None

    def holds(self, steering: SteeringKey, tokens: Sequence[int]) -> bool:
        """Whether the keys and values of all of `tokens` are cached (as a stored prompt or a prefix of one at a block boundary)."""
        return (steering, tuple(tokens)) in self._index

    def store(self, steering: SteeringKey, tokens: Sequence[int], past: Past) -> None:
        """Keep `past`, the keys and values of `tokens` (one per position), if it fits the budget."""
        ids = tuple(tokens)
        if not ids or past_length(past) != len(ids):
            raise ValueError(f"a prefix of {len(ids)} tokens needs keys and values for {len(ids)} positions")
        if (steering, ids) in self._index:  # already here: keep it fresh
            self._entries.move_to_end(self._index[(steering, ids)][0])
            return
        size = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in past)
        if size > self.budget_bytes:
            return
        while self.used_bytes + size > self.budget_bytes:
            self._evict()
        entry_id, self._next_id = self._next_id, self._next_id + 1
        entry = self._entries[entry_id] = _Entry(past, size)
        self.used_bytes += size
        lengths = {*range(self.block, len(ids), self.block), len(ids)}
        for length in lengths:
            key = (steering, ids[:length])
            if key not in self._index:
                self._lengths[length] = self._lengths.get(length, 0) + 1
            self._index[key] = (entry_id, length)  # the newest entry answers for a shared prefix
            entry.keys.append(key)

    def _evict(self) -> None:
        entry_id, entry = self._entries.popitem(last=False)
        self.used_bytes -= entry.bytes
        for key in entry.keys:
            if self._index.get(key, (None, 0))[0] == entry_id:
                length = self._index.pop(key)[1]
                self._lengths[length] -= 1
                if not self._lengths[length]:
                    del self._lengths[length]


def steering_key(steering: RowSteering | None) -> SteeringKey:
    """What a row's cached prompt positions depend on besides the tokens. A row that steers only
    generated tokens has an unsteered prompt (its last position is never cached)."""
    if steering is None or not steering.steer_prompt:
        return None
    digest = hashlib.blake2b(digest_size=16)
    for layer in sorted(steering.additions):
        digest.update(layer.to_bytes(4, "little"))
        digest.update(steering.additions[layer].detach().float().cpu().numpy().tobytes())
    return ("steered", steering.preserve_norm, digest.hexdigest())
