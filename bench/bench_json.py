"""ecg_data JSON: `ecgdata.dumps`/`loads` vs stdlib json and orjson on a real 10 s record.

Run as `python bench/bench_json.py`; `run()` returns the rows for bench/run_all.py.
Baselines are measured in the same run on the same document (HR06000, 12 x 5000 samples):
- stdlib: `json.dumps` of the document with leads as Python lists (`.tolist()` included);
- orjson: `orjson.dumps(..., OPT_SERIALIZE_NUMPY)` with leads as int32 numpy rows;
- loads: `json.loads` of our document and `np.array(..., int32)` of each lead.
Both dumps baselines get the metadata as a ready dict (parsed once from our output), while
`ecgdata.dumps` writes it from the Record on every call: the comparison leans their way.
Each is measured twice: on the record as recorded, and on it with lost samples (`lossy`:
the leads then hold each lost sample's held value, the runs go in `lost_samples`; the
baselines get the document's own leads, so they write the same bytes).
All five run interleaved round-robin (bench/_common.interleaved), timed in CPU time:
each call meets the caches another contestant left, as a call made once per record does.
"""

from __future__ import annotations

import json
import statistics
import sys
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from _common import interleaved, machine, print_rows, ratio_spread, verdict  # noqa: E402

from device_agent.core.record import AdcInfo, DeviceInfo, Quality, Record  # noqa: E402
from device_agent.documents import ecgdata  # noqa: E402
from device_agent.lab.wfdb import to_record  # noqa: E402

RECORD = REPO / "tests" / "data" / "ecg" / "HR06000"
ROUNDS = 31  # of 5 interleaved calls per contestant


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


def _row(metric: str, ours: list[float], baseline: list[float], target: str,
         at_least: float | None = None) -> dict[str, Any]:
    """One table row: median ms of ours and of the baseline, ratio = baseline / ours."""
    q1, _, q3 = ratio_spread(baseline, ours)
    t_ours, t_base = statistics.median(ours), statistics.median(baseline)
    if at_least is not None:
        target = f"{verdict(t_base / t_ours, at_least=at_least)}; {target}"
    return {
        "benchmark": "json",
        "metric": metric,
        "value": round(t_ours * 1e3, 3),
        "baseline": round(t_base * 1e3, 3),
        "ratio": round(t_base / t_ours, 2),
        "note": f"{target}; per-round ratio p25-p75 {q1:.2f}-{q3:.2f}",
    }


def lossy(record: Record) -> Record:
    """The record with lost samples as a flaky link leaves them: a 50-sample burst in every
    lead, 20 single frames spread over the capture and one sample lost on V3 alone."""
    missing = np.zeros(record.samples.shape, dtype=bool)
    missing[:, 1000:1050] = True
    missing[:, np.linspace(100, record.n_samples - 100, 20).astype(int)] = True
    missing[record.lead_names.index("V3"), 17] = True
    return replace(record, samples=np.where(missing, 0, record.samples).astype(np.int32),
                   missing=missing)


def run(rounds: int = ROUNDS) -> list[dict[str, Any]]:
    """Median CPU times (ms) of dumps/loads and their baselines; ratio = baseline / ours."""
    rows = _run(real_record(), rounds, "")
    return rows + _run(lossy(real_record()), rounds, ", lost samples") + _old_form(rounds)


def _old_form(rounds: int) -> list[dict[str, Any]]:
    """loads of a lossy file as written before `lost_samples` (null in the leads)."""
    record = lossy(real_record())
    doc = json.loads(ecgdata.dumps(record))
    del doc["lost_samples"]
    for i, name in enumerate(record.lead_names):
        doc["leads"][name] = [None if gone else v for v, gone in
                              zip(doc["leads"][name], record.missing[i].tolist(), strict=True)]
    data = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()
    assert ecgdata.loads(data) == record, "the old form does not give the record back"

    def stdlib_loads() -> list[np.ndarray]:
        d = json.loads(data)
        return [np.array(d["leads"][n]) for n in record.lead_names]  # object arrays

    t = interleaved({"loads": lambda: ecgdata.loads(data), "stdlib_loads": stdlib_loads},
                    rounds=rounds, calls=5)
    return [_row("loads ms, lost samples as null (files before lost_samples)", t["loads"],
                 t["stdlib_loads"], f"{len(data)} bytes", at_least=1.0)]


def _run(record: Record, rounds: int, label: str) -> list[dict[str, Any]]:
    ours = ecgdata.dumps(record)
    doc = json.loads(ours)  # the same document, as the baselines see it

    # the leads as the document holds them: the samples themselves when nothing was lost (as
    # last round measured it), else with each lost sample holding its lead's last value
    leads = record.samples if not record.missing.any() else np.array(
        [doc["leads"][n] for n in record.lead_names], dtype=np.int32)

    def stdlib_dumps() -> bytes:
        d = dict(doc)
        d["leads"] = {n: leads[i].tolist() for i, n in enumerate(record.lead_names)}
        return json.dumps(d, separators=(",", ":"), ensure_ascii=False).encode()

    def stdlib_loads() -> list[np.ndarray]:
        d = json.loads(ours)
        return [np.array(d["leads"][n], dtype=np.int32) for n in record.lead_names]

    assert stdlib_dumps() == ours, "baseline document differs from ours"
    assert ecgdata.loads(ours) == record, "loads does not give the record back"
    contestants = {
        "dumps": lambda: ecgdata.dumps(record),
        "stdlib_dumps": stdlib_dumps,
        "loads": lambda: ecgdata.loads(ours),
        "stdlib_loads": stdlib_loads,
    }
    try:
        import orjson
    except ImportError:
        pass
    else:
        def orjson_dumps() -> bytes:
            d = dict(doc)
            d["leads"] = {n: leads[i] for i, n in enumerate(record.lead_names)}
            return orjson.dumps(d, option=orjson.OPT_SERIALIZE_NUMPY)

        assert json.loads(orjson_dumps()) == doc, "orjson document differs from ours"
        contestants["orjson_dumps"] = orjson_dumps
    t = interleaved(contestants, rounds=rounds, calls=5)
    rows = [_row(f"dumps ms{label} (vs stdlib json.dumps + tolist)", t["dumps"],
                 t["stdlib_dumps"], "target about 9-14x")]
    if "orjson_dumps" not in t:
        rows.append({"benchmark": "json", "metric": f"dumps{label} vs orjson", "value": None,
                     "baseline": None, "ratio": None,
                     "note": "orjson not installed (make bench installs it): not measured"})
    else:
        rows.append(_row(f"dumps ms{label} (vs orjson OPT_SERIALIZE_NUMPY)", t["dumps"],
                         t["orjson_dumps"], "within 2x of orjson", at_least=0.5))
    rows.append(_row(f"loads ms{label} (vs json.loads + np.array)", t["loads"],
                     t["stdlib_loads"],
                     f"{len(ours)} bytes, 12 x {record.n_samples} samples", at_least=1.0))
    return rows


if __name__ == "__main__":
    print(f"Machine: {machine()}. CPU time, {ROUNDS} interleaved rounds, medians.")
    print_rows(run())
