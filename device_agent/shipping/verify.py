"""Does the bucket still hold what the device believes it delivered? And send it again if not.

Each object is HEADed with ChecksumMode=ENABLED. If S3 returns the object's SHA-256 checksum
(every object this agent puts carries one), size and hash are compared without downloading.
Otherwise (an object replaced by another writer, or a store that keeps no checksums) it is
downloaded and hashed: our own `sha256` metadata is never trusted as proof of content.
`repair` queues what is missing or different again (the next sync pass delivers it; the
conditional puts still decide: a different object at the key is kept, ours goes beside it).
Verify checks what the outbox still remembers: RETENTION_DAYS of history.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from device_agent.shipping.outbox import Outbox
from device_agent.shipping.uploader import Uploader

log = logging.getLogger(__name__)

OK = "ok"
MISSING = "missing"
SIZE = "size_differs"
SHA = "sha256_differs"


@dataclass(frozen=True)
class Expected:
    """An object the device believes is in the bucket (`item_id`: its outbox row)."""

    key: str
    size: int
    sha256: str
    item_id: int | None = None


@dataclass(frozen=True)
class Finding:
    """What the bucket holds for one expected object; `method` says how the hash was learnt."""

    key: str
    status: str
    expected_size: int
    actual_size: int | None
    expected_sha256: str
    actual_sha256: str | None
    method: str
    item_id: int | None = None

    @property
    def ok(self) -> bool:
        return self.status == OK


def _check(uploader: Uploader, item: Expected) -> Finding:
    key, size, sha = item.key, int(item.size), str(item.sha256).lower()
    head = uploader.head(key)
    if head is None:
        return Finding(key, MISSING, size, None, sha, None, "head", item.item_id)
    if head.sha256 and head.sha256_source == "checksum":
        actual: str | None = head.sha256
        method = "checksum"
    else:
        actual, method = uploader.download_sha256(key, head.size), "get"
        if actual is None:
            return Finding(key, MISSING, size, None, sha, None, "get", item.item_id)
    if head.size != size:
        status = SIZE
    elif actual != sha:
        status = SHA
    else:
        status = OK
    return Finding(key, status, size, head.size, sha, actual, method, item.item_id)


def verify_objects(uploader: Uploader, items: Iterable[Expected], *, max_workers: int = 4
                   ) -> list[Finding]:
    """One Finding per item, in order; UploadError if S3 cannot answer."""
    todo = list(items)
    if not todo:
        return []
    with ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="verify") as pool:
        return list(pool.map(lambda item: _check(uploader, item), todo))


def delivered_items(outbox: Outbox) -> list[Expected]:
    """What the outbox says S3 confirmed: the latest delivery for each key asked for.

    A replaced report has a row per version, a resent object a row per sending: only the
    last one must match the bucket, where it landed (its key, or the key it was kept under
    beside another writer's object).
    """
    latest: dict[str, Expected] = {}
    for row in sorted(outbox.items.delivered(), key=lambda r: r.id):
        latest[row.key] = Expected(row.final_key or row.key, row.size, row.sha256, row.id)
    return list(latest.values())


def repair(outbox: Outbox, findings: Sequence[Finding]) -> tuple[list[int], list[Finding]]:
    """Queue again what verify found missing or different; (new item ids, unrepairable)."""
    queued: list[int] = []
    lost: list[Finding] = []
    for f in findings:
        if f.ok or f.item_id is None:
            continue
        new_id = outbox.items.resend(f.item_id)
        if new_id is None:
            lost.append(f)
            log.error("cannot send %s again: its local copy was pruned or deleted", f.key)
        else:
            queued.append(new_id)
    return queued, lost
