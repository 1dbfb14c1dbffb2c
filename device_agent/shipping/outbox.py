"""The durable outbox: one SQLite row per file to deliver, the single source of truth.

Files are written durably (atomic_write) before their rows are committed, so a crash leaves
either a file without a row (reconcile enqueues it, if its folder says it may be uploaded)
or both. `next_attempt_at` is wall-clock epoch seconds because it must survive restarts; a
clock that jumps backwards cannot strand an item, because anything scheduled further ahead
than the backoff cap counts as due.

Besides the items the database remembers: every package the agent built and what was
decided for it (queued, withheld by the operator, rejected), problems met while finding
work (a report that is a symlink, a users.json that is not JSON), the content hashes of
reports already read (so a pass never re-reads a file it knows), a queue-wide pause (the
endpoint or the credentials are failing) and a count per day of delivered items compacted
away after RETENTION_DAYS, so a year of captures costs no more per pass than a week.

The schema carries its version in `PRAGMA user_version`; `_MIGRATIONS` brings an older file
up to date in one transaction (a unit in the field upgrades without losing a queued item).

PRAGMA synchronous is FULL for every decision that creates, delivers or forgets data and
NORMAL only for attempt bookkeeping (losing one is harmless: the item is tried again).
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

from device_agent.core.errors import AgentError
from device_agent.core.fsutil import atomic_extend, atomic_write, make_dirs
from device_agent.core.s3keys import content_type
from device_agent.documents.package import DISPOSITIONS, REJECTED, WITHHELD

log = logging.getLogger(__name__)

PENDING = "pending"
DELIVERED = "delivered"
FAILED = "failed"
STATES = (PENDING, DELIVERED, FAILED)

DB_NAME = "outbox.sqlite3"
SCHEMA_VERSION = 2
UPLOAD_LOG_NAME = "upload_log.json"
UPLOAD_LOG_DAYS = 7.0  # package files shown when the view is rebuilt (reports, signups: all)
UPLOAD_LOG_MAX = 2000  # entries appended before the view is rebuilt (package files age out)
LEGACY_OUTCOME = "legacy"  # a row for what the legacy app delivered (legacy.py adopts it)
_BUSY_TIMEOUT_MS = 10_000

_TABLES = """
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
    pruned_at REAL,
    prior_sha256 TEXT
);
CREATE UNIQUE INDEX IF NOT EXISTS items_package_kind ON items(package, kind)
    WHERE package IS NOT NULL;
CREATE INDEX IF NOT EXISTS items_state ON items(state, next_attempt_at);
CREATE INDEX IF NOT EXISTS items_path ON items(path);
CREATE INDEX IF NOT EXISTS items_delivered ON items(delivered_at) WHERE delivered_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS users (
    username TEXT PRIMARY KEY,
    registered_at TEXT NOT NULL,
    item_id INTEGER,
    first_seen REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS packages (
    folder TEXT PRIMARY KEY,
    stamp TEXT NOT NULL,
    record_id TEXT,
    disposition TEXT NOT NULL,
    reason TEXT,
    verdict TEXT,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS packages_created ON packages(created_at);
CREATE TABLE IF NOT EXISTS problems (
    source TEXT NOT NULL,
    ref TEXT NOT NULL,
    reason TEXT NOT NULL,
    first_seen REAL NOT NULL,
    last_seen REAL NOT NULL,
    PRIMARY KEY (source, ref)
);
CREATE TABLE IF NOT EXISTS file_hashes (
    path TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    ino INTEGER NOT NULL,
    sha256 TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS daily (
    day TEXT PRIMARY KEY,
    delivered INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS upload_log_pending (
    item_id INTEGER PRIMARY KEY
);
"""


def _migrate_v0(db: sqlite3.Connection) -> None:
    """0.1.0's file: items and users only, no version. New columns and tables."""
    columns = {r[1] for r in db.execute("PRAGMA table_info(items)")}
    if "prior_sha256" not in columns:
        db.execute("ALTER TABLE items ADD COLUMN prior_sha256 TEXT")
    # A 0.1.0 unit queued every folder with a manifest; record those it knew as queued.
    db.execute(
        "INSERT OR IGNORE INTO packages (folder, stamp, record_id, disposition, reason, verdict,"
        " created_at) SELECT package, substr(key, 24, 15), record_id, 'queued', NULL, NULL,"
        " MIN(created_at) FROM items WHERE package IS NOT NULL GROUP BY package")


# from-version -> step; each runs after _TABLES has created what is missing.
_MIGRATIONS = {0: _migrate_v0, 1: _migrate_v0}


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


@dataclass(frozen=True)
class PackageRow:
    """A package folder the agent built and what was decided for it."""

    folder: str
    stamp: str
    record_id: str | None
    disposition: str
    reason: str | None
    verdict: str | None
    created_at: float


@dataclass(frozen=True)
class Problem:
    """Something met while finding work that a person should look at (never identity)."""

    source: str
    ref: str
    reason: str
    first_seen: float
    last_seen: float


class PackageLike(Protocol):
    """What add_package needs of a package (package.PackageInfo)."""

    @property
    def folder(self) -> Path: ...

    @property
    def stamp(self) -> str: ...

    @property
    def record_id(self) -> str | None: ...

    @property
    def device_serial(self) -> str: ...

    @property
    def all_files(self) -> Sequence[Any]: ...

    def key(self, file: Any) -> str: ...


class OutboxVersionError(AgentError):
    """The outbox was written by a newer agent than this one."""

    exit_code = 3


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


class Outbox:
    """The SQLite outbox under STATE_DIR; thread-safe, one connection per instance."""

    def __init__(self, db_path: Path, *, backoff_cap_s: float = 900.0) -> None:
        self.db_path = Path(db_path)
        self.backoff_cap_s = backoff_cap_s
        self._lock = threading.RLock()
        make_dirs(self.db_path.parent)
        self._db = sqlite3.connect(
            self.db_path, timeout=_BUSY_TIMEOUT_MS / 1000, isolation_level=None,
            check_same_thread=False,
        )
        self._db.row_factory = sqlite3.Row
        self._db.execute(f"PRAGMA busy_timeout={_BUSY_TIMEOUT_MS}")
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._upgrade()

    def _upgrade(self) -> None:
        with self._tx() as db:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise OutboxVersionError(
                    f"{self.db_path} was written by a newer device-agent (schema {version}, "
                    f"this one knows {SCHEMA_VERSION}): install that version again")
            fresh = not db.execute(
                "SELECT 1 FROM sqlite_master WHERE name = 'items'").fetchone()
            for statement in _TABLES.split(";"):
                if statement.strip():
                    db.execute(statement)
            db.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('created_at', ?)",
                       (repr(time.time()) if fresh else "0",))
            if not fresh and version < SCHEMA_VERSION:
                _MIGRATIONS[version](db)
                log.info("outbox %s upgraded from schema %d to %d", self.db_path, version,
                         SCHEMA_VERSION)
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

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

    def _rows(self, sql: str, args: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def _tuples(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """Rows as plain tuples: bulk reads (thousands of rows) skip building sqlite3.Row."""
        with self._lock:
            cur = self._db.cursor()
            cur.row_factory = None
            return cur.execute(sql, args).fetchall()

    def _insert(self, db: sqlite3.Connection, **cols: Any) -> int:
        now = time.time()
        cols.setdefault("created_at", now)
        cols.setdefault("updated_at", now)
        names = ", ".join(cols)
        marks = ", ".join("?" for _ in cols)
        cur = db.execute(f"INSERT INTO items ({names}) VALUES ({marks})", tuple(cols.values()))
        return int(cur.lastrowid or 0)

    # --- packages ------------------------------------------------------------------------

    def record_package(self, folder: Path, *, stamp: str, record_id: str | None,
                       disposition: str, reason: str | None, verdict: str | None) -> None:
        """Remember a package folder and what was decided for it (idempotent per folder)."""
        if disposition not in DISPOSITIONS:
            raise ValueError(f"disposition {disposition!r} is not one of {DISPOSITIONS}")
        with self._tx() as db:
            db.execute(
                "INSERT OR IGNORE INTO packages (folder, stamp, record_id, disposition, reason,"
                " verdict, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (str(Path(folder).resolve()), stamp, record_id, disposition, reason, verdict,
                 time.time()))

    def add_package(self, info: PackageLike) -> list[int]:
        """Queue a built package's files and its manifest (idempotent per folder)."""
        package = str(Path(info.folder).resolve())
        with self._tx() as db:
            existing = db.execute(
                "SELECT id FROM items WHERE package = ? ORDER BY id", (package,)
            ).fetchall()
            if existing:
                return [r["id"] for r in existing]
            db.execute(
                "INSERT OR IGNORE INTO packages (folder, stamp, record_id, disposition, reason,"
                " verdict, created_at) VALUES (?, ?, ?, 'queued', NULL, NULL, ?)",
                (package, info.stamp, info.record_id, time.time()))
            ids = []
            for f in info.all_files:
                ids.append(self._insert(
                    db, kind=f.kind, source="package", path=str(Path(f.path).resolve()),
                    key=info.key(f), sha256=f.sha256, size=f.size,
                    content_type=content_type(f.name), package=package,
                    record_id=info.record_id, device_serial=info.device_serial,
                ))
        log.info("queued package %s (%d files)", info.stamp, len(ids))
        return ids

    def set_disposition(self, folder: Path | str, disposition: str, reason: str | None) -> None:
        """Change what was decided for a package folder (the operator sends a withheld one)."""
        if disposition not in DISPOSITIONS:
            raise ValueError(f"disposition {disposition!r} is not one of {DISPOSITIONS}")
        with self._tx() as db:
            db.execute("UPDATE packages SET disposition = ?, reason = ? WHERE folder = ?",
                       (disposition, reason, str(Path(folder).resolve())))

    def package_row(self, folder: Path | str) -> PackageRow | None:
        rows = self._rows("SELECT * FROM packages WHERE folder = ?",
                          (str(Path(folder).resolve()),))
        return PackageRow(**dict(rows[0])) if rows else None

    def packages_of_record(self, record_id: str) -> list[PackageRow]:
        """The package folders built for one record id (one, unless a crash made two)."""
        rows = self._rows("SELECT * FROM packages WHERE record_id = ? ORDER BY created_at",
                          (record_id,))
        return [PackageRow(**dict(r)) for r in rows]

    def recent_packages(self, limit: int = 20) -> list[PackageRow]:
        """The newest package folders and their dispositions, newest first."""
        rows = self._rows("SELECT * FROM packages ORDER BY created_at DESC LIMIT ?", (limit,))
        return [PackageRow(**dict(r)) for r in rows]

    def known_packages(self, folders: Iterable[str] | None = None) -> set[str]:
        """Resolved folder paths of every package the outbox knows (queued or not).

        With `folders`, only which of those it knows: a pass asks about the folders on disk
        (retention keeps a month of them), not about a year of packages it remembers.
        """
        both = ("SELECT folder FROM packages WHERE folder IN ({marks}) UNION SELECT DISTINCT "
                "package FROM items WHERE package IN ({marks})")
        if folders is None:
            return {r[0] for r in self._tuples(
                "SELECT folder FROM packages UNION "
                "SELECT DISTINCT package FROM items WHERE package IS NOT NULL")}
        asked = list(folders)
        known: set[str] = set()
        for i in range(0, len(asked), 400):  # SQLite's bound-parameter limit is 999 or more
            batch = asked[i:i + 400]
            marks = ", ".join("?" * len(batch))
            known.update(r[0] for r in self._tuples(both.format(marks=marks), (*batch, *batch)))
        return known

    # --- single files --------------------------------------------------------------------

    def add_file(self, path: Path, *, kind: str, key: str, sha256: str, size: int,
                 source: str = "report", if_match: str | None = None) -> int:
        """Queue one file (a dropped report, its JSON twin, a signup); `if_match` replaces."""
        with self._tx() as db:
            return self._insert(
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
        with self._tx() as db:
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
            return self._insert(
                db, kind=kind, source="report", path=resolved, key=key, sha256=sha256,
                size=size, if_match=if_match, content_type=content_type(key),
                prior_sha256=json.dumps(prior) if prior else None,
            )

    # --- users ---------------------------------------------------------------------------

    def user_stamp(self, username: str) -> str | None:
        """The registration stamp remembered for a user (ISO), or None if never seen."""
        rows = self._rows("SELECT registered_at FROM users WHERE username = ?", (username,))
        return rows[0]["registered_at"] if rows else None

    def known_users(self) -> set[str]:
        return {r[0] for r in self._rows("SELECT username FROM users")}

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
        rows = self._rows(
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
        with self._tx() as db:
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
        with self._tx(durable=not retryable) as db:
            db.execute(
                "UPDATE items SET state = ?, attempts = attempts + 1, last_error = ?, "
                "next_attempt_at = ?, updated_at = ? WHERE id = ?",
                (PENDING if retryable else FAILED, error[:500],
                 next_at if next_at is not None else now, now, item_id),
            )

    def note_attempt(self, item_id: int, error: str) -> None:
        """An attempt that did not count against the item (the queue paused under it)."""
        with self._tx(durable=False) as db:
            db.execute("UPDATE items SET attempts = attempts + 1, last_error = ?, updated_at = ?"
                       " WHERE id = ?", (error[:500], time.time(), item_id))

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

    def resend(self, item_id: int) -> int | None:
        """Queue a delivered item again as a new row (verify found its object missing or
        different); conditional puts decide what happens. None if the local file is gone."""
        with self._tx() as db:
            row = db.execute("SELECT * FROM items WHERE id = ? AND state = 'delivered'",
                             (item_id,)).fetchone()
            if row is None or row["pruned_at"] is not None or not Path(row["path"]).exists():
                return None
            return self._insert(
                db, kind=row["kind"], source=row["source"], path=row["path"],
                key=row["final_key"] or row["key"], sha256=row["sha256"], size=row["size"],
                content_type=row["content_type"], record_id=row["record_id"],
                device_serial=row["device_serial"],
                prior_sha256=json.dumps([row["sha256"]]),
            )

    def created_at(self) -> float:
        """When this outbox file was created (0 for one migrated from an older agent).

        Files older than the outbox were there before it: state was lost (a reflashed SD
        card), and the bucket may already hold them (the drainer LISTs before sending)."""
        rows = self._rows("SELECT value FROM meta WHERE key = 'created_at'")
        return float(rows[0][0]) if rows else 0.0

    # --- the queue-wide pause ------------------------------------------------------------

    def pause(self, until: float, reason: str) -> None:
        """Hold every item until `until`: the endpoint, credentials or bucket are failing."""
        with self._tx(durable=False) as db:
            db.executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                           [("paused_until", repr(until)), ("pause_reason", reason[:500])])

    def resume(self) -> None:
        with self._tx(durable=False) as db:
            db.execute("DELETE FROM meta WHERE key IN ('paused_until', 'pause_reason')")

    def paused(self, now: float | None = None) -> tuple[float, str] | None:
        """(until, reason) while the queue is paused, else None."""
        now = time.time() if now is None else now
        rows = dict((r[0], r[1]) for r in self._rows(
            "SELECT key, value FROM meta WHERE key IN ('paused_until', 'pause_reason')"))
        if "paused_until" not in rows or float(rows["paused_until"]) <= now:
            return None
        return float(rows["paused_until"]), rows.get("pause_reason", "")

    # --- problems met while finding work --------------------------------------------------

    def note_problem(self, source: str, ref: str, reason: str) -> bool:
        """Record a problem; True the first time this (source, ref, reason) is seen."""
        now = time.time()
        with self._tx(durable=False) as db:
            row = db.execute("SELECT reason FROM problems WHERE source = ? AND ref = ?",
                             (source, ref)).fetchone()
            if row is not None and row[0] == reason:
                db.execute("UPDATE problems SET last_seen = ? WHERE source = ? AND ref = ?",
                           (now, source, ref))
                return False
            db.execute("INSERT OR REPLACE INTO problems (source, ref, reason, first_seen, "
                       "last_seen) VALUES (?, ?, ?, ?, ?)", (source, ref, reason, now, now))
        return True

    def clear_problems(self, source: str, *, keep: Iterable[str] = ()) -> None:
        """Forget a source's problems except those still present (`keep` refs)."""
        kept = list(keep)
        with self._tx(durable=False) as db:
            marks = ", ".join("?" for _ in kept)
            where = f" AND ref NOT IN ({marks})" if kept else ""
            db.execute(f"DELETE FROM problems WHERE source = ?{where}", (source, *kept))

    def problems(self) -> list[Problem]:
        rows = self._rows("SELECT * FROM problems ORDER BY last_seen DESC")
        return [Problem(**dict(r)) for r in rows]

    # --- content hashes of reports already read ------------------------------------------

    def cached_hash(self, path: str, *, size: int, mtime_ns: int, ino: int) -> str | None:
        rows = self._rows("SELECT sha256 FROM file_hashes WHERE path = ? AND size = ? AND "
                          "mtime_ns = ? AND ino = ?", (path, size, mtime_ns, ino))
        return rows[0][0] if rows else None

    def remember_hash(self, path: str, *, size: int, mtime_ns: int, ino: int,
                      sha256: str) -> None:
        with self._tx(durable=False) as db:
            db.execute("INSERT OR REPLACE INTO file_hashes (path, size, mtime_ns, ino, sha256) "
                       "VALUES (?, ?, ?, ?, ?)", (path, size, mtime_ns, ino, sha256))

    def settled_reports(self, folder: str, resolved: str) -> dict[str, tuple[int, int, int]]:
        """Reports in `folder` whose cached hash is also their newest queued content.

        name -> (size, mtime_ns, ino) as hashed, for paths under `folder` (with its trailing
        separator; `resolved` is the same folder's real path, as item rows hold it). A file
        still matching its entry has nothing new to queue (track_report would return None),
        so a pass after a year of reports asks one query instead of one per file.
        """
        n = len(folder)
        rows = self._tuples(
            "SELECT substr(h.path, ?), h.size, h.mtime_ns, h.ino FROM file_hashes AS h "
            "WHERE substr(h.path, 1, ?) = ? AND h.sha256 = (SELECT i.sha256 FROM items AS i "
            "WHERE i.path = ? || substr(h.path, ?) AND i.source = 'report' "
            "ORDER BY i.id DESC LIMIT 1)", (n + 1, n, folder, resolved, n + 1))
        return {r[0]: (r[1], r[2], r[3]) for r in rows}

    def hash_count(self) -> int:
        """How many report hashes are cached."""
        return int(self._tuples("SELECT COUNT(*) FROM file_hashes")[0][0])

    def forget_hashes(self, keep: set[str], *, folder: str = "") -> int:
        """Drop cached hashes of files no longer present; returns how many.

        `keep` holds paths, or with `folder` (ending in a separator) names in that folder.
        """
        with self._lock:  # streamed: a year of reports is thousands of paths
            cur = self._db.cursor()
            cur.row_factory = None
            n = len(folder)
            gone = [r[0] for r in cur.execute("SELECT path FROM file_hashes")
                    if not r[0].startswith(folder) or r[0][n:] not in keep]
        if gone:
            with self._tx(durable=False) as db:
                db.executemany("DELETE FROM file_hashes WHERE path = ?", [(p,) for p in gone])
        return len(gone)

    # --- queries -------------------------------------------------------------------------

    def get(self, item_id: int) -> Item | None:
        rows = self._rows("SELECT * FROM items WHERE id = ?", (item_id,))
        return _item(rows[0]) if rows else None

    def items(self, state: str | None = None) -> list[Item]:
        """Every item, or those in one state, oldest first."""
        if state is None:
            return [_item(r) for r in self._rows("SELECT * FROM items ORDER BY id")]
        return [_item(r) for r in self._rows(
            "SELECT * FROM items WHERE state = ? ORDER BY id", (state,))]

    def undelivered(self) -> list[Item]:
        """Pending and failed items, oldest first (on the state index)."""
        return [_item(r) for r in self._rows(
            "SELECT * FROM items WHERE state IN ('pending', 'failed') ORDER BY id")]

    def package_items(self, package: str) -> list[Item]:
        """Every row of one package (its files and the manifest), oldest first."""
        return [_item(r) for r in self._rows(
            "SELECT * FROM items WHERE package = ? ORDER BY id", (package,))]

    def update_content(self, item_id: int, *, sha256: str, size: int) -> None:
        """Record that a not-yet-delivered file was rewritten (a manifest settled its keys)."""
        with self._tx() as db:
            db.execute("UPDATE items SET sha256 = ?, size = ?, updated_at = ? "
                       "WHERE id = ? AND state != ?",
                       (sha256, size, time.time(), item_id, DELIVERED))

    def delivered(self) -> list[Item]:
        """Items S3 confirmed that the outbox still remembers (what `verify` checks)."""
        return self.items(DELIVERED)

    def stats(self, now: float | None = None) -> Stats:
        """Depth, oldest pending age, last upload, decisions, problems, pause, for `status`."""
        with self._lock:
            return read_stats(self._db, time.time() if now is None else now)

    def prunable(self, cutoff: float) -> list[Item]:
        """Rows retention may prune: every row of a package all delivered by `cutoff`, and
        delivered signups; none already pruned. Reports and recent packages are not loaded,
        so a housekeeping pass after a year reads what it deletes, not the whole history."""
        return [_item(r) for r in self._rows(
            "SELECT * FROM items WHERE pruned_at IS NULL AND ("
            " (package IS NULL AND source = 'signup' AND state = 'delivered'"
            "  AND delivered_at <= ?)"
            " OR package IN (SELECT package FROM items WHERE package IS NOT NULL"
            "  AND pruned_at IS NULL GROUP BY package HAVING MIN(state = 'delivered'"
            "  AND delivered_at IS NOT NULL AND delivered_at <= ?) = 1))"
            " ORDER BY id", (cutoff, cutoff))]

    def mark_pruned(self, item_ids: list[int]) -> None:
        """Note that delivered items' local files were deleted by retention."""
        with self._tx() as db:
            db.executemany("UPDATE items SET pruned_at = ? WHERE id = ? AND state = 'delivered'",
                           [(time.time(), i) for i in item_ids])

    # --- a year of history ---------------------------------------------------------------

    def compact(self, *, before: float) -> int:
        """Fold delivered, pruned rows older than `before` into a count per day.

        The newest delivered row of each dropped report stays (its ETag is what a later
        edit of that report replaces with If-Match); users stay (a signup is sent once).
        """
        rows = self._rows(  # the newest delivered rows of the reports, found once, not per row
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
        with self._tx() as db:
            db.executemany("INSERT INTO daily (day, delivered) VALUES (?, ?) ON CONFLICT(day) "
                           "DO UPDATE SET delivered = delivered + excluded.delivered",
                           sorted(per_day.items()))
            db.executemany("UPDATE users SET item_id = NULL WHERE item_id = ?",
                           [(r["id"],) for r in rows])
            db.executemany("DELETE FROM items WHERE id = ?", [(r["id"],) for r in rows])
        log.info("outbox: compacted %d delivered rows older than retention", len(rows))
        return len(rows)

    # --- reports/upload_log.json: the legacy app's view of what was delivered -------------

    def get_meta(self, key: str) -> str | None:
        rows = self._tuples("SELECT value FROM meta WHERE key = ?", (key,))
        return str(rows[0][0]) if rows else None

    def set_meta(self, key: str, value: str) -> None:
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    def adopt_report(self, path: Path, *, kind: str, key: str, sha256: str, size: int) -> bool:
        """Record a report the legacy app delivered as delivered: a new row, or its queued
        row of the same content (the legacy app sent it first); False if nothing changed."""
        resolved = str(Path(path).resolve())
        now = time.time()
        with self._tx() as db:
            last = db.execute("SELECT id, state, sha256 FROM items WHERE path = ? AND "
                              "source = 'report' ORDER BY id DESC LIMIT 1",
                              (resolved,)).fetchone()
            if last is not None and (last["state"] != PENDING or last["sha256"] != sha256):
                return False
            item_id = last["id"] if last is not None else self._insert(
                db, kind=kind, source="report", path=resolved, key=key, sha256=sha256,
                size=size, content_type=content_type(key))
            db.execute("UPDATE items SET state = 'delivered', final_key = ?, outcome = ?, "
                       "delivered_at = ?, updated_at = ? WHERE id = ?",
                       (key, LEGACY_OUTCOME, now, now, item_id))
        return True

    def adopt_user(self, username: str, registered_at: str) -> bool:
        """Remember a user the legacy app already signed up; a signup of ours still queued
        for them is settled as the legacy app's. False if nothing changed."""
        now = time.time()
        with self._tx() as db:
            cur = db.execute("INSERT OR IGNORE INTO users (username, registered_at, item_id, "
                             "first_seen) VALUES (?, ?, NULL, ?)", (username, registered_at, now))
            if cur.rowcount:
                return True
            cur = db.execute("UPDATE items SET state = 'delivered', outcome = ?, delivered_at = ?, "
                             "updated_at = ? WHERE state = 'pending' AND id = (SELECT item_id "
                             "FROM users WHERE username = ?)",
                             (LEGACY_OUTCOME, now, now, username))
        return cur.rowcount > 0

    def upload_log_current(self, reports_dir: Path) -> bool:
        """Whether upload_log.json is still the file this outbox last wrote (nobody else
        wrote it since): then it may be appended to without being read."""
        sig = self.get_meta("upload_log_sig")
        return sig is not None and sig == _file_sig(Path(reports_dir) / UPLOAD_LOG_NAME)

    def read_upload_log(self, reports_dir: Path) -> list[dict[str, Any]]:
        """The entries of upload_log.json, [] if absent. A file that is not a JSON list
        (torn by a writer without atomic replace) is moved aside, not lost, and [] read."""
        path = Path(reports_dir) / UPLOAD_LOG_NAME
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return []
        try:
            doc = json.loads(raw)
        except ValueError:
            doc = None
        if isinstance(doc, list):
            return [e for e in doc if isinstance(e, dict)]
        aside = path.with_name(f"{UPLOAD_LOG_NAME}.damaged-{int(time.time())}")
        path.replace(aside)
        log.warning("%s is not a JSON list (half-written?); kept as %s and written anew",
                    path, aside.name)
        return []

    def _log_rows(self, where: str, args: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        return self._tuples(
            "SELECT i.id, i.kind, i.source, i.path, i.key, i.final_key, i.size, i.sha256, "
            "i.etag, i.outcome, i.record_id, i.delivered_at, u.username FROM items AS i "
            f"LEFT JOIN users AS u ON u.item_id = i.id WHERE i.state = 'delivered' AND {where} "
            "ORDER BY i.delivered_at, i.id", args)

    def rebuild_upload_log(self, reports_dir: Path, foreign: Sequence[dict[str, Any]], *,
                           bucket: str, region: str, now: float | None = None) -> Path:
        """Write upload_log.json whole: `foreign` (the legacy app's entries, kept as they
        are), then every signup and every report this agent delivered and the package files
        of the last UPLOAD_LOG_DAYS. What a foreign entry already says is not said twice."""
        now = time.time() if now is None else now
        names, users = legacy_successes(foreign)
        with self._tx() as db:
            db.execute("DELETE FROM upload_log_pending")
        rows = self._log_rows("(i.source IN ('report', 'signup') OR i.delivered_at >= ?)",
                              (now - UPLOAD_LOG_DAYS * 86400,))
        lines = [json.dumps(e) for e in foreign]
        for row in rows:
            entry = _log_entry(row, bucket, region)
            if row[12] is not None and row[12] in users:
                continue
            if row[12] is None and row[2] == "report" and entry["metadata"]["filename"] in names:
                continue
            lines.append(json.dumps(entry))
        done = {r[12] for r in rows if r[12] is not None} | users
        for username, registered_at in self._tuples(  # compacted away or adopted: no row
                "SELECT username, registered_at FROM users WHERE item_id IS NULL"):
            if username not in done:
                lines.append(json.dumps(_signup_entry(username, registered_at)))
        return self._write_log(reports_dir, lines, appended=0)

    def append_upload_log(self, reports_dir: Path, *, bucket: str, region: str) -> Path | None:
        """Add the deliveries since the last write to upload_log.json without reading it
        (its bytes are copied, never parsed). None when it must be rebuilt instead: another
        writer changed it, or UPLOAD_LOG_MAX entries were appended since the last rebuild."""
        if not self.upload_log_current(reports_dir):
            return None
        appended = int(self.get_meta("upload_log_appended") or 0)
        rows = self._log_rows("i.id IN (SELECT item_id FROM upload_log_pending)", ())
        path = Path(reports_dir) / UPLOAD_LOG_NAME
        if not rows:
            return path
        if appended + len(rows) > UPLOAD_LOG_MAX:
            return None
        with path.open("rb") as f:  # only its end is read: where the closing `]` is
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - 256))
            tail = f.read()
        before = tail.rstrip()
        if not before.endswith(b"]") or not before[:-1].rstrip():
            return None  # not a list we can extend in place of reading it: rebuild
        before = before[:-1].rstrip()
        keep = size - len(tail) + len(before)
        lines = [json.dumps(_log_entry(r, bucket, region)) for r in rows]
        text = ",\n".join(lines).encode()
        atomic_extend(path, keep, (b"\n" if before.endswith(b"[") else b",\n") + text
                      + b"\n]\n")
        with self._tx() as db:
            db.executemany("DELETE FROM upload_log_pending WHERE item_id = ?",
                           [(r[0],) for r in rows])
        return self._note_log(path, appended + len(rows))

    def _write_log(self, reports_dir: Path, lines: list[str], *, appended: int) -> Path:
        path = Path(reports_dir) / UPLOAD_LOG_NAME
        make_dirs(path.parent)
        # one entry per line: as readable as indent=1, and json's C encoder does the work
        text = ",\n".join(lines).encode()
        atomic_write(path, b"[\n" + text + b"\n]\n" if lines else b"[]\n")
        return self._note_log(path, appended)

    def _note_log(self, path: Path, appended: int) -> Path:
        with self._tx() as db:
            db.executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                           [("upload_log_sig", _file_sig(path)),
                            ("upload_log_appended", str(appended))])
        return path

    def write_upload_log(self, reports_dir: Path, *, bucket: str = "", region: str = "",
                         now: float | None = None) -> Path:
        """reports/upload_log.json in the legacy app's shapes, written atomically: appended to
        while it is ours, rebuilt (keeping every entry another writer put there) when not."""
        path = self.append_upload_log(reports_dir, bucket=bucket, region=region)
        if path is not None:
            return path
        foreign = [e for e in self.read_upload_log(reports_dir) if not is_ours(e)]
        return self.rebuild_upload_log(reports_dir, foreign, bucket=bucket, region=region,
                                       now=now)


def is_ours(entry: dict[str, Any]) -> bool:
    """An upload_log.json entry this agent wrote (today's shape or the old 7-day view's)."""
    agent = entry.get("agent")
    return (isinstance(agent, dict) and "item_id" in agent) or (
        "s3_key" in entry and "result" not in entry)


def _basename(path: object) -> str:
    """The file name of a logged path, whichever OS wrote it (the legacy app ran on Windows)."""
    return str(path or "").replace("\\", "/").rsplit("/", 1)[-1]


def legacy_successes(entries: Iterable[dict[str, Any]]) -> tuple[set[str], set[str]]:
    """(file names, usernames) upload_log.json entries say were uploaded, read as the legacy
    app reads them: `result.status == "success"`; a file by the base name of `local_path` or
    `metadata.filename`; a user by `metadata.username` where `metadata.type` is user_signup."""
    names: set[str] = set()
    users: set[str] = set()
    for entry in entries:
        result = entry.get("result")
        meta = entry.get("metadata")
        if not isinstance(result, dict) or result.get("status") != "success":
            continue
        meta = meta if isinstance(meta, dict) else {}
        if meta.get("type") == "user_signup":
            if isinstance(meta.get("username"), str):
                users.add(meta["username"])
            continue
        names.update(n for n in (_basename(entry.get("local_path")),
                                 _basename(meta.get("filename"))) if n)
    return names, users


def _iso_local(epoch: float | None) -> str | None:
    """Local time without offset, as the legacy app's datetime.now().isoformat() wrote."""
    if epoch is None:
        return None
    return datetime.fromtimestamp(epoch).isoformat()


def _log_entry(row: tuple[Any, ...], bucket: str, region: str) -> dict[str, Any]:
    """One delivery as the legacy app's `_log_upload` wrote it, with our facts in `agent`."""
    (item_id, kind, source, path, key, final_key, size, sha256, etag, outcome, record_id,
     delivered_at, username) = row
    where = final_key or key
    name = where.rsplit("/", 1)[-1]
    when = _iso_local(delivered_at)
    meta: dict[str, Any]
    if username is not None:
        meta = {"type": "user_signup", "username": username, "serial_number": "",
                "uploaded_at": when}
    else:
        meta = {"filename": _basename(path) if source == "report" else name,
                "uploaded_at": when, "file_size": size,
                "file_type": "." + name.rsplit(".", 1)[-1] if "." in name else ""}
    return {
        "local_path": path,
        "uploaded_at": when,
        "service": "s3",
        "result": {"status": "success", "service": "s3",
                   "url": f"https://{bucket}.s3.{region or 'us-east-1'}.amazonaws.com/{where}",
                   "key": where, "bucket": bucket},
        "metadata": meta,
        "agent": {"item_id": item_id, "type": kind, "sha256": sha256, "etag": etag,
                  "outcome": outcome, "record_id": record_id},
    }


def _signup_entry(username: str, registered_at: str) -> dict[str, Any]:
    """A signup whose outbox row is gone (compacted, or the legacy app sent it)."""
    return {"local_path": f"user_signup_{username}.json", "uploaded_at": registered_at,
            "service": "s3", "result": {"status": "success", "service": "s3"},
            "metadata": {"type": "user_signup", "username": username, "serial_number": "",
                         "uploaded_at": registered_at},
            "agent": {"item_id": None, "type": "user_signup"}}


def _file_sig(path: Path) -> str:
    try:
        st = path.stat()
    except FileNotFoundError:
        return "absent"
    return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"


def retention_cutoff(retention_days: float, now: float | None = None) -> float:
    """Epoch seconds before which delivered history may be pruned and compacted."""
    now = time.time() if now is None else now
    return now - timedelta(days=retention_days).total_seconds()


def _priors(text: str | None) -> tuple[str, ...]:
    return tuple(json.loads(text)) if text else ()


def _iso(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    return datetime.fromtimestamp(epoch, UTC).astimezone().isoformat()


def _item(row: sqlite3.Row) -> Item:
    values = dict(row)
    values["path"] = Path(values["path"])
    values["prior_sha256"] = _priors(values.get("prior_sha256"))
    return Item(**values)
