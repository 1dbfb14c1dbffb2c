"""sd_notify over a real AF_UNIX datagram socket, path and abstract names."""

from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path

import pytest

from device_agent.ops.notify import Notifier, watchdog_interval


def _receiver(name: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name[1:].encode() if name.startswith("@") else name)
    sock.settimeout(2.0)
    return sock


def _drain(sock: socket.socket) -> list[str]:
    out = []
    sock.setblocking(False)
    while True:
        try:
            out.append(sock.recv(4096).decode())
        except BlockingIOError:
            return out


@pytest.fixture(params=["path", "abstract"])
def socket_name(request, tmp_path: Path) -> str:
    if request.param == "path":
        return str(tmp_path / "notify.sock")
    return f"@device-agent-test-{uuid.uuid4().hex}"


def test_ready_then_watchdog_then_status_in_order(socket_name: str):
    sock = _receiver(socket_name)
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": socket_name, "WATCHDOG_USEC": "2000000"})
    try:
        assert notifier.watchdog_s == pytest.approx(1.0)
        assert notifier.ready("waiting for board")
        assert notifier.watchdog(now=100.0)
        assert not notifier.watchdog(now=100.5), "pinged before half the interval passed"
        assert notifier.status("queue 3 pending")
        assert not notifier.status("queue 3 pending"), "unchanged STATUS re-sent"
        assert notifier.watchdog(now=101.0)
        assert notifier.status("queue 0 pending")
        assert notifier.stopping()
        got = _drain(sock)
    finally:
        notifier.close()
        sock.close()
    assert got == [
        "READY=1\nSTATUS=waiting for board",
        "WATCHDOG=1",
        "STATUS=queue 3 pending",
        "WATCHDOG=1",
        "STATUS=queue 0 pending",
        "STOPPING=1",
    ]


def test_no_socket_is_a_noop():
    notifier = Notifier.from_environ({})
    assert notifier.socket_name is None
    assert not notifier.ready()
    assert not notifier.watchdog()
    assert not notifier.status("x")


def test_missing_socket_does_not_raise(tmp_path: Path, caplog):
    notifier = Notifier(str(tmp_path / "gone.sock"), watchdog_s=1.0)
    assert not notifier.ready()
    assert "cannot notify systemd" in caplog.text
    notifier.close()


@pytest.mark.parametrize(("environ", "expected"), [
    ({"WATCHDOG_USEC": "30000000"}, 15.0),
    ({"WATCHDOG_USEC": "0"}, None),
    ({"WATCHDOG_USEC": "junk"}, None),
    ({}, None),
    ({"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": "1"}, None),
])
def test_watchdog_interval(environ, expected):
    if environ.get("WATCHDOG_PID") == "1" and os.getpid() == 1:
        pytest.skip("test runs as pid 1")
    assert watchdog_interval(environ) == expected


def test_watchdog_pid_matching_this_process():
    env = {"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": str(os.getpid())}
    assert watchdog_interval(env) == 2.0
