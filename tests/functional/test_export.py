"""`device-agent export`: the package's DICOM writer and the WFDB writer, from a stored JSON."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest

from device_agent.capture import measure_once
from device_agent.commands import main
from device_agent.documents import ecgdata
from device_agent.lab.wfdb import to_record

pytestmark = pytest.mark.functional


@pytest.fixture
def stored(tmp_path, ecg_data_dir):
    record = measure_once(to_record(ecg_data_dir / "HR06001", record_id="export-1"),
                          mains_hz=50)
    missing = record.missing.copy()
    missing[:, 1000:1010] = True  # ten lost samples on every lead
    from dataclasses import replace

    record = replace(record, missing=missing, samples=np.where(missing, 0, record.samples))
    path = tmp_path / "ecg_data_20260124_121815.json"
    path.write_bytes(ecgdata.dumps(record))
    return path, ecgdata.loads(path.read_bytes())


def test_export_wfdb_round_trips_through_our_reader(stored, tmp_path, capsys):
    path, record = stored
    assert main(["export", "--format", "wfdb", "--input", str(path),
                 "--out", str(tmp_path / "rec")]) == 0
    back = to_record(tmp_path / "rec")
    assert back.lead_names == record.lead_names
    assert np.array_equal(back.missing, record.missing)
    assert np.array_equal(np.where(back.missing, 0, back.samples),
                          np.where(record.missing, 0, record.samples))


def test_export_dicom_is_what_the_package_carries(stored, tmp_path, capsys):
    import pydicom

    path, record = stored
    out = tmp_path / "ECG.dcm"
    assert main(["export", "--format", "dicom", "--input", str(path), "--out", str(out)]) == 0
    ds = pydicom.dcmread(out)
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.9.1.1"
    group = ds.WaveformSequence[0]
    data = group.WaveformData
    samples = np.frombuffer(data, "<i2").reshape(-1, 12).T
    pad = int.from_bytes(group.WaveformPaddingValue, "little", signed=True)
    assert np.array_equal(samples == pad, record.missing)
    again = tmp_path / "again.dcm"
    assert main(["export", "--format", "dicom", "--input", str(path), "--out",
                 str(again)]) == 0
    assert again.read_bytes() == out.read_bytes(), "a re-export is byte-identical"
    if shutil.which("dciodvfy"):
        check = subprocess.run(["dciodvfy", str(out)], capture_output=True, text=True,
                               timeout=60)
        assert "Error" not in check.stderr + check.stdout, check.stderr


def test_export_names_a_bad_input_in_one_line(tmp_path, capsys):
    assert main(["export", "--format", "dicom", "--input", str(tmp_path / "nope.json"),
                 "--out", str(tmp_path / "x.dcm")]) == 1
    err = capsys.readouterr().err.strip()
    assert "nope.json" in err and len(err.splitlines()) == 1
