"""Every package opens in the hospital: its ECG_{stamp}.dcm, and PACKAGE_DICOM=false."""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest

from device_agent.capture import PackageEncoders, measure_once
from device_agent.core.config import load_settings
from device_agent.documents import ecgdata
from device_agent.documents.dicom import MEASUREMENT_CODES
from device_agent.documents.package import load_package
from device_agent.lab.wfdb import to_record
from tests.helpers import PATIENT, build
from tests.unit.test_dicom import numeric_annotations, read, stored_and_uv

pytestmark = pytest.mark.functional


def _package(tmp_path, ecg_data_dir, **settings):
    s = load_settings(environ={}, overrides={"STATE_DIR": str(tmp_path), **settings})
    record = measure_once(to_record(ecg_data_dir / "HR06000", record_id="dcm-1"), mains_hz=50)
    return build(record, PATIENT, tmp_path / "records", encoders=PackageEncoders(s))


def test_the_package_carries_a_valid_dicom_ecg_equal_to_its_json(tmp_path, ecg_data_dir):
    info = _package(tmp_path, ecg_data_dir)
    dcm = next(f for f in info.files if f.kind == "ecg_dicom")
    assert dcm.name == f"ECG_{info.stamp}.dcm"
    listed = {e["name"] for e in json.loads(info.manifest.path.read_bytes())["files"]}
    assert dcm.name in listed, "listed in the manifest, so it is uploaded before it"
    assert load_package(info.folder) == info
    ds = read(dcm.path.read_bytes())
    js = ecgdata.loads(next(f for f in info.files if f.kind == "ecg_12lead_data")
                       .path.read_bytes())
    _raw, step, uv = stored_and_uv(ds)
    error = np.abs(uv - js.samples)
    assert np.all(error <= step[:, None] / 2 + 1e-9), "every sample within one step"
    got = numeric_annotations(ds)
    for key, (scheme, code, _meaning, _unit) in MEASUREMENT_CODES.items():
        value = js.measurements.get(key)
        if value is None and key == "rr_ms":
            value = js.measurements.get("rr_mean_ms")
        if value is None:
            assert (scheme, code) not in got, f"{key} is not measured, so not annotated"
        else:
            assert got[(scheme, code)][0] == pytest.approx(value, abs=0.05), key
    assert ds.PatientName.family_name == "Patient-7"
    if shutil.which("dciodvfy"):
        check = subprocess.run(["dciodvfy", str(dcm.path)], capture_output=True, text=True,
                               timeout=60)
        errors = [line for line in (check.stdout + check.stderr).splitlines()
                  if line.startswith("Error")]
        assert errors == [], errors


def test_package_dicom_off_gives_exactly_the_layout_documents_package(tmp_path, ecg_data_dir):
    info = _package(tmp_path, ecg_data_dir, PACKAGE_DICOM="false")
    names = sorted(f.name for f in info.all_files)
    stamp = info.stamp
    assert names == sorted([f"ECG_Report_{stamp}.pdf", f"patient_details_{stamp}.json",
                            f"ecg_data_{stamp}.json", f"manifest_{stamp}.json"])
