"""Usernames and report names from outside, through the real `sync --once` against moto's
HTTP server: every user reaches S3 as its own object, once, dated by the user; every report
lands under a 4-digit `YYYY/MM/DD` from the stamp in its name (issues 22 and 23)."""

from __future__ import annotations

import json
import os
import shutil
import time
from datetime import datetime
from pathlib import Path

import boto3
import pytest

from device_agent.commands import main
from tests.conftest import REPO, wait_until

pytestmark = pytest.mark.functional
LEGACY = REPO / "tests" / "data" / "legacy"
SECOND = "2026-01-24 12:04:19"


def _flags(tmp_path: Path, endpoint: str, bucket: str) -> list[str]:
    values = {"STATE_DIR": tmp_path / "state", "REPORTS_DIR": tmp_path / "reports",
              "USERS_FILE": tmp_path / "users.json", "CLOCK_CHECK": "floor",
              "DISK_RESERVE_MB": "0", "AWS_S3_BUCKET": bucket, "AWS_S3_REGION": "us-east-1",
              "AWS_ENDPOINT_URL_S3": endpoint, "AWS_ACCESS_KEY_ID": "testing",
              "AWS_SECRET_ACCESS_KEY": "testing"}
    return [arg for key, value in values.items() for arg in ("--set", f"{key}={value}")]


def _objects(endpoint: str, bucket: str) -> dict[str, bytes]:
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", [])]
    return {k: client.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys}


def _sync(flags: list[str], passes: int = 2, rc: int = 0) -> None:
    for _ in range(passes):  # README: 0, or 1 when an input was skipped
        assert main([*flags, "sync", "--once"]) == rc


# Ten users whose names clean to only four safe names, all registered in the same second.
CLASHING = ["José", "Jose", "Jose\u0301", "JOSÉ", "a/b", "a_b", "a b",
            "x" * 64 + "-first", "x" * 64 + "-second", "Jose-0123456789ab"]


def test_users_whose_names_clean_alike_each_reach_s3_once(tmp_path, s3_endpoint, s3_bucket,
                                                          s3_env):
    users = [{"username": name, "full_name": f"Synthetic {i}", "registration_date": SECOND}
             for i, name in enumerate(CLASHING)]
    (tmp_path / "users.json").write_text(json.dumps(users), encoding="utf-8")
    flags = _flags(tmp_path, s3_endpoint, s3_bucket)
    _sync(flags)
    objects = _objects(s3_endpoint, s3_bucket)
    assert len(objects) == len(CLASHING), sorted(objects)
    delivered = sorted(json.loads(body)["username"] for body in objects.values())
    assert delivered == sorted(CLASHING), "each user's own body, none overwritten"
    assert all(k.startswith("ecg-reports/2026/01/24/user_signup_") for k in objects)
    assert "ecg-reports/2026/01/24/user_signup_Jose_20260124_120419.json" in objects, \
        "a name already safe keeps its legacy key"
    # one local file per user, and nothing failed for good
    assert len(list((tmp_path / "state" / "signups").iterdir())) == len(CLASHING)
    assert main([*flags, "queue", "list", "--json"]) == 0


def test_a_lost_outbox_stamps_no_user_again(tmp_path, s3_endpoint, s3_bucket, s3_env):
    """Users without a registration date (or with one that cannot be read) are dated by
    their entry, not the clock: after the state is lost, the next pass sends no second
    object, even a second later."""
    shutil.copy(LEGACY / "users_registered.json", tmp_path / "users.json")
    doc = json.loads((tmp_path / "users.json").read_text())
    doc["5550150"] = {"password": "not-real", "registration_date": "yesterday-ish"}
    doc["5550151"] = {"password": "not-real", "signup_date": "0999-01-01"}
    (tmp_path / "users.json").write_text(json.dumps(doc))
    flags = _flags(tmp_path, s3_endpoint, s3_bucket)
    _sync(flags)
    first = _objects(s3_endpoint, s3_bucket)
    assert len(first) == len(doc)
    for attempt in range(2):  # lose the outbox (a reflashed card), pass again
        second = int(time.time())
        wait_until(lambda s=second: int(time.time()) > s, what="the clock's next second")
        shutil.rmtree(tmp_path / "state")
        _sync(flags)
        assert _objects(s3_endpoint, s3_bucket) == first, f"after losing the outbox {attempt}"


def test_legacy_users_json_is_dated_by_signup_date_and_serial_defaults_to_username(
        tmp_path, s3_endpoint, s3_bucket, s3_env):
    users = {**json.loads((LEGACY / "users_phone_login.json").read_text()),
             **json.loads((LEGACY / "users_registered.json").read_text())}
    (tmp_path / "users.json").write_text(json.dumps(users))
    _sync(_flags(tmp_path, s3_endpoint, s3_bucket))
    objects = {k: json.loads(v) for k, v in _objects(s3_endpoint, s3_bucket).items()}
    by_user = {body["username"]: (key, body) for key, body in objects.items()}
    assert set(by_user) == set(users)
    key, body = by_user["5550100"]
    assert key == "ecg-reports/2026/01/12/user_signup_5550100_20260112_000000.json"
    assert body["registration_date"] == "2026-01-12 00:00:00"
    assert by_user["5550101"][0].startswith("ecg-reports/2026/01/17/")
    assert by_user["5550199"][0].startswith("ecg-reports/2026/01/27/")
    # serial_id: the entry's own when it has one (even ""), else the username (legacy sync)
    assert by_user["5550199"][1]["serial_id"] == "ECG-SYN-1"
    assert by_user["5550198"][1]["serial_id"] == ""
    assert by_user["5550100"][1]["serial_id"] == "5550100"
    assert by_user["Synthia"][1]["serial_id"] == "Synthia"
    # no date at all: the layout's "date unknown", with empty time fields, never "now"
    key, body = by_user["Synthia"]
    assert key == "ecg-reports/2000/01/01/user_signup_Synthia_20000101_000000.json"
    assert body["registration_date"] == body["last_sync"] == body["uploaded_at"] == ""
    for body in objects.values():
        assert "password" not in body and "address" not in body


def _report(folder: Path, name: str, when: datetime) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_bytes(b"%PDF-1.4 synthetic " + name.encode())
    os.utime(path, (when.timestamp(), when.timestamp()))
    return path


def test_legacy_report_names_are_dated_by_their_stamp_not_their_mtime(
        tmp_path, s3_endpoint, s3_bucket, s3_env):
    rows = [line.split("\t") for line in
            (LEGACY / "report_names.txt").read_text().splitlines()]
    copied = datetime(2026, 3, 9, 10, 0, 0)  # copied onto the unit weeks later
    for name, _ in rows:
        _report(tmp_path / "reports", name, copied)
    _sync(_flags(tmp_path, s3_endpoint, s3_bucket))
    keys = set(_objects(s3_endpoint, s3_bucket))
    assert keys == {f"ecg-reports/{day.replace('-', '/')}/{name}" for name, day in rows}


def test_a_report_stamped_before_year_2000_keeps_a_four_digit_date(
        tmp_path, s3_endpoint, s3_bucket, s3_env, capsys):
    reports = tmp_path / "reports"
    _report(reports, "ECG_Report_00010101_000000.pdf", datetime(2026, 2, 3, 4, 5, 6))
    _report(reports, "ECG_Report_09991231_235959.pdf", datetime(2026, 2, 3, 4, 5, 6))
    _report(reports, "holter.pdf", datetime(1999, 12, 31, 12, 0, 0))  # and an old mtime
    flags = _flags(tmp_path, s3_endpoint, s3_bucket)
    _sync(flags, rc=1)  # the undatable one is skipped
    keys = sorted(_objects(s3_endpoint, s3_bucket))
    assert keys == ["ecg-reports/2026/02/03/ECG_Report_00010101_000000.pdf",
                    "ecg-reports/2026/02/03/ECG_Report_09991231_235959.pdf"]
    err = capsys.readouterr().err.splitlines()
    notes = [line for line in err if "dated by its modification time" in line]
    assert len(notes) == 2, "one line per report dated otherwise, over both passes"
    refused = [line for line in err if "date from 2000 on" in line and "not uploaded" in line]
    assert len(refused) == 1 and "holter" not in refused[0], "one line, the name hashed"
    main([*flags, "status", "--json"])
    assert json.loads(capsys.readouterr().out)["outbox"]["problems"] == 1, "status lists it"
