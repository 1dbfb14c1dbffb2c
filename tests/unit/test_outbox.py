"""The SQLite outbox: ordering, backoff bookkeeping, users, reconciliation, the legacy view."""

from __future__ import annotations

import json
import sqlite3
import time

import pytest

from device_agent.outbox import DELIVERED, FAILED, PENDING, Outbox
from device_agent.package import reconcile_folders
from tests.helpers import make_package


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
    ids = outbox.add_package(pkg)
    assert len(ids) == 4
    assert outbox.add_package(pkg) == ids, "queueing the same folder twice must be a no-op"
    due = outbox.due()
    assert [d.kind for d in due] == ["ecg_report_pdf", "patient_details", "ecg_12lead_data"]
    assert due[0].key == "ecg-reports/2026/01/24/20260124_121815/ECG_Report_20260124_121815.pdf"
    for item in due[:2]:
        outbox.mark_delivered(item.id, etag='"e"', final_key=item.key, outcome="created")
    assert [d.kind for d in outbox.due()] == ["ecg_12lead_data"]
    outbox.mark_delivered(due[2].id, etag='"e"', final_key=due[2].key, outcome="created")
    assert [d.kind for d in outbox.due()] == ["manifest"]


def test_failed_sibling_blocks_manifest_and_retry_revives(outbox, tmp_path):
    pkg = make_package(tmp_path / "records")
    outbox.add_package(pkg)
    first, *rest = outbox.due()
    outbox.mark_failed(first.id, retryable=False, error="AccessDenied on bucket b")
    for item in rest:
        outbox.mark_delivered(item.id, etag=None, final_key=item.key, outcome="created")
    assert outbox.due() == []
    assert outbox.get(first.id).state == FAILED
    assert outbox.stats().last_error == "AccessDenied on bucket b"
    assert outbox.retry_failed() == 1
    assert [d.id for d in outbox.due()] == [first.id]


def test_backoff_schedule_and_backwards_clock(outbox, tmp_path):
    outbox.add_package(make_package(tmp_path / "records"))
    item = outbox.due()[0]
    now = time.time()
    outbox.mark_failed(item.id, retryable=True, error="connection refused", next_at=now + 30)
    assert item.id not in [d.id for d in outbox.due(now)]
    assert item.id in [d.id for d in outbox.due(now + 31)]
    # the wall clock jumped back a year: an item scheduled far beyond the cap is due, not stuck
    assert item.id in [d.id for d in outbox.due(now - 365 * 86400)]
    assert outbox.get(item.id).attempts == 1
    assert outbox.get(item.id).state == PENDING


def test_report_tracking_by_content_and_replace_with_etag(outbox, tmp_path):
    pdf = tmp_path / "ECG_Report_20260124_121815.pdf"
    key = "ecg-reports/2026/01/24/ECG_Report_20260124_121815.pdf"
    first = outbox.track_report(pdf, kind="ecg_report_pdf", key=key, sha256="a" * 64, size=1)
    assert first is not None
    assert outbox.track_report(pdf, kind="ecg_report_pdf", key=key, sha256="a" * 64,
                               size=1) is None
    # changed again before delivery: the same row follows the content
    assert outbox.track_report(pdf, kind="ecg_report_pdf", key=key, sha256="b" * 64,
                               size=2) == first
    outbox.mark_delivered(first, etag='"etag-1"', final_key=key, outcome="created")
    second = outbox.track_report(pdf, kind="ecg_report_pdf", key=key, sha256="c" * 64, size=3)
    assert second != first
    assert outbox.get(second).if_match == '"etag-1"'
    assert outbox.get(first).state == DELIVERED


def test_signup_queued_once_and_stamp_remembered(outbox, tmp_path):
    doc = tmp_path / "user_signup_ptr_20260124_120419.json"
    doc.write_text("{}")
    assert outbox.user_stamp("ptr") is None
    first = outbox.add_signup("ptr", "2026-01-24T12:04:19", doc, key="k", sha256="a" * 64,
                              size=2)
    assert first is not None
    assert outbox.add_signup("ptr", "2026-11-27T00:00:00", doc, key="k2", sha256="b" * 64,
                             size=2) is None
    assert outbox.user_stamp("ptr") == "2026-01-24T12:04:19"
    assert len(outbox.items()) == 1


def test_state_survives_reopen(tmp_path):
    db = tmp_path / "outbox.sqlite3"
    with Outbox(db) as box:
        box.add_package(make_package(tmp_path / "records"))
        item = box.due()[0]
        box.mark_delivered(item.id, etag='"x"', final_key=item.key, outcome="created")
    with Outbox(db) as box:
        assert box.get(item.id).state == DELIVERED
        assert box.stats().pending == 3
        assert box.stats().delivered == 1


def test_reconcile_enqueues_orphan_folders_only(outbox, tmp_path):
    records = tmp_path / "records"
    orphan = make_package(records, "20260124_121815", seed=1)
    queued_pkg = make_package(records, "20260124_121816", seed=2)
    (records / "20260124_121817").mkdir()  # a capture that never wrote its manifest
    outbox.add_package(queued_pkg)
    assert reconcile_folders(records, outbox) == [orphan.folder]
    assert len(outbox.items()) == 8
    assert reconcile_folders(records, outbox) == []  # a second start-up changes nothing


def test_upload_log_is_a_view_of_delivered_rows(outbox, tmp_path):
    outbox.add_package(make_package(tmp_path / "records"))
    item = outbox.due()[0]
    outbox.mark_delivered(item.id, etag='"e1"', final_key=item.key, outcome="created")
    path = outbox.write_upload_log(tmp_path / "reports")
    entries = json.loads(path.read_text())
    assert [e["s3_key"] for e in entries] == [item.key]
    assert entries[0]["filename"] == "ECG_Report_20260124_121815.pdf"
    assert entries[0]["uploaded_at"]
    assert not list((tmp_path / "reports").glob(".*tmp"))
