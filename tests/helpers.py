"""Builders the tests share: synthetic records and patients, packages with or without real
encoders, small real packages on disk without rendering a record."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Mapping
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from device_agent.core.record import DeviceInfo, Record
from device_agent.documents.package import (
    Disposition,
    Encoders,
    PackageFile,
    PackageInfo,
    build_package,
    manifest_doc,
)

T = TypeVar("T")

IST = timezone(timedelta(hours=5, minutes=30))
# A synthetic patient: no real person's identity is ever used in fixtures.
PATIENT = {"first_name": "Test", "last_name": "Patient-7", "age": "45", "gender": "F",
           "doctor": "Dr. Synthetic", "Org.": "Demo Clinic", "patient_name": "Test Patient-7",
           "date_time": "2026-01-24 12:18:15"}


def present(value: T | None) -> T:
    """`value`, which the test expects to be there: a look-up's None fails the test here."""
    assert value is not None, "expected a value, got None"
    return value


def committed_items(db_path: Path, state: str | None = None) -> int:
    """Outbox items (in `state`) another connection sees: what is committed, not only written."""
    other = sqlite3.connect(db_path)
    try:
        if state is None:
            return int(other.execute("SELECT COUNT(*) FROM items").fetchone()[0])
        return int(other.execute("SELECT COUNT(*) FROM items WHERE state = ?",
                                 (state,)).fetchone()[0])
    finally:
        other.close()


def make_record(ecg_data_dir: Path | None = None, *, when: datetime | None = None,
                record_id: str | None = None, measurements: Mapping[str, Any] | None = None
                ) -> Record:
    """A 12-lead record: real HR06000 if the data dir is given, else a short synthetic one."""
    from device_agent.lab.wfdb import to_record

    when = when or datetime(2026, 1, 24, 12, 18, 15, tzinfo=IST)
    device = DeviceInfo("ECG-0042", "ECG12-PI", "test")
    if ecg_data_dir is not None:
        return to_record(ecg_data_dir / "HR06000", acquired_at=when, record_id=record_id,
                         device=device)
    samples = (np.arange(12 * 500, dtype=np.int32).reshape(12, 500) % 97) - 48
    return Record(acquired_at=when, sampling_rate=500, samples=samples,
                  missing=np.zeros(samples.shape, dtype=bool), record_id=record_id,
                  device=device, measurements=dict(measurements or {"heart_rate_bpm": 60}))


class FakeEncoders:
    """Cheap stand-ins for the JSON, PDF and DICOM encoders (package-format tests)."""

    def __init__(self, *, dicom: bool = False) -> None:
        self.with_dicom = dicom

    def ecg_json(self, record: Record) -> bytes:
        return json.dumps({"record_id": record.record_id, "m": record.measurements}).encode()

    def pdf(self, record: Record, patient: Mapping[str, Any]) -> bytes:
        return b"%PDF-1.4 fake " + record.stamp.encode()

    def dicom(self, record: Record, patient: Mapping[str, Any]) -> bytes | None:
        return b"DICM fake " + record.stamp.encode() if self.with_dicom else None


def build(record: Record, patient: Mapping[str, Any] | None, out_root: Path, *,
          disposition: Disposition | None = None, encoders: Encoders | None = None
          ) -> PackageInfo:
    """build_package with fake encoders and the test device serial."""
    kwargs: dict[str, Any] = {}
    if disposition is not None:
        kwargs["disposition"] = disposition
    return build_package(record, patient, out_root, device_serial="ECG-0042",
                         encoders=encoders or FakeEncoders(), **kwargs)


def _write(path: Path, data: bytes, kind: str) -> PackageFile:
    path.write_bytes(data)
    return PackageFile(path.name, kind, path, len(data), hashlib.sha256(data).hexdigest())


def make_package(root: Path, stamp: str = "20260124_121815", *, seed: int = 0) -> PackageInfo:
    """Write three small data files and a manifest under root/stamp (manifest last)."""
    folder = root / stamp
    folder.mkdir(parents=True, exist_ok=True)
    rid = f"rec-{stamp}-{seed}"
    files = (
        _write(folder / f"ECG_Report_{stamp}.pdf", b"%PDF-1.4 " + bytes([seed % 256]) * 2000,
               "ecg_report_pdf"),
        _write(folder / f"patient_details_{stamp}.json",
               json.dumps({"first_name": "Synthetic", "seed": seed}).encode(), "patient_details"),
        _write(folder / f"ecg_data_{stamp}.json",
               json.dumps({"leads": {"I": [seed] * 500}}).encode(), "ecg_12lead_data"),
    )
    date_prefix = f"{stamp[:4]}/{stamp[4:6]}/{stamp[6:8]}"
    (folder / "disposition.json").write_text('{"disposition": "queued", "reason": null}')
    doc = manifest_doc(files, stamp=stamp, date_prefix=date_prefix, record_id=rid,
                       device_serial="SN-TEST", acquired_at="")
    manifest = _write(folder / f"manifest_{stamp}.json", json.dumps(doc).encode(), "manifest")
    return PackageInfo(folder, stamp, date_prefix, rid, "SN-TEST", files, manifest)


def load_bench(name: str) -> Any:
    """A module of bench/ (e.g. "folds"), loaded by path: bench/ is not a package."""
    import importlib.util
    import sys

    path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
