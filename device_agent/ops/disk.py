"""Disk space: refuse to start writing under the reserve, prune what S3 already holds, and
remove what a crash left half-written.

Only records whose every file S3 confirmed (and the outbox committed) are pruned, and only
after RETENTION_DAYS; an undelivered file is never deleted, however full the disk. A
capture folder without a manifest was never acknowledged (the capture died while writing
it): it holds patient data nobody will ever send, so it is removed after
INCOMPLETE_GRACE_H.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from device_agent.core.errors import DiskSpaceError
from device_agent.core.fsutil import free_mb
from device_agent.documents.package import DISPOSITION_NAME, has_manifest, package_folders
from device_agent.shipping.outbox import Outbox

log = logging.getLogger(__name__)

_MB = 1024 * 1024


def ensure_free_space(path: Path, reserve_mb: int) -> None:
    """Raise DiskSpaceError if writing under `path` would eat into DISK_RESERVE_MB."""
    free = free_mb(path)
    if free < reserve_mb:
        raise DiskSpaceError(
            f"only {free:.0f} MB free on the disk holding {path}, under the reserve of "
            f"DISK_RESERVE_MB={reserve_mb}: nothing was written; let pending records upload "
            "(retention then prunes them) or free space on the SD card")


@dataclass(frozen=True)
class PruneResult:
    folders: tuple[Path, ...]
    files: int


def prune(outbox: Outbox, state_dir: Path, *, cutoff: float) -> PruneResult:
    """Delete local copies of delivered packages and signups delivered before `cutoff`."""
    state_dir = Path(state_dir).resolve()
    by_package: dict[str, list[int]] = {}
    paths: dict[int, Path] = {}
    ready: dict[str, bool] = {}
    singles = []
    for item in outbox.items.prunable(cutoff):
        old = item.state == "delivered" and item.delivered_at is not None and (
            item.delivered_at <= cutoff)
        if item.package:
            by_package.setdefault(item.package, []).append(item.id)
            paths[item.id] = item.path
            ready[item.package] = ready.get(item.package, True) and old
        elif item.source == "signup" and old:
            singles.append(item)
    folders: list[Path] = []
    pruned_ids: list[int] = []
    files = freed = 0
    for package, ids in by_package.items():
        if not ready[package]:
            continue
        folder = Path(package)
        if state_dir not in folder.parents:
            log.warning("not pruning %s: outside STATE_DIR %s", folder, state_dir)
            continue
        held = {paths[i] for i in ids} | {folder / DISPOSITION_NAME}
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
        pruned_ids.extend(ids)
    for item in singles:
        if state_dir in item.path.resolve().parents and item.path.exists():
            freed += item.path.stat().st_size
            files += 1
            item.path.unlink()
        pruned_ids.append(item.id)
    if pruned_ids:
        outbox.items.mark_pruned(pruned_ids)
        log.info("retention: pruned %d delivered files (%d packages, %.1f MB)",
                 files, len(folders), freed / _MB)
    return PruneResult(tuple(folders), files)


def remove_incomplete(records_root: Path, *, grace_s: float,
                      now: float | None = None) -> list[Path]:
    """Remove capture folders without a manifest untouched for `grace_s`; returns them."""
    now = time.time() if now is None else now
    removed: list[Path] = []
    if not records_root.is_dir():
        return removed
    for folder in package_folders(records_root):
        if has_manifest(folder):
            continue
        try:
            newest = max([folder.stat().st_mtime,
                          *(p.lstat().st_mtime for p in folder.iterdir())])
        except OSError:
            continue
        if now - newest < grace_s:
            continue  # being written now, or recently killed: a person may still look
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
        log.warning("removed %s: a capture that never finished (no manifest) %.0f h ago; it "
                    "was never queued", folder, (now - newest) / 3600)
    return removed
