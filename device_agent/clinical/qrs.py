"""QRS detection and heart rate: mains notch, then Pan-Tompkins, numpy only.

A record's beats are found on its eight measured leads together (I, II, V1-V6; the other
four are sums of I and II): each lead's Pan-Tompkins integrated slope is scaled by its own
high percentile and the median over leads is what the thresholds see, so a lead with small
complexes (or one lead full of artefact) neither hides beats nor invents them. One lead
works the same way (`detect`).

All filters run in the frequency domain on the whole record (zero phase, so a detected
beat sits on its QRS, and no per-sample Python loop). Only the beat decisions loop, once
per candidate peak (tens per record). Any sampling rate works: every window is in seconds.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass

import numpy as np

from device_agent.core.record import FLAT_UV, Record

log = logging.getLogger(__name__)

LEAD = "II"  # the rhythm-strip lead, and the one lead `detect` is described with
DETECTION_LEADS = ("I", "II", "V1", "V2", "V3", "V4", "V5", "V6")
SCALE_PERCENTILE = 99.0  # each lead's integrated slope is divided by this percentile of itself
BAND_HZ = (5.0, 15.0)  # Pan & Tompkins 1985: where QRS energy dominates P, T and noise
NOTCH_WIDTH_HZ = 1.0  # Gaussian notch half-width: covers mains drifting +-0.5 Hz
RESIDUAL_HARMONICS = 2  # residual_hum_uv looks at the fundamental and its first harmonic
RESIDUAL_BAND_HZ = 3.0  # each side of them
HUM_SEARCH_HZ = 0.5  # hum_frequency looks this far either side of the configured mains
HUM_TRACK_UV = 20.0  # and moves the notch only for hum this large
INTEGRATION_S = 0.150
REFRACTORY_S = 0.200
T_WAVE_S = 0.360  # a peak this soon after a beat with half its slope is a T wave
SEARCHBACK_RR = 1.66
MIN_BEATS = 3
MAX_LOST_FRACTION = 0.10
MAX_RR_CV = 0.50  # above this the intervals look like detection errors, not a rhythm
# (atrial fibrillation reaches 0.36 on LUDB; a regular rhythm with 2 beats missed in 10 s, 0.4)
HR_RANGE_BPM = (20.0, 300.0)
# Beat peaks of the integrated signal over its median away from the beats: the real records
# give 25-640, noise alone 1.5-3 (its peaks fall every refractory period, like a rhythm).
MIN_CONTRAST = 6.0


def method_text(mains_hz: float, leads: str = LEAD) -> str:
    """How the rate was measured, for the JSON and the report."""
    where = f"lead {leads}" if "," not in leads else f"leads {leads}"
    return (
        f"Pan-Tompkins QRS detection on {where} (numpy): {mains_hz:g} Hz notch, "
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
    """Remove mains hum (fundamental and harmonics below Nyquist) with an FFT-domain notch.

    Works along the last axis, so a (leads, samples) array is notched lead by lead.
    """
    n = x.shape[-1]
    spectrum = np.fft.rfft(x, axis=-1)
    freqs = np.fft.rfftfreq(n, 1.0 / fs)
    spectrum *= _notch_gain(freqs, fs, mains_hz)
    return np.fft.irfft(spectrum, n, axis=-1)


def residual_hum_uv(x: np.ndarray, fs: float, mains_hz: float = 50.0, *,
                    harmonics: int = RESIDUAL_HARMONICS,
                    band_hz: float = RESIDUAL_BAND_HZ, notched: bool = True) -> float:
    """Hum left after `notch` (uV, as a sine's amplitude): the largest over rows and over
    the fundamental and its harmonics of the notched signal's content within band_hz.

    One FFT per row, the notch applied as its gain: what the notch did not take out (hum
    drifting off the notch, or swamping it) shows here; an ECG's own content in those bands
    is 3-14 uV on LUDB. With notched=False, the same measure of the signal as it is.
    """
    x = np.atleast_2d(np.asarray(x, dtype=np.float64))
    n = x.shape[-1]
    if n < 2:
        return 0.0
    freqs = np.fft.rfftfreq(n, 1.0 / fs)
    spectrum = np.fft.rfft(x - x.mean(axis=-1, keepdims=True), axis=-1)
    if notched:
        spectrum *= _notch_gain(freqs, fs, mains_hz)
    worst = 0.0
    for k in range(1, harmonics + 1):
        band = np.abs(freqs - k * mains_hz) <= band_hz
        if k * mains_hz >= fs / 2 or not band.any():
            break
        amp = 2.0 * np.sqrt((np.abs(spectrum[:, band]) ** 2).sum(axis=-1)) / n
        worst = max(worst, float(amp.max()))
    return worst


def hum_frequency(x: np.ndarray, fs: float, mains_hz: float = 50.0, *,
                  search_hz: float = HUM_SEARCH_HZ, least_uv: float = HUM_TRACK_UV) -> float:
    """The hum's own frequency near the configured one, for the notch to sit on.

    The grid runs up to +-0.5 Hz off its nominal frequency, and the notch takes out only
    a tenth less of hum 0.3 Hz off it. Over the rows' summed spectrum, the strongest bin
    (1 / duration apart: 0.1 Hz for 10 s) within search_hz of mains_hz is the hum when
    its amplitude there (the largest over rows) reaches least_uv; otherwise, or when the
    record is too short to resolve it, mains_hz as given.
    """
    x = np.atleast_2d(np.asarray(x, dtype=np.float64))
    n = x.shape[-1]
    if n < 2 or n / fs < 2.0 / search_hz:
        return float(mains_hz)
    freqs = np.fft.rfftfreq(n, 1.0 / fs)
    near = np.flatnonzero(np.abs(freqs - mains_hz) <= search_hz)
    if near.size == 0:
        return float(mains_hz)
    amp = 2.0 * np.abs(np.fft.rfft(x - x.mean(axis=-1, keepdims=True), axis=-1)[:, near]) / n
    best = int(np.argmax((amp**2).sum(axis=0)))
    if float(amp[:, best].max()) < least_uv:
        return float(mains_hz)
    return float(freqs[near[best]])


def _notch_gain(freqs: np.ndarray, fs: float, mains_hz: float) -> np.ndarray:
    gain = np.ones_like(freqs)
    for k in range(1, int(fs / 2 // mains_hz) + 1):
        gain *= 1.0 - np.exp(-(((freqs - k * mains_hz) / NOTCH_WIDTH_HZ) ** 2))
    return gain


def fill_lost(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Linear interpolation across NaN runs of each row; the filled copy and the lost mask.

    A row with nothing received stays all zero.
    """
    x = np.atleast_2d(np.asarray(x, dtype=np.float64))
    lost = np.isnan(x)
    filled = x.copy()
    if not lost.any():
        return filled, lost
    idx = np.arange(x.shape[-1])
    for row, gone in zip(filled, lost, strict=True):
        if gone.all():
            row[:] = 0.0
        elif gone.any():
            row[gone] = np.interp(idx[gone], idx[~gone], row[~gone])
    return filled, lost


def _filtered(x: np.ndarray, fs: float, mains_hz: float) -> tuple[np.ndarray, np.ndarray]:
    """Notched, band-passed rows (leads x samples) and their integrated squared derivatives."""
    # Notch over the record as it is (hum is periodic, a mirrored copy of it is not) after
    # removing the end-to-end ramp so the circular FFT sees no step; then reflect 1 s each
    # side for the band-pass so the edges do not ring.
    n = x.shape[-1]
    ramp = x[:, :1] + (x[:, -1:] - x[:, :1]) * np.linspace(0.0, 1.0, n)
    x = notch(x - ramp, fs, mains_hz) + ramp
    pad = min(n - 1, int(fs))
    padded = np.pad(x - x.mean(axis=1, keepdims=True), ((0, 0), (pad, pad)), mode="reflect")
    size = padded.shape[-1]
    freqs = np.fft.rfftfreq(size, 1.0 / fs)
    lo, hi = BAND_HZ
    with np.errstate(divide="ignore"):
        high = 1.0 / np.sqrt(1.0 + (lo / freqs) ** 4)
    band = high * (1.0 / np.sqrt(1.0 + (freqs / hi) ** 4))
    spectrum = np.fft.rfft(padded, axis=-1) * band
    bandpassed = np.fft.irfft(spectrum, size, axis=-1)[:, pad : pad + n]
    slope = np.fft.irfft(spectrum * (2j * np.pi * freqs), size, axis=-1)[:, pad : pad + n]
    width = max(1, round(INTEGRATION_S * fs))
    return bandpassed, _moving_mean(slope * slope, width)


def _moving_mean(x: np.ndarray, width: int) -> np.ndarray:
    """Centred moving mean along the last axis, zeros beyond the ends (np.convolve's 'same')."""
    n = x.shape[-1]
    csum = np.concatenate((np.zeros((*x.shape[:-1], 1)), np.cumsum(x, axis=-1)), axis=-1)
    i = np.arange(n)
    lo = np.clip(i - width // 2, 0, n)
    hi = np.clip(i + (width - 1) // 2 + 1, 0, n)
    out: np.ndarray = (csum[..., hi] - csum[..., lo]) / width
    return out


def _candidate_peaks(signal: np.ndarray, distance: int) -> np.ndarray:
    """Local maxima that are the highest within +-distance samples."""
    padded = np.pad(signal, distance, mode="constant", constant_values=-np.inf)
    window = np.lib.stride_tricks.sliding_window_view(padded, 2 * distance + 1)
    is_peak = (signal >= window.max(axis=1)) & (signal > 0)
    peaks = np.flatnonzero(is_peak)
    if peaks.size:  # plateaus: keep the first sample of a run of equal maxima
        peaks = peaks[np.concatenate(([True], np.diff(peaks) > distance))]
    return peaks


def _decide(integrated: np.ndarray, slope_env: np.ndarray, peaks: np.ndarray,
            fs: float) -> list[int]:
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
            q = _missed_beat(noise, beats[-1], p, integrated, fs, 0.5 * threshold)
            if q is not None:
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
    return _search_back_all(sorted(beats), noise, integrated, fs,
                            0.5 * (npk + 0.25 * (spk - npk)))


def _search_back_all(beats: list[int], noise: list[int], integrated: np.ndarray,
                     fs: float, least: float) -> list[int]:
    """Searchback once more over the whole record, against the median interval.

    The running searchback needs an average interval, so a beat missed before the second
    one was found (a beat cut by the record's start makes the first threshold high) stays
    missed, and its doubled interval would lower the rate. Each gap longer than
    SEARCHBACK_RR median intervals takes its highest candidate above `least` that is
    clear of both beats' refractory periods, as the running searchback does (no T-wave
    test: a gap that long holds a missed beat, and the highest candidate in it is the beat).
    """
    if len(beats) < MIN_BEATS or not noise:
        return beats
    median = float(np.median(np.diff(beats)))
    found = list(beats)
    for a, b in itertools.pairwise(beats):
        if b - a > SEARCHBACK_RR * median:
            q = _missed_beat(noise, a, b, integrated, fs, least)
            if q is not None:
                found.append(q)
    return sorted(found)


def _missed_beat(noise: list[int], after: int, before: int, integrated: np.ndarray,
                 fs: float, least: float) -> int | None:
    """Searchback: the highest candidate taken for noise between two beats, clear of both
    refractory periods and above `least`; None when there is none."""
    missed = [q for q in noise if after + REFRACTORY_S * fs < q < before - REFRACTORY_S * fs
              and integrated[q] > least]
    return int(max(missed, key=lambda i: float(integrated[i]))) if missed else None


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
    return detect_leads(np.asarray(signal_uv, dtype=np.float64)[None, :], fs,
                        mains_hz=mains_hz, names=(LEAD,))


def detect_leads(
    leads_uv: np.ndarray, fs: float, *, mains_hz: float = 50.0,
    names: tuple[str, ...] = DETECTION_LEADS,
) -> QrsResult:
    """Detect QRS complexes on several leads at once (leads x samples, float uV, NaN = lost)."""
    label = ", ".join(names)
    where = f"lead {label}" if len(names) == 1 else f"leads {label}"
    method = method_text(mains_hz, label)
    x = np.atleast_2d(np.asarray(leads_uv, dtype=np.float64))
    empty = np.zeros(0, dtype=np.int64)

    def fail(reason: str, beats: np.ndarray = empty) -> QrsResult:
        log.debug("no heart rate: %s", reason)
        return QrsResult(beats, fs, None, None, False, reason, method)

    if x.shape[1] < 2 * fs:
        return fail(f"record too short ({x.shape[1] / fs:.1f} s) to measure a rate")
    lost = np.isnan(x).any(axis=0)
    lost_fraction = float(lost.mean())
    if lost_fraction > MAX_LOST_FRACTION:
        return fail(f"too much of {where} lost ({lost_fraction:.0%})")
    filled, _ = fill_lost(x)
    live = np.ptp(filled, axis=1) >= FLAT_UV
    if not live.any():
        first = LEAD if LEAD in names else names[0]
        others = [n for n in names if n != first]
        return fail(f"lead {first} is flat" + (f", as are {', '.join(others)}" if others else ""))
    bandpassed, integrated = _filtered(filled[live], fs, mains_hz)
    integrated[:, lost] = 0.0  # no beat is placed inside a gap
    combined = _combine(integrated)
    slope_env = _combine(np.abs(np.gradient(bandpassed, axis=1)))
    peaks = _candidate_peaks(combined, max(1, round(REFRACTORY_S * fs)))
    if peaks.size < MIN_BEATS:
        return fail(f"too few beats found ({peaks.size})")
    chosen = _decide(combined, slope_env, peaks, fs)
    width = round(INTEGRATION_S * fs)
    if len(chosen) >= MIN_BEATS and _contrast(combined, np.array(chosen), width) < MIN_CONTRAST:
        return fail(f"no clear QRS complexes in {where} (noise or artefact)")
    # place each beat on the largest band-passed deflection near the integrator's peak
    half = max(1, round(INTEGRATION_S * fs / 2))
    deflection = _combine(bandpassed * bandpassed, how="sum")
    beats = np.array(
        [max(0, b - half) + int(np.argmax(deflection[max(0, b - half) : b + half + 1]))
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


def _combine(rows: np.ndarray, how: str = "median") -> np.ndarray:
    """One curve from several leads' curves, each scaled by its own high percentile first."""
    if rows.shape[0] == 1:
        only: np.ndarray = rows[0]
        return only
    scale = np.percentile(rows, SCALE_PERCENTILE, axis=1, keepdims=True)
    scaled = rows / np.where(scale > 0, scale, 1.0)
    return np.median(scaled, axis=0) if how == "median" else scaled.sum(axis=0)


def detect_record(record: Record, *, mains_hz: float = 50.0) -> QrsResult:
    """Detect beats on the record's measured leads (those of DETECTION_LEADS it has)."""
    names = tuple(n for n in DETECTION_LEADS if n in record.lead_names) or (LEAD,)
    leads = np.stack([record.lead(n) for n in names])
    return detect_leads(leads, record.sampling_rate, mains_hz=mains_hz, names=names)
