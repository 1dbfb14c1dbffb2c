"""reports/upload_log.json: entries the legacy app recognises, its history kept, appends
that never re-read the file, and a rebuild when another writer changed it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, TypedDict

import pytest

from device_agent.shipping.outbox import Outbox
from device_agent.shipping.upload_log import UPLOAD_LOG_MAX, UploadLog
from tests import legacy_app
from tests.helpers import make_package

FIXTURES = Path(__file__).resolve().parents[1] / "data" / "legacy"
class _Bucket(TypedDict):
    bucket: str
    region: str


BUCKET: _Bucket = {"bucket": "ecg-bucket", "region": "us-east-1"}


@pytest.fixture
def outbox(tmp_path):
    box = Outbox(tmp_path / "state" / "outbox.sqlite3")
    yield box
    box.close()


def legacy_history(n: int) -> list[dict[str, Any]]:
    """n entries in the legacy shapes of tests/data/legacy/upload_log.json (a real unit's
    log had 2,460)."""
    shapes = json.loads((FIXTURES / "upload_log.json").read_text())
    out = []
    for i in range(n):
        entry = json.loads(json.dumps(shapes[i % len(shapes)]))
        entry["local_path"] = entry["local_path"].replace("2026", f"{2000 + i % 26:04d}", 1)
        entry.setdefault("metadata", {})["n"] = i
        out.append(entry)
    return out


def deliver_report(outbox: Outbox, path: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"%PDF-1.4 synthetic " + path.name.encode())
    item = outbox.items.add(path, kind="ecg_report_pdf", key=f"ecg-reports/2026/01/24/{path.name}",
                            sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
                            size=path.stat().st_size)
    outbox.items.mark_delivered(item, etag='"e"', final_key=f"ecg-reports/2026/01/24/{path.name}",
                                outcome="created")
    return item


def deliver_signup(outbox: Outbox, tmp_path: Path, username: str) -> None:
    doc = tmp_path / "signups" / f"user_signup_{username}_20260124_120419.json"
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_bytes(b"{}")
    item = outbox.users.add_signup(username, "2026-01-24T12:04:19+00:00", doc,
                                   key=f"ecg-reports/2026/01/24/{doc.name}", sha256="0" * 64,
                                   size=2)
    assert item is not None
    outbox.items.mark_delivered(item, etag='"s"', final_key=f"ecg-reports/2026/01/24/{doc.name}",
                                outcome="created")


def test_the_legacy_app_finds_our_reports_and_signups_in_the_log(outbox, tmp_path):
    reports = tmp_path / "reports"
    report = reports / "ECG_Report_20260124_121815.pdf"
    deliver_report(outbox, report)
    deliver_signup(outbox, tmp_path, "ptr")
    path = UploadLog(outbox.db, reports).write(**BUCKET)
    assert legacy_app.is_file_already_uploaded(str(path), str(report))
    assert legacy_app.user_already_uploaded(str(path), "ptr")
    assert not legacy_app.user_already_uploaded(str(path), "someone_else")
    assert not legacy_app.is_file_already_uploaded(str(path), str(reports / "other.pdf"))
    entry = json.loads(path.read_text())[0]
    assert entry["result"] == {
        "status": "success", "service": "s3", "bucket": "ecg-bucket",
        "key": "ecg-reports/2026/01/24/ECG_Report_20260124_121815.pdf",
        "url": "https://ecg-bucket.s3.us-east-1.amazonaws.com/"
               "ecg-reports/2026/01/24/ECG_Report_20260124_121815.pdf"}


def test_a_long_legacy_history_is_kept_and_appended_to_not_rewritten(outbox, tmp_path):
    reports = tmp_path / "reports"
    reports.mkdir()
    history = legacy_history(2460)
    (reports / "upload_log.json").write_text(json.dumps(history, indent=2))
    deliver_report(outbox, reports / "ECG_Report_20260124_121815.pdf")
    path = UploadLog(outbox.db, reports).write(**BUCKET)
    entries = json.loads(path.read_text())
    assert entries[:2460] == history and len(entries) == 2461
    first = path.read_bytes()
    deliver_report(outbox, reports / "ECG_Report_20260124_121816.pdf")
    UploadLog(outbox.db, reports).write(**BUCKET)
    second = path.read_bytes()
    assert second.startswith(first.rstrip()[:-1].rstrip()), "the earlier bytes are kept as is"
    assert json.loads(second)[:2461] == entries and len(json.loads(second)) == 2462
    # and nothing new: the file is not touched
    UploadLog(outbox.db, reports).write(**BUCKET)
    assert path.read_bytes() == second


def test_an_append_never_parses_the_log(outbox, tmp_path, monkeypatch):
    reports = tmp_path / "reports"
    deliver_report(outbox, reports / "ECG_Report_20260124_121815.pdf")
    UploadLog(outbox.db, reports).write(**BUCKET)
    deliver_report(outbox, reports / "ECG_Report_20260124_121816.pdf")

    def refuse(*args, **kwargs):
        raise AssertionError("the log was parsed")

    monkeypatch.setattr(UploadLog, "read", refuse)
    path = UploadLog(outbox.db, reports).write(**BUCKET)
    monkeypatch.undo()
    assert len(json.loads(path.read_text())) == 2


def test_another_writer_changing_the_log_makes_a_rebuild_that_keeps_its_entries(
        outbox, tmp_path):
    reports = tmp_path / "reports"
    deliver_report(outbox, reports / "ECG_Report_20260124_121815.pdf")
    path = UploadLog(outbox.db, reports).write(**BUCKET)
    legacy_app.log_upload(str(path), "reports/ECG_Report_20260125_080000.pdf",
                          {"status": "success", "service": "s3", "key": "k"},
                          {"filename": "ECG_Report_20260125_080000.pdf"})
    assert not UploadLog(outbox.db, reports).current()
    deliver_report(outbox, reports / "ECG_Report_20260124_121816.pdf")
    UploadLog(outbox.db, reports).write(**BUCKET)
    names = [e["metadata"]["filename"] for e in json.loads(path.read_text())]
    assert sorted(names) == ["ECG_Report_20260124_121815.pdf", "ECG_Report_20260124_121816.pdf",
                             "ECG_Report_20260125_080000.pdf"]


def test_a_torn_log_is_kept_aside_and_written_anew(outbox, tmp_path):
    reports = tmp_path / "reports"
    reports.mkdir()
    (reports / "upload_log.json").write_text('[{"local_path": "reports/ECG_Rep')
    deliver_report(outbox, reports / "ECG_Report_20260124_121815.pdf")
    path = UploadLog(outbox.db, reports).write(**BUCKET)
    assert len(json.loads(path.read_text())) == 1
    aside = list(reports.glob("upload_log.json.damaged-*"))
    assert len(aside) == 1 and aside[0].read_text().startswith('[{"local_path"')


def test_after_many_appends_the_log_is_rebuilt_so_old_package_files_age_out(outbox, tmp_path):
    reports = tmp_path / "reports"
    outbox.packages.add(make_package(tmp_path / "records"))
    for item in outbox.items.all():
        outbox.items.mark_delivered(item.id, etag='"e"', final_key=item.key, outcome="created")
    UploadLog(outbox.db, reports).write(**BUCKET)
    outbox.db.set_meta("upload_log_appended", str(UPLOAD_LOG_MAX))
    deliver_report(outbox, reports / "ECG_Report_20260124_121815.pdf")
    with pytest.MonkeyPatch.context() as mp:
        calls = []
        real = UploadLog.rebuild

        def counted(self, *a, **k):
            calls.append(1)
            return real(self, *a, **k)

        mp.setattr(UploadLog, "rebuild", counted)
        path = UploadLog(outbox.db, reports).write(**BUCKET)
    assert calls == [1]
    assert len(json.loads(path.read_text())) == 5
    assert outbox.db.get_meta("upload_log_appended") == "0"


def test_the_previous_versions_7_day_view_is_replaced_by_the_legacy_shapes(outbox, tmp_path):
    reports = tmp_path / "reports"
    reports.mkdir()
    report = reports / "ECG_Report_20260124_121815.pdf"
    deliver_report(outbox, report)
    old_view = [{"filename": report.name, "local_path": str(report),
                 "s3_key": f"ecg-reports/2026/01/24/{report.name}", "type": "ecg_report_pdf",
                 "size": 30, "sha256": "0" * 64, "etag": '"e"', "outcome": "created",
                 "record_id": None, "uploaded_at": "2026-01-24T12:18:20+00:00"}]
    (reports / "upload_log.json").write_text(json.dumps(old_view))
    path = UploadLog(outbox.db, reports).write(**BUCKET)
    entries = json.loads(path.read_text())
    assert len(entries) == 1 and "s3_key" not in entries[0]
    assert legacy_app.is_file_already_uploaded(str(path), str(report))
