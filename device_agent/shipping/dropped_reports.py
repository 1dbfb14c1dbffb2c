"""Finding work in REPORTS_DIR: PDFs other programs drop there, and their .json twins.

Each entry is looked at without following links: only regular files, within REPORT_MAX_MB,
whose names can form an S3 key, are queued. Anything else (a symlink to /etc/passwd or to
the agent's own credentials, a FIFO named *.pdf, a 1 GiB file, a name with a backslash, a
newline or bytes that are not UTF-8) is skipped with one line, once, and recorded as a
problem `status` shows; it never stops the other entries. Names are hashed in logs (a
report may be named after its patient). A file is queued once it has stopped changing; its
content hash is kept in the outbox keyed by (path, size, mtime, inode), so a pass never
re-reads a file it already knows.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import stat
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from device_agent.core import s3keys
from device_agent.core.fsutil import FileTooLarge, NotRegularFile, hash_regular, storage_condition
from device_agent.shipping.outbox import Outbox
from device_agent.shipping.protocols import FindResult

log = logging.getLogger(__name__)

SOURCE = "reports"
STABLE_AGE_S = 2.0  # a report untouched this long is taken as completely written
# An mtime further ahead than this is not a writer at work (a clock set wrong when it was
# written, a copy keeping its times): waiting for it to age would wait for years.
FUTURE_SLACK_S = 60.0
# Entries looked at per outbox transaction: a pass finding 500 new reports commits 8 times,
# not 1,000 (a hash row and a queue row each, the queue rows fsync'd); none is sent before
# the pass ends, so nothing waits on the rows; and the lock a capture's queueing also needs
# is held for one batch at a time.
BATCH = 64


class ReportsFinder:
    """Queues new or modified reports from one folder; `find()` is one look."""

    def __init__(self, reports_dir: Path, outbox: Outbox, *, max_bytes: int,
                 hasher: Callable[..., tuple[str, os.stat_result]] = hash_regular) -> None:
        self.reports_dir = Path(reports_dir)
        self.outbox = outbox
        self.max_bytes = max_bytes
        self.hasher = hasher
        self._seen: dict[str, tuple[int, int, int]] = {}

    def find(self, *, now: float | None = None) -> FindResult:
        result = FindResult()
        now = time.time() if now is None else now
        try:
            with os.scandir(self.reports_dir) as listing:
                entries = sorted(e.name for e in listing)
        except FileNotFoundError:
            return result
        except OSError as exc:
            result.errors.append(f"cannot list REPORTS_DIR {self.reports_dir}: {exc.strerror}")
            return result
        names = set(entries)
        present: set[str] = set()  # names, not paths: a year of reports is thousands
        problems: set[str] = set()
        # entries are plain names in one folder: paths by concatenation, not os.path.join
        folder = os.path.join(self.reports_dir, "")
        settled = self.outbox.hashes.settled(folder, os.path.join(self.reports_dir.resolve(), ""))
        unchanged = self._unchanged(folder, settled, names)
        looks: list[tuple[str, str]] = []  # (name, kind) in listing order
        for entry in entries:
            if not entry.lower().endswith(".pdf"):
                continue
            twin = entry[:-4] + ".json"
            if entry in unchanged and twin not in names:  # most of a year's reports
                present.add(entry)
                continue
            candidates = [(entry, "ecg_report_pdf")]
            if twin in names:
                candidates.append((twin, "report_json"))
            for name, kind in candidates:
                present.add(name)
                if name not in unchanged:
                    looks.append((name, kind))
        for start in range(0, len(looks), BATCH):
            with self.outbox.db.batch():  # one commit for the rows these entries queue
                for name, kind in looks[start:start + BATCH]:
                    problem = self._look_once(name, kind, now, result)
                    if problem:
                        ref = s3keys.display_name(name)
                        problems.add(ref)
                        result.skipped += 1
                        if self.outbox.problems.note(SOURCE, ref, problem):
                            log.warning("report %s skipped: %s", ref, problem)
        self.outbox.problems.clear(SOURCE, keep=problems)
        if self.outbox.hashes.count() != len(unchanged & present):  # else all are still here
            self.outbox.hashes.forget(present, folder=folder)
        self._seen = {p: sig for p, sig in self._seen.items()
                      if p.startswith(folder) and p[len(folder):] in present}
        return result

    def _unchanged(self, folder: str, settled: dict[str, tuple[int, int, int]],
                   names: set[str]) -> set[str]:
        """The listed names still as they were hashed whose content is already queued.

        The common case after a year (thousands of known reports): one lstat each, no query
        and no transaction; anything else takes the full look (_look). Not kept in _seen:
        if one changes, its new signature differs from any it had, which is all the
        stability check asks (so a year of reports is not held in memory).
        """
        same: set[str] = set()
        lstat, regular, limit = os.lstat, stat.S_ISREG, self.max_bytes
        for name in settled.keys() & names:
            try:
                st = lstat(folder + name)
            except OSError:
                continue
            if ((st.st_size, st.st_mtime_ns, st.st_ino) == settled[name]
                    and regular(st.st_mode) and st.st_size <= limit):
                same.add(name)
        return same

    def _look_once(self, name: str, kind: str, now: float, result: FindResult) -> str | None:
        """_look, with one entry's unexpected trouble kept to that entry."""
        try:
            return self._look(self.reports_dir / name, kind, now, result)
        except Exception as exc:  # one entry's trouble never stops the others
            if isinstance(exc, sqlite3.Error) or storage_condition(
                    exc, self.outbox.db_path.parent) is not None:
                raise  # the outbox or its disk, not this entry: the pass says it once
            log.exception("report %s: unexpected error", s3keys.display_name(name))
            return f"unexpected {type(exc).__name__}"

    def _look(self, path: Path, kind: str, now: float, result: FindResult) -> str | None:
        """Queue one entry if it is ready; the reason it was skipped, or None."""
        problem = s3keys.key_problem(path.name)
        if problem:
            return f"its name cannot form an S3 key ({problem}); rename the file"
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return None
        if not stat.S_ISREG(st.st_mode):
            return ("not a regular file (a link, FIFO, folder or device); only regular files "
                    "are uploaded")
        if st.st_size > self.max_bytes:
            return f"{st.st_size} bytes, over REPORT_MAX_MB; not uploaded"
        sig = (st.st_size, st.st_mtime_ns, st.st_ino)
        key = str(path)
        previous = self._seen.get(key)
        self._seen[key] = sig
        if previous != sig and -FUTURE_SLACK_S < now - st.st_mtime < STABLE_AGE_S:
            return None  # still being written? look again next pass
        sha = self.outbox.hashes.cached(key, size=st.st_size, mtime_ns=st.st_mtime_ns,
                                        ino=st.st_ino)
        if sha is None:
            try:
                sha, st = self.hasher(path, max_bytes=self.max_bytes)
            except FileNotFoundError:
                return None
            except (NotRegularFile, FileTooLarge) as exc:
                return f"{exc.strerror}; not uploaded"
            self.outbox.hashes.remember(key, size=st.st_size, mtime_ns=st.st_mtime_ns,
                                        ino=st.st_ino, sha256=sha)
        try:
            mtime: datetime | None = datetime.fromtimestamp(st.st_mtime).astimezone()
        except (OverflowError, OSError, ValueError):  # a time datetime cannot hold
            mtime = None
        try:
            when, note = s3keys.report_dating(path.name, mtime)
        except ValueError as exc:
            return f"{exc}; not uploaded"
        if note:  # once: the next pass knows the file and does not look at it again
            log.warning("report %s: %s", s3keys.display_name(path.name), note)
        s3_key = s3keys.report_key(path.name, when)
        if self.outbox.items.track_report(path, kind=kind, key=s3_key, sha256=sha,
                                          size=st.st_size) is not None:
            result.queued += 1
        return None
