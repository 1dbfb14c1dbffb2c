"""The sync loop on a fake S3: ordering, pauses, per-item isolation, finders, the watchdog.

The drainer runs its uploads on a synchronous executor here (it is injectable), so a pass is
deterministic; the stop-with-an-upload-in-flight test uses the real daemon executor.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import threading
import time
from pathlib import Path

import pytest

from device_agent.core.clock import Clock
from device_agent.core.config import Settings, load_settings
from device_agent.core.errors import OutboxBusy, UploadError
from device_agent.core.fsutil import hash_regular
from device_agent.shipping.drain import Drainer, SynchronousExecutor, backoff_delay
from device_agent.shipping.dropped_reports import BATCH
from device_agent.shipping.outbox import DELIVERED, FAILED, Outbox
from device_agent.shipping.uploader import (
    ALREADY_DELIVERED,
    COLLISION,
    CREATED,
    REPLACED,
    Head,
    PutResult,
)
from device_agent.sync import SyncLoop, drain_lock
from tests.conftest import wait_until
from tests.helpers import committed_items, make_package


class FakeUploader:
    """In-memory S3 with the If-None-Match / If-Match rules, and injectable failures."""

    bucket = "fake-bucket"

    def __init__(self) -> None:
        self.objects: dict[str, tuple[bytes, str]] = {}
        self.calls: list[str] = []
        self.fail: list[UploadError] = []
        self.lock = threading.Lock()
        self.gate: threading.Event | None = None
        self.lists = 0
        self.deadline_s = 5.0  # what max_duration_s answers

    @staticmethod
    def _etag(body: bytes) -> str:
        return '"' + hashlib.md5(body).hexdigest() + '"'

    def _fail(self) -> None:
        if self.fail:
            raise self.fail.pop(0)

    def put_new(self, key, body, *, sha256, metadata, content_type, ours=()):
        if self.gate is not None:
            self.gate.wait(10)
        with self.lock:
            self.calls.append(key)
            self._fail()
            if key in self.objects:
                held = self.objects[key][0]
                if held == body:
                    return PutResult(key, key, self._etag(body), ALREADY_DELIVERED)
                if hashlib.sha256(held).hexdigest() in set(ours):
                    self.objects[key] = (body, self._etag(body))
                    return PutResult(key, key, self._etag(body), REPLACED)
                alt = key + "__dup"
                self.objects[alt] = (body, self._etag(body))
                return PutResult(key, alt, self._etag(body), COLLISION)
            self.objects[key] = (body, self._etag(body))
            return PutResult(key, key, self._etag(body), CREATED)

    def replace(self, key, body, *, sha256, metadata, content_type, if_match, ours=()):
        with self.lock:
            self.calls.append(key)
            self._fail()
            if key not in self.objects or self.objects[key][1] != if_match:
                raise UploadError(f"{key}: changed behind our back", retryable=False,
                                  code="PreconditionFailed")
            self.objects[key] = (body, self._etag(body))
            return PutResult(key, key, self._etag(body), REPLACED)

    def head(self, key):
        with self.lock:
            if key not in self.objects:
                return None
            body, etag = self.objects[key]
            return Head(key, len(body), etag, hashlib.sha256(body).hexdigest(), "checksum",
                        {})

    def list_prefix(self, prefix):
        with self.lock:
            self.lists += 1
            return {k: (e, len(b)) for k, (b, e) in self.objects.items() if k.startswith(prefix)}

    def max_duration_s(self, size):
        return self.deadline_s


def settings_for(tmp_path: Path, **extra: str) -> Settings:
    base = {"STATE_DIR": str(tmp_path / "state"), "REPORTS_DIR": str(tmp_path / "reports"),
            "USERS_FILE": str(tmp_path / "users.json"), "SYNC_INTERVAL_S": "0.05",
            "RETRY_MAX_BACKOFF_S": "4", "DISK_RESERVE_MB": "0", "CLOCK_CHECK": "floor"}
    base.update(extra)
    return load_settings(environ={}, overrides=base)


class Env:
    """A sync loop on a fake S3, its drainer on a synchronous executor unless one is given."""

    def __init__(self, tmp_path: Path, *, executor=None, **overrides: str) -> None:
        self.settings = settings_for(tmp_path, **overrides)
        self.stop = threading.Event()
        self.uploader = FakeUploader()
        self.outbox = Outbox.open(self.settings)
        self.clock = Clock(check="floor")
        self.drainer = Drainer(self.outbox, self.uploader, clock=self.clock, stop=self.stop,
                               backoff_base_s=0.5, backoff_cap_s=self.settings.retry_max_backoff_s,
                               rng=random.Random(7),
                               executor=executor or SynchronousExecutor())
        self.loop = SyncLoop(self.settings, outbox=self.outbox, drainer=self.drainer,
                             stop=self.stop, clock=self.clock)
        self.records = Path(self.settings.state_dir) / "records"
        self.reports = Path(self.settings.reports_dir)

    def close(self) -> None:
        self.loop.close()
        self.outbox.close()


@pytest.fixture
def env(tmp_path):
    e = Env(tmp_path)
    yield e
    e.close()


def _aged(path: Path, seconds: float = 60.0) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then), follow_symlinks=False)


def test_backoff_is_exponential_jittered_and_capped():
    rng = random.Random(1)
    delays = [backoff_delay(n, base_s=2, cap_s=60, rng=rng) for n in range(1, 10)]
    assert 1 <= delays[0] <= 2
    assert 8 <= delays[3] <= 16
    assert all(30 <= d <= 60 for d in delays[6:])


def test_package_delivered_files_first_manifest_last(env):
    pkg = make_package(env.records, "20260124_121815", seed=1)
    result = env.loop.run_once()
    assert result.packages_queued == 1
    assert result.delivered == 4 and result.pending == 0
    assert env.uploader.calls[-1].endswith("manifest_20260124_121815.json")
    assert sorted(env.uploader.calls[:3]) == sorted(pkg.key(f) for f in pkg.files)
    log = json.loads((env.reports / "upload_log.json").read_text())
    assert len(log) == 4
    assert env.loop.run_once().delivered == 0, "a second pass must upload nothing"
    assert len(env.uploader.calls) == 4


def test_queue_errors_pause_the_queue_and_fail_no_item(env):
    make_package(env.records, "20260124_121815", seed=1)
    for code in ("AccessDenied", "ExpiredToken", "Unproven"):
        env.uploader.fail = [UploadError(f"s3://b/k: {code}", retryable=True, code=code,
                                         scope="queue")]
        result = env.loop.run_once()
        assert result.paused and code in result.paused
        assert result.failed == 0 and not env.outbox.items.all(FAILED)
        assert env.outbox.pause.current() is not None
        calls = len(env.uploader.calls)
        assert env.loop.run_once().delivered == 0  # paused: nothing is tried meanwhile
        assert len(env.uploader.calls) == calls
        env.outbox.pause.lift()  # (the pause's backoff would end by itself)
    result = env.loop.run_once()
    assert not result.paused and result.pending == 0
    assert all(i.state == DELIVERED for i in env.outbox.items.all())
    assert len(env.uploader.objects) == 4
    assert env.outbox.pause.current() is None


def test_outage_backs_off_then_delivers_nothing_twice(env):
    make_package(env.records, "20260124_121815", seed=1)
    env.uploader.fail = [UploadError("s3://b/k: cannot reach the S3 endpoint", retryable=True,
                                     code="ConnectionError", scope="queue")]
    first = env.loop.run_once()
    assert first.retrying >= 1 and first.paused
    until, reason = env.outbox.pause.current()
    assert until > time.time() and "cannot reach" in reason
    wait_until(lambda: env.loop.run_once().pending == 0 or None, timeout=15, interval=0.2,
               what="delivery after the outage")
    assert all(i.state == DELIVERED for i in env.outbox.items.all())
    assert len(env.uploader.objects) == 4


def test_an_error_about_one_object_fails_that_object_only(env):
    make_package(env.records, "20260124_121815", seed=1)
    env.uploader.fail = [UploadError("s3://b/k: KeyTooLongError", retryable=False,
                                     code="KeyTooLongError")]
    result = env.loop.run_once()
    assert result.failed == 1 and not result.paused
    assert result.delivered == 2, "the manifest waits for the failed sibling"
    assert env.loop.run_once().delivered == 0
    assert env.outbox.items.retry_failed() == 1
    assert env.loop.run_once().delivered == 2
    assert not env.outbox.items.all(FAILED)


def test_second_drainer_is_refused_or_waits(env):
    other = drain_lock(env.settings.state_dir)
    assert other.acquire()
    try:
        with pytest.raises(OutboxBusy, match=r"outbox\.lock"):
            env.loop.run_once(wait=False)
        done = threading.Event()
        def wait_then_say_done() -> None:
            env.loop.run_once(wait=True)
            done.set()

        waiter = threading.Thread(target=wait_then_say_done, name="waiting-drainer")
        waiter.start()
        assert not done.wait(0.3), "it must wait while the lock is held"
        other.release()
        assert done.wait(10)
        waiter.join()
    finally:
        other.release()


def test_reports_by_content_with_twin_and_replace(env):
    env.reports.mkdir(parents=True)
    pdf = env.reports / "ECG_Report_20260124_121815.pdf"
    pdf.write_bytes(b"%PDF v1")
    (env.reports / "ECG_Report_20260124_121815.json").write_text("{}")
    for p in env.reports.iterdir():
        _aged(p)
    result = env.loop.run_once()
    assert result.reports_queued == 2 and result.delivered == 2
    key = "ecg-reports/2026/01/24/ECG_Report_20260124_121815.pdf"
    assert env.uploader.objects[key][0] == b"%PDF v1"
    _aged(pdf, 55)  # touched but not changed: nothing to do
    assert env.loop.run_once().reports_queued == 0
    pdf.write_bytes(b"%PDF v2")
    _aged(pdf, 50)
    result = env.loop.run_once()
    assert result.reports_queued == 1 and result.delivered == 1
    assert env.uploader.objects[key][0] == b"%PDF v2"
    assert [i.outcome for i in env.outbox.items.all() if i.key == key] == ["created", "replaced"]


def test_report_rewritten_after_an_unanswered_put_replaces_its_object(env):
    """The legacy app rewrites a report whose first put landed but whose answer was lost."""
    env.reports.mkdir(parents=True)
    pdf = env.reports / "ECG_Report_20260124_121815.pdf"
    pdf.write_bytes(b"%PDF v1")
    _aged(pdf)
    key = "ecg-reports/2026/01/24/ECG_Report_20260124_121815.pdf"

    class LostAnswer(FakeUploader):
        def put_new(self, *a, **kw):
            super().put_new(*a, **kw)  # stored...
            raise UploadError("timed out", retryable=True, code="Timeout", scope="queue")

    lossy = LostAnswer()
    env.drainer.uploader = lossy
    assert env.loop.run_once().paused  # v1 is in the bucket, the agent does not know it
    pdf.write_bytes(b"%PDF v2, rewritten")
    _aged(pdf, 50)
    env.outbox.pause.lift()
    honest = FakeUploader()
    honest.objects = lossy.objects
    env.drainer.uploader = honest
    result = env.loop.run_once()
    assert result.delivered == 1
    assert honest.objects[key][0] == b"%PDF v2, rewritten"
    assert not [k for k in honest.objects if "__" in k], "no copy aside: it was ours"
    assert env.outbox.items.all()[-1].outcome == REPLACED


def test_report_still_being_written_waits_for_a_second_look(env):
    env.reports.mkdir(parents=True)
    pdf = env.reports / "ECG_Report_20260124_121815.pdf"
    pdf.write_bytes(b"%PDF partial")
    assert env.loop.run_once().reports_queued == 0
    pdf.write_bytes(b"%PDF partial and more")
    assert env.loop.run_once().reports_queued == 0
    assert env.loop.run_once().reports_queued == 1  # unchanged across two looks


def test_hostile_entries_in_reports_are_skipped_once_and_never_stop_the_rest(env, tmp_path,
                                                                            caplog):
    """A symlink to a secret, a FIFO named *.pdf, a huge file and odd names: each skipped
    with one line, recorded for `status`, and the good report and the package still go."""
    env.reports.mkdir(parents=True)
    secret = tmp_path / "AWS_SECRET_ACCESS_KEY"
    secret.write_text("wJalrXUtnFEMI-secret")
    (env.reports / "creds.pdf").symlink_to(secret)
    (env.reports / "passwd.pdf").symlink_to("/etc/passwd")
    os.mkfifo(env.reports / "fifo.pdf")
    with open(env.reports / "huge.pdf", "wb") as fh:
        fh.truncate(65 * 1024 * 1024)  # sparse, over REPORT_MAX_MB=64
    odd = ["back\\slash.pdf", "new\nline.pdf", os.fsdecode(b"latin1-\xe9.pdf")]
    for name in odd:
        (env.reports / name).write_bytes(b"%PDF odd")
    good = env.reports / "ECG_Report_20260124_121815.pdf"
    good.write_bytes(b"%PDF good")
    for p in env.reports.iterdir():
        _aged(p)
    make_package(env.records, "20260124_121816", seed=3)

    result = env.loop.run_once()
    assert result.delivered == 1 + 4 and result.skipped == 7
    uploaded = b"".join(body for body, _ in env.uploader.objects.values())
    assert b"secret" not in uploaded and b"root:" not in uploaded
    problems = env.outbox.problems.all()
    assert len(problems) == 7 and all(p.ref.startswith("name#") for p in problems)
    assert env.outbox.stats().problems == 7
    lines = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(lines) == 7
    names = ("creds", "passwd", "fifo.pdf", "back\\\\", "latin1")
    assert not any(n in "".join(lines) for n in names)
    env.loop.run_once()
    assert len([r for r in caplog.records if "skipped" in r.getMessage()]) == 7, "once each"
    (env.reports / "fifo.pdf").unlink()
    env.loop.run_once()
    assert env.outbox.stats().problems == 6, "a fixed entry leaves the list"


def test_a_report_is_hashed_once_across_passes_and_processes(tmp_path):
    first = Env(tmp_path)
    first.reports.mkdir(parents=True)
    pdf = first.reports / "ECG_Report_20260124_121815.pdf"
    pdf.write_bytes(b"%PDF " + b"x" * 1000)
    _aged(pdf)
    first.loop.run_once()
    first.close()
    second = Env(tmp_path)  # a new process: the cache is in the outbox, not in memory
    reads: list[str] = []

    def counting(path, *, max_bytes):
        reads.append(str(path))
        return hash_regular(path, max_bytes=max_bytes)

    second.loop.reports.hasher = counting
    try:
        result = second.loop.run_once()
        assert result.errors == [] and result.reports_queued == 0
        assert reads == [], "a known file is not read again"
        pdf.write_bytes(b"%PDF " + b"y" * 1000)  # changed: read once more
        _aged(pdf, 30)
        assert second.loop.run_once().reports_queued == 1 and reads == [str(pdf)]
    finally:
        second.close()


def _statements_while(outbox: Outbox, fn) -> list[str]:
    """The SQL statements the outbox ran during fn()."""
    seen: list[str] = []
    outbox.db._conn.set_trace_callback(seen.append)
    try:
        fn()
    finally:
        outbox.db._conn.set_trace_callback(None)
    return seen


@pytest.mark.parametrize("count", [3, 40])
def test_known_reports_cost_the_same_queries_however_many_there_are(tmp_path, count):
    """After a year REPORTS_DIR holds thousands of known files: a pass asks the outbox the
    same few questions for 3 or 40 of them, never a query or a transaction per file."""
    first = Env(tmp_path)
    first.reports.mkdir(parents=True)
    for i in range(count):
        pdf = first.reports / f"Report_{i:03d}.pdf"
        pdf.write_bytes(b"%PDF " + str(i).encode())
        _aged(pdf)
    (first.reports / "Report_000.json").write_text("{}")  # a twin is known the same way
    _aged(first.reports / "Report_000.json")
    assert first.loop.run_once().delivered == count + 1
    first.close()
    second = Env(tmp_path)  # a new process: nothing in memory
    try:
        ran = _statements_while(second.outbox, second.loop.reports.find)
        assert len(ran) <= 10, ran  # a query and a transaction per file: 4 x count or more
        assert sum(s.startswith("BEGIN") for s in ran) <= 1, ran  # clearing old problems
        assert second.outbox.items.all(DELIVERED)[-1].path.name == f"Report_{count - 1:03d}.pdf"
        pdf = second.reports / "Report_001.pdf"  # one changes: that one is looked at again
        pdf.write_bytes(b"%PDF changed")
        _aged(pdf, 30)
        assert second.loop.reports.find().queued == 1
    finally:
        second.close()


def test_new_reports_are_committed_a_batch_of_entries_at_a_time(env):
    """A pass finding many new reports commits (fsyncs) once per BATCH entries, not twice per
    report; what a batch queued is committed before the next batch is looked at."""
    n = 2 * BATCH + 22
    env.reports.mkdir(parents=True)
    for i in range(n):
        pdf = env.reports / f"Report_{i:03d}.pdf"
        pdf.write_bytes(b"%PDF " + str(i).encode())
        _aged(pdf)
    seen_at: dict[int, int] = {}

    def probing(path, *, max_bytes):
        seen_at[len(seen_at)] = committed_items(env.outbox.db_path)
        return hash_regular(path, max_bytes=max_bytes)

    env.loop.reports.hasher = probing
    result: list = []
    ran = _statements_while(env.outbox, lambda: result.append(env.loop.reports.find()))
    assert result[0].queued == n and committed_items(env.outbox.db_path) == n
    commits = sum(s == "COMMIT" for s in ran)
    assert commits <= 3 + 1, f"{commits} commits for {n} new reports"  # + clearing problems
    assert [seen_at[i] for i in (0, BATCH - 1, BATCH, 2 * BATCH, n - 1)] == [
        0, 0, BATCH, 2 * BATCH, 2 * BATCH]


def test_the_committed_checkpoint_comes_after_the_mark_is_durable(env):
    """Answers are marked delivered a wait's worth at a time, in one commit; the crash
    campaign's `drain.committed` window must see each mark already on disk."""
    make_package(env.records, "20260124_121815", seed=1)
    make_package(env.records, "20260124_121900", seed=2)
    marks: list[tuple[int, int]] = []

    def checkpoint(name: str) -> None:
        if name == "drain.committed":
            marks.append((len(marks) + 1, committed_items(env.outbox.db_path, DELIVERED)))

    env.drainer.checkpoint = checkpoint
    assert env.loop.run_once().delivered == 8
    assert len(marks) == 8
    assert all(visible >= k for k, visible in marks), marks


def test_run_stops_with_an_upload_in_flight_and_marks_nothing(tmp_path):
    e = Env(tmp_path, executor=None)
    e.drainer = Drainer(e.outbox, e.uploader, clock=e.clock, stop=e.stop)  # daemon workers
    e.loop.drainer = e.drainer
    try:
        make_package(e.records, "20260124_121815", seed=1)
        e.uploader.gate = threading.Event()  # every put hangs until released
        runner = threading.Thread(target=e.loop.run, name="sync-run")
        runner.start()
        wait_until(lambda: e.outbox.stats().pending == 4, what="package queued")
        wait_until(lambda: e.drainer._flights, what="an upload in flight")
        e.stop.set()
        runner.join(timeout=10)
        assert not runner.is_alive()
        e.uploader.gate.set()  # let the abandoned daemon workers end
        assert not e.outbox.items.delivered(), "an abandoned upload is not marked delivered"
    finally:
        e.close()
        wait_until(lambda: not [t for t in threading.enumerate()
                                if t.name.startswith("upload-")], what="workers to end")


def test_a_wedged_upload_is_reported_for_the_watchdog(tmp_path):
    e = Env(tmp_path)
    e.drainer = Drainer(e.outbox, e.uploader, clock=e.clock, stop=e.stop)
    e.loop.drainer = e.drainer
    e.uploader.deadline_s = 0.0  # its deadlines would have ended it
    e.uploader.gate = threading.Event()
    try:
        make_package(e.records, "20260124_121815", seed=1)
        runner = threading.Thread(target=e.loop.run_once, name="sync-pass")
        runner.start()
        assert wait_until(lambda: e.loop.stuck(time.monotonic() + 31), what="wedge seen")
        assert "past its" in (e.loop.stuck(time.monotonic() + 31) or "")
        e.uploader.gate.set()
        runner.join(timeout=10)
        assert e.loop.stuck() is None
    finally:
        e.uploader.gate.set()
        e.stop.set()
        e.close()
        wait_until(lambda: not [t for t in threading.enumerate()
                                if t.name.startswith("upload-")], what="workers to end")


def test_signups_queued_once_stamp_kept_and_no_password(env):
    users = Path(env.settings.users_file)
    users.write_text(json.dumps({
        "ptr": {"password": "hunter2", "full_name": "Synthetic One",
                "registration_date": "2026-01-24 12:04:19"},
        "Dívyansh": {"password": "s3cret", "full_name": "Synthetic Two"},
    }))
    result = env.loop.run_once()
    assert result.signups_queued == 2 and result.delivered == 2
    keys = sorted(env.uploader.objects)
    assert "ecg-reports/2026/01/24/user_signup_ptr_20260124_120419.json" in keys
    # no date in the entry: filed under the layout's "date unknown", never the clock's now
    assert [k for k in keys if "Divyansh" in k] == [
        "ecg-reports/2000/01/01/user_signup_Divyansh-4c59c8f5c8b4_20000101_000000.json"]
    for body, _ in env.uploader.objects.values():
        assert b"password" not in body and b"hunter2" not in body and b"s3cret" not in body
    doc = json.loads(users.read_text())
    doc["third"] = {"full_name": "Synthetic Three", "registration_date": "2026-02-01 08:00:00"}
    users.write_text(json.dumps(doc))
    assert env.loop.run_once().signups_queued == 1
    assert env.loop.run_once().signups_queued == 0
    assert len([k for k in env.uploader.objects if "Divyansh" in k]) == 1


@pytest.mark.parametrize("content", [
    b"[" * 100_000 + b"]" * 100_000,                      # nested 100k deep
    b'[{"username": "ptr", "full_na',                     # half-written
    b"\xff\xfe not utf-8",
])
def test_broken_users_file_is_reported_once_never_reset_and_blocks_nothing(env, caplog,
                                                                          content):
    make_package(env.records, "20260124_121815", seed=1)
    users = Path(env.settings.users_file)
    users.write_bytes(content)
    result = env.loop.run_once()
    assert result.delivered == 4, "a bad users.json must not stop deliveries"
    assert len(result.errors) == 1 and str(users) in result.errors[0]
    assert "\n" not in result.errors[0]
    assert users.read_bytes() == content, "users.json must never be reset"
    env.loop.run_once()
    assert sum("users file" in r.getMessage() for r in caplog.records) == 1, "reported once"
    users.write_text(json.dumps([{"username": "ptr",
                                  "registration_date": "2026-01-24 12:04:19"}]))
    result = env.loop.run_once()
    assert result.errors == [] and result.signups_queued == 1 and result.delivered == 1


def test_one_bad_user_never_stops_the_others(env, caplog):
    users = Path(env.settings.users_file)
    users.write_text('[{"username": "lone\\ud800", "registration_date": "2026-01-24 12:04:19"},'
                     ' {"username": "ptr", "phone": ' + "9" * 5000 + ','
                     '  "registration_date": "2026-01-24 12:04:19"},'
                     ' {"username": "ok", "registration_date": "2026-01-24 12:04:19"}]')
    result = env.loop.run_once()
    assert result.signups_queued == 2 and result.delivered == 2 and result.skipped == 1
    assert [p.source for p in env.outbox.problems.all()] == ["users"]
    text = " ".join(r.getMessage() for r in caplog.records)
    assert "lone" not in text, "a username never reaches the log"


def test_lost_state_lists_the_day_once_and_sends_no_body_twice(tmp_path):
    first = Env(tmp_path)
    first.reports.mkdir(parents=True)
    for n in range(20):
        p = first.reports / f"ECG_Report_20260124_1218{n:02d}.pdf"
        p.write_bytes(b"%PDF " + bytes([n]) * 5000)
        _aged(p, 3600)
    assert first.loop.run_once().delivered == 20
    bucket = first.uploader.objects
    first.close()
    (Path(first.settings.state_dir) / "outbox.sqlite3").unlink()  # a reflashed SD card
    for suffix in ("-wal", "-shm"):
        (Path(first.settings.state_dir) / f"outbox.sqlite3{suffix}").unlink(missing_ok=True)
    second = Env(tmp_path)
    second.uploader.objects = bucket
    try:
        result = second.loop.run_once()
        assert result.delivered == 20
        assert second.uploader.calls == [], "no body sent again"
        assert second.uploader.lists == 1, "one LIST for the day"
        assert {i.outcome for i in second.outbox.items.all()} == {ALREADY_DELIVERED}
    finally:
        second.close()
