"""A capture with lost samples, read as the legacy desktop app reads ecg_data_*.json.

The legacy reader (`load_ecg_data_from_file` in the app's ecg_report_generator.py) does
`json.load` and then `np.array(lead)` per lead; its report generators then take
`np.array(lead, dtype=float)`. `legacy_load` below is that code, line for line (printing
left out). The capture is real: HR06000 streamed by the board simulator over a pty with
whole frames lost, read by the agent's serial reader.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pydicom
import pytest
from pydicom.waveforms.numpy_handler import multiplex_array

from device_agent.capture import capture_record
from device_agent.core.clock import Clock
from device_agent.core.config import load_settings
from device_agent.core.record import LEAD_ORDER, Record
from device_agent.documents import ecgdata
from device_agent.documents import pdf as report
from device_agent.documents.dicom import PADDING_VALUE, Equipment, encode_ecg
from device_agent.lab.simulator import BoardSimulator, FaultSpec
from device_agent.link.port import SerialReader

SETTINGS = load_settings(env_file=None, environ={}).replace(counts_per_mv=400.0)
EQUIPMENT = Equipment("Example Medical", "ECG12-PI", "SN-0042", "0.1.0")


def legacy_load(file_path):
    """The legacy app's load_ecg_data_from_file, as it is (its prints left out)."""
    try:
        with open(file_path) as f:
            data = json.load(f)
        if "leads" in data:
            for lead_name in data["leads"]:
                if isinstance(data["leads"][lead_name], list):
                    data["leads"][lead_name] = np.array(data["leads"][lead_name])
        return data
    except Exception:
        return None


@pytest.fixture
def lossy_capture(ecg_data_dir, tmp_path) -> Record:
    link = tmp_path / "board"
    sim = BoardSimulator(ecg_data_dir / "HR06000", link, counts_per_mv=400.0, speed=25,
                         faults=FaultSpec(lose=0.003), seed=5)
    sim.open()
    reader = SerialReader.from_settings(SETTINGS, str(link)).start(fail_fast=True)
    try:
        sim.start()
        record = capture_record(reader, SETTINGS, seconds=9.5, clock=Clock(check="floor"))
    finally:
        reader.stop()
        sim.stop()
    assert record.missing.any() and not record.missing.all(axis=1).any()
    return record


@pytest.mark.functional
def test_the_legacy_reader_draws_all_12_leads_of_a_capture_with_lost_samples(
        lossy_capture, tmp_path):
    path = tmp_path / f"ecg_data_{lossy_capture.stamp}.json"
    path.write_bytes(ecgdata.dumps(lossy_capture))
    data = legacy_load(path)
    assert data is not None
    assert list(data["leads"]) == list(LEAD_ORDER)
    for name in LEAD_ORDER:
        as_loaded = data["leads"][name]
        assert as_loaded.dtype.kind in "iuf", f"{name} loads as {as_loaded.dtype}"
        drawn = np.array(as_loaded, dtype=float)
        assert drawn.shape == (lossy_capture.n_samples,)
        assert np.isfinite(drawn).all(), name
    # what it sees in a lost span: the lead's last received value, held
    row = LEAD_ORDER.index("II")
    lost = np.flatnonzero(lossy_capture.missing[row])
    first = lost[lost > 0][0]
    assert data["leads"]["II"][first] == lossy_capture.samples[row, first - 1]


@pytest.mark.functional
def test_our_reader_pdf_and_dicom_still_know_exactly_which_samples_were_lost(
        lossy_capture, tmp_path):
    back = ecgdata.loads(ecgdata.dumps(lossy_capture))
    assert back == lossy_capture
    assert np.array_equal(back.missing, lossy_capture.missing)
    assert (back.samples[back.missing] == 0).all()
    # the PDF marks the same lost spans as it does for the capture itself
    geo = report.layout("a4")
    marks = report.marked_spans(back, geo)
    assert [m for m in marks if m[0] == "lost"]
    assert marks == report.marked_spans(lossy_capture, geo)
    assert report.render_pdf(back, None).startswith(b"%PDF")
    # the DICOM pads exactly the lost samples
    ds = pydicom.dcmread(io.BytesIO(encode_ecg(back, None, equipment=EQUIPMENT)))
    raw = multiplex_array(ds, 0, as_raw=True).T
    assert np.array_equal(raw == PADDING_VALUE, lossy_capture.missing)
