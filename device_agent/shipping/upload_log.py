"""reports/upload_log.json: the legacy app's view of what was delivered, kept by the outbox.

The legacy app (and whatever still reads its log) learns from this file which reports and
signups reached S3. It is a view of the outbox's delivered rows in the legacy app's shapes,
with our own facts under `agent`: appended to while it is still the file this agent last
wrote (its bytes copied, never parsed), rebuilt whole when another writer changed it,
keeping every entry that writer put there.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from device_agent.core.fsutil import atomic_extend, atomic_write, make_dirs
from device_agent.shipping.outbox.db import Database

log = logging.getLogger(__name__)

UPLOAD_LOG_NAME = "upload_log.json"
UPLOAD_LOG_DAYS = 7.0  # package files shown when the view is rebuilt (reports, signups: all)
UPLOAD_LOG_MAX = 2000  # entries appended before the view is rebuilt (package files age out)


class UploadLog:
    """REPORTS_DIR/upload_log.json as a view of the outbox's delivered rows."""

    def __init__(self, db: Database, reports_dir: Path) -> None:
        self._db = db
        self.path = Path(reports_dir) / UPLOAD_LOG_NAME

    def current(self) -> bool:
        """Whether upload_log.json is still the file this outbox last wrote (nobody else
        wrote it since): then it may be appended to without being read."""
        sig = self._db.get_meta("upload_log_sig")
        return sig is not None and sig == _file_sig(self.path)

    def read(self) -> list[dict[str, Any]]:
        """The entries of upload_log.json, [] if absent. A file that is not a JSON list
        (torn by a writer without atomic replace) is moved aside, not lost, and [] read."""
        path = self.path
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

    def _rows(self, where: str, args: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        return self._db.tuples(
            "SELECT i.id, i.kind, i.source, i.path, i.key, i.final_key, i.size, i.sha256, "
            "i.etag, i.outcome, i.record_id, i.delivered_at, u.username FROM items AS i "
            f"LEFT JOIN users AS u ON u.item_id = i.id WHERE i.state = 'delivered' AND {where} "
            "ORDER BY i.delivered_at, i.id", args)

    def rebuild(self, foreign: Sequence[dict[str, Any]], *, bucket: str, region: str,
                now: float | None = None) -> Path:
        """Write upload_log.json whole: `foreign` (the legacy app's entries, kept as they
        are), then every signup and every report this agent delivered and the package files
        of the last UPLOAD_LOG_DAYS. What a foreign entry already says is not said twice."""
        now = time.time() if now is None else now
        names, users = legacy_successes(foreign)
        with self._db.tx() as db:
            db.execute("DELETE FROM upload_log_pending")
        rows = self._rows("(i.source IN ('report', 'signup') OR i.delivered_at >= ?)",
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
        for username, registered_at in self._db.tuples(  # compacted away or adopted: no row
                "SELECT username, registered_at FROM users WHERE item_id IS NULL"):
            if username not in done:
                lines.append(json.dumps(_signup_entry(username, registered_at)))
        return self._write(lines, appended=0)

    def append(self, *, bucket: str, region: str) -> Path | None:
        """Add the deliveries since the last write to upload_log.json without reading it
        (its bytes are copied, never parsed). None when it must be rebuilt instead: another
        writer changed it, or UPLOAD_LOG_MAX entries were appended since the last rebuild."""
        if not self.current():
            return None
        appended = int(self._db.get_meta("upload_log_appended") or 0)
        rows = self._rows("i.id IN (SELECT item_id FROM upload_log_pending)", ())
        path = self.path
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
        with self._db.tx() as db:
            db.executemany("DELETE FROM upload_log_pending WHERE item_id = ?",
                           [(r[0],) for r in rows])
        return self._note(appended + len(rows))

    def _write(self, lines: list[str], *, appended: int) -> Path:
        make_dirs(self.path.parent)
        # one entry per line: as readable as indent=1, and json's C encoder does the work
        text = ",\n".join(lines).encode()
        atomic_write(self.path, b"[\n" + text + b"\n]\n" if lines else b"[]\n")
        return self._note(appended)

    def _note(self, appended: int) -> Path:
        with self._db.tx() as db:
            db.executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                           [("upload_log_sig", _file_sig(self.path)),
                            ("upload_log_appended", str(appended))])
        return self.path

    def write(self, *, bucket: str = "", region: str = "", now: float | None = None) -> Path:
        """upload_log.json in the legacy app's shapes, written atomically: appended to while
        it is ours, rebuilt (keeping every entry another writer put there) when not."""
        path = self.append(bucket=bucket, region=region)
        if path is not None:
            return path
        foreign = [e for e in self.read() if not is_ours(e)]
        return self.rebuild(foreign, bucket=bucket, region=region, now=now)


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
