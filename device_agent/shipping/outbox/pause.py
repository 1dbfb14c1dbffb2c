"""The queue-wide pause: every item is held while the endpoint, the credentials or the
bucket are failing (kept in meta, so a restart does not hammer a failing endpoint)."""

from __future__ import annotations

import time

from device_agent.shipping.outbox.db import Database


class Pause:
    """The paused_until and pause_reason rows of meta."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def hold(self, until: float, reason: str) -> None:
        """Hold every item until `until`: the endpoint, credentials or bucket are failing."""
        with self._db.tx(durable=False) as db:
            db.executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                           [("paused_until", repr(until)), ("pause_reason", reason[:500])])

    def lift(self) -> None:
        """End the pause now (the endpoint answers again)."""
        with self._db.tx(durable=False) as db:
            db.execute("DELETE FROM meta WHERE key IN ('paused_until', 'pause_reason')")

    def current(self, now: float | None = None) -> tuple[float, str] | None:
        """(until, reason) while the queue is paused, else None."""
        now = time.time() if now is None else now
        rows = dict((r[0], r[1]) for r in self._db.rows(
            "SELECT key, value FROM meta WHERE key IN ('paused_until', 'pause_reason')"))
        if "paused_until" not in rows or float(rows["paused_until"]) <= now:
            return None
        return float(rows["paused_until"]), rows.get("pause_reason", "")
