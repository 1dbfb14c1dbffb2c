"""The SQLite outbox: ordering, backoff bookkeeping, users, reconciliation, the legacy view."""

from __future__ import annotations

import json
import shutil
import sqlite3
import time
from pathlib import Path

import pytest

from device_agent.shipping.enqueue import reconcile_folders
from device_agent.shipping.outbox import DELIVERED, FAILED, PENDING, Outbox, OutboxVersionError
from device_agent.shipping.upload_log import UploadLog
from tests.helpers import committed_items, make_package, present


@pytest.fixture
def outbox(tmp_path):
    with Outbox(tmp_path / "state" / "outbox.sqlite3", backoff_cap_s=60) as box:
        yield box


def test_wal_and_schema_on_disk(outbox):
    db = sqlite3.connect(outbox.db_path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"items", "users"} <= tables
    db.close()


def test_manifest_only_due_after_its_three_files(outbox, tmp_path):
    pkg = make_package(tmp_path / "records")
    ids = outbox.packages.add(pkg)
    assert len(ids) == 4
    assert outbox.packages.add(pkg) == ids, "queueing the same folder twice must be a no-op"
    due = outbox.items.due()
    assert [d.kind for d in due] == ["ecg_report_pdf", "patient_details", "ecg_12lead_data"]
    assert due[0].key == "ecg-reports/2026/01/24/20260124_121815/ECG_Report_20260124_121815.pdf"
    for item in due[:2]:
        outbox.items.mark_delivered(item.id, etag='"e"', final_key=item.key, outcome="created")
    assert [d.kind for d in outbox.items.due()] == ["ecg_12lead_data"]
    outbox.items.mark_delivered(due[2].id, etag='"e"', final_key=due[2].key, outcome="created")
    assert [d.kind for d in outbox.items.due()] == ["manifest"]


def test_failed_sibling_blocks_manifest_and_retry_revives(outbox, tmp_path):
    pkg = make_package(tmp_path / "records")
    outbox.packages.add(pkg)
    first, *rest = outbox.items.due()
    outbox.items.mark_failed(first.id, retryable=False, error="AccessDenied on bucket b")
    for item in rest:
        outbox.items.mark_delivered(item.id, etag=None, final_key=item.key, outcome="created")
    assert outbox.items.due() == []
    assert outbox.items.get(first.id).state == FAILED
    assert outbox.stats().last_error == "AccessDenied on bucket b"
    assert outbox.items.retry_failed() == 1
    assert [d.id for d in outbox.items.due()] == [first.id]


def test_backoff_schedule_and_backwards_clock(outbox, tmp_path):
    outbox.packages.add(make_package(tmp_path / "records"))
    item = outbox.items.due()[0]
    now = time.time()
    outbox.items.mark_failed(item.id, retryable=True, error="connection refused", next_at=now + 30)
    assert item.id not in [d.id for d in outbox.items.due(now)]
    assert item.id in [d.id for d in outbox.items.due(now + 31)]
    # the wall clock jumped back a year: an item scheduled far beyond the cap is due, not stuck
    assert item.id in [d.id for d in outbox.items.due(now - 365 * 86400)]
    assert outbox.items.get(item.id).attempts == 1
    assert outbox.items.get(item.id).state == PENDING


def test_report_tracking_by_content_and_replace_with_etag(outbox, tmp_path):
    pdf = tmp_path / "ECG_Report_20260124_121815.pdf"
    key = "ecg-reports/2026/01/24/ECG_Report_20260124_121815.pdf"
    first = outbox.items.track_report(pdf, kind="ecg_report_pdf", key=key, sha256="a" * 64, size=1)
    assert first is not None
    assert outbox.items.track_report(pdf, kind="ecg_report_pdf", key=key, sha256="a" * 64,
                                     size=1) is None
    # changed again before delivery: the same row follows the content
    assert outbox.items.track_report(pdf, kind="ecg_report_pdf", key=key, sha256="b" * 64,
                                     size=2) == first
    outbox.items.mark_delivered(first, etag='"etag-1"', final_key=key, outcome="created")
    second = outbox.items.track_report(pdf, kind="ecg_report_pdf", key=key, sha256="c" * 64, size=3)
    assert second != first
    assert outbox.items.get(second).if_match == '"etag-1"'
    assert outbox.items.get(first).state == DELIVERED


def test_signup_queued_once_and_stamp_remembered(outbox, tmp_path):
    doc = tmp_path / "user_signup_ptr_20260124_120419.json"
    doc.write_text("{}")
    assert outbox.users.stamp("ptr") is None
    first = outbox.users.add_signup("ptr", "2026-01-24T12:04:19", doc, key="k", sha256="a" * 64,
                                    size=2)
    assert first is not None
    assert outbox.users.add_signup("ptr", "2026-11-27T00:00:00", doc, key="k2", sha256="b" * 64,
                                   size=2) is None
    assert outbox.users.stamp("ptr") == "2026-01-24T12:04:19"
    assert len(outbox.items.all()) == 1


def test_state_survives_reopen(tmp_path):
    db = tmp_path / "outbox.sqlite3"
    with Outbox(db) as box:
        box.packages.add(make_package(tmp_path / "records"))
        item = box.items.due()[0]
        box.items.mark_delivered(item.id, etag='"x"', final_key=item.key, outcome="created")
    with Outbox(db) as box:
        assert present(box.items.get(item.id)).state == DELIVERED
        assert box.stats().pending == 3
        assert box.stats().delivered == 1


def test_reconcile_enqueues_orphan_folders_only(outbox, tmp_path):
    records = tmp_path / "records"
    orphan = make_package(records, "20260124_121815", seed=1)
    queued_pkg = make_package(records, "20260124_121816", seed=2)
    (records / "20260124_121817").mkdir()  # a capture that never wrote its manifest
    outbox.packages.add(queued_pkg)
    assert reconcile_folders(records, outbox) == [orphan.folder]
    assert len(outbox.items.all()) == 8
    assert reconcile_folders(records, outbox) == []  # a second start-up changes nothing


def test_upload_log_is_a_view_of_delivered_rows(outbox, tmp_path):
    outbox.packages.add(make_package(tmp_path / "records"))
    item = outbox.items.due()[0]
    outbox.items.mark_delivered(item.id, etag='"e1"', final_key=item.key, outcome="created")
    path = UploadLog(outbox.db, tmp_path / "reports").write()
    entries = json.loads(path.read_text())
    assert [e["result"]["key"] for e in entries] == [item.key]
    assert entries[0]["result"]["status"] == "success"
    assert entries[0]["metadata"]["filename"] == "ECG_Report_20260124_121815.pdf"
    assert entries[0]["uploaded_at"] and entries[0]["agent"]["sha256"] == item.sha256
    assert not list((tmp_path / "reports").glob(".*tmp"))


FIXTURE = Path(__file__).resolve().parents[1] / "data" / "outbox-v0"
FIXTURE_ROOT = Path("/tmp/device-agent-fixture-v0")  # where 0.1.0 wrote it (absolute paths)


@pytest.fixture
def v0_state():
    """The outbox 0.1.0 left, restored where it lived (its rows hold absolute paths)."""
    if FIXTURE_ROOT.exists():
        shutil.rmtree(FIXTURE_ROOT)
    shutil.copytree(FIXTURE, FIXTURE_ROOT)
    yield FIXTURE_ROOT / "state"
    shutil.rmtree(FIXTURE_ROOT, ignore_errors=True)


def test_an_outbox_written_by_0_1_0_upgrades_without_losing_a_queued_item(v0_state):
    db = v0_state / "outbox.sqlite3"
    old = sqlite3.connect(db)
    assert old.execute("PRAGMA user_version").fetchone()[0] == 0
    before = {r[0]: r[1:] for r in old.execute("SELECT id, state, key, sha256 FROM items")}
    old.close()
    with Outbox(db) as box:
        assert sqlite3.connect(db).execute("PRAGMA user_version").fetchone()[0] == 2
        after = {i.id: (i.state, i.key, i.sha256) for i in box.items.all()}
        assert after == before, "every row kept as it was"
        stats = box.stats()
        assert (stats.pending, stats.failed, stats.delivered) == (6, 1, 5)
        # the replaced report still carries the ETag it must match, and knows its v1
        v2 = present(box.items.get(10))
        assert v2.if_match == '"r1"' and v2.prior_sha256 == ()
        assert box.users.stamp("synthetic_user") == "2026-11-19T08:00:00+05:30"
        # both known packages are remembered as queued (0.1.0 queued every folder)
        assert {p.disposition for p in box.packages.recent()} == {"queued"}
        assert box.created_at() == 0.0, "a migrated outbox never triggers lost-state LISTs"
        assert [d.id for d in box.items.due()] == [5, 6, 7, 10, 12]  # the manifest waits
    with Outbox(db) as box:  # opening again is a no-op
        assert {i.id: (i.state, i.key, i.sha256) for i in box.items.all()} == before


def test_an_upgraded_outbox_drains(v0_state):
    import threading

    from device_agent.core.clock import Clock
    from device_agent.shipping.drain import Drainer, SynchronousExecutor
    from tests.unit.test_sync import FakeUploader

    uploader = FakeUploader()
    v1 = "ecg-reports/2026/11/19/ECG_Report_20261119_080000.pdf"
    uploader.objects[v1] = (b"%PDF-1.4 v1", '"r1"')  # what 0.1.0 delivered
    with Outbox(v0_state / "outbox.sqlite3") as box:
        drainer = Drainer(box, uploader, clock=Clock(check="floor"), stop=threading.Event(),
                          executor=SynchronousExecutor())
        drainer.drain()
        drainer.drain()
        stats = box.stats()
        assert (stats.pending, stats.failed) == (0, 1)  # the report whose file was gone
        assert uploader.objects[v1][0] == b"%PDF-1.4 v2!"
        assert len([k for k in uploader.objects if "20261121_103005" in k]) == 4


def test_an_outbox_from_a_newer_agent_is_refused(tmp_path):
    db = tmp_path / "outbox.sqlite3"
    sqlite3.connect(db).execute("PRAGMA user_version=99")
    with pytest.raises(OutboxVersionError, match="newer device-agent"):
        Outbox(db)


def test_problems_are_noted_once_and_cleared_when_gone(outbox):
    assert outbox.problems.note("reports", "name#1", "a link") is True
    assert outbox.problems.note("reports", "name#1", "a link") is False  # seen: no new line
    assert outbox.problems.note("reports", "name#1", "too large") is True  # a new reason
    outbox.problems.note("reports", "name#2", "a FIFO")
    outbox.problems.clear("reports", keep=["name#2"])
    assert [(p.ref, p.reason) for p in outbox.problems.all()] == [("name#2", "a FIFO")]
    assert outbox.stats().problems == 1


def test_the_queue_pause_is_durable_and_ends(outbox):
    outbox.pause.hold(time.time() + 60, "AccessDenied")
    assert (outbox.pause.current()[1] == "AccessDenied"
            and outbox.stats().pause_reason == "AccessDenied")
    assert outbox.pause.current(now=time.time() + 61) is None, "a pause ends by itself"
    outbox.pause.lift()
    assert outbox.pause.current() is None


def test_compaction_keeps_a_count_per_day_and_the_reports_last_etag(outbox, tmp_path):
    pkg = make_package(tmp_path / "records")
    outbox.packages.add(pkg)
    report = tmp_path / "ECG_Report_20260124_121815.pdf"
    report.write_bytes(b"v1")
    rid = outbox.items.track_report(report, kind="ecg_report_pdf", key="ecg-reports/r.pdf",
                                    sha256="1" * 64, size=2)
    for item in outbox.items.all():
        outbox.items.mark_delivered(item.id, etag='"e"', final_key=item.key, outcome="created")
    outbox.items.mark_pruned([i.id for i in outbox.items.all() if i.package])
    assert outbox.stats().delivered == 5
    removed = outbox.items.compact(before=time.time() + 1)
    assert removed == 4, "the pruned package rows go; the report's last delivery stays"
    assert outbox.stats().delivered == 5, "the count survives as a number per day"
    assert [i.id for i in outbox.items.all()] == [rid]
    assert outbox.items.track_report(report, kind="ecg_report_pdf", key="ecg-reports/r.pdf",
                                     sha256="2" * 64, size=2) is not None
    assert outbox.items.all()[-1].if_match == '"e"', "an edit still replaces by ETag"


def test_package_files_age_out_of_the_upload_log_when_it_is_rebuilt(outbox, tmp_path):
    pkg = make_package(tmp_path / "records")
    outbox.packages.add(pkg)
    for item in outbox.items.all():
        outbox.items.mark_delivered(item.id, etag='"e"', final_key=item.key, outcome="created")
    path = UploadLog(outbox.db, tmp_path / "reports").write()
    assert len(json.loads(path.read_text())) == 4
    later = time.time() + 8 * 86400  # a week and a day on: no package file is recent
    UploadLog(outbox.db, tmp_path / "reports").rebuild([], bucket="b", region="r", now=later)
    assert json.loads(path.read_text()) == []


def test_a_rewrite_after_an_attempt_remembers_what_was_sent(outbox, tmp_path):
    report = tmp_path / "ECG_Report_20260124_121815.pdf"
    report.write_bytes(b"v1")
    rid = outbox.items.track_report(report, kind="ecg_report_pdf", key="ecg-reports/r.pdf",
                                    sha256="1" * 64, size=2)
    outbox.items.track_report(report, kind="ecg_report_pdf", key="ecg-reports/r.pdf",
                              sha256="2" * 64, size=2)
    assert outbox.items.get(rid).prior_sha256 == (), "never sent: nothing to remember"
    outbox.items.note_attempt(rid, "timed out")  # a put went out; its answer did not come back
    outbox.items.track_report(report, kind="ecg_report_pdf", key="ecg-reports/r.pdf",
                              sha256="3" * 64, size=2)
    assert outbox.items.get(rid).prior_sha256 == ("2" * 64,)
    assert outbox.items.get(rid).sha256 == "3" * 64


def test_hash_cache_is_keyed_by_size_mtime_and_inode(outbox):
    outbox.hashes.remember("/r/a.pdf", size=10, mtime_ns=5, ino=7, sha256="a" * 64)
    assert outbox.hashes.cached("/r/a.pdf", size=10, mtime_ns=5, ino=7) == "a" * 64
    assert outbox.hashes.cached("/r/a.pdf", size=10, mtime_ns=6, ino=7) is None
    assert outbox.hashes.forget({"/r/b.pdf"}) == 1
    assert outbox.hashes.cached("/r/a.pdf", size=10, mtime_ns=5, ino=7) is None


def test_retention_loads_only_rows_it_may_prune(outbox, tmp_path):
    """After a year the outbox holds thousands of report rows and a month of packages:
    prune reads the packages wholly delivered before the cutoff and delivered signups, only."""
    old, half, recent = (make_package(tmp_path / "records", f"20260124_12181{i}", seed=i)
                         for i in range(3))
    for pkg in (old, half, recent):
        outbox.packages.add(pkg)
    report = tmp_path / "ECG_Report_20260124_121815.pdf"
    report.write_bytes(b"v1")
    outbox.items.track_report(report, kind="ecg_report_pdf", key="ecg-reports/r.pdf",
                              sha256="1" * 64, size=2)
    signup = tmp_path / "signup.json"
    signup.write_text("{}")
    outbox.users.add_signup("synthetic", "2026-01-24T12:00:00", signup, key="users/s.json",
                            sha256="2" * 64, size=2)
    rows = outbox.items.all()
    for item in rows:
        if item.package == str(half.folder) and item.kind == "manifest":
            continue  # one file of this package is still on its way
        outbox.items.mark_delivered(item.id, etag='"e"', final_key=item.key, outcome="created")
    cutoff = time.time() + 1
    with outbox.db.tx() as db:  # the recent package was delivered after the cutoff
        db.execute("UPDATE items SET delivered_at = ? WHERE package = ?",
                   (cutoff + 60, str(recent.folder)))
    got = outbox.items.prunable(cutoff)
    assert {i.package for i in got if i.package} == {str(old.folder)}
    assert len([i for i in got if i.package]) == 4, "every row of the old package"
    assert [i.source for i in got if not i.package] == ["signup"], "never a report"
    outbox.items.mark_pruned([i.id for i in got])
    assert outbox.items.prunable(cutoff) == [], "a pruned row is not offered again"


def test_known_packages_answers_about_the_folders_asked(outbox, tmp_path):
    pkgs = [make_package(tmp_path / "records", f"20260124_1218{i:02d}", seed=i)
            for i in range(3)]
    outbox.packages.add(pkgs[0])
    outbox.packages.record(pkgs[1].folder, stamp=pkgs[1].stamp, record_id=None,
                           disposition="withheld", reason="operator", verdict=None)
    asked = [str(p.folder.resolve()) for p in pkgs] + [f"/nowhere/{i}" for i in range(900)]
    assert outbox.packages.known(asked) == {asked[0], asked[1]}
    assert outbox.packages.known() == {asked[0], asked[1]}
    assert reconcile_folders(tmp_path / "records", outbox) == [pkgs[2].folder]


def _queue_one(outbox: Outbox, tmp_path: Path, name: str) -> int:
    path = tmp_path / name
    path.write_bytes(name.encode())
    return outbox.items.add(path, kind="ecg_report_pdf", key=f"ecg-reports/{name}",
                            sha256="0" * 64, size=len(name))


def test_a_batch_commits_once_and_a_failed_write_inside_undoes_only_itself(outbox, tmp_path):
    with outbox.db.batch():
        _queue_one(outbox, tmp_path, "a.pdf")
        with pytest.raises(RuntimeError), outbox.db.tx() as db:
            db.execute("UPDATE items SET key = 'changed'")
            raise RuntimeError("one write fails")
        with outbox.db.batch():  # a batch inside a batch joins it
            _queue_one(outbox, tmp_path, "b.pdf")
        assert len(outbox.items.all()) == 2  # this connection sees its own writes
        assert committed_items(outbox.db_path) == 0, "nothing is committed before the batch ends"
    assert committed_items(outbox.db_path) == 2
    assert sorted(i.key for i in outbox.items.all()) == ["ecg-reports/a.pdf",
                                                         "ecg-reports/b.pdf"]
    with pytest.raises(RuntimeError), outbox.db.batch():
        _queue_one(outbox, tmp_path, "c.pdf")
        raise RuntimeError("the batch fails")
    assert committed_items(outbox.db_path) == 2 and len(outbox.items.all()) == 2
    _queue_one(outbox, tmp_path, "d.pdf")  # after a batch, transactions are their own again
    assert committed_items(outbox.db_path) == 3
