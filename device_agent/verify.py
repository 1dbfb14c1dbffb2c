"""`device-agent verify`: does the bucket still hold what the device believes it delivered?

Each object is HEADed with ChecksumMode=ENABLED. If S3 returns the object's SHA-256 checksum
(every object this agent puts carries one), size and hash are compared without downloading.
Otherwise (an object replaced by another writer, or a store that keeps no checksums) it is
downloaded and hashed: our own `sha256` metadata is never trusted as proof of content.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

OK = "ok"
MISSING = "missing"
SIZE = "size_differs"
SHA = "sha256_differs"


@dataclass(frozen=True)
class Expected:
    """An object the device believes is in the bucket."""

    key: str
    size: int
    sha256: str
    source: str = ""


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
    source: str = ""

    @property
    def ok(self) -> bool:
        return self.status == OK


def _check(uploader: Any, item: Any) -> Finding:
    key, size, sha = item.key, int(item.size), str(item.sha256).lower()
    source = getattr(item, "source", "")
    head = uploader.head(key)
    if head is None:
        return Finding(key, MISSING, size, None, sha, None, "head", source)
    if head["sha256"] and head["sha256_source"] == "checksum":
        actual, method = head["sha256"], "checksum"
    else:
        actual, method = uploader.download_sha256(key), "get"
        if actual is None:
            return Finding(key, MISSING, size, None, sha, None, "get", source)
    if head["size"] != size:
        status = SIZE
    elif actual != sha:
        status = SHA
    else:
        status = OK
    return Finding(key, status, size, head["size"], sha, actual, method, source)


def verify_objects(uploader: Any, items: Iterable[Any], *, max_workers: int = 4
                   ) -> list[Finding]:
    """One Finding per item (key, size, sha256), in order; UploadError if S3 cannot answer."""
    items = list(items)
    if not items:
        return []
    with ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="verify") as pool:
        return list(pool.map(lambda item: _check(uploader, item), items))


def delivered_items(settings: Any) -> list[Expected]:
    """What the outbox says S3 confirmed: the latest delivery of each key."""
    from device_agent.outbox import DB_NAME, Outbox

    if not (Path(settings.state_dir) / DB_NAME).exists():
        return []
    with Outbox.open(settings) as box:
        rows = box.delivered()
    latest: dict[str, Expected] = {}
    for row in sorted(rows, key=lambda r: r.id):
        key = row.final_key or row.key
        # a replaced report has a row per version; only the last one must match the bucket
        latest[key] = Expected(key, row.size, row.sha256, f"outbox #{row.id}")
    return list(latest.values())


def cmd_verify(settings: Any, args: Any) -> int:
    """Check every delivered object against the bucket; exit 1 if any is missing or different."""
    from device_agent.cli import echo
    from device_agent.uploader import Uploader

    expected = delivered_items(settings)
    uploader = Uploader.from_settings(settings)
    uploader.check_bucket()
    findings = verify_objects(uploader, expected)
    problems = [f for f in findings if not f.ok]
    methods = sorted({f.method for f in findings})
    if getattr(args, "json", False):
        echo(json.dumps({
            "bucket": uploader.bucket,
            "checked": len(findings),
            "problems": len(problems),
            "findings": [{**asdict(f), "ok": f.ok} for f in findings],
        }, indent=2))
    else:
        if problems:
            width = max(len(f.status) for f in problems)
            for f in problems:
                detail = (f"expected {f.expected_size} B sha256 {f.expected_sha256[:12]}, "
                          f"found {'-' if f.actual_size is None else f'{f.actual_size} B'}"
                          f"{'' if f.actual_sha256 is None else ' sha256 ' + f.actual_sha256[:12]}")
                echo(f"{f.status:<{width}}  s3://{uploader.bucket}/{f.key}  {detail}")
        echo(f"verified {len(findings)} objects in s3://{uploader.bucket}: "
             f"{len(findings) - len(problems)} ok, {len(problems)} missing or different"
             + (f" (hash by {', '.join(methods)})" if methods else ""))
    if problems:
        log.error("verify: %d of %d delivered objects are missing or different in s3://%s",
                  len(problems), len(findings), uploader.bucket)
    return 1 if problems else 0

