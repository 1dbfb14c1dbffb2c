"""What `status` shows about the outbox: one query over every store, used by the running
service and, read-only, by `status` (which never writes, even as root)."""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from device_agent.documents.package import REJECTED, WITHHELD
from device_agent.shipping.outbox.db import DB_NAME, SCHEMA_VERSION
from device_agent.shipping.outbox.items import DELIVERED, FAILED, PENDING


@dataclass(frozen=True)
class Stats:
    """What `status` shows about the outbox."""

    pending: int
    failed: int
    delivered: int
    oldest_pending_age_s: float | None
    last_delivered_at: float | None
    last_error: str | None
    withheld: int = 0
    rejected: int = 0
    problems: int = 0
    paused_until: float | None = None
    pause_reason: str | None = None
    last_package_stamp: str | None = None
    last_package_disposition: str | None = None
    last_package_at: float | None = None


def read_stats(db: sqlite3.Connection, now: float) -> Stats:
    """The outbox numbers `status` shows; the one query both the service and `status` use."""
    counts = dict(db.execute("SELECT state, COUNT(*) FROM items GROUP BY state").fetchall())
    compacted = db.execute("SELECT COALESCE(SUM(delivered), 0) FROM daily").fetchone()[0]
    oldest = db.execute(
        "SELECT MIN(created_at) FROM items WHERE state = 'pending'").fetchone()[0]
    last = db.execute("SELECT MAX(delivered_at) FROM items WHERE delivered_at IS NOT NULL"
                      ).fetchone()[0]
    err = db.execute(
        "SELECT last_error FROM items WHERE state != 'delivered' AND last_error IS NOT NULL "
        "ORDER BY updated_at DESC LIMIT 1").fetchone()
    decided = dict(db.execute(
        "SELECT disposition, COUNT(*) FROM packages GROUP BY disposition").fetchall())
    problems = db.execute("SELECT COUNT(*) FROM problems").fetchone()[0]
    pause = dict(db.execute(
        "SELECT key, value FROM meta WHERE key IN ('paused_until', 'pause_reason')").fetchall())
    until = float(pause["paused_until"]) if "paused_until" in pause else None
    newest = db.execute("SELECT stamp, disposition, created_at FROM packages "
                        "ORDER BY created_at DESC LIMIT 1").fetchone()
    return Stats(
        pending=counts.get(PENDING, 0), failed=counts.get(FAILED, 0),
        delivered=counts.get(DELIVERED, 0) + int(compacted),
        oldest_pending_age_s=None if oldest is None else max(0.0, now - oldest),
        last_delivered_at=last, last_error=err[0] if err else None,
        withheld=decided.get(WITHHELD, 0), rejected=decided.get(REJECTED, 0),
        problems=int(problems),
        paused_until=until if until is not None and until > now else None,
        pause_reason=pause.get("pause_reason") if until is not None and until > now else None,
        last_package_stamp=newest[0] if newest else None,
        last_package_disposition=newest[1] if newest else None,
        last_package_at=newest[2] if newest else None,
    )


def read_only_stats(state_dir: Path, *, now: float | None = None) -> Stats | None:
    """Stats from STATE_DIR's outbox opened read-only (status never writes, even as root)."""
    path = Path(state_dir) / DB_NAME
    if not path.exists():
        return None
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=2.0)
    try:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version < SCHEMA_VERSION:
            tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master")}
            if "packages" not in tables:  # written by 0.1.0 and not opened since the upgrade
                counts = dict(db.execute(
                    "SELECT state, COUNT(*) FROM items GROUP BY state").fetchall())
                return Stats(counts.get(PENDING, 0), counts.get(FAILED, 0),
                             counts.get(DELIVERED, 0), None, None, None)
        return read_stats(db, time.time() if now is None else now)
    finally:
        db.close()
