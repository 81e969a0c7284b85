"""The answers store: SQLite, one short connection and one transaction per call, so that an
answer is written whole or not at all and two raters never see each other's half-writes.

Each time a pair is shown it gets a one-time token (a presentation) that records who sees it
and on which side the steered reply is; an answer claims its token once."""

import secrets
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from steering.errors import InvalidArgument, NotFoundError, SteeringError

from .pairs import Pair

SIDES = ("A", "B")
ANSWERS = ("A", "B", "cant_tell")

SCHEMA = """
CREATE TABLE IF NOT EXISTS presentations (
    token        TEXT PRIMARY KEY,
    pair_id      TEXT NOT NULL,
    rater        TEXT NOT NULL,
    steered_side TEXT NOT NULL CHECK (steered_side IN ('A', 'B')),
    concept      TEXT NOT NULL,
    mode         TEXT NOT NULL,
    shown_utc    TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS answers (
    token        TEXT PRIMARY KEY REFERENCES presentations (token),
    rater        TEXT NOT NULL,
    pair_id      TEXT NOT NULL,
    steered_side TEXT NOT NULL CHECK (steered_side IN ('A', 'B')),
    answer       TEXT NOT NULL CHECK (answer IN ('A', 'B', 'cant_tell')),
    verdict      TEXT NOT NULL CHECK (verdict IN ('steered', 'plain', 'cant_tell')),
    concept      TEXT NOT NULL,
    mode         TEXT NOT NULL,
    answered_utc TEXT NOT NULL
);
"""


class AlreadyAnswered(SteeringError):
    """The presentation was answered before; the first answer stands."""


@dataclass(frozen=True)
class Presentation:
    token: str
    pair_id: str
    rater: str
    steered_side: str


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def verdict(answer: str, steered_side: str) -> str:
    if answer == "cant_tell":
        return "cant_tell"
    return "steered" if answer == steered_side else "plain"


@dataclass(frozen=True)
class AnswerStore:
    path: Path

    def __post_init__(self) -> None:
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        # executescript commits on its own; CREATE ... IF NOT EXISTS is safe to repeat.
        db = sqlite3.connect(self.path, timeout=10.0)
        try:
            db.executescript(SCHEMA)
        finally:
            db.close()

    @contextmanager
    def _transaction(self, write: bool = True) -> Iterator[sqlite3.Connection]:
        # isolation_level=None: we say BEGIN ourselves; IMMEDIATE takes the write lock up front,
        # so a check and the insert that depends on it cannot interleave with another writer.
        db = sqlite3.connect(self.path, timeout=10.0, isolation_level=None)
        try:
            db.row_factory = sqlite3.Row
            db.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        finally:
            db.close()

    def present(self, pair: Pair, rater: str) -> Presentation:
        """A new one-time token for showing `pair` to `rater`, the steered reply on a random side."""
        shown = Presentation(secrets.token_urlsafe(18), pair.id, rater, secrets.choice(SIDES))
        with self._transaction() as db:
            db.execute("INSERT INTO presentations VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (shown.token, pair.id, rater, shown.steered_side, pair.concept, pair.mode, _utc_now()))
        return shown

    def presentation(self, token: str) -> Presentation:
        with self._transaction(write=False) as db:
            row = db.execute("SELECT token, pair_id, rater, steered_side FROM presentations WHERE token = ?",
                             (token,)).fetchone()
        if row is None:
            raise NotFoundError("no such presentation: reload the page to hear this pair again")
        return Presentation(*row)

    def answer(self, token: str, pair_id: str, answer: str) -> str:
        """Record the answer to a presentation once; returns the verdict (steered, plain, cant_tell)."""
        if answer not in ANSWERS:
            raise InvalidArgument(f"answer {answer!r} is not one of {', '.join(ANSWERS)}")
        with self._transaction() as db:
            row = db.execute("SELECT pair_id, rater, steered_side, concept, mode FROM presentations WHERE token = ?",
                             (token,)).fetchone()
            if row is None:
                raise NotFoundError("no such presentation: reload the page to hear this pair again")
            if row["pair_id"] != pair_id:
                raise InvalidArgument(f"this presentation shows pair {row['pair_id']!r}, not {pair_id!r}")
            if db.execute("SELECT 1 FROM answers WHERE token = ?", (token,)).fetchone():
                raise AlreadyAnswered(f"pair {pair_id!r} was already answered on this page; the first answer stands")
            found = verdict(answer, row["steered_side"])
            db.execute("INSERT INTO answers VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (token, row["rater"], pair_id, row["steered_side"], answer, found, row["concept"], row["mode"],
                        _utc_now()))
        return found

    def answered_by(self, rater: str) -> set[str]:
        with self._transaction(write=False) as db:
            return {r[0] for r in db.execute("SELECT DISTINCT pair_id FROM answers WHERE rater = ?", (rater,))}

    def counts(self) -> list[tuple[str, str, str, int]]:
        """(concept, mode, verdict, count) for every answer given."""
        with self._transaction(write=False) as db:
            rows = db.execute("SELECT concept, mode, verdict, COUNT(*) FROM answers "
                              "GROUP BY concept, mode, verdict ORDER BY concept, mode, verdict").fetchall()
        return [tuple(r) for r in rows]  # type: ignore[misc]
