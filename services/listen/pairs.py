"""The pairs a listener rates, read from the file `steer perceive` writes (only the fields used here)."""

import json
from dataclasses import dataclass
from pathlib import Path

from steering.errors import InvalidArgument, NotFoundError
from steering.vocabulary import REPLY_MODES as MODES
FIELDS = ("id", "concept", "mode", "turn", "steered", "plain")


@dataclass(frozen=True)
class Pair:
    id: str
    concept: str
    mode: str
    turn: str
    steered: str
    plain: str


def _pair(path: Path, index: int, item: object) -> Pair:
    where = f"pairs file {path}: pairs[{index}]"
    if not isinstance(item, dict):
        raise InvalidArgument(f"{where} must be an object")
    values = {}
    for field in FIELDS:
        value = item.get(field)
        if not isinstance(value, str) or not value.strip():
            raise InvalidArgument(f"{where}: {field!r} must be a non-empty string")
        values[field] = value
    if values["mode"] not in MODES:
        raise InvalidArgument(f"{where}: mode {values['mode']!r} is not one of {', '.join(MODES)}")
    return Pair(**values)


def read_pairs(path: Path) -> dict[str, Pair]:
    """The pairs by id, in file order; every problem is a one-line error naming the file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise NotFoundError(f"pairs file {path} does not exist; write it with `steer perceive` or pass --pairs") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidArgument(f"pairs file {path} is not readable JSON: {exc}") from None
    items = data.get("pairs") if isinstance(data, dict) else None
    if not isinstance(items, list) or not items:
        raise InvalidArgument(f"pairs file {path} has no \"pairs\" list, or it is empty")
    pairs: dict[str, Pair] = {}
    for index, item in enumerate(items):
        pair = _pair(path, index, item)
        if pair.id in pairs:
            raise InvalidArgument(f"pairs file {path}: pair id {pair.id!r} appears twice")
        pairs[pair.id] = pair
    return pairs
