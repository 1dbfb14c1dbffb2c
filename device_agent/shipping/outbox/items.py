"""The queue: one row per file to deliver, the single source of truth for what is owed.

Files are written durably (atomic_write) before their rows are committed, so a crash leaves
either a file without a row (reconcile enqueues it, if its folder says it may be uploaded)
or both. `next_attempt_at` is wall-clock epoch seconds because it must survive restarts; a
clock that jumps backwards cannot strand an item, because anything scheduled further ahead
than the backoff cap counts as due. Delivered rows are compacted into a count per day after
RETENTION_DAYS, so a year of captures costs no more per pass than a week.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from device_agent.core.s3keys import content_type
from device_agent.shipping.outbox.db import Database

log = logging.getLogger(__name__)

PENDING = "pending"
DELIVERED = "delivered"
FAILED = "failed"
LEGACY_OUTCOME = "legacy"  # a row for what the legacy app delivered (legacy.py adopts it)


@dataclass(frozen=True)
class Item:
    """One file to deliver, as the outbox holds it."""

    id: int
    kind: str
    source: str
    path: Path
    key: str
    sha256: str
    size: int
    content_type: str
    state: str
    attempts: int
    next_attempt_at: float
    last_error: str | None
    if_match: str | None
    etag: str | None
    final_key: str | None
    outcome: str | None
    package: str | None
    record_id: str | None
    device_serial: str | None
    created_at: float
    updated_at: float
    delivered_at: float | None
    pruned_at: float | None
    prior_sha256: tuple[str, ...] = ()

    @property
    def filename(self) -> str:
        return self.key.rsplit("/", 1)[-1]


def insert_item(db: sqlite3.Connection, **cols: Any) -> int:
    """Add one items row inside the caller's transaction; its id."""
    now = time.time()
    cols.setdefault("created_at", now)
    cols.setdefault("updated_at", now)
    names = ", ".join(cols)
    marks = ", ".join("?" for _ in cols)
    cur = db.execute(f"INSERT INTO items ({names}) VALUES ({marks})", tuple(cols.values()))
    return int(cur.lastrowid or 0)


def retention_cutoff(retention_days: float, now: float | None = None) -> float:
    """Epoch seconds before which delivered history may be pruned and compacted."""
    now = time.time() if now is None else now
    return now - timedelta(days=retention_days).total_seconds()


class Items:
    """The items table: queueing, the drain's bookkeeping, queries, retention."""

    def __init__(self, db: Database, *, backoff_cap_s: float = 900.0) -> None:
        self._db = db
        self.backoff_cap_s = backoff_cap_s

    # --- single files --------------------------------------------------------------------

    def add(self, path: Path, *, kind: str, key: str, sha256: str, size: int,
            source: str = "report", if_match: str | None = None) -> int:
        """Queue one file (a dropped report, its JSON twin, a signup); `if_match` replaces."""
        with self._db.tx() as db:
            return insert_item(
                db, kind=kind, source=source, path=str(Path(path).resolve()), key=key,
                sha256=sha256, size=size, if_match=if_match, content_type=content_type(key),
            )

    def track_report(self, path: Path, *, kind: str, key: str, sha256: str,
                     size: int) -> int | None:
        """Queue a report file if its content is new; a delivered one is replaced by ETag.

        When a pending row's file changes after a put was attempted, the earlier content is
        remembered in `prior_sha256`: that put may have landed with its answer lost, and the
        object it left is ours to replace, not a stranger's to keep aside.
        """
        resolved = str(Path(path).resolve())
        with self._db.tx() as db:
            last = db.execute(
                "SELECT * FROM items WHERE path = ? AND source = 'report' "
                "ORDER BY id DESC LIMIT 1", (resolved,)
            ).fetchone()
            if last is not None and last["sha256"] == sha256:
                return None
            if last is not None and last["state"] == PENDING:
                prior = _priors(last["prior_sha256"])
                if last["attempts"] and last["sha256"] not in prior:
                    prior = (*prior, last["sha256"])
                db.execute(
                    "UPDATE items SET sha256 = ?, size = ?, prior_sha256 = ?, updated_at = ? "
                    "WHERE id = ?",
                    (sha256, size, json.dumps(prior) if prior else None, time.time(),
                     last["id"]))
                return int(last["id"])
            if_match = None
            prior = ()
            if last is not None and last["state"] == DELIVERED and last["key"] == key:
                # the object we put is replaced only while it is still the one we saw
                if_match = last["etag"]
                prior = (last["sha256"],)
            return insert_item(
                db, kind=kind, source="report", path=resolved, key=key, sha256=sha256,
                size=size, if_match=if_match, content_type=content_type(key),
                prior_sha256=json.dumps(prior) if prior else None,
            )

    def adopt_report(self, path: Path, *, kind: str, key: str, sha256: str, size: int) -> bool:
        """Record a report the legacy app delivered as delivered: a new row, or its queued
        row of the same content (the legacy app sent it first); False if nothing changed."""
        resolved = str(Path(path).resolve())
        now = time.time()
        with self._db.tx() as db:
            last = db.execute("SELECT id, state, sha256 FROM items WHERE path = ? AND "
                              "source = 'report' ORDER BY id DESC LIMIT 1",
                              (resolved,)).fetchone()
            if last is not None and (last["state"] != PENDING or last["sha256"] != sha256):
                return False
            item_id = last["id"] if last is not None else insert_item(
                db, kind=kind, source="report", path=resolved, key=key, sha256=sha256,
                size=size, content_type=content_type(key))
            db.execute("UPDATE items SET state = 'delivered', final_key = ?, outcome = ?, "
                       "delivered_at = ?, updated_at = ? WHERE id = ?",
                       (key, LEGACY_OUTCOME, now, now, item_id))
        return True

    # --- drain ---------------------------------------------------------------------------

    def batch(self) -> AbstractContextManager[None]:
        """The marks made inside committed as one: the answers one wait for puts brought."""
        return self._db.batch()

    def due(self, now: float | None = None, *, limit: int = 1000) -> list[Item]:
        """Pending items whose time has come; a manifest only once its package is delivered."""
        now = time.time() if now is None else now
        rows = self._db.rows(
            """
            SELECT * FROM items AS i
            WHERE state = 'pending'
              AND (next_attempt_at <= ? OR next_attempt_at > ?)
              AND NOT (kind = 'manifest' AND EXISTS (
                  SELECT 1 FROM items AS s
                  WHERE s.package = i.package AND s.kind != 'manifest'
                    AND s.state != 'delivered'))
            ORDER BY (kind = 'manifest'), id
            LIMIT ?
            """,
            (now, now + 2 * self.backoff_cap_s, limit),
        )
        return [_item(r) for r in rows]

    def mark_delivered(self, item_id: int, *, etag: str | None, final_key: str,
                       outcome: str) -> None:
        """S3 proved it holds the object: record where it went and its ETag."""
        now = time.time()
        with self._db.tx() as db:
            db.execute(
                "UPDATE items SET state = 'delivered', etag = ?, final_key = ?, outcome = ?, "
                "delivered_at = ?, updated_at = ?, last_error = NULL, attempts = attempts + 1 "
                "WHERE id = ?", (etag, final_key, outcome, now, now, item_id),
            )
            # upload_log.json gains this entry on its next write (append, not a rewrite)
            db.execute("INSERT OR IGNORE INTO upload_log_pending (item_id) VALUES (?)",
                       (item_id,))

    def mark_failed(self, item_id: int, *, retryable: bool, error: str,
                    next_at: float | None = None) -> None:
        """Count a failed attempt: retry at `next_at`, or fail permanently."""
        now = time.time()
        with self._db.tx(durable=not retryable) as db:
            db.execute(
                "UPDATE items SET state = ?, attempts = attempts + 1, last_error = ?, "
                "next_attempt_at = ?, updated_at = ? WHERE id = ?",
                (PENDING if retryable else FAILED, error[:500],
                 next_at if next_at is not None else now, now, item_id),
            )

    def note_attempt(self, item_id: int, error: str) -> None:
        """An attempt that did not count against the item (the queue paused under it)."""
        with self._db.tx(durable=False) as db:
            db.execute("UPDATE items SET attempts = attempts + 1, last_error = ?, updated_at = ?"
                       " WHERE id = ?", (error[:500], time.time(), item_id))

    def defer(self, item_id: int, next_at: float) -> None:
        """Postpone an item without counting an attempt (e.g. its file is being rewritten)."""
        with self._db.tx(durable=False) as db:
            db.execute("UPDATE items SET next_attempt_at = ?, updated_at = ? WHERE id = ?",
                       (next_at, time.time(), item_id))

    def retry(self, item_id: int) -> bool:
        """Make a pending or failed item due now; False if there is no such undelivered item."""
        with self._db.tx() as db:
            cur = db.execute(
                "UPDATE items SET state = 'pending', next_attempt_at = 0, updated_at = ? "
                "WHERE id = ? AND state != 'delivered'", (time.time(), item_id),
            )
        return cur.rowcount == 1

    def retry_failed(self) -> int:
        """Revive every permanently failed item; returns how many."""
        with self._db.tx() as db:
            cur = db.execute(
                "UPDATE items SET state = 'pending', next_attempt_at = 0, updated_at = ? "
                "WHERE state = 'failed'", (time.time(),),
            )
        return cur.rowcount

    def resend(self, item_id: int) -> int | None:
        """Queue a delivered item again as a new row (verify found its object missing or
        different); conditional puts decide what happens. None if the local file is gone."""
        with self._db.tx() as db:
            row = db.execute("SELECT * FROM items WHERE id = ? AND state = 'delivered'",
                             (item_id,)).fetchone()
            if row is None or row["pruned_at"] is not None or not Path(row["path"]).exists():
                return None
            return insert_item(
                db, kind=row["kind"], source=row["source"], path=row["path"],
                key=row["final_key"] or row["key"], sha256=row["sha256"], size=row["size"],
                content_type=row["content_type"], record_id=row["record_id"],
                device_serial=row["device_serial"],
                prior_sha256=json.dumps([row["sha256"]]),
            )

    def update_content(self, item_id: int, *, sha256: str, size: int) -> None:
        """Record that a not-yet-delivered file was rewritten (a manifest settled its keys)."""
        with self._db.tx() as db:
            db.execute("UPDATE items SET sha256 = ?, size = ?, updated_at = ? "
                       "WHERE id = ? AND state != ?",
                       (sha256, size, time.time(), item_id, DELIVERED))

    # --- queries -------------------------------------------------------------------------

    def get(self, item_id: int) -> Item | None:
        rows = self._db.rows("SELECT * FROM items WHERE id = ?", (item_id,))
        return _item(rows[0]) if rows else None

    def all(self, state: str | None = None) -> list[Item]:
        """Every item, or those in one state, oldest first."""
        if state is None:
            return [_item(r) for r in self._db.rows("SELECT * FROM items ORDER BY id")]
        return [_item(r) for r in self._db.rows(
            "SELECT * FROM items WHERE state = ? ORDER BY id", (state,))]

    def undelivered(self) -> list[Item]:
        """Pending and failed items, oldest first (on the state index)."""
        return [_item(r) for r in self._db.rows(
            "SELECT * FROM items WHERE state IN ('pending', 'failed') ORDER BY id")]

    def of_package(self, package: str) -> list[Item]:
        """Every row of one package (its files and the manifest), oldest first."""
        return [_item(r) for r in self._db.rows(
            "SELECT * FROM items WHERE package = ? ORDER BY id", (package,))]

    def delivered(self) -> list[Item]:
        """Items S3 confirmed that the outbox still remembers (what `verify` checks)."""
        return self.all(DELIVERED)

    # --- retention and a year of history -------------------------------------------------

    def prunable(self, cutoff: float) -> list[Item]:
        """Rows retention may prune: every row of a package all delivered by `cutoff`, and
        delivered signups; none already pruned. Reports and recent packages are not loaded,
        so a housekeeping pass after a year reads what it deletes, not the whole history."""
        return [_item(r) for r in self._db.rows(
            "SELECT * FROM items WHERE pruned_at IS NULL AND ("
            " (package IS NULL AND source = 'signup' AND state = 'delivered'"
            "  AND delivered_at <= ?)"
            " OR package IN (SELECT package FROM items WHERE package IS NOT NULL"
            "  AND pruned_at IS NULL GROUP BY package HAVING MIN(state = 'delivered'"
            "  AND delivered_at IS NOT NULL AND delivered_at <= ?) = 1))"
            " ORDER BY id", (cutoff, cutoff))]

    def mark_pruned(self, item_ids: list[int]) -> None:
        """Note that delivered items' local files were deleted by retention."""
        with self._db.tx() as db:
            db.executemany("UPDATE items SET pruned_at = ? WHERE id = ? AND state = 'delivered'",
                           [(time.time(), i) for i in item_ids])

    def compact(self, *, before: float) -> int:
        """Fold delivered, pruned rows older than `before` into a count per day.

        The newest delivered row of each dropped report stays (its ETag is what a later
        edit of that report replaces with If-Match); users stay (a signup is sent once).
        """
        rows = self._db.rows(  # the newest delivered rows of the reports, found once
            "SELECT id, delivered_at FROM items WHERE state = 'delivered' "
            "AND delivered_at < ? AND (pruned_at IS NOT NULL OR source = 'report') "
            "AND id NOT IN (SELECT MAX(id) FROM items WHERE source = 'report' "
            "AND state = 'delivered' GROUP BY path)", (before,))
        if not rows:
            return 0
        per_day: dict[str, int] = {}
        for r in rows:
            day = datetime.fromtimestamp(r["delivered_at"], UTC).date().isoformat()
            per_day[day] = per_day.get(day, 0) + 1
        with self._db.tx() as db:
            db.executemany("INSERT INTO daily (day, delivered) VALUES (?, ?) ON CONFLICT(day) "
                           "DO UPDATE SET delivered = delivered + excluded.delivered",
                           sorted(per_day.items()))
            db.executemany("UPDATE users SET item_id = NULL WHERE item_id = ?",
                           [(r["id"],) for r in rows])
            db.executemany("DELETE FROM items WHERE id = ?", [(r["id"],) for r in rows])
        log.info("outbox: compacted %d delivered rows older than retention", len(rows))
        return len(rows)


def _priors(text: str | None) -> tuple[str, ...]:
    return tuple(json.loads(text)) if text else ()


def _item(row: sqlite3.Row) -> Item:
    values = dict(row)
    values["path"] = Path(values["path"])
    values["prior_sha256"] = _priors(values.get("prior_sha256"))
    return Item(**values)
