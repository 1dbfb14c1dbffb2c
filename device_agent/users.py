"""The legacy app's users.json, read tolerantly and never rewritten; signup documents from it.

Shapes accepted (what versions of the desktop app wrote):
- a dict keyed by username, `{"ptr": {"password": ..., "full_name": ...}, ...}` (the
  app's own form: it looked users up by name), the key filling a missing `username`;
- a list of user objects, each with `username`;
- either of those wrapped as `{"users": ...}`.
A file that is not JSON, empty, or of another shape raises UsersFileError and is left as
it is: a half-written file is the legacy app's to finish, and resetting it would lose users.
Single entries that are not objects or have no username are skipped with a warning.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime
from pathlib import Path
from typing import Any

from device_agent.errors import UsersFileError

log = logging.getLogger(__name__)

SIGNUP_FIELDS = ("username", "full_name", "phone", "serial_id", "email", "age", "gender",
                 "registration_date", "last_sync", "uploaded_at")
_LEGACY_TIME = "%Y-%m-%d %H:%M:%S"


def read_users(path: Path | str) -> list[dict[str, Any]]:
    """Every user in users.json as a dict with a `username`; [] if the file does not exist."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise UsersFileError(f"cannot read users file {path}: {exc}; check its permissions"
                             ) from exc
    if not raw.strip():
        raise UsersFileError(f"users file {path} is empty (half-written?); it was left as it "
                             "is: restore it from the front end or a backup")
    try:
        doc = json.loads(raw.decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsersFileError(f"users file {path} is not valid JSON ({exc}; half-written?); it "
                             "was left as it is: fix or restore it, signups wait until then"
                             ) from exc
    if isinstance(doc, dict) and set(doc) == {"users"}:
        doc = doc["users"]
    if isinstance(doc, dict):
        entries = [(name, entry) for name, entry in doc.items()]
    elif isinstance(doc, list):
        entries = [(None, entry) for entry in doc]
    else:
        raise UsersFileError(f"users file {path} holds a JSON {type(doc).__name__}, not a list "
                             "or an object of users; fix or restore it")
    users = []
    for index, (name, entry) in enumerate(entries):
        if not isinstance(entry, dict):
            log.warning("users file %s: entry %d is not an object; skipped", path, index)
            continue
        user = dict(entry)
        if not str(user.get("username") or "").strip() and name:
            user["username"] = name
        if not str(user.get("username") or "").strip():
            log.warning("users file %s: entry %d has no username; skipped", path, index)
            continue
        user["username"] = str(user["username"]).strip()
        users.append(user)
    return users


def _text(value: Any) -> str:
    if value is None or isinstance(value, dict | list):
        return ""
    return str(value)


def signup_document(user: dict[str, Any], registered_at: datetime,
                    uploaded_at: datetime) -> bytes:
    """The legacy `user_signup_*.json` body: exactly the legacy fields, never a password."""
    registration = registered_at.strftime(_LEGACY_TIME)
    doc = {
        "username": _text(user.get("username")),
        "full_name": _text(user.get("full_name")),
        "phone": _text(user.get("phone")),
        "serial_id": _text(user.get("serial_id")),
        "email": _text(user.get("email")),
        "age": _text(user.get("age")),
        "gender": _text(user.get("gender")),
        "registration_date": registration,
        "last_sync": _text(user.get("last_sync")) or registration,
        "uploaded_at": uploaded_at.isoformat(),
    }
    return json.dumps(doc, indent=2, ensure_ascii=False).encode("utf-8")
