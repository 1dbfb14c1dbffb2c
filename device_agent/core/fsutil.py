"""File-system edges: crash-safe writes, bounded reads that never follow links, locks, space.

Writes go to a temp file, fsync, rename, fsync the folder (as mailbox.Maildir.add): the only
copy of anything is never rewritten in place, so a reader sees the old file or the new one,
never half of either, even if power is cut mid-write. New files get the process umask (the
unit's UMask=0027 keeps patient files from other users). Reads of files other programs put
in our folders open with O_NOFOLLOW|O_NONBLOCK and accept only regular files up to a size:
a symlink to /etc/passwd, a FIFO named *.pdf or a 1 GiB file is refused, never followed,
blocked on or loaded.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import secrets
import shutil
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

from device_agent.core.s3keys import display_key

log = logging.getLogger(__name__)

_CHUNK = 1 << 20
_MB = 1024 * 1024
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class NotRegularFile(OSError):
    """The path is a symlink, FIFO, device, socket or folder, not a regular file."""


class FileTooLarge(OSError):
    """The file is over the size the caller allows."""


def fsync_dir(path: Path | str) -> None:
    """Make a rename or create inside folder `path` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dirs(path: Path | str) -> None:
    """`mkdir -p` whose new folders survive a power cut: each one's parent is fsynced after."""
    path = Path(path)
    missing = []
    while not path.is_dir():
        missing.append(path)
        path = path.parent
    for folder in reversed(missing):
        folder.mkdir(exist_ok=True)
        fsync_dir(folder.parent)


def atomic_write(path: Path | str, data: bytes, *, mode: int = 0o666) -> None:
    """Write `data` to `path` so a crash leaves the old file or the new one (mode & ~umask)."""
    path = Path(path)
    folder = path.parent
    tmp = folder / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(folder)
    # a signup's file is named after its user: the log shows a hash (s3keys.display_key)
    log.debug("wrote %s (%d bytes)", display_key(str(path)), len(data))


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def atomic_extend(path: Path | str, keep: int, data: bytes, *, mode: int = 0o666) -> None:
    """Replace `path`, as atomic_write does, by its first `keep` bytes and then `data`.

    The kept bytes are copied in 1 MiB chunks, never read whole: a large file gains a few
    lines at the cost of a copy, not of a parse or of its size in RAM. (Plain reads and
    writes, not copy_file_range: the power-cut campaign replays every write it traced.)
    """
    path = Path(path)
    folder = path.parent
    tmp = folder / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    src = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     mode)
        try:
            try:
                left = keep
                while left > 0:
                    chunk = os.read(src, min(left, 1 << 20))
                    if not chunk:
                        raise OSError(f"{path} shrank while it was being extended")
                    left -= len(chunk)
                    _write_all(fd, chunk)
                _write_all(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
    finally:
        os.close(src)
    fsync_dir(folder)


@contextlib.contextmanager
def open_regular(path: Path | str, *, max_bytes: int) -> Iterator[tuple[int, os.stat_result]]:
    """An fd of a regular file at `path` (never through a link) no larger than max_bytes."""
    try:
        fd = os.open(path, _READ_FLAGS)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise NotRegularFile(errno.ELOOP, "a symbolic link, not followed", str(path)) from exc
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularFile(errno.EINVAL, f"not a regular file ({_kind(st.st_mode)})",
                                 str(path))
        if st.st_size > max_bytes:
            raise FileTooLarge(errno.EFBIG, f"{st.st_size} bytes, over the limit of "
                                            f"{max_bytes}", str(path))
        yield fd, st
    finally:
        os.close(fd)


def read_regular(path: Path | str, *, max_bytes: int) -> bytes:
    """The whole content of a bounded regular file (a file that grows past the bound fails)."""
    with open_regular(path, max_bytes=max_bytes) as (fd, _):
        chunks = []
        left = max_bytes + 1
        while left > 0:
            chunk = os.read(fd, min(_CHUNK, left))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
    data = b"".join(chunks)
    if len(data) > max_bytes:
        raise FileTooLarge(errno.EFBIG, f"grew past the limit of {max_bytes} bytes while being "
                                        "read", str(path))
    return data


def hash_regular(path: Path | str, *, max_bytes: int) -> tuple[str, os.stat_result]:
    """(SHA-256 hex, stat) of a bounded regular file, streamed in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open_regular(path, max_bytes=max_bytes) as (fd, st):
        total = 0
        while chunk := os.read(fd, _CHUNK):
            total += len(chunk)
            if total > max_bytes:
                raise FileTooLarge(errno.EFBIG, "grew past the limit while being read",
                                   str(path))
            digest.update(chunk)
    return digest.hexdigest(), st


def sha256_file(path: Path | str) -> str:
    """Hex SHA-256 of one of the agent's own files, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISLNK, "a symbolic link")):
        if test(mode):
            return name
    return "not a regular file"


def existing_ancestor(path: Path | str) -> Path:
    """`path` if it exists, else the nearest folder above it that does (what a write
    under `path` would meet first: its file system, or a file in the way)."""
    probe = Path(path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return probe


def free_mb(path: Path | str) -> float:
    """Free space for unprivileged writers on the filesystem holding `path` (MiB)."""
    probe = existing_ancestor(path)
    return shutil.disk_usage(probe).free / _MB


def is_disk_full(exc: BaseException) -> bool:
    """True for ENOSPC/EDQUOT, or SQLite's 'database or disk is full'."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return "disk is full" in str(exc) or "No space left" in str(exc)


def storage_condition(exc: BaseException, folder: Path | str) -> str | None:
    """"full" or "read-only" when `exc` (an OSError or an SQLite error) came from the
    storage under `folder` rather than from one file, else None.

    SQLite often says only "disk I/O error" when its journal cannot grow or be written; the
    file system under `folder` (or the nearest part of it that exists) then says which.
    """
    if is_disk_full(exc):
        return "full"
    if isinstance(exc, OSError) and exc.errno == errno.EROFS:
        return "read-only"
    name = str(getattr(exc, "sqlite_errorname", "") or "")
    if name.startswith("SQLITE_READONLY") or "readonly database" in str(exc):
        return "read-only"
    if not (name.startswith(("SQLITE_IOERR", "SQLITE_CANTOPEN"))
            or (isinstance(exc, OSError) and exc.errno in (errno.EIO, errno.EACCES))):
        return None
    probe = existing_ancestor(folder)
    try:
        fs = os.statvfs(probe)
    except OSError:
        return None
    if fs.f_flag & os.ST_RDONLY:
        return "read-only"
    if fs.f_bavail == 0 or (fs.f_favail == 0 and fs.f_files > 0):
        return "full"
    return None


def storage_message(condition: str, folder: Path | str) -> str:
    """The one line a full or read-only STATE_DIR gets, for a command and for the log."""
    if condition == "full":
        return (f"disk full under STATE_DIR {folder}; nothing stored was lost: free space on "
                "the SD card, or lower RETENTION_DAYS")
    return (f"STATE_DIR {folder} is on a read-only file system; nothing stored was lost: "
            "remount it read-write (a card the kernel remounted read-only may be "
            "failing: see dmesg)")


class FileLock:
    """An exclusive flock on one file; the kernel drops it when the process dies.

    The one lock helper: the service lock (STATE_DIR/service.lock, pid written inside) and
    the drain lock (STATE_DIR/outbox.lock) are both this.
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, *, wait: bool = False, stop: threading.Event | None = None,
                poll_s: float = 0.1, write_pid: bool = False) -> bool:
        """Take the lock; with wait, poll until it is free or `stop` is set."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        idle = stop or threading.Event()
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not wait or idle.wait(poll_s):
                    os.close(fd)
                    return False
                continue
            break
        if write_pid:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock; the file stays (harmless)
            self._fd = None

    def holder_pid(self) -> int | None:
        """The pid written by the process holding the lock, -1 if unknown, None if free."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                text = os.read(fd, 64).decode(errors="replace").strip()
                return int(text) if text.isdigit() else -1
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        finally:
            os.close(fd)
