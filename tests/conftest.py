"""Shared fixtures: paths to the real recordings, and a guard against leaked threads."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
from hypothesis import settings as hypothesis_settings

# Property tests: no per-example deadline (shared, noisy machines make one flaky; durations
# belong in bench/), no example database written into the checkout, and the same examples on
# every run, so CI passes or fails by the code alone (HYPOTHESIS_PROFILE=explore draws new ones
# each run; a case it finds becomes an @example).
hypothesis_settings.register_profile("device_agent", deadline=None, database=None,
                                     derandomize=True)
hypothesis_settings.register_profile("explore", deadline=None, database=None)
hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "device_agent"))

# CI and dev containers have a right clock but no NTP evidence; records would be held
# forever under CLOCK_CHECK=ntp. Tests of the hold path pass their own unsynchronised clock.
os.environ.setdefault("CLOCK_CHECK", "floor")

REPO = Path(__file__).resolve().parents[1]
ECG_DATA = REPO / "tests" / "data" / "ecg"
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
        pytest.fail(f"real recordings not found at {ECG_DATA}: the checkout is incomplete")
    return ECG_DATA


@pytest.fixture(autouse=True)
def no_leaked_threads():
    """Fail any test that leaves a thread of its own running (as watchdog's suite does)."""
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + 5.0
    while True:
        leaked = [
            t for t in threading.enumerate()
            if t not in before and t.is_alive()
            # werkzeug (moto's server) serves each keep-alive connection on its own thread
            and "process_request_thread" not in t.name
            and not getattr(t, "_allowed_to_leak", False)
        ]
        if not leaked or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert not leaked, f"test leaked threads: {[t.name for t in leaked]}"


# --- S3: moto's real HTTP server on 127.0.0.1, so boto3 signs and sends real requests ---

_S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture(scope="session")
def s3_endpoint():
    """URL of a moto S3 server on 127.0.0.1 (one per test session, random port)."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_env(monkeypatch):
    """Fake credentials in the environment (moto accepts any), none of the user's own."""
    for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(key, raising=False)
    for key, value in _S3_ENV.items():
        monkeypatch.setenv(key, value)
    return dict(_S3_ENV)


@pytest.fixture
def s3_bucket(s3_endpoint, s3_env, request):
    """A fresh, empty bucket on the moto server for this test; yields its name."""
    import re
    import uuid

    import boto3

    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-")
    bucket = f"t-{name}-{uuid.uuid4().hex[:8]}"
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    client.create_bucket(Bucket=bucket)
    yield bucket
