"""The service: READY/WATCHDOG/STATUS on a real socket, status with it up/down/unplugged,
captures handed over through the spool, and (functional) the whole thing end to end."""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from device_agent.capture import find_capture, kept_answer
from device_agent.commands.capture import via_service
from device_agent.core.clock import Clock
from device_agent.core.config import load_settings
from device_agent.core.errors import AgentError
from device_agent.link.framing import FrameDecoder, Frames
from device_agent.link.port import LinkState
from device_agent.ops.notify import Notifier
from device_agent.ops.spool import ServiceLock, Spool, running_pid
from device_agent.ops.status import collect_status
from device_agent.service import PackageCapture, Service
from device_agent.shipping.outbox import Outbox
from device_agent.sync import ConditionLog, PassResult
from tests.conftest import wait_until
from tests.helpers import present

REPO = Path(__file__).resolve().parents[2]


class FakeReader:
    """The board link's shape (service.Reader): connected or not, and no frames ever."""

    url = "fake://board"

    def __init__(self, connected: bool) -> None:
        self.connected = connected
        self.last_byte_at = time.monotonic() if connected else None
        self.frames_decoded = 1234
        self.last_error = None if connected else "No such file or directory"
        self.decoder = FrameDecoder(byte_order="high-first", sampling_rate=500)
        self.started = self.stopped = False

    def start(self, *, fail_fast: bool = False) -> FakeReader:
        self.started = True
        return self

    def stop(self, timeout: float = 2.0) -> None:
        self.stopped = True

    def get(self, timeout: float) -> Frames | None:
        return None

    def clear(self) -> int:
        return 0

    @property
    def state(self) -> LinkState:
        return LinkState(self.url, self.connected, self.last_byte_at, 0, self.frames_decoded,
                         0, 0, 0, self.last_error)


class FakeSync:
    """The sync loop's shape (sync.SyncLoop): passes, and whether it is wedged."""

    def __init__(self, stop: threading.Event) -> None:
        self.stop = stop
        self.passes = 0
        self.wedged: str | None = None
        self.closed = False
        self.conditions = ConditionLog()

    def run(self, *, on_pass) -> None:
        while not self.stop.is_set():
            result = self.run_once()
            on_pass(result, list(result.errors))
            self.stop.wait(0.1)

    def run_once(self, *, wait: bool = True) -> PassResult:
        self.passes += 1
        return PassResult()

    def stuck(self, now: float | None = None) -> str | None:
        return self.wedged

    def close(self) -> None:
        self.closed = True


class FakeClock(Clock):
    def __init__(self) -> None:
        super().__init__(check="floor")


def _settings(tmp_path: Path, **env: str):
    base = {"STATE_DIR": str(tmp_path / "state"), "ECG_SERIAL_PORT": str(tmp_path / "ttyX"),
            "CLOUD_UPLOAD_ENABLED": "false", "SYNC_INTERVAL_S": "0.1", "DISK_RESERVE_MB": "0",
            "ECG_CAPTURE_SECONDS": "1"}
    base.update(env)
    return load_settings(env_file=None, environ={}, overrides=base)


class Harness:
    """A Service on fakes, running on a thread, notifying a real datagram socket."""

    def __init__(self, tmp_path: Path, *, connected: bool, capture=None) -> None:
        self.settings = _settings(tmp_path)
        self.sock_path = str(tmp_path / "notify.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.sock_path)
        self.sock.setblocking(False)
        self.messages: list[str] = []
        self.stop = threading.Event()
        self.reader = FakeReader(connected)
        self.sync = FakeSync(self.stop)
        self.notifier = Notifier(self.sock_path, watchdog_s=0.05)
        self.lock = ServiceLock(self.settings.state_dir).acquire()
        self.outbox = Outbox.open(self.settings)
        self.service = Service(self.settings, reader=self.reader, sync_loop=self.sync,
                               outbox=self.outbox,
                               capture=capture or (lambda r: {"ok": True, "folder": "/f"}),
                               kept=self._kept,
                               notifier=self.notifier, stop=self.stop, clock=FakeClock())
        self.exit_code: int | None = None
        self.thread = threading.Thread(target=self._run, name="service-under-test")

    def _run(self) -> None:
        self.exit_code = self.service.run()

    def _kept(self, record_id: str) -> dict[str, Any] | None:
        found = find_capture(self.settings, self.outbox, record_id)
        return None if found is None else kept_answer(found)

    def __enter__(self) -> Harness:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(timeout=5)
        self.lock.release()
        self.outbox.close()
        self.notifier.close()
        self.received()
        self.sock.close()

    def received(self) -> list[str]:
        while self.sock.fileno() != -1:
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except BlockingIOError:
                break
        return self.messages


def test_ready_watchdog_status_in_order_and_stop(tmp_path: Path, monkeypatch):
    monkeypatch.setattr("device_agent.service.PUBLISH_EVERY_S", 0.1)
    with Harness(tmp_path, connected=True) as h:
        wait_until(lambda: sum(m == "WATCHDOG=1" for m in h.received()) >= 3, timeout=10,
                   what="three watchdog pings")
        h.reader.frames_decoded = 99999  # not in STATUS; the queue depth is
        box = Path(h.settings.state_dir) / "spool"
        assert box.is_dir()
        h.stop.set()
        h.thread.join(timeout=5)
        assert not h.thread.is_alive()
    msgs = h.received()
    assert msgs[0].startswith("READY=1\nSTATUS=board connected; queue 0 pending")
    assert msgs[-1] == "STOPPING=1"
    assert set(msgs[1:-1]) <= {"WATCHDOG=1"} | {m for m in msgs if m.startswith("STATUS=")}
    assert h.exit_code == 0 and h.reader.started and h.reader.stopped and h.sync.closed
    assert h.sync.passes >= 1


def test_status_update_follows_a_capture(tmp_path: Path, monkeypatch):
    monkeypatch.setattr("device_agent.service.PUBLISH_EVERY_S", 0.1)
    result = {"ok": True, "folder": "/r/20261127_101010", "verdict": "ok",
              "record_id": "rec-1", "queued": True}
    with Harness(tmp_path, connected=True, capture=lambda r: result) as h:
        wait_until(lambda: h.received(), what="READY")
        spool = Spool(h.settings.state_dir)
        req = spool.submit(seconds=1, patient=None, no_upload=False, timeout_s=10)
        assert spool.wait(req, timeout_s=10) == result
        wait_until(lambda: any("last capture" in m and " ok;" in m for m in h.received()),
                   what="a STATUS line with the capture")
        s = collect_status(h.settings, clock=FakeClock())
    cap = s["last_capture"]
    assert cap is not None and cap["record_id"] == "rec-1" and cap["verdict"] == "ok"


def test_status_json_with_service_up(tmp_path: Path):
    with Harness(tmp_path, connected=True) as h:
        wait_until(lambda: h.received(), what="READY")
        s = collect_status(h.settings, clock=FakeClock())
        assert s["service"]["running"] and s["service"]["pid"] == os.getpid()
        assert s["service"]["state"] == "running"
        assert s["port"]["connected"] is True and s["port"]["frames_flowing"] is True
        assert s["port"]["frames"] == 1234
        json.dumps(s)  # valid JSON all the way down
    s = collect_status(h.settings, clock=FakeClock())
    assert s["service"]["running"] is False and s["service"]["state"] == "stopped"


def test_port_unplugged_at_boot_ready_anyway_and_status_says_so(tmp_path: Path, monkeypatch):
    monkeypatch.setattr("device_agent.service.READY_GRACE_S", 0.3)
    with Harness(tmp_path, connected=False,
                 capture=lambda r: pytest.fail("captured without a board")) as h:
        wait_until(lambda: h.received(), what="READY")
        assert h.received()[0].startswith(
            f"READY=1\nSTATUS=waiting for board on {h.settings.serial_port}")
        s = collect_status(h.settings, clock=FakeClock())
        assert s["service"]["running"] is True
        assert s["port"]["present"] is False and s["port"]["connected"] is False
        assert s["port"]["frames_flowing"] is False
        assert "No such file" in present(s["port"]["error"])
        assert h.thread.is_alive(), "an absent board must not stop the service"


def _status_cli(settings, capsys, reserve_mb: int = 0) -> tuple[int, str]:
    from device_agent.commands import main

    flags = {"STATE_DIR": settings.state_dir, "ECG_SERIAL_PORT": settings.serial_port,
             "CLOUD_UPLOAD_ENABLED": "false", "DISK_RESERVE_MB": reserve_mb,
             "CLOCK_CHECK": "floor"}
    capsys.readouterr()
    rc = main([arg for k, v in flags.items() for arg in ("--set", f"{k}={v}")] + ["status"])
    return rc, capsys.readouterr().out


@pytest.mark.parametrize("condition", ["healthy", "uploads paused", "board absent",
                                       "clock not synchronised",
                                       "disk under DISK_RESERVE_MB"])
def test_status_exit_code_says_which_part_is_unavailable(tmp_path: Path, capsys, condition):
    """README's table: 0 healthy, 3 when the running service lacks an external part (uploads
    paused by a wrong secret or an endpoint down, no board, no clock), 1 when it is down."""
    h = Harness(tmp_path, connected=condition != "board absent")
    if condition != "board absent":
        Path(h.settings.serial_port).touch()  # the device node is there
    if condition == "clock not synchronised":  # the service's own view of the clock wins
        h.service.clock = Clock(check="ntp", kernel=lambda: False, timesyncd=lambda: False)
    if condition == "uploads paused":  # what the drainer records on a 403 or a dead endpoint
        h.outbox.pause.hold(time.time() + 600, "s3://b/ecg-reports/x: AccessDenied (HTTP 403): "
                                               "check the keys")
    with h:
        wait_until(lambda: h.received(), what="READY")
        rc, out = _status_cli(h.settings, capsys,
                              reserve_mb=1_000_000 if condition.startswith("disk") else 0)
    if condition == "healthy":
        assert rc == 0, out
        assert "unavailable" not in out
    else:
        assert rc == 3, out
        assert out.splitlines()[-1].startswith(f"unavailable  {condition.upper()}"), out
    rc, out = _status_cli(h.settings, capsys)  # the service has stopped: that comes first
    assert rc == 1 and out.startswith("service      STOPPED"), out


def test_capture_without_board_is_answered_clearly(tmp_path: Path):
    from device_agent.ops.spool import Request

    settings = _settings(tmp_path)
    with Outbox.open(settings) as outbox:
        cap = PackageCapture(settings, FakeReader(False), outbox, FakeClock())
        out = cap(Request(id="x", seconds=1, patient=None, no_upload=True,
                          deadline=time.time() + 9))
    assert out["ok"] is False and out["exit_code"] == 3
    assert "not connected" in out["error"] and "USB cable" in out["error"]


def test_capture_refused_under_the_disk_reserve(tmp_path: Path):
    from device_agent.core.errors import DiskSpaceError
    from device_agent.ops.spool import Request

    settings = _settings(tmp_path, DISK_RESERVE_MB="999999")
    with Outbox.open(settings) as outbox, pytest.raises(DiskSpaceError, match="DISK_RESERVE_MB"):
        PackageCapture(settings, FakeReader(True), outbox, FakeClock())(
            Request(id="x", seconds=1, patient=None, no_upload=True, deadline=time.time() + 9))


def test_capture_via_service_prints_folder_and_maps_errors(tmp_path: Path, capsys):
    failing = {"ok": False, "exit_code": 3, "error": "the board is not connected on /dev/x"}
    with Harness(tmp_path, connected=True, capture=lambda r: failing) as h:
        wait_until(lambda: h.received(), what="READY")
        args = argparse.Namespace(out=None, no_upload=True)
        with pytest.raises(AgentError, match="not connected") as info:
            via_service(h.settings, args, None)
        assert info.value.exit_code == 3
    assert via_service(h.settings, argparse.Namespace(out=None, no_upload=False), None) is None, \
        "no service: the caller captures itself"


def test_a_wedged_sync_stops_the_watchdog_and_status_says_why(tmp_path: Path, monkeypatch):
    monkeypatch.setattr("device_agent.service.PUBLISH_EVERY_S", 0.1)
    with Harness(tmp_path, connected=True) as h:
        wait_until(lambda: h.received().count("WATCHDOG=1") >= 2, what="watchdog pings")
        h.sync.wedged = "the upload of manifest_x.json has run 400 s, past its 250 s limit"
        wait_until(lambda: any(m.startswith("STATUS=WEDGED") for m in h.received()),
                   what="a WEDGED status line")
        seen = len(h.received())
        wait_until(lambda: collect_status(h.settings)["service"]["state"] == "wedged",
                   what="status to say wedged")
        pings_after = [m for m in h.received()[seen:] if m == "WATCHDOG=1"]
        assert pings_after == [], "a wedged loop must not feed the watchdog"
        s = collect_status(h.settings)
        assert s["service"]["healthy"] is False and "past its" in present(s["service"]["stuck"])
        h.sync.wedged = None
        wait_until(lambda: "WATCHDOG=1" in h.received()[seen:], what="pings again")


def test_second_service_refused(tmp_path: Path):
    settings = _settings(tmp_path)
    with ServiceLock(settings.state_dir):
        from device_agent.commands import main

        env = tmp_path / ".env"
        env.write_text(f"STATE_DIR={settings.state_dir}\nCLOUD_UPLOAD_ENABLED=false\n")
        assert main(["--env-file", str(env), "run"]) == 4


# --- end to end: the real service in a subprocess, a simulated board, moto's S3 ----------

@pytest.mark.functional
def test_capture_while_run_is_active_goes_through_the_service(
        tmp_path: Path, ecg_data_dir: Path, s3_endpoint: str, s3_bucket: str):
    import boto3

    from device_agent.lab.simulator import BoardSimulator

    link = tmp_path / "ttyBOARD"
    state = tmp_path / "state"
    env_file = tmp_path / "agent.env"
    env_file.write_text("\n".join([
        f"STATE_DIR={state}", f"REPORTS_DIR={tmp_path / 'reports'}",
        f"USERS_FILE={tmp_path / 'users.json'}", f"ECG_SERIAL_PORT={link}",
        "ECG_COUNTS_PER_MV=400", "ECG_CAPTURE_SECONDS=2", "SYNC_INTERVAL_S=0.5",
        f"AWS_S3_BUCKET={s3_bucket}", "AWS_S3_REGION=us-east-1",
        f"AWS_ENDPOINT_URL_S3={s3_endpoint}", "S3_MAX_ATTEMPTS=2", "DISK_RESERVE_MB=0",
        "CLOCK_CHECK=floor", "DEVICE_SERIAL=TEST-0001", "",
    ]))
    sock_path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(sock_path)
    sock.settimeout(0.2)
    messages: list[str] = []

    def drain() -> list[str]:
        while True:
            try:
                messages.append(sock.recv(4096).decode())
            except (TimeoutError, BlockingIOError):
                return messages

    sim = BoardSimulator(ecg_data_dir / "HR06000", link, counts_per_mv=400, speed=1.0,
                         loop=True)
    sim.start()
    env = {**os.environ, "NOTIFY_SOCKET": sock_path, "WATCHDOG_USEC": "1000000"}
    env.pop("WATCHDOG_PID", None)
    cli = [sys.executable, "-m", "device_agent", "--env-file", str(env_file)]
    service = subprocess.Popen([*cli, "run"], env=env, cwd=tmp_path,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert service.stdout is not None and service.stderr is not None
    try:
        wait_until(lambda: any(m.startswith("READY=1") for m in drain()), timeout=30,
                   what="READY=1 from the service")
        assert "board connected" in next(m for m in messages if m.startswith("READY=1"))
        wait_until(lambda: drain().count("WATCHDOG=1") >= 2, timeout=10, what="watchdog pings")
        assert running_pid(state) == service.pid

        proc = subprocess.run([*cli, "capture"], env=os.environ, cwd=tmp_path,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert "handing the capture" in proc.stderr
        folder = Path(proc.stdout.strip().splitlines()[-1])
        assert folder.parent == state / "records" and folder.is_dir()
        stamp = folder.name
        assert (folder / f"ecg_data_{stamp}.json").is_file()

        s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")

        def delivered():
            keys = [o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket).get("Contents", [])]
            return [k for k in keys if stamp in k]

        keys = wait_until(lambda: len(delivered()) == 5 and delivered(), timeout=30,
                          what="the package in the bucket")
        assert any(k.endswith(f"ECG_Report_{stamp}.pdf") for k in keys)

        status = subprocess.run([*cli, "status", "--json"], cwd=tmp_path, capture_output=True,
                                text=True, timeout=30)
        doc = json.loads(status.stdout)
        assert status.returncode == 0 and doc["service"]["state"] == "running"
        assert doc["port"]["frames_flowing"] is True
        assert doc["last_capture"]["folder"] == str(folder)
        assert doc["outbox"]["pending"] == 0 and doc["outbox"]["delivered"] == 5
        assert any("last capture" in m and "ok" in m for m in drain() if m.startswith("STATUS="))

        service.send_signal(signal.SIGTERM)
        assert service.wait(timeout=10) == 0, service.stderr.read()
        assert drain()[-1] == "STOPPING=1"
    finally:
        if service.poll() is None:
            service.kill()
            service.wait(timeout=10)
        for stream in (service.stdout, service.stderr):
            stream.close()
        sim.stop()
        sock.close()
    assert running_pid(state) is None
