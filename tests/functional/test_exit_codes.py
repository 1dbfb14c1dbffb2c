"""Every command's exit codes as the README documents them, and one line per error.

0 success; 1 the operation ran and failed; 2 usage or configuration error; 3 an external
part is unavailable (port, S3, disk, clock); 4 the outbox is busy; 130 interrupted.
(capture 0/1/3, run 0/4 and status 0 are also covered with real parts elsewhere:
test_simulator_capture.py and test_service.py.)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import pytest

from device_agent.commands import main
from device_agent.core.config import load_settings
from device_agent.shipping.outbox import Outbox
from device_agent.sync import drain_lock
from tests.conftest import wait_until
from tests.faultproxy import FaultProxy
from tests.helpers import make_package

pytestmark = pytest.mark.functional


def _flags(tmp_path: Path, **extra: str) -> list[str]:
    values = {"STATE_DIR": str(tmp_path / "state"), "REPORTS_DIR": str(tmp_path / "reports"),
              "USERS_FILE": str(tmp_path / "users.json"), "CLOCK_CHECK": "floor",
              "DISK_RESERVE_MB": "0", "CLOUD_UPLOAD_ENABLED": "false",
              "ECG_SERIAL_PORT": str(tmp_path / "ttyNONE"), **extra}
    flags = []
    for key, value in values.items():
        flags += ["--set", f"{key}={value}"]
    return flags


def _s3(tmp_path: Path, endpoint: str, bucket: str, **extra: str) -> list[str]:
    values = {"CLOUD_UPLOAD_ENABLED": "true", "AWS_S3_BUCKET": bucket,
              "AWS_S3_REGION": "us-east-1", "AWS_ENDPOINT_URL_S3": endpoint,
              "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
              "S3_MAX_ATTEMPTS": "1", "S3_CONNECT_TIMEOUT_S": "1", "S3_READ_TIMEOUT_S": "2"}
    return _flags(tmp_path, **{**values, **extra})


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


# --- sync ----------------------------------------------------------------------------------

def test_sync_0_delivered_1_broken_users_file_3_unreachable_4_busy(
        tmp_path, s3_endpoint, s3_bucket, capsys):
    flags = _s3(tmp_path, s3_endpoint, s3_bucket)
    make_package(tmp_path / "state" / "records", "20260124_121815", seed=1)
    assert main([*flags, "sync", "--once"]) == 0
    assert "delivered 4" in capsys.readouterr().out

    (tmp_path / "users.json").write_text('{"ptr": {"full_na')
    assert main([*flags, "sync", "--once"]) == 1
    assert "users file" in capsys.readouterr().err
    (tmp_path / "users.json").unlink()

    port = urlparse(s3_endpoint).port
    with FaultProxy(port) as proxy:
        proxy.set_mode("refuse")
        make_package(tmp_path / "state" / "records", "20260124_121816", seed=2)
        assert main([*_s3(tmp_path, proxy.url, s3_bucket), "sync", "--once"]) == 3
        assert "ConnectionError" in capsys.readouterr().err

    lock = drain_lock(tmp_path / "state")
    assert lock.acquire()
    try:
        assert main([*flags, "sync", "--once"]) == 4
        assert "outbox.lock" in _one_line(capsys)
    finally:
        lock.release()


def test_sync_with_an_aws_profile_that_does_not_exist_is_a_configuration_error(
        tmp_path, monkeypatch, capsys):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "aws-config").write_text("[profile other]\nregion = us-east-1\n")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "aws-credentials"))
    flags = _flags(tmp_path, CLOUD_UPLOAD_ENABLED="true", AWS_S3_BUCKET="bucket-x",
                   AWS_S3_REGION="us-east-1", AWS_PROFILE="Qzxyz",
                   AWS_ENDPOINT_URL_S3="http://127.0.0.1:9")
    assert main([*flags, "sync", "--once"]) == 2
    line = _one_line(capsys)
    assert "AWS_PROFILE=Qzxyz" in line and "unexpected" not in line, line


def test_sync_interrupted_while_waiting_for_the_lock_is_130(tmp_path):
    lock = drain_lock(tmp_path / "state")
    assert lock.acquire()
    try:
        proc = subprocess.Popen([sys.executable, "-m", "device_agent", *_flags(tmp_path),
                                 "sync", "--once", "--wait"], cwd=tmp_path,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_until(lambda: _waiting(proc.pid), timeout=30, what="sync to wait on the lock")
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=30)
    finally:
        lock.release()
    assert proc.returncode == 130, err
    assert "interrupted" in err


@pytest.mark.parametrize("hangs", ["bucket listing", "put"])
def test_sync_interrupted_mid_request_is_130_without_waiting_out_the_read(
        tmp_path, s3_endpoint, s3_bucket, hangs):
    """Ctrl-C while a request hangs on an endpoint that accepted and never answers (the
    first start's LIST on this thread, or a put on the drainer's): the command abandons it
    (S3 puts are atomic) and exits 130, long before its 120 s read timeout."""
    with FaultProxy(urlparse(s3_endpoint).port) as proxy:
        flags = _s3(tmp_path, proxy.url, s3_bucket, S3_READ_TIMEOUT_S="120")
        if hangs == "put":  # the first start's LIST is done: the next request is a put
            assert main([*flags, "sync", "--once"]) == 0
        make_package(tmp_path / "state" / "records", "20260124_121815", seed=1)
        proxy.set_mode("blackhole")
        accepted = proxy.counts["accepted"]
        proc = subprocess.Popen([sys.executable, "-m", "device_agent", *flags, "sync", "--once"],
                                cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        try:
            wait_until(lambda: proxy.counts["accepted"] > accepted or proc.poll() is not None,
                       timeout=60, what=f"a {hangs} in flight")
            assert proc.poll() is None, proc.communicate()
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=60)  # well under the read timeout
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert proc.returncode == 130, (out, err)
    assert "interrupted" in err and "Traceback" not in err, err
    with Outbox.open(load_settings(env_file=None, environ={}, overrides=_overrides(flags))) as box:
        assert box.stats().pending == 4 and box.stats().failed == 0, "nothing given up"


def _overrides(flags: list[str]) -> dict[str, str]:
    return dict(f.split("=", 1) for f in flags if f != "--set")


def _service(flags: list[str], cwd: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "device_agent", *flags, "run"], cwd=cwd,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "NOTIFY_SOCKET": ""})


def _stop(service: subprocess.Popen[bytes]) -> None:
    if service.poll() is None:
        service.send_signal(signal.SIGTERM)
        try:
            service.wait(timeout=30)
        except subprocess.TimeoutExpired:
            service.kill()
            service.wait(timeout=30)


def test_sync_once_beside_the_running_service_is_busy_only_mid_pass(
        tmp_path, s3_endpoint, s3_bucket, capsys):
    """docs/operations.md §5: with `run` up, `sync --once` answers busy (4) while one of the
    service's passes holds the outbox (here it hangs on an endpoint that never answers), and
    between its passes runs a pass of its own (exit 0, it delivers)."""
    from device_agent.ops.status import read_status_file

    state = tmp_path / "state"
    make_package(state / "records", "20260124_121815", seed=1)
    with FaultProxy(urlparse(s3_endpoint).port) as proxy:
        flags = _s3(tmp_path, proxy.url, s3_bucket, SYNC_INTERVAL_S="3600",
                    S3_READ_TIMEOUT_S="120")
        proxy.set_mode("blackhole")
        service = _service(flags, tmp_path)
        try:  # mid-pass: the service's first pass waits on the endpoint, under the lock
            wait_until(lambda: proxy.counts["accepted"] >= 1 or service.poll() is not None,
                       timeout=60, what="the service's pass to reach the endpoint")
            assert service.poll() is None
            capsys.readouterr()
            assert main([*flags, "sync", "--once"]) == 4
            assert "outbox.lock" in _one_line(capsys)
        finally:
            _stop(service)

        proxy.set_mode("pass")
        service = _service(flags, tmp_path)
        try:  # between passes: the service's next one is an hour away
            wait_until(lambda: ((doc := read_status_file(state)) is not None
                                and doc.get("last_sync") is not None)
                       or service.poll() is not None, timeout=60,
                       what="the service's first pass")
            assert service.poll() is None
            make_package(state / "records", "20260124_121816", seed=2)
            capsys.readouterr()
            assert main([*flags, "sync", "--once"]) == 0
            assert "delivered 4" in capsys.readouterr().out
            assert service.poll() is None, "the service runs on"
        finally:
            _stop(service)


def _waiting(pid: int) -> bool:
    """The process has the outbox open (it got past start-up and waits for the lock)."""
    try:
        return any("outbox.sqlite3" in os.readlink(f"/proc/{pid}/fd/{fd}")
                   for fd in os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return False


# --- verify --------------------------------------------------------------------------------

def test_verify_0_intact_1_missing_3_unreachable(tmp_path, s3_endpoint, s3_bucket, capsys):
    import boto3

    flags = _s3(tmp_path, s3_endpoint, s3_bucket)
    make_package(tmp_path / "state" / "records", "20260124_121815", seed=1)
    assert main([*flags, "sync", "--once"]) == 0
    assert main([*flags, "verify"]) == 0
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    key = next(o["Key"] for o in client.list_objects_v2(Bucket=s3_bucket)["Contents"]
               if o["Key"].endswith(".pdf"))
    client.delete_object(Bucket=s3_bucket, Key=key)
    capsys.readouterr()
    assert main([*flags, "verify"]) == 1
    assert key in capsys.readouterr().out
    with FaultProxy(urlparse(s3_endpoint).port) as proxy:
        proxy.set_mode("refuse")
        assert main([*_s3(tmp_path, proxy.url, s3_bucket), "verify"]) == 3
        assert "cannot reach" in _one_line(capsys)


# --- doctor --------------------------------------------------------------------------------

def test_doctor_answers_even_when_the_endpoint_never_does(tmp_path, s3_endpoint, s3_bucket,
                                                         capsys):
    """An endpoint that accepts and never answers: doctor still finishes (its requests have
    a total deadline and one attempt) and names the problem."""
    with FaultProxy(urlparse(s3_endpoint).port) as proxy:
        proxy.set_mode("blackhole")
        code = main([*_s3(tmp_path, proxy.url, s3_bucket, S3_CONNECT_TIMEOUT_S="30",
                          S3_READ_TIMEOUT_S="60", ECG_SERIAL_PORT="loop://"), "doctor"])
    out = capsys.readouterr().out
    assert code == 1
    assert "FAIL s3" in out and "Timeout" in out


def test_doctor_0_when_all_is_well(tmp_path, s3_endpoint, s3_bucket, capsys):
    assert main([*_s3(tmp_path, s3_endpoint, s3_bucket, ECG_SERIAL_PORT="loop://"),
                 "doctor"]) == 0, capsys.readouterr().out


# --- queue, config, report, simulate ---------------------------------------------------------

def test_queue_codes(tmp_path, capsys):
    flags = _flags(tmp_path)
    assert main([*flags, "queue", "list"]) == 0
    assert main([*flags, "queue", "retry", "12345"]) == 1
    assert main([*flags, "queue", "retry"]) == 2
    assert main([*flags, "queue", "add", str(tmp_path / "nope")]) == 1


def test_usage_errors_are_2_and_one_line(tmp_path, capsys):
    assert main(["--set", "ECG_BAUD_RATE=11520", "config"]) == 2
    assert "ECG_BAUD_RATE" in _one_line(capsys)
    with pytest.raises(SystemExit) as exited:
        main(["simulate", "--link", str(tmp_path / "tty"), "--speed", "0"])
    assert exited.value.code == 2
    assert "must be a number above 0" in capsys.readouterr().err
    assert main(["simulate", "--link", str(tmp_path / "no-such-folder" / "tty")]) == 2
    assert "no-such-folder" in _one_line(capsys)
    assert main([*_flags(tmp_path), "capture", "--direct", "--patient",
                 str(tmp_path / "missing.json")]) == 2
    assert "missing.json" in _one_line(capsys)


def test_report_1_on_a_bad_input_3_on_a_full_disk(tmp_path, capsys):
    from device_agent.documents import ecgdata
    from tests.helpers import make_record

    good = tmp_path / "ecg_data_x.json"
    good.write_bytes(ecgdata.dumps(make_record(record_id="r")))
    assert main(["report", "--input", str(tmp_path / "nope.json"), "--out",
                 str(tmp_path / "x.pdf")]) == 1
    assert "nope.json" in _one_line(capsys)
    full = Path("/dev/full")
    if not full.exists():
        pytest.skip("no /dev/full here")
    # a folder whose writes end in ENOSPC: a tiny tmpfs when we may mount one
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(mnt)],
                             capture_output=True, check=False).returncode == 0
    if not mounted:
        pytest.skip("cannot mount a tmpfs here")
    try:
        (mnt / "filler").write_bytes(b"\0" * 8192)
        assert main(["report", "--input", str(good), "--out", str(mnt / "x.pdf")]) == 3
        assert "disk full" in _one_line(capsys)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_closed_pipe_is_not_an_error(tmp_path):
    proc = subprocess.run(f"'{sys.executable}' -m device_agent config | head -1",
                          shell=True, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    assert "Traceback" not in proc.stderr and "unexpected" not in proc.stderr
    assert proc.stdout.startswith("CLOUD_UPLOAD_ENABLED")


def test_status_json_parses_and_exits_1_with_the_service_stopped(tmp_path, capsys):
    assert main([*_flags(tmp_path), "status", "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["service"]["state"] == "stopped"


@pytest.mark.parametrize("command", [["sync", "--once"], ["status"], ["queue", "list"],
                                     ["capture", "--direct"], ["verify"]])
def test_a_state_dir_that_is_a_file_is_a_configuration_error(tmp_path, capsys, command):
    (tmp_path / "state").write_text("not a folder")
    assert main([*_flags(tmp_path), *command]) == 2
    line = _one_line(capsys)
    assert "STATE_DIR" in line and "is a file" in line and "unexpected" not in line
    # a path below a file is the same mistake
    assert main([*_flags(tmp_path, STATE_DIR=str(tmp_path / "state" / "sub")), *command]) == 2
    assert "STATE_DIR" in _one_line(capsys)


@pytest.mark.parametrize("endpoint", ["not-a-url", "127.0.0.1:9000", "ftp://host",
                                      "http://", "http://host:99999"])
def test_an_s3_endpoint_that_is_not_a_url_is_a_configuration_error(tmp_path, capsys,
                                                                   endpoint):
    flags = _flags(tmp_path, CLOUD_UPLOAD_ENABLED="true", AWS_S3_BUCKET="b",
                   AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                   AWS_ENDPOINT_URL_S3=endpoint)
    make_package(tmp_path / "state" / "records", "20260124_121815", seed=1)
    for command in (["sync", "--once"], ["verify"]):
        assert main([*flags, *command]) == 2
        line = _one_line(capsys)
        assert "AWS_ENDPOINT_URL_S3" in line and "unexpected" not in line, line
