"""Free-space reserve, retention pruning, and a real ENOSPC on a small tmpfs."""

from __future__ import annotations

import errno
import os
import subprocess
import time
from pathlib import Path

import pytest

from device_agent.core.errors import DiskSpaceError
from device_agent.core.fsutil import atomic_write, is_disk_full
from device_agent.ops.disk import ensure_free_space, prune, remove_incomplete
from device_agent.shipping.outbox import Outbox
from tests.helpers import make_package
from tests.unit.test_sync import settings_for


@pytest.fixture
def tiny_fs(tmp_path):
    """A 1 MiB tmpfs (we run as root in CI); skipped with the reason if mount is refused."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip() or proc.returncode})")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_reserve_refuses_with_a_clear_message(tmp_path):
    with pytest.raises(DiskSpaceError) as info:
        ensure_free_space(tmp_path / "state", 10**9)
    text = str(info.value)
    assert "DISK_RESERVE_MB=1000000000" in text and str(tmp_path / "state") in text
    assert "nothing was written" in text
    ensure_free_space(tmp_path / "state" / "not-yet-created", 0)


def test_prune_deletes_only_old_delivered_packages(tmp_path):
    settings = settings_for(tmp_path)
    records = settings.state_dir / "records"
    old = make_package(records, "20260101_000001", seed=1)
    pending = make_package(records, "20260101_000002", seed=2)
    recent = make_package(records, "20260101_000003", seed=3)
    with Outbox.open(settings) as box:
        for pkg in (old, pending, recent):
            box.packages.add(pkg)
        for item in box.items.all():
            if item.package != str(pending.folder.resolve()) or item.kind != "manifest":
                box.items.mark_delivered(item.id, etag='"e"', final_key=item.key, outcome="created")
        now = time.time()
        # 'old' was delivered 31 days ago from the pruner's point of view
        result = prune(box, settings.state_dir, cutoff=now + 86400)
        assert set(result.folders) == {old.folder.resolve(), recent.folder.resolve()}
        assert pending.folder.exists(), "an undelivered record must never be pruned"
        assert result.files == 10  # 4 delivered files and the disposition, per folder
        assert all(i.pruned_at for i in box.items.all() if i.package
                   == str(old.folder.resolve()))
        again = make_package(records, "20260101_000004", seed=4)
        box.packages.add(again)
        for item in box.items.due():
            box.items.mark_delivered(item.id, etag=None, final_key=item.key, outcome="created")
        assert prune(box, settings.state_dir, cutoff=now - 86400).folders == ()  # too recent
        assert again.folder.exists()


def test_real_enospc_on_tiny_tmpfs_is_recognised_and_nothing_lost(tiny_fs):
    keep = tiny_fs / "keep.json"
    atomic_write(keep, b'{"keep": true}')
    with pytest.raises(OSError) as info:
        atomic_write(tiny_fs / "big.bin", os.urandom(2 * 1024 * 1024))
    assert info.value.errno == errno.ENOSPC
    assert is_disk_full(info.value)
    assert keep.read_bytes() == b'{"keep": true}'
    assert not list(tiny_fs.glob(".*.tmp")), "a failed atomic write must leave no temp file"
    with pytest.raises(DiskSpaceError):
        ensure_free_space(tiny_fs, 2)


def test_a_crash_left_folder_is_removed_after_the_grace_period_only(tmp_path):
    records = tmp_path / "records"
    done = make_package(records, "20260124_121815", seed=1)
    half = records / "20260124_121816"
    half.mkdir()
    (half / "ecg_data_20260124_121816.json").write_text("{}")  # killed before its manifest
    assert remove_incomplete(records, grace_s=3600) == []  # it may be being written now
    assert remove_incomplete(records, grace_s=3600, now=time.time() + 7200) == [half]
    assert not half.exists() and done.folder.exists(), "complete folders stay"


@pytest.mark.functional
def test_service_survives_a_full_disk_and_loses_nothing(tiny_fs, tmp_path):
    import threading

    from tests.conftest import wait_until
    from tests.unit.test_sync import Env

    env = Env(tmp_path, STATE_DIR=str(tiny_fs / "state"), REPORTS_DIR=str(tiny_fs / "reports"),
              RETRY_MAX_BACKOFF_S="1")
    settings, box, loop = env.settings, env.outbox, env.loop
    try:
        Path(settings.reports_dir).mkdir(parents=True)
        pkg = make_package(Path(settings.state_dir) / "records", "20260124_121815", seed=1)
        pdf = Path(settings.reports_dir) / "ECG_Report_20260124_130000.pdf"
        pdf.write_bytes(b"%PDF dropped by the legacy app")
        os.utime(pdf, (time.time() - 60, time.time() - 60))
        filler = _fill(tiny_fs)
        results = [loop.run_once() for _ in range(3)]
        errors = [e for r in results for e in r.errors]
        assert errors, "a pass on a full disk must report it"
        assert any("disk full" in e and "nothing stored was lost" in e for e in errors), errors
        assert all("\n" not in e for e in errors)
        assert pkg.folder.exists() and pdf.exists()

        passes: list[object] = []
        runner = threading.Thread(target=loop.run, name="sync-run",
                                  kwargs={"on_pass": lambda r, e: passes.append(r)})
        runner.start()
        try:
            wait_until(lambda: len(passes) >= 3, what="passes on the full disk")
            assert runner.is_alive(), "the service must keep running on a full disk"
            filler.unlink()
            wait_until(lambda: box.stats().pending == 0 and box.stats().delivered == 5,
                       timeout=15, what="delivery once space is back")
        finally:
            env.stop.set()
            runner.join(timeout=5)
        keys = sorted(env.uploader.objects)
        assert len(keys) == 5 and not [k for k in keys if k.endswith("__dup")]
        assert (Path(settings.reports_dir) / "upload_log.json").exists()
    finally:
        env.close()


def _fill(folder: Path) -> Path:
    """Fill the file system under `folder` to its last byte; the filler's path."""
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for _ in range(100_000):
            os.write(fd, b"\0" * 4096)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return filler


def _cli_flags(mnt: Path) -> list[str]:
    values = {"STATE_DIR": mnt / "state", "REPORTS_DIR": mnt / "reports",
              "USERS_FILE": mnt / "users.json", "CLOUD_UPLOAD_ENABLED": "false",
              "DISK_RESERVE_MB": "0", "CLOCK_CHECK": "floor",
              "ECG_SERIAL_PORT": mnt / "ttyNONE"}
    return [arg for key, value in values.items() for arg in ("--set", f"{key}={value}")]


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "unexpected" not in err and "OperationalError" not in err, err
    return err


@pytest.mark.functional
def test_commands_on_a_full_disk_say_so_in_one_line_with_exit_3(tiny_fs, capsys):
    from device_agent.commands import main

    flags = _cli_flags(tiny_fs)
    assert main([*flags, "sync", "--once"]) == 0  # the outbox exists, then the disk fills
    make_package(tiny_fs / "state" / "records", "20260124_121815", seed=1)
    capsys.readouterr()
    _fill(tiny_fs)
    for command in (["sync", "--once"], ["queue", "list"]):
        assert main([*flags, *command]) == 3, command
        line = _one_error_line(capsys)
        assert "disk full" in line and "STATE_DIR" in line, line


@pytest.mark.functional
def test_commands_on_a_read_only_state_dir_say_so_in_one_line_with_exit_3(tiny_fs, capsys):
    from device_agent.commands import main

    flags = _cli_flags(tiny_fs)
    assert main([*flags, "sync", "--once"]) == 0
    make_package(tiny_fs / "state" / "records", "20260124_121815", seed=1)
    capsys.readouterr()
    # root ignores file modes: only a read-only mount stops its writes
    proc = subprocess.run(["mount", "-o", "remount,ro", str(tiny_fs)], capture_output=True,
                          text=True, check=False)
    if proc.returncode != 0:
        pytest.skip(f"cannot remount read-only here ({proc.stderr.strip()})")
    for command in (["sync", "--once"], ["queue", "list"]):
        assert main([*flags, *command]) == 3, command
        line = _one_error_line(capsys)
        assert "read-only" in line and "STATE_DIR" in line, line


@pytest.mark.functional
def test_the_service_logs_a_full_disk_once_until_it_changes(tiny_fs, tmp_path, caplog):
    """The sync loop's steps and the status writer meet one full disk: one line for it,
    one when it ends, one again when it comes back; never a traceback per report."""
    import logging

    from device_agent.core.clock import Clock
    from device_agent.ops.notify import Notifier
    from device_agent.service import Service
    from tests.functional.test_service import FakeReader
    from tests.unit.test_sync import Env

    env = Env(tmp_path, STATE_DIR=str(tiny_fs / "state"), REPORTS_DIR=str(tiny_fs / "reports"))
    service = Service(env.settings, reader=FakeReader(False), sync_loop=env.loop,
                      outbox=env.outbox, capture=lambda r: {"ok": True},
                      kept=lambda record_id: None, notifier=Notifier(None),
                      stop=env.stop, clock=Clock(check="floor"))
    service.publish()  # status.json exists, as on a running unit
    try:
        reports = Path(env.settings.reports_dir)
        reports.mkdir(parents=True)
        for n in range(5):  # dropped reports the outbox has not met yet
            pdf = reports / f"ECG_Report_2026012{n}_130000.pdf"
            pdf.write_bytes(os.urandom(20_000))
            os.utime(pdf, (time.time() - 60, time.time() - 60))
        filler = _fill(tiny_fs)
        caplog.set_level(logging.INFO, logger="device_agent")
        results = []
        for _ in range(4):
            results.append(env.loop.run_once())
            service.publish()
        assert all(r.errors for r in results), "every pass still reports the condition"
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(errors) == 1, errors
        assert "disk full" in errors[0] and "nothing stored was lost" in errors[0], errors
        assert not [r for r in caplog.records if r.exc_info], "no traceback per report"
        caplog.clear()
        filler.unlink()
        result = env.loop.run_once()
        service.publish()
        assert result.reports_queued == 5 and not result.errors
        ended = [r.getMessage() for r in caplog.records]
        assert len([m for m in ended if m.startswith("no longer: ") and "disk full" in m]) == 1
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING], ended
        caplog.clear()
        _fill(tiny_fs)  # the condition again: logged again, once
        for _ in range(2):
            env.loop.run_once()
            service.publish()
        again = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(again) == 1 and "disk full" in again[0], again
    finally:
        env.close()
