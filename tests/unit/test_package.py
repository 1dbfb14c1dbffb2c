"""Package assembly: four files named from one stamp, manifest last, folders never clobbered."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest

from device_agent import s3keys
from device_agent.config import load_settings
from device_agent.errors import PatientDetailsError
from device_agent.fsutil import sha256_file
from device_agent.package import build_package, load_package, validate_patient
from device_agent.record import DeviceInfo, Record
from device_agent.lab.wfdb import to_record

IST = timezone(timedelta(hours=5, minutes=30))
PATIENT = {"first_name": "Test", "last_name": "Patient-7", "age": "45", "gender": "F",
           "doctor": "Dr. Synthetic", "Org.": "Demo Clinic", "patient_name": "Test Patient-7",
           "date_time": "2026-01-24 12:18:15"}


def make_record(ecg_data_dir: Path | None = None, *, when: datetime | None = None,
                record_id: str | None = None) -> Record:
    """A 12-lead record: real HR06000 if the data dir is given, else a short synthetic one."""
    when = when or datetime(2026, 1, 24, 12, 18, 15, tzinfo=IST)
    device = DeviceInfo("ECG-0042", "ECG12-PI", "test")
    if ecg_data_dir is not None:
        return to_record(ecg_data_dir / "HR06000", acquired_at=when, record_id=record_id,
                         device=device)
    samples = (np.arange(12 * 500, dtype=np.int32).reshape(12, 500) % 97) - 48
    return Record(acquired_at=when, sampling_rate=500, samples=samples,
                  missing=np.zeros(samples.shape, dtype=bool), record_id=record_id,
                  device=device)


def fake_dumps(record) -> bytes:
    return json.dumps({"record_id": record.record_id, "m": record.measurements}).encode()


def fake_pdf(record, patient, *, paper, grid) -> bytes:
    return b"%PDF-1.4 fake " + paper.encode() + grid.encode() + record.stamp.encode()


FAKES = {"dumps": fake_dumps, "render_pdf": fake_pdf, "measure": lambda r: {"hr": 60}}


@pytest.fixture
def settings(tmp_path):
    return load_settings(env_file=None, environ={}, overrides={"STATE_DIR": str(tmp_path)})


def test_package_has_layout_names_and_manifest_vouches_for_files(tmp_path, settings):
    record = make_record(record_id="11111111-2222-3333-4444-555555555555")
    info = build_package(record, PATIENT, tmp_path / "records", settings, **FAKES)
    stamp = "20260124_121815"
    assert info.folder == tmp_path / "records" / stamp
    assert sorted(p.name for p in info.folder.iterdir()) == sorted([
        f"ECG_Report_{stamp}.pdf", f"patient_details_{stamp}.json",
        f"ecg_data_{stamp}.json", f"manifest_{stamp}.json",
    ])
    assert info.date_prefix == "2026/01/24" and info.stamp == stamp
    assert info.device_serial == "ECG-0042"
    assert {info.key(f) for f in info.files} == {
        f"ecg-reports/2026/01/24/{stamp}/ECG_Report_{stamp}.pdf",
        f"ecg-reports/2026/01/24/{stamp}/patient_details_{stamp}.json",
        f"ecg-reports/2026/01/24/{stamp}/ecg_data_{stamp}.json",
    }
    doc = json.loads(info.manifest.path.read_bytes())
    assert doc["record_id"] == record.record_id and doc["device_serial"] == "ECG-0042"
    assert doc["acquired_at"] == "2026-01-24T12:18:15+05:30"
    for entry, f in zip(doc["files"], info.files, strict=True):
        assert entry["sha256"] == sha256_file(f.path) == f.sha256
        assert entry["size"] == f.path.stat().st_size == f.size
        assert entry["key"] == info.key(f)
    assert load_package(info.folder) == info
    # measurements went into the record that was encoded
    data = json.loads((info.folder / f"ecg_data_{stamp}.json").read_bytes())
    assert data["m"] == {"hr": 60}


def test_patient_details_carry_record_id_and_time(tmp_path, settings):
    record = make_record(record_id="abc")
    info = build_package(record, {**PATIENT, "record_id": "stale", "ward": "3B"}, tmp_path,
                         settings, **FAKES)
    pd = json.loads(next(f for f in info.files if f.kind == "patient_details").path.read_text())
    assert pd["record_id"] == "abc" and pd["acquired_at"] == "2026-01-24T12:18:15+05:30"
    assert pd["first_name"] == "Test" and pd["Org."] == "Demo Clinic" and pd["ward"] == "3B"


def test_record_without_id_gets_one_minted(tmp_path, settings):
    info = build_package(make_record(), None, tmp_path, settings, **FAKES)
    assert info.record_id and len(info.record_id) == 36


def test_same_second_capture_gets_its_own_folder_and_same_names(tmp_path, settings):
    a = build_package(make_record(record_id="aaaaaaaa-1"), PATIENT, tmp_path, settings, **FAKES)
    b = build_package(make_record(record_id="bbbbbbbb-2"), PATIENT, tmp_path, settings, **FAKES)
    assert a.folder != b.folder and b.folder.name == "20260124_121815_bbbbbbbb"
    assert [a.key(f) for f in a.files] == [b.key(f) for f in b.files]
    assert load_package(a.folder).record_id == "aaaaaaaa-1"  # first one untouched
    # rebuilding the same record reuses its own folder
    again = build_package(make_record(record_id="bbbbbbbb-2"), PATIENT, tmp_path, settings,
                          **FAKES)
    assert again.folder == b.folder


def test_folder_without_manifest_is_incomplete(tmp_path, settings):
    info = build_package(make_record(record_id="x1"), PATIENT, tmp_path, settings, **FAKES)
    info.manifest.path.unlink()
    with pytest.raises(ValueError, match="manifest"):
        load_package(info.folder)


def test_bad_patient_block_writes_nothing(tmp_path, settings):
    with pytest.raises(PatientDetailsError, match="age"):
        build_package(make_record(), {"age": "forty"}, tmp_path / "r", settings, **FAKES)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    "patient",
    [
        {"first_name": 7},
        {"first_name": "x" * 101},
        {"age": 200},
        {"age": True},
        {"notes": {"nested": 1}},
        {"../evil": "x"},
        {f"k{i}": i for i in range(40)},
        ["not", "a", "dict"],
    ],
)
def test_validate_patient_refuses(patient):
    with pytest.raises(PatientDetailsError):
        validate_patient(patient)


def test_validate_patient_accepts_legacy_forms():
    out = validate_patient({"age": 45, "gender": None, "first_name": "A", "height_cm": 170})
    assert out == {"age": 45, "gender": "", "first_name": "A", "height_cm": 170}
    assert validate_patient({"age": ""}) == {"age": ""}


def test_real_record_with_real_encoder_and_detector(tmp_path, settings, ecg_data_dir):
    """The real ecgdata/qrs (and report, once present) on a real recording."""
    from device_agent import ecgdata

    render = {}
    try:
        from device_agent.report import render_pdf  # noqa: F401
    except ImportError:
        render = {"render_pdf": fake_pdf}
    info = build_package(make_record(ecg_data_dir), PATIENT, tmp_path, settings, **render)
    data_file = next(f for f in info.files if f.kind == "ecg_12lead_data")
    back = ecgdata.loads(data_file.path.read_bytes())
    assert back.record_id == info.record_id
    assert 60 < back.measurements["heart_rate_bpm"] < 75  # README: 68-69 bpm
    pdf = next(f for f in info.files if f.kind == "ecg_report_pdf")
    assert pdf.path.read_bytes().startswith(b"%PDF")
    assert s3keys.stamp(back.acquired_at) == info.stamp
