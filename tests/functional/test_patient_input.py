"""The patient file from outside: the legacy app's keys print where a clinician looks (the
PDF header, read back with pdftotext; the DICOM patient module, read back with pydicom),
and text that is not Unicode is refused before the board is touched (issues 22 and 23)."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from device_agent.capture import PackageEncoders, measure_once
from device_agent.commands import main
from device_agent.core.config import load_settings
from device_agent.documents.patient import read_patient
from device_agent.lab.simulator import BoardSimulator
from device_agent.lab.wfdb import to_record
from tests.conftest import REPO
from tests.helpers import build
from tests.unit.test_dicom import read

pytestmark = pytest.mark.functional
LEGACY_PATIENT = REPO / "tests" / "data" / "legacy" / "patient_details.json"
CPM = 400.0


def _package(tmp_path: Path, ecg_data_dir: Path, patient: Mapping[str, Any] | None):
    s = load_settings(environ={}, overrides={"STATE_DIR": str(tmp_path)})
    record = measure_once(to_record(ecg_data_dir / "HR06000", record_id="pat-1"), mains_hz=50)
    info = build(record, patient, tmp_path / "records", encoders=PackageEncoders(s))
    by_kind = {f.kind: f.path for f in info.files}
    return by_kind["ecg_report_pdf"], read(by_kind["ecg_dicom"].read_bytes())


def _pdf_text(path: Path) -> str:
    if not shutil.which("pdftotext"):
        pytest.skip("pdftotext (poppler-utils) is not installed")
    out = subprocess.run(["pdftotext", "-layout", str(path), "-"], check=True,
                         capture_output=True, text=True).stdout
    return " ".join(out.split())


def test_every_legacy_patient_key_prints_in_the_pdf_and_the_dicom(tmp_path, ecg_data_dir):
    pdf, ds = _package(tmp_path, ecg_data_dir, read_patient(LEGACY_PATIENT))
    text = _pdf_text(pdf)
    for shown in ("Zyxwa Qwertzu Synthetic", "ID 7", "Age 39", "Sex Male",
                  "Ref. Dr Vexilla Synthetic (tel 5550142)", "Org. Synthetic Path Lab",
                  "Details taken 2026-01-27 17:52:10"):
        assert shown in text, shown
    assert "Quality:" in text, "the quality line still prints below the longer header"
    assert str(ds.PatientName) == "Qwertzu Synthetic^Zyxwa"
    assert (ds.PatientID, ds.PatientAge, ds.PatientSex) == ("7", "039Y", "M")
    assert str(ds.ReferringPhysicianName) == "Dr Vexilla Synthetic^"
    assert ds.ReferringPhysicianTelephoneNumbers == "5550142"
    assert ds.InstitutionName == "Synthetic Path Lab"
    stored = json.loads(next((tmp_path / "records").glob("*/patient_details_*.json"))
                        .read_text())
    ours = {"record_id", "acquired_at"}
    assert {k: v for k, v in stored.items() if k not in ours} == json.loads(
        LEGACY_PATIENT.read_text()), "every key passes through"


def test_a_name_under_the_legacy_name_key_is_not_dropped(tmp_path, ecg_data_dir):
    pdf, ds = _package(tmp_path, ecg_data_dir, {"name": "Vrex Synthetic", "age": "50"})
    assert "Vrex Synthetic" in _pdf_text(pdf)
    assert str(ds.PatientName) == "Vrex Synthetic^"


def test_a_lone_surrogate_in_the_patient_file_is_refused_before_the_board_is_read(
        tmp_path, ecg_data_dir, capsys):
    patient = tmp_path / "patient.json"
    patient.write_text('{"first_name": "Syn\\ud800x", "age": "40"}')
    state = tmp_path / "state"
    flags = ["--set", f"STATE_DIR={state}", "--set", "CLOCK_CHECK=floor",
             "--set", "DISK_RESERVE_MB=0", "--set", f"ECG_COUNTS_PER_MV={CPM}",
             "--set", "CLOUD_UPLOAD_ENABLED=false"]
    link = tmp_path / "board"
    with BoardSimulator(ecg_data_dir / "HR06000", link, counts_per_mv=CPM, speed=25,
                        loop=True):
        rc = main([*flags, "capture", "--direct", "--port", str(link), "--seconds", "2",
                   "--patient", str(patient)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, err
    assert len(err) == 1 and "'first_name' holds a lone surrogate" in err[0]
    assert not list(state.glob("records/*")), "nothing captured, nothing half-written"


def test_report_and_export_read_the_patient_file_through_the_same_gate(
        tmp_path, ecg_data_dir, capsys):
    from device_agent.documents import ecgdata

    data = tmp_path / "ecg_data_20261127_093000.json"
    data.write_bytes(ecgdata.dumps(to_record(ecg_data_dir / "HR06000", record_id="pat-2")))
    patient = tmp_path / "patient.json"
    patient.write_text('{"patient_name": "Syn\\udcffx"}')
    for command in (["report", "--input", str(data), "--patient", str(patient),
                     "--out", str(tmp_path / "r.pdf")],
                    ["export", "--format", "dicom", "--input", str(data),
                     "--patient", str(patient), "--out", str(tmp_path / "r.dcm")]):
        assert main(command) == 2, command[0]
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "'patient_name' holds a lone surrogate" in err[0], err
    assert not list(tmp_path.glob("r.*")), "nothing written"
