"""The content hashes of reports already read, keyed by (path, size, mtime, inode): a pass
never re-reads a file it knows."""

from __future__ import annotations

from device_agent.shipping.outbox.db import Database


class Hashes:
    """The file_hashes table."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def cached(self, path: str, *, size: int, mtime_ns: int, ino: int) -> str | None:
        rows = self._db.rows("SELECT sha256 FROM file_hashes WHERE path = ? AND size = ? AND "
                             "mtime_ns = ? AND ino = ?", (path, size, mtime_ns, ino))
        return rows[0][0] if rows else None

    def remember(self, path: str, *, size: int, mtime_ns: int, ino: int, sha256: str) -> None:
        with self._db.tx(durable=False) as db:
            db.execute("INSERT OR REPLACE INTO file_hashes (path, size, mtime_ns, ino, sha256) "
                       "VALUES (?, ?, ?, ?, ?)", (path, size, mtime_ns, ino, sha256))

    def settled(self, folder: str, resolved: str) -> dict[str, tuple[int, int, int]]:
        """Reports in `folder` whose cached hash is also their newest queued content.

        name -> (size, mtime_ns, ino) as hashed, for paths under `folder` (with its trailing
        separator; `resolved` is the same folder's real path, as item rows hold it). A file
        still matching its entry has nothing new to queue (track_report would return None),
        so a pass after a year of reports asks one query instead of one per file.
        """
        n = len(folder)
        rows = self._db.tuples(
            "SELECT substr(h.path, ?), h.size, h.mtime_ns, h.ino FROM file_hashes AS h "
            "WHERE substr(h.path, 1, ?) = ? AND h.sha256 = (SELECT i.sha256 FROM items AS i "
            "WHERE i.path = ? || substr(h.path, ?) AND i.source = 'report' "
            "ORDER BY i.id DESC LIMIT 1)", (n + 1, n, folder, resolved, n + 1))
        return {r[0]: (r[1], r[2], r[3]) for r in rows}

    def count(self) -> int:
        """How many report hashes are cached."""
        return int(self._db.tuples("SELECT COUNT(*) FROM file_hashes")[0][0])

    def forget(self, keep: set[str], *, folder: str = "") -> int:
        """Drop cached hashes of files no longer present; returns how many.

        `keep` holds paths, or with `folder` (ending in a separator) names in that folder.
        """
        with self._db.locked() as conn:  # streamed: a year of reports is thousands of paths
            cur = conn.cursor()
            cur.row_factory = None
            n = len(folder)
            gone = [r[0] for r in cur.execute("SELECT path FROM file_hashes")
                    if not r[0].startswith(folder) or r[0][n:] not in keep]
        if gone:
            with self._db.tx(durable=False) as db:
                db.executemany("DELETE FROM file_hashes WHERE path = ?", [(p,) for p in gone])
        return len(gone)
