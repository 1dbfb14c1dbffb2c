"""dicom.encode_ecg output checked by dciodvfy (dicom3tools), David Clunie's IOD validator."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest

from device_agent.core.record import Record
from device_agent.documents.dicom import DisplayFilter, Equipment, encode_ecg
from device_agent.lab.wfdb import to_record

pytestmark = [
    pytest.mark.functional,
    pytest.mark.skipif(shutil.which("dciodvfy") is None,
                       reason="dciodvfy missing: apt-get install dicom3tools"),
]

AT = datetime(2026, 11, 27, 9, 30, 5, 125000, tzinfo=timezone(timedelta(hours=-5)))
EQUIPMENT = Equipment("Example Medical", "ECG12-PI", "SN-0042", "0.1.0")
# synthetic: no real person
PATIENT = {"first_name": "Testa", "last_name": "Synthetica", "age": 59, "gender": "Female",
           "patient_id": "SYN-0001", "date_of_birth": "1967-03-14", "doctor": "Dr Example",
           "Org.": "Test Clinic"}
MEASUREMENTS = {"heart_rate_bpm": 68.6, "rr_ms": 875, "pr_ms": 158, "qrs_ms": 94,
                "qt_ms": 392, "qtc_bazett_ms": 419.1, "qtc_fridericia_ms": 410.0,
                "p_axis_deg": 52, "qrs_axis_deg": -12, "t_axis_deg": 38}


def _record(ecg_data_dir, name: str, *, seconds: float | None = None) -> Record:
    record = to_record(ecg_data_dir / name, seconds=seconds, acquired_at=AT,
                       record_id=f"validator-{name}")
    missing = record.missing.copy()
    missing[:, 300:340] = True
    return dataclasses.replace(record, samples=np.where(missing, 0, record.samples),
                               missing=missing, measurements=dict(MEASUREMENTS))


def dciodvfy(data: bytes, tmp_path) -> tuple[list[str], list[str]]:
    """(error lines, warning lines) dciodvfy reports for a file holding `data`."""
    path = tmp_path / "ecg.dcm"
    path.write_bytes(data)
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60,
                         check=False)
    lines = (run.stdout + run.stderr).splitlines()
    assert any(line.strip() == "TwelveLeadECG" for line in lines), lines  # the IOD it checked
    return ([line for line in lines if line.startswith("Error")],
            [line for line in lines if line.startswith("Warning")])


# The one warning expected: Study ID (type 2) is empty, as no study ID is assigned here.
EXPECTED_WARNINGS = {"Warning - Missing attribute or value that would be needed to build "
                     "DICOMDIR - Study ID"}


@pytest.mark.parametrize("name,seconds", [("HR06000", None), ("HR06003", None),
                                          ("s0010_re", 10)])
def test_full_record_with_patient_measurements_and_filters_has_no_errors(
    ecg_data_dir, tmp_path, name, seconds
):
    data = encode_ecg(_record(ecg_data_dir, name, seconds=seconds), PATIENT, equipment=EQUIPMENT,
                      filters=DisplayFilter(0.05, 150.0, 50.0))
    errors, warnings = dciodvfy(data, tmp_path)
    assert errors == []
    assert set(warnings) <= EXPECTED_WARNINGS, warnings


def test_bare_record_without_patient_or_measurements_has_no_errors(ecg_data_dir, tmp_path):
    record = dataclasses.replace(_record(ecg_data_dir, "HR06001"), measurements={},
                                 record_id=None, acquired_at=datetime(2026, 1, 2, 8, 0))
    errors, warnings = dciodvfy(encode_ecg(record, None, equipment=Equipment()), tmp_path)
    assert errors == []
    # no patient block: Patient ID is empty too (type 2), which a DICOMDIR would want
    no_id = ("Warning - Missing attribute or value that would be needed to build DICOMDIR - "
             "Patient ID")
    assert set(warnings) <= EXPECTED_WARNINGS | {no_id}, warnings


def test_non_ascii_patient_and_coarse_lead_have_no_errors(ecg_data_dir, tmp_path):
    record = _record(ecg_data_dir, "HR06002")
    samples = record.samples.copy()
    samples[7] = samples[7] * 40  # past int16 at 1 uV a unit: a coarser sensitivity
    record = dataclasses.replace(record, samples=np.where(record.missing, 0, samples))
    patient = {"first_name": "Zoë", "last_name": "Ñúñez", "patient_name": "ignored",
               "gender": "O", "age": "7", "patient_id": "ÄB-1", "doctor": "Dr Ödön Example"}
    errors, warnings = dciodvfy(encode_ecg(record, patient, equipment=EQUIPMENT), tmp_path)
    assert errors == []
    assert set(warnings) <= EXPECTED_WARNINGS, warnings
