"""The durable outbox: one SQLite row per file to deliver, the single source of truth.

Files are written durably (atomic_write) before their rows are committed, so a crash leaves
either a file without a row (reconcile() enqueues it) or both. `next_attempt_at` is wall-clock
epoch seconds because it must survive restarts; a clock that jumps backwards cannot strand an
item, because anything scheduled further ahead than the backoff cap counts as due.
`reports/upload_log.json` is a view written from here for legacy tools, never read back.

PRAGMA synchronous is FULL for every decision that creates, delivers or forgets data and
NORMAL only for attempt bookkeeping (losing one is harmless: the item is tried again).
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

PENDING = "pending"
DELIVERED = "delivered"
FAILED = "failed"
STATES = (PENDING, DELIVERED, FAILED)

DB_NAME = "outbox.sqlite3"
_BUSY_TIMEOUT_MS = 10_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,
    source TEXT NOT NULL,
    path TEXT NOT NULL,
    key TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    size INTEGER NOT NULL,
    content_type TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL DEFAULT 0,
    last_error TEXT,
    if_match TEXT,
    etag TEXT,
    final_key TEXT,
    outcome TEXT,
    package TEXT,
    record_id TEXT,
    device_serial TEXT,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    delivered_at REAL,
    pruned_at REAL
);
CREATE UNIQUE INDEX IF NOT EXISTS items_package_kind ON items(package, kind)
    WHERE package IS NOT NULL;
CREATE INDEX IF NOT EXISTS items_state ON items(state, next_attempt_at);
CREATE INDEX IF NOT EXISTS items_path ON items(path);
CREATE TABLE IF NOT EXISTS users (
    username TEXT PRIMARY KEY,
    registered_at TEXT NOT NULL,
    item_id INTEGER,
    first_seen REAL NOT NULL
);
"""

CONTENT_TYPES = {".pdf": "application/pdf", ".json": "application/json"}


def content_type_for(path: Path) -> str:
    """The Content-Type for a file by its extension."""
    return CONTENT_TYPES.get(path.suffix.lower(), "application/octet-stream")


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

    @property
    def filename(self) -> str:
        return self.key.rsplit("/", 1)[-1]


@dataclass(frozen=True)
class Stats:
    """What `status` shows about the outbox."""

    pending: int
    failed: int
    delivered: int
    oldest_pending_age_s: float | None
    last_delivered_at: float | None
    last_error: str | None


class Outbox:
    """The SQLite outbox under STATE_DIR; thread-safe, one connection per instance."""

    def __init__(self, db_path: Path, *, backoff_cap_s: float = 900.0) -> None:
        self.db_path = Path(db_path)
        self.backoff_cap_s = backoff_cap_s
        self._lock = threading.RLock()
        self.db_path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(
            self.db_path, timeout=_BUSY_TIMEOUT_MS / 1000, isolation_level=None,
            check_same_thread=False,
        )
        self._db.row_factory = sqlite3.Row
        self._db.execute(f"PRAGMA busy_timeout={_BUSY_TIMEOUT_MS}")
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        with self._tx():
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    self._db.execute(statement)

    @classmethod
    def open(cls, settings: Any) -> Outbox:
        """The outbox of these settings (STATE_DIR/outbox.sqlite3)."""
        return cls(Path(settings.state_dir) / DB_NAME, backoff_cap_s=settings.retry_max_backoff_s)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _tx(self, *, durable: bool = True) -> Iterator[sqlite3.Connection]:
        """One IMMEDIATE transaction; `durable=False` for bookkeeping that may be lost."""
        with self._lock:
            if not durable:
                self._db.execute("PRAGMA synchronous=NORMAL")
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            finally:
                if not durable:
                    self._db.execute("PRAGMA synchronous=FULL")

    def _insert(self, db: sqlite3.Connection, **cols: Any) -> int:
        now = time.time()
        cols.setdefault("created_at", now)
        cols.setdefault("updated_at", now)
        names = ", ".join(cols)
        marks = ", ".join("?" for _ in cols)
        cur = db.execute(f"INSERT INTO items ({names}) VALUES ({marks})", tuple(cols.values()))
        return int(cur.lastrowid)

    # --- enqueue -------------------------------------------------------------------------

    def add_package(self, info: Any) -> list[int]:
        """Queue a built package's three files and its manifest (idempotent per folder)."""
        package = str(Path(info.folder).resolve())
        with self._tx() as db:
            existing = db.execute(
                "SELECT id FROM items WHERE package = ? ORDER BY id", (package,)
            ).fetchall()
            if existing:
                return [r["id"] for r in existing]
            ids = []
            for f in (*info.files, info.manifest):
                ids.append(self._insert(
                    db, kind=f.kind, source="package", path=str(Path(f.path).resolve()),
                    key=info.key(f), sha256=f.sha256, size=f.size,
                    content_type=content_type_for(Path(f.path)), package=package,
                    record_id=info.record_id, device_serial=info.device_serial,
                ))
        log.info("queued package %s (%d files)", info.stamp, len(ids))
        return ids

    def add_file(self, path: Path, *, kind: str, key: str, sha256: str, size: int,
                 source: str = "report", if_match: str | None = None,
                 content_type: str | None = None) -> int:
        """Queue one file (a dropped report, its JSON twin, a signup); `if_match` replaces."""
        with self._tx() as db:
            return self._insert(
                db, kind=kind, source=source, path=str(Path(path).resolve()), key=key,
                sha256=sha256, size=size, if_match=if_match,
                content_type=content_type or content_type_for(Path(path)),
            )

    def track_report(self, path: Path, *, kind: str, key: str, sha256: str,
                     size: int) -> int | None:
        """Queue a report file if its content is new; a delivered one is replaced by ETag."""
        resolved = str(Path(path).resolve())
        with self._tx() as db:
            last = db.execute(
                "SELECT * FROM items WHERE path = ? AND source = 'report' "
                "ORDER BY id DESC LIMIT 1", (resolved,)
            ).fetchone()
            if last is not None and last["sha256"] == sha256:
                return None
            if last is not None and last["state"] == PENDING:
                db.execute(
                    "UPDATE items SET sha256 = ?, size = ?, updated_at = ? WHERE id = ?",
                    (sha256, size, time.time(), last["id"]),
                )
                return int(last["id"])
            if_match = None
            if last is not None and last["state"] == DELIVERED and last["key"] == key:
                # the object we put is replaced only while it is still the one we saw
                if_match = last["etag"]
            return self._insert(
                db, kind=kind, source="report", path=resolved, key=key, sha256=sha256,
                size=size, if_match=if_match, content_type=content_type_for(Path(path)),
            )

    # --- users ---------------------------------------------------------------------------

    def user_stamp(self, username: str) -> str | None:
        """The registration stamp remembered for a user (ISO), or None if never seen."""
        with self._lock:
            row = self._db.execute(
                "SELECT registered_at FROM users WHERE username = ?", (username,)
            ).fetchone()
        return row["registered_at"] if row else None

    def add_signup(self, username: str, registered_at: str, path: Path, *, key: str,
                   sha256: str, size: int) -> int | None:
        """Remember a user and queue their signup document, once; None if already known."""
        with self._tx() as db:
            if db.execute("SELECT 1 FROM users WHERE username = ?", (username,)).fetchone():
                return None
            item_id = self._insert(
                db, kind="user_signup", source="signup", path=str(Path(path).resolve()),
                key=key, sha256=sha256, size=size, content_type="application/json",
            )
            db.execute(
                "INSERT INTO users (username, registered_at, item_id, first_seen) "
                "VALUES (?, ?, ?, ?)", (username, registered_at, item_id, time.time()),
            )
        return item_id

    # --- drain ---------------------------------------------------------------------------

    def due(self, now: float | None = None, *, limit: int = 1000) -> list[Item]:
        """Pending items whose time has come; a manifest only once its package is delivered."""
        now = time.time() if now is None else now
        with self._lock:
            rows = self._db.execute(
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
            ).fetchall()
        return [_item(r) for r in rows]

    def mark_delivered(self, item_id: int, *, etag: str | None, final_key: str,
                       outcome: str) -> None:
        """S3 confirmed the object: record where it went and its ETag."""
        now = time.time()
        with self._tx() as db:
            db.execute(
                "UPDATE items SET state = 'delivered', etag = ?, final_key = ?, outcome = ?, "
                "delivered_at = ?, updated_at = ?, last_error = NULL, attempts = attempts + 1 "
                "WHERE id = ?", (etag, final_key, outcome, now, now, item_id),
            )

    def mark_failed(self, item_id: int, *, retryable: bool, error: str,
                    next_at: float | None = None) -> None:
        """Count a failed attempt: retry at `next_at`, or fail permanently."""
        now = time.time()
        with self._tx(durable=not retryable) as db:
            db.execute(
                "UPDATE items SET state = ?, attempts = attempts + 1, last_error = ?, "
                "next_attempt_at = ?, updated_at = ? WHERE id = ?",
                (PENDING if retryable else FAILED, error[:500],
                 next_at if next_at is not None else now, now, item_id),
            )

    def defer(self, item_id: int, next_at: float) -> None:
        """Postpone an item without counting an attempt (e.g. its file is being rewritten)."""
        with self._tx(durable=False) as db:
            db.execute("UPDATE items SET next_attempt_at = ?, updated_at = ? WHERE id = ?",
                       (next_at, time.time(), item_id))

    def retry(self, item_id: int) -> bool:
        """Make a pending or failed item due now; False if there is no such undelivered item."""
        with self._tx() as db:
            cur = db.execute(
                "UPDATE items SET state = 'pending', next_attempt_at = 0, updated_at = ? "
                "WHERE id = ? AND state != 'delivered'", (time.time(), item_id),
            )
        return cur.rowcount == 1

    def retry_failed(self) -> int:
        """Revive every permanently failed item; returns how many."""
        with self._tx() as db:
            cur = db.execute(
                "UPDATE items SET state = 'pending', next_attempt_at = 0, updated_at = ? "
                "WHERE state = 'failed'", (time.time(),),
            )
        return cur.rowcount

    # --- queries -------------------------------------------------------------------------

    def get(self, item_id: int) -> Item | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM items WHERE id = ?", (item_id,)).fetchone()
        return _item(row) if row else None

    def items(self, state: str | None = None) -> list[Item]:
        """Every item, or those in one state, oldest first."""
        with self._lock:
            if state is None:
                rows = self._db.execute("SELECT * FROM items ORDER BY id").fetchall()
            else:
                rows = self._db.execute(
                    "SELECT * FROM items WHERE state = ? ORDER BY id", (state,)
                ).fetchall()
        return [_item(r) for r in rows]

    def package_items(self, package: str) -> list[Item]:
        """Every row of one package (its three files and the manifest), oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM items WHERE package = ? ORDER BY id", (package,)).fetchall()
        return [_item(r) for r in rows]

    def update_content(self, item_id: int, *, sha256: str, size: int) -> None:
        """Record that a not-yet-delivered file was rewritten (a manifest settled its keys)."""
        with self._tx() as db:
            db.execute("UPDATE items SET sha256 = ?, size = ?, updated_at = ? "
                       "WHERE id = ? AND state != ?",
                       (sha256, size, time.time(), item_id, DELIVERED))

    def delivered(self) -> list[Item]:
        """Items S3 confirmed (what `verify` checks against the bucket)."""
        return self.items(DELIVERED)

    def stats(self, now: float | None = None) -> Stats:
        """Depth, oldest pending age, last upload and last error, for `status`."""
        now = time.time() if now is None else now
        with self._lock:
            counts = dict(self._db.execute(
                "SELECT state, COUNT(*) FROM items GROUP BY state").fetchall())
            oldest = self._db.execute(
                "SELECT MIN(created_at) FROM items WHERE state = 'pending'").fetchone()[0]
            last = self._db.execute("SELECT MAX(delivered_at) FROM items").fetchone()[0]
            err = self._db.execute(
                "SELECT last_error FROM items WHERE state != 'delivered' AND last_error "
                "IS NOT NULL ORDER BY updated_at DESC LIMIT 1").fetchone()
        return Stats(
            pending=counts.get(PENDING, 0), failed=counts.get(FAILED, 0),
            delivered=counts.get(DELIVERED, 0),
            oldest_pending_age_s=None if oldest is None else max(0.0, now - oldest),
            last_delivered_at=last, last_error=err[0] if err else None,
        )

    def known_packages(self) -> set[str]:
        """Resolved folder paths of every package the outbox has rows for."""
        with self._lock:
            rows = self._db.execute(
                "SELECT DISTINCT package FROM items WHERE package IS NOT NULL").fetchall()
        return {r[0] for r in rows}

    def mark_pruned(self, item_ids: list[int]) -> None:
        """Note that delivered items' local files were deleted by retention."""
        with self._tx() as db:
            db.executemany("UPDATE items SET pruned_at = ? WHERE id = ? AND state = 'delivered'",
                           [(time.time(), i) for i in item_ids])

    # --- start-up reconciliation ---------------------------------------------------------

    def reconcile(self, records_root: Path, *,
                  load_package: Any = None) -> tuple[list[Path], list[Item]]:
        """Queue package folders that have a manifest but no rows; fail rows whose file is gone.

        Returns (folders queued, items failed). A folder without a manifest is a capture that
        never finished (or is being written now): it is left alone.
        """
        if load_package is None:
            from device_agent.package import load_package

        queued: list[Path] = []
        known = self.known_packages()
        if records_root.is_dir():
            for folder in sorted(p for p in records_root.iterdir() if p.is_dir()):
                if str(folder.resolve()) in known or not any(folder.glob("manifest_*.json")):
                    continue
                try:
                    info = load_package(folder)
                except Exception as exc:  # a damaged folder must not stop the others
                    log.error("package folder %s cannot be loaded (%s); it stays on disk, "
                              "not queued: inspect or remove it", folder, exc)
                    continue
                self.add_package(info)
                queued.append(folder)
        failed: list[Item] = []
        for item in self.items(PENDING):
            if not item.path.exists():
                reason = (f"local file {item.path} is missing (deleted before delivery); "
                          f"nothing to upload for {item.key}")
                self.mark_failed(item.id, retryable=False, error=reason)
                log.error("outbox item %d: %s", item.id, reason)
                failed.append(item)
        return queued, failed

    # --- legacy view ---------------------------------------------------------------------

    def write_upload_log(self, reports_dir: Path) -> Path:
        """Write reports/upload_log.json atomically (a view for legacy tools, never read)."""
        from device_agent.fsutil import atomic_write

        entries = [
            {
                "filename": it.filename,
                "local_path": str(it.path),
                "s3_key": it.final_key or it.key,
                "type": it.kind,
                "size": it.size,
                "sha256": it.sha256,
                "etag": it.etag,
                "outcome": it.outcome,
                "record_id": it.record_id,
                "uploaded_at": _iso(it.delivered_at),
            }
            for it in self.delivered()
        ]
        path = Path(reports_dir) / "upload_log.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps(entries, indent=1).encode() + b"\n")
        return path


def _iso(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    return datetime.fromtimestamp(epoch, UTC).astimezone().isoformat()


def _item(row: sqlite3.Row) -> Item:
    values = dict(row)
    values["path"] = Path(values["path"])
    return Item(**values)
