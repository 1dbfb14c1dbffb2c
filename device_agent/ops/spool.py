"""Capture requests handed to the running service, and how to tell that it runs.

The service owns the serial port, so `device-agent capture` on a running unit does not open
it: it drops a request into STATE_DIR/spool/new (temp file, fsync, rename, as Maildir), the
service claims it by renaming it into spool/cur, captures, and writes spool/done/ID.json;
the command waits for that file. A request carries its own deadline, so one left behind by
a crash or an impatient caller is answered "expired" instead of being captured late.

A request's record id is derived from its id (`record_id_for`), so a service that restarts
during a capture can tell from what is on disk whether that capture was kept: `recover`
answers "kept, record R (stamp S)" when its package (or held record) exists, and "capture
again" only when it left nothing.

The running service holds an exclusive `flock` on STATE_DIR/service.lock (with its pid
inside); the kernel drops the lock when the process dies, so a stale file means nothing.
Stdlib only: `status` imports this on a slow board.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from device_agent.core.errors import AgentError
from device_agent.core.fsutil import FileLock, atomic_write

log = logging.getLogger(__name__)

LOCK_NAME = "service.lock"
SPOOL_NAME = "spool"
_RECORD_NS = uuid.UUID("6f1d9a52-3c1e-4b8e-9a57-0d2f5c9e7b11")  # record ids of spool requests
NOTHING_KEPT = ("the service restarted during this capture and nothing of it was kept; "
                "capture again")


# --- is the service running? ---------------------------------------------------------------

class ServiceAlreadyRunning(AgentError):
    """Another `device-agent run` holds the service lock of this STATE_DIR."""

    exit_code = 4


class ServiceLock:
    """The running service's exclusive lock on STATE_DIR/service.lock (pid written inside)."""

    def __init__(self, state_dir: Path) -> None:
        self._lock = FileLock(Path(state_dir) / LOCK_NAME)
        self.path = self._lock.path

    def acquire(self) -> ServiceLock:
        """Take the lock or raise ServiceAlreadyRunning naming the holder's pid."""
        if not self._lock.acquire(write_pid=True):
            pid = self._lock.holder_pid()
            raise ServiceAlreadyRunning(
                f"device-agent run is already running (pid {pid}) on {self.path.parent}; "
                "stop it first (systemctl stop device-agent)"
            )
        return self

    def release(self) -> None:
        self._lock.release()

    def __enter__(self) -> ServiceLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def running_pid(state_dir: Path) -> int | None:
    """The pid of the service holding STATE_DIR's lock, or None when no service runs."""
    return FileLock(Path(state_dir) / LOCK_NAME).holder_pid()


# --- the spool ---------------------------------------------------------------------------

def record_id_for(request_id: str) -> str:
    """The record id a spool request's capture gets: derived, so a restart can find it."""
    return str(uuid.uuid5(_RECORD_NS, request_id))


@dataclass(frozen=True)
class Request:
    """One capture request as the service sees it."""

    id: str
    seconds: float | None
    patient: dict[str, Any] | None
    no_upload: bool
    deadline: float  # wall-clock epoch: the caller stops waiting then

    def to_json(self) -> bytes:
        return json.dumps(self.__dict__, sort_keys=True).encode()


class Spool:
    """STATE_DIR/spool/{new,cur,done}: requests in, results out, each file written atomically."""

    def __init__(self, state_dir: Path) -> None:
        self.root = Path(state_dir) / SPOOL_NAME
        self.new = self.root / "new"
        self.cur = self.root / "cur"
        self.done = self.root / "done"

    def ensure(self) -> Spool:
        for folder in (self.new, self.cur, self.done):
            folder.mkdir(parents=True, exist_ok=True)
        return self

    # client side
    def submit(self, *, seconds: float | None, patient: dict[str, Any] | None,
               no_upload: bool, timeout_s: float) -> Request:
        """Queue a capture request for the service; returns it (its id names the result)."""
        self.ensure()
        request = Request(
            id=f"{time.time_ns()}-{os.getpid()}-{secrets.token_hex(3)}",
            seconds=seconds, patient=patient, no_upload=no_upload,
            deadline=time.time() + timeout_s,
        )
        atomic_write(self.new / f"{request.id}.json", request.to_json())
        return request

    def wait(self, request: Request, *, timeout_s: float,
             stop: threading.Event | None = None, poll_s: float = 0.1) -> dict[str, Any]:
        """Wait for the service's result; on timeout withdraw the request if still unclaimed."""
        stop = stop or threading.Event()
        result_path = self.done / f"{request.id}.json"
        deadline = time.monotonic() + timeout_s
        while True:
            result = self._take_result(result_path)
            if result is not None:
                return result
            if time.monotonic() > deadline or stop.is_set():
                break
            stop.wait(poll_s)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.new / f"{request.id}.json")  # not claimed: nothing will happen
        result = self._take_result(result_path)
        if result is not None:
            return result
        raise AgentError(
            f"the running service did not answer capture request {request.id} within "
            f"{timeout_s:.0f}s; check `device-agent status` and `journalctl -u device-agent`"
        )

    @staticmethod
    def _take_result(path: Path) -> dict[str, Any] | None:
        try:
            data: dict[str, Any] = json.loads(path.read_bytes())
        except FileNotFoundError:
            return None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return data

    # service side
    def claim(self) -> Request | None:
        """Claim the oldest request by rename; expired or unreadable ones are answered here."""
        try:
            names = sorted(p.name for p in self.new.iterdir() if p.suffix == ".json"
                           and not p.name.startswith("."))
        except FileNotFoundError:
            return None
        for name in names:
            try:
                os.rename(self.new / name, self.cur / name)
            except FileNotFoundError:
                continue  # withdrawn by its caller meanwhile
            request_id = name.removesuffix(".json")
            try:
                raw = json.loads((self.cur / name).read_bytes())
                request = Request(**raw)
            except (OSError, ValueError, TypeError) as exc:
                self.finish(request_id, {"ok": False, "exit_code": 2,
                                         "error": f"unreadable capture request {name}: {exc}"})
                continue
            if request.deadline < time.time():
                self.finish(request_id, {"ok": False, "exit_code": 1,
                                         "error": "request expired before the service took it"})
                continue
            return request
        return None

    def finish(self, request_id: str, result: dict[str, Any]) -> None:
        """Publish a request's result and forget the claimed request."""
        atomic_write(self.done / f"{request_id}.json", json.dumps(result).encode())
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.cur / f"{request_id}.json")

    def recover(self, kept: Callable[[str], dict[str, Any] | None] | None = None) -> int:
        """At start-up: answer requests a crashed service had claimed; returns how many.

        `kept(record_id)` is the answer for a capture whose package or held record exists
        (None when it left nothing): only a capture that left nothing is "capture again".
        """
        count = 0
        with contextlib.suppress(FileNotFoundError):
            for path in sorted(self.cur.glob("*.json")):
                answer: dict[str, Any] | None = None
                if kept is not None:
                    try:
                        answer = kept(record_id_for(path.stem))
                    except Exception as exc:  # a failed look-up must not stop the start
                        log.error("cannot tell whether capture request %s was kept: %s",
                                  path.stem, exc)
                        answer = {"ok": False, "exit_code": 1, "error": (
                            "the service restarted during this capture and cannot tell "
                            f"whether it was kept ({exc}): check `device-agent queue list` "
                            "before capturing again")}
                self.finish(path.stem, answer or {"ok": False, "exit_code": 1,
                                                  "error": NOTHING_KEPT})
                count += 1
        return count

    def pending(self) -> int:
        """Requests waiting to be claimed."""
        try:
            return sum(1 for p in self.new.iterdir() if p.suffix == ".json"
                       and not p.name.startswith("."))
        except FileNotFoundError:
            return 0
