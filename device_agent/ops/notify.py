"""The sd_notify protocol in a few lines: datagrams to `$NOTIFY_SOCKET`, no libsystemd.

The process edge (service.py) reads `NOTIFY_SOCKET` and `WATCHDOG_USEC` from its environment
and builds a `Notifier`; with no socket every call is a no-op, so `run` works by hand too.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

log = logging.getLogger(__name__)


def _address(name: str) -> str | bytes:
    # A leading '@' names a Linux abstract socket: the kernel wants a NUL byte there.
    if name.startswith("@"):
        return b"\0" + name[1:].encode()
    return name


def watchdog_interval(environ: Mapping[str, str]) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WATCHDOG_USEC), or None when not asked."""
    raw = environ.get("WATCHDOG_USEC", "")
    pid = environ.get("WATCHDOG_PID", "")
    if pid and pid != str(os.getpid()):
        return None  # the watchdog is meant for another process
    try:
        usec = int(raw)
    except ValueError:
        return None
    return usec / 2e6 if usec > 0 else None


class Notifier:
    """Sends READY/STATUS/WATCHDOG/STOPPING to systemd; silent when there is no socket."""

    def __init__(self, socket_name: str | None, *, watchdog_s: float | None = None) -> None:
        self.socket_name = socket_name or None
        self.watchdog_s = watchdog_s
        self._sock: socket.socket | None = None
        self._last_ping = float("-inf")
        self._last_status: str | None = None

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> Notifier:
        """Build from the process environment (call at the process edge only)."""
        return cls(environ.get("NOTIFY_SOCKET"), watchdog_s=watchdog_interval(environ))

    def send(self, *fields: str) -> bool:
        """Send one datagram of `KEY=VALUE` lines; False (logged once per failure) if it failed."""
        if not self.socket_name:
            return False
        message = "\n".join(fields).encode()
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(message, _address(self.socket_name))
        except OSError as exc:
            log.warning("cannot notify systemd on %s: %s", self.socket_name, exc)
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """READY=1 (with an optional STATUS= line in the same datagram)."""
        fields = ["READY=1"]
        if status is not None:
            fields.append(f"STATUS={status}")
            self._last_status = status
        return self.send(*fields)

    def status(self, text: str) -> bool:
        """STATUS=text, sent only when it changed (systemctl status shows the latest)."""
        if text == self._last_status:
            return False
        self._last_status = text
        return self.send(f"STATUS={text}")

    def watchdog(self, *, now: float | None = None) -> bool:
        """WATCHDOG=1 if half the watchdog interval has passed since the last ping."""
        if self.watchdog_s is None or not self.socket_name:
            return False
        now = time.monotonic() if now is None else now
        if now - self._last_ping < self.watchdog_s:
            return False
        self._last_ping = now
        return self.send("WATCHDOG=1")

    def stopping(self) -> bool:
        """STOPPING=1: the service is shutting down on purpose."""
        return self.send("STOPPING=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
