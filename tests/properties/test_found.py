"""What the generated suite found, kept as plain examples (each failed before its fix),
through the real `sync --once` against moto's HTTP server."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.properties.harness import Run, Unit, assert_clean

pytestmark = pytest.mark.functional


def test_a_user_listed_twice_is_delivered_once_and_nothing_fails(s3_endpoint):
    """The second entry of a username used to overwrite the first one's local signup file
    before the outbox said "already known": the first row then failed for good ("no longer
    matches the SHA-256") and the user never reached S3."""
    users = [{"username": "Qzdupl01"},
             {"username": "Qzdupl01", "registration_date": "2000-01-01 00:00:00"},
             {"username": " Qzdupl01 ", "full_name": "Synthetic Other"}]
    with Unit(s3_endpoint) as unit:
        unit.users_file.write_text(json.dumps(users))
        run = unit.run("sync", "--once")
        assert_clean(run, codes={0})
        assert "failed for good" not in run.err, run
        objects = unit.objects()
        assert list(objects) == [
            "ecg-reports/2000/01/01/user_signup_Qzdupl01_20000101_000000.json"], run
        assert json.loads(next(iter(objects.values())))["registration_date"] == ""


def test_an_entry_that_is_not_a_user_is_one_line_not_one_per_pass(s3_endpoint):
    """Refused entries (a lone surrogate, no username, not an object) used to be logged
    again on every pass (every 15 s in the service)."""
    doc = ('[{"username": "Qzsurr\\ud800"}, {"full_name": "Synthetic"}, "junk", '
           '{"username": "Qzgood01"}]')
    with Unit(s3_endpoint) as unit:
        unit.users_file.write_text(doc)
        runs = [unit.run("sync", "--once") for _ in range(3)]
        for run in runs:
            assert_clean(run, codes={0, 1})
        lines = [line for run in runs for line in run.err_lines() if "users file" in line]
        assert len(lines) == 3, lines
        assert sum("user#" in line for line in lines) == 1
        assert sum("entry 1 has no username" in line for line in lines) == 1
        assert sum("entry 2 is not an object" in line for line in lines) == 1
        assert len(unit.objects()) == 1
        status = unit.run("status", "--json")
        assert json.loads(status.out)["outbox"]["problems"] == 3, "status lists all three"


def test_a_lone_user_called_users_is_not_taken_for_the_wrapper(s3_endpoint):
    """`{"users": {...one user's fields...}}` is the dict form with one user named `users`,
    not the wrapped form: the user used to be lost (its fields read as users)."""
    with Unit(s3_endpoint) as unit:
        unit.users_file.write_text(json.dumps({"users": {"password": "not-real",
                                                         "full_name": "Synthetic"}}))
        run = unit.run("sync", "--once")
        assert_clean(run, codes={0})
        keys = list(unit.objects())
        assert keys == ["ecg-reports/2000/01/01/user_signup_users_20000101_000000.json"], run
        unit.users_file.write_text(json.dumps({"users": {"a": {"full_name": "Synthetic"}}}))
        unit.run("sync", "--once")
        assert len(unit.objects()) == 2, "the wrapped dict form still reads as users"


def test_a_report_with_a_modification_time_in_the_future_is_delivered(s3_endpoint):
    """A report whose mtime is ahead of the clock (an RTC set wrong when it was written, a
    copy that kept its times) was taken as "still being written" on every look: never
    uploaded, without a line."""
    import os
    import time

    with Unit(s3_endpoint) as unit:
        unit.reports.mkdir()
        path = unit.reports / "ECG_Report_20260124_121815.pdf"
        path.write_bytes(b"%PDF-1.4 synthetic")
        ahead = time.time() + 86400
        os.utime(path, (ahead, ahead))
        run = unit.run("sync", "--once")
        assert_clean(run, codes={0})
        assert list(unit.objects()) == ["ecg-reports/2026/01/24/ECG_Report_20260124_121815.pdf"]


@pytest.mark.parametrize("age", ["²", "⑤", "45²"])
def test_an_age_of_digits_int_cannot_read_is_refused_in_one_line(tmp_path, age):
    """`"²".isdigit()` is true but `int("²")` raises: the patient gate let a ValueError
    out ("unexpected error", exit 1) instead of its one line and exit 2."""
    from device_agent.core.errors import PatientDetailsError
    from device_agent.documents.patient import validate_patient

    with pytest.raises(PatientDetailsError, match="'age' must be a whole number 0-150"):
        validate_patient({"first_name": "Synthetic", "age": age})
    assert validate_patient({"age": "١٥٠"}) == {"age": "١٥٠"}, "decimal digits of a script"
    patient = tmp_path / "patient.json"
    patient.write_text(json.dumps({"age": age}))
    argv = ["--set", f"STATE_DIR={tmp_path / 'state'}", "--set", "CLOUD_UPLOAD_ENABLED=false",
            "capture", "--direct", "--port", "loop://", "--seconds", "1",
            "--patient", str(patient)]
    proc = subprocess.run([sys.executable, "-m", "device_agent", *argv], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    run = Run(argv, proc.returncode, proc.stdout, proc.stderr)
    assert_clean(run, codes={2})
    assert len(run.err_lines()) == 1 and "'age'" in run.err, run
    assert not (tmp_path / "state" / "records").exists() or not list(
        (tmp_path / "state" / "records").iterdir())


def _config(tmp_path, env_text: bytes, *flags: str) -> Run:
    env_file = tmp_path / "settings.env"
    env_file.write_bytes(env_text)
    env_file.chmod(0o600)
    argv = ["--env-file", str(env_file), *flags, "config"]
    proc = subprocess.run([sys.executable, "-m", "device_agent", *argv], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    return Run(argv, proc.returncode, proc.stdout, proc.stderr)


def test_an_empty_value_in_the_env_file_is_empty_not_a_crash(tmp_path):
    """`KEY=` (the legacy .env leaves AWS_SESSION_TOKEN= empty) raised IndexError in the
    env-file parser: every command exited 1 with "unexpected error"."""
    run = _config(tmp_path, b"AWS_SESSION_TOKEN=\nS3_MAX_ATTEMPTS=   \nDEVICE_MODEL=''\n")
    assert_clean(run, codes={2})  # S3_MAX_ATTEMPTS needs a number: one line, exit 2
    assert len(run.err_lines()) == 1 and "S3_MAX_ATTEMPTS" in run.err, run
    run = _config(tmp_path, b"AWS_SESSION_TOKEN=\nDEVICE_MODEL=\n")
    assert_clean(run, codes={0})


@pytest.mark.parametrize(("env_text", "key"), [
    (b"STATE_DIR=/tmp/a\x00b\n", "STATE_DIR"),
    (b"AWS_S3_BUCKET=my bucket\n", "AWS_S3_BUCKET"),
    (b"AWS_S3_REGION=us-east-1/../x\n", "AWS_S3_REGION"),
    (b"AWS_S3_REGION=5\n", "AWS_S3_REGION"),  # botocore: a host label, not only digits
])
def test_a_setting_no_open_or_botocore_can_use_is_a_configuration_error(tmp_path, env_text,
                                                                         key):
    """A NUL in a path ("embedded null byte"), a bucket or a region botocore refuses used to
    pass the settings and fail later: "unexpected error" (1), or every item failed for good."""
    run = _config(tmp_path, env_text)
    assert_clean(run, codes={2})
    assert len(run.err_lines()) == 1 and key in run.err, run
    assert _config(tmp_path, b"AWS_S3_BUCKET=legacy_Bucket.1\nAWS_S3_REGION=eu-west-1\n"
                   ).rc == 0, "names botocore takes still pass"
