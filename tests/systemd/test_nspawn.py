"""The unit under a real systemd (PID 1 in a systemd-nspawn container), driven from the host.

One machine per run, the tests in file order: install and configure, start (READY=1),
capture through the spool, the sandbox as the running service sees it, the watchdog
(SIGSTOP, and a sync wedged in an upload), stop, the journal. Issue 27.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import boto3
import pytest

from tests.conftest import wait_until
from tests.faultproxy import FaultProxy
from tests.systemd.machine import Machine, missing

if (LACKING := missing()) is not None:
    pytest.skip(f"nspawn tier needs {LACKING} (apt-get install systemd-container mmdebstrap; "
                "run as root)", allow_module_level=True)

pytestmark = [pytest.mark.nspawn, pytest.mark.functional]

UNIT = "device-agent"
OPERATOR = "fieldeng"
STATE = "/var/lib/device-agent/state"
REPORTS = "/var/lib/device-agent/reports"
ENV_FILE = "/etc/device-agent/device-agent.env"
BOARD_LINK = "/run/ecg-board/tty"
CAPTURE_S = 10
SIM_SPEED = 5


@pytest.fixture(scope="module")
def bucket(s3_endpoint: str) -> str:
    """A versioned bucket: an object stored twice shows as two versions."""
    client = _s3(s3_endpoint)
    name = "tier-ecg-bucket"
    client.create_bucket(Bucket=name)
    client.put_bucket_versioning(Bucket=name, VersioningConfiguration={"Status": "Enabled"})
    return name


def _s3(endpoint: str) -> Any:
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                        aws_access_key_id="testing", aws_secret_access_key="testing")


def _versions(endpoint: str, bucket: str) -> dict[str, int]:
    """Key -> how many versions of it the bucket holds."""
    counts: dict[str, int] = {}
    pages = _s3(endpoint).get_paginator("list_object_versions").paginate(Bucket=bucket)
    for page in pages:
        for v in page.get("Versions", []):
            counts[v["Key"]] = counts.get(v["Key"], 0) + 1
    return counts


def _manifests(endpoint: str, bucket: str) -> dict[str, dict[str, Any]]:
    client = _s3(endpoint)
    found = {}
    for key in _versions(endpoint, bucket):
        if Path(key).name.startswith("manifest_"):
            body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
            found[key] = json.loads(body)
    return found


def _wrapper(m: Machine, *args: str, check: bool = True, timeout: float = 120) -> Any:
    """`sudo device-agent ARGS` as the field engineer (README: field commands)."""
    return m.run("sudo", "-n", "device-agent", *args, user=OPERATOR, check=check,
                 timeout=timeout)


def _main_pid(m: Machine) -> int:
    return int(m.show(UNIT, "MainPID")["MainPID"])


def _host_pid(m: Machine, inner_pid: int) -> int:
    """The host's pid of the machine's process `inner_pid` (NSpid's last field)."""
    ns = os.readlink(f"/proc/{m.leader}/ns/pid")
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.readlink(entry / "ns/pid") != ns:
                continue
            for line in (entry / "status").read_text().splitlines():
                if line.startswith("NSpid:") and int(line.split()[-1]) == inner_pid:
                    return int(entry.name)
        except (OSError, ValueError):
            continue
    raise AssertionError(f"no host process for pid {inner_pid} in the machine")


# --- 1. install, configure, start ------------------------------------------------------------

def test_install_as_the_readme_says(machine: Machine):
    """install.sh made the user, the venv with the pinned versions, the unit, the wrapper."""
    log = machine.install_log  # type: ignore[attr-defined]
    assert "install: done" in log, log
    user = machine.run("id", "device-agent").stdout
    assert "dialout" in user, user
    assert machine.show(UNIT, "UnitFileState")["UnitFileState"] == "enabled"
    frozen = machine.run("/opt/device-agent/venv/bin/python", "-m", "pip", "freeze").stdout
    pins = dict(line.split("==") for line in
                machine.path("/opt/device-agent/src/constraints.txt").read_text().splitlines()
                if "==" in line)
    installed = dict(line.split("==") for line in frozen.splitlines() if "==" in line)
    for name in ("boto3", "botocore", "urllib3", "numpy", "reportlab", "pydicom", "pyserial"):
        assert installed.get(name) == pins[name], (name, installed.get(name), pins[name])


def test_configure_as_an_operator(machine: Machine, endpoint: FaultProxy, bucket: str):
    """The operator's edits: settings, static keys in the credentials folder, a sudo user;
    a board (the simulator, run as the service user so the service may open its pty)."""
    env = machine.path(ENV_FILE)
    text = env.read_text()
    for key, value in {"DEVICE_SERIAL": "TIER-0001", "AWS_S3_BUCKET": bucket,
                       "AWS_S3_REGION": "us-east-1", "ECG_SERIAL_PORT": BOARD_LINK,
                       "SYNC_INTERVAL_S": "1"}.items():
        text = "\n".join(f"{key}={value}" if line.startswith(f"{key}=") else line
                         for line in text.splitlines()) + "\n"
    # This kernel reports no NTP sync; the tier's unit trusts its clock past the floor.
    text += (f"AWS_ENDPOINT_URL_S3={endpoint.url}\nCLOCK_CHECK=floor\n"
             # short deadlines, so a wedged upload is past its limit within a minute
             "S3_CONNECT_TIMEOUT_S=1\nS3_READ_TIMEOUT_S=2\nS3_MAX_ATTEMPTS=1\n"
             "S3_MIN_RATE_KBPS=1000\nREPORT_MAX_MB=1\n"
             # and a paused queue retries within seconds once the endpoint answers again
             "RETRY_MAX_BACKOFF_S=5\n")
    env.write_text(text)
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        machine.path(f"/etc/device-agent/credentials/{name}").write_text("testing")
    machine.run("useradd", "-m", "-G", "sudo", "-s", "/bin/sh", OPERATOR)
    machine.path(f"/etc/sudoers.d/{OPERATOR}").write_text(f"{OPERATOR} ALL=(ALL) NOPASSWD: ALL\n")
    os.chmod(machine.path(f"/etc/sudoers.d/{OPERATOR}"), 0o440)
    machine.run("systemd-run", "--unit=ecg-board", "-p", "User=device-agent",
                "-p", "RuntimeDirectory=ecg-board", "-p", "RuntimeDirectoryMode=0755",
                "/opt/device-agent/venv/bin/device-agent", "simulate", "--link", BOARD_LINK,
                "--loop", "--speed", str(SIM_SPEED))
    wait_until(lambda: machine.run("test", "-L", BOARD_LINK, check=False).returncode == 0,
               timeout=60, interval=0.2,
               what="the simulator's pty link")
    assert _wrapper(machine, "config").returncode == 0


def test_active_only_after_ready(machine: Machine):
    """`systemctl start` returns with the unit active; before READY=1 it was activating
    with its process already running, and READY carried the first STATUS= line."""
    assert machine.show(UNIT, "Type", "NotifyAccess") == {"Type": "notify",
                                                          "NotifyAccess": "main"}
    machine.run("systemctl", "start", "--no-block", UNIT)
    seen: list[tuple[str, str, str, str]] = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        s = machine.show(UNIT, "ActiveState", "SubState", "MainPID", "StatusText")
        row = (s["ActiveState"], s["SubState"], s["MainPID"], s["StatusText"])
        if not seen or seen[-1] != row:
            seen.append(row)
        if s["ActiveState"] in ("active", "failed"):
            break
    states = [r[0] for r in seen]
    assert states[-1] == "active" and seen[-1][1] == "running", seen
    waiting = [r for r in seen if r[0] == "activating" and r[2] != "0"]
    assert waiting, f"never saw the process running before READY=1: {seen}"
    assert all(r[3] == "" for r in waiting), f"STATUS= before READY=1: {seen}"
    assert seen[-1][3], "READY=1 came with a STATUS= line"
    journal = machine.run("journalctl", "-u", UNIT, "-o", "cat", "--no-pager").stdout
    assert "running (port" in journal, journal


def test_status_through_the_wrapper(machine: Machine):
    wait_until(lambda: _wrapper(machine, "status", check=False).returncode == 0, timeout=30,
               interval=0.5, what="status to say running")
    out = _wrapper(machine, "status", "--json").stdout
    doc = json.loads(out)
    assert doc["service"]["state"] == "running" and doc["service"]["healthy"], doc
    assert doc["service"]["pid"] == _main_pid(machine), doc["service"]
    wait_until(lambda: json.loads(_wrapper(machine, "status", "--json").stdout)
               ["port"]["frames_flowing"], timeout=30, interval=0.5, what="frames flowing")
    text = _wrapper(machine, "status").stdout
    assert text.startswith("service      running (pid"), text


def _capture(machine: Machine) -> str:
    """One capture through the spool, as the field engineer; the record's folder."""
    proc = _wrapper(machine, "capture", "--seconds", str(CAPTURE_S),
                    timeout=CAPTURE_S / SIM_SPEED * 1 + 120)
    return proc.stdout.strip().splitlines()[-1]


def _delivered(endpoint_url: str, bucket: str, stamp: str) -> dict[str, Any] | None:
    for key, doc in _manifests(endpoint_url, bucket).items():
        if stamp in key:
            return doc
    return None


def _assert_manifest_holds(endpoint_url: str, bucket: str, manifest: dict[str, Any]) -> None:
    client = _s3(endpoint_url)
    files = manifest["files"]
    assert len(files) >= 4, manifest
    for entry in files:
        body = client.get_object(Bucket=bucket, Key=entry["key"])["Body"].read()
        assert hashlib.sha256(body).hexdigest() == entry["sha256"], entry["key"]


def test_a_capture_through_the_spool_lands_with_its_manifest(machine: Machine, bucket: str,
                                                            s3_endpoint: str):
    folder = _capture(machine)
    assert folder.startswith(f"{STATE}/records/"), folder
    stamp = Path(folder).name
    manifest = wait_until(lambda: _delivered(s3_endpoint, bucket, stamp), timeout=60,
                          interval=0.5, what="the manifest in moto")
    _assert_manifest_holds(s3_endpoint, bucket, manifest)
    assert machine.show(UNIT, "ActiveState")["ActiveState"] == "active"


# --- 4. the sandbox, from inside the running service -----------------------------------------

PROBE = r"""
import json, os, sys
out = {"uid": os.getuid(), "gid": os.getgid(), "writable": [], "denied": {}, "read": {}}
for d in sys.argv[1].split(":"):
    path = os.path.join(d, ".sandbox-probe-%d" % os.getpid())
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except OSError as exc:
        out["denied"][d] = exc.strerror
    else:
        os.unlink(path)
        out["writable"].append(d)
for f in sys.argv[2].split(":"):
    try:
        with open(f, "rb") as fh:
            out["read"][f] = len(fh.read())
    except OSError as exc:
        out["read"][f] = exc.strerror
print(json.dumps(out))
"""
CANDIDATES = ("/", "/etc", "/etc/device-agent", "/home", f"/home/{OPERATOR}", "/root", "/usr",
              "/usr/local/bin", "/opt/device-agent", "/opt/device-agent/venv/bin", "/var",
              "/var/lib", "/var/log", "/var/cache", "/srv", "/mnt", "/run", "/run/ecg-board",
              "/run/lock", "/var/lib/device-agent", STATE, REPORTS, "/tmp", "/var/tmp", "/dev/shm",
              "/dev/mqueue")
CRED = "/run/credentials/device-agent.service/AWS_SECRET_ACCESS_KEY"
ROOT_CRED = "/etc/device-agent/credentials/AWS_SECRET_ACCESS_KEY"


def _probe(m: Machine, *, uid: int, gid: int, files: tuple[str, ...]) -> dict[str, Any]:
    """The probe run in the running service's own namespaces (mount, IPC, ...) and root, as
    `uid`:`gid`: what that process would see, not what a fresh `systemd-run` would."""
    pid = _main_pid(m)
    proc = m.run("nsenter", "-t", str(pid), "-m", "-i", "-u", "-r", "-w",
                 f"--setuid={uid}", f"--setgid={gid}",
                 "/opt/device-agent/venv/bin/python", "-I", "-c", PROBE,
                 ":".join(CANDIDATES), ":".join(files))
    return dict(json.loads(proc.stdout))


def _ids(m: Machine, name: str) -> tuple[int, int]:
    return (int(m.run("id", "-u", name).stdout), int(m.run("id", "-g", name).stdout))


def test_the_service_runs_as_its_user_without_privileges(machine: Machine):
    status = Path(f"/proc/{_host_pid(machine, _main_pid(machine))}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines())
    uid, gid = _ids(machine, "device-agent")
    dialout = int(machine.run("getent", "group", "dialout").stdout.split(":")[2])
    assert fields["Uid"].split() == [str(uid)] * 4, fields["Uid"]
    assert fields["Gid"].split() == [str(gid)] * 4, fields["Gid"]
    assert str(dialout) in fields["Groups"].split(), fields["Groups"]
    assert int(fields["CapEff"], 16) == 0 and int(fields["CapBnd"], 16) == 0
    assert fields["NoNewPrivs"].strip() == "1" and fields["Seccomp"].strip() == "2"


def test_the_service_writes_only_its_state_and_reports(machine: Machine):
    uid, gid = _ids(machine, "device-agent")
    seen = _probe(machine, uid=uid, gid=gid, files=(CRED, ROOT_CRED, ENV_FILE))
    assert (seen["uid"], seen["gid"]) == (uid, gid)
    for path in ("/etc", "/etc/device-agent", "/home", "/usr", "/usr/local/bin",
                 "/opt/device-agent", "/root", "/var/log"):
        assert path in seen["denied"], f"the service can write {path}: {seen}"
    # Nothing shared with other programs: not /run (ProtectSystem=strict leaves it writable;
    # here the simulator's /run/ecg-board belongs to the service user), not the
    # world-writable /run/lock, /dev/shm or /dev/mqueue.
    assert sorted(seen["writable"]) == sorted(["/var/lib/device-agent", STATE, REPORTS,
                                               "/tmp", "/var/tmp"]), json.dumps(seen)
    # its /tmp and /var/tmp are its own (PrivateTmp=): what it writes there nobody else sees
    private = machine.run("nsenter", "-t", str(_main_pid(machine)), "-m", "--",
                          "sh", "-c", "echo x > /tmp/private-probe && ls /tmp").stdout
    assert "private-probe" in private
    assert machine.run("test", "-e", "/tmp/private-probe", check=False).returncode == 1
    # its credential is readable by it; the root-only originals and the settings as expected
    assert seen["read"][CRED] == len("testing"), seen["read"]
    assert seen["read"][ROOT_CRED] == "Permission denied", seen["read"]
    assert isinstance(seen["read"][ENV_FILE], int), seen["read"]


def test_the_credential_is_not_readable_by_another_user(machine: Machine):
    nobody = _ids(machine, "nobody")
    seen = _probe(machine, uid=nobody[0], gid=nobody[1], files=(CRED,))
    assert seen["read"][CRED] == "Permission denied", seen["read"]
    # nor from the machine's own namespace, as the field engineer without sudo
    op = machine.run("cat", CRED, user=OPERATOR, check=False)
    assert op.returncode != 0 and "Permission denied" in op.stderr, op


def test_doctor_through_the_wrapper_agrees(machine: Machine):
    proc = _wrapper(machine, "doctor", check=False)
    lines = proc.stdout.splitlines()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    state = next(line for line in lines if line.split()[1:2] == ["state"])
    assert state.startswith("ok") and STATE in state and "writable by device-agent" in state
    reports = next(line for line in lines if line.split()[1:2] == ["reports"])
    assert reports.startswith("ok") and REPORTS in reports
    clock = next(line for line in lines if line.split()[1:2] == ["clock"])
    assert clock.startswith("ok") and "as the service sees it" in clock, clock
    port = next(line for line in lines if line.split()[1:2] == ["port"])
    assert port.startswith("ok"), port


# --- 3. the watchdog ---------------------------------------------------------------------------

def _restarted(m: Machine, restarts: int, pid: int) -> bool:
    s = m.show(UNIT, "NRestarts", "MainPID", "ActiveState", "SubState")
    return (int(s["NRestarts"]) > restarts and s["MainPID"] not in ("0", str(pid))
            and (s["ActiveState"], s["SubState"]) == ("active", "running"))


def _assert_each_once(endpoint_url: str, bucket: str, stamps: list[str]) -> None:
    """Every object in the bucket belongs to a manifest, each stored exactly once, and the
    manifests of `stamps` are there with files matching them."""
    versions = _versions(endpoint_url, bucket)
    twice = {k: n for k, n in versions.items() if n != 1}
    assert not twice, f"stored more than once: {twice}"
    manifests = _manifests(endpoint_url, bucket)
    listed = set(manifests)
    for doc in manifests.values():
        listed |= {f["key"] for f in doc["files"]}
        _assert_manifest_holds(endpoint_url, bucket, doc)
    assert set(versions) == listed, set(versions) ^ listed
    for stamp in stamps:
        assert any(stamp in key for key in manifests), f"{stamp} not delivered"


def _outbox(m: Machine) -> dict[str, Any]:
    return dict(json.loads(_wrapper(m, "status", "--json", check=False).stdout)["outbox"])


def test_sigstop_makes_systemd_kill_and_restart_it(machine: Machine, endpoint: FaultProxy,
                                                   bucket: str, s3_endpoint: str):
    """Frozen with an upload in flight at an endpoint that never answers: the watchdog fires,
    systemd kills and restarts it; then the capture is delivered once and nothing is lost."""
    endpoint.set_mode("blackhole")
    stamp = Path(_capture(machine)).name
    accepted = endpoint.counts["accepted"]
    wait_until(lambda: endpoint.counts["accepted"] > accepted, timeout=30,
               what="a put held by the endpoint")
    before = machine.show(UNIT, "NRestarts", "MainPID")
    restarts, pid = int(before["NRestarts"]), int(before["MainPID"])
    frozen_at = time.monotonic()
    machine.run("systemctl", "kill", "--kill-who=main", "--signal=SIGSTOP", UNIT)
    wait_until(lambda: _restarted(machine, restarts, pid), timeout=180, interval=0.5,
               what="systemd to restart the frozen service")
    took = time.monotonic() - frozen_at
    from tests.systemd.conftest import TIMINGS
    TIMINGS["SIGSTOP to restarted"] = took
    assert int(machine.show(UNIT, "NRestarts")["NRestarts"]) == restarts + 1
    journal = machine.run("journalctl", "-u", UNIT, "-o", "cat", "--no-pager").stdout
    assert "Watchdog timeout" in journal, journal[-2000:]
    endpoint.set_mode("pass")
    wait_until(lambda: _delivered(s3_endpoint, bucket, stamp), timeout=90, interval=0.5,
               what="the frozen capture delivered after the restart")
    wait_until(lambda: _outbox(machine).get("pending") == 0, timeout=60, interval=0.5,
               what="an empty outbox")
    _assert_each_once(s3_endpoint, bucket, [stamp])


PTRACE_DETACH, PTRACE_SEIZE, PTRACE_INTERRUPT = 17, 0x4206, 0x4207
WALL = 0x40000000
SYS_POLL, SYS_PPOLL = 7, 271  # x86_64: where a socket read with a timeout waits


class ThreadFreezer(threading.Thread):
    """Stops single threads of another process (ptrace SEIZE + INTERRUPT; its other threads
    run on) until they exit or `release` is set; reaps them, as their tracer must."""

    def __init__(self, tids: list[int]) -> None:
        super().__init__(name="thread-freezer", daemon=True)
        self.tids = list(tids)
        self.frozen = threading.Event()
        self.release = threading.Event()
        self.error: str | None = None
        self.exited: list[int] = []

    def run(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
        live = []
        for tid in self.tids:
            if libc.ptrace(PTRACE_SEIZE, tid, None, None) != 0 or \
                    libc.ptrace(PTRACE_INTERRUPT, tid, None, None) != 0:
                self.error = f"ptrace {tid}: {os.strerror(ctypes.get_errno())}"
                break
            live.append(tid)
        self.frozen.set()
        while live:
            for tid in list(live):
                try:
                    got, status = os.waitpid(tid, os.WNOHANG | WALL)
                except ChildProcessError:
                    live.remove(tid)
                    continue
                if got == tid and (os.WIFEXITED(status) or os.WIFSIGNALED(status)):
                    live.remove(tid)
                    self.exited.append(tid)
            if self.release.is_set():
                for tid in live:
                    libc.ptrace(PTRACE_DETACH, tid, None, None)
                return
            time.sleep(0.05)


def _threads_waiting_on(pid: int, port: int) -> list[int]:
    """Threads of `pid` waiting in poll() on a TCP connection to 127.0.0.1:`port`."""
    inodes = set()
    for line in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[2].split(":")[1], 16) == port:
            inodes.add(fields[9])
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            call = (task / "syscall").read_text().split()
            if int(call[0]) not in (SYS_POLL, SYS_PPOLL):
                continue
            with open(f"/proc/{pid}/mem", "rb") as mem:
                mem.seek(int(call[1], 16))
                fd = int.from_bytes(mem.read(4), "little", signed=True)
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except (OSError, ValueError, IndexError):
            continue
        if link.startswith("socket:[") and link[8:-1] in inodes:
            found.append(int(task.name))
    return found


def test_a_wedged_upload_stops_the_pings(machine: Machine, endpoint: FaultProxy, bucket: str,
                                         s3_endpoint: str):
    """The uploader thread blocked for good inside its put (its deadline can never fire):
    the still-running supervising thread sees the upload past its limit, says WEDGED, stops
    feeding the watchdog, and systemd restarts the service; the capture goes once after."""
    endpoint.set_mode("blackhole")
    stamp = Path(_capture(machine)).name
    before = machine.show(UNIT, "NRestarts", "MainPID")
    restarts, pid = int(before["NRestarts"]), int(before["MainPID"])
    host_pid = _host_pid(machine, pid)
    tids = wait_until(lambda: _threads_waiting_on(host_pid, endpoint.port), timeout=30,
                      interval=0.01, what="the uploader waiting on the endpoint")
    assert host_pid not in tids, "the supervising thread itself must not upload"
    freezer = ThreadFreezer(tids)
    freezer.start()
    try:
        assert freezer.frozen.wait(10) and freezer.error is None, freezer.error
        started = time.monotonic()
        wait_until(lambda: json.loads(_wrapper(machine, "status", "--json", check=False).stdout)
                   ["service"]["state"] == "wedged", timeout=150, interval=1.0,
                   what="status to say WEDGED")
        from tests.systemd.conftest import TIMINGS
        TIMINGS["frozen upload to WEDGED"] = time.monotonic() - started
        wait_until(lambda: _restarted(machine, restarts, pid), timeout=120, interval=0.5,
                   what="systemd to restart the wedged service")
        TIMINGS["frozen upload to restarted"] = time.monotonic() - started
    finally:
        freezer.release.set()
        freezer.join(timeout=30)
    assert int(machine.show(UNIT, "NRestarts")["NRestarts"]) == restarts + 1
    journal = machine.run("journalctl", "-u", UNIT, "-o", "cat", "--no-pager").stdout
    assert "no longer feeding the watchdog" in journal, journal[-3000:]
    assert journal.count("Watchdog timeout") == 2, journal[-3000:]
    endpoint.set_mode("pass")
    wait_until(lambda: _delivered(s3_endpoint, bucket, stamp), timeout=90, interval=0.5,
               what="the wedged capture delivered after the restart")
    wait_until(lambda: _outbox(machine).get("pending") == 0, timeout=60, interval=0.5,
               what="an empty outbox")
    _assert_each_once(s3_endpoint, bucket, [stamp])


# --- the clock: held without NTP evidence, named once the check passes -----------------------

def _set_setting(m: Machine, key: str, value: str) -> None:
    env = m.path(ENV_FILE)
    lines = [line for line in env.read_text().splitlines() if not line.startswith(f"{key}=")]
    env.write_text("\n".join([*lines, f"{key}={value}"]) + "\n")


def test_a_held_capture_is_named_once_the_clock_check_passes(machine: Machine, bucket: str,
                                                             s3_endpoint: str):
    """This kernel reports no NTP sync: under CLOCK_CHECK=ntp a capture is held (not named,
    not sent); once the check passes (CLOCK_CHECK=floor, a restart: same boot) it is named,
    queued and delivered once."""
    _set_setting(machine, "CLOCK_CHECK", "ntp")
    machine.run("systemctl", "restart", UNIT)
    doc = json.loads(_wrapper(machine, "status", "--json", check=False).stdout)
    assert doc["clock"]["synced"] is False, doc["clock"]
    known = set(_manifests(s3_endpoint, bucket))
    proc = _wrapper(machine, "capture", "--seconds", str(CAPTURE_S), check=False,
                    timeout=CAPTURE_S / SIM_SPEED + 120)
    assert "held" in proc.stderr, proc.stdout + proc.stderr
    assert json.loads(_wrapper(machine, "status", "--json", check=False).stdout)["held"] == 1
    _set_setting(machine, "CLOCK_CHECK", "floor")
    machine.run("systemctl", "restart", UNIT)
    new = wait_until(lambda: set(_manifests(s3_endpoint, bucket)) - known, timeout=90,
                     interval=0.5, what="the held capture named and delivered")
    assert len(new) == 1, new
    assert json.loads(_wrapper(machine, "status", "--json", check=False).stdout)["held"] == 0
    _assert_each_once(s3_endpoint, bucket, [])


# --- 5. stop, and the journal over the whole run ---------------------------------------------

def test_stop_within_timeout_with_the_outbox_intact(machine: Machine, endpoint: FaultProxy,
                                                    bucket: str, s3_endpoint: str):
    """Stopped with a capture queued and its put held by the endpoint: the stop ends by
    itself within TimeoutStopSec (no SIGKILL), the outbox is intact and keeps the capture,
    which the next start delivers once."""
    import sqlite3

    endpoint.set_mode("blackhole")
    stamp = Path(_capture(machine)).name
    accepted = endpoint.counts["accepted"]
    wait_until(lambda: endpoint.counts["accepted"] > accepted, timeout=30,
               what="a put held by the endpoint")
    limit_s = int(machine.show(UNIT, "TimeoutStopUSec")["TimeoutStopUSec"].rstrip("s"))
    started = time.monotonic()
    machine.run("systemctl", "stop", UNIT, timeout=limit_s + 60)
    took = time.monotonic() - started
    from tests.systemd.conftest import TIMINGS
    TIMINGS["systemctl stop"] = took
    after = machine.show(UNIT, "ActiveState", "Result", "ExecMainCode", "ExecMainStatus")
    assert after == {"ActiveState": "inactive", "Result": "success", "ExecMainCode": "1",
                     "ExecMainStatus": "0"}, after
    assert took < limit_s, f"stop took {took:.1f} s, TimeoutStopSec is {limit_s} s"
    db = machine.path(f"{STATE}/outbox.sqlite3")
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert _outbox(machine)["pending"] >= 5, _outbox(machine)
    endpoint.set_mode("pass")
    machine.run("systemctl", "start", UNIT)
    wait_until(lambda: _delivered(s3_endpoint, bucket, stamp), timeout=90, interval=0.5,
               what="the capture queued at the stop delivered after the start")
    wait_until(lambda: _outbox(machine).get("pending") == 0, timeout=60, interval=0.5,
               what="an empty outbox")
    _assert_each_once(s3_endpoint, bucket, [stamp])
    machine.run("systemctl", "stop", UNIT, timeout=limit_s + 60)


def test_the_journal_holds_no_traceback(machine: Machine):
    journal = machine.run("journalctl", "-u", UNIT, "-o", "cat", "--no-pager").stdout
    assert "device-agent" in journal and "running (port" in journal
    assert "Traceback" not in journal, journal
    assert "timed out" not in journal, journal  # no start or stop ran into its timeout
