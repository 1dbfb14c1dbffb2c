"""wfdb.to_record: a real recording as a Record, leads in order, values in uV, resampled."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import numpy as np
import pytest

from device_agent.record import LEAD_ORDER, DeviceInfo, Record
from device_agent.lab.wfdb import read_record, to_record

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
