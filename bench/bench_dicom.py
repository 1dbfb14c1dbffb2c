"""DICOM 12-lead ECG: `dicom.encode_ecg` time and file size per record, against the JSON.

Run as `python bench/bench_dicom.py`; `run()` returns the rows for bench/run_all.py.
Contestants run round-robin in the same run, timed in CPU seconds, medians of REPEATS:
- encode_ecg on a real 10 s record (HR06000, 500 Hz) and a 10 s 1000 Hz one (s0010_re),
  each with a patient block, ten measurements and 40 lost samples per lead;
- baseline 1: `ecgdata.dumps` of the same record, the package's JSON writer;
- baseline 2: `pydicom.dcmwrite` alone of the dataset `dicom.build_dataset` made once:
  the floor pydicom's writer sets, so the rest of encode_ecg is building the dataset;
- `wfdb.encode_record` of the same record, for the export.
Sizes are the bytes each writes.
"""

from __future__ import annotations

import dataclasses
import io
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from _common import interleaved, medians, print_rows  # noqa: E402

from device_agent.core.record import DeviceInfo, Record  # noqa: E402
from device_agent.documents import ecgdata  # noqa: E402
from device_agent.documents.dicom import DisplayFilter, Equipment, build_dataset, encode_ecg  # noqa: E402
from device_agent.lab import wfdb  # noqa: E402

DATA = REPO / "tests" / "data" / "ecg"
REPEATS = 31
AT = datetime(2026, 1, 24, 12, 18, 15, tzinfo=timezone(timedelta(hours=1)))
EQUIPMENT = Equipment("Example Medical", "bench", "ECG-0001", "0.1.0")
FILTERS = DisplayFilter(0.05, 150.0, 50.0)
PATIENT = {"first_name": "Testa", "last_name": "Synthetica", "age": "59", "gender": "Female",
           "patient_id": "SYN-0001", "dob": "1967-03-14", "doctor": "Dr Example"}
MEASUREMENTS = {"heart_rate_bpm": 68.6, "rr_ms": 875, "pr_ms": 158, "qrs_ms": 94,
                "qt_ms": 392, "qtc_bazett_ms": 419.1, "qtc_fridericia_ms": 410.0,
                "p_axis_deg": 52, "qrs_axis_deg": -12, "t_axis_deg": 38}


def bench_record(name: str) -> Record:
    """A real 10 s recording as a Record with losses and measurements."""
    record = wfdb.to_record(DATA / name, seconds=10, acquired_at=AT,
                            record_id=f"6f1c2a9e-8d4b-4c4e-9a51-{name.lower():0>12.12}",
                            device=DeviceInfo("ECG-0001", "bench", "0.1.0"))
    missing = record.missing.copy()
    missing[:, 2000:2040] = True
    return dataclasses.replace(record, samples=np.where(missing, 0, record.samples),
                               missing=missing, measurements=dict(MEASUREMENTS))


def run(repeats: int = REPEATS) -> list[dict]:
    """Median CPU ms per record of encode_ecg and its baselines; ratio = baseline / ours."""
    import pydicom

    rows = []
    for name in ("HR06000", "s0010_re"):
        record = bench_record(name)
        dcm = encode_ecg(record, PATIENT, equipment=EQUIPMENT, filters=FILTERS)
        ds = build_dataset(record, PATIENT, equipment=EQUIPMENT, filters=FILTERS)

        def write_only(ds: pydicom.Dataset = ds) -> bytes:
            out = io.BytesIO()
            pydicom.dcmwrite(out, ds, enforce_file_format=True)
            return out.getvalue()

        assert write_only() == dcm, "dcmwrite of the built dataset differs from encode_ecg"
        json_bytes = ecgdata.dumps(record)
        header, data = wfdb.encode_record(record, "bench")
        t = medians(interleaved({
            "dicom": lambda r=record: encode_ecg(r, PATIENT, equipment=EQUIPMENT,
                                                 filters=FILTERS),
            "json": lambda r=record: ecgdata.dumps(r),
            "dcmwrite": write_only,
            "wfdb": lambda r=record: wfdb.encode_record(r, "bench"),
        }, rounds=max(repeats, 15)))
        shape = f"{name}: 12 x {record.n_samples} at {record.sampling_rate} Hz"
        rows += [
            _row(f"encode_ecg CPU ms (vs ecgdata.dumps), {shape}", t["dicom"], t["json"],
                 "baseline = the package's JSON writer"),
            _row(f"encode_ecg CPU ms (vs dcmwrite alone), {shape}", t["dicom"], t["dcmwrite"],
                 "baseline = pydicom's write of the built dataset"),
            _row(f"wfdb.encode_record CPU ms (vs ecgdata.dumps), {shape}", t["wfdb"], t["json"],
                 "the WFDB export"),
            {"benchmark": "dicom", "metric": f".dcm bytes (vs JSON bytes), {shape}",
             "value": len(dcm), "baseline": len(json_bytes),
             "ratio": round(len(json_bytes) / len(dcm), 2),
             "note": f"WFDB: {len(header) + len(data)} bytes"},
        ]
    return rows


def _row(metric: str, value: float, baseline: float, note: str) -> dict:
    return {"benchmark": "dicom", "metric": metric, "value": round(value * 1e3, 3),
            "baseline": round(baseline * 1e3, 3), "ratio": round(baseline / value, 2),
            "note": note}


if __name__ == "__main__":
    from _common import machine

    print(f"Machine: {machine()}")
    print_rows(run())
