"""The unit file: systemd-analyze verify passes and the sandbox rates 2.0 or lower."""

from __future__ import annotations

import ctypes.util
import json
import os
import pwd
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "systemd" / "device-agent.service"
INSTALL = REPO / "systemd" / "install.sh"
ANALYZE = shutil.which("systemd-analyze") or ""
needs_analyze = pytest.mark.skipif(not ANALYZE, reason="systemd-analyze not installed")


def _unit_values() -> dict[str, list[str]]:
    values: dict[str, list[str]] = {}
    section = None
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        values.setdefault(f"{section}.{key}", []).append(value)
    return values


def test_unit_declares_the_contract():
    v = _unit_values()
    assert v["Service.Type"] == ["notify"]
    assert v["Service.Restart"] == ["on-failure"]
    assert int(v["Service.WatchdogSec"][0]) > 0
    assert v["Service.User"] == ["device-agent"] and "dialout" in v["Service.SupplementaryGroups"]
    assert v["Service.StateDirectory"] == ["device-agent"]
    # the agent reads its settings itself, with the parser the wrapper's commands use
    assert "EnvironmentFile" not in " ".join(v)
    assert "--env-file /etc/device-agent/device-agent.env run" in v["Service.ExecStart"][0]
    assert v["Service.DevicePolicy"] == ["closed"]
    assert v["Service.CapabilityBoundingSet"] == [""]
    assert any("char-ttyUSB" in d for d in v["Service.DeviceAllow"])
    assert any("char-ttyACM" in d for d in v["Service.DeviceAllow"])
    creds = {c.split(":")[0] for c in v["Service.LoadCredential"]}
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_IOT_KEY_FILE"} <= creds
    # secrets only through credentials, never in the unit's own environment
    env_lines = " ".join(v.get("Service.Environment", []))
    assert "SECRET" not in env_lines and "ACCESS_KEY" not in env_lines


def _verifiable_copy(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at an executable that exists on this machine."""
    text = UNIT.read_text()
    text, n = re.subn(r"^ExecStart=\S+", f"ExecStart={sys.executable} -m device_agent",
                      text, flags=re.M)
    assert n == 1
    copy = tmp_path / "device-agent.service"
    copy.write_text(text)
    return copy


@needs_analyze
def test_systemd_analyze_verify_is_clean(tmp_path: Path):
    proc = subprocess.run([ANALYZE, "verify", str(_verifiable_copy(tmp_path))],
                          capture_output=True, text=True, timeout=60)
    # verify exits 0 on unknown keys or bad values and only warns, so no output is the bar
    noise = [line for line in proc.stderr.splitlines()
             if "device-agent.service" in line or "Unknown" in line or "Failed" in line]
    assert proc.returncode == 0, proc.stderr
    assert not noise, "\n".join(noise)


@needs_analyze
def test_verify_would_catch_a_typo(tmp_path: Path):
    """The bar above can fail: a misspelt key makes verify complain."""
    copy = _verifiable_copy(tmp_path)
    copy.write_text(copy.read_text().replace("ProtectHome=yes", "ProtectHomme=yes"))
    proc = subprocess.run([ANALYZE, "verify", str(copy)], capture_output=True, text=True,
                          timeout=60)
    assert "ProtectHomme" in proc.stderr


@needs_analyze
def test_security_exposure_at_most_2():
    proc = subprocess.run([ANALYZE, "security", "--offline=true", "--no-pager", str(UNIT)],
                          capture_output=True, text=True, timeout=60)
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", proc.stdout)
    assert match, proc.stdout + proc.stderr
    assert float(match.group(1)) <= 2.0, proc.stdout


# --- the installer, into a throwaway root (never for real on this machine) ---

@pytest.mark.functional
def test_install_script_into_a_temp_root(tmp_path: Path):
    root = tmp_path / "root"
    env = {**os.environ, "DESTDIR": str(root), "SKIP_PIP": "1", "SKIP_SYSTEMCTL": "1",
           "SKIP_USER": "1"}
    proc = subprocess.run(["sh", str(INSTALL)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    unit = root / "etc/systemd/system/device-agent.service"
    assert unit.read_text() == UNIT.read_text()
    env_file = root / "etc/device-agent/device-agent.env"
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o640  # the service user reads it
    assert "STATE_DIR=/var/lib/device-agent" in env_file.read_text()
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_IOT_KEY_FILE"):
        cred = root / "etc/device-agent/credentials" / name
        assert stat.S_IMODE(cred.stat().st_mode) == 0o600
    wrapper = root / "usr/local/bin/device-agent"
    assert os.access(wrapper, os.X_OK)
    assert (root / "opt/device-agent/src/device_agent/commands/__init__.py").is_file()
    # a second run keeps an edited env file instead of overwriting it
    env_file.write_text("AWS_S3_BUCKET=kept\n")
    proc = subprocess.run(["sh", str(INSTALL)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert env_file.read_text() == "AWS_S3_BUCKET=kept\n"


# --- the unit's seccomp filter, applied for real (libseccomp), around the clock check --------

def _expand(entry: str, cache: dict[str, set[str]]) -> set[str]:
    """The syscalls a SystemCallFilter entry names (a group expanded through its groups)."""
    if not entry.startswith("@"):
        return {entry}
    if entry not in cache:
        cache[entry] = set()  # guards against a cycle
        proc = subprocess.run([ANALYZE, "syscall-filter", entry], capture_output=True,
                              text=True, timeout=30, check=True)
        names: set[str] = set()
        for line in proc.stdout.splitlines()[1:]:
            item = line.strip()
            if item and not item.startswith("#"):
                names |= _expand(item, cache)
        cache[entry] = names
    return cache[entry]


def unit_allowed_syscalls(unit_text: str) -> set[str]:
    """What the unit's SystemCallFilter= lines allow, as systemd reads them: the first line
    (no ~) is an allow list; later lines add to it, or take away with ~."""
    cache: dict[str, set[str]] = {}
    allowed: set[str] | None = None
    for line in unit_text.splitlines():
        if not line.startswith("SystemCallFilter="):
            continue
        value = line.split("=", 1)[1].strip()
        deny = value.startswith("~")
        names = set().union(*(_expand(e, cache) for e in value.lstrip("~").split()))
        if allowed is None:
            assert not deny, "the unit's filter must start as an allow list"
            allowed = names
        elif deny:
            allowed -= names
        else:
            allowed |= names
    assert allowed, "no SystemCallFilter= in the unit"
    return allowed


_UNDER_FILTER = r"""
import ctypes, json, sys
from device_agent.core import clock  # imported first: the filter is for what the check does
allowed = json.loads(sys.stdin.read())
lib = ctypes.CDLL("libseccomp.so.2")
lib.seccomp_init.restype = ctypes.c_void_p
lib.seccomp_init.argtypes = [ctypes.c_uint32]
lib.seccomp_rule_add.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int,
                                 ctypes.c_uint]
lib.seccomp_load.argtypes = [ctypes.c_void_p]
ctx = lib.seccomp_init(0x00050000 | 1)  # SCMP_ACT_ERRNO(EPERM), as SystemCallErrorNumber=
for name in allowed:
    nr = lib.seccomp_syscall_resolve_name(name.encode())
    if nr >= 0:
        assert lib.seccomp_rule_add(ctx, 0x7FFF0000, nr, 0) == 0, name  # SCMP_ACT_ALLOW
assert lib.seccomp_load(ctx) == 0
print(json.dumps({"kernel": clock.kernel_synced(),
                  "state": clock.Clock(check="ntp").state().reason}))
"""

needs_seccomp = pytest.mark.skipif(ctypes.util.find_library("seccomp") is None,
                                   reason="libseccomp2 missing: apt-get install libseccomp2")


def _clock_under(allowed: set[str]) -> dict:
    proc = subprocess.run([sys.executable, "-c", _UNDER_FILTER], input=json.dumps(
        sorted(allowed)), capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)


@needs_analyze
@needs_seccomp
def test_the_clock_check_works_under_the_units_own_seccomp_filter():
    """chrony or ntpd leave no timesyncd flag: the kernel's adjtimex state is the evidence,
    and the sandbox must let the service read it (else every capture is held forever)."""
    from device_agent.core.clock import kernel_synced

    if kernel_synced() is None:
        pytest.skip("adjtimex is not permitted on this machine even without the unit's filter")
    allowed = unit_allowed_syscalls(UNIT.read_text())
    assert "adjtimex" in allowed
    seen = _clock_under(allowed)
    assert seen["kernel"] is not None, "adjtimex was denied under the unit's filter"
    # and the check can fail: without the unit's allow line, @privileged takes adjtimex away
    without = "\n".join(line for line in UNIT.read_text().splitlines()
                        if not line.startswith("SystemCallFilter=adjtimex"))
    blocked = _clock_under(unit_allowed_syscalls(without))
    assert blocked["kernel"] is None and "no sync evidence" in blocked["state"]


# --- the field-command wrapper: as the service user, its settings, its credentials --------

WRAPPER = REPO / "systemd" / "device-agent-wrapper.sh"
AGENT_BIN = Path(sys.executable).with_name("device-agent")


@pytest.fixture
def wrapper_env():
    """A settings file, credentials and a state folder the wrapper's user (nobody) can use."""
    import tempfile

    if os.geteuid() != 0 or shutil.which("runuser") is None:
        pytest.skip("the wrapper runs commands as another user: needs root and runuser")
    # nobody plays the service user where it may run this checkout's Python; where the
    # interpreter sits in a private home (pyenv under /root) root plays it, and everything
    # but the change of user is still exercised
    probe = subprocess.run(["runuser", "-u", "nobody", "--", str(AGENT_BIN), "--version"],
                           capture_output=True, text=True, timeout=60)
    user = "nobody" if probe.returncode == 0 else "root"
    root = Path(tempfile.mkdtemp(prefix="device-agent-wrapper-"))
    os.chmod(root, 0o755)
    (root / "state").mkdir()
    shutil.chown(root / "state", user)
    (root / "run").mkdir()
    creds = root / "credentials"
    creds.mkdir(mode=0o700)
    (creds / "AWS_ACCESS_KEY_ID").write_text("AKIAWRAPPERTEST\n")
    (creds / "AWS_SECRET_ACCESS_KEY").write_text("wrapper-secret-value\n")
    (creds / "AWS_IOT_KEY_FILE").write_text("")  # the installer's empty placeholder
    env_file = root / "device-agent.env"
    env_file.write_text(f'STATE_DIR={root / "state"}\nAWS_S3_BUCKET="b" # prod\n'
                        "DEVICE_MODEL=ECG 12 Pro\nAWS_S3_REGION=eu-west-1\n")
    os.chmod(env_file, 0o644)
    env = {**os.environ, "DEVICE_AGENT_ENV_FILE": str(env_file),
           "DEVICE_AGENT_BIN": str(AGENT_BIN), "DEVICE_AGENT_CREDENTIALS": str(creds),
           "DEVICE_AGENT_USER": user, "DEVICE_AGENT_STATE": str(root / "state"),
           "DEVICE_AGENT_RUNTIME": str(root / "run")}
    yield root, env
    shutil.rmtree(root, ignore_errors=True)


@pytest.mark.functional
def test_wrapper_runs_every_command_as_the_service_with_its_settings_and_credentials(
        wrapper_env):
    root, env = wrapper_env
    proc = subprocess.run(["sh", str(WRAPPER), "config"], env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    rows = {line.split("=")[0].strip(): line for line in proc.stdout.splitlines()}
    assert "= ECG 12 Pro" in rows["DEVICE_MODEL"]  # a space in a value: one parser, no shell
    assert "= b " in rows["AWS_S3_BUCKET"]  # quotes and a trailing comment, as the agent reads
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert "***" in rows[key] and f"credential in {root / 'run'}" in rows[key]
    assert "AKIAWRAPPERTEST" not in proc.stdout + proc.stderr
    assert "wrapper-secret-value" not in proc.stdout + proc.stderr
    assert list((root / "run").iterdir()) == [], "the private copy of the credentials is gone"

    proc = subprocess.run(["sh", str(WRAPPER), "queue", "list"], env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    outbox = root / "state" / "outbox.sqlite3"
    user = env["DEVICE_AGENT_USER"]
    assert outbox.exists() and outbox.stat().st_uid == pwd.getpwnam(user).pw_uid

    code = subprocess.run(["sh", str(WRAPPER), "status"], env=env, capture_output=True,
                          text=True, timeout=60).returncode
    assert code == 1, "no service runs: status says so with its exit code, through sudo too"


@pytest.mark.functional
def test_wrapper_refuses_without_root(wrapper_env):
    root, env = wrapper_env
    # user 65534 may not be able to enter the checkout (a clone in a 0700 folder, /root):
    # it reads its own copy of the wrapper, in the fixture's 0755 folder
    wrapper = root / WRAPPER.name
    shutil.copyfile(WRAPPER, wrapper)
    os.chmod(wrapper, 0o644)
    proc = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                           "sh", str(wrapper), "status"],
                          env=env, cwd=root, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "run with sudo" in proc.stderr
