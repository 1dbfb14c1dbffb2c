"""`doctor`'s checks: each says what is wrong and what to do, in the order a field engineer
would fix them.

Permissions are judged as the service's user (SERVICE_USER), whoever runs doctor: `sudo
device-agent doctor` as root would otherwise find every file readable. The clock is judged
as the running service sees it (inside its sandbox), from status.json. The bucket check uses
the uploader's own client and error taxonomy, with one attempt and a short deadline, so
doctor answers within seconds whatever the endpoint does.
"""

from __future__ import annotations

import datetime as dt
import grp
import os
import pwd
import stat
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from device_agent.core.clock import clock_from_settings, held_count, undated_count
from device_agent.core.config import Settings
from device_agent.core.errors import UploadError
from device_agent.ops.spool import running_pid
from device_agent.ops.status import (
    STALE_AFTER_S,
    ClockView,
    disk_summary,
    empty_status,
    outbox_summary,
    read_status_file,
)
from device_agent.shipping.credentials import (
    IotCredentialFetcher,
    config_from_settings,
    inspect_certificate,
)
from device_agent.shipping.deadline import Deadlines
from device_agent.shipping.uploader import classify_error, make_client

DOCTOR_TIMEOUT_S = 3.0
_TTY_CLASS = Path("/sys/class/tty")


CERT_WARN_DAYS = 30.0


@dataclass(frozen=True)
class Check:
    """One doctor finding: ok, or a problem with the fix in its message; `warn` is ok but
    needs doing soon (a certificate near its end)."""

    name: str
    ok: bool
    message: str
    warn: bool = False


@dataclass(frozen=True)
class Account:
    """Who the service runs as: uid, its groups, and how to name it in a fix."""

    name: str
    uid: int
    gids: frozenset[int]
    exists: bool


def service_account(name: str) -> Account:
    """The service user's uid and groups; this process's own when that user does not exist."""
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        return Account(pwd.getpwuid(os.getuid()).pw_name, os.getuid(),
                       frozenset(os.getgroups()) | {os.getgid()}, False)
    gids = {entry.pw_gid} | {g.gr_gid for g in grp.getgrall() if name in g.gr_mem}
    return Account(name, entry.pw_uid, frozenset(gids), True)


def may(account: Account, path: Path, want: int) -> bool:
    """Whether `account` may access `path` for `want` (os.R_OK | os.W_OK | os.X_OK), by mode
    bits along the whole path (each folder needs search permission)."""
    if account.uid == 0:
        return True
    path = Path(os.path.abspath(path))
    try:
        for folder in reversed(path.parents):
            if not _mode_allows(account, folder.stat(), os.X_OK):
                return False
        return _mode_allows(account, path.stat(), want)
    except OSError:
        return False


def _mode_allows(account: Account, st: os.stat_result, want: int) -> bool:
    if st.st_uid == account.uid:
        shift = 6
    elif st.st_gid in account.gids:
        shift = 3
    else:
        shift = 0
    bits = (st.st_mode >> shift) & 0o7
    return bits & want == want


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def check_paths(settings: Settings, account: Account) -> list[Check]:
    """STATE_DIR writable, REPORTS_DIR readable, USERS_FILE readable, as the service user."""
    who = f"the service user {account.name}" if account.exists else (
        f"this user {account.name} (SERVICE_USER={settings.service_user} does not exist)")
    checks = []
    state = Path(settings.state_dir)
    probe = state if state.exists() else state.parent
    if not may(account, probe, os.W_OK | os.X_OK):
        checks.append(Check("state", False, f"STATE_DIR {state} is not writable by {who}: "
                                            f"chown -R {account.name} {state}"))
    else:
        checks.append(Check("state", True, f"STATE_DIR {state} writable by {account.name}"))
    reports = Path(settings.reports_dir)
    if reports.exists() and not may(account, reports, os.R_OK | os.X_OK):
        checks.append(Check("reports", False, f"REPORTS_DIR {reports} is not readable by {who}:"
                                              f" add {account.name} to its group, or chmod "
                                              "g+rx it"))
    elif reports.exists():
        checks.append(Check("reports", True, f"REPORTS_DIR {reports} readable"))
    users = Path(settings.users_file)
    if users.exists() and not may(account, users, os.R_OK):
        checks.append(Check("users", False, f"USERS_FILE {users} is not readable by {who}: "
                                            "chmod g+r it and add the user to its group"))
    return checks


def _is_tty_device(st: os.stat_result, path: Path) -> bool:
    if not stat.S_ISCHR(st.st_mode):
        return False
    if 136 <= os.major(st.st_rdev) <= 143:  # Unix98 pseudo-terminals (the simulator's)
        return True
    real = Path(os.path.realpath(path)).name
    if _TTY_CLASS.is_dir():
        return (_TTY_CLASS / real).exists()
    return os.major(st.st_rdev) in {4, 5, 166, 188, 204}  # ttyS, tty, ACM, USB, AMA


def port_holders(port: str, *, proc: Path = Path("/proc"),
                 own_pid: int | None = None) -> list[tuple[int, str]]:
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


def check_port(settings: Settings, account: Account, *,
               proc: Path = Path("/proc")) -> list[Check]:
    """Port exists, is a serial tty the service user may open, and no other process holds it."""
    port = settings.serial_port
    if "://" in port:
        return [Check("port", True, f"{port} is a URL; nothing to check on disk")]
    path = Path(port)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return [Check("port", False, f"serial port {port} does not exist: plug in the board's "
                                     "USB cable, or set ECG_SERIAL_PORT (ls /dev/ttyUSB* "
                                     "/dev/ttyACM*)")]
    except OSError as exc:
        return [Check("port", False, f"cannot stat serial port {port}: {exc.strerror}")]
    if not _is_tty_device(st, path):
        return [Check("port", False, f"{port} is not a serial port (not a tty device); set "
                                     "ECG_SERIAL_PORT to the board's adapter, e.g. "
                                     "/dev/ttyUSB0")]
    if not may(account, path, os.R_OK | os.W_OK):
        group = _group_name(st.st_gid)
        return [Check("port", False, f"{account.name} may not read and write {port} (group "
                                     f"{group}): usermod -aG {group} {account.name}, then "
                                     "restart the service")]
    service = running_pid(Path(settings.state_dir))
    others = [(pid, cmd) for pid, cmd in port_holders(port, proc=proc) if pid != service]
    if others:
        pid, cmd = others[0]
        return [Check("port", False, f"serial port {port} is held by another process (pid "
                                     f"{pid}: {cmd[:60]}); stop that program so device-agent "
                                     "can read the board")]
    note = " (held by the running service)" if service else ""
    return [Check("port", True, f"{port} present and usable by {account.name}{note}")]


def check_bucket(settings: Settings, client: Any = None) -> list[Check]:
    """Credentials and the bucket: HEAD bucket, and a GET probe to tell 403s apart."""
    if not settings.cloud_upload_enabled:
        return [Check("s3", True, "cloud upload disabled (CLOUD_UPLOAD_ENABLED=false)")]
    bucket = settings.s3_bucket
    if not bucket:
        return [Check("s3", False, "AWS_S3_BUCKET is empty: set it in the env file")]
    try:
        client = client or make_client(settings, Deadlines.from_settings(
            settings, attempts=1, read_timeout_s=DOCTOR_TIMEOUT_S,
            connect_timeout_s=DOCTOR_TIMEOUT_S))
    except UploadError as exc:
        return [Check("credentials", False, str(exc))]
    try:
        client.head_bucket(Bucket=bucket)
        return [Check("s3", True, f"bucket {bucket} reachable with these credentials")]
    except Exception as exc:
        error = classify_error(exc, bucket=bucket, key=None)
    if error.code in {"Timeout", "ConnectionError", "Unproven", "NoCredentials", "NoRegion",
                      "NoSuchBucket", "InvalidBucketName", "PermanentRedirect",
                      "CertificateRejected"}:
        return [Check("s3", False, str(error))]
    # HEAD answers carry no error code: a GET on a probe key says whether the keys are wrong.
    try:
        client.get_object(Bucket=bucket, Key="ecg-reports/.device-agent-doctor-probe")
        probe = "ok"
    except Exception as exc:
        probe = classify_error(exc, bucket=bucket, key=None).code or ""
    if probe in {"InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken",
                 "ExpiredToken"} or error.code in {"InvalidAccessKeyId",
                                                   "SignatureDoesNotMatch"}:
        return [Check("credentials", False,
                      f"S3 rejected the credentials ({probe or error.code}) for bucket "
                      f"{bucket}: fix AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY in "
                      "/etc/device-agent/credentials/ (the pair from the same key)")]
    if probe in {"NoSuchKey", "AccessDenied", "ok"}:
        return [Check("s3", True, f"credentials valid for bucket {bucket}; HEAD bucket answered "
                                  f"{error.code} (the policy lacks s3:ListBucket, which "
                                  "uploads do not need)")]
    return [Check("s3", False, f"{error}; probe answered {probe}: check the bucket policy "
                               "(docs/s3-policy.md)")]


def check_identity(settings: Settings, *, now: dt.datetime | None = None) -> list[Check]:
    """The unit's certificate (AWS IoT): dates, key match, key mode, and a real fetch."""
    if not settings.cloud_upload_enabled or not settings.iot_endpoint:
        return []
    config = config_from_settings(settings)
    try:
        info = inspect_certificate(config.cert_file, config.key_file, now=now)
    except UploadError as exc:
        return [Check("identity", False, str(exc))]
    checks = []
    ends = f"{info.not_after:%Y-%m-%d}"
    if info.days_left <= 0:
        checks.append(Check("identity", False, f"certificate {info.cert_file} expired on {ends}: "
                                               "rotate it (docs/fleet-identity.md)"))
    elif info.days_left <= CERT_WARN_DAYS:
        checks.append(Check("identity", True, f"certificate {info.cert_file} expires on {ends}, "
                                              f"in {info.days_left:.0f} days: rotate it soon "
                                              "(docs/fleet-identity.md)", warn=True))
    else:
        checks.append(Check("identity", True, f"certificate {info.cert_file} (CN "
                                              f"{info.subject_cn}) valid until {ends}"))
    if not info.key_matches:
        checks.append(Check("identity", False, info.key_problem or "the key does not match"))
        return checks
    if info.key_mode_warning:
        checks.append(Check("identity", True, info.key_mode_warning, warn=True))
    fetcher = IotCredentialFetcher(config, deadline_s=DOCTOR_TIMEOUT_S,
                                   connect_timeout_s=DOCTOR_TIMEOUT_S)
    try:
        fetched = fetcher.fetch()
    except UploadError as exc:
        checks.append(Check("identity", False, str(exc)))
    else:
        checks.append(Check("identity", True, f"credentials obtained from {config.host} for "
                                              f"thing {config.thing_name}, valid until "
                                              f"{fetched['expiry_time']}"))
    return checks


def check_clock(settings: Settings, clock: ClockView | None = None) -> list[Check]:
    """The clock as the running service sees it (its sandbox), else as this command does."""
    doc = read_status_file(Path(settings.state_dir)) or empty_status()
    seen = doc["clock"]
    updated = doc["updated_at"]
    fresh = (running_pid(Path(settings.state_dir)) is not None and updated is not None
             and time.time() - updated <= STALE_AFTER_S)
    synced: bool | None
    reason: str | None
    if fresh and seen is not None:
        synced, reason, who = seen["synced"], seen["reason"], "the service"
    else:
        state = (clock or clock_from_settings(settings)).state()
        synced, reason, who = state.synced, state.reason, "this command"
    checks = []
    if not synced:
        checks.append(Check("clock", False, f"the clock is not synchronised as {who} sees it "
                                            f"({reason}); records are held until it is: check "
                                            "timedatectl and the NTP service"))
    else:
        checks.append(Check("clock", True, f"clock synchronised as {who} sees it ({reason})"))
    state_dir = Path(settings.state_dir)
    held, undated = held_count(state_dir), undated_count(state_dir)
    if held:
        checks.append(Check("held", synced is not True,
                            f"{held} record(s) held until the clock is synchronised; they are "
                            "packaged and queued then" if not synced else
                            f"{held} record(s) held; the next sync pass names them"))
    if undated:
        checks.append(Check("undated", False, f"{undated} record(s) captured before a reboot "
                                              f"with no clock sit in {state_dir / 'undated'}: "
                                              "name them by hand or delete them"))
    return checks


def check_queue(settings: Settings) -> list[Check]:
    """A paused queue, failed items and skipped inputs, each with what to do."""
    box = outbox_summary(Path(settings.state_dir), now=time.time())
    if not box.get("present"):
        return [Check("queue", True, "no outbox yet")]
    if box.get("error"):
        return [Check("queue", False, box["error"])]
    checks = []
    if box.get("pause_reason"):
        checks.append(Check("queue", False, f"uploads paused until {box['paused_until']}: "
                                            f"{box['pause_reason']}"))
    if box.get("failed"):
        checks.append(Check("queue", False, f"{box['failed']} item(s) failed for good: "
                                            "`device-agent queue list` says why; fix it, then "
                                            "`device-agent queue retry --failed`"))
    if box.get("problems"):
        checks.append(Check("inputs", False, f"{box['problems']} input(s) skipped (see "
                                             "`device-agent queue list`)"))
    if not checks:
        checks.append(Check("queue", True, f"{box['pending']} pending, nothing failed"))
    return checks


def check_disk(settings: Settings) -> list[Check]:
    disk = disk_summary(Path(settings.state_dir), settings.disk_reserve_mb)
    if not disk["ok"]:
        return [Check("disk", False, f"only {disk['free_mb']} MB free on {disk['path']} (reserve "
                                     f"{disk['reserve_mb']} MB): free space, or lower "
                                     "RETENTION_DAYS so delivered records are pruned sooner")]
    return [Check("disk", True, f"{disk['free_mb']} MB free on {disk['path']}")]


def run_doctor(settings: Settings, *, clock: ClockView | None = None, client: Any = None,
               proc: Path = Path("/proc"), account: Account | None = None,
               extra: Iterable[Check] = ()) -> list[Check]:
    """Every doctor check, in the order a field engineer would fix them."""
    account = account or service_account(settings.service_user)
    return [*check_paths(settings, account), *check_port(settings, account, proc=proc),
            *check_identity(settings), *check_bucket(settings, client), *extra,
            *check_clock(settings, clock),
            *check_queue(settings), *check_disk(settings)]
