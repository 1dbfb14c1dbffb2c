"""Users the agent signed up (or the legacy app did): each is sent once, ever."""

from __future__ import annotations

import time
from pathlib import Path

from device_agent.shipping.outbox.db import Database
from device_agent.shipping.outbox.items import LEGACY_OUTCOME, insert_item


class Users:
    """The users table, and the signup row queued with each new user."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def stamp(self, username: str) -> str | None:
        """The registration stamp remembered for a user (ISO), or None if never seen."""
        rows = self._db.rows("SELECT registered_at FROM users WHERE username = ?", (username,))
        return rows[0]["registered_at"] if rows else None

    def known(self) -> set[str]:
        return {r[0] for r in self._db.rows("SELECT username FROM users")}

    def add_signup(self, username: str, registered_at: str, path: Path, *, key: str,
                   sha256: str, size: int) -> int | None:
        """Remember a user and queue their signup document, once; None if already known."""
        with self._db.tx() as db:
            if db.execute("SELECT 1 FROM users WHERE username = ?", (username,)).fetchone():
                return None
            item_id = insert_item(
                db, kind="user_signup", source="signup", path=str(Path(path).resolve()),
                key=key, sha256=sha256, size=size, content_type="application/json",
            )
            db.execute(
                "INSERT INTO users (username, registered_at, item_id, first_seen) "
                "VALUES (?, ?, ?, ?)", (username, registered_at, item_id, time.time()),
            )
        return item_id

    def adopt(self, username: str, registered_at: str) -> bool:
        """Remember a user the legacy app already signed up; a signup of ours still queued
        for them is settled as the legacy app's. False if nothing changed."""
        now = time.time()
        with self._db.tx() as db:
            cur = db.execute("INSERT OR IGNORE INTO users (username, registered_at, item_id, "
                             "first_seen) VALUES (?, ?, NULL, ?)", (username, registered_at, now))
            if cur.rowcount:
                return True
            cur = db.execute("UPDATE items SET state = 'delivered', outcome = ?, delivered_at = ?, "
                             "updated_at = ? WHERE state = 'pending' AND id = (SELECT item_id "
                             "FROM users WHERE username = ?)",
                             (LEGACY_OUTCOME, now, now, username))
        return cur.rowcount > 0
