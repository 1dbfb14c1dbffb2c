"""ecg_data JSON: exact round trip, canonical compact form, legacy files, real recordings."""

from __future__ import annotations

import json
import math
from datetime import datetime, timedelta, timezone
from unittest import mock

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from device_agent.core.record import (
    LEAD_ORDER,
    AdcInfo,
    DeviceInfo,
    ElectrodeOff,
    Gap,
    Quality,
    Record,
)
from device_agent.documents import ecgdata
from device_agent.lab.wfdb import read_record, to_record

INT16 = (-32768, 32767)
INT32 = (-(2**31), 2**31 - 1)
TZ = timezone(timedelta(hours=5, minutes=30))


def canonical(data: bytes) -> bytes:
    return json.dumps(json.loads(data), separators=(",", ":"), ensure_ascii=False).encode()


def make_record(samples, missing=None, **kw) -> Record:
    samples = np.asarray(samples)
    if missing is None:
        missing = np.zeros(samples.shape, dtype=bool)
    kw.setdefault("acquired_at", datetime(2026, 1, 24, 12, 18, 15, tzinfo=TZ))
    kw.setdefault("sampling_rate", 500)
    kw.setdefault("lead_names", LEAD_ORDER[: samples.shape[0]])
    return Record(samples=samples, missing=missing, **kw)


def assert_roundtrip(record: Record) -> bytes:
    out = ecgdata.dumps(record)
    assert isinstance(out, bytes)
    assert out == canonical(out)
    back = ecgdata.loads(out)
    assert back == record
    assert ecgdata.dumps(back) == out
    return out


# --- hypothesis strategies ---------------------------------------------------------------

names_st = st.one_of(
    st.just(LEAD_ORDER),
    st.lists(st.text(min_size=1, max_size=12), min_size=0, max_size=5, unique=True).map(tuple),
)
finite = st.floats(allow_nan=False, allow_infinity=False)
short_text = st.text(max_size=20)


@st.composite
def samples_st(draw, n_leads: int):
    n = draw(st.sampled_from([0, 1, 2, 7, 100]))
    bounds = draw(st.sampled_from([INT16, INT32, (-3000, 3000), (-9, 9)]))
    shape = (n_leads, n)
    values = draw(
        st.lists(st.integers(*bounds), min_size=n_leads * n, max_size=n_leads * n).map(
            lambda v: np.array(v, dtype=np.int64).reshape(shape)
        )
    )
    if draw(st.booleans()):  # splash int16/int32 extremes over the array
        extremes = np.array([*INT16, *INT32, 0, -1], dtype=np.int64)
        pick = draw(st.lists(st.integers(0, max(values.size - 1, 0)), max_size=8))
        flat = values.reshape(-1)
        for i, p in enumerate(pick):
            if flat.size:
                flat[p] = extremes[i % len(extremes)]
    mode = draw(st.sampled_from(["none", "some", "all"]))
    if mode == "all":
        missing = np.ones(shape, dtype=bool)
    elif mode == "some":
        missing = np.array(
            draw(st.lists(st.booleans(), min_size=values.size, max_size=values.size)), dtype=bool
        ).reshape(shape)
    else:
        missing = np.zeros(shape, dtype=bool)
    values[missing] = 0
    fits16 = values.size == 0 or (values.min() >= INT16[0] and values.max() <= INT16[1])
    dtype = np.int16 if fits16 and draw(st.booleans()) else np.int32
    return values.astype(dtype), missing


@st.composite
def records_st(draw):
    names = draw(names_st)
    samples, missing = draw(samples_st(len(names)))
    offset = draw(st.integers(-14 * 60, 14 * 60).map(lambda m: timedelta(minutes=m)))
    at = draw(
        st.datetimes(min_value=datetime(1970, 1, 2), max_value=datetime(2100, 1, 1))
    ).replace(tzinfo=timezone(offset))
    gaps = draw(st.lists(st.builds(Gap, st.integers(0, 10**6), st.integers(1, 5000)), max_size=3))
    off = draw(
        st.lists(
            st.builds(ElectrodeOff, short_text, st.integers(0, 10**6), st.integers(0, 5000)),
            max_size=3,
        )
    )
    quality = Quality(
        frames_expected=draw(st.integers(0, 10**6)),
        frames_received=draw(st.integers(0, 10**6)),
        frames_lost=draw(st.integers(0, 10**6)),
        gaps=tuple(gaps),
        electrodes_off=tuple(off),
        flat_leads=tuple(draw(st.lists(short_text, max_size=3))),
        saturated_leads=tuple(draw(st.lists(short_text, max_size=3))),
        mains_noise_uv=draw(st.none() | finite),
        bad_frames=draw(st.integers(0, 100)),
        verdict=draw(st.sampled_from(["ok", "warning", "rejected"])),
        reasons=tuple(draw(st.lists(short_text, max_size=3))),
    )
    adc = draw(
        st.none()
        | st.builds(
            AdcInfo,
            bits=st.integers(8, 24),
            counts_per_mv=finite,
            byte_order=short_text,
            baseline=st.lists(finite, max_size=8).map(tuple),
        )
    )
    json_leaf = st.none() | st.booleans() | st.integers() | finite | short_text
    measurements = draw(
        st.dictionaries(
            short_text,
            st.recursive(
                json_leaf,
                lambda kids: st.lists(kids, max_size=3) | st.dictionaries(short_text, kids),
                max_leaves=6,
            ),
            max_size=4,
        )
    )
    return make_record(
        samples,
        missing,
        acquired_at=at,
        sampling_rate=draw(st.integers(1, 10_000)),
        lead_names=names,
        record_id=draw(st.none() | st.uuids().map(str) | short_text),
        device=draw(st.builds(DeviceInfo, short_text, short_text, short_text)),
        adc=adc,
        quality=quality,
        measurements=measurements,
    )


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(records_st())
def test_random_records_roundtrip_and_are_canonical(record):
    assert_roundtrip(record)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(*INT32), min_size=1, max_size=300),
    st.sampled_from([np.int32, np.int64]),
)
def test_values_beyond_int16_encode_exactly(values, dtype):
    row = np.array(values, dtype=dtype)
    out = assert_roundtrip(make_record(np.stack([row, row[::-1]])))
    assert json.loads(out)["leads"]["I"] == values


# --- edge cases, one by one ----------------------------------------------------------------


@pytest.mark.parametrize("n", [0, 1])
def test_empty_and_one_sample_leads(n):
    out = assert_roundtrip(make_record(np.full((12, n), -7, dtype=np.int32)))
    doc = json.loads(out)
    assert list(doc["leads"]) == list(LEAD_ORDER)
    assert all(v == [-7] * n for v in doc["leads"].values())
    assert doc["samples_per_lead"] == n


def test_a_lead_with_nothing_received_is_zeros_and_one_run():
    record = make_record(np.zeros((12, 5), np.int32), np.ones((12, 5), dtype=bool))
    doc = json.loads(assert_roundtrip(record))
    assert doc["leads"]["aVF"] == [0] * 5
    assert doc["lost_samples"]["aVF"] == [[0, 5]]


def test_int16_extremes_and_lost_samples():
    samples = np.array([[-32768, 32767, 0, -1, 5]] * 12, dtype=np.int32)
    missing = np.zeros(samples.shape, dtype=bool)
    missing[3, 1] = True
    samples[3, 1] = 0
    doc = json.loads(assert_roundtrip(make_record(samples, missing)))
    assert doc["leads"]["I"] == [-32768, 32767, 0, -1, 5]
    assert doc["leads"]["aVR"] == [-32768, -32768, 0, -1, 5]  # the last received value
    assert doc["lost_samples"] == {"aVR": [[1, 1]]}


def test_a_loss_at_the_start_holds_the_first_received_value():
    samples = np.array([[0, 0, 7, 8, 0]], dtype=np.int32)
    missing = np.array([[True, True, False, False, True]])
    doc = json.loads(assert_roundtrip(make_record(samples, missing)))
    assert doc["leads"]["I"] == [7, 7, 7, 8, 8]
    assert doc["lost_samples"] == {"I": [[0, 2], [4, 1]]}


def test_no_leads_at_all():
    assert_roundtrip(make_record(np.zeros((0, 10), np.int32), lead_names=()))


def test_document_layout_keys_and_derived_values():
    record = make_record(
        np.arange(12 * 4, dtype=np.int32).reshape(12, 4),
        acquired_at=datetime(2026, 1, 24, 12, 18, 15, 120, tzinfo=TZ),
        record_id="6f1c2a9e-8d4b-4c4e-9a51-0d2b7f3e5a10",
        quality=Quality(
            frames_expected=4,
            frames_received=3,
            frames_lost=1,
            gaps=(Gap(2, 1),),
            electrodes_off=(ElectrodeOff("V3", 1, 2),),
            mains_noise_uv=None,
        ),
        sampling_rate=2,
    )
    doc = json.loads(assert_roundtrip(record))
    assert list(doc)[:3] == ["timestamp", "sampling_rate", "leads"]
    assert doc["timestamp"] == "2026-01-24 12:18:15"
    assert doc["acquired_at"] == "2026-01-24T12:18:15.000120+05:30"
    assert (doc["duration_s"], doc["units"]) == (2.0, "uV")
    assert doc["derived_leads"] == ["III", "aVR", "aVL", "aVF"]
    assert doc["lead_order"] == list(LEAD_ORDER)
    q = doc["quality"]
    assert q["lost_fraction"] == 0.25
    assert q["gaps"] == [{"start_sample": 2, "length": 1, "start_s": 1.0}]
    assert q["electrodes_off"][0] == {
        "electrode": "V3", "start_sample": 1, "length": 2, "start_s": 0.5, "end_s": 1.5
    }
    assert q["mains_noise_uv"] is None


def test_non_finite_floats_become_null_not_nan():
    record = make_record(
        np.zeros((12, 2), np.int32),
        quality=Quality(mains_noise_uv=float("nan")),
        measurements={"rr_ms": [800.0, float("inf")], "hr": np.float64(72.5)},
    )
    out = ecgdata.dumps(record)
    assert out == canonical(out)
    doc = json.loads(out)
    assert doc["quality"]["mains_noise_uv"] is None
    assert doc["measurements"] == {"rr_ms": [800.0, None], "hr": 72.5}


def test_non_ascii_and_escapes_are_canonical():
    record = make_record(
        np.ones((2, 3), np.int32),
        lead_names=('Ä"\\', "\u2028\x01"),
        device=DeviceInfo(serial="Nº 7 — ü", model="\t", agent_version="ö"),
    )
    out = assert_roundtrip(record)
    assert "Nº 7 — ü".encode() in out


def test_non_finite_metadata_reads_back_as_null_and_writes_the_same_again():
    record = make_record(
        np.zeros((2, 3), np.int32),
        adc=AdcInfo(baseline=(float("nan"), 2048.0, float("-inf")), counts_per_mv=float("inf")),
        quality=Quality(mains_noise_uv=float("nan")),
    )
    out = ecgdata.dumps(record)
    assert json.loads(out)["adc"] == {
        "bits": 12, "baseline": [None, 2048.0, None], "counts_per_mv": None,
        "byte_order": "high-first",
    }
    back = ecgdata.loads(out)
    assert back.adc is not None
    # AdcInfo declares floats, but loads gives a stored null back as None: the types do not
    # say what a file with non-finite values reads back as
    assert back.adc.baseline == (None, 2048.0, None)  # type: ignore[comparison-overlap]
    assert back.adc.counts_per_mv is None
    assert ecgdata.dumps(back) == out


def test_rejects_what_it_cannot_write_faithfully():
    with pytest.raises(ValueError, match="lead names repeat"):
        ecgdata.dumps(make_record(np.zeros((2, 2), np.int32), lead_names=("I", "I")))
    with pytest.raises(ValueError, match="integer uV"):
        ecgdata.dumps(make_record(np.zeros((12, 2), np.float64)))
    with pytest.raises(ValueError, match="does not match"):
        ecgdata.dumps(make_record(np.zeros((3, 2), np.int32), lead_names=LEAD_ORDER))


# --- per-lead word width (the NUL-padded words are packed `width` bytes apart) ----------

WIDTH_EDGES = [0, 9, -9, 10, -10, 99, -99, 100, -100, 999, -999, 1000, -1000, 9999, -9999,
               10000, -10000, 32767, -32768, 32768, -32769, 2**31 - 1, -(2**31)]


def held_row(values: list[int], lost: list[bool]) -> list[int]:
    """A lead as `leads` holds it, by the docstring's rule, in plain Python (the reference)."""
    received = [v for v, gone in zip(values, lost, strict=True) if not gone]
    out, last = [], received[0] if received else 0
    for v, gone in zip(values, lost, strict=True):
        last = last if gone else v
        out.append(last)
    return out


def expected_leads(record: Record) -> dict[str, list[int]]:
    """The leads as the stdlib would write them, from Python ints (the reference)."""
    return {
        name: held_row([int(v) for v in row], gone)
        for name, row, gone in zip(
            record.lead_names, record.samples.tolist(), record.missing.tolist(), strict=True
        )
    }


def expected_lost(record: Record) -> dict[str, list[list[int]]]:
    """`lost_samples` in plain Python: each lossy lead's [first, count] runs."""
    spans = {}
    for name, gone in zip(record.lead_names, record.missing.tolist(), strict=True):
        runs: list[list[int]] = []
        for i, lost in enumerate(gone):
            if lost and runs and runs[-1][0] + runs[-1][1] == i:
                runs[-1][1] += 1
            elif lost:
                runs.append([i, 1])
        if runs:
            spans[name] = runs
    return spans


def test_narrow_packing_is_in_use_here():
    assert ecgdata._overlay_in_order()  # else every test below ran the 8-byte fallback only


@pytest.mark.parametrize("edge", WIDTH_EDGES)
def test_values_at_each_width_edge(edge):
    small = [1, -2, 3]
    rows = [
        [edge],  # alone: the lead's width is exactly this value's text + separator
        [*small, edge],  # last word (ends with `]`)
        [edge, *small],
        [*small, 0],  # a narrow lead next to wide ones
        [edge, -edge if abs(edge) < 2**31 else 0, 7, edge],
    ]
    width = max(len(r) for r in rows)
    samples = np.array([r + [0] * (width - len(r)) for r in rows], dtype=np.int64)
    missing = np.zeros(samples.shape, dtype=bool)
    missing[3, 1] = missing[4, 2] = True  # nulls widen their lead to `null,`
    samples[missing] = 0
    for dtype in (np.int64, np.int32) if abs(edge) < 2**31 else (np.int64,):
        record = make_record(samples.astype(dtype), missing, lead_names=("I", "II", "V1", "x", "é"))
        out = assert_roundtrip(record)
        assert json.loads(out)["leads"] == expected_leads(record)


MAGNITUDES = [0, 9, 99, 999, 9999, 32767, 32768, 2**31 - 1]


@st.composite
def mixed_width_records(draw):
    n_leads = draw(st.integers(1, 13))
    n = draw(st.sampled_from([1, 2, 3, 50]))
    names = draw(
        st.lists(st.text(min_size=1, max_size=15), min_size=n_leads, max_size=n_leads,
                 unique=True)
    )
    rows, lost = [], []
    for _ in range(n_leads):
        top = draw(st.sampled_from(MAGNITUDES))
        rows.append(draw(st.lists(st.integers(-top - (top < 2**31 - 1), top),
                                  min_size=n, max_size=n)))
        lost.append(draw(st.lists(st.booleans(), min_size=n, max_size=n))
                    if draw(st.integers(0, 3)) == 0 else [False] * n)
    missing = np.array(lost, dtype=bool)
    samples = np.where(missing, 0, np.array(rows, dtype=np.int64))
    fits16 = samples.min() >= INT16[0] and samples.max() <= INT16[1]
    dtype = draw(st.sampled_from([np.int16, np.int32, np.int64] if fits16 else [np.int64]))
    return make_record(samples.astype(dtype), missing, lead_names=tuple(names))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mixed_width_records())
def test_leads_of_mixed_widths_match_the_stdlib(record):
    out = assert_roundtrip(record)
    assert json.loads(out)["leads"] == expected_leads(record)


# --- loads: legacy files and damaged input -----------------------------------------------


def test_legacy_float_mv_file_loads_as_microvolts():
    legacy = {
        "timestamp": "2025-03-02 08:15:00",
        "sampling_rate": 500,
        "leads": {"I": [0.1, -0.25, 1.0005], "II": [0.0, 2, None]},
    }
    record = ecgdata.loads(json.dumps(legacy).encode())
    assert record.acquired_at == datetime(2025, 3, 2, 8, 15)
    assert record.lead_names == ("I", "II")
    assert record.samples.tolist() == [[100, -250, 1000], [0, 2000, 0]]
    assert record.missing.tolist() == [[False] * 3, [False, False, True]]
    assert record.record_id is None and record.adc is None and record.quality == Quality()
    # and it is written back in the new form, with the legacy keys first
    doc = json.loads(ecgdata.dumps(record))
    assert doc["timestamp"] == "2025-03-02 08:15:00" and doc["units"] == "uV"


def test_legacy_integer_file_is_microvolts_and_short_leads_are_padded():
    legacy = (
        b'{"timestamp":"2025-03-02 08:15:00","sampling_rate":250,'
        b'"leads":{"I":[1,2,3],"V1":[4]}}'
    )
    record = ecgdata.loads(legacy)
    assert record.sampling_rate == 250
    assert record.samples.tolist() == [[1, 2, 3], [4, 0, 0]]
    assert record.missing.tolist() == [[False] * 3, [False, True, True]]


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "not an object"),
        (b'{"timestamp":"2025-03-02 08:15:00","leads":{}}', "sampling_rate"),
        (b'{"sampling_rate":500,"leads":{"I":[1]}}', "acquired_at"),
        (b'{"timestamp":"2025-03-02 08:15:00","sampling_rate":500,"leads":{"I":["x"]}}', "lead I"),
        (
            b'{"timestamp":"t","sampling_rate":500,"units":"uV","acquired_at":"2025-01-01T00:00:00",'
            b'"leads":{"I":[1,2],"II":[1]}}',
            "differ in length",
        ),
    ],
)
def test_damaged_documents_raise_one_clear_error(data, match):
    with pytest.raises(ValueError, match=match) as info:
        ecgdata.loads(data, source="ecg_data_20250302_081500.json")
    assert "ecg_data_20250302_081500.json" in str(info.value)


# --- real recordings --------------------------------------------------------------------


def real_record(path) -> Record:
    wf = read_record(path)
    return to_record(wf, acquired_at=datetime(2026, 1, 24, 12, 18, 15, tzinfo=TZ),
                     record_id=wf.name)


@pytest.mark.parametrize("name", ["HR06000", "HR06003", "s0010_re"])
def test_real_recordings_roundtrip(ecg_data_dir, name):
    record = real_record(ecg_data_dir / name)
    missing = np.zeros(record.samples.shape, dtype=bool)
    missing[:, 1000:1050] = True  # a lost burst, as a dropped USB read would leave
    samples = np.where(missing, 0, record.samples).astype(np.int32)
    lossy = make_record(samples, missing, sampling_rate=record.sampling_rate)
    for rec in (record, lossy):
        out = assert_roundtrip(rec)
        doc = json.loads(out)
        assert doc["leads"]["II"][:10] == rec.samples[1, :10].tolist()
    doc = json.loads(ecgdata.dumps(lossy))
    assert doc["leads"]["V6"][1000:1050] == [int(lossy.samples[11, 999])] * 50
    assert doc["lost_samples"]["V6"] == [[1000, 50]]


# --- dumps byte for byte against the documented dict, written by the stdlib ----------------


def _finite_or_none(value):
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _plain(value):
    """Measurements as the stdlib sees them: numpy unwrapped, NaN/inf as None."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return _plain(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return _finite_or_none(value)
    return value


def reference_dumps(record: Record) -> bytes:
    """The document as the module docstring describes it, through json.dumps (the oracle)."""
    rate, at, q, adc = record.sampling_rate, record.acquired_at, record.quality, record.adc
    doc = {
        "timestamp": at.strftime("%Y-%m-%d %H:%M:%S").rjust(19, "0"),
        "sampling_rate": rate,
        "leads": expected_leads(record),
        "lost_samples": expected_lost(record),
        "acquired_at": at.isoformat(),
        "duration_s": record.n_samples / rate,
        "samples_per_lead": record.n_samples,
        "units": "uV",
        "lead_order": list(record.lead_names),
        "derived_leads": [n for n in record.lead_names if n in ("III", "aVR", "aVL", "aVF")],
        "adc": None if adc is None else {
            "bits": adc.bits,
            "baseline": [_finite_or_none(b) for b in adc.baseline],
            "counts_per_mv": _finite_or_none(adc.counts_per_mv),
            "byte_order": str(adc.byte_order),
        },
        "device": {
            "serial": str(record.device.serial),
            "model": str(record.device.model),
            "agent_version": str(record.device.agent_version),
        },
        "record_id": record.record_id,
        "quality": {
            "frames_expected": q.frames_expected,
            "frames_received": q.frames_received,
            "frames_lost": q.frames_lost,
            "lost_fraction": float(q.lost_fraction),
            "gaps": [{"start_sample": g.start, "length": g.length, "start_s": g.start / rate}
                     for g in q.gaps],
            "electrodes_off": [
                {"electrode": e.electrode, "start_sample": e.start, "length": e.length,
                 "start_s": e.start / rate, "end_s": (e.start + e.length) / rate}
                for e in q.electrodes_off
            ],
            "flat_leads": list(q.flat_leads),
            "saturated_leads": list(q.saturated_leads),
            "mains_noise_uv": _finite_or_none(q.mains_noise_uv),
            "bad_frames": q.bad_frames,
            "verdict": q.verdict,
            "reasons": list(q.reasons),
        },
        "measurements": _plain(record.measurements),
    }
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


signed_zero = st.sampled_from([0.0, -0.0])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(records_st(), st.data())
def test_dumps_is_byte_for_byte_the_documented_dict(record, data):
    assert ecgdata.dumps(record) == reference_dumps(record)
    # -0.0 == 0.0, yet they are written differently: nothing may be reused across them
    adc = AdcInfo(baseline=(data.draw(signed_zero), 1.5), counts_per_mv=data.draw(signed_zero))
    other = AdcInfo(baseline=(-adc.baseline[0], 1.5), counts_per_mv=-adc.counts_per_mv)
    for a in (adc, other, adc):
        rec = make_record(record.samples, record.missing, lead_names=record.lead_names, adc=a)
        assert ecgdata.dumps(rec) == reference_dumps(rec)
    # so are 7 and 7.0, where a field that should be a string is not
    for serial in (7, 7.0, 7, "7"):
        rec = make_record(record.samples, record.missing, lead_names=record.lead_names,
                          # a wrong type on purpose: what a caller that ignores the hints passes
                          device=DeviceInfo(serial=serial))  # type: ignore[arg-type]
        assert ecgdata.dumps(rec) == reference_dumps(rec)


# --- loads: the fast path for canonical leads, and the general path it must agree with ----


def general_loads(data):
    """loads with its fast path switched off: json.loads of the whole document."""
    with mock.patch.object(ecgdata, "_fast_leads", lambda data: None):
        return ecgdata.loads(data)


def outcome(load, data):
    try:
        return load(data)
    except ValueError as exc:
        return f"ValueError: {exc}"


def assert_same_as_general(data: bytes, *, fast: bool | None = None):
    """loads gives what the general path gives (record or error), and says which path ran."""
    if fast is not None:
        assert (ecgdata._fast_leads(data) is not None) == fast
    got, want = outcome(ecgdata.loads, data), outcome(general_loads, data)
    if isinstance(want, str):
        assert got == want
        return
    assert isinstance(got, Record), got
    assert got == want
    assert got.samples.dtype == want.samples.dtype
    assert np.array_equal(got.samples, want.samples)
    assert np.array_equal(got.missing, want.missing)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(records_st())
def test_fast_path_reads_every_canonical_document(record):
    out = ecgdata.dumps(record)
    # by design, another key named leads anywhere sends a document to the general path
    assert_same_as_general(out, fast=record.samples.size > 0 and not has_leads_key(record))
    assert ecgdata.loads(out) == record


def has_leads_key(record: Record) -> bool:
    def walk(value) -> bool:
        if isinstance(value, dict):
            return any(str(k) == "leads" or walk(v) for k, v in value.items())
        return isinstance(value, list | tuple) and any(walk(v) for v in value)

    return walk(record.measurements)


@pytest.mark.parametrize(
    "values",
    [
        [[None, 1, None], [None, None, None]],  # null first, last, and a lead of nulls only
        [[-32768, 32767, 0], [-1, 1, None]],  # int16 extremes
        [[-32769, 32768, 7], [2**31 - 1, -(2**31), None]],  # outside int16
        [[2**62, -(2**62), 10**17], [10**18, -(10**18), 0]],  # outside int32
        [[-(2**63), 0, 1], [2**63 - 1, 1, 2]],  # int64 min is what null reads as: general path
        [[5], [-5]],  # one sample a lead
    ],
)
def test_fast_path_edge_values(values):
    missing = np.array([[v is None for v in row] for row in values])
    samples = np.array([[0 if v is None else v for v in row] for row in values], dtype=np.int64)
    record = make_record(samples, missing, lead_names=("I", "é\\"))
    out = ecgdata.dumps(record)
    assert_same_as_general(out, fast=-(2**63) not in values[0])
    back = ecgdata.loads(out)
    assert back == record
    fits32 = INT32[0] <= samples.min() and samples.max() <= INT32[1]
    assert back.samples.dtype == (np.int32 if fits32 else np.int64)


def test_empty_leads_take_the_general_path():
    for record in (make_record(np.zeros((2, 0), np.int32)),
                   make_record(np.zeros((0, 4), np.int32), lead_names=())):
        assert_same_as_general(ecgdata.dumps(record), fast=False)


CANONICAL = ecgdata.dumps(
    make_record(
        np.array([[1, -20, 300, 4000], [5, 0, -7, 8]], np.int32),
        np.array([[False, False, True, False], [False] * 4]),
        lead_names=("I", "II"),
        device=DeviceInfo(serial="Nº 7 — ü \"leads\"", model="x", agent_version="1"),
    )
)


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (b"[1,-20,", b"[1, -20,"),  # whitespace: legacy json.dumps wrote ", " and ": "
        (b"[1,-20,", b"[ 1,-20,"),
        (b"[1,-20,", b"[1\n,-20,"),
        (b"4000]", b"4000 ]"),
        (b'"leads":{', b'"leads": {'),
        (b'"leads":{', b'"leads":{ '),
        (b"[1,-20,", b"[01,-20,"),  # not JSON: both must refuse
        (b"[1,-20,", b"[+1,-20,"),
        (b"[1,-20,", b"[1,-020,"),
        (b"[5,0,", b"[5,-0,"),  # JSON, but not what dumps writes
        (b"[1,-20,", b"[1.0,-20,"),  # a float: legacy mV or rounding, the general path decides
        (b"[5,0,", b"[5,0e0,"),
        (b"4000]", b"4000,]"),
        (b"[1,-20,", b"[1,,-20,"),
        (b"-20,null,", b"-20,nul,"),
        (b"-20,null,", b"-20,NULL,"),
        (b"-20,null,", b"-20,true,"),
        (b"[1,-20,", b"[99999999999999999999,-20,"),  # beyond int64
        (b"[1,-20,", b"[9223372036854775808,-20,"),
        (b'"leads":{"I":[', b'"leads":{"\\u0049":['),  # the same name, escaped otherwise
        (b'"II":[', b'"I":['),  # a repeated lead name
        (b'"units":"uV"', b'"units":"mV"'),
        (b'"lead_order":["I","II"]', b'"lead_order":["II","I"]'),
        (b'"lead_order":["I","II"]', b'"lead_order":["I"]'),
        (b'"measurements":{}', b'"measurements":{"leads":{"I":[1]}}'),
        (b'"timestamp"', b'"m":{"leads":{"I":[2]}},"timestamp"'),  # a nested one first
        (b'"measurements":{}', b'"measurements":{"x":1}}'),  # trailing garbage
        (b'"record_id":null', b'"record_id":null,"leads":{}'),  # a second top-level leads
        (b'"record_id":null', b'"record_id":null,"\\u006ceads":0'),  # the same, escaped
        (b'"record_id":null', b'"record_id":null,"leads" : 0'),
        (b'"measurements":{}', b'"measurements":{"leads":0}'),  # a nested one
        (b",8]", b",8,9]"),  # leads of unequal length
    ],
)
def test_non_canonical_leads_agree_with_the_general_path(old, new):
    doc = CANONICAL if CANONICAL.count(old) else NULLS_FORM
    assert doc.count(old) == 1
    data = doc.replace(old, new)
    assert_same_as_general(data, fast=False)


# the same document as written before `lost_samples`: `null` where a sample was lost
NULLS_FORM = CANONICAL.replace(b'"lost_samples":{"I":[[2,1]]},', b"").replace(
    b'"I":[1,-20,-20,4000]', b'"I":[1,-20,null,4000]')


def test_files_written_with_nulls_still_load_with_their_mask():
    assert NULLS_FORM != CANONICAL and b"null,4000" in NULLS_FORM
    assert_same_as_general(NULLS_FORM, fast=True)
    old, new = ecgdata.loads(NULLS_FORM), ecgdata.loads(CANONICAL)
    assert old == new
    assert old.missing.tolist() == [[False, False, True, False], [False] * 4]
    assert ecgdata.dumps(old) == CANONICAL  # and written again in today's form


@pytest.mark.parametrize(
    ("old", "new", "match"),
    [
        (b'"lost_samples":{"I":[[2,1]]}', b'"lost_samples":[[2,1]]', "must be an object"),
        (b'"lost_samples":{"I":[[2,1]]}', b'"lost_samples":{"V9":[[2,1]]}', "'V9'"),
        (b'"lost_samples":{"I":[[2,1]]}', b'"lost_samples":{"I":[[3,2]]}', "within its 4"),
        (b'"lost_samples":{"I":[[2,1]]}', b'"lost_samples":{"I":[[-1,1]]}', "run within"),
        (b'"lost_samples":{"I":[[2,1]]}', b'"lost_samples":{"I":[[2,0]]}', "run within"),
        (b'"lost_samples":{"I":[[2,1]]}', b'"lost_samples":{"I":[[2.0,1]]}', "run within"),
        (b'"lost_samples":{"I":[[2,1]]}', b'"lost_samples":{"I":[2,1]}', "run within"),
    ],
)
def test_damaged_lost_samples_are_one_clear_error_on_both_paths(old, new, match):
    data = CANONICAL.replace(old, new)
    assert data != CANONICAL
    for load in (ecgdata.loads, general_loads):
        with pytest.raises(ValueError, match=match):
            load(data)


def test_other_spellings_outside_the_leads_keep_the_fast_path():
    for old, new in [(b'"units":"uV"', b'"units":"\\u00b5V"'),
                     (b'"units":"uV"', "\"units\":\"\u00b5V\"".encode()),
                     (b'"sampling_rate":500', b'"sampling_rate" : 500'),
                     (b'"lead_order":["I","II"]', b'"lead_order":[]')]:
        assert CANONICAL.count(old) == 1
        assert_same_as_general(CANONICAL.replace(old, new), fast=True)


def test_a_number_beyond_int64_is_an_error_not_garbage():
    data = CANONICAL.replace(b"[1,-20,", b"[9223372036854775808,-20,")
    with pytest.raises(ValueError, match="lead I: a lead value is beyond 64-bit"):
        ecgdata.loads(data)


def test_canonical_document_takes_the_fast_path_and_bom_or_spaces_around_do_not_matter():
    assert_same_as_general(CANONICAL, fast=True)
    assert_same_as_general(b" \n" + CANONICAL + b"\r\n", fast=True)
    assert_same_as_general(b"\xef\xbb\xbf" + CANONICAL, fast=True)
    assert ecgdata.loads(CANONICAL) == ecgdata.loads(CANONICAL.decode())  # str: general path


def test_lead_names_with_json_syntax_in_them():
    for name in ('a":[b', "c]", 'd"', "\\", "leads", "\u2028\x01", "ü"):
        lost = np.array([[False, False], [False, True]])
        record = make_record(np.array([[1, 2], [3, 0]]), lost, lead_names=(name, "II"))
        out = ecgdata.dumps(record)
        assert_same_as_general(out)
        assert ecgdata.loads(out) == record


LEGACY_INTS = {"timestamp": "2025-03-02 08:15:00", "sampling_rate": 500,
               "leads": {"I": [1, 2, None], "II": [4, 5, 6]}}


@pytest.mark.parametrize(
    "legacy",
    [
        LEGACY_INTS,
        {"timestamp": "2025-03-02 08:15:00", "sampling_rate": 500,
         "leads": {"I": [0.1, -0.25, 1.0005], "II": [0.0, 2, None]}},  # mV floats
        {"timestamp": "2025-03-02 08:15:00", "sampling_rate": 500,
         "leads": {"I": [1, 2, 3], "II": [1.5, 2, 3]}},  # a float in a later lead only
        {"timestamp": "2025-03-02 08:15:00", "sampling_rate": 250,
         "leads": {"I": [1, 2, 3], "V1": [4]}},  # short leads are padded
    ],
)
@pytest.mark.parametrize(
    "style",
    [{"separators": (",", ":")}, {}, {"indent": 2}, {"indent": "\t", "separators": (",", ": ")}],
)
def test_legacy_files_in_any_layout_agree_with_the_general_path(legacy, style):
    data = json.dumps(legacy, **style).encode()
    compact_ints = style.get("separators") == (",", ":") and legacy is LEGACY_INTS
    assert_same_as_general(data, fast=compact_ints)


@st.composite
def mutated_documents(draw):
    """A canonical document with one small edit inside or next to its leads."""
    record = draw(records_st())
    out = ecgdata.dumps(record)
    start = out.find(b'"leads":')
    stop = out.find(b'"acquired_at"')
    at = draw(st.integers(start, stop))
    edit = draw(st.sampled_from([b" ", b"\n", b"0", b"-", b"+", b".", b"e", b",", b"]", b"[",
                                 b"null", b'"', b"\\", b"1", b""]))
    cut = draw(st.integers(0, 2))
    return out[:at] + edit + out[at + cut:]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_documents())
def test_any_edit_near_the_leads_gives_what_the_general_path_gives(data):
    assert_same_as_general(data)
