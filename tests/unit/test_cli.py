from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from device_agent import __version__
from device_agent.commands import main


def test_config_prints_redacted(tmp_path: Path, capsys, monkeypatch):
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY", raising=False)
    monkeypatch.delenv("AWS_ACCESS_KEY_ID", raising=False)
    env = tmp_path / ".env"
    env.write_text("AWS_S3_BUCKET=ecg-bucket\nAWS_ACCESS_KEY_ID=AKIAEXAMPLE\n"
                   "AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI\n")
    os.chmod(env, 0o600)
    assert main(["--env-file", str(env), "config"]) == 0
    out = capsys.readouterr().out
    assert "ecg-bucket" in out
    assert "wJalrXUtnFEMI" not in out and "AKIAEXAMPLE" not in out
    assert "AWS_SECRET_ACCESS_KEY" in out and "***" in out
    assert f"env file {env}" in out


@pytest.mark.parametrize("line", ["ECG_BAUD_RATE=11520", "SYNC_INTERVAL_S=-1",
                                  "CLOUD_SERVICE=azure"])
def test_bad_value_is_one_line_and_exit_2(tmp_path: Path, capsys, line: str):
    env = tmp_path / ".env"
    env.write_text(line + "\n")
    assert main(["--env-file", str(env), "config"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    key, value = line.split("=")
    assert key in err and value in err


def test_set_override_unknown_key_names_the_closest(capsys, tmp_path: Path):
    env = tmp_path / ".env"
    env.write_text("")
    assert main(["--env-file", str(env), "--set", "AWS_S3_BUKET=b", "config"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "AWS_S3_BUKET" in err and "did you mean AWS_S3_BUCKET?" in err


def test_misspelt_keys_in_env_file_and_environment_warn_with_the_closest(
        capsys, tmp_path: Path, monkeypatch):
    env = tmp_path / ".env"
    env.write_text("AWS_S3_BUKET=ecg\nECG_SERIAL_PROT=/dev/ttyUSB1\n")
    monkeypatch.setenv("ECG_BAUD_RAT", "9600")
    monkeypatch.setenv("CLOUD_SDK_VERSION", "4")  # another program's variable: not ours
    assert main(["--env-file", str(env), "config"]) == 0
    err = capsys.readouterr().err
    assert "AWS_S3_BUKET" in err and "did you mean AWS_S3_BUCKET?" in err
    assert "ECG_SERIAL_PROT" in err and "did you mean ECG_SERIAL_PORT?" in err
    assert "ECG_BAUD_RAT" in err and "did you mean ECG_BAUD_RATE?" in err
    assert "CLOUD_SDK_VERSION" not in err


def test_named_env_file_that_does_not_exist_is_an_error(capsys, tmp_path: Path):
    assert main(["--env-file", str(tmp_path / "nope.env"), "config"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "nope.env does not exist" in err


def test_default_env_file_may_be_absent(capsys, tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["config"]) == 0


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert __version__ in capsys.readouterr().out


def _imported_modules(args: list[str], cwd: Path) -> set[str]:
    code = (
        "import sys, json\n"
        "from device_agent.commands import main\n"
        "try:\n"
        f"    main({args!r})\n"
        "except SystemExit:\n"
        "    pass\n"
        "print(json.dumps(sorted(sys.modules)), file=sys.__stderr__)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True,
                          text=True, timeout=60)
    return set(json.loads(proc.stderr.strip().splitlines()[-1]))


@pytest.mark.parametrize("args", [["--help"], ["config"], ["status"], ["status", "--json"]])
def test_light_commands_import_no_heavy_library(tmp_path: Path, args: list[str]):
    modules = _imported_modules(list(args), tmp_path)
    heavy = {m for m in modules if m.split(".")[0] in {"numpy", "boto3", "botocore",
                                                       "reportlab", "serial"}}
    assert "device_agent.commands" in modules
    assert not heavy, f"{args} imported {sorted(heavy)[:5]}"


def test_python_dash_m(tmp_path: Path):
    proc = subprocess.run([sys.executable, "-m", "device_agent", "--version"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and __version__ in proc.stdout
