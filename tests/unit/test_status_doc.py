"""status.json has one schema (ops/status.StatusDoc): the service writes it, and status,
doctor and the command layer read it through read_status_file, which gives what an old or
half-written file lacks (or holds in a type the service never writes) as None."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from device_agent.core.clock import ClockState
from device_agent.core.config import Settings, load_settings
from device_agent.ops.doctor import check_clock
from device_agent.ops.spool import ServiceLock
from device_agent.ops.status import (
    STATUS_NAME,
    CaptureDoc,
    ClockDoc,
    PortDoc,
    StatusDoc,
    SyncDoc,
    collect_status,
    empty_status,
    read_status_file,
    status_doc,
    write_status_file,
)


class SyncedClock:
    def state(self) -> ClockState:  # a ClockView, as this command sees the clock
        return ClockState(synced=True, reason="this command's view", now="2026-01-01")


def _settings(tmp_path: Path) -> Settings:
    return load_settings(env_file=None, environ={}, overrides={
        "STATE_DIR": str(tmp_path / "state"), "ECG_SERIAL_PORT": str(tmp_path / "ttyX"),
        "CLOUD_UPLOAD_ENABLED": "false", "DISK_RESERVE_MB": "0"})


def _full(updated_at: float) -> StatusDoc:
    return StatusDoc(
        version="0.1.0", pid=os.getpid(), phase="running", started_at="2026-01-01T10:00:00",
        updated_at=updated_at, status="board connected; queue 0 pending/0 failed",
        port=PortDoc(path="/dev/ttyUSB0", connected=True, last_byte_age_s=0.05,
                     frames=1234, reconnects=2, error=None),
        last_capture=CaptureDoc(at="2026-01-01T10:01:00", request="r1", verdict="ok",
                                record_id="rec-1", folder="/r/x", disposition="queued",
                                error=None),
        last_sync=SyncDoc(at="2026-01-01T10:02:00", summary="delivered 5", paused=None,
                          errors=["one"]),
        clock=ClockDoc(synced=False, reason="the service's view"), held=1, stuck=None,
        credentials={"source": "static keys (AWS_ACCESS_KEY_ID)", "expires_at": None})


def test_a_file_the_service_writes_reads_back_unchanged(tmp_path: Path):
    doc = _full(time.time())
    write_status_file(tmp_path, doc)
    raw = json.loads((tmp_path / STATUS_NAME).read_bytes())
    assert raw == doc, "the file holds the schema, key for key"
    assert read_status_file(tmp_path) == raw


def test_what_an_old_or_half_written_file_lacks_is_none(tmp_path: Path):
    doc = status_doc({"updated_at": 12, "port": {"connected": True}, "clock": {},
                      "last_capture": {"at": "t", "verdict": 3}, "stuck": ["not", "text"]})
    assert doc["updated_at"] == 12 and doc["phase"] is None and doc["stuck"] is None
    assert doc["port"] == PortDoc(path=None, connected=True, last_byte_age_s=None,
                                  frames=None, reconnects=None, error=None)
    assert doc["clock"] is None, "an empty clock is no view of the clock"
    assert doc["last_capture"] == {"at": "t", "verdict": None}, "no key is added"
    assert status_doc({"port": {"connected": "yes"}})["port"]["connected"] is False
    assert status_doc({"updated_at": True})["updated_at"] is None
    assert empty_status() == status_doc({})
    (tmp_path / STATUS_NAME).write_text("[1, 2]")
    assert read_status_file(tmp_path) is None
    (tmp_path / STATUS_NAME).write_text('{"updated_at": ')  # cut short by a crash
    assert read_status_file(tmp_path) is None


def test_status_and_doctor_read_the_services_view_through_the_schema(tmp_path: Path):
    settings = _settings(tmp_path)
    with ServiceLock(settings.state_dir):
        write_status_file(settings.state_dir, _full(time.time()))
        s = collect_status(settings, clock=SyncedClock())
        (clock,) = [c for c in check_clock(settings, SyncedClock()) if c.name == "clock"]
    assert s["service"]["state"] == "running" and s["service"]["healthy"]
    assert (s["port"]["connected"], s["port"]["frames"], s["port"]["reconnects"]) == (
        True, 1234, 2)
    assert s["clock"] == {"synced": False, "reason": "the service's view"}
    assert s["clock_source"] == "service"
    assert s["last_capture"] is not None and s["last_capture"]["record_id"] == "rec-1"
    assert not clock.ok and "as the service sees it (the service's view)" in clock.message


def test_a_file_with_no_update_time_is_a_service_starting(tmp_path: Path):
    settings = _settings(tmp_path)
    with ServiceLock(settings.state_dir):
        (Path(settings.state_dir) / STATUS_NAME).write_text(json.dumps(
            {"updated_at": "soon", "phase": "running", "clock": {"synced": False}}))
        s = collect_status(settings, clock=SyncedClock())
        (clock,) = [c for c in check_clock(settings, SyncedClock()) if c.name == "clock"]
    assert s["service"]["state"] == "starting" and not s["service"]["healthy"]
    assert s["clock_source"] == "this command" and s["clock"]["synced"] is True
    assert clock.ok and "as this command sees it" in clock.message
