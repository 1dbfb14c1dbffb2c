"""The outbox's database: one SQLite file, one connection, its schema and its migrations.

`Database` owns the connection and its lock; every store (items, packages, users, problems,
hashes, pause) and the upload_log view reads and writes through it, each its own tables.
The schema carries its version in `PRAGMA user_version`; `_MIGRATIONS` brings an older file
up to date in one transaction (a unit in the field upgrades without losing a queued item).

PRAGMA synchronous is FULL for every decision that creates, delivers or forgets data and
NORMAL only for bookkeeping (`tx(durable=False)`: losing one is harmless).
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from device_agent.core.errors import AgentError
from device_agent.core.fsutil import make_dirs

log = logging.getLogger(__name__)

DB_NAME = "outbox.sqlite3"
SCHEMA_VERSION = 2
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


class OutboxVersionError(AgentError):
    """The outbox was written by a newer agent than this one."""

    exit_code = 3


class Database:
    """The SQLite file under STATE_DIR; thread-safe, one connection, one lock."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.RLock()
        self._batch = False  # read and set only while holding _lock
        make_dirs(self.path.parent)
        self._conn = sqlite3.connect(
            self.path, timeout=_BUSY_TIMEOUT_MS / 1000, isolation_level=None,
            check_same_thread=False,
        )
        self._conn.row_factory = sqlite3.Row
        self._conn.execute(f"PRAGMA busy_timeout={_BUSY_TIMEOUT_MS}")
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._upgrade()

    def _upgrade(self) -> None:
        with self.tx() as db:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise OutboxVersionError(
                    f"{self.path} was written by a newer device-agent (schema {version}, "
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
                log.info("outbox %s upgraded from schema %d to %d", self.path, version,
                         SCHEMA_VERSION)
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    @contextmanager
    def tx(self, *, durable: bool = True) -> Iterator[sqlite3.Connection]:
        """One IMMEDIATE transaction; `durable=False` for bookkeeping that may be lost.

        Inside batch() it is a SAVEPOINT of the batch's transaction instead: its failure
        undoes only what it wrote, and it is committed (durably) with the batch.
        """
        with self._lock:
            if self._batch:
                self._conn.execute("SAVEPOINT tx")
                try:
                    yield self._conn
                except BaseException:
                    self._conn.execute("ROLLBACK TO tx")
                    self._conn.execute("RELEASE tx")
                    raise
                self._conn.execute("RELEASE tx")
                return
            if not durable:
                self._conn.execute("PRAGMA synchronous=NORMAL")
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    yield self._conn
                except BaseException:
                    self._conn.execute("ROLLBACK")
                    raise
                self._conn.execute("COMMIT")
            finally:
                if not durable:
                    self._conn.execute("PRAGMA synchronous=FULL")

    @contextmanager
    def batch(self) -> Iterator[None]:
        """The tx() calls inside as one durable transaction: one commit (one fsync) for all.

        For a run of small writes nothing acts on until the run ends (a scan queueing the
        reports it found: none is sent before the scan returns). Other threads wait for the
        lock meanwhile, so keep a batch short. A failure rolls back the whole batch; a
        batch inside a batch joins it.
        """
        with self._lock:
            if self._batch:
                yield
                return
            self._conn.execute("BEGIN IMMEDIATE")
            self._batch = True
            try:
                yield
                self._conn.execute("COMMIT")
            except BaseException:
                if self._conn.in_transaction:  # also after a failed COMMIT, which may leave it open
                    self._conn.execute("ROLLBACK")
                raise
            finally:
                self._batch = False

    @contextmanager
    def locked(self) -> Iterator[sqlite3.Connection]:
        """The connection, held for several reads in a row (or one streamed read)."""
        with self._lock:
            yield self._conn

    def rows(self, sql: str, args: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._conn.execute(sql, args).fetchall()

    def tuples(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """Rows as plain tuples: bulk reads (thousands of rows) skip building sqlite3.Row."""
        with self._lock:
            cur = self._conn.cursor()
            cur.row_factory = None
            return cur.execute(sql, args).fetchall()

    # --- meta: small facts about the file (when it was made, the upload_log's signature) -

    def get_meta(self, key: str) -> str | None:
        rows = self.tuples("SELECT value FROM meta WHERE key = ?", (key,))
        return str(rows[0][0]) if rows else None

    def set_meta(self, key: str, value: str) -> None:
        with self.tx() as db:
            db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))
