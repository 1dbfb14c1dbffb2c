"""The package format: one capture becomes its files on disk, written atomically, manifest last.

`out_root/{stamp}/` holds `ecg_data_{stamp}.json`, `patient_details_{stamp}.json`,
`ECG_Report_{stamp}.pdf` (and `ECG_{stamp}.dcm` with PACKAGE_DICOM), then
`disposition.json` (what was decided: queued, withheld by the operator, rejected; local,
never uploaded) and last `manifest_{stamp}.json` (key, size and SHA-256 of each data file).
A folder with a manifest is complete and carries its decision; one without is the remains of
a crash and is removed after INCOMPLETE_GRACE_H. Only folders whose decision is "queued" are
queued for upload, by the capture or, after a crash between the manifest and the queue, by
shipping.enqueue.reconcile_folders; this module knows nothing of the queue.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from device_agent.core import s3keys
from device_agent.core.fsutil import atomic_write, fsync_dir, make_dirs, sha256_file
from device_agent.documents.patient import validate_patient

if TYPE_CHECKING:  # the record brings numpy, which status and sync never need
    from device_agent.core.record import Record

log = logging.getLogger(__name__)

MANIFEST_FORMAT = "device_agent.manifest/1"
# what was decided for a package (disposition.json, and the outbox's record of it)
QUEUED = "queued"
WITHHELD = "withheld"
REJECTED = "rejected"
DISPOSITIONS = (QUEUED, WITHHELD, REJECTED)
DISPOSITION_NAME = "disposition.json"
REQUIRED_KINDS = ("ecg_report_pdf", "patient_details", "ecg_12lead_data")
DATA_KINDS = (*REQUIRED_KINDS, "ecg_dicom")
# the patient details (with the record id) first: a folder a crash left part way is then
# known as this record's, and the retry writes into it rather than beside it
WRITE_ORDER = ("patient_details", "ecg_12lead_data", "ecg_report_pdf", "ecg_dicom")


@dataclass(frozen=True)
class PackageFile:
    """One file of a package on disk, with what the manifest says about it."""

    name: str
    kind: str
    path: Path
    size: int
    sha256: str


@dataclass(frozen=True)
class PackageInfo:
    """A complete package folder: its data files and the manifest that vouches for them."""

    folder: Path
    stamp: str
    date_prefix: str
    record_id: str | None
    device_serial: str
    files: tuple[PackageFile, ...]
    manifest: PackageFile
    acquired_at: str = ""

    @property
    def all_files(self) -> tuple[PackageFile, ...]:
        """The data files, then the manifest (the order they are queued and sent)."""
        return (*self.files, self.manifest)

    def key(self, file: PackageFile | str) -> str:
        """The S3 key of one of this package's files, exactly as the layout document says."""
        name = file if isinstance(file, str) else file.name
        return s3keys.package_key(self.date_prefix, self.stamp, name)


@dataclass(frozen=True)
class Disposition:
    """What was decided for a package: only `queued` is ever uploaded."""

    decision: str
    reason: str | None = None

    @property
    def uploads(self) -> bool:
        return self.decision == QUEUED


class Encoders(Protocol):
    """The byte producers of a package (the JSON, the PDF, the DICOM copy)."""

    def ecg_json(self, record: Record) -> bytes: ...

    def pdf(self, record: Record, patient: Mapping[str, Any]) -> bytes: ...

    def dicom(self, record: Record, patient: Mapping[str, Any]) -> bytes | None: ...


def file_names(stamp: str) -> dict[str, str]:
    """kind -> file name for a stamp."""
    return {
        "ecg_12lead_data": f"ecg_data_{stamp}.json",
        "patient_details": f"patient_details_{stamp}.json",
        "ecg_report_pdf": f"ECG_Report_{stamp}.pdf",
        "ecg_dicom": f"ECG_{stamp}.dcm",
        "manifest": f"manifest_{stamp}.json",
    }


def decide(record: Record, *, withheld: bool) -> Disposition:
    """The one rule: a rejected capture and a withheld one never leave the unit."""
    from device_agent.core.record import VERDICT_REJECTED

    if record.quality.verdict == VERDICT_REJECTED:
        return Disposition(REJECTED, "; ".join(record.quality.reasons) or "rejected")
    if withheld:
        return Disposition(WITHHELD, "withheld by the operator (capture --no-upload)")
    return Disposition(QUEUED)


def _package_folder(out_root: Path, stamp: str, record_id: str) -> Path:
    """out_root/{stamp}, or a deterministic distinct folder if another record holds it."""
    primary = out_root / stamp
    if not primary.exists() or _folder_record_id(primary) == record_id:
        return primary
    for candidate in (out_root / f"{stamp}_{record_id[:8]}", out_root / f"{stamp}_{record_id}"):
        if not candidate.exists() or _folder_record_id(candidate) == record_id:
            log.warning("package folder %s is taken by another record; using %s",
                        primary, candidate.name)
            return candidate
    raise FileExistsError(f"no free package folder for record {record_id} under {out_root}")


def _folder_record_id(folder: Path) -> str | None:
    for path in sorted(folder.glob("patient_details_*.json")) + sorted(
            folder.glob("manifest_*.json")):
        try:
            rid = json.loads(path.read_bytes()).get("record_id")
        except (OSError, ValueError):
            continue
        if rid:
            return str(rid)
    return None


def manifest_doc(files: Sequence[PackageFile], *, stamp: str, date_prefix: str,
                 record_id: str, device_serial: str, acquired_at: str) -> dict[str, Any]:
    """The manifest: what the package holds and where each file goes."""
    return {
        "format": MANIFEST_FORMAT,
        "stamp": stamp,
        "date_prefix": date_prefix,
        "acquired_at": acquired_at,
        "record_id": record_id,
        "device_serial": device_serial,
        "files": [
            {
                "name": f.name,
                "kind": f.kind,
                "key": s3keys.package_key(date_prefix, stamp, f.name),
                "size": f.size,
                "sha256": f.sha256,
            }
            for f in files
        ],
    }


def build_package(
    record: Record,
    patient: Mapping[str, Any] | None,
    out_root: Path,
    *,
    device_serial: str,
    encoders: Encoders,
    disposition: Disposition = Disposition(QUEUED),
    checkpoint: Callable[[str], None] = lambda name: None,
) -> PackageInfo:
    """Write one capture's package under out_root and return what was written.

    The record arrives measured (its `measurements` are computed once, at capture); the
    encoders only render it. `checkpoint` names each step for the crash campaign.
    """
    details = validate_patient(patient)  # before anything touches the disk
    record_id = record.record_id or str(uuid.uuid4())
    record = dataclasses.replace(record, record_id=record_id)
    serial = record.device.serial
    if not serial or serial == "unknown":
        serial = device_serial
    stamp = s3keys.stamp(record.acquired_at)
    date_prefix = s3keys.date_prefix(record.acquired_at)
    acquired_at = record.acquired_at.isoformat()
    names = file_names(stamp)

    out_root = Path(out_root)
    make_dirs(out_root)  # a new records folder's own name must survive a cut too
    folder = _package_folder(out_root, stamp, record_id)
    if not folder.exists():
        folder.mkdir()
        fsync_dir(out_root)
    checkpoint("package.folder")

    details.update(record_id=record_id, acquired_at=acquired_at)
    bodies: dict[str, bytes | None] = {
        "ecg_12lead_data": encoders.ecg_json(record),
        "patient_details": json.dumps(details, ensure_ascii=False, indent=2).encode("utf-8"),
        "ecg_report_pdf": encoders.pdf(record, details),
        "ecg_dicom": encoders.dicom(record, details),
    }
    written = {}
    for kind in WRITE_ORDER:
        body = bodies[kind]
        if body is None:
            continue
        path = folder / names[kind]
        atomic_write(path, body)
        written[kind] = PackageFile(names[kind], kind, path, len(body),
                                    hashlib.sha256(body).hexdigest())
        checkpoint(f"package.{kind}")
    files = [written[kind] for kind in DATA_KINDS if kind in written]
    write_disposition(folder, disposition)
    checkpoint("package.before_manifest")
    doc = manifest_doc(files, stamp=stamp, date_prefix=date_prefix, record_id=record_id,
                       device_serial=serial, acquired_at=acquired_at)
    body = json.dumps(doc, indent=2).encode("ascii")
    manifest_path = folder / names["manifest"]
    atomic_write(manifest_path, body)
    checkpoint("package.manifest")
    manifest = PackageFile(names["manifest"], "manifest", manifest_path, len(body),
                           hashlib.sha256(body).hexdigest())
    log.info("package %s written to %s (%s)", stamp, folder, disposition.decision)
    return PackageInfo(folder, stamp, date_prefix, record_id, serial, tuple(files), manifest,
                       acquired_at)


def write_disposition(folder: Path, disposition: Disposition) -> None:
    """Record what was decided for a package folder (before its manifest is written)."""
    atomic_write(folder / DISPOSITION_NAME, json.dumps(
        {"disposition": disposition.decision, "reason": disposition.reason}).encode())


def read_disposition(folder: Path) -> Disposition | None:
    """The decision recorded in a package folder; None when none is (an older agent's)."""
    try:
        doc = json.loads((Path(folder) / DISPOSITION_NAME).read_bytes())
        decision = str(doc["disposition"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{folder / DISPOSITION_NAME}: unreadable ({exc})") from exc
    if decision not in DISPOSITIONS:
        raise ValueError(f"{folder / DISPOSITION_NAME}: unknown disposition {decision!r}")
    reason = doc.get("reason")
    return Disposition(decision, str(reason) if reason else None)


def load_package(folder: Path | str) -> PackageInfo:
    """A package as its manifest on disk describes it (ValueError if absent or malformed)."""
    folder = Path(folder)
    found = sorted(folder.glob("manifest_*.json"))
    if len(found) != 1:
        raise ValueError(f"{folder}: expected one manifest_*.json, found {len(found)}")
    path = found[0]
    try:
        doc = json.loads(path.read_bytes())
        stamp, date_prefix = doc["stamp"], doc["date_prefix"]
        files = tuple(
            PackageFile(str(f["name"]), str(f["kind"]), folder / f["name"], int(f["size"]),
                        str(f["sha256"]))
            for f in doc["files"]
        )
        info = PackageInfo(
            folder, str(stamp), str(date_prefix), doc.get("record_id"),
            str(doc.get("device_serial", "")), files,
            PackageFile(path.name, "manifest", path, path.stat().st_size, sha256_file(path)),
            str(doc.get("acquired_at", "")),
        )
    except (KeyError, TypeError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not a package manifest ({exc}); move the folder aside") from exc
    kinds = {f.kind for f in files}
    if (path.name != file_names(info.stamp)["manifest"] or not set(REQUIRED_KINDS) <= kinds
            or not kinds <= set(DATA_KINDS)):
        raise ValueError(f"{path}: manifest does not match its stamp or lacks a file kind")
    for f in files:
        info.key(f)  # ValueError on a name or stamp that cannot form a key
    return info


def package_folders(records_root: Path) -> list[Path]:
    """The folders (or links to folders) under records_root, by name; one listing, no stat."""
    with os.scandir(records_root) as entries:
        names = sorted(e.name for e in entries if e.is_dir())
    return [records_root / name for name in names]


def has_manifest(folder: Path) -> bool:
    """Whether a package folder holds its manifest (the mark of a complete package)."""
    if os.path.isfile(os.path.join(folder, f"manifest_{folder.name[:15]}.json")):
        return True  # the usual case, {stamp}/ or {stamp}_{id}/: one stat, no listing
    try:
        return any(n.startswith("manifest_") and n.endswith(".json") for n in os.listdir(folder))
    except OSError:
        return False
