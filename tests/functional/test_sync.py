"""The sync loop: ordering, backoff, the drain lock, report scanning, users, stopping."""

from __future__ import annotations

import hashlib
import json
import os
import random
import threading
import time
from types import SimpleNamespace

import pytest

from device_agent.errors import OutboxBusy, UploadError
from device_agent.outbox import DELIVERED, FAILED, PENDING, Outbox
from device_agent.sync import DrainLock, SyncLoop, backoff_delay
from tests.helpers import make_package
from tests.conftest import wait_until


class FakeUploader:
    """In-memory S3 with the If-None-Match / If-Match rules, and injectable failures."""

    bucket = "fake-bucket"

    def __init__(self) -> None:
        self.objects: dict[str, tuple[bytes, str]] = {}
        self.calls: list[str] = []
        self.fail: list[UploadError] = []
        self.lock = threading.Lock()
        self.gate: threading.Event | None = None

    def _etag(self, body: bytes) -> str:
        return '"' + hashlib.md5(body).hexdigest() + '"'

    def put_new(self, key, body, *, sha256, metadata, content_type):
        if self.gate is not None:
            self.gate.wait(10)
        with self.lock:
            self.calls.append(key)
            if self.fail:
                raise self.fail.pop(0)
            if key in self.objects:
                outcome = "already_delivered" if self.objects[key][0] == body else "collision"
                if outcome == "collision":
                    key = key + "__dup"
                    self.objects[key] = (body, self._etag(body))
                return SimpleNamespace(requested_key=key, key=key, etag=self._etag(body),
                                       outcome=outcome)
            self.objects[key] = (body, self._etag(body))
            return SimpleNamespace(requested_key=key, key=key, etag=self._etag(body),
                                   outcome="created")

    def replace(self, key, body, *, sha256, metadata, content_type, if_match):
        with self.lock:
            self.calls.append(key)
            if key not in self.objects or self.objects[key][1] != if_match:
                raise UploadError(f"{key}: changed behind our back", retryable=False,
                                  code="PreconditionFailed")
            self.objects[key] = (body, self._etag(body))
            return SimpleNamespace(requested_key=key, key=key, etag=self._etag(body),
                                   outcome="replaced")


def settings_for(tmp_path, **kw):
    base = dict(state_dir=tmp_path / "state", reports_dir=tmp_path / "reports",
                users_file=tmp_path / "users.json", sync_interval_s=0.05,
                retry_max_backoff_s=4.0, retention_days=30.0, disk_reserve_mb=0,
                clock_check="floor")
    base.update(kw)
    return SimpleNamespace(**base)


@pytest.fixture
def env(tmp_path):
    settings = settings_for(tmp_path)
    stop = threading.Event()
    uploader = FakeUploader()
    with Outbox.open(settings) as outbox:
        from device_agent.package import load_package

        loop = SyncLoop(settings, outbox=outbox, uploader=uploader, stop=stop,
                        rng=random.Random(7), backoff_base_s=1.0, load_package=load_package)
        yield SimpleNamespace(settings=settings, outbox=outbox, uploader=uploader, loop=loop,
                              stop=stop, records=settings.state_dir / "records")


def _real_package(records, stamp, seed):
    """A package folder that load_package accepts (manifest in H4's format)."""
    from device_agent import package

    pkg = make_package(records, stamp, seed=seed)
    files = pkg.files
    doc = package._manifest_doc(list(files), stamp=stamp, date_prefix=pkg.date_prefix,
                                record_id=pkg.record_id, device_serial="SN-TEST",
                                acquired_at="2026-01-24T12:18:15+00:00")
    pkg.manifest.path.write_text(json.dumps(doc))
    return pkg


def test_backoff_is_exponential_jittered_and_capped():
    rng = random.Random(1)
    delays = [backoff_delay(n, base_s=2, cap_s=60, rng=rng) for n in range(1, 10)]
    assert 1 <= delays[0] <= 2
    assert 8 <= delays[3] <= 16
    assert all(30 <= d <= 60 for d in delays[6:])


def test_package_delivered_files_first_manifest_last(env):
    pkg = _real_package(env.records, "20260124_121815", 1)
    result = env.loop.run_once()
    assert result.packages_queued == 1
    assert result.delivered == 4 and result.pending == 0
    assert env.uploader.calls[-1].endswith("manifest_20260124_121815.json")
    assert sorted(env.uploader.calls[:3]) == sorted(pkg.key(f) for f in pkg.files)
    log = json.loads((env.settings.reports_dir / "upload_log.json").read_text())
    assert len(log) == 4
    assert env.loop.run_once().delivered == 0, "a second pass must upload nothing"
    assert len(env.uploader.calls) == 4


def test_outage_backs_off_then_delivers_nothing_twice(env):
    _real_package(env.records, "20260124_121815", 1)
    env.uploader.fail = [UploadError("s3://b/k: cannot reach the S3 endpoint", retryable=True,
                                     code="ConnectionError")]
    first = env.loop.run_once()
    assert first.retrying >= 1 and first.delivered <= 2
    failed = [i for i in env.outbox.items() if i.attempts and i.state == PENDING]
    assert len(failed) == 1 and failed[0].next_attempt_at > time.time() + 0.4
    assert "cannot reach" in env.outbox.stats().last_error
    wait_until(lambda: env.loop.run_once().pending == 0 or None, timeout=10, interval=0.2,
               what="delivery after the outage")
    assert all(i.state == DELIVERED for i in env.outbox.items())
    assert len(env.uploader.objects) == 4


def test_permanent_error_fails_item_until_retried(env):
    _real_package(env.records, "20260124_121815", 1)
    env.uploader.fail = [UploadError("s3://b/k: AccessDenied", retryable=False,
                                     code="AccessDenied")]
    result = env.loop.run_once()
    assert result.failed == 1
    assert result.delivered == 2, "the manifest waits for the failed sibling"
    assert env.loop.run_once().delivered == 0
    assert env.outbox.retry_failed() == 1
    assert env.loop.run_once().delivered == 2
    assert not env.outbox.items(FAILED)


def test_second_drainer_is_refused_or_waits(env):
    other = DrainLock(env.settings.state_dir)
    assert other.acquire()
    try:
        with pytest.raises(OutboxBusy, match=r"outbox\.lock"):
            env.loop.run_once(wait=False)
        releaser = threading.Timer(0.3, other.release)
        releaser.start()
        started = time.monotonic()
        env.loop.run_once(wait=True)
        assert time.monotonic() - started >= 0.25
        releaser.join()
    finally:
        other.release()


def test_reports_by_content_with_twin_and_replace(env):
    reports = env.settings.reports_dir
    reports.mkdir(parents=True)
    pdf = reports / "ECG_Report_20260124_121815.pdf"
    pdf.write_bytes(b"%PDF v1")
    (reports / "ECG_Report_20260124_121815.json").write_text("{}")
    old = time.time() - 60
    for p in reports.iterdir():
        os.utime(p, (old, old))
    result = env.loop.run_once()
    assert result.reports_queued == 2 and result.delivered == 2
    key = "ecg-reports/2026/01/24/ECG_Report_20260124_121815.pdf"
    assert env.uploader.objects[key][0] == b"%PDF v1"
    os.utime(pdf, (old + 5, old + 5))  # touched but not changed: nothing to do
    assert env.loop.run_once().reports_queued == 0
    pdf.write_bytes(b"%PDF v2")
    os.utime(pdf, (old + 10, old + 10))
    result = env.loop.run_once()
    assert result.reports_queued == 1 and result.delivered == 1
    assert env.uploader.objects[key][0] == b"%PDF v2"
    assert [i.outcome for i in env.outbox.items() if i.key == key] == ["created", "replaced"]


def test_report_still_being_written_waits_for_a_second_look(env):
    reports = env.settings.reports_dir
    reports.mkdir(parents=True)
    pdf = reports / "ECG_Report_20260124_121815.pdf"
    pdf.write_bytes(b"%PDF partial")
    assert env.loop.run_once().reports_queued == 0
    pdf.write_bytes(b"%PDF partial and more")
    assert env.loop.run_once().reports_queued == 0
    assert env.loop.run_once().reports_queued == 1  # unchanged across two looks


def test_run_stops_within_a_second_even_with_an_upload_in_flight(env):
    _real_package(env.records, "20260124_121815", 1)
    env.uploader.gate = threading.Event()  # every put hangs until released
    runner = threading.Thread(target=env.loop.run, name="sync-run")
    runner.start()
    wait_until(lambda: env.outbox.stats().pending == 4, what="package queued")
    time.sleep(0.1)  # let the workers reach the gate
    started = time.monotonic()
    env.stop.set()
    runner.join(timeout=3)
    assert not runner.is_alive()
    assert time.monotonic() - started < 1.0
    env.uploader.gate.set()  # let the abandoned daemon workers end
    wait_until(lambda: not [t for t in threading.enumerate()
                            if t.name.startswith("sync-upload")], what="workers to end")
    assert not env.outbox.delivered(), "an abandoned upload is not marked delivered"


def test_signups_queued_once_stamp_kept_and_no_password(env):
    users = env.settings.users_file
    users.write_text(json.dumps({
        "ptr": {"password": "hunter2", "full_name": "Synthetic One",
                "registration_date": "2026-01-24 12:04:19"},
        "Dívyansh": {"password": "s3cret", "full_name": "Synthetic Two"},
    }))
    result = env.loop.run_once()
    assert result.signups_queued == 2 and result.delivered == 2
    keys = sorted(env.uploader.objects)
    assert keys[0] == "ecg-reports/2026/01/24/user_signup_ptr_20260124_120419.json"
    stamped = [k for k in keys if "Divyansh" in k]
    assert len(stamped) == 1
    for body, _ in env.uploader.objects.values():
        assert b"password" not in body and b"hunter2" not in body and b"s3cret" not in body
    # the legacy app adds a user: only the new one is queued; the stamped one keeps its stamp
    doc = json.loads(users.read_text())
    doc["third"] = {"full_name": "Synthetic Three", "registration_date": "2026-02-01 08:00:00"}
    users.write_text(json.dumps(doc))
    assert env.loop.run_once().signups_queued == 1
    assert env.loop.run_once().signups_queued == 0
    assert len([k for k in env.uploader.objects if "Divyansh" in k]) == 1


def test_corrupt_users_file_is_reported_skipped_and_never_reset(env, caplog):
    _real_package(env.records, "20260124_121815", 1)
    users = env.settings.users_file
    half = b'[{"username": "ptr", "full_na'
    users.write_bytes(half)
    result = env.loop.run_once()
    assert result.delivered == 4, "a bad users.json must not stop deliveries"
    assert len(result.errors) == 1 and str(users) in result.errors[0]
    assert "\n" not in result.errors[0]
    assert users.read_bytes() == half, "users.json must never be reset"
    env.loop.run_once()
    assert sum("users file" in r.message for r in caplog.records) == 1, "reported once"
    users.write_text(json.dumps([{"username": "ptr", "registration_date":
                                  "2026-01-24 12:04:19"}]))
    result = env.loop.run_once()
    assert result.errors == [] and result.signups_queued == 1 and result.delivered == 1


@pytest.mark.functional
def test_cli_sync_once_against_moto_and_busy_exit_code(tmp_path, s3_endpoint, s3_bucket,
                                                       capsys):
    from device_agent.cli import main

    state = tmp_path / "state"
    _real_package(state / "records", "20260124_121815", 1)
    flags = ["--env-file", str(tmp_path / "none.env")]
    for key, value in {"STATE_DIR": state, "REPORTS_DIR": tmp_path / "reports",
                       "USERS_FILE": tmp_path / "users.json", "AWS_S3_BUCKET": s3_bucket,
                       "AWS_ENDPOINT_URL_S3": s3_endpoint, "AWS_S3_REGION": "us-east-1",
                       "CLOCK_CHECK": "floor"}.items():
        flags += ["--set", f"{key}={value}"]
    assert main([*flags, "sync", "--once"]) == 0
    assert "delivered 4" in capsys.readouterr().out
    import boto3

    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    assert client.list_objects_v2(Bucket=s3_bucket)["KeyCount"] == 4
    lock = DrainLock(state)
    assert lock.acquire()
    try:
        assert main([*flags, "sync", "--once"]) == 4
    finally:
        lock.release()
