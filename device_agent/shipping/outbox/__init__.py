"""The durable outbox: one SQLite file under STATE_DIR, the single source of truth.

`Outbox` opens the one `Database` (db.py: the connection, its lock, the schema and its
migrations) and hangs a small store on it for each thing the file remembers, each owning
its tables:

    items     the queue: one row per file to deliver, the drain's bookkeeping, retention
    packages  every package folder built and what was decided for it (queued, withheld,
              rejected), and the queueing of its files
    users     users signed up (by us or the legacy app), each sent once
    problems  what finding work met that a person should look at
    hashes    content hashes of reports already read (a pass never re-reads a known file)
    pause     the queue-wide pause while the endpoint or the credentials are failing

What crosses the stores is the owner's: `stats()` (what `status` shows) and `created_at()`.
The legacy app's reports/upload_log.json is a view of the delivered rows kept apart, in
shipping/upload_log.py.
"""

from __future__ import annotations

import time
from pathlib import Path

from device_agent.core.config import Settings
from device_agent.shipping.outbox.db import DB_NAME, Database, OutboxVersionError
from device_agent.shipping.outbox.hashes import Hashes
from device_agent.shipping.outbox.items import (
    DELIVERED,
    FAILED,
    LEGACY_OUTCOME,
    PENDING,
    Item,
    Items,
    retention_cutoff,
)
from device_agent.shipping.outbox.packages import PackageRow, Packages
from device_agent.shipping.outbox.pause import Pause
from device_agent.shipping.outbox.problems import Problem, Problems
from device_agent.shipping.outbox.stats import Stats, read_only_stats, read_stats
from device_agent.shipping.outbox.users import Users

__all__ = [
    "DB_NAME", "DELIVERED", "FAILED", "LEGACY_OUTCOME", "PENDING", "Item", "Outbox",
    "OutboxVersionError", "PackageRow", "Problem", "Stats", "read_only_stats", "retention_cutoff",
]


class Outbox:
    """The SQLite outbox under STATE_DIR; thread-safe, one connection per instance."""

    def __init__(self, db_path: Path, *, backoff_cap_s: float = 900.0) -> None:
        self.db_path = Path(db_path)
        self.db = Database(self.db_path)
        self.items = Items(self.db, backoff_cap_s=backoff_cap_s)
        self.packages = Packages(self.db)
        self.users = Users(self.db)
        self.problems = Problems(self.db)
        self.hashes = Hashes(self.db)
        self.pause = Pause(self.db)

    @classmethod
    def open(cls, settings: Settings) -> Outbox:
        """The outbox of these settings (STATE_DIR/outbox.sqlite3)."""
        return cls(Path(settings.state_dir) / DB_NAME, backoff_cap_s=settings.retry_max_backoff_s)

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def created_at(self) -> float:
        """When this outbox file was created (0 for one migrated from an older agent).

        Files older than the outbox were there before it: state was lost (a reflashed SD
        card), and the bucket may already hold them (the drainer LISTs before sending)."""
        value = self.db.get_meta("created_at")
        return float(value) if value is not None else 0.0

    def stats(self, now: float | None = None) -> Stats:
        """Depth, oldest pending age, last upload, decisions, problems, pause, for `status`."""
        with self.db.locked() as conn:
            return read_stats(conn, time.time() if now is None else now)
