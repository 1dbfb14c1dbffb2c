"""Disk space: refuse to start writing under the reserve, and prune what S3 already holds.

Only records whose every file S3 confirmed (and the outbox committed) are pruned, and only
after RETENTION_DAYS; an undelivered file is never deleted, however full the disk.
"""

from __future__ import annotations

import errno
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from device_agent.errors import DiskSpaceError

log = logging.getLogger(__name__)

_MB = 1024 * 1024


def free_mb(path: Path) -> float:
    """Free space for unprivileged writers on the filesystem holding `path` (MiB)."""
    probe = Path(path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free / _MB


def ensure_free_space(settings: Any, path: Path) -> None:
    """Raise DiskSpaceError if writing under `path` would eat into DISK_RESERVE_MB."""
    free = free_mb(path)
    if free < settings.disk_reserve_mb:
        raise DiskSpaceError(
            f"only {free:.0f} MB free on the disk holding {path}, under the reserve of "
            f"DISK_RESERVE_MB={settings.disk_reserve_mb}: nothing was written; let pending "
            "records upload (retention then prunes them) or free space on the SD card"
        )


def is_disk_full(exc: BaseException) -> bool:
    """True for ENOSPC/EDQUOT, or SQLite's 'database or disk is full'."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return "disk is full" in str(exc) or "No space left" in str(exc)


def disk_full_error(exc: BaseException, path: Path) -> DiskSpaceError:
    """The one-line message for a write that hit a full disk."""
    return DiskSpaceError(
        f"disk full while writing {path}: nothing already stored was lost and the write "
        "will be retried; free space on the SD card or lower RETENTION_DAYS"
    )


@dataclass(frozen=True)
class PruneResult:
    folders: tuple[Path, ...]
    files: int
    freed_bytes: int


def prune(outbox: Any, settings: Any, *, now: float | None = None) -> PruneResult:
    """Delete local copies of delivered packages and signups older than RETENTION_DAYS."""
    now = time.time() if now is None else now
    cutoff = now - settings.retention_days * 86400
    state_dir = Path(settings.state_dir).resolve()
    by_package: dict[str, list[Any]] = {}
    singles: list[Any] = []
    for item in outbox.items():
        if item.pruned_at is not None:
            continue
        if item.package:
            by_package.setdefault(item.package, []).append(item)
        elif item.source == "signup":
            singles.append(item)
    folders: list[Path] = []
    pruned_ids: list[int] = []
    files = freed = 0
    for package, items in by_package.items():
        if not all(i.state == "delivered" and i.delivered_at is not None
                   and i.delivered_at <= cutoff for i in items):
            continue
        folder = Path(package)
        if state_dir not in folder.parents:
            # only the agent's own records are ever deleted
            log.warning("not pruning %s: outside STATE_DIR %s", folder, state_dir)
            continue
        held = {i.path for i in items}
        on_disk = list(folder.iterdir()) if folder.is_dir() else []
        if any(p not in held for p in on_disk if p.is_file()):
            log.warning("not pruning %s: it holds files the outbox does not know", folder)
            continue
        for p in on_disk:
            freed += p.stat().st_size
            files += 1
        if folder.exists():
            shutil.rmtree(folder)
        folders.append(folder)
        pruned_ids.extend(i.id for i in items)
    for item in singles:
        if item.state == "delivered" and item.delivered_at and item.delivered_at <= cutoff:
            if state_dir in item.path.resolve().parents and item.path.exists():
                freed += item.path.stat().st_size
                files += 1
                item.path.unlink()
            pruned_ids.append(item.id)
    if pruned_ids:
        outbox.mark_pruned(pruned_ids)
        log.info("retention: pruned %d delivered files (%d packages, %.1f MB)",
                 files, len(folders), freed / _MB)
    return PruneResult(tuple(folders), files, freed)
