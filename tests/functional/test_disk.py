"""Free-space reserve, retention pruning, and a real ENOSPC on a small tmpfs."""

from __future__ import annotations

import errno
import os
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from device_agent.disk import ensure_free_space, is_disk_full, prune
from device_agent.errors import DiskSpaceError
from device_agent.fsutil import atomic_write
from device_agent.outbox import Outbox
from tests.helpers import make_package


def _settings(tmp_path: Path, **kw):
    base = dict(state_dir=tmp_path / "state", disk_reserve_mb=0, retention_days=30.0,
                retry_max_backoff_s=60.0, reports_dir=tmp_path / "reports")
    base.update(kw)
    return SimpleNamespace(**base)


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
        ensure_free_space(_settings(tmp_path, disk_reserve_mb=10**9), tmp_path / "state")
    text = str(info.value)
    assert "DISK_RESERVE_MB=1000000000" in text and str(tmp_path / "state") in text
    assert "nothing was written" in text
    ensure_free_space(_settings(tmp_path), tmp_path / "state" / "not-yet-created")


def test_prune_deletes_only_old_delivered_packages(tmp_path):
    settings = _settings(tmp_path)
    records = settings.state_dir / "records"
    old = make_package(records, "20260101_000001", seed=1)
    pending = make_package(records, "20260101_000002", seed=2)
    recent = make_package(records, "20260101_000003", seed=3)
    with Outbox.open(settings) as box:
        for pkg in (old, pending, recent):
            box.add_package(pkg)
        for item in box.items():
            if item.package != str(pending.folder.resolve()) or item.kind != "manifest":
                box.mark_delivered(item.id, etag='"e"', final_key=item.key, outcome="created")
        now = time.time()
        # 'old' was delivered 31 days ago from the pruner's point of view
        result = prune(box, settings, now=now + 31 * 86400)
        assert set(result.folders) == {old.folder.resolve(), recent.folder.resolve()}
        assert pending.folder.exists(), "an undelivered record must never be pruned"
        assert result.files == 8
        assert all(i.pruned_at for i in box.items() if i.package
                   == str(old.folder.resolve()))
        again = make_package(records, "20260101_000004", seed=4)
        box.add_package(again)
        for item in box.due():
            box.mark_delivered(item.id, etag=None, final_key=item.key, outcome="created")
        assert prune(box, settings, now=now).folders == ()  # delivered but too recent
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
        ensure_free_space(SimpleNamespace(disk_reserve_mb=2), tiny_fs)


@pytest.mark.functional
def test_service_survives_a_full_disk_and_loses_nothing(tiny_fs, tmp_path):
    import random
    import threading

    from device_agent.package import load_package
    from device_agent.sync import SyncLoop
    from tests.conftest import wait_until
    from tests.functional.test_sync import FakeUploader, _real_package

    settings = _settings(tmp_path, state_dir=tiny_fs / "state",
                         reports_dir=tiny_fs / "reports",
                         users_file=tmp_path / "users.json", sync_interval_s=0.05,
                         retry_max_backoff_s=1.0, clock_check="floor")
    settings.reports_dir.mkdir(parents=True)
    uploader = FakeUploader()
    stop = threading.Event()
    with Outbox.open(settings) as box:
        loop = SyncLoop(settings, outbox=box, uploader=uploader, stop=stop,
                        rng=random.Random(1), backoff_base_s=0.1, load_package=load_package)
        pkg = _real_package(settings.state_dir / "records", "20260124_121815", 1)
        pdf = settings.reports_dir / "ECG_Report_20260124_130000.pdf"
        pdf.write_bytes(b"%PDF dropped by the legacy app")
        os.utime(pdf, (time.time() - 60, time.time() - 60))
        filler = tiny_fs / "filler"
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o644)
        try:  # fill the disk to the last byte
            for _ in range(100_000):
                os.write(fd, b"\0" * 4096)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
        finally:
            os.close(fd)
        results = [loop.run_once() for _ in range(3)]
        errors = [e for r in results for e in r.errors]
        assert errors, "a pass on a full disk must report it"
        assert any("disk full" in e and "nothing stored was lost" in e for e in errors), errors
        assert all("\n" not in e for e in errors)
        assert pkg.folder.exists() and pdf.exists()

        runner = threading.Thread(target=loop.run, name="sync-run")
        runner.start()
        try:
            time.sleep(0.3)  # a few passes on the full disk: the loop must keep going
            assert runner.is_alive(), "the service must keep running on a full disk"
            filler.unlink()
            wait_until(lambda: box.stats().pending == 0 and box.stats().delivered == 5,
                       timeout=15, what="delivery once space is back")
        finally:
            stop.set()
            runner.join(timeout=5)
        keys = sorted(uploader.objects)
        assert len(keys) == 5 and not [k for k in keys if k.endswith("__dup")]
        assert (settings.reports_dir / "upload_log.json").exists()
