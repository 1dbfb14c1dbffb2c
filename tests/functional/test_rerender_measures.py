"""A record that carries no measurements is measured when it is re-rendered (issue 24, 1).

The input is a legacy-shaped ecg_data file (`{timestamp, sampling_rate, leads}`, leads in
mV as JSON floats, the shape the legacy desktop app writes; see tests/data/legacy/README.md)
made here from LUDB record 1 (tests/data/ludb, ODC-By 1.0): it has no `measurements` key.
`report` prints what `measure` gives for the same file, the footer says the values were
measured at rendering, and `export --format dicom` carries the same values.
"""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from device_agent.commands import main
from device_agent.commands.documents import MEASURED_AT_RENDERING
from device_agent.documents import dicom
from device_agent.lab import ludb
from tests.conftest import REPO
from tests.functional.test_report_agrees import HEADER, _printed

pytestmark = [
    pytest.mark.functional,
    pytest.mark.skipif(shutil.which("pdftotext") is None,
                       reason="pdftotext missing: apt-get install poppler-utils"),
]
LUDB = REPO / "tests" / "data" / "ludb"


@pytest.fixture
def legacy_file(tmp_path):
    record = ludb.load_record(LUDB, 1)
    doc = {
        "timestamp": "2026-01-17 12:10:50",
        "sampling_rate": record.sampling_rate,
        "leads": {name: [round(float(v) / 1000.0, 3) for v in record.samples[i]]
                  for i, name in enumerate(record.lead_names)},
    }
    path = tmp_path / "ecg_data_20260117_121050.json"
    path.write_text(json.dumps(doc))
    return path


def _measured(path, capsys) -> dict:
    assert main(["measure", "--json", str(path)]) == 0
    line: dict = json.loads(capsys.readouterr().out.splitlines()[-1])
    return line


def test_a_legacy_record_is_measured_when_its_report_is_rendered(legacy_file, tmp_path,
                                                                 capsys):
    expected = _measured(legacy_file, capsys)
    assert all(expected[n] is not None for n in ("heart_rate_bpm", "pr_ms", "qrs_ms", "qt_ms"))
    out = tmp_path / "report.pdf"
    assert main(["report", "--input", str(legacy_file), "--out", str(out)]) == 0
    text = subprocess.run(["pdftotext", "-layout", str(out), "-"], capture_output=True,
                          text=True, check=True, timeout=60).stdout
    printed = _printed(text)
    for label, names in HEADER.items():
        want = ["-" if expected[n] is None else f"{expected[n]:.0f}" for n in names]
        assert printed[label] == want, (label, printed[label], want)
    flat = " ".join(text.split())
    assert MEASURED_AT_RENDERING in flat
    assert "not measured" not in flat.lower().replace(MEASURED_AT_RENDERING, "")


def test_the_dicom_export_of_such_a_record_carries_the_same_values(legacy_file, tmp_path,
                                                                   capsys):
    import pydicom

    expected = _measured(legacy_file, capsys)
    out = tmp_path / "ECG.dcm"
    assert main(["export", "--format", "dicom", "--input", str(legacy_file),
                 "--out", str(out)]) == 0
    ds = pydicom.dcmread(out)
    by_meaning = {meaning: key for key, (_, _, meaning, _) in dicom.MEASUREMENT_CODES.items()}
    got = {by_meaning[item.ConceptNameCodeSequence[0].CodeMeaning]: float(item.NumericValue)
           for item in ds.WaveformAnnotationSequence if "NumericValue" in item}
    want = {k: float(expected[k]) for k in dicom.MEASUREMENT_CODES if expected.get(k) is not None}
    assert want and got == pytest.approx(want, abs=0.051)


def test_a_measured_record_keeps_its_own_values_and_reasons(legacy_file, tmp_path, capsys):
    """A record measured at capture is rendered as it is: its nulls are verdicts, not gaps."""
    doc = json.loads(legacy_file.read_text())
    doc["measurements"] = {"heart_rate_bpm": 61.0, "rr_ms": 984, "pr_ms": None,
                           "reasons": {"pr_ms": "synthetic reason kept"}, "method": "capture"}
    legacy_file.write_text(json.dumps(doc))
    out = tmp_path / "report.pdf"
    assert main(["report", "--input", str(legacy_file), "--out", str(out)]) == 0
    text = subprocess.run(["pdftotext", "-layout", str(out), "-"], capture_output=True,
                          text=True, check=True, timeout=60).stdout
    assert _printed(text)["Vent. rate"] == ["61"] and _printed(text)["PR interval"] == ["-"]
    assert "synthetic reason kept" in text and MEASURED_AT_RENDERING not in " ".join(text.split())
