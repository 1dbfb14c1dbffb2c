"""Package decisions: every package folder the agent built and what was decided for it
(queued, withheld by the operator, rejected), and the queueing of a package's files."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from device_agent.core.s3keys import content_type
from device_agent.documents.package import DISPOSITIONS
from device_agent.shipping.outbox.db import Database
from device_agent.shipping.outbox.items import insert_item

log = logging.getLogger(__name__)


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


class PackageLike(Protocol):
    """What Packages.add needs of a package (package.PackageInfo)."""

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


class Packages:
    """The packages table, and the items rows a queued package adds."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def record(self, folder: Path, *, stamp: str, record_id: str | None,
               disposition: str, reason: str | None, verdict: str | None) -> None:
        """Remember a package folder and what was decided for it (idempotent per folder)."""
        if disposition not in DISPOSITIONS:
            raise ValueError(f"disposition {disposition!r} is not one of {DISPOSITIONS}")
        with self._db.tx() as db:
            db.execute(
                "INSERT OR IGNORE INTO packages (folder, stamp, record_id, disposition, reason,"
                " verdict, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (str(Path(folder).resolve()), stamp, record_id, disposition, reason, verdict,
                 time.time()))

    def add(self, info: PackageLike) -> list[int]:
        """Queue a built package's files and its manifest (idempotent per folder)."""
        package = str(Path(info.folder).resolve())
        with self._db.tx() as db:
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
                ids.append(insert_item(
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
        with self._db.tx() as db:
            db.execute("UPDATE packages SET disposition = ?, reason = ? WHERE folder = ?",
                       (disposition, reason, str(Path(folder).resolve())))

    def row(self, folder: Path | str) -> PackageRow | None:
        rows = self._db.rows("SELECT * FROM packages WHERE folder = ?",
                             (str(Path(folder).resolve()),))
        return PackageRow(**dict(rows[0])) if rows else None

    def of_record(self, record_id: str) -> list[PackageRow]:
        """The package folders built for one record id (one, unless a crash made two)."""
        rows = self._db.rows("SELECT * FROM packages WHERE record_id = ? ORDER BY created_at",
                             (record_id,))
        return [PackageRow(**dict(r)) for r in rows]

    def recent(self, limit: int = 20) -> list[PackageRow]:
        """The newest package folders and their dispositions, newest first."""
        rows = self._db.rows("SELECT * FROM packages ORDER BY created_at DESC LIMIT ?",
                             (limit,))
        return [PackageRow(**dict(r)) for r in rows]

    def known(self, folders: Iterable[str] | None = None) -> set[str]:
        """Resolved folder paths of every package the outbox knows (queued or not).

        With `folders`, only which of those it knows: a pass asks about the folders on disk
        (retention keeps a month of them), not about a year of packages it remembers.
        """
        both = ("SELECT folder FROM packages WHERE folder IN ({marks}) UNION SELECT DISTINCT "
                "package FROM items WHERE package IN ({marks})")
        if folders is None:
            return {r[0] for r in self._db.tuples(
                "SELECT folder FROM packages UNION "
                "SELECT DISTINCT package FROM items WHERE package IS NOT NULL")}
        asked = list(folders)
        known: set[str] = set()
        for i in range(0, len(asked), 400):  # SQLite's bound-parameter limit is 999 or more
            batch = asked[i:i + 400]
            marks = ", ".join("?" * len(batch))
            known.update(r[0] for r in self._db.tuples(both.format(marks=marks),
                                                        (*batch, *batch)))
        return known
