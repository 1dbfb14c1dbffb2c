"""What is not queued by a decision never leaves the unit: a withheld capture (--no-upload)
and a rejected one, through the real CLI over a pty, then sync passes against moto."""

from __future__ import annotations

import json
from pathlib import Path

import boto3
import pytest

from device_agent.commands import main
from device_agent.core.errors import CaptureRejected
from device_agent.lab.simulator import BoardSimulator, FaultSpec

pytestmark = pytest.mark.functional
CPM = 400.0


def _flags(tmp_path: Path, endpoint: str, bucket: str) -> list[str]:
    values = {"STATE_DIR": tmp_path / "state", "REPORTS_DIR": tmp_path / "reports",
              "USERS_FILE": tmp_path / "users.json", "CLOCK_CHECK": "floor",
              "DISK_RESERVE_MB": "0", "ECG_COUNTS_PER_MV": str(CPM), "AWS_S3_BUCKET": bucket,
              "AWS_S3_REGION": "us-east-1", "AWS_ENDPOINT_URL_S3": endpoint,
              "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    flags = []
    for key, value in values.items():
        flags += ["--set", f"{key}={value}"]
    return flags


def _keys(endpoint: str, bucket: str) -> list[str]:
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    return [o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", [])]


def test_withheld_and_rejected_captures_never_reach_the_bucket(
        tmp_path, ecg_data_dir, s3_endpoint, s3_bucket, s3_env, capsys):
    flags = _flags(tmp_path, s3_endpoint, s3_bucket)
    link = tmp_path / "board"
    with BoardSimulator(ecg_data_dir / "HR06000", link, counts_per_mv=CPM, speed=25,
                        loop=True):
        assert main([*flags, "capture", "--direct", "--port", str(link), "--seconds", "4",
                     "--no-upload"]) == 0
    withheld = Path(capsys.readouterr().out.strip().splitlines()[-1])
    with BoardSimulator(ecg_data_dir / "HR06001", link, counts_per_mv=CPM, speed=25,
                        loop=True, faults=FaultSpec(lose=0.02), seed=1):
        assert main([*flags, "capture", "--direct", "--port", str(link),
                     "--seconds", "4"]) == CaptureRejected.exit_code
    rejected = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert json.loads((rejected / "disposition.json").read_text())["disposition"] == "rejected"

    for _ in range(2):  # the pass that used to reconcile them into the queue, and another
        assert main([*flags, "sync", "--once"]) == 0
    assert _keys(s3_endpoint, s3_bucket) == [], "nothing withheld or rejected leaves the unit"
    capsys.readouterr()
    assert main([*flags, "status", "--json"]) == 1
    box = json.loads(capsys.readouterr().out)["outbox"]
    assert (box["withheld"], box["rejected"], box["pending"]) == (1, 1, 0)
    assert main([*flags, "queue", "list"]) == 0
    listed = capsys.readouterr().out
    assert "withheld by the operator" in listed and "rejected" in listed

    # the operator changes their mind about the withheld one; the rejected one stays home
    assert main([*flags, "queue", "add", str(withheld)]) == 0
    assert main([*flags, "queue", "add", str(rejected)]) == 1
    assert main([*flags, "sync", "--once"]) == 0
    keys = _keys(s3_endpoint, s3_bucket)
    assert len(keys) == 5 and all(withheld.name in k for k in keys)
