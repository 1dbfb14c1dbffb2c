"""atomic_write leaves the old file or the new one, never a torn one, and no temp litter."""

from __future__ import annotations

import hashlib
import os
import stat

import pytest

from device_agent.core import fsutil


def test_atomic_write_creates_file_with_content_and_mode(tmp_path):
    target = tmp_path / "a.json"
    fsutil.atomic_write(target, b'{"x": 1}', mode=0o600)
    assert target.read_bytes() == b'{"x": 1}'
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_atomic_write_replaces_existing_file(tmp_path):
    target = tmp_path / "a.json"
    target.write_bytes(b"old")
    fsutil.atomic_write(target, b"new")
    assert target.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_failed_rename_keeps_old_copy_and_removes_temp(tmp_path, monkeypatch):
    target = tmp_path / "a.json"
    target.write_bytes(b"old")

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fsutil.os, "replace", broken_replace)
    with pytest.raises(OSError):
        fsutil.atomic_write(target, b"new")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_atomic_write_fsyncs_file_and_folder(tmp_path, monkeypatch):
    synced: list[int] = []
    real_fsync = os.fsync

    def spy(fd):
        synced.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(fsutil.os, "fsync", spy)
    fsutil.atomic_write(tmp_path / "b.bin", b"x" * 10)
    assert len(synced) == 2  # the temp file, then the folder


def test_sha256_file_matches_hashlib(tmp_path):
    data = os.urandom(3 * 1024 * 1024 + 17)
    path = tmp_path / "blob"
    path.write_bytes(data)
    assert fsutil.sha256_file(path) == hashlib.sha256(data).hexdigest()


def test_new_files_get_the_process_umask(tmp_path):
    """The unit's UMask=0027 keeps patient files from other users: nothing widens it."""
    old = os.umask(0o027)
    try:
        fsutil.atomic_write(tmp_path / "patient_details_x.json", b"{}")
    finally:
        os.umask(old)
    assert (tmp_path / "patient_details_x.json").stat().st_mode & 0o777 == 0o640


def test_bounded_reads_never_follow_links_block_on_fifos_or_load_huge_files(tmp_path):
    from device_agent.core.fsutil import FileTooLarge, NotRegularFile, read_regular

    secret = tmp_path / "secret"
    secret.write_bytes(b"s3cret")
    link = tmp_path / "link.pdf"
    link.symlink_to(secret)
    fifo = tmp_path / "fifo.pdf"
    os.mkfifo(fifo)
    huge = tmp_path / "huge.pdf"
    with open(huge, "wb") as fh:
        fh.truncate(1 << 30)  # sparse 1 GiB
    with pytest.raises(NotRegularFile, match="symbolic link"):
        read_regular(link, max_bytes=100)
    with pytest.raises(NotRegularFile, match="FIFO"):  # opened O_NONBLOCK: never blocks
        read_regular(fifo, max_bytes=100)
    with pytest.raises(FileTooLarge):
        read_regular(huge, max_bytes=64 << 20)
    assert read_regular(secret, max_bytes=100) == b"s3cret"
