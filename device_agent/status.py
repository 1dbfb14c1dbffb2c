"""Field commands: `status` (what the unit is doing, in a second), `doctor`, `queue`.

`status` imports nothing heavy (no boto3, numpy, reportlab or serial): it reads the service
lock, STATE_DIR/status.json (written by the running service), the outbox SQLite read-only,
the clock and the disk. `doctor` may import boto3 for its HEAD bucket check.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import stat
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from device_agent.cli import echo
from device_agent.fsutil import atomic_write
from device_agent.spool import running_pid

STATUS_NAME = "status.json"
# The service rewrites status.json every few seconds; older than this means it is hung.
STALE_AFTER_S = 30.0
OUTBOX_DB = "outbox.sqlite3"


# --- status.json: written by the service, read here ----------------------------------------

def write_status_file(state_dir: Path, doc: dict[str, Any]) -> None:
    """Atomically replace STATE_DIR/status.json (the service calls this)."""
    atomic_write(Path(state_dir) / STATUS_NAME, json.dumps(doc, indent=1).encode(), mode=0o640)


def read_status_file(state_dir: Path) -> dict[str, Any] | None:
    """The last status.json the service wrote, or None (never written, or unreadable)."""
    try:
        return json.loads((Path(state_dir) / STATUS_NAME).read_bytes())
    except (OSError, ValueError):
        return None


# --- the pieces of `status` ----------------------------------------------------------------

def _iso(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    return datetime.fromtimestamp(epoch).astimezone().isoformat(timespec="seconds")


def outbox_summary(state_dir: Path, *, now: float | None = None) -> dict[str, Any]:
    """Depth, oldest pending age, last upload and last error from the outbox, read-only."""
    now = time.time() if now is None else now
    path = Path(state_dir) / OUTBOX_DB
    empty = {"present": False, "pending": 0, "failed": 0, "delivered": 0,
             "oldest_pending_age_s": None, "last_upload_at": None, "last_error": None}
    if not path.exists():
        return empty
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=2.0)
    except sqlite3.Error as exc:
        return {**empty, "present": True, "error": f"cannot open {path}: {exc}"}
    try:
        counts = dict(db.execute("SELECT state, COUNT(*) FROM items GROUP BY state").fetchall())
        oldest = db.execute(
            "SELECT MIN(created_at) FROM items WHERE state = 'pending'").fetchone()[0]
        last = db.execute("SELECT MAX(delivered_at) FROM items").fetchone()[0]
        err = db.execute(
            "SELECT last_error FROM items WHERE state != 'delivered' AND last_error IS NOT NULL "
            "ORDER BY updated_at DESC LIMIT 1").fetchone()
    except sqlite3.Error as exc:
        return {**empty, "present": True, "error": f"cannot read {path}: {exc}"}
    finally:
        db.close()
    return {
        "present": True,
        "pending": counts.get("pending", 0),
        "failed": counts.get("failed", 0),
        "delivered": counts.get("delivered", 0),
        "oldest_pending_age_s": None if oldest is None else round(max(0.0, now - oldest), 1),
        "last_upload_at": _iso(last),
        "last_error": err[0] if err else None,
    }


def port_present(port: str) -> bool | None:
    """Whether a device path exists; None for URLs (loop://, socket://) that have no file."""
    if "://" in port:
        return None
    return os.path.exists(port)


def disk_summary(path: Path, reserve_mb: int) -> dict[str, Any]:
    """Free space where STATE_DIR lives, against the configured reserve."""
    probe = Path(path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    usage = shutil.disk_usage(probe)
    free_mb = usage.free // (1024 * 1024)
    return {"path": str(probe), "free_mb": int(free_mb), "reserve_mb": reserve_mb,
            "ok": free_mb >= reserve_mb}


def clock_summary(settings: Any, clock: Any = None) -> dict[str, Any]:
    """Whether the wall clock may name records, and the evidence (clock.py)."""
    if clock is None:
        from device_agent.clock import clock_from_settings

        clock = clock_from_settings(settings)
    try:
        state = clock.state()
    except OSError as exc:
        return {"synced": None, "reason": f"cannot tell: {exc}"}
    return {"synced": bool(state.synced), "reason": state.reason}


def collect_status(settings: Any, *, clock: Any = None, now: float | None = None) -> dict:
    """Everything `status` shows, as one JSON-ready dict."""
    now = time.time() if now is None else now
    state_dir = Path(settings.state_dir)
    pid = running_pid(state_dir)
    doc = read_status_file(state_dir) or {}
    age = now - doc["updated_at"] if "updated_at" in doc else None
    fresh = pid is not None and age is not None and age <= STALE_AFTER_S
    if pid is None:
        state = "stopped"
    elif not fresh:
        state = "hung" if age is not None else "starting"
    else:
        state = doc.get("phase", "running")
    live_port = doc.get("port", {}) if fresh else {}
    flowing = bool(live_port.get("connected")) and (
        live_port.get("last_byte_age_s") is not None and live_port["last_byte_age_s"] < 2.0)
    return {
        "service": {
            "running": pid is not None,
            "pid": pid,
            "state": state,
            "status_age_s": None if age is None else round(age, 1),
            "started_at": doc.get("started_at") if pid is not None else None,
            "status": doc.get("status") if fresh else None,
        },
        "port": {
            "path": settings.serial_port,
            "present": port_present(settings.serial_port),
            "connected": bool(live_port.get("connected")) if fresh else None,
            "frames_flowing": flowing if fresh else None,
            "frames": live_port.get("frames"),
            "reconnects": live_port.get("reconnects"),
            "last_byte_age_s": live_port.get("last_byte_age_s"),
            "error": live_port.get("error"),
        },
        "last_capture": doc.get("last_capture"),
        "outbox": outbox_summary(state_dir, now=now),
        "last_sync": doc.get("last_sync"),
        "clock": clock_summary(settings, clock),
        "disk": disk_summary(state_dir, settings.disk_reserve_mb),
        "device_serial": settings.device_serial,
        "checked_at": _iso(now),
    }


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}min"
    return f"{seconds / 3600:.1f}h"


def render_status(s: dict[str, Any]) -> list[str]:
    """The human view of collect_status(): one fact a line, problems first in each line."""
    svc, port, box, disk = s["service"], s["port"], s["outbox"], s["disk"]
    lines = []
    if svc["running"]:
        lines.append(f"service      {svc['state']} (pid {svc['pid']}, status "
                     f"{_age(svc['status_age_s'])} old)")
    else:
        lines.append("service      STOPPED (start: systemctl start device-agent)")
    present = {True: "present", False: "ABSENT (plug in the board's USB cable)",
               None: "url"}[port["present"]]
    if port["connected"] is None:
        link = "not read (service not running)"
    elif port["frames_flowing"]:
        link = f"frames flowing ({port['frames']} decoded, {port['reconnects']} reconnects)"
    elif port["connected"]:
        link = f"open but SILENT for {_age(port['last_byte_age_s'])} (is the board on?)"
    else:
        link = "NOT CONNECTED" + (f": {port['error']}" if port["error"] else "")
    lines.append(f"serial port  {port['path']} {present}; {link}")
    cap = s["last_capture"]
    if cap:
        what = cap.get("verdict") or ("FAILED: " + str(cap.get("error")))
        lines.append(f"last capture {cap.get('at')} {what} {cap.get('record_id') or ''}".rstrip())
    else:
        lines.append("last capture none")
    lines.append(f"outbox       {box['pending']} pending (oldest "
                 f"{_age(box['oldest_pending_age_s'])}), {box['failed']} failed, "
                 f"{box['delivered']} delivered")
    lines.append(f"last upload  {box['last_upload_at'] or 'never'}")
    if box.get("error"):
        lines.append(f"outbox error {box['error']}")
    if box["last_error"]:
        lines.append(f"last error   {box['last_error']}")
    clock = {True: "synchronised", False: "NOT SYNCHRONISED", None: "unknown"}[
        s["clock"]["synced"]]
    lines.append(f"clock        {clock} ({s['clock']['reason']})")
    lines.append(f"disk         {disk['free_mb']} MB free on {disk['path']} (reserve "
                 f"{disk['reserve_mb']} MB){'' if disk['ok'] else ' LOW: free space'}")
    return lines


def cmd_status(settings: Any, args: Any) -> int:
    """`device-agent status [--json]`: exit 0 when the service runs, 1 otherwise."""
    s = collect_status(settings)
    if getattr(args, "json", False):
        echo(json.dumps(s, indent=2, sort_keys=True))
    else:
        for line in render_status(s):
            echo(line)
    return 0 if s["service"]["running"] else 1


# --- doctor: each check says what is wrong and what to do -----------------------------------

def port_mode_problem(port: str) -> str | None:
    """Why this process cannot open the port for reading and writing, or None."""
    try:
        st = os.stat(port)
    except FileNotFoundError:
        return (f"serial port {port} does not exist: plug in the board's USB cable, or set "
                "ECG_SERIAL_PORT (ls /dev/ttyUSB* /dev/ttyACM*)")
    except OSError as exc:
        return f"cannot stat serial port {port}: {exc}"
    if not stat.S_ISCHR(st.st_mode):
        return f"{port} is not a character device; set ECG_SERIAL_PORT to the adapter"
    if not os.access(port, os.R_OK | os.W_OK):
        import grp

        group = grp.getgrgid(st.st_gid).gr_name
        return (f"no read/write permission on {port} (group {group}): add the service user "
                f"to group {group} (usermod -aG {group} device-agent)")
    return None


def port_holders(port: str, *, proc: Path = Path("/proc"), own_pid: int | None = None) -> list:
    """(pid, command) of other processes that have the port open, from /proc/*/fd."""
    own_pid = os.getpid() if own_pid is None else own_pid
    try:
        target = os.stat(port)
    except OSError:
        return []
    holders = []
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) == own_pid:
            continue
        try:
            fds = list((entry / "fd").iterdir())
        except OSError:
            continue  # gone, or not ours to look at
        for fd in fds:
            try:
                st = os.stat(fd)
            except OSError:
                continue
            if (st.st_rdev, st.st_ino, st.st_dev) == (target.st_rdev, target.st_ino,
                                                       target.st_dev):
                try:
                    cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
                except OSError:
                    cmd = "?"
                holders.append((int(entry.name), cmd))
                break
    return holders


@dataclass(frozen=True)
class Check:
    """One doctor finding: ok, or a problem with the fix in its message."""

    name: str
    ok: bool
    message: str


def check_port(settings: Any, *, proc: Path = Path("/proc")) -> list[Check]:
    """Port exists, is a tty we may open, and no other process holds it."""
    port = settings.serial_port
    if "://" in port:
        return [Check("port", True, f"{port} is a URL; nothing to check on disk")]
    problem = port_mode_problem(port)
    if problem:
        return [Check("port", False, problem)]
    service = running_pid(Path(settings.state_dir))
    others = [(pid, cmd) for pid, cmd in port_holders(port, proc=proc) if pid != service]
    if others:
        pid, cmd = others[0]
        return [Check("port", False,
                      f"serial port {port} is held by another process (pid {pid}: {cmd[:60]}); "
                      f"stop it (kill {pid}) so device-agent can read the board")]
    note = " (held by the running service)" if service else ""
    return [Check("port", True, f"{port} present and readable{note}")]


def _error_code(exc: Exception) -> tuple[str, int]:
    response = getattr(exc, "response", None) or {}
    code = str(response.get("Error", {}).get("Code", ""))
    status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    return code, status


_BAD_CREDENTIALS = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken",
                    "ExpiredToken", "InvalidClientTokenId", "UnrecognizedClientException"}


def check_bucket(settings: Any, client: Any = None) -> list[Check]:
    """Credentials and the bucket, with a HEAD bucket (and a GET probe to tell 403s apart)."""
    if not settings.cloud_upload_enabled:
        return [Check("s3", True, "cloud upload disabled (CLOUD_UPLOAD_ENABLED=false)")]
    bucket = settings.s3_bucket
    if not bucket:
        return [Check("s3", False, "AWS_S3_BUCKET is empty: set it in the env file")]
    if client is None:
        try:
            from device_agent.uploader import make_client
        except ImportError:
            return [Check("s3", False, "device_agent.uploader is missing: reinstall the agent")]
        client = make_client(settings)
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    where = settings.s3_endpoint_url or f"region {settings.s3_region or 'default'}"
    try:
        client.head_bucket(Bucket=bucket)
        return [Check("s3", True, f"bucket {bucket} reachable with these credentials")]
    except NoCredentialsError:
        return [Check("credentials", False,
                      "no AWS credentials found: put the keys in /etc/device-agent/credentials/"
                      "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (mode 0600)")]
    except ClientError as exc:
        code, status = _error_code(exc)
    except BotoCoreError as exc:
        return [Check("s3", False, f"cannot reach S3 at {where}: {exc}; check the network, "
                                   "DNS and AWS_ENDPOINT_URL_S3")]
    if status == 404 or code in {"404", "NoSuchBucket"}:
        return [Check("s3", False, f"bucket {bucket} does not exist at {where}: fix "
                                   "AWS_S3_BUCKET (or AWS_S3_REGION) in the env file")]
    # HEAD answers carry no error code: a GET on a probe key says whether the keys are wrong.
    try:
        client.get_object(Bucket=bucket, Key="ecg-reports/.device-agent-doctor-probe")
        probe = ""
    except ClientError as exc:
        probe, _ = _error_code(exc)
    except BotoCoreError as exc:
        probe = type(exc).__name__
    if probe in _BAD_CREDENTIALS or code in _BAD_CREDENTIALS:
        return [Check("credentials", False,
                      f"S3 rejected the credentials ({probe or code}) for bucket {bucket}: fix "
                      "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY in /etc/device-agent/"
                      "credentials/ (no spaces, the pair from the same key)")]
    if probe == "NoSuchBucket":
        return [Check("s3", False, f"bucket {bucket} does not exist: fix AWS_S3_BUCKET")]
    if probe in {"NoSuchKey", "AccessDenied", ""}:
        return [Check("s3", True, f"credentials valid for bucket {bucket}; HEAD bucket answered "
                                  f"{status or code} (the policy lacks s3:ListBucket, which "
                                  "uploads do not need)")]
    return [Check("s3", False, f"bucket {bucket} answered {status} {code} / {probe}: check the "
                               "bucket policy (docs/s3-policy.md)")]


def check_clock(settings: Any, clock: Any = None) -> list[Check]:
    summary = clock_summary(settings, clock)
    if summary["synced"] is False:
        return [Check("clock", False, f"the clock is not synchronised ({summary['reason']}); "
                                      "records are held until it is: check timedatectl and "
                                      "systemctl status systemd-timesyncd")]
    if summary["synced"] is None:
        return [Check("clock", True, f"clock sync state unknown: {summary['reason']}")]
    return [Check("clock", True, f"clock synchronised ({summary['reason']})")]


def check_disk(settings: Any) -> list[Check]:
    disk = disk_summary(Path(settings.state_dir), settings.disk_reserve_mb)
    if not disk["ok"]:
        return [Check("disk", False, f"only {disk['free_mb']} MB free on {disk['path']} (reserve "
                                     f"{disk['reserve_mb']} MB): free space, or lower "
                                     "RETENTION_DAYS so delivered records are pruned sooner")]
    return [Check("disk", True, f"{disk['free_mb']} MB free on {disk['path']}")]


def check_state_dir(settings: Any) -> list[Check]:
    state_dir = Path(settings.state_dir)
    if state_dir.exists() and not os.access(state_dir, os.W_OK):
        return [Check("state", False, f"STATE_DIR {state_dir} is not writable by this user: "
                                      "run as the service user (sudo device-agent ...)")]
    return [Check("state", True, f"STATE_DIR {state_dir}")]


def run_doctor(settings: Any, *, clock: Any = None, client: Any = None,
               proc: Path = Path("/proc")) -> list[Check]:
    """Every doctor check, in the order a field engineer would fix them."""
    return [*check_state_dir(settings), *check_port(settings, proc=proc),
            *check_bucket(settings, client), *check_clock(settings, clock), *check_disk(settings)]


def cmd_doctor(settings: Any, args: Any) -> int:
    """`device-agent doctor`: one line per check, the fix for each problem; exit 1 if any."""
    checks = run_doctor(settings)
    for c in checks:
        echo(f"{'ok  ' if c.ok else 'FAIL'} {c.name:<11} {c.message}")
    failed = [c for c in checks if not c.ok]
    echo(f"{len(failed)} problem(s)" if failed else "all checks passed")
    return 1 if failed else 0


# --- queue ----------------------------------------------------------------------------------

def cmd_queue(settings: Any, args: Any) -> int:
    """`queue list [--all] [--json]`, `queue retry ID`, `queue retry --failed`."""
    from device_agent.outbox import DELIVERED, Outbox

    with Outbox.open(settings) as box:
        if args.queue_command == "list":
            items = [i for i in box.items() if args.all or i.state != DELIVERED]
            rows = [{"id": i.id, "state": i.state, "kind": i.kind, "key": i.final_key or i.key,
                     "attempts": i.attempts, "created_at": _iso(i.created_at),
                     "next_attempt_at": _iso(i.next_attempt_at) if i.next_attempt_at else None,
                     "last_error": i.last_error} for i in items]
            if getattr(args, "json", False):
                echo(json.dumps(rows, indent=2))
            else:
                for r in rows:
                    err = f"  ({r['last_error']})" if r["last_error"] else ""
                    echo(f"{r['id']:>6} {r['state']:<9} {r['attempts']:>3}x {r['key']}{err}")
                echo(f"{len(rows)} item(s)")
            return 0
        if args.failed:
            echo(f"{box.retry_failed()} failed item(s) queued again")
            return 0
        if args.id is None:
            echo("queue retry needs an ID (see `device-agent queue list`) or --failed", err=True)
            return 2
        if not box.retry(args.id):
            echo(f"no undelivered outbox item {args.id} (see `device-agent queue list`)", err=True)
            return 1
        echo(f"item {args.id} queued again")
        return 0
