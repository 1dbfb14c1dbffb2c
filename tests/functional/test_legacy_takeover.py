"""A unit the legacy app synced: this agent takes it over and runs beside it, against moto's
HTTP server, with tests/data/legacy/ in the legacy app's exact shapes. Nothing is uploaded
twice, and the legacy app's own checks (tests/legacy_app.py) find our deliveries."""

from __future__ import annotations

import json
import os
import random
import shutil
import threading
import time
from pathlib import Path

import boto3
import pytest

from device_agent.core.clock import Clock
from device_agent.core.config import load_settings
from device_agent.shipping.drain import Drainer
from device_agent.shipping.legacy import LISTED
from device_agent.shipping.outbox import Outbox
from device_agent.shipping.uploader import Uploader, make_client
from device_agent.sync import SyncLoop
from tests import legacy_app

FIXTURES = Path(__file__).resolve().parents[1] / "data" / "legacy"
UNLOGGED = {"ecg-reports/2026/01/21/ECG_Report_20260121_113429.pdf":
            "ECG_Report_20260121_113429.pdf"}
UNLOGGED_SIGNUP = "ecg-reports/2026/01/17/user_signup_bucket_only_20260117_101010.json"


def _unit(tmp_path, endpoint, bucket):
    return load_settings(environ={}).replace(
        state_dir=tmp_path / "state", reports_dir=tmp_path / "reports",
        users_file=tmp_path / "users.json", s3_bucket=bucket, s3_endpoint_url=endpoint,
        s3_region="us-east-1", aws_access_key_id="testing", aws_secret_access_key="testing",
        disk_reserve_mb=0, clock_check="floor", device_serial="UNIT-L")


def _legacy_unit(tmp_path, s3, bucket) -> None:
    """The unit as the legacy app left it, and the bucket as it filled it."""
    shutil.copytree(FIXTURES / "reports", tmp_path / "reports")
    shutil.copy(FIXTURES / "upload_log.json", tmp_path / "reports" / "upload_log.json")
    shutil.copy(FIXTURES / "users.json", tmp_path / "users.json")
    old = time.time() - 86400
    for p in (tmp_path / "reports").iterdir():
        os.utime(p, (old, old))
    for entry in json.loads((FIXTURES / "upload_log.json").read_text()):
        result = entry["result"]
        for key in [result["key"]] if "key" in result else [u["key"] for u in result["uploads"]]:
            local = FIXTURES / "reports" / key.rsplit("/", 1)[-1]
            body = local.read_bytes() if local.exists() else b'{"synthetic": true}'
            s3.put_object(Bucket=bucket, Key=key, Body=body)
    for key, name in UNLOGGED.items():
        s3.put_object(Bucket=bucket, Key=key, Body=(FIXTURES / "reports" / name).read_bytes())
    s3.put_object(Bucket=bucket, Key=UNLOGGED_SIGNUP, Body=b'{"username": "bucket_only"}')


def _pass(settings) -> None:
    stop = threading.Event()
    clock = Clock(check="floor")
    with Outbox.open(settings) as outbox:
        drainer = Drainer(outbox, Uploader.from_settings(settings, make_client(settings)),
                          clock=clock, stop=stop, rng=random.Random(1))
        loop = SyncLoop(settings, outbox=outbox, drainer=drainer, stop=stop, clock=clock)
        try:
            result = loop.run_once()
        finally:
            loop.close()
        assert not result.errors, result.errors
        assert outbox.db.get_meta(LISTED) is not None


def _keys(s3, bucket) -> set[str]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return {o["Key"] for page in pages for o in page.get("Contents", ())}


@pytest.mark.functional
def test_taking_over_a_synced_unit_uploads_only_what_the_legacy_app_never_sent(
        tmp_path, s3_endpoint, s3_bucket):
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    _legacy_unit(tmp_path, s3, s3_bucket)
    before = _keys(s3, s3_bucket)
    settings = _unit(tmp_path, s3_endpoint, s3_bucket)
    _pass(settings)
    _pass(settings)
    new = _keys(s3, s3_bucket) - before
    names = sorted(k.rsplit("/", 1)[-1] for k in new)
    assert len(new) == 2, names
    assert names[0] == "ECG_Report_20260123_114921.pdf"
    assert names[1].startswith("user_signup_newuser_")

    log_path = tmp_path / "reports" / "upload_log.json"
    entries = json.loads(log_path.read_text())
    legacy_entries = json.loads((FIXTURES / "upload_log.json").read_text())
    assert entries[: len(legacy_entries)] == legacy_entries, "the legacy history is kept"
    # the legacy app, started again on this unit, skips every report and every user
    for report in (tmp_path / "reports").glob("ECG_Report_*"):
        assert legacy_app.is_file_already_uploaded(str(log_path), str(report)), report.name
    for username in json.loads((tmp_path / "users.json").read_text()):
        assert legacy_app.user_already_uploaded(str(log_path), username), username


@pytest.mark.functional
def test_side_by_side_what_the_legacy_app_sends_meanwhile_is_not_sent_again(
        tmp_path, s3_endpoint, s3_bucket):
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    _legacy_unit(tmp_path, s3, s3_bucket)
    settings = _unit(tmp_path, s3_endpoint, s3_bucket)
    _pass(settings)
    # the legacy app, still running, uploads a new report and a new user and logs them
    log_path = str(tmp_path / "reports" / "upload_log.json")
    report = tmp_path / "reports" / "ECG_Report_20260124_090000.pdf"
    report.write_bytes(b"%PDF-1.4\n% synthetic, sent by the legacy app\n%%EOF\n")
    old = time.time() - 600
    os.utime(report, (old, old))
    key = "ecg-reports/2026/12/06/ECG_Report_20260124_090000.pdf"
    s3.put_object(Bucket=s3_bucket, Key=key, Body=report.read_bytes())
    legacy_app.log_upload(log_path, str(report), {"status": "success", "service": "s3",
                                                  "key": key, "bucket": s3_bucket},
                          {"filename": report.name, "file_size": report.stat().st_size,
                           "file_type": ".pdf"})
    users = json.loads((tmp_path / "users.json").read_text())
    users["late_user"] = {"phone": "5550103", "signup_date": "2026-01-24"}
    (tmp_path / "users.json").write_text(json.dumps(users, indent=2))
    signup = "ecg-reports/2026/12/06/user_signup_late_user_20261206_100000.json"
    s3.put_object(Bucket=s3_bucket, Key=signup, Body=b'{"username": "late_user"}')
    legacy_app.log_upload(log_path, "user_signup_late_user_20261206_100000.json",
                          {"status": "success", "service": "s3", "key": signup},
                          {"type": "user_signup", "username": "late_user",
                           "serial_number": ""})
    before = _keys(s3, s3_bucket)
    _pass(settings)
    assert _keys(s3, s3_bucket) == before, "nothing the legacy app sent is sent again"
    entries = json.loads(Path(log_path).read_text())
    assert sum(1 for e in entries if e.get("metadata", {}).get("username") == "late_user") == 1
    assert legacy_app.is_file_already_uploaded(log_path, str(report))
