"""What the unit is doing, for `status`: from files the service writes, read in a second.

`status` imports nothing heavy (no boto3, numpy, reportlab or serial): it reads the service
lock, STATE_DIR/status.json (written by the running service every few seconds), the outbox
SQLite read-only (through outbox.read_only_stats, the same query the service uses), the
records held for the clock, the clock and the disk. The service is "hung" when its status
file is older than STALE_AFTER_S or it reports itself wedged; `status` then exits non-zero.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol, TypedDict

from device_agent.core.clock import clock_from_settings, held_count, undated_count
from device_agent.core.config import Settings
from device_agent.core.errors import UploadError
from device_agent.core.fsutil import atomic_write, existing_ancestor, free_mb
from device_agent.ops.spool import running_pid
from device_agent.shipping.credentials import certificate_der, parse_certificate
from device_agent.shipping.deadline import Deadlines
from device_agent.shipping.outbox import DB_NAME, read_only_stats

STATUS_NAME = "status.json"
# The service rewrites status.json every few seconds; older than this means it is hung.
STALE_AFTER_S = 30.0


# --- status.json: the one schema the service writes and status, doctor and the command
# layer read. Every key a reader may miss (an old file, one a crash cut short) is None there.

class PortDoc(TypedDict):
    """The board link as the service saw it."""

    path: str | None
    connected: bool
    last_byte_age_s: float | None
    frames: int | None
    reconnects: int | None
    error: str | None


class CaptureDoc(TypedDict, total=False):
    """The last capture the service served (each key the service writes, value or null)."""

    at: str | None
    request: str | None
    verdict: str | None
    record_id: str | None
    folder: str | None
    disposition: str | None
    error: str | None


class SyncDoc(TypedDict, total=False):
    """How the service's last sync pass went."""

    at: str | None
    summary: str | None
    paused: str | None
    errors: list[str]


class ClockDoc(TypedDict):
    """Whether the wall clock may name records, and the evidence (clock.py)."""

    synced: bool | None
    reason: str | None


class StatusDoc(TypedDict):
    """STATE_DIR/status.json."""

    version: str | None
    pid: int | None
    phase: str | None
    started_at: str | None
    updated_at: float | None  # epoch; None: the service has not published yet
    status: str | None  # the STATUS= line
    port: PortDoc
    last_capture: CaptureDoc | None
    last_sync: SyncDoc | None
    clock: ClockDoc | None  # as the service sees it, inside its sandbox
    held: int | None
    stuck: str | None
    credentials: dict[str, str | None] | None


def write_status_file(state_dir: Path, doc: StatusDoc) -> None:
    """Atomically replace STATE_DIR/status.json (the service calls this)."""
    atomic_write(Path(state_dir) / STATUS_NAME, json.dumps(doc, indent=1).encode())


def read_status_file(state_dir: Path) -> StatusDoc | None:
    """The last status.json the service wrote, or None (never written, or unreadable)."""
    try:
        doc = json.loads((Path(state_dir) / STATUS_NAME).read_bytes())
    except (OSError, ValueError):
        return None
    return status_doc(doc) if isinstance(doc, dict) else None


def status_doc(raw: Mapping[str, object]) -> StatusDoc:
    """A decoded status.json as the schema says: what it lacks, or holds in a type the
    service never writes, is None (a port not known connected is not connected)."""
    port = _mapping(raw.get("port"))
    clock = raw.get("clock")
    last_capture, last_sync = raw.get("last_capture"), raw.get("last_sync")
    credentials = raw.get("credentials")
    return StatusDoc(
        version=_str(raw.get("version")), pid=_int(raw.get("pid")),
        phase=_str(raw.get("phase")), started_at=_str(raw.get("started_at")),
        updated_at=_float(raw.get("updated_at")), status=_str(raw.get("status")),
        port=PortDoc(path=_str(port.get("path")), connected=port.get("connected") is True,
                     last_byte_age_s=_float(port.get("last_byte_age_s")),
                     frames=_int(port.get("frames")), reconnects=_int(port.get("reconnects")),
                     error=_str(port.get("error"))),
        last_capture=_capture(last_capture) if isinstance(last_capture, Mapping) else None,
        last_sync=_sync(last_sync) if isinstance(last_sync, Mapping) else None,
        clock=ClockDoc(synced=_bool(clock.get("synced")), reason=_str(clock.get("reason")))
        if isinstance(clock, Mapping) and clock else None,
        held=_int(raw.get("held")), stuck=_str(raw.get("stuck")),
        credentials={k: v for k, v in credentials.items()
                     if isinstance(k, str) and (v is None or isinstance(v, str))}
        if isinstance(credentials, Mapping) else None,
    )


def empty_status() -> StatusDoc:
    """The status of a service that never wrote one."""
    return status_doc({})


def _capture(raw: Mapping[str, object]) -> CaptureDoc:
    doc = CaptureDoc()
    for key in ("at", "request", "verdict", "record_id", "folder", "disposition", "error"):
        if key in raw:  # the keys the service wrote, none added: `status --json` shows them
            doc[key] = _str(raw[key])
    return doc


def _sync(raw: Mapping[str, object]) -> SyncDoc:
    doc = SyncDoc()
    for key in ("at", "summary", "paused"):
        if key in raw:
            doc[key] = _str(raw[key])
    if "errors" in raw:
        errors = raw["errors"]
        doc["errors"] = [str(e) for e in errors] if isinstance(errors, list) else []
    return doc


def _mapping(value: object) -> Mapping[str, object]:
    return value if isinstance(value, Mapping) else {}


def _str(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _bool(value: object) -> bool | None:
    return value if isinstance(value, bool) else None


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _float(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return value


# --- what `status` shows (collect_status; `status --json` prints it as is) ---------------

class ServiceReport(TypedDict):
    running: bool
    healthy: bool
    pid: int | None
    state: str  # stopped, starting, hung, wedged, or the phase the service reports
    status_age_s: float | None
    started_at: str | None
    status: str | None
    stuck: str | None


class PortReport(TypedDict):
    path: str
    present: bool | None  # None: a URL, no file to look for
    connected: bool | None  # None: not read (the service is not running)
    frames_flowing: bool | None
    frames: int | None
    reconnects: int | None
    last_byte_age_s: float | None
    error: str | None


class DiskReport(TypedDict):
    path: str
    free_mb: int
    reserve_mb: int
    ok: bool


class StatusReport(TypedDict):
    service: ServiceReport
    port: PortReport
    last_capture: CaptureDoc | None  # status.json's, as the service wrote it
    held: int
    undated: int
    outbox: dict[str, Any]
    last_sync: SyncDoc | None
    clock: ClockDoc
    clock_source: str  # "service" (its view, inside its sandbox) or "this command"
    disk: DiskReport
    credentials: dict[str, Any]
    deadlines: dict[str, float | int]
    device_serial: str
    checked_at: str | None


class ClockReading(Protocol):
    @property
    def synced(self) -> bool: ...

    @property
    def reason(self) -> str: ...


class ClockView(Protocol):
    """What status and doctor ask of a clock (clock.Clock)."""

    def state(self) -> ClockReading: ...


def iso(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    return datetime.fromtimestamp(epoch).astimezone().isoformat(timespec="seconds")


def port_present(port: str) -> bool | None:
    """Whether a device path exists; None for URLs (loop://, socket://) that have no file."""
    if "://" in port:
        return None
    return os.path.exists(port)


def disk_summary(path: Path, reserve_mb: int) -> DiskReport:
    """Free space where STATE_DIR lives, against the configured reserve."""
    probe = existing_ancestor(path)
    free = int(free_mb(probe))
    return DiskReport(path=str(probe), free_mb=free, reserve_mb=reserve_mb,
                      ok=free >= reserve_mb)


def clock_summary(clock: ClockView) -> ClockDoc:
    """Whether the wall clock may name records, and the evidence (clock.py)."""
    try:
        state = clock.state()
    except OSError as exc:
        return ClockDoc(synced=None, reason=f"cannot tell: {exc}")
    return ClockDoc(synced=bool(state.synced), reason=state.reason)


def outbox_summary(state_dir: Path, *, now: float) -> dict[str, Any]:
    """The outbox's numbers for status, read-only."""
    try:
        stats = read_only_stats(Path(state_dir), now=now)
    except Exception as exc:  # a damaged database is reported, never a traceback
        return {"present": True, "error": f"cannot read {Path(state_dir) / DB_NAME}: {exc}"}
    if stats is None:
        return {"present": False, "pending": 0, "failed": 0, "delivered": 0, "withheld": 0,
                "rejected": 0, "problems": 0, "oldest_pending_age_s": None,
                "last_upload_at": None, "last_error": None, "paused_until": None,
                "pause_reason": None, "last_package_stamp": None,
                "last_package_disposition": None, "last_package_at": None}
    doc = asdict(stats)
    doc["present"] = True
    doc["last_upload_at"] = iso(doc.pop("last_delivered_at"))
    doc["paused_until"] = iso(doc["paused_until"])
    doc["last_package_at"] = iso(doc["last_package_at"])
    if doc["oldest_pending_age_s"] is not None:
        doc["oldest_pending_age_s"] = round(doc["oldest_pending_age_s"], 1)
    return doc


def credentials_summary(settings: Settings, live: Mapping[str, str | None] | None
                        ) -> dict[str, Any]:
    """Where S3 credentials come from and when they expire (never the secrets)."""
    if not settings.cloud_upload_enabled:
        return {"source": "upload disabled", "expires_at": None, "certificate_expires": None}
    if settings.iot_endpoint:
        source = f"AWS IoT certificate (thing {settings.thing_name})"
    elif settings.aws_access_key_id:
        source = "static keys (AWS_ACCESS_KEY_ID)"
    elif settings.aws_profile:
        source = f"profile {settings.aws_profile}"
    else:
        source = "boto3 default chain"
    summary: dict[str, Any] = {"source": source, "expires_at": (live or {}).get("expires_at"),
                               "certificate_expires": None}
    if settings.iot_cert_file:
        try:
            der = certificate_der(str(settings.iot_cert_file))
            summary["certificate_expires"] = parse_certificate(der)[1].isoformat()
        except (UploadError, ValueError) as exc:
            summary["certificate_error"] = str(exc)
    return summary


def service_state(pid: int | None, doc: StatusDoc, now: float) -> tuple[str, bool]:
    """(state, healthy): stopped, starting, hung, wedged, or the phase the service reports."""
    if pid is None:
        return "stopped", False
    if doc["updated_at"] is None:
        return "starting", False
    if now - doc["updated_at"] > STALE_AFTER_S:
        return "hung", False
    if doc["stuck"]:
        return "wedged", False
    return doc["phase"] or "running", True


def unavailable(s: StatusReport) -> list[str]:
    """The external parts a healthy service lacks (status exits 3 for any): uploads paused
    (wrong credentials, endpoint or bucket down), the board absent or not connected, the
    clock not synchronised, free disk under DISK_RESERVE_MB (captures are refused)."""
    if not s["service"]["healthy"]:
        return []  # the service itself is the problem (exit 1)
    parts = []
    box, port = s["outbox"], s["port"]
    if box.get("pause_reason"):
        parts.append("uploads paused")
    if port["present"] is False or port["connected"] is False:
        parts.append("board absent")
    if s["clock"]["synced"] is False:
        parts.append("clock not synchronised")
    if not s["disk"]["ok"]:
        parts.append("disk under DISK_RESERVE_MB")
    return parts


def collect_status(settings: Settings, *, clock: ClockView | None = None,
                   now: float | None = None) -> StatusReport:
    """Everything `status` shows, as one JSON-ready dict."""
    now = time.time() if now is None else now
    state_dir = Path(settings.state_dir)
    pid = running_pid(state_dir)
    doc = read_status_file(state_dir) or empty_status()
    state, healthy = service_state(pid, doc, now)
    fresh = healthy or state == "wedged"
    age = None if doc["updated_at"] is None else now - doc["updated_at"]
    live_port = doc["port"] if fresh else empty_status()["port"]
    last_byte_age = live_port["last_byte_age_s"]
    flowing = live_port["connected"] and (last_byte_age is not None and last_byte_age < 2.0)
    own_clock = clock_summary(clock or clock_from_settings(settings))
    service_clock = doc["clock"] if fresh else None
    return {
        "service": {
            "running": pid is not None,
            "healthy": healthy,
            "pid": pid,
            "state": state,
            "status_age_s": None if age is None else round(age, 1),
            "started_at": doc["started_at"] if pid is not None else None,
            "status": doc["status"] if fresh else None,
            "stuck": doc["stuck"] if fresh else None,
        },
        "port": {
            "path": settings.serial_port,
            "present": port_present(settings.serial_port),
            "connected": live_port["connected"] if fresh else None,
            "frames_flowing": flowing if fresh else None,
            "frames": live_port["frames"],
            "reconnects": live_port["reconnects"],
            "last_byte_age_s": last_byte_age,
            "error": live_port["error"],
        },
        "last_capture": doc["last_capture"],
        "held": held_count(state_dir),
        "undated": undated_count(state_dir),
        "outbox": outbox_summary(state_dir, now=now),
        "last_sync": doc["last_sync"],
        # inside its sandbox the service may see the clock differently: its view wins
        "clock": service_clock or own_clock,
        "clock_source": "service" if service_clock else "this command",
        "disk": disk_summary(state_dir, settings.disk_reserve_mb),
        "credentials": credentials_summary(settings, doc["credentials"] if fresh else None),
        # what the transport and the watchdog allow each request (deadline.py, one formula)
        "deadlines": Deadlines.from_settings(settings).describe(),
        "device_serial": settings.device_serial,
        "checked_at": iso(now),
    }
