"""Package assembly: one capture becomes four files on disk, written atomically, manifest last.

`out_root/{stamp}/` holds `ecg_data_{stamp}.json`, `patient_details_{stamp}.json`,
`ECG_Report_{stamp}.pdf` and then `manifest_{stamp}.json` (key, size and SHA-256 of the
three). A folder with a manifest is complete; one without is the remains of a crash.
Heavy modules (numpy via ecgdata/qrs, reportlab via report) are imported inside functions.

Patient block policy: the legacy keys are type- and length-checked; other keys are kept as
given if they are short scalars (a field a newer front end adds must not cost a patient's
ECG), nested values and oversized blocks are refused. `record_id` and `acquired_at` are ours.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from device_agent import s3keys
from device_agent.errors import PatientDetailsError
from device_agent.fsutil import atomic_write, fsync_dir, sha256_file

log = logging.getLogger(__name__)

MANIFEST_FORMAT = "device_agent.manifest/1"
DATA_KINDS = ("ecg_report_pdf", "patient_details", "ecg_12lead_data")
_TEXT_KEYS = {"first_name": 100, "last_name": 100, "patient_name": 200, "doctor": 200,
              "Org.": 200, "gender": 20, "date_time": 40}
_MAX_EXTRA_KEYS = 32
_MAX_TEXT = 500
_KEY_RE = re.compile(r"^[A-Za-z0-9 ._-]{1,64}$")


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
    """A complete package folder: the three data files and the manifest that vouches for them."""

    folder: Path
    stamp: str
    date_prefix: str
    record_id: str | None
    device_serial: str
    files: tuple[PackageFile, ...]
    manifest: PackageFile
    acquired_at: str = ""

    def key(self, file: PackageFile | str) -> str:
        """The S3 key of one of this package's files, exactly as the layout document says."""
        name = file if isinstance(file, str) else file.name
        return s3keys.package_key(self.date_prefix, self.stamp, name)


def file_names(stamp: str) -> dict[str, str]:
    """kind -> file name for a stamp."""
    return {
        "ecg_12lead_data": f"ecg_data_{stamp}.json",
        "patient_details": f"patient_details_{stamp}.json",
        "ecg_report_pdf": f"ECG_Report_{stamp}.pdf",
        "manifest": f"manifest_{stamp}.json",
    }


def validate_patient(patient: Mapping[str, Any] | None) -> dict[str, Any]:
    """The patient block checked for types and lengths; raises PatientDetailsError."""
    if patient is None:
        return {}
    if not isinstance(patient, Mapping):
        raise PatientDetailsError(
            f"patient details must be a JSON object, got {type(patient).__name__}; "
            "fix the capture request"
        )
    out: dict[str, Any] = {}
    extra = 0
    for key, value in patient.items():
        if key in ("record_id", "acquired_at"):
            continue  # ours, set from the record; a stale copy from the front end is dropped
        if not isinstance(key, str) or not _KEY_RE.match(key):
            raise PatientDetailsError(
                f"patient details key {str(key)[:40]!r} is not 1-64 letters, digits, space . _ -"
            )
        if key == "age":
            out[key] = _age(value)
            continue
        if key in _TEXT_KEYS:
            limit = _TEXT_KEYS[key]
        else:
            extra += 1
            limit = _MAX_TEXT
            if extra > _MAX_EXTRA_KEYS:
                raise PatientDetailsError(
                    f"patient details have more than {_MAX_EXTRA_KEYS} unknown keys; "
                    "send only the patient block"
                )
            if value is None or isinstance(value, bool | int | float):
                out[key] = value
                continue
        if value is None:
            out[key] = ""
            continue
        if not isinstance(value, str):
            raise PatientDetailsError(
                f"patient details field {key!r} must be text, got {type(value).__name__}"
            )
        if len(value) > limit:
            raise PatientDetailsError(
                f"patient details field {key!r} is {len(value)} characters; at most {limit}"
            )
        out[key] = value
    return out


def _age(value: Any) -> int | str:
    # The legacy front end sends age as text ("45" or ""); keep its form, check the range.
    if value is None or value == "":
        return ""
    ok_type = isinstance(value, str | int) and not isinstance(value, bool)
    text = str(value).strip() if ok_type else ""
    if not text.isdigit() or not 0 <= int(text) <= 150:
        raise PatientDetailsError(
            f"patient details field 'age' must be a whole number 0-150, got {str(value)[:20]!r}"
        )
    return value if isinstance(value, int) else text


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
    try:
        return load_package(folder).record_id
    except (OSError, ValueError):
        return None


def _manifest_doc(info_files: list[PackageFile], *, stamp: str, date_prefix: str,
                  record_id: str, device_serial: str, acquired_at: str) -> dict[str, Any]:
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
            for f in info_files
        ],
    }


def build_package(
    record: Any,
    patient: Mapping[str, Any] | None,
    out_root: Path,
    settings: Any,
    *,
    dumps: Callable[[Any], bytes] | None = None,
    render_pdf: Callable[..., bytes] | None = None,
    measure: Callable[[Any], dict] | None = None,
) -> PackageInfo:
    """Write one capture's package under out_root and return what was written."""
    details = validate_patient(patient)  # before anything touches the disk
    if dumps is None:
        from device_agent.ecgdata import dumps
    if render_pdf is None:
        from device_agent.report import render_pdf
    if measure is None:
        from device_agent import qrs

        def measure(rec: Any) -> dict:
            return qrs.measurements(rec, mains_hz=float(settings.mains_hz))

    record_id = record.record_id or str(uuid.uuid4())
    record = dataclasses.replace(
        record, record_id=record_id,
        measurements={**record.measurements, **measure(record)},
    )
    serial = record.device.serial
    if not serial or serial == "unknown":
        serial = settings.device_serial
    stamp = s3keys.stamp(record.acquired_at)
    date_prefix = s3keys.date_prefix(record.acquired_at)
    acquired_at = record.acquired_at.isoformat()
    names = file_names(stamp)

    out_root = Path(out_root)
    out_root.mkdir(parents=True, exist_ok=True)
    folder = _package_folder(out_root, stamp, record_id)
    if not folder.exists():
        folder.mkdir()
        fsync_dir(out_root)

    details.update(record_id=record_id, acquired_at=acquired_at)
    bodies = {
        "ecg_12lead_data": _as_bytes(dumps(record)),
        "patient_details": json.dumps(details, ensure_ascii=False, indent=2).encode("utf-8"),
        "ecg_report_pdf": _as_bytes(
            render_pdf(record, details, paper=settings.report_paper, grid=settings.report_grid)
        ),
    }
    files = []
    for kind in DATA_KINDS:
        path = folder / names[kind]
        atomic_write(path, bodies[kind])
        files.append(PackageFile(names[kind], kind, path, path.stat().st_size, sha256_file(path)))

    doc = _manifest_doc(files, stamp=stamp, date_prefix=date_prefix, record_id=record_id,
                        device_serial=serial, acquired_at=acquired_at)
    manifest_path = folder / names["manifest"]
    atomic_write(manifest_path, json.dumps(doc, indent=2).encode("ascii"))
    manifest = PackageFile(names["manifest"], "manifest", manifest_path,
                           manifest_path.stat().st_size, sha256_file(manifest_path))
    log.info("package %s written to %s", stamp, folder)
    return PackageInfo(folder, stamp, date_prefix, record_id, serial, tuple(files), manifest,
                       acquired_at)


def _as_bytes(data: bytes | str) -> bytes:
    return data.encode("utf-8") if isinstance(data, str) else bytes(data)


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
    if path.name != file_names(info.stamp)["manifest"] or kinds != set(DATA_KINDS):
        raise ValueError(f"{path}: manifest does not match its stamp or lacks a file kind")
    for f in files:
        info.key(f)  # ValueError on a name or stamp that cannot form a key
    return info
