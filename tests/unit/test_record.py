"""build_record: calibration, baseline, derived leads, lost samples and the quality verdict."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import numpy as np

from device_agent.core.config import load_settings
from device_agent.core.record import (
    ELECTRODES,
    LEAD_ORDER,
    VERDICT_OK,
    VERDICT_REJECTED,
    VERDICT_WARN,
    build_record,
    runs,
)

AT = datetime(2026, 11, 27, 12, 0, 0, tzinfo=timezone(timedelta(hours=1)))
SETTINGS = load_settings(env_file=None, environ={}).replace(counts_per_mv=400.0)


def _signal(n=5000, seed=0):
    rng = np.random.default_rng(seed)
    t = np.arange(n) / 500
    base = np.array([2048, 2000, 1990, 2030, 1970, 2000, 2040, 1960])
    wave = (200 * np.sin(2 * np.pi * 1.2 * t))[:, None] * (1 + np.arange(8))[None, :] / 4
    counts = np.rint(base + wave + rng.normal(0, 2, (n, 8))).astype(np.uint16)
    return counts


def _build(counts, position=None, flags=None, **kw):
    n = kw.pop("n_samples", 5000)
    position = np.arange(len(counts)) if position is None else position
    flags = np.ones((len(counts), 9), bool) if flags is None else flags
    return build_record(position, counts, flags, n_samples=n, acquired_at=AT,
                        settings=kw.pop("settings", SETTINGS), **kw)


def test_calibration_baseline_and_derived_leads():
    counts = _signal()
    rec = _build(counts)
    base = np.median(counts, axis=0)
    uv = (counts - base) * 1000 / 400
    i, ii = uv[:, 0], uv[:, 1]
    assert rec.adc.baseline == tuple(base) and rec.adc.counts_per_mv == 400
    assert np.abs(rec.lead("I") - i).max() <= 0.5
    assert np.abs(rec.lead("V6") - uv[:, 7]).max() <= 0.5
    assert np.abs(rec.lead("III") - (ii - i)).max() <= 0.5
    assert np.abs(rec.lead("aVR") + (i + ii) / 2).max() <= 0.5
    assert np.abs(rec.lead("aVL") - (i - ii / 2)).max() <= 0.5
    assert np.abs(rec.lead("aVF") - (ii - i / 2)).max() <= 0.5
    # raw counts are recoverable from the record alone
    back = rec.samples[LEAD_ORDER.index("V1")] * 400 / 1000 + rec.adc.baseline[2]
    assert np.array_equal(np.rint(back), counts[:, 2])
    assert rec.quality.verdict == VERDICT_OK and rec.acquired_at is AT
    assert rec.samples.dtype == np.int32 and rec.sampling_rate == 500


def test_lost_samples_are_missing_in_place_and_reject_over_the_limit():
    counts = _signal()
    keep = np.ones(5000, bool)
    keep[1000:1010] = False  # 10 samples = 20 ms: within limits
    rec = _build(counts[keep], position=np.flatnonzero(keep))
    assert rec.missing[:, 1000:1010].all() and not rec.missing[:, keep].any()
    assert (rec.samples[:, 1000:1010] == 0).all()
    assert rec.quality.frames_lost == 10 and rec.quality.gaps[0].start == 1000
    assert rec.quality.verdict == VERDICT_WARN
    keep[3000:3030] = False  # 60 ms gap: over max_gap_ms
    rec = _build(counts[keep], position=np.flatnonzero(keep))
    assert rec.quality.verdict == VERDICT_REJECTED
    assert any("60 ms" in r for r in rec.quality.reasons)
    keep = np.random.default_rng(1).random(5000) > 0.01  # 1 % scattered: over 0.5 %
    rec = _build(counts[keep], position=np.flatnonzero(keep))
    assert rec.quality.verdict == VERDICT_REJECTED


def test_electrode_off_flat_and_saturation_are_warnings():
    counts = _signal()
    flags = np.ones((5000, 9), bool)
    flags[1000:2000, ELECTRODES.index("V3")] = False
    counts[:, 5] = 2000  # V4 flat
    counts[10:20, 7] = 4095  # V6 touches the rail
    rec = _build(counts, flags=flags)
    q = rec.quality
    assert [(e.electrode, e.start, e.length) for e in q.electrodes_off] == [("V3", 1000, 1000)]
    assert q.flat_leads == ("V4",) and q.saturated_leads == ("V6",)
    assert q.verdict == VERDICT_WARN and len(q.reasons) == 3


def test_mains_noise_estimate():
    counts = _signal().astype(np.float64)
    t = np.arange(5000) / 500
    counts[:, 0] += 40 * np.sin(2 * np.pi * 50 * t)  # 40 counts = 100 uV at 400/mV
    rec = _build(np.rint(counts).astype(np.uint16))
    assert 90 <= rec.quality.mains_noise_uv <= 110
    assert rec.quality.verdict == VERDICT_WARN
    rec60 = _build(np.rint(counts).astype(np.uint16), settings=SETTINGS.replace(mains_hz="60"))
    assert rec60.quality.mains_noise_uv < 10


def test_runs():
    assert runs(np.array([0, 1, 1, 0, 1], bool)) == [(1, 2), (4, 1)]
    assert runs(np.zeros(3, bool)) == []
