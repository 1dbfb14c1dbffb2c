"""The real service restarted in the middle of a capture: the capture's answer says whether it
was kept, and as which record (issue 22 item 5).

`device-agent run` in a subprocess, the board simulator on a pseudo-terminal, moto's S3 over
HTTP. Kept: the result of a capture cannot be written (spool/done is made a file), so the
request stays claimed while its package is written and uploaded; the service is SIGKILLed
and started again, and the waiting caller hears "kept as record R (stamp S), uploaded", not
"capture again", and S3 still holds one package. Nothing kept: the service is SIGKILLed
while the board is still being read; the caller hears "capture again".
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest

from device_agent.core.fsutil import atomic_write
from device_agent.ops.spool import NOTHING_KEPT, Request, Spool, record_id_for
from device_agent.shipping.outbox import DB_NAME, DELIVERED, Outbox
from tests.conftest import wait_until

PATIENT = {"first_name": "Synthetic", "last_name": "Restartova", "age": 61, "gender": "F",
           "patient_id": "SYN-RST-4410"}
IDENTITY = ("Synthetic", "Restartova", "SYN-RST-4410")


class Unit:
    """One unit's state and settings; starts and kills its service."""

    def __init__(self, tmp_path: Path, endpoint: str, bucket: str) -> None:
        self.tmp = tmp_path
        self.state = tmp_path / "state"
        self.link = tmp_path / "ttyBOARD"
        self.env_file = tmp_path / "agent.env"
        self.env_file.write_text("\n".join([
            f"STATE_DIR={self.state}", f"REPORTS_DIR={tmp_path / 'reports'}",
            f"USERS_FILE={tmp_path / 'users.json'}", f"ECG_SERIAL_PORT={self.link}",
            "ECG_COUNTS_PER_MV=400", "ECG_CAPTURE_SECONDS=2", "SYNC_INTERVAL_S=0.3",
            f"AWS_S3_BUCKET={bucket}", "AWS_S3_REGION=us-east-1",
            f"AWS_ENDPOINT_URL_S3={endpoint}", "S3_MAX_ATTEMPTS=2", "DISK_RESERVE_MB=0",
            "CLOCK_CHECK=floor", "DEVICE_SERIAL=TEST-RST-1", "",
        ]))
        self.starts = 0
        self.s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        self.bucket = bucket

    def start(self) -> subprocess.Popen[str]:
        """Start `device-agent run` and wait for its READY=1."""
        self.starts += 1
        sock_path = str(self.tmp / f"notify{self.starts}.sock")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(sock_path)
        sock.settimeout(0.2)
        env = {**os.environ, "NOTIFY_SOCKET": sock_path}
        env.pop("WATCHDOG_USEC", None)
        err = (self.tmp / f"run{self.starts}.err").open("w")
        proc = subprocess.Popen(
            [sys.executable, "-m", "device_agent", "--env-file", str(self.env_file), "run"],
            env=env, cwd=self.tmp, stdout=subprocess.DEVNULL, stderr=err, text=True)
        err.close()

        def ready() -> bool:
            try:
                return sock.recv(4096).startswith(b"READY=1")
            except (TimeoutError, BlockingIOError):
                assert proc.poll() is None, self.log(self.starts)
                return False

        try:
            wait_until(ready, timeout=30, what="READY=1 from the service")
        finally:
            sock.close()
        return proc

    def log(self, n: int) -> str:
        return (self.tmp / f"run{n}.err").read_text(errors="replace")

    def objects(self) -> list[str]:
        return sorted(o["Key"] for o in
                      self.s3.list_objects_v2(Bucket=self.bucket).get("Contents", []))

    def request(self, seconds: float) -> Request:
        """A capture request as `device-agent capture` drops it (Spool.submit's bytes)."""
        spool = Spool(self.state)  # the service made its folders
        request = Request(id=f"{time.time_ns()}-{os.getpid()}-test", seconds=seconds,
                          patient=PATIENT, no_upload=False, deadline=time.time() + 120)
        atomic_write(spool.new / f"{request.id}.json", request.to_json())
        return request


def _delivered(state: Path) -> bool:
    """Every item in the outbox delivered (the one package and its manifest)."""
    box = Outbox(state / DB_NAME)
    try:
        items = [i for row in box.packages.recent() for i in box.items.of_package(row.folder)]
        return bool(items) and all(i.state == DELIVERED for i in items)
    finally:
        box.close()


def _kill(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=10) == -signal.SIGKILL


def _shows_no_patient(answer: dict) -> None:
    text = json.dumps(answer)
    for part in IDENTITY:
        assert part not in text, f"the answer shows the patient: {text}"


@pytest.fixture
def board(tmp_path: Path, ecg_data_dir: Path):
    from device_agent.lab.simulator import BoardSimulator

    sim = BoardSimulator(ecg_data_dir / "HR06000", tmp_path / "ttyBOARD", counts_per_mv=400,
                         speed=1.0, loop=True)
    sim.start()
    yield sim
    sim.stop()


@pytest.mark.functional
def test_restart_after_the_package_was_uploaded_answers_kept_with_its_record(
        tmp_path: Path, board, s3_endpoint: str, s3_bucket: str) -> None:
    unit = Unit(tmp_path, s3_endpoint, s3_bucket)
    service = unit.start()
    spool = Spool(unit.state)
    try:
        # the answer cannot be written: the capture completes, its result never reaches done/
        spool.done.rename(unit.state / "spool" / "done.away")
        spool.done.write_bytes(b"")
        request = unit.request(seconds=2.0)
        keys = wait_until(lambda: len(unit.objects()) == 5 and unit.objects(), timeout=60,
                          what="the capture's package uploaded")
        # and the outbox has recorded it (S3 can hold the last file a moment before the
        # service settles it; a kill in between is answered 'queued', rightly)
        wait_until(lambda: _delivered(unit.state), timeout=30,
                   what="the outbox recording the package delivered")
        assert (spool.cur / f"{request.id}.json").exists(), "still claimed, never answered"
        assert "cannot write the result" in unit.log(1)
        _kill(service)
    finally:
        if service.poll() is None:
            service.kill()
            service.wait(timeout=10)
    spool.done.unlink()
    (unit.state / "spool" / "done.away").rename(spool.done)

    service = unit.start()
    try:
        answer = spool.wait(request, timeout_s=30)
        stamp = keys[0].split("/")[4]
        _shows_no_patient(answer)
        assert answer["ok"] is True and answer["exit_code"] == 0, answer
        assert answer["record_id"] == record_id_for(request.id)
        assert answer["stamp"] == stamp and answer["state"] == "delivered"
        assert f"kept as record {answer['record_id']} ({stamp})" in answer["warnings"][0]
        assert "capture again" not in json.dumps(answer)
        manifest = json.loads(unit.s3.get_object(
            Bucket=s3_bucket, Key=next(k for k in keys if "/manifest_" in k))["Body"].read())
        assert manifest["record_id"] == answer["record_id"]
        assert unit.objects() == keys, "one package in S3, nothing captured twice"
        assert len(list((unit.state / "records").glob("*/manifest_*.json"))) == 1
        assert "was kept: record" in unit.log(2)
    finally:
        service.send_signal(signal.SIGTERM)
        assert service.wait(timeout=15) == 0, unit.log(2)


@pytest.mark.functional
def test_restart_while_the_board_is_read_answers_capture_again(
        tmp_path: Path, board, s3_endpoint: str, s3_bucket: str) -> None:
    unit = Unit(tmp_path, s3_endpoint, s3_bucket)
    service = unit.start()
    spool = Spool(unit.state)
    try:
        request = unit.request(seconds=60.0)  # a minute of signal: killed long before the end
        wait_until(lambda: (spool.cur / f"{request.id}.json").exists(), timeout=15,
                   what="the request claimed")
        _kill(service)
    finally:
        if service.poll() is None:
            service.kill()
            service.wait(timeout=10)
    assert not list((unit.state / "records").glob("*/manifest_*.json"))
    service = unit.start()
    try:
        answer = spool.wait(request, timeout_s=30)
        assert answer == {"ok": False, "exit_code": 1, "error": NOTHING_KEPT}
        assert "capture again" in answer["error"]
        assert unit.objects() == []
    finally:
        service.send_signal(signal.SIGTERM)
        assert service.wait(timeout=15) == 0, unit.log(2)
