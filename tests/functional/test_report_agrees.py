"""The PDF says what the JSON says, value by value: measured once, rendered twice.

A 60 Hz capture (mains set to 60), two with hum over 500 uV (notched and measured), one
in atrial fibrillation (no PR), a rejected one and a
noisy one: each goes through the package encoders as a capture does, and the numbers the
PDF header prints (read back with pdftotext) equal the JSON's, "-" exactly where the JSON
has null.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from dataclasses import replace

import numpy as np
import pytest

from device_agent.capture import PackageEncoders, measure_once
from device_agent.core.config import load_settings
from device_agent.core.record import Quality, Record
from device_agent.lab import ludb
from device_agent.lab.wfdb import to_record
from tests.conftest import ECG_DATA, REPO
from tests.helpers import PATIENT, build
from tests.unit.test_measurements import as_board, with_noise

pytestmark = [
    pytest.mark.functional,
    pytest.mark.skipif(shutil.which("pdftotext") is None,
                       reason="pdftotext missing: apt-get install poppler-utils"),
]
LUDB = REPO / "tests" / "data" / "ludb"

# header label -> the JSON names it prints, in order (QT/QTcB prints two numbers)
HEADER = {
    "Vent. rate": ("heart_rate_bpm",),
    "RR interval": ("rr_ms",),
    "PR interval": ("pr_ms",),
    "QRS duration": ("qrs_ms",),
    "QT/QTcB": ("qt_ms", "qtc_bazett_ms"),
    "QTcF": ("qtc_fridericia_ms",),
    "P-R-T axes": ("p_axis_deg", "qrs_axis_deg", "t_axis_deg"),
}


def _hum(record: Record, hz: float, uv: float) -> Record:
    t = np.arange(record.n_samples) / record.sampling_rate
    hum = np.rint(uv * np.sin(2 * np.pi * hz * t)).astype(np.int32)
    return replace(record, samples=record.samples + hum)


def _rejected(record: Record) -> Record:
    missing = record.missing.copy()
    missing[:, 1500:1750] = True  # half a second lost everywhere
    quality = Quality(frames_expected=5000, frames_received=4750, frames_lost=250,
                      verdict="rejected",
                      reasons=("lost 250 of 5000 samples (5.00%), over the 0.50% allowed",))
    return replace(record, samples=np.where(missing, 0, record.samples), missing=missing,
                   quality=quality)


CASES = {
    "60 Hz mains": (lambda: _hum(to_record(ECG_DATA / "HR06001"), 60.0, 200.0), 60),
    # hum over what was once refused outright is notched and measured (issue 24)
    "60 Hz mains 1500 uV": (lambda: _hum(as_board(ludb.load_record(LUDB, 1)), 60.0, 1500.0),
                            60),
    "50 Hz mains 600 uV": (lambda: _hum(to_record(ECG_DATA / "HR06002"), 50.0, 600.0), 50),
    "atrial fibrillation": (lambda: as_board(ludb.load_record(LUDB, 83)), 50),
    "rejected": (lambda: _rejected(to_record(ECG_DATA / "HR06000")), 50),
    "noisy": (lambda: with_noise(ludb.load_record(LUDB, 3), 120.0), 50),
}


def _printed(text: str) -> dict[str, list[str]]:
    """The header's numbers as printed: label -> its tokens ("72", "-", "380", ...)."""
    found = {}
    for label in HEADER:
        match = re.search(re.escape(label) + r"\s+([-\d/]+)(?: bpm| ms| deg|\s{2,}|\n)", text)
        assert match, f"{label!r} not on the page"
        found[label] = match.group(1).split("/")
    return found


@pytest.mark.parametrize("case", CASES)
def test_pdf_header_equals_the_json_value_by_value(case, tmp_path):
    make, mains = CASES[case]
    settings = load_settings(environ={}, overrides={"STATE_DIR": str(tmp_path),
                                                    "ECG_MAINS_HZ": str(mains)})
    record = measure_once(replace(make(), record_id=f"agree-{case}"), mains_hz=mains)
    info = build(record, PATIENT, tmp_path / "records", encoders=PackageEncoders(settings))
    doc = json.loads(next(f for f in info.files if f.kind == "ecg_12lead_data")
                     .path.read_bytes())
    pdf = next(f for f in info.files if f.kind == "ecg_report_pdf").path
    text = subprocess.run(["pdftotext", "-layout", str(pdf), "-"], capture_output=True,
                          text=True, check=True, timeout=60).stdout
    m = doc["measurements"]
    printed = _printed(text)
    for label, names in HEADER.items():
        expected = ["-" if m[n] is None else f"{m[n]:.0f}" for n in names]
        assert printed[label] == expected, (case, label, printed[label], expected)
    for name, reason in m["reasons"].items():  # every "-" says why, as the JSON does
        assert reason.split(";")[0][:30] in text.replace("\n", " "), (case, name, reason)
    if case == "atrial fibrillation":
        assert m["pr_ms"] is None and m["heart_rate_bpm"] is not None
    if case == "rejected":
        assert "REJECTED CAPTURE" in text and doc["quality"]["verdict"] == "rejected"
    if case == "noisy":
        assert any(m[n] is None for n in ("pr_ms", "qrs_ms", "qt_ms"))
    if case == "60 Hz mains":
        assert m["heart_rate_bpm"] is not None and "Display filter" in text
    if "uV" in case:
        assert all(m[n] is not None for n in ("heart_rate_bpm", "qrs_ms", "qt_ms")), m
