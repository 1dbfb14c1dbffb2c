"""QRS detection: the real records' rates, mains hum, lost samples, and honest refusals."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from device_agent.clinical import qrs
from device_agent.core.record import Record
from device_agent.lab.wfdb import read_record, to_record

# README reference rates (two detectors agree on these), as (low, high) bpm.
REFERENCE_BPM = {
    "HR06000": (68, 69),
    "HR06001": (75, 77),
    "HR06002": (41, 42),
    "HR06003": (123, 123),
    "HR06004": (71, 71),
    "HR06005": (86, 86),
    "s0010_re": (82, 82),
}
TOLERANCE_BPM = 3.0


def wfdb_record(path, *, seconds: float = 10.0, rate: int | None = None) -> Record:
    """The first `seconds` of a WFDB record as a Record (optionally FFT-resampled to `rate`)."""
    src = read_record(path)
    return to_record(src, seconds=seconds, rate=rate, record_id=f"test-{src.name}",
                     acquired_at=datetime(2026, 11, 27, 9, 30, 0,
                                          tzinfo=timezone(timedelta(hours=1))))


def _within_reference(name: str, bpm: float | None) -> bool:
    low, high = REFERENCE_BPM[name]
    return bpm is not None and low - TOLERANCE_BPM <= bpm <= high + TOLERANCE_BPM


def _hum(record: Record, hz: float, uv: float) -> Record:
    t = np.arange(record.n_samples) / record.sampling_rate
    hum = np.rint(uv * np.sin(2 * np.pi * hz * t + 0.4)).astype(np.int32)
    return Record(record.acquired_at, record.sampling_rate, record.samples + hum, record.missing)


@pytest.mark.parametrize("name", sorted(REFERENCE_BPM))
def test_heart_rate_matches_reference(ecg_data_dir, name):
    result = qrs.detect_record(wfdb_record(ecg_data_dir / name))
    assert result.confident, result.reason
    assert _within_reference(name, result.heart_rate_bpm), result.heart_rate_bpm
    assert result.heart_rate_bpm is not None
    assert result.rr_mean_ms == pytest.approx(60000.0 / result.heart_rate_bpm)


def test_any_sampling_rate_gives_the_same_rate(ecg_data_dir):
    native = qrs.detect_record(wfdb_record(ecg_data_dir / "s0010_re"))  # 1000 Hz
    resampled = qrs.detect_record(wfdb_record(ecg_data_dir / "s0010_re", rate=500))
    assert native.sampling_rate == 1000 and resampled.sampling_rate == 500
    assert resampled.heart_rate_bpm == pytest.approx(native.heart_rate_bpm, abs=1.0)
    assert _within_reference("s0010_re", resampled.heart_rate_bpm)


@pytest.mark.parametrize("name", sorted(REFERENCE_BPM))
def test_rate_holds_under_50hz_hum(ecg_data_dir, name):
    noisy = _hum(wfdb_record(ecg_data_dir / name), 50.0, 200.0)  # 0.2 mV
    result = qrs.detect_record(noisy, mains_hz=50)
    assert _within_reference(name, result.heart_rate_bpm), (result.heart_rate_bpm, result.reason)


@pytest.mark.parametrize("name", ["HR06000", "HR06003", "s0010_re"])
def test_rate_holds_under_60hz_hum_with_mains_set_to_60(ecg_data_dir, name):
    noisy = _hum(wfdb_record(ecg_data_dir / name), 60.0, 200.0)
    result = qrs.detect_record(noisy, mains_hz=60)
    assert _within_reference(name, result.heart_rate_bpm), (result.heart_rate_bpm, result.reason)
    assert "60 Hz notch" in result.method


@pytest.mark.parametrize("fs,mains", [(500, 50.0), (500, 60.0), (1000, 50.0)])
def test_notch_removes_mains_and_keeps_the_rest(fs, mains):
    t = np.arange(10 * fs) / fs
    hum = np.sin(2 * np.pi * mains * t) + 0.3 * np.sin(2 * np.pi * 2 * mains * t)
    wanted = np.sin(2 * np.pi * 10.0 * t)  # QRS band
    out = qrs.notch(wanted + hum, fs, mains)
    assert np.max(np.abs(out - wanted)) < 0.01


def test_lost_samples_inside_the_record_do_not_change_the_rate(ecg_data_dir):
    record = wfdb_record(ecg_data_dir / "HR06000")
    missing = record.missing.copy()
    missing[:, 1000:1100] = True  # 200 ms and 600 ms gaps: at most one beat hidden
    missing[:, 3000:3300] = True
    samples = np.where(missing, 0, record.samples)
    gappy = Record(record.acquired_at, 500, samples, missing)
    result = qrs.detect_record(gappy)
    assert result.confident, result.reason
    assert _within_reference("HR06000", result.heart_rate_bpm)
    assert not np.any((result.beats >= 1000) & (result.beats < 1100))


def test_too_much_lost_is_not_measured(ecg_data_dir):
    record = wfdb_record(ecg_data_dir / "HR06000")
    missing = np.zeros_like(record.missing)
    missing[:, 2000:3000] = True  # 20 %
    result = qrs.detect_record(Record(record.acquired_at, 500, record.samples, missing))
    assert not result.confident and result.heart_rate_bpm is None
    assert "lost" in (result.reason or "")


@pytest.mark.parametrize(
    "signal,word",
    [
        (np.zeros(5000), "flat"),
        (np.random.default_rng(7).normal(0.0, 50.0, 5000), "no clear QRS"),
        (np.zeros(600), "too short"),
    ],
)
def test_no_rate_without_a_clear_signal(signal, word):
    result = qrs.detect(signal, 500)
    assert result.heart_rate_bpm is None and result.rr_mean_ms is None
    assert not result.confident and word in (result.reason or "")


def test_irregular_detections_are_not_reported():
    fs = 500
    x = np.zeros(10 * fs)
    for at in (0.5, 0.9, 3.4, 3.8, 7.9, 8.3, 9.6):  # 0.4 s and 2.5+ s apart: not a rhythm
        i = int(at * fs)
        x[i - 10 : i + 10] = 1000.0 * np.hanning(20)
    result = qrs.detect(x, fs)
    assert result.heart_rate_bpm is None and "irregular" in (result.reason or "")


@settings(max_examples=25, deadline=None)
@given(bpm=st.floats(min_value=35, max_value=180), phase=st.floats(min_value=0, max_value=1))
@example(bpm=146.25, phase=0.0)  # a beat cut by the start hid the next one: 140 bpm, once
@example(bpm=145.5625, phase=0.0)
def test_synthetic_rhythm_rate_is_recovered(bpm, phase):
    fs = 500
    t = np.arange(10 * fs) / fs
    period = 60.0 / bpm
    centres = np.arange(phase * period, 10.0, period)
    x = np.zeros_like(t)
    for c in centres:  # a 80 ms QRS-like biphasic wave and a wide T wave
        x += 1200.0 * np.exp(-(((t - c) / 0.012) ** 2))
        x -= 300.0 * np.exp(-(((t - c - 0.03) / 0.01) ** 2))
        x += 250.0 * np.exp(-(((t - c - 0.25) / 0.05) ** 2))
    result = qrs.detect(x, fs)
    assert result.confident, result.reason
    assert result.heart_rate_bpm == pytest.approx(bpm, abs=1.0)
