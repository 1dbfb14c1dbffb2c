"""wfdb: a real recording as a Record (leads in order, values in uV, resampled), and back."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta, timezone

import numpy as np
import pytest

from device_agent.lab.wfdb import INVALID, encode_record, read_record, to_record, write_record
from device_agent.record import LEAD_ORDER, DeviceInfo, Record

AT = datetime(2026, 11, 27, 9, 30, tzinfo=timezone(timedelta(hours=1)))


@pytest.mark.parametrize("name", ["HR06000", "s0010_re"])  # s0010_re spells leads `ii`, `avr`
def test_leads_are_the_source_leads_in_lead_order(ecg_data_dir, name):
    src = read_record(ecg_data_dir / name)
    record = to_record(src, acquired_at=AT, record_id=f"id-{name}")
    assert isinstance(record, Record)
    assert record.lead_names == LEAD_ORDER
    assert record.samples.dtype == np.int32
    assert record.samples.shape == (12, src.signals_uv.shape[1])
    assert record.sampling_rate == int(src.sampling_rate)
    by_name = {n.lower(): row for n, row in zip(src.lead_names, src.signals_uv, strict=False)}
    for i, lead in enumerate(LEAD_ORDER):
        np.testing.assert_array_equal(record.samples[i], np.rint(by_name[lead.lower()]))
    assert record.missing.shape == record.samples.shape and not record.missing.any()
    assert record.acquired_at == AT and record.record_id == f"id-{name}"
    assert record.device == DeviceInfo()


def test_path_and_parsed_record_give_the_same_record(ecg_data_dir):
    by_path = to_record(ecg_data_dir / "HR06003", acquired_at=AT,
                        device=DeviceInfo("SN-1", "ECG12-PI"))
    parsed = to_record(read_record(ecg_data_dir / "HR06003"), acquired_at=AT)
    np.testing.assert_array_equal(by_path.samples, parsed.samples)
    assert by_path.device.serial == "SN-1" and parsed.device.serial == "unknown"


def test_seconds_keeps_the_first_samples(ecg_data_dir):
    whole = to_record(ecg_data_dir / "s0010_re", acquired_at=AT)
    first = to_record(ecg_data_dir / "s0010_re", seconds=2.5, acquired_at=AT)
    assert whole.sampling_rate == 1000 and whole.n_samples == 38400
    assert first.n_samples == 2500
    np.testing.assert_array_equal(first.samples, whole.samples[:, :2500])


def test_rate_resamples_and_keeps_the_waveform(ecg_data_dir):
    native = to_record(ecg_data_dir / "s0010_re", seconds=10, acquired_at=AT)
    half = to_record(ecg_data_dir / "s0010_re", seconds=10, rate=500, acquired_at=AT)
    same = to_record(ecg_data_dir / "s0010_re", seconds=10, rate=1000, acquired_at=AT)
    assert half.sampling_rate == 500 and half.samples.shape == (12, 5000)
    assert half.samples.dtype == np.int32
    np.testing.assert_array_equal(same.samples, native.samples)
    # every other native sample, against the band-limited resample: close, far from equal
    err = np.abs(half.samples.astype(float) - native.samples[:, ::2]).max(axis=1)
    spread = np.ptp(native.samples, axis=1)
    assert (err < 0.1 * spread).all(), (err, spread)
    assert not np.array_equal(half.samples, native.samples[:, ::2])


def test_acquired_at_defaults_to_now_in_utc(ecg_data_dir):
    before = datetime.now(UTC)
    record = to_record(ecg_data_dir / "HR06000", seconds=1)
    assert before <= record.acquired_at <= datetime.now(UTC)
    assert record.acquired_at.utcoffset() == timedelta(0)


# --- the writer -------------------------------------------------------------------------------


def _lossy(record: Record) -> Record:
    """The record with lost samples: a gap in every lead, one lone sample, a lead's last."""
    missing = record.missing.copy()
    missing[:, 700:730] = True
    missing[LEAD_ORDER.index("V4"), 3] = True
    missing[LEAD_ORDER.index("aVL"), -1] = True
    return dataclasses.replace(record, samples=np.where(missing, 0, record.samples),
                               missing=missing)


@pytest.mark.parametrize("name,seconds", [("HR06001", None), ("s0010_re", 10)])
def test_written_record_reads_back_sample_for_sample(ecg_data_dir, tmp_path, name, seconds):
    record = _lossy(to_record(ecg_data_dir / name, seconds=seconds, acquired_at=AT,
                              record_id=f"id-{name}"))
    hea, dat = write_record(record, tmp_path / "out")
    assert (hea.name, dat.name) == ("out.hea", "out.dat")
    assert dat.stat().st_size == 12 * record.n_samples * 2

    src = read_record(hea)
    assert src.lead_names == LEAD_ORDER and src.sampling_rate == record.sampling_rate
    np.testing.assert_array_equal(np.isnan(src.signals_uv), record.missing)
    back = to_record(hea, acquired_at=AT, record_id=f"id-{name}")
    assert back == record  # Record equality: samples, missing, rate, leads
    assert back.missing.sum() == 12 * 30 + 2
    raw = np.fromfile(dat, dtype="<i2").reshape(-1, 12).T
    np.testing.assert_array_equal(raw == INVALID, record.missing)


def test_header_gives_gain_baseline_and_checksum_per_lead(ecg_data_dir, tmp_path):
    record = _lossy(to_record(ecg_data_dir / "HR06002", acquired_at=AT, record_id="rid-2"))
    hea, dat = write_record(record, tmp_path / "rec_2")
    lines = hea.read_text().splitlines()
    assert lines[0] == "rec_2 12 500 5000 09:30:00 27/11/2026"
    raw = np.fromfile(dat, dtype="<i2").reshape(-1, 12).T.astype(np.int64)
    for i, lead in enumerate(LEAD_ORDER):
        fields = lines[1 + i].split()
        assert fields[0] == "rec_2.dat" and fields[1] == "16" and fields[-1] == lead
        assert fields[2] == "1000(0)/mV"  # 1 ADC unit per uV: the record fits int16
        assert int(fields[5]) == raw[i, 0]  # initial value
        assert int(fields[6]) == (raw[i].sum() + 32768) % 65536 - 32768  # 16-bit checksum
    assert "# acquired_at: 2026-11-27T09:30:00+01:00" in lines
    assert "# record_id: rid-2" in lines


def test_a_lead_beyond_int16_is_centred_by_its_baseline_and_stays_exact(ecg_data_dir, tmp_path):
    record = to_record(ecg_data_dir / "HR06000", acquired_at=AT)
    samples = record.samples.copy()
    samples[1] += 50_000  # a large offset: beyond int16, span still small
    samples[2] = samples[2] * 20  # +-25 mV: fits 65534 uV of span, not int16 from 0
    record = _lossy(dataclasses.replace(record, samples=samples))
    hea, _ = write_record(record, tmp_path / "big")
    fields = hea.read_text().splitlines()[2].split()
    gain, baseline = fields[2].split("(")
    assert gain == "1000" and int(baseline.split(")")[0]) != 0
    assert to_record(hea, acquired_at=AT) == record


def test_a_lead_spanning_more_than_int16_is_stored_in_whole_uv_steps(ecg_data_dir, tmp_path):
    record = to_record(ecg_data_dir / "HR06000", acquired_at=AT)
    samples = record.samples.copy()
    samples[6] = np.linspace(-80_000, 100_000, record.n_samples).astype(np.int32)  # off-centre
    record = _lossy(dataclasses.replace(record, samples=samples))
    hea, dat = write_record(record, tmp_path / "wide")
    gain = float(hea.read_text().splitlines()[7].split()[2].split("(")[0])
    step = round(1000.0 / gain)
    assert step > 1 and abs(1000.0 / gain - step) < 1e-9  # whole uV per ADC unit
    back = to_record(hea, acquired_at=AT)
    np.testing.assert_array_equal(back.missing, record.missing)
    err = np.abs(back.samples[6] - record.samples[6])[~record.missing[6]]
    assert err.max() <= step / 2
    others = np.arange(12) != 6
    np.testing.assert_array_equal(back.samples[others], record.samples[others])
    raw = np.fromfile(dat, dtype="<i2").reshape(-1, 12).T
    assert raw[6][~record.missing[6]].min() > INVALID  # no received sample reads as lost


def test_resampling_a_lossy_recording_keeps_its_gaps(ecg_data_dir, tmp_path):
    record = _lossy(to_record(ecg_data_dir / "s0010_re", seconds=4, acquired_at=AT))
    hea, _ = write_record(record, tmp_path / "r")
    half = to_record(hea, rate=500, acquired_at=AT)
    assert half.samples.shape == (12, 2000)
    np.testing.assert_array_equal(half.missing, record.missing[:, ::2])
    assert not half.samples[half.missing].any()


def test_encode_record_refuses_a_name_wfdb_cannot_hold(ecg_data_dir):
    record = to_record(ecg_data_dir / "HR06000", seconds=1, acquired_at=AT)
    for bad in ("two words", "", "a/b"):
        with pytest.raises(ValueError, match="WFDB record name"):
            encode_record(record, bad)
    header, data = encode_record(record, "ok_name")
    assert header.startswith(b"ok_name 12 500 500 ") and len(data) == 12 * 500 * 2
