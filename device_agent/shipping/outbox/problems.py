"""Problems met while finding work that a person should look at (a report that is a
symlink, a users.json that is not JSON): each said once, forgotten once it is gone."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

from device_agent.shipping.outbox.db import Database


@dataclass(frozen=True)
class Problem:
    """Something met while finding work that a person should look at (never identity)."""

    source: str
    ref: str
    reason: str
    first_seen: float
    last_seen: float


class Problems:
    """The problems table, one row per (source, ref)."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def note(self, source: str, ref: str, reason: str) -> bool:
        """Record a problem; True the first time this (source, ref, reason) is seen."""
        now = time.time()
        with self._db.tx(durable=False) as db:
            row = db.execute("SELECT reason FROM problems WHERE source = ? AND ref = ?",
                             (source, ref)).fetchone()
            if row is not None and row[0] == reason:
                db.execute("UPDATE problems SET last_seen = ? WHERE source = ? AND ref = ?",
                           (now, source, ref))
                return False
            db.execute("INSERT OR REPLACE INTO problems (source, ref, reason, first_seen, "
                       "last_seen) VALUES (?, ?, ?, ?, ?)", (source, ref, reason, now, now))
        return True

    def clear(self, source: str, *, keep: Iterable[str] = ()) -> None:
        """Forget a source's problems except those still present (`keep` refs)."""
        kept = list(keep)
        with self._db.tx(durable=False) as db:
            marks = ", ".join("?" for _ in kept)
            where = f" AND ref NOT IN ({marks})" if kept else ""
            db.execute(f"DELETE FROM problems WHERE source = ?{where}", (source, *kept))

    def all(self) -> list[Problem]:
        """Every problem still present, the most recently seen first."""
        rows = self._db.rows("SELECT * FROM problems ORDER BY last_seen DESC")
        return [Problem(**dict(r)) for r in rows]
