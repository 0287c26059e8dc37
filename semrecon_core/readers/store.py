"""The scores of a reader study in SQLite (``KIT/scores.sqlite``, stdlib :mod:`sqlite3`).

Tables:

- ``readers(name, token, seed, created)``: one row per reader; the token is the secret in the reader's URL (the
  same after a restart), the seed that of the reader's presentation order (:meth:`Kit.reader_order`).
- ``scores(reader, image, criterion, score, time)``: one row per reader, image id and criterion; ``time`` is the
  UTC time of the write (ISO 8601).

Every call opens its own connection (the server answers requests on several threads) and a screen's scores are
one transaction, committed before the call returns, so the next screen is only served after the scores of the
last one are on disk; a server killed at any moment loses at most the screen being written.
"""

from __future__ import annotations

import contextlib
import datetime
import secrets
import sqlite3
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS readers (
    name TEXT PRIMARY KEY,
    token TEXT NOT NULL UNIQUE,
    seed INTEGER NOT NULL,
    created TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS scores (
    reader TEXT NOT NULL REFERENCES readers(name),
    image TEXT NOT NULL,
    criterion TEXT NOT NULL,
    score INTEGER NOT NULL CHECK (score BETWEEN 1 AND 5),
    time TEXT NOT NULL,
    PRIMARY KEY (reader, image, criterion)
);
"""


@dataclass(frozen=True)
class Score:
    """One stored score."""

    reader: str
    image: str
    criterion: str
    score: int
    time: str


class ScoreStore:
    """The score database of a kit (created on first use, mode 0600)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        fresh = not self.path.exists()
        with self._connect() as connection:
            connection.executescript(SCHEMA)
        if fresh:
            self.path.chmod(0o600)

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        try:
            connection = sqlite3.connect(self.path, timeout=30)
        except sqlite3.Error as exc:
            raise OSError(f"{self.path}: cannot open the score database: {exc}") from None
        try:
            connection.execute("PRAGMA foreign_keys = ON")
            connection.execute("PRAGMA synchronous = FULL")
            with connection:  # one transaction: committed on success, rolled back on error
                yield connection
        except sqlite3.DatabaseError as exc:
            raise OSError(f"{self.path}: score database error: {exc}") from None
        finally:
            connection.close()

    def add_reader(self, name: str, seed: int) -> str:
        """The reader's token: the stored one, or a new random one stored with ``seed``."""
        with self._connect() as connection:
            row = connection.execute("SELECT token FROM readers WHERE name = ?", (name,)).fetchone()
            if row:
                return str(row[0])
            token = secrets.token_urlsafe(24)
            connection.execute(
                "INSERT INTO readers (name, token, seed, created) VALUES (?, ?, ?, ?)", (name, token, seed, _now())
            )
            return token

    def readers(self) -> dict[str, tuple[str, int]]:
        """``name → (token, seed)`` of every reader."""
        with self._connect() as connection:
            return {n: (t, int(s)) for n, t, s in connection.execute("SELECT name, token, seed FROM readers")}

    def reader_of(self, token: str) -> str | None:
        """The reader whose token ``token`` is (compared in constant time), or ``None``."""
        found = None
        for name, (known, _) in self.readers().items():
            if secrets.compare_digest(known.encode(), token.encode()):
                found = name
        return found

    def scored_images(self, reader: str) -> dict[str, set[str]]:
        """``image → criteria`` the reader has scored."""
        out: dict[str, set[str]] = {}
        with self._connect() as connection:
            query = "SELECT image, criterion FROM scores WHERE reader = ?"
            for image, criterion in connection.execute(query, (reader,)):
                out.setdefault(image, set()).add(criterion)
        return out

    def save(self, reader: str, scores: Mapping[str, Mapping[str, int]]) -> None:
        """Store ``image → criterion → score`` of one reader in one committed transaction (rescoring replaces)."""
        now = _now()
        rows = [(reader, image, c, int(v), now) for image, given in scores.items() for c, v in given.items()]
        with self._connect() as connection:
            connection.executemany(
                "INSERT INTO scores (reader, image, criterion, score, time) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (reader, image, criterion) DO UPDATE SET score = excluded.score, time = excluded.time",
                rows,
            )

    def scores(self) -> list[Score]:
        """Every stored score, ordered by reader, image and criterion."""
        with self._connect() as connection:
            query = "SELECT reader, image, criterion, score, time FROM scores ORDER BY reader, image, criterion"
            return [Score(r, i, c, int(s), t) for r, i, c, s, t in connection.execute(query)]


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")
