from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from device_agent.core.config import load_settings, parse_env_file
from device_agent.core.errors import ConfigError


def test_defaults_without_env_file(tmp_path: Path):
    s = load_settings(env_file=tmp_path / "missing.env", environ={})
    assert s.sampling_rate == 500
    assert s.sync_interval_s == 15
    assert s.baud_rate == 115200
    assert s.byte_order == "high-first"
    assert s.sources["SYNC_INTERVAL_S"] == "default"


def test_layers_in_order(tmp_path: Path):
    env = tmp_path / ".env"
    env.write_text("AWS_S3_BUCKET=from-file\nDEVICE_SERIAL=file-1\nSYNC_INTERVAL_S=30\n")
    s = load_settings(
        env_file=env,
        environ={"DEVICE_SERIAL": "env-2", "SYNC_INTERVAL_S": "20", "UNRELATED": "x"},
        overrides={"SYNC_INTERVAL_S": "5"},
    )
    assert s.s3_bucket == "from-file"
    assert s.device_serial == "env-2"
    assert s.sync_interval_s == 5
    assert s.sources["AWS_S3_BUCKET"].startswith("env file")
    assert s.sources["DEVICE_SERIAL"] == "environment"
    assert s.sources["SYNC_INTERVAL_S"] == "command line"


def test_credentials_directory_layer(tmp_path: Path):
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "AWS_ACCESS_KEY_ID").write_text("AKIAEXAMPLE\n")
    (creds / "AWS_SECRET_ACCESS_KEY").write_text("s3cr3t\n")
    s = load_settings(env_file=None, environ={"CREDENTIALS_DIRECTORY": str(creds)})
    assert s.aws_secret_access_key == "s3cr3t"
    assert "credential" in s.sources["AWS_SECRET_ACCESS_KEY"]


@pytest.mark.parametrize(
    ("key", "value", "expect"),
    [
        ("ECG_BAUD_RATE", "11520", "standard baud rate"),
        ("SYNC_INTERVAL_S", "-1", "a number from"),
        ("CLOUD_SERVICE", "azure", "one of s3"),
        ("ECG_BYTE_ORDER", "middle", "high-first"),
        ("CLOUD_UPLOAD_ENABLED", "maybe", "true/false"),
        ("DEVICE_SERIAL", "../etc", "A-Z a-z 0-9"),
    ],
)
def test_bad_value_names_key_value_source(tmp_path: Path, key: str, value: str, expect: str):
    env = tmp_path / ".env"
    env.write_text(f"{key}={value}\n")
    with pytest.raises(ConfigError) as info:
        load_settings(env_file=env, environ={})
    message = str(info.value)
    assert "\n" not in message
    assert key in message and repr(value) in message and str(env) in message
    assert expect in message


def test_secret_value_never_in_error(tmp_path: Path):
    with pytest.raises(ConfigError) as info:
        load_settings(env_file=None, environ={"AWS_ACCESS_KEY_ID": "AKIAONLY"})
    assert "AKIAONLY" not in str(info.value)


def test_kms_needs_key_id():
    with pytest.raises(ConfigError, match="S3_SSE_KMS_KEY_ID"):
        load_settings(env_file=None, environ={"S3_SSE": "aws:kms"})


def test_world_readable_secrets_file_warns(tmp_path: Path, caplog):
    env = tmp_path / ".env"
    env.write_text("AWS_ACCESS_KEY_ID=AKIAX\nAWS_SECRET_ACCESS_KEY=topsecret\n")
    os.chmod(env, 0o644)
    with caplog.at_level(logging.WARNING):
        load_settings(env_file=env, environ={})
    assert any("chmod 600" in r.getMessage() for r in caplog.records)
    assert not any("topsecret" in r.getMessage() for r in caplog.records)
    caplog.clear()
    os.chmod(env, 0o600)
    with caplog.at_level(logging.WARNING):
        load_settings(env_file=env, environ={})
    assert not caplog.records


def test_env_file_syntax():
    values = parse_env_file(
        "# comment\n\nexport A=1\nB=\"two words\"\nC='x=y'\nD=val # note\n", origin="t"
    )
    assert values == {"A": "1", "B": "two words", "C": "x=y", "D": "val"}
    with pytest.raises(ConfigError, match="t:1"):
        parse_env_file("not a setting\n", origin="t")


def test_redacted_hides_secrets():
    s = load_settings(
        env_file=None,
        environ={"AWS_ACCESS_KEY_ID": "AKIAX", "AWS_SECRET_ACCESS_KEY": "topsecret"},
    )
    rows = {k: v for k, v, _ in s.redacted()}
    assert rows["AWS_SECRET_ACCESS_KEY"] == "***"
    assert rows["AWS_ACCESS_KEY_ID"] == "***"
    assert "topsecret" not in repr(s.redacted())


def test_settings_frozen():
    s = load_settings(env_file=None, environ={})
    with pytest.raises(AttributeError):
        s.sampling_rate = 250  # type: ignore[misc]


@pytest.mark.parametrize("value", ["nan", "inf", "1e9", "abc"])
def test_float_setting_refuses_nan_and_out_of_range(value: str):
    with pytest.raises(ConfigError, match="SYNC_INTERVAL_S"):
        load_settings(env_file=None, environ={"SYNC_INTERVAL_S": value})
