"""Shared fixtures: paths to the real recordings, and a guard against leaked threads."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ECG_DATA = REPO.parent / "shared" / "data" / "ecg"
RECORDS = ("HR06000", "HR06001", "HR06002", "HR06003", "HR06004", "HR06005", "s0010_re")


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.02, what: str = "condition"):
    """Poll `predicate` until it returns truthy; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


@pytest.fixture
def ecg_data_dir() -> Path:
    if not ECG_DATA.is_dir():
        pytest.fail(f"real recordings not found at {ECG_DATA}: the checkout needs ../shared")
    return ECG_DATA


@pytest.fixture(autouse=True)
def no_leaked_threads():
    """Fail any test that leaves a non-daemon-free thread running (as watchdog's suite does)."""
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + 5.0
    while True:
        leaked = [
            t for t in threading.enumerate()
            if t not in before and t.is_alive() and not t.name.startswith(("ThreadPoolExecutor",))
            and not getattr(t, "_allowed_to_leak", False)
        ]
        if not leaked or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert not leaked, f"test leaked threads: {[t.name for t in leaked]}"
