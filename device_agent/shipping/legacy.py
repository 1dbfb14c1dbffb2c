"""Taking over a unit the legacy desktop app synced, and running beside it.

The legacy app decides "already uploaded" from reports/upload_log.json alone: a report by
its file name, a signup by its username (legacy_successes says how exactly). Before this
agent's finders first look at REPORTS_DIR and USERS_FILE, and again whenever another writer
changed that log, what it says was delivered is recorded in the outbox as delivered:
- a report in REPORTS_DIR named by a successful entry, unless the entry's `file_size`
  differs from the file's (then it changed since, and ours is a new upload);
- a user of USERS_FILE named by a successful `user_signup` entry.
On the first start of a unit whose log holds legacy entries, the bucket is asked once too
(one LIST of `ecg-reports/`), for what the legacy app put there but never logged (its log
write came after the upload and could be lost): a report whose name and size match an
object there, a user with a `user_signup_{username}_{stamp}.json` object. Until that LIST
has answered, reports and signups are not queued (uploads could not go out then anyway).
Then the log is rebuilt, keeping every legacy entry, so the legacy app also finds what this
agent delivers.
"""

from __future__ import annotations

import logging
import os
import re
import stat
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from device_agent.core import s3keys
from device_agent.core.config import Settings
from device_agent.core.errors import AgentError, UsersFileError
from device_agent.core.fsutil import hash_regular
from device_agent.shipping.outbox import Outbox
from device_agent.shipping.signups import read_users
from device_agent.shipping.upload_log import UploadLog, is_ours, legacy_successes

log = logging.getLogger(__name__)

LISTED = "legacy_bucket_listed"  # outbox meta: the one LIST of the bucket has answered
PREFIX = "ecg-reports/"
_SIGNUP_RE = re.compile(r"^user_signup_(.+)_\d{8}_\d{6}\.json$")
_KINDS = {".pdf": "ecg_report_pdf", ".json": "report_json"}


@dataclass
class Adopted:
    """What one look found the legacy app had delivered (newly recorded as delivered)."""

    reports: int = 0
    users: int = 0


@dataclass
class _Delivered:
    names: dict[str, tuple[str | None, int | None]]  # file name -> (key, size) if known
    users: set[str]


def _from_log(entries: list[dict[str, Any]]) -> _Delivered:
    names, users = legacy_successes(entries)
    found: dict[str, tuple[str | None, int | None]] = dict.fromkeys(names, (None, None))
    for entry in entries:  # the key and size each one was logged with, where it says
        result, meta = entry.get("result"), entry.get("metadata")
        if not isinstance(result, dict) or not isinstance(meta, dict):
            continue
        name = meta.get("filename")
        if isinstance(name, str) and name in found:
            key = result.get("key") if isinstance(result.get("key"), str) else None
            size = meta.get("file_size") if type(meta.get("file_size")) is int else None
            found[name] = (key, size)
    return _Delivered(found, users)


def _from_bucket(listing: dict[str, tuple[str, int]]) -> _Delivered:
    names: dict[str, tuple[str | None, int | None]] = {}
    users: set[str] = set()
    for key, (_etag, size) in listing.items():
        name = key.rsplit("/", 1)[-1]
        match = _SIGNUP_RE.match(name)
        if match:
            users.add(match.group(1))
        elif name.lower().endswith((".pdf", ".json")):
            names[name] = (key, size)
    return _Delivered(names, users)


class Takeover:
    """Adopts what the legacy app delivered; `run_once()` once per pass, before the finders."""

    def __init__(self, settings: Settings, outbox: Outbox, uploader: Any | None) -> None:
        self.settings = settings
        self.outbox = outbox
        self.uploader = uploader
        self.reports_dir = Path(settings.reports_dir)
        self.upload_log = UploadLog(outbox.db, self.reports_dir)

    def run_once(self) -> None:
        """Read the log if another writer changed it; on a unit the legacy app synced, LIST
        the bucket once (AgentError if that fails: the finders wait for it)."""
        changed = not self.upload_log.current()
        # with uploads off, the bucket is asked on the first start that has them on
        need_list = self.uploader is not None and self.outbox.db.get_meta(LISTED) is None
        if not changed and not need_list:
            return
        foreign = [e for e in self.upload_log.read() if not is_ours(e)]
        if need_list:
            if foreign:  # else there is no legacy history to take over
                self._list_bucket()
                changed = True  # what the bucket showed goes into the log too
            self.outbox.db.set_meta(LISTED, "1")
        if changed:
            found = self._adopt(_from_log(foreign), "upload_log.json")
            if found.reports or found.users:
                log.info("legacy upload_log.json: %d reports and %d users were delivered by "
                         "the legacy app; not sent again", found.reports, found.users)
            self.upload_log.rebuild(foreign, bucket=self.settings.s3_bucket or "",
                                    region=self.settings.s3_region or "")

    def _list_bucket(self) -> None:
        assert self.uploader is not None
        try:
            listing = self.uploader.list_prefix(PREFIX)
        except AgentError as exc:
            raise AgentError(f"taking over from the legacy app: cannot list "
                             f"s3://{self.settings.s3_bucket}/{PREFIX} ({exc}); reports "
                             "and signups wait until the bucket answers") from exc
        found = self._adopt(_from_bucket(listing), "bucket")
        log.info("legacy takeover: %d objects listed, %d reports and %d users the legacy app "
                 "had delivered", len(listing), found.reports, found.users)

    def _adopt(self, delivered: _Delivered, where: str) -> Adopted:
        found = Adopted()
        if delivered.names:
            found.reports = self._adopt_reports(delivered.names)
        if delivered.users:
            found.users = self._adopt_users(delivered.users, where)
        return found

    def _adopt_reports(self, names: dict[str, tuple[str | None, int | None]]) -> int:
        try:
            listing = os.listdir(self.reports_dir)
        except FileNotFoundError:
            return 0
        count = 0
        for name in sorted(set(listing) & set(names)):
            kind = _KINDS.get(os.path.splitext(name)[1].lower())
            if kind is None or s3keys.key_problem(name):
                continue
            path = self.reports_dir / name
            try:
                st = os.lstat(path)
                if not stat.S_ISREG(st.st_mode):
                    continue
                key, size = names[name]
                if size is not None and size != st.st_size:
                    continue  # changed since the legacy app sent it: ours is a new upload
                sha, st = hash_regular(path, max_bytes=self.settings.report_max_bytes)
            except (OSError, ValueError):
                continue  # the reports finder meets it too, and says why
            self.outbox.hashes.remember(str(path), size=st.st_size, mtime_ns=st.st_mtime_ns,
                                        ino=st.st_ino, sha256=sha)
            key = key or s3keys.report_key(name, datetime.fromtimestamp(st.st_mtime)
                                           .astimezone())
            if self.outbox.items.adopt_report(path, kind=kind, key=key, sha256=sha,
                                              size=st.st_size):
                count += 1
        return count

    def _adopt_users(self, usernames: set[str], where: str) -> int:
        try:
            users = read_users(self.settings.users_file, max_bytes=self.settings.users_max_bytes)
        except UsersFileError as exc:
            log.warning("legacy takeover (%s): %s", where, exc)
            return 0
        count = 0
        for user in users:
            name = user["username"]
            if name in usernames and self.outbox.users.adopt(
                    name, str(user.get("signup_date") or user.get("registration_date") or "")):
                count += 1
        return count
