"""status, doctor and queue: what a field engineer sees, and the fix each problem names."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from device_agent.commands import main
from device_agent.core.clock import Clock
from device_agent.core.config import load_settings
from device_agent.ops.doctor import Account, port_holders, run_doctor, service_account
from device_agent.ops.spool import ServiceAlreadyRunning, ServiceLock, Spool, running_pid
from device_agent.ops.status import STATUS_NAME, collect_status
from tests.helpers import present


def synced_clock(synced: bool) -> Clock:
    """The real clock, with the NTP evidence (the kernel's answer) the test decides."""
    return Clock(check="ntp", kernel=lambda: synced, timesyncd=lambda: False)


def _settings(tmp_path: Path, **env: str):
    base = {"STATE_DIR": str(tmp_path / "state"), "REPORTS_DIR": str(tmp_path / "reports"),
            "ECG_SERIAL_PORT": str(tmp_path / "ttyNONE"), "CLOUD_UPLOAD_ENABLED": "false",
            "DISK_RESERVE_MB": "0"}
    base.update(env)
    return load_settings(env_file=None, environ={}, overrides=base)


# --- spool and service lock ---------------------------------------------------------------

def test_service_lock_is_exclusive_and_names_pid(tmp_path: Path):
    assert running_pid(tmp_path) is None
    with ServiceLock(tmp_path):
        assert running_pid(tmp_path) == os.getpid()
        with pytest.raises(ServiceAlreadyRunning, match=str(os.getpid())):
            ServiceLock(tmp_path).acquire()
    assert running_pid(tmp_path) is None, "lock file left behind must not look running"


def test_service_lock_dies_with_its_process(tmp_path: Path):
    code = ("import sys, time; from device_agent.ops.spool import ServiceLock\n"
            "ServiceLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout is not None
    try:
        assert proc.stdout.readline().strip() == "locked"
        assert running_pid(tmp_path) == proc.pid
    finally:
        proc.kill()
        proc.wait(timeout=10)
    assert running_pid(tmp_path) is None


def test_spool_round_trip_and_expiry(tmp_path: Path):
    spool = Spool(tmp_path).ensure()
    req = spool.submit(seconds=2.0, patient={"first_name": "Test"}, no_upload=True, timeout_s=30)
    old = spool.submit(seconds=1.0, patient=None, no_upload=False, timeout_s=-1)  # expired
    assert spool.pending() == 2
    claimed = spool.claim()
    assert claimed == req, "oldest first"
    assert spool.claim() is None, "the expired one is answered, not returned"
    spool.finish(claimed.id, {"ok": True, "folder": "/x"})
    assert spool.wait(req, timeout_s=1) == {"ok": True, "folder": "/x"}
    assert spool.wait(old, timeout_s=1)["error"].startswith("request expired")
    assert not any(spool.done.iterdir()), "results are consumed"


def test_spool_wait_times_out_and_withdraws(tmp_path: Path):
    spool = Spool(tmp_path).ensure()
    req = spool.submit(seconds=1.0, patient=None, no_upload=True, timeout_s=30)
    with pytest.raises(Exception, match="did not answer"):
        spool.wait(req, timeout_s=0.2)
    assert spool.claim() is None, "a withdrawn request must not be captured later"


def test_spool_recover_answers_claims_of_a_crashed_service(tmp_path: Path):
    spool = Spool(tmp_path).ensure()
    req = spool.submit(seconds=1.0, patient=None, no_upload=True, timeout_s=30)
    assert spool.claim() == req
    assert Spool(tmp_path).recover() == 1
    assert "restarted" in spool.wait(req, timeout_s=1)["error"]


def test_spool_threads_claim_each_request_once(tmp_path: Path):
    spool = Spool(tmp_path).ensure()
    ids = {spool.submit(seconds=1, patient=None, no_upload=True, timeout_s=30).id
           for _ in range(40)}
    got: list[str] = []
    lock = threading.Lock()

    def worker():
        while (req := Spool(tmp_path).claim()) is not None:
            with lock:
                got.append(req.id)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert sorted(got) == sorted(ids)


# --- status ---------------------------------------------------------------------------------

STATUS_KEYS = {"service", "port", "last_capture", "held", "undated", "outbox", "last_sync",
               "clock", "clock_source", "disk", "credentials", "device_serial", "checked_at",
               "deadlines"}


def test_status_json_when_stopped(tmp_path: Path, capsys):
    env = tmp_path / ".env"
    env.write_text(f"STATE_DIR={tmp_path / 'state'}\nECG_SERIAL_PORT={tmp_path / 'ttyX'}\n")
    assert main(["--env-file", str(env), "status", "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert set(doc) == STATUS_KEYS
    assert doc["service"] == {"running": False, "healthy": False, "pid": None,
                              "state": "stopped", "status_age_s": None, "started_at": None,
                              "status": None, "stuck": None}
    assert doc["port"]["present"] is False and doc["port"]["connected"] is None
    assert doc["outbox"]["present"] is False and doc["outbox"]["pending"] == 0
    assert doc["clock"]["synced"] in (True, False)
    assert doc["disk"]["free_mb"] > 0
    assert main(["--env-file", str(env), "status"]) == 1
    assert capsys.readouterr().out.startswith("service      STOPPED")


def test_status_reads_outbox_read_only(tmp_path: Path):
    from device_agent.shipping.outbox import Outbox

    settings = _settings(tmp_path)
    with Outbox.open(settings) as box:
        f = tmp_path / "a.pdf"
        f.write_bytes(b"x")
        box.items.add(f, kind="ecg_report_pdf", key="ecg-reports/a.pdf", sha256="0" * 64, size=1)
    db = Path(settings.state_dir) / "outbox.sqlite3"
    before = db.read_bytes()
    s = collect_status(settings, clock=synced_clock(True), now=time.time() + 90)
    assert s["outbox"]["pending"] == 1
    assert 85 <= s["outbox"]["oldest_pending_age_s"] <= 95
    assert db.read_bytes() == before


def test_status_stale_file_means_hung(tmp_path: Path):
    settings = _settings(tmp_path)
    with ServiceLock(settings.state_dir):
        # an old or half-written file: the reader defaults what it lacks
        (Path(settings.state_dir) / STATUS_NAME).write_text(json.dumps(
            {"updated_at": time.time() - 600, "phase": "running", "port": {"connected": True}}))
        s = collect_status(settings, clock=synced_clock(True))
    assert s["service"]["running"] is True and s["service"]["state"] == "hung"
    assert s["port"]["connected"] is None, "a stale file's port state is not reported as live"


# --- doctor ---------------------------------------------------------------------------------

def _by_name(checks):
    return {c.name: c for c in checks}


def test_doctor_absent_port_and_unsynced_clock(tmp_path: Path):
    checks = _by_name(run_doctor(_settings(tmp_path), clock=synced_clock(False)))
    assert not checks["port"].ok and "plug in" in checks["port"].message
    assert not checks["clock"].ok and "timedatectl" in checks["clock"].message
    assert checks["s3"].ok  # upload disabled


def test_doctor_all_ok_and_cli_exit_codes(tmp_path: Path, capsys):
    settings = _settings(tmp_path, ECG_SERIAL_PORT="loop://")
    assert all(c.ok for c in run_doctor(settings, clock=synced_clock(True)))
    env = tmp_path / ".env"
    env.write_text(f"STATE_DIR={tmp_path}\nECG_SERIAL_PORT={tmp_path / 'gone'}\n"
                   "CLOUD_UPLOAD_ENABLED=false\nDISK_RESERVE_MB=0\n")
    assert main(["--env-file", str(env), "doctor"]) == 1
    out = capsys.readouterr().out
    assert "FAIL port" in out and "problem(s)" in out


@pytest.mark.functional
def test_doctor_port_owned_by_another_process(tmp_path: Path):
    master, slave = os.openpty()
    path = os.ttyname(slave)
    os.close(slave)
    try:
        with open(path, "rb") as tty:
            holder = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.readline()"],
                                      stdin=tty)
        try:
            assert any(pid == holder.pid for pid, _ in port_holders(path))
            checks = _by_name(run_doctor(_settings(tmp_path, ECG_SERIAL_PORT=path),
                                         clock=synced_clock(True)))
            assert not checks["port"].ok
            assert f"pid {holder.pid}" in checks["port"].message
            assert "stop that program" in checks["port"].message
        finally:
            os.write(master, b"\n")
            holder.wait(timeout=10)
        checks = _by_name(run_doctor(_settings(tmp_path, ECG_SERIAL_PORT=path),
                                     clock=synced_clock(True)))
        assert checks["port"].ok, checks["port"].message
    finally:
        os.close(master)


def _s3_settings(tmp_path: Path, endpoint: str, bucket: str, **env: str):
    return _settings(tmp_path, CLOUD_UPLOAD_ENABLED="true", AWS_S3_BUCKET=bucket,
                     AWS_S3_REGION="us-east-1", AWS_ENDPOINT_URL_S3=endpoint,
                     AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                     S3_MAX_ATTEMPTS="1", ECG_SERIAL_PORT="loop://", **env)


@pytest.mark.functional
def test_doctor_bucket_ok_and_missing(tmp_path: Path, s3_endpoint, s3_bucket):
    ok = _by_name(run_doctor(_s3_settings(tmp_path, s3_endpoint, s3_bucket),
                             clock=synced_clock(True)))
    assert ok["s3"].ok, ok["s3"].message
    missing = _by_name(run_doctor(_s3_settings(tmp_path, s3_endpoint, s3_bucket + "-nope"),
                                  clock=synced_clock(True)))
    assert not missing["s3"].ok
    assert "does not exist" in missing["s3"].message and "AWS_S3_BUCKET" in missing["s3"].message


@pytest.mark.functional
def test_doctor_wrong_credentials(tmp_path: Path, s3_endpoint, s3_bucket):
    from moto.core.authorization import enable_iam_authentication

    settings = _s3_settings(tmp_path, s3_endpoint, s3_bucket)
    with enable_iam_authentication():  # moto's server then checks keys against its IAM
        checks = _by_name(run_doctor(settings, clock=synced_clock(True)))
    bad = checks.get("credentials")
    assert bad is not None and not bad.ok, [c.message for c in checks.values()]
    assert "AWS_SECRET_ACCESS_KEY" in bad.message and "testing" not in bad.message


# --- queue ----------------------------------------------------------------------------------

def test_queue_list_and_retry(tmp_path: Path, capsys):
    from device_agent.shipping.outbox import Outbox

    settings = _settings(tmp_path)
    with Outbox.open(settings) as box:
        f = tmp_path / "a.pdf"
        f.write_bytes(b"x")
        (item_id,) = [box.items.add(f, kind="ecg_report_pdf", key="ecg-reports/a.pdf",
                                    sha256="0" * 64, size=1)]
        box.items.mark_failed(item_id, retryable=False, error="AccessDenied on bucket b",
                              next_at=None)
    env = tmp_path / ".env"
    env.write_text(f"STATE_DIR={settings.state_dir}\n")
    assert main(["--env-file", str(env), "queue", "list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["items"]
    assert [(r["id"], r["state"]) for r in rows] == [(item_id, "failed")]
    assert main(["--env-file", str(env), "queue", "retry", "9999"]) == 1
    assert main(["--env-file", str(env), "queue", "retry", "--failed"]) == 0
    assert "1 failed item(s)" in capsys.readouterr().out
    with Outbox.open(settings) as box:
        assert present(box.items.get(item_id)).state == "pending"


# --- doctor judges permissions as the service user, whoever runs it -------------------------

SERVICE = Account("device-agent", 65534, frozenset({65534}), True)


def test_doctor_as_root_still_sees_what_the_service_user_cannot(tmp_path: Path):
    state = tmp_path / "state"
    state.mkdir(mode=0o700)  # root's, as a mistaken `sudo mkdir` leaves it
    master, slave = os.openpty()
    tty = os.ttyname(slave)
    os.chmod(tty, 0o600)  # a root-only port, as /dev/ttyS0 is without dialout
    try:
        checks = _by_name(run_doctor(_settings(tmp_path, ECG_SERIAL_PORT=tty),
                                     clock=synced_clock(True), account=SERVICE))
    finally:
        os.close(slave)
        os.close(master)
    assert not checks["state"].ok and "not writable by the service user" in \
        checks["state"].message and "chown" in checks["state"].message
    assert not checks["port"].ok and "usermod -aG" in checks["port"].message
    if os.geteuid() == 0:  # as root itself everything would look fine: the bug this fixes
        root = Account("root", 0, frozenset({0}), True)
        checks = _by_name(run_doctor(_settings(tmp_path, ECG_SERIAL_PORT="loop://"),
                                     clock=synced_clock(True), account=root))
        assert checks["state"].ok


def test_doctor_says_dev_null_is_not_a_serial_port_and_blames_no_process(tmp_path: Path):
    checks = _by_name(run_doctor(_settings(tmp_path, ECG_SERIAL_PORT="/dev/null"),
                                 clock=synced_clock(True), account=SERVICE))
    assert not checks["port"].ok and "not a serial port" in checks["port"].message
    assert "kill" not in checks["port"].message and "pid" not in checks["port"].message


def test_service_account_of_a_missing_user_falls_back_to_this_user():
    acct = service_account("no-such-user-here")
    assert acct.exists is False and acct.uid == os.getuid()
