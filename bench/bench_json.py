"""ecg_data JSON: `ecgdata.dumps`/`loads` vs stdlib json and orjson on a real 10 s record.

Run as `python bench/bench_json.py`; `run()` returns the rows for bench/run_all.py.
Baselines are measured in the same run on the same document (HR06000, 12 x 5000 samples):
- stdlib: `json.dumps` of the document with leads as Python lists (`.tolist()` included);
- orjson: `orjson.dumps(..., OPT_SERIALIZE_NUMPY)` with leads as int32 numpy rows (orjson
  cannot write `null` inside a numpy array, so this record has no lost samples).
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from _common import median_s, print_rows  # noqa: E402

from device_agent import ecgdata  # noqa: E402
from device_agent.lab.wfdb import to_record  # noqa: E402
from device_agent.record import AdcInfo, DeviceInfo, Quality, Record  # noqa: E402

RECORD = REPO / "tests" / "data" / "ecg" / "HR06000"
REPEATS = 200


def real_record(path: Path = RECORD) -> Record:
    """A 12-lead Record built from a real WFDB recording (uV, LEAD_ORDER)."""
    record = to_record(
        path,
        acquired_at=datetime(2026, 1, 24, 12, 18, 15, 250000, tzinfo=timezone(timedelta(hours=1))),
        record_id="6f1c2a9e-8d4b-4c4e-9a51-0d2b7f3e5a10",
        device=DeviceInfo(serial="ECG-0001", model="bench", agent_version="0.1.0"),
    )
    return replace(
        record,
        adc=AdcInfo(baseline=(2048.0,) * 8),
        quality=Quality(frames_expected=5000, frames_received=5000, mains_noise_uv=4.2),
        measurements={"heart_rate_bpm": {"value": 68.5, "method": "bench"}},
    )


def _row(metric: str, value: float, baseline: float, note: str) -> dict:
    return {
        "benchmark": "json",
        "metric": metric,
        "value": round(value * 1e3, 3),
        "baseline": round(baseline * 1e3, 3),
        "ratio": round(baseline / value, 2),
        "note": note,
    }


def run(repeats: int = REPEATS) -> list[dict]:
    """Median times (ms) of dumps/loads and their baselines; ratio = baseline / ours."""
    record = real_record()
    ours = ecgdata.dumps(record)
    doc = json.loads(ours)  # the same document, as the baselines see it

    def stdlib_dumps() -> bytes:
        d = dict(doc)
        d["leads"] = {n: record.samples[i].tolist() for i, n in enumerate(record.lead_names)}
        return json.dumps(d, separators=(",", ":"), ensure_ascii=False).encode()

    assert stdlib_dumps() == ours, "baseline document differs from ours"
    rows = []
    t_ours = median_s(lambda: ecgdata.dumps(record), repeats)
    t_std = median_s(stdlib_dumps, repeats)
    rows.append(_row("dumps ms (vs stdlib json.dumps + tolist)", t_ours, t_std, "target >= 10x"))
    try:
        import orjson
    except ImportError:
        rows.append({"benchmark": "json", "metric": "dumps vs orjson", "value": None,
                     "baseline": None, "ratio": None, "note": "orjson not installed"})
    else:
        def orjson_dumps() -> bytes:
            d = dict(doc)
            d["leads"] = {n: record.samples[i] for i, n in enumerate(record.lead_names)}
            return orjson.dumps(d, option=orjson.OPT_SERIALIZE_NUMPY)

        assert json.loads(orjson_dumps()) == doc, "orjson document differs from ours"
        t_orj = median_s(orjson_dumps, repeats)
        rows.append(_row("dumps ms (vs orjson OPT_SERIALIZE_NUMPY)", t_ours, t_orj,
                         "target ratio >= 0.5 (within 2x)"))
    t_load = median_s(lambda: ecgdata.loads(ours), repeats)

    def stdlib_loads() -> list:
        d = json.loads(ours)
        return [np.array(d["leads"][n], dtype=np.int32) for n in record.lead_names]

    t_std_load = median_s(stdlib_loads, repeats)
    rows.append(_row("loads ms (vs json.loads + np.array)", t_load, t_std_load,
                     f"{len(ours)} bytes, 12 x {record.n_samples} samples"))
    return rows


if __name__ == "__main__":
    print_rows(run())
