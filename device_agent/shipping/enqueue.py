"""Package folders into the outbox: the folders a crash left unqueued, the operator's `queue
add`, and the manifest settled to where its files really landed.

The document side (documents.package) writes and reads folders and knows nothing of the
queue; this is where a folder's decision meets the outbox. A manifest is settled
(`settle_manifest`) just before it is sent, so it lists the keys its files really landed under.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path

from device_agent.core.errors import AgentError
from device_agent.documents.package import (
    QUEUED,
    REJECTED,
    Disposition,
    PackageInfo,
    has_manifest,
    load_package,
    package_folders,
    read_disposition,
    write_disposition,
)
from device_agent.shipping.outbox import Item, Outbox

log = logging.getLogger(__name__)


def reconcile_folders(records_root: Path, outbox: Outbox) -> list[Path]:
    """Queue complete package folders the outbox does not know whose decision is "queued".

    A folder without a manifest is a capture that never finished (or is being written now):
    left alone. A withheld or rejected folder is remembered as such and never uploaded; a
    folder from an older agent with no decision recorded is not uploaded either, and is
    named once as a problem (`device-agent queue add FOLDER` sends it).
    """
    queued: list[Path] = []
    if not records_root.is_dir():
        return queued
    root = records_root.resolve()
    # a plain subfolder of the resolved root is its own real path: no resolve() per folder
    # (a month of captures is hundreds of them); a link is resolved as before
    folders = {str(root / f.name if not f.is_symlink() else f.resolve()): f
               for f in package_folders(records_root)}
    known = outbox.packages.known(folders)
    for real, folder in sorted(folders.items(), key=lambda kv: kv[1].name):
        if real in known or not has_manifest(folder):
            continue
        try:
            info = load_package(folder)
            decision = read_disposition(folder)
        except (OSError, ValueError) as exc:  # a damaged folder must not stop the others
            if outbox.problems.note("records", folder.name, f"cannot be loaded: {exc}"):
                log.error("package folder %s cannot be loaded (%s); it stays on disk, not "
                          "queued: inspect or remove it", folder, exc)
            continue
        if decision is None:
            if outbox.problems.note("records", folder.name, "no upload decision recorded"):
                log.error("package folder %s has no upload decision recorded (written by an "
                          "older agent); not uploaded: `device-agent queue add %s` sends it",
                          folder, folder)
            continue
        if not decision.uploads:
            outbox.packages.record(folder, stamp=info.stamp, record_id=info.record_id,
                                   disposition=decision.decision, reason=decision.reason,
                                   verdict=None)
            continue
        outbox.packages.add(info)
        queued.append(folder)
    return queued


def queue_folder(folder: Path, outbox: Outbox) -> PackageInfo:
    """The operator's choice to send a withheld (or older) package: record it, queue it."""
    info = load_package(folder)
    row = outbox.packages.row(folder)
    decision = read_disposition(folder)
    if (row is not None and row.disposition == REJECTED) or (
            decision is not None and decision.decision == REJECTED):
        raise AgentError(f"{folder} holds a rejected capture; it is never uploaded: capture "
                         "again")
    write_disposition(folder, Disposition(QUEUED, "queued by the operator (queue add)"))
    if row is not None and row.disposition != QUEUED:
        outbox.packages.set_disposition(folder, QUEUED, "queued by the operator (queue add)")
    outbox.packages.add(info)
    return info


def settle_manifest(manifest: Item, siblings: Sequence[Item]) -> bytes | None:
    """The manifest rewritten to list where its package's files really landed, or None.

    Two units of a fleet can stamp a capture in the same second; the later one's files then
    land under disambiguated keys (If-None-Match + SHA-256 compare), and a manifest still
    naming the plain keys would vouch for the other unit's files. The rewrite is a pure
    function of the delivered rows, so a crash anywhere in it is redone alike.
    """
    files = [s for s in siblings if s.kind != "manifest" and s.final_key]
    if all(s.final_key == s.key for s in files):
        return None
    landed = {s.filename: s.final_key for s in files}
    doc = json.loads(manifest.path.read_bytes())
    for entry in doc["files"]:
        entry["key"] = landed.get(entry["name"], entry["key"])
    body = json.dumps(doc, indent=2).encode("ascii")
    return None if hashlib.sha256(body).hexdigest() == manifest.sha256 else body
