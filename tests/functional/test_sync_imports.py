"""A sync pass ships what it finds without importing the capture path.

`sync --once` (and the service's sync loop between captures) queues packages, dropped reports
and signups and uploads them: none of that needs numpy, the measurements, reportlab or
pydicom, which cost a Pi about 130 ms and 20 MB to import. Only held records (captured
before the clock was known, named and packaged by a pass) need them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import make_package

pytestmark = pytest.mark.functional

HEAVY = {"numpy", "reportlab", "pydicom", "serial"}


def _sync_once_modules(cwd: Path, flags: list[str]) -> tuple[int, set[str], str]:
    code = (
        "import sys, json\n"
        "from device_agent.commands import main\n"
        f"code = main({[*flags, 'sync', '--once']!r})\n"
        "print(json.dumps([code, sorted(sys.modules)]), file=sys.__stderr__)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": os.getcwd()})
    code, modules = json.loads(proc.stderr.strip().splitlines()[-1])
    return code, set(modules), proc.stderr


def test_sync_once_delivers_without_the_capture_path(tmp_path: Path, s3_endpoint, s3_bucket):
    import boto3

    make_package(tmp_path / "state" / "records", "20260124_121815", seed=1)
    reports = tmp_path / "reports"
    reports.mkdir()
    report = reports / "ECG_Report_20260124_101500.pdf"
    report.write_bytes(b"%PDF-1.4 dropped by another program\n")
    old = time.time() - 60  # long untouched: completely written
    os.utime(report, (old, old))
    (tmp_path / "users.json").write_text(json.dumps(
        [{"username": "synthetic", "full_name": "Synthetic Signup",
          "registration_date": "2026-01-24T10:15:00"}]))
    values = {"STATE_DIR": tmp_path / "state", "REPORTS_DIR": reports,
              "USERS_FILE": tmp_path / "users.json", "CLOCK_CHECK": "floor",
              "DISK_RESERVE_MB": "0", "ECG_SERIAL_PORT": tmp_path / "ttyNONE",
              "CLOUD_UPLOAD_ENABLED": "true", "AWS_S3_BUCKET": s3_bucket,
              "AWS_S3_REGION": "us-east-1", "AWS_ENDPOINT_URL_S3": s3_endpoint,
              "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    flags = [arg for key, value in values.items() for arg in ("--set", f"{key}={value}")]

    code, modules, err = _sync_once_modules(tmp_path, flags)

    heavy = sorted(m for m in modules if m.split(".")[0] in HEAVY)
    assert code == 0, err
    assert "device_agent.sync" in modules and "boto3" in modules
    assert not heavy, f"sync --once imported {heavy[:5]}"
    keys = [o["Key"] for o in boto3.client("s3", endpoint_url=s3_endpoint,
                                           region_name="us-east-1")
            .list_objects_v2(Bucket=s3_bucket).get("Contents", [])]
    assert any(k.endswith("ECG_Report_20260124_121815.pdf") for k in keys), keys
    assert any(k.endswith(report.name) for k in keys), keys
    assert any("user_signup_synthetic" in k for k in keys), keys


def _modules_after(code: str) -> set[str]:
    proc = subprocess.run([sys.executable, "-c", code + "\nimport sys, json\n"
                           "print(json.dumps(sorted(sys.modules)))"],
                          capture_output=True, text=True, timeout=120, check=True,
                          env={**os.environ, "PYTHONPATH": os.getcwd()})
    return set(json.loads(proc.stdout.strip().splitlines()[-1]))


def test_pydicom_is_loaded_only_by_a_unit_that_writes_the_dicom_copy(tmp_path: Path):
    """The service's whole graph (run, capture, package) leaves pydicom out until a copy is
    encoded: with PACKAGE_DICOM=false it is never loaded (about 6 MB resident on a Pi). That
    the copy is written when on, the package tests show."""
    code = (
        "from device_agent.core.config import load_settings\n"
        "import device_agent.commands.service, device_agent.service, device_agent.assemble\n"
        "from device_agent.capture import PackageEncoders\n"
        f"s = load_settings(environ={{}}, overrides={{'STATE_DIR': {str(tmp_path)!r}, "
        "'PACKAGE_DICOM': 'false'})\n"
        "assert PackageEncoders(s).dicom(None, {}) is None\n"
    )
    modules = _modules_after(code)
    assert "device_agent.capture" in modules and "device_agent.service" in modules
    assert not any(m.split(".")[0] == "pydicom" for m in modules)
