"""No patient's or user's name in what a person or a log sees (issue 22 item 6).

A report dropped in reports/ may be named after its patient and a signup's key carries its
username: `queue list --all` (text and --json), `verify` (text and --json) and the debug log
of `sync` and `run` show such a name only as its hash (`name#<sha256[:12]>`), through the
real CLI against moto's HTTP server.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from device_agent.commands import main
from device_agent.core.s3keys import display_name
from tests.conftest import wait_until

pytestmark = pytest.mark.functional

PATIENT_REPORT = "Synthetic_Patientname_20260124_121815.pdf"
USERNAME = "synthuserzed"  # safe for a key, so the key carries it as it is
HIDDEN = ("Patientname", USERNAME)


def _settings(tmp_path: Path, endpoint: str, bucket: str) -> dict[str, str]:
    return {"STATE_DIR": str(tmp_path / "state"), "REPORTS_DIR": str(tmp_path / "reports"),
            "USERS_FILE": str(tmp_path / "users.json"), "CLOCK_CHECK": "floor",
            "DISK_RESERVE_MB": "0", "AWS_S3_BUCKET": bucket, "AWS_S3_REGION": "us-east-1",
            "AWS_ENDPOINT_URL_S3": endpoint, "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing", "ECG_SERIAL_PORT": str(tmp_path / "ttyNONE"),
            "SYNC_INTERVAL_S": "1"}


def _flags(values: dict[str, str]) -> list[str]:
    return [arg for key, value in values.items() for arg in ("--set", f"{key}={value}")]


def _inputs(tmp_path: Path) -> None:
    (tmp_path / "reports").mkdir()
    report = tmp_path / "reports" / PATIENT_REPORT
    report.write_bytes(b"%PDF-1.4 synthetic report\n")
    old = report.stat().st_mtime - 60  # completely written (reports.STABLE_AGE_S)
    os.utime(report, (old, old))
    (tmp_path / "users.json").write_text(json.dumps(
        [{"username": USERNAME, "full_name": "Synthetic User",
          "registration_date": "2026-01-24 12:04:19"}]))


def _no_identity(text: str, where: str) -> None:
    for name in HIDDEN:
        assert name not in text, f"{where} shows {name!r}:\n{text}"


def test_queue_list_and_verify_show_hashes_not_names(tmp_path, s3_endpoint, s3_bucket,
                                                     capsys):
    _inputs(tmp_path)
    flags = _flags(_settings(tmp_path, s3_endpoint, s3_bucket))
    assert main(["--debug", *flags, "sync", "--once"]) == 0
    captured = capsys.readouterr()
    assert "delivered 2" in captured.out
    _no_identity(captured.out + captured.err, "sync --debug")

    assert main([*flags, "queue", "list", "--all"]) == 0
    out = capsys.readouterr().out
    _no_identity(out, "queue list --all")
    assert display_name(PATIENT_REPORT) in out  # the hash form the README promises

    assert main([*flags, "queue", "list", "--all", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    _no_identity(json.dumps(doc), "queue list --all --json")
    assert len(doc["items"]) == 2
    assert {r["key"] for r in doc["items"]} == {
        f"ecg-reports/2026/01/24/{display_name(PATIENT_REPORT)}",
        f"ecg-reports/2026/01/24/{display_name(f'user_signup_{USERNAME}_20260124_120419.json')}",
    }

    assert main([*flags, "verify", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["checked"] == 2 and doc["problems"] == 0
    _no_identity(json.dumps(doc), "verify --json")

    import boto3

    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    for obj in client.list_objects_v2(Bucket=s3_bucket)["Contents"]:
        client.delete_object(Bucket=s3_bucket, Key=obj["Key"])
    assert main([*flags, "verify"]) == 1
    out = capsys.readouterr().out
    assert out.count("missing") >= 2
    _no_identity(out, "verify")


def test_run_debug_logs_no_name(tmp_path, s3_endpoint, s3_bucket):
    _inputs(tmp_path)
    values = _settings(tmp_path, s3_endpoint, s3_bucket)
    log = tmp_path / "run.log"
    with log.open("w") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "device_agent", "--debug",
                                 *_flags(values), "run"], cwd=tmp_path,
                                stdout=sink, stderr=subprocess.STDOUT,
                                env={**os.environ, "NOTIFY_SOCKET": ""})
        try:
            wait_until(lambda: log.read_text().count("delivered ") >= 2, timeout=60,
                       what="the service to deliver the report and the signup")
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
    _no_identity(log.read_text(), "run --debug")
