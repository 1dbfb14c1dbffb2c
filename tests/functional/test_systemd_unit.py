"""The unit file: systemd-analyze verify passes and the sandbox rates 2.0 or lower."""

from __future__ import annotations

import configparser
import os
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
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze not installed")


def _unit_values() -> dict[str, list[str]]:
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    parser.optionxform = str  # keys are case-sensitive
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
    assert v["Service.ConfigurationDirectory"] == ["device-agent"]
    assert v["Service.DevicePolicy"] == ["closed"]
    assert v["Service.CapabilityBoundingSet"] == [""]
    assert any("char-ttyUSB" in d for d in v["Service.DeviceAllow"])
    assert any("char-ttyACM" in d for d in v["Service.DeviceAllow"])
    creds = {c.split(":")[0] for c in v["Service.LoadCredential"]}
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= creds
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
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    assert "STATE_DIR=/var/lib/device-agent" in env_file.read_text()
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
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
