"""One place wires the parts (assemble.py): the service, `sync --once` and the demo get the
same parts for the same settings, and every part honours the settings that name it.

Each path runs as the command line runs it, up to the moment its parts would start working:
the service's `run()` and the sync loop's `run_once()` are replaced by a recorder of what
was built. The demo's copy of the wiring once built its drainer without RETRY_MAX_BACKOFF_S
and REPORT_MAX_MB; the demo test here fails on such a copy.
"""

from __future__ import annotations

import argparse
import threading
from pathlib import Path
from typing import Any

import pytest

from device_agent.assemble import Parts, assembled
from device_agent.commands import service as service_command
from device_agent.commands import sync as sync_command
from device_agent.core.config import Settings, load_settings
from device_agent.link.port import SerialReader
from device_agent.service import PackageCapture, Service
from device_agent.shipping.uploader import Uploader
from device_agent.sync import PassResult, SyncLoop

# values no default has, so a part built without its setting shows
NOT_DEFAULT = {"RETRY_MAX_BACKOFF_S": "123", "REPORT_MAX_MB": "7", "USERS_MAX_MB": "3",
               "ECG_BAUD_RATE": "57600", "ECG_BYTE_ORDER": "low-first", "CLOCK_CHECK": "floor"}


def _settings(tmp_path: Path, **env: str) -> Settings:
    base = {"STATE_DIR": str(tmp_path / "state"), "REPORTS_DIR": str(tmp_path / "reports"),
            "USERS_FILE": str(tmp_path / "users.json"), "ECG_SERIAL_PORT": str(tmp_path / "tty"),
            "DISK_RESERVE_MB": "0", "CLOUD_UPLOAD_ENABLED": "true", "AWS_S3_BUCKET": "b",
            "AWS_S3_REGION": "us-east-1", "AWS_ACCESS_KEY_ID": "k",
            "AWS_SECRET_ACCESS_KEY": "s", "AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9",
            **NOT_DEFAULT}
    base.update(env)
    return load_settings(env_file=None, environ={}, overrides=base)


def wiring(loop: SyncLoop) -> dict[str, Any]:
    """What a sync loop was built with, comparable across paths."""
    d = loop.drainer
    up = d.uploader
    assert up is None or isinstance(up, Uploader)
    return {"backoff_cap_s": d.backoff_cap_s, "report_max_bytes": d.report_max_bytes,
            "reports_max_bytes": loop.reports.max_bytes, "users_max_bytes": loop.signups.max_bytes,
            "uploader": None if up is None else (type(up), up.bucket, up.sse, up.kms_key_id,
                                                 up.owner, up.deadlines),
            "clock": (type(d.clock), d.clock.check), "one clock": d.clock is loop.clock,
            "one outbox": d.queue is loop.outbox, "one stop": d.stop is loop.stop}


def _check(w: dict[str, Any], settings: Settings) -> None:
    """The parts say what the settings say."""
    assert (w["backoff_cap_s"], w["report_max_bytes"], w["reports_max_bytes"],
            w["users_max_bytes"]) == (settings.retry_max_backoff_s, settings.report_max_bytes,
                                      settings.report_max_bytes, settings.users_max_bytes)
    bucket = None if w["uploader"] is None else w["uploader"][1]
    assert bucket == (settings.s3_bucket if settings.cloud_upload_enabled else None)
    assert w["clock"][1] == settings.clock_check
    assert w["one clock"] and w["one outbox"] and w["one stop"]


@pytest.fixture
def built(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[Any]]:
    """Every sync pass and service run is recorded instead of done."""
    seen: dict[str, list[Any]] = {"loops": [], "services": []}

    def run_once(self: SyncLoop, *, wait: bool = True) -> PassResult:
        seen["loops"].append(self)
        return PassResult()

    def run(self: Service) -> int:
        seen["services"].append(self)
        self.sync_loop.close()  # what the service's shutdown does to the parts it was given
        return 0

    monkeypatch.setattr(SyncLoop, "run_once", run_once)
    monkeypatch.setattr(Service, "run", run)
    return seen


def _sync_once(settings: Settings, built: dict[str, list[Any]]) -> dict[str, Any]:
    before = len(built["loops"])
    assert sync_command.run(settings, argparse.Namespace(wait=False)) == 0
    assert len(built["loops"]) == before + 1, "sync --once ran one pass"
    return wiring(built["loops"][-1])


def test_sync_once_and_the_service_get_equal_parts_for_equal_settings(tmp_path, built):
    settings = _settings(tmp_path)
    from_sync = _sync_once(settings, built)
    assert service_command.run(settings, argparse.Namespace()) == 0
    (service,) = built["services"]
    from_service = wiring(service.sync_loop)
    assert from_service == from_sync
    _check(from_service, settings)
    # the service's reader is the one its captures use, on the configured port and format
    reader, capture = service.reader, service.capture
    assert isinstance(reader, SerialReader) and isinstance(capture, PackageCapture)
    assert capture.reader is reader and capture.outbox is service.outbox
    assert capture.clock is service.clock is service.sync_loop.clock
    assert (reader.url, reader.baudrate, reader.decoder.byte_order) == (
        settings.serial_port, 57600, "low-first")
    assert service.kept == capture.kept, "a restart's kept captures are found by the capture"
    assert service.credentials() == {"source": "static keys (AWS_ACCESS_KEY_ID)",
                                     "expires_at": None}


def test_uploads_disabled_means_no_uploader_on_every_path(tmp_path, built):
    settings = _settings(tmp_path, CLOUD_UPLOAD_ENABLED="false")
    w = _sync_once(settings, built)
    assert w["uploader"] is None
    _check(w, settings)
    assert service_command.run(settings, argparse.Namespace()) == 0
    (service,) = built["services"]
    assert wiring(service.sync_loop) == w
    assert service.credentials() == {"source": "upload disabled"}


def test_parts_honour_each_setting_that_names_them(tmp_path):
    settings = _settings(tmp_path)
    with assembled(settings, stop=threading.Event()) as parts:
        assert isinstance(parts, Parts) and parts.uploader is not None
        loop = parts.sync_loop()
        try:
            _check(wiring(loop), settings)
        finally:
            loop.close()
        # the check itself can fail: a drainer on the default cap is told apart
        other = settings.replace(retry_max_backoff_s=900.0)
        loop = Parts(other, parts.clock, parts.outbox, parts.uploader, parts.stop).sync_loop()
        try:
            with pytest.raises(AssertionError):
                _check(wiring(loop), settings)
        finally:
            loop.close()


@pytest.mark.functional
def test_the_demo_gets_the_parts_its_settings_name(tmp_path, built):
    """The demo swaps in its board and endpoint through Settings only: its drainer and sync
    loop honour the retry cap and size limits, and equal what `sync --once` builds."""
    pytest.importorskip("moto.server")
    from device_agent.lab.demo import default_record, run_demo

    settings = _settings(tmp_path, CLOUD_UPLOAD_ENABLED="false", AWS_S3_BUCKET="")
    lines: list[str] = []
    run_demo(settings, out=tmp_path / "demo", record_path=default_record(), speed=20.0,
             echo=lines.append)
    assert any(line.startswith("sync pass:") for line in lines), lines
    (loop,) = built["loops"]
    demo = loop.settings
    assert demo.retry_max_backoff_s == 123.0 and demo.report_max_mb == 7.0, \
        "the demo keeps the settings it does not replace"
    w = wiring(loop)
    _check(w, demo)
    assert w == _sync_once(demo, built), "the demo's parts are the ones sync --once builds"
