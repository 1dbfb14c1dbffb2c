"""QRS detection and heart rate on lead II: mains notch, then Pan-Tompkins, numpy only.

All filters run in the frequency domain on the whole record (zero phase, so a detected
beat sits on its QRS, and no per-sample Python loop). Only the beat decisions loop, once
per candidate peak (tens per record). Any sampling rate works: every window is in seconds.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from device_agent.record import Record

log = logging.getLogger(__name__)

LEAD = "II"
BAND_HZ = (5.0, 15.0)  # Pan & Tompkins 1985: where QRS energy dominates P, T and noise
NOTCH_WIDTH_HZ = 1.0  # Gaussian notch half-width: covers mains drifting +-0.5 Hz
INTEGRATION_S = 0.150
REFRACTORY_S = 0.200
T_WAVE_S = 0.360  # a peak this soon after a beat with half its slope is a T wave
SEARCHBACK_RR = 1.66
MIN_BEATS = 3
MAX_LOST_FRACTION = 0.10
MAX_RR_CV = 0.35  # above this the intervals look like detection errors, not a rhythm
FLAT_UV = 20.0  # peak-to-peak below this: no signal to detect on
HR_RANGE_BPM = (20.0, 300.0)
# Beat peaks of the integrated signal over its median away from the beats: the real records
# give 25-640, noise alone 1.5-3 (its peaks fall every refractory period, like a rhythm).
MIN_CONTRAST = 6.0


def method_text(mains_hz: float) -> str:
    """How the rate was measured, for the JSON and the report."""
    return (
        f"Pan-Tompkins QRS detection on lead {LEAD} (numpy): {mains_hz:g} Hz notch, "
        f"{BAND_HZ[0]:g}-{BAND_HZ[1]:g} Hz band-pass, derivative, squaring, "
        f"{INTEGRATION_S * 1000:.0f} ms integration, adaptive thresholds, searchback"
    )


@dataclass(frozen=True)
class QrsResult:
    """Detected beats (sample indices), rate and mean RR; rate is None when not confident."""

    beats: np.ndarray
    sampling_rate: float
    heart_rate_bpm: float | None
    rr_mean_ms: float | None
    confident: bool
    reason: str | None = None
    method: str = ""


def notch(x: np.ndarray, fs: float, mains_hz: float = 50.0) -> np.ndarray:
    """Remove mains hum (fundamental and harmonics below Nyquist) with an FFT-domain notch."""
    spectrum = np.fft.rfft(x)
    freqs = np.fft.rfftfreq(x.size, 1.0 / fs)
    spectrum *= _notch_gain(freqs, fs, mains_hz)
    return np.fft.irfft(spectrum, x.size)


def _notch_gain(freqs: np.ndarray, fs: float, mains_hz: float) -> np.ndarray:
    gain = np.ones_like(freqs)
    for k in range(1, int(fs / 2 // mains_hz) + 1):
        gain *= 1.0 - np.exp(-(((freqs - k * mains_hz) / NOTCH_WIDTH_HZ) ** 2))
    return gain


def _fill_lost(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Linear interpolation across NaN runs; returns the filled copy and the lost mask."""
    lost = np.isnan(x)
    if not lost.any():
        return x.astype(np.float64, copy=True), lost
    idx = np.arange(x.size)
    filled = np.interp(idx, idx[~lost], x[~lost])
    return filled, lost


def _filtered(x: np.ndarray, fs: float, mains_hz: float) -> tuple[np.ndarray, np.ndarray]:
    """Notched, band-passed signal and its integrated squared derivative."""
    # Notch over the record as it is (hum is periodic, a mirrored copy of it is not) after
    # removing the end-to-end ramp so the circular FFT sees no step; then reflect 1 s each
    # side for the band-pass so the edges do not ring.
    ramp = np.linspace(x[0], x[-1], x.size)
    x = notch(x - ramp, fs, mains_hz) + ramp
    pad = min(x.size - 1, int(fs))
    padded = np.pad(x - np.mean(x), pad, mode="reflect")
    freqs = np.fft.rfftfreq(padded.size, 1.0 / fs)
    lo, hi = BAND_HZ
    with np.errstate(divide="ignore"):
        high = 1.0 / np.sqrt(1.0 + (lo / freqs) ** 4)
    band = high * (1.0 / np.sqrt(1.0 + (freqs / hi) ** 4))
    spectrum = np.fft.rfft(padded) * band
    bandpassed = np.fft.irfft(spectrum, padded.size)[pad : pad + x.size]
    slope = np.fft.irfft(spectrum * (2j * np.pi * freqs), padded.size)[pad : pad + x.size]
    width = max(1, round(INTEGRATION_S * fs))
    integrated = np.convolve(slope * slope, np.ones(width) / width, mode="same")
    return bandpassed, integrated


def _candidate_peaks(signal: np.ndarray, distance: int) -> np.ndarray:
    """Local maxima that are the highest within +-distance samples."""
    padded = np.pad(signal, distance, mode="constant", constant_values=-np.inf)
    window = np.lib.stride_tricks.sliding_window_view(padded, 2 * distance + 1)
    is_peak = (signal >= window.max(axis=1)) & (signal > 0)
    peaks = np.flatnonzero(is_peak)
    if peaks.size:  # plateaus: keep the first sample of a run of equal maxima
        peaks = peaks[np.concatenate(([True], np.diff(peaks) > distance))]
    return peaks


def _decide(integrated: np.ndarray, slope_env: np.ndarray, peaks: np.ndarray, fs: float) -> list:
    """Pan-Tompkins adaptive thresholds, T-wave rejection and searchback over candidates."""
    learn = peaks[peaks < 2 * fs]
    heights = integrated[learn if learn.size else peaks]
    spk = 0.5 * float(np.max(heights))
    npk = 0.5 * float(np.mean(integrated[: int(2 * fs)]))
    beats: list[int] = []
    noise: list[int] = []
    rr_avg: float | None = None
    for p in peaks:
        h = float(integrated[p])
        threshold = npk + 0.25 * (spk - npk)
        if beats and rr_avg and p - beats[-1] > SEARCHBACK_RR * rr_avg:
            missed = [q for q in noise if beats[-1] + REFRACTORY_S * fs < q < p - REFRACTORY_S * fs
                      and integrated[q] > 0.5 * threshold]
            if missed:
                q = max(missed, key=lambda i: integrated[i])
                beats.append(q)
                spk = 0.25 * float(integrated[q]) + 0.75 * spk
        if h > threshold:
            soon = bool(beats) and p - beats[-1] < T_WAVE_S * fs
            if soon and slope_env[p] < 0.5 * slope_env[beats[-1]]:
                npk = 0.125 * h + 0.875 * npk
                noise.append(p)
                continue
            beats.append(int(p))
            spk = 0.125 * h + 0.875 * spk
            if len(beats) >= 2:
                recent = np.diff(beats[-9:])
                rr_avg = float(np.mean(recent))
        else:
            npk = 0.125 * h + 0.875 * npk
            noise.append(int(p))
    return sorted(beats)


def _contrast(integrated: np.ndarray, beats: np.ndarray, width: int) -> float:
    """Median beat peak over the median of the integrated signal away from the beats."""
    near = np.zeros(integrated.size + 1, dtype=np.int64)
    np.add.at(near, np.clip(beats - width, 0, integrated.size), 1)
    np.add.at(near, np.clip(beats + width + 1, 0, integrated.size), -1)
    away = integrated[np.cumsum(near)[:-1] == 0]
    floor = float(np.median(away)) if away.size else float(np.median(integrated))
    return float(np.median(integrated[beats])) / max(floor, 1e-12 * float(np.max(integrated)))


def detect(
    signal_uv: np.ndarray, fs: float, *, mains_hz: float = 50.0
) -> QrsResult:
    """Detect QRS complexes in one lead (float uV, NaN where lost) and measure the rate."""
    method = method_text(mains_hz)
    x = np.asarray(signal_uv, dtype=np.float64)
    empty = np.zeros(0, dtype=np.int64)

    def fail(reason: str, beats: np.ndarray = empty) -> QrsResult:
        log.debug("no heart rate: %s", reason)
        return QrsResult(beats, fs, None, None, False, reason, method)

    if x.size < 2 * fs:
        return fail(f"record too short ({x.size / fs:.1f} s) to measure a rate")
    lost = np.isnan(x)
    lost_fraction = float(lost.mean())
    if lost_fraction > MAX_LOST_FRACTION:
        return fail(f"too much of lead {LEAD} lost ({lost_fraction:.0%})")
    filled, lost = _fill_lost(x)
    if np.ptp(filled) < FLAT_UV:
        return fail(f"lead {LEAD} is flat")
    bandpassed, integrated = _filtered(filled, fs, mains_hz)
    integrated[lost] = 0.0  # no beat is placed inside a gap
    slope_env = np.abs(np.gradient(bandpassed))
    peaks = _candidate_peaks(integrated, max(1, round(REFRACTORY_S * fs)))
    if peaks.size < MIN_BEATS:
        return fail(f"too few beats found ({peaks.size})")
    chosen = _decide(integrated, slope_env, peaks, fs)
    width = round(INTEGRATION_S * fs)
    if len(chosen) >= MIN_BEATS and _contrast(integrated, np.array(chosen), width) < MIN_CONTRAST:
        return fail(f"no clear QRS complexes in lead {LEAD} (noise or artefact)")
    # place each beat on the largest band-passed deflection near the integrator's peak
    half = max(1, round(INTEGRATION_S * fs / 2))
    beats = np.array(
        [max(0, b - half) + int(np.argmax(np.abs(bandpassed[max(0, b - half) : b + half + 1])))
         for b in chosen],
        dtype=np.int64,
    )
    if beats.size < MIN_BEATS:
        return fail(f"too few beats found ({beats.size})", beats)
    rr = np.diff(beats).astype(np.float64)
    if lost.any():  # an interval that spans a gap may hide a beat: leave it out
        lost_before = np.concatenate(([0], np.cumsum(lost)))
        rr = rr[lost_before[beats[1:]] == lost_before[beats[:-1]]]
    if rr.size < MIN_BEATS - 1:
        return fail(f"too few intervals without lost samples ({rr.size})", beats)
    cv = float(np.std(rr) / np.mean(rr))
    if cv > MAX_RR_CV:
        return fail(f"RR intervals too irregular to trust (variation {cv:.0%})", beats)
    rr_ms = float(np.mean(rr)) / fs * 1000.0
    bpm = 60000.0 / rr_ms
    if not HR_RANGE_BPM[0] <= bpm <= HR_RANGE_BPM[1]:
        return fail(f"rate {bpm:.0f} bpm outside {HR_RANGE_BPM[0]:g}-{HR_RANGE_BPM[1]:g}", beats)
    return QrsResult(beats, fs, bpm, rr_ms, True, None, method)


def detect_record(record: Record, *, mains_hz: float = 50.0) -> QrsResult:
    """Detect beats on the record's lead II."""
    return detect(record.lead(LEAD), record.sampling_rate, mains_hz=mains_hz)


def measurements(record: Record, *, mains_hz: float = 50.0) -> dict:
    """The ecg_data JSON's `measurements` block: only what was measured, with its method."""
    result = detect_record(record, mains_hz=mains_hz)
    return as_measurements(result)


def as_measurements(result: QrsResult) -> dict:
    """A QrsResult as the JSON `measurements` block."""
    bpm, rr = result.heart_rate_bpm, result.rr_mean_ms
    block: dict = {
        "heart_rate_bpm": None if bpm is None else round(bpm, 1),
        "rr_mean_ms": None if rr is None else round(rr),
        "beats": int(result.beats.size),
        "lead": LEAD,
        "method": result.method,
    }
    if not result.confident:
        block["not_measured_reason"] = result.reason
    return block
