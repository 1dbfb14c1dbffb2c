"""ecg_data JSON: exact round trip, canonical compact form, legacy files, real recordings."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from device_agent import ecgdata
from device_agent.lab.wfdb import read_record, to_record
from device_agent.record import (
    LEAD_ORDER,
    AdcInfo,
    DeviceInfo,
    ElectrodeOff,
    Gap,
    Quality,
    Record,
)

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


def test_all_null_leads_write_null():
    record = make_record(np.zeros((12, 5), np.int32), np.ones((12, 5), dtype=bool))
    doc = json.loads(assert_roundtrip(record))
    assert doc["leads"]["aVF"] == [None] * 5


def test_int16_extremes_and_lost_samples():
    samples = np.array([[-32768, 32767, 0, -1, 5]] * 12, dtype=np.int32)
    missing = np.zeros(samples.shape, dtype=bool)
    missing[3, 1] = True
    samples[3, 1] = 0
    doc = json.loads(assert_roundtrip(make_record(samples, missing)))
    assert doc["leads"]["I"] == [-32768, 32767, 0, -1, 5]
    assert doc["leads"]["aVR"] == [-32768, None, 0, -1, 5]


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


def expected_leads(record: Record) -> dict:
    """The leads as the stdlib would write them, from Python ints (the reference)."""
    return {
        name: [None if lost else int(v) for v, lost in zip(row, gone, strict=True)]
        for name, row, gone in zip(
            record.lead_names, record.samples.tolist(), record.missing.tolist(), strict=True
        )
    }


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
    assert json.loads(ecgdata.dumps(lossy))["leads"]["V6"][1000:1050] == [None] * 50
