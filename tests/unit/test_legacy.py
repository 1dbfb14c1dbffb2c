"""What the legacy app delivered while ours was still queued is settled, not sent again."""

from __future__ import annotations

from device_agent.outbox import LEGACY_OUTCOME, Outbox


def test_a_queued_report_the_legacy_app_sent_first_is_settled_not_sent(tmp_path):
    with Outbox(tmp_path / "outbox.sqlite3") as outbox:
        report = tmp_path / "reports" / "ECG_Report_20260124_121815.pdf"
        report.parent.mkdir()
        report.write_bytes(b"%PDF synthetic")
        item = outbox.track_report(report, kind="ecg_report_pdf", key="k", sha256="a" * 64,
                                   size=14)
        assert item is not None and [i.id for i in outbox.due()] == [item]
        assert not outbox.adopt_report(report, kind="ecg_report_pdf", key="legacy/k",
                                       sha256="b" * 64, size=14), "other content: ours goes"
        assert outbox.adopt_report(report, kind="ecg_report_pdf", key="legacy/k",
                                   sha256="a" * 64, size=14)
        assert outbox.due() == []
        assert outbox.get(item).outcome == LEGACY_OUTCOME
        assert not outbox.adopt_report(report, kind="ecg_report_pdf", key="legacy/k",
                                       sha256="a" * 64, size=14), "once"


def test_a_queued_signup_the_legacy_app_sent_first_is_settled_not_sent(tmp_path):
    with Outbox(tmp_path / "outbox.sqlite3") as outbox:
        doc = tmp_path / "user_signup_ptr_20260124_120419.json"
        doc.write_bytes(b"{}")
        item = outbox.add_signup("ptr", "2026-01-24T12:04:19", doc, key="k", sha256="0" * 64,
                                 size=2)
        assert item is not None
        assert outbox.adopt_user("ptr", "2026-01-24")
        assert outbox.due() == [] and outbox.get(item).outcome == LEGACY_OUTCOME
        assert outbox.adopt_user("someone", "2026-01-24") and "someone" in outbox.known_users()
        assert not outbox.adopt_user("someone", "2026-01-24")
