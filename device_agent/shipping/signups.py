"""The legacy app's users.json, read tolerantly and never rewritten; one signup per new user.

Shapes accepted (what versions of the desktop app wrote):
- a dict keyed by username, `{"ptr": {"password": ..., "full_name": ...}, ...}` (the
  app's own form: it looked users up by name), the key filling a missing `username`;
- a list of user objects, each with `username`;
- either of those wrapped as `{"users": ...}`.
The file is read with a size bound (USERS_MAX_MB), never through a link, and parsed within
the interpreter's recursion limit: a file that is not JSON, nested 100k deep, holding a
5000-digit number or of another shape raises UsersFileError and is left as it is (a
half-written file is the legacy app's to finish; resetting it would lose users). One user
whose entry cannot make a signup (a lone surrogate in a name, no username) is skipped with
one line naming a hash of the entry, and the others go on.

A signup document depends only on the user's own fields and registration time, so a unit
that lost its outbox produces byte-identical bodies under the same key (the conditional
put then says "already delivered" instead of keeping a second copy). The registration time
is the user's own: `registration_date`, else the legacy app's `signup_date` (YYYY-MM-DD,
what its sign-in screens write), else `registered_at`; a user with none of these usable is
filed under UNDATED (2000-01-01, the layout's "date unknown") with empty time fields in the
body, never under the clock's "now" (a second pass after a lost outbox would stamp again).
`serial_id` defaults to the username when the entry has none, as the legacy sync does.
The key's name part is injective in the username (s3keys.safe_username).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from device_agent.core import s3keys
from device_agent.core.errors import UsersFileError
from device_agent.core.fsutil import (
    FileTooLarge,
    NotRegularFile,
    atomic_write,
    make_dirs,
    read_regular,
)
from device_agent.core.text import checked
from device_agent.shipping.outbox import Outbox
from device_agent.shipping.protocols import FindResult

log = logging.getLogger(__name__)

SOURCE = "users"
SIGNUP_FIELDS = ("username", "full_name", "phone", "serial_id", "email", "age", "gender",
                 "registration_date", "last_sync", "uploaded_at")
_LEGACY_TIME = "%Y-%m-%d %H:%M:%S"
_REGISTRATION_FORMATS = ("%Y-%m-%d %H:%M:%S", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d")
_REGISTRATION_KEYS = ("registration_date", "signup_date", "registered_at")
UNDATED = datetime(2000, 1, 1)  # local time; where users with no usable date are filed
_MAX_TEXT = 500


def user_ref(username: str) -> str:
    """How logs and problems name a user: a hash, never the name."""
    return "user#" + hashlib.sha256(username.encode("utf-8", "surrogatepass")).hexdigest()[:12]


def read_users(path: Path | str, *, max_bytes: int = 4 << 20,
               skipped: list[tuple[str, str]] | None = None) -> list[dict[str, Any]]:
    """Every user in users.json as a dict with a `username`; [] if the file does not exist.

    An entry that is not a user is logged, or, when `skipped` is given, appended to it as
    (ref, reason) for the caller to report once (the finder reads the file every pass).
    """
    path = Path(path)
    notes: list[tuple[str, str]] = [] if skipped is None else skipped
    try:
        raw = read_regular(path, max_bytes=max_bytes)
    except FileNotFoundError:
        return []
    except FileTooLarge:
        raise UsersFileError(f"users file {path} is over USERS_MAX_MB ({max_bytes} bytes); "
                             "it was not read: check what is writing it") from None
    except NotRegularFile as exc:
        raise UsersFileError(f"users file {path} is {exc.strerror}; point USERS_FILE at the "
                             "legacy app's users.json") from None
    except OSError as exc:
        raise UsersFileError(f"cannot read users file {path}: {exc.strerror}; check its "
                             "permissions") from exc
    if not raw.strip():
        raise UsersFileError(f"users file {path} is empty (half-written?); it was left as it "
                             "is: restore it from the front end or a backup")
    try:
        doc = json.loads(raw.decode("utf-8-sig"), parse_int=_bounded_int)
    except RecursionError:
        raise UsersFileError(f"users file {path} is nested too deeply to be users; it was "
                             "left as it is: fix or restore it") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise UsersFileError(f"users file {path} is not valid JSON ({type(exc).__name__}; "
                             "half-written?); it was left as it is: fix or restore it, "
                             "signups wait until then") from None
    if isinstance(doc, dict) and set(doc) == {"users"} and _is_users(doc["users"]):
        doc = doc["users"]  # the wrapped form; else a lone user called "users" (dict form)
    if isinstance(doc, dict):
        entries: list[tuple[str | None, Any]] = list(doc.items())
    elif isinstance(doc, list):
        entries = [(None, entry) for entry in doc]
    else:
        raise UsersFileError(f"users file {path} holds a JSON {type(doc).__name__}, not a list "
                             "or an object of users; fix or restore it")
    users = []
    for index, (name, entry) in enumerate(entries):
        if not isinstance(entry, dict):
            notes.append((f"entry {index}", "is not an object; skipped"))
            continue
        user = dict(entry)
        if name and not user.get("username"):
            user["username"] = name
        if not isinstance(user.get("username"), str) or not user["username"].strip():
            notes.append((f"entry {index}", "has no username; skipped"))
            continue
        user["username"] = user["username"].strip()
        users.append(user)
    if skipped is None:
        for ref, reason in notes:
            log.warning("users file %s: %s %s", path, ref, reason)
    return users


def _is_users(value: Any) -> bool:
    """Whether the value of a lone `users` key is the users themselves (a list of entries,
    or a dict of user entries; `{}` is no users), not one user's own fields
    (`{"users": {"password": ...}}`)."""
    if isinstance(value, list):
        return True
    return isinstance(value, dict) and all(isinstance(v, dict) for v in value.values())


def _bounded_int(text: str) -> int | str:
    """A JSON integer, or its text when it is too long to be a number a person typed."""
    return int(text) if len(text) <= 64 else text


def _text(value: Any) -> str:
    if value is None or isinstance(value, dict | list):
        return ""
    return str(value)[:_MAX_TEXT]


def parse_registration(value: Any) -> datetime | None:
    """A users.json registration date (legacy 'YYYY-MM-DD HH:MM:SS' or ISO), local time."""
    if not value or not isinstance(value, str):
        return None
    text = value.strip()
    when: datetime | None
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        when = None
        for fmt in _REGISTRATION_FORMATS:
            try:
                when = datetime.strptime(text, fmt)
                break
            except ValueError:
                continue
    if when is None or when.year < s3keys.EARLIEST_YEAR:
        return None
    return when if when.tzinfo else when.astimezone()


def registration_of(user: Mapping[str, Any]) -> datetime | None:
    """The user's own registration time from their entry, or None when it gives none."""
    for key in _REGISTRATION_KEYS:
        when = parse_registration(user.get(key))
        if when is not None:
            return when
    return None


def signup_document(user: Mapping[str, Any], registered_at: datetime | None) -> bytes:
    """The legacy `user_signup_*.json` body: exactly the legacy fields, never a password.

    `last_sync` and `uploaded_at` are the registration time: a signup is sent once, when
    the user is first seen, so both describe that moment (and the body stays the same
    whenever it is rebuilt); all three are "" for a user whose entry gives no date.
    NotUnicodeText (a ValueError) for text that is not valid Unicode.
    """
    registration = registered_at.strftime(_LEGACY_TIME) if registered_at else ""
    serial = user["serial_id"] if "serial_id" in user else user.get("username")
    doc = {
        "username": _text(user.get("username")),
        "full_name": _text(user.get("full_name")),
        "phone": _text(user.get("phone")),
        "serial_id": _text(serial),
        "email": _text(user.get("email")),
        "age": _text(user.get("age")),
        "gender": _text(user.get("gender")),
        "registration_date": registration,
        "last_sync": registration,
        "uploaded_at": registered_at.isoformat() if registered_at else "",
    }
    ref = user_ref(doc["username"])
    for value in doc.values():
        checked(value, f"users file entry {ref}")  # the one Unicode gate, before any write
    return json.dumps(doc, indent=2, ensure_ascii=False).encode("utf-8")


class SignupsFinder:
    """Queues one signup document per user first seen in USERS_FILE."""

    def __init__(self, users_file: Path, signups_dir: Path, outbox: Outbox, *,
                 max_bytes: int) -> None:
        self.users_file = Path(users_file)
        self.signups_dir = Path(signups_dir)
        self.outbox = outbox
        self.max_bytes = max_bytes

    def find(self) -> FindResult:
        result = FindResult()
        skipped: list[tuple[str, str]] = []
        try:
            users = read_users(self.users_file, max_bytes=self.max_bytes, skipped=skipped)
        except UsersFileError as exc:
            if self.outbox.problems.note(SOURCE, "users.json", str(exc)):
                log.error("%s", exc)  # once per distinct problem, not every pass
            result.errors.append(str(exc))
            return result
        known = self.outbox.users.known()
        problems: set[str] = set()
        for ref, reason in skipped:  # entries that are not users: one line each, once
            problems.add(ref)
            result.skipped += 1
            if self.outbox.problems.note(SOURCE, ref, reason):
                log.warning("users file %s: %s %s", self.users_file, ref, reason)
        for user in users:
            username = user["username"]
            if username in known:
                continue  # delivered or queued, also by an earlier entry of this same file
            try:
                if self._queue(user):
                    result.queued += 1
                known.add(username)
            except (UnicodeEncodeError, ValueError) as exc:
                ref = user_ref(username)
                problems.add(ref)
                result.skipped += 1
                reason = f"cannot make its signup ({type(exc).__name__}); fix the entry"
                if self.outbox.problems.note(SOURCE, ref, reason):
                    log.warning("users file %s: %s %s", self.users_file, ref, reason)
        # what is still wrong stays noted (and logged once); what was fixed is forgotten
        self.outbox.problems.clear(SOURCE, keep=problems)
        return result

    def _queue(self, user: Mapping[str, Any]) -> bool:
        username = str(user["username"])
        registered = registration_of(user)  # the user's own date, never the clock's
        doc = signup_document(user, registered)  # refuses text that is not Unicode first
        key = s3keys.signup_key(username, registered or UNDATED)
        make_dirs(self.signups_dir)
        local = self.signups_dir / key.rsplit("/", 1)[-1]  # one file per user: injective
        atomic_write(local, doc)  # durable before its row
        return self.outbox.users.add_signup(username, registered.isoformat() if registered else "",
                                            local, key=key, sha256=hashlib.sha256(doc).hexdigest(),
                                            size=len(doc)) is not None
