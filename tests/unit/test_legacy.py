"""What the legacy app delivered while ours was still queued is settled, not sent again."""

from __future__ import annotations

from device_agent.shipping.outbox import LEGACY_OUTCOME, Outbox
from tests.helpers import present


def test_a_queued_report_the_legacy_app_sent_first_is_settled_not_sent(tmp_path):
    with Outbox(tmp_path / "outbox.sqlite3") as outbox:
        report = tmp_path / "reports" / "ECG_Report_20260124_121815.pdf"
        report.parent.mkdir()
        report.write_bytes(b"%PDF synthetic")
        item = outbox.items.track_report(report, kind="ecg_report_pdf", key="k", sha256="a" * 64,
                                         size=14)
        assert item is not None and [i.id for i in outbox.items.due()] == [item]
        assert not outbox.items.adopt_report(report, kind="ecg_report_pdf", key="legacy/k",
                                             sha256="b" * 64, size=14), "other content: ours goes"
        assert outbox.items.adopt_report(report, kind="ecg_report_pdf", key="legacy/k",
                                         sha256="a" * 64, size=14)
        assert outbox.items.due() == []
        assert present(outbox.items.get(item)).outcome == LEGACY_OUTCOME
        assert not outbox.items.adopt_report(report, kind="ecg_report_pdf", key="legacy/k",
                                             sha256="a" * 64, size=14), "once"


def test_a_queued_signup_the_legacy_app_sent_first_is_settled_not_sent(tmp_path):
    with Outbox(tmp_path / "outbox.sqlite3") as outbox:
        doc = tmp_path / "user_signup_ptr_20260124_120419.json"
        doc.write_bytes(b"{}")
        item = outbox.users.add_signup("ptr", "2026-01-24T12:04:19", doc, key="k", sha256="0" * 64,
                                       size=2)
        assert item is not None
        assert outbox.users.adopt("ptr", "2026-01-24")
        assert outbox.items.due() == []
        assert present(outbox.items.get(item)).outcome == LEGACY_OUTCOME
        assert outbox.users.adopt("someone", "2026-01-24") and "someone" in outbox.users.known()
        assert not outbox.users.adopt("someone", "2026-01-24")


class CountingBucket:
    """An uploader's list_prefix over a fixed listing, counting the LISTs."""

    def __init__(self, listing):
        self.listing = listing
        self.lists = 0

    def list_prefix(self, prefix):
        self.lists += 1
        return {k: v for k, v in self.listing.items() if k.startswith(prefix)}


def test_the_bucket_is_listed_once_and_only_on_a_unit_with_legacy_history(tmp_path):
    import json
    import shutil
    from pathlib import Path

    from device_agent.core.config import load_settings
    from device_agent.shipping.legacy import Takeover

    fixtures = Path(__file__).resolve().parents[1] / "data" / "legacy"
    settings = load_settings(environ={}).replace(
        state_dir=tmp_path / "state", reports_dir=tmp_path / "reports",
        users_file=tmp_path / "users.json", s3_bucket="b")
    (tmp_path / "reports").mkdir()
    bucket = CountingBucket({"ecg-reports/2026/01/17/user_signup_bucket_only_20260117_1010"
                             "10.json": ('"e"', 27)})
    with Outbox(tmp_path / "state" / "outbox.sqlite3") as outbox:
        Takeover(settings, outbox, bucket).run_once()
        assert bucket.lists == 0, "no legacy history: nothing to take over"
    shutil.rmtree(tmp_path / "state")
    shutil.copy(fixtures / "upload_log.json", tmp_path / "reports" / "upload_log.json")
    shutil.copy(fixtures / "users.json", tmp_path / "users.json")
    with Outbox(tmp_path / "state" / "outbox.sqlite3") as outbox:
        Takeover(settings, outbox, None).run_once()  # uploads off: the log only
        assert outbox.users.known() == {"ptr", "demo_tech"}
        for _ in range(3):
            Takeover(settings, outbox, bucket).run_once()
        assert bucket.lists == 1
        assert outbox.users.known() == {"ptr", "demo_tech", "bucket_only"}
        log = json.loads((tmp_path / "reports" / "upload_log.json").read_text())
        assert any(e["metadata"].get("username") == "bucket_only" for e in log)
