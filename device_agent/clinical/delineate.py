"""Global 12-lead delineation: where P, QRS and T begin and end, from all leads together.

Input: the 12 leads (LEAD_ORDER, float64 uV, NaN where lost), the sampling rate and the QRS
detections. Output: per dominant beat the global P onset and offset, QRS onset and offset,
T peak and T end (sample indices; None where a wave is absent), plus the median beat.

Method (numpy only, every window in seconds so any sampling rate works):
1. Filter: lost samples bridged linearly, mains notch (qrs.notch), zero-phase 0.5 Hz
   high-pass and Gaussian low-pass (half amplitude at 30 Hz, no ringing), in the FFT domain.
2. Beats: each detection is re-aligned (+-16 ms) to the median beat by least squares over
   the QRS region of all leads; beats whose QRS correlates under 0.9 with the median beat
   (ectopics, artefacts) or that hold lost samples are left out. The median beat of the
   rest (the "template") is delineated first and guides each beat's own delineation.
3. The curves are spatial, over the independent leads (I, II, V1-V6; the other four are
   sums of I and II): the spatial velocity |dX/dt| (root-sum-square of the leads' slopes)
   and the root-mean-square of the leads about their PR-segment level.
   - QRS: the first and last samples within the complex where the spatial velocity exceeds
     30 % of its peak, then outwards to where it falls within 1 % of the peak above the
     level of the PR segment (onset) or the ST segment (offset).
   - T: the peak of the RMS curve between QRS end + 80 ms and the earlier of QRS onset
     + 450 ms and 55 % of the RR interval; the end is where the spatial velocity of the
     leads smoothed with an 8 ms Gaussian, after its steepest fall past the T peak, drops
     to 10 % of that fall's rate above its floor.
   - P: searched from the later of QRS onset - 350 ms and the previous beat's T end to
     QRS onset - 30 ms, on leads smoothed with an 8 ms Gaussian: the 100 ms with most
     spatial slope is the P wave; its onset is where, going back from the first sample
     above 30 % of the P wave's peak slope, the slope falls within 20 % of that peak
     above the slope floor just before; the offset mirrors it.
   Spatial curves stand for "earliest onset / latest offset over the leads" (the reference
   convention): a wave has begun as soon as any lead moves.
4. Calibration: the cardiologists' global marks (earliest onset and latest offset over 12
   independently marked leads) sit a fixed few ms outside what the thresholds find;
   CALIBRATION_MS shifts each boundary by that mean, measured once on the odd-numbered
   LUDB records (tests/data/ludb, bench/accuracy.py); see there for the figures.
   Every threshold here, the calibration included, is a field of one frozen, validated
   Conf (defaults: the module constants), so a fold run can tune them on some records and
   score the rest (bench/folds.py).
5. Each beat is delineated on its own, each boundary kept within GUIDE_S of the
   template's (a noisy beat cannot wander off; a boundary a beat's own curves do not show
   is the template's); above P_BEAT_NOISE_UV of noise every beat takes the template's P
   wave. Callers take medians over beats.
6. Absent waves are None in every beat, with the reason in the Delineation: no P wave when
   the beats' P windows do not repeat (atrial fibrillation's waves are not locked to the
   QRS; see P_MIN_CONSISTENCY and the thresholds after it) or the P wave is tiny; no T end
   when the T wave is too flat (T_MIN_UV).

Also measured, for the quality checks of measurements.py: the broadband noise (noise_uv)
and the QRS detections preceded by a pacemaker spike.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import numpy as np

from device_agent.clinical import qrs
from device_agent.core.record import LEAD_ORDER

log = logging.getLogger(__name__)

SPATIAL_LEADS = ("I", "II", "V1", "V2", "V3", "V4", "V5", "V6")  # independent leads
HIGH_PASS_HZ = 0.5
LOW_PASS_HZ = 30.0  # Gaussian, half amplitude (-6 dB) here
PRE_S, POST_S = 0.5, 0.8  # beat window around the QRS fiducial
NEIGHBOUR_GAP_S = 0.1  # a beat's window stops this far from the neighbouring fiducials
ALIGN_S = 0.016  # re-alignment search, each way
QRS_REGION_S = (-0.06, 0.08)  # around the fiducial: alignment and dominance
DOMINANT_CORRELATION = 0.9
GUIDE_S = 0.040  # a beat's boundary stays this close to the template's
# QRS
QRS_PEAK_S = 0.06  # the spatial-velocity peak lies within this of the fiducial
QRS_CORE = 0.30  # fraction of the peak velocity that is surely inside the complex
QRS_EDGE = 0.01  # fraction of the peak (above the floor) where the complex ends
QRS_SEARCH_S = (0.15, 0.20)  # before / after the fiducial
# T
T_START_S = 0.08  # after QRS offset
T_PEAK_MAX_S = 0.45  # after QRS onset
T_PEAK_MAX_RR = 0.55  # of the RR interval, after the fiducial
T_END_MAX_RR = 0.85
T_END_SEARCH_S = 0.30  # after the T peak
T_SMOOTH_S = 0.008
T_EDGE = 0.10
# P
PR_MAX_S = 0.35  # earliest P onset before QRS onset
P_GAP_S = 0.03  # the P wave ends at least this before QRS onset
P_AFTER_T_S = 0.02
P_SMOOTH_S = 0.008
P_WIDTH_S = 0.10
P_CORE = 0.30
P_EDGE = 0.20
P_FLOOR_S = 0.06
PR_LEVEL_S = (0.012, 0.002)  # PR-segment level: this window before QRS onset
# Calibration to the LUDB cardiologists' global marks (ms added to each boundary).
CALIBRATION_MS = {"p_onset": -8.0, "p_offset": 0.0, "qrs_onset": -8.0, "qrs_offset": 0.0,
                  "t_offset": 6.0}
# Pacemaker spikes: a one-sample jump this many times the smoothed leads' steepest slope.
SPIKE_RATIO = 4.0
SPIKE_MIN_UV = 100.0  # spatial jump in one sample
SPIKE_SEARCH_S = (0.30, 0.004)  # before the QRS detection: from, to
SPIKE_COMPARE_S = 0.06  # after the detection: the smoothed slope is compared up to here
SPIKE_SMOOTH_S = 0.018
SPIKE_NOISE_RATIO = 12.0  # times the broadband noise (white noise's jumps reach about 6x)
# No P wave (atrial fibrillation, flutter, junctional rhythm): the beats' P windows do not
# repeat (median correlation with the template's under P_MIN_CONSISTENCY), or the RR
# intervals are irregular (RR_IRREGULAR: median |successive difference| / median RR) and
# the P windows do not repeat closely (P_CONSISTENCY_IRREGULAR), or the template's P wave
# is under P_MIN_UV (peak RMS over the spatial leads about the PR level). Tuned on LUDB:
# every sinus record there has a match of 0.51 or more and an irregularity under 0.11.
P_MIN_CONSISTENCY = 0.45
P_CONSISTENCY_IRREGULAR = 0.90
RR_IRREGULAR = 0.15
P_MIN_UV = 10.0
T_MIN_UV = 10.0  # a T wave under this (peak RMS about the PR level) has no clear end
# Above this broadband noise (uV RMS) a beat's own P onset is not trusted: each beat takes
# the median beat's (30 uV of white noise moved the beats' P onsets 30 ms earlier on LUDB).
P_BEAT_NOISE_UV = 8.0


@dataclass(frozen=True)
class Conf:
    """The delineator's tuned thresholds, one frozen and validated object (as wfdb-python's
    XQRS.Conf): `delineate(..., conf=Conf(p_edge=0.25))` runs it with one of them changed,
    so a fold run (bench/folds.py) can tune on some records and score on others. The
    defaults are the module constants above; each field means what its constant says.
    """

    low_pass_hz: float = LOW_PASS_HZ
    dominant_correlation: float = DOMINANT_CORRELATION
    guide_s: float = GUIDE_S
    qrs_core: float = QRS_CORE
    qrs_edge: float = QRS_EDGE
    t_start_s: float = T_START_S
    t_peak_max_s: float = T_PEAK_MAX_S
    t_peak_max_rr: float = T_PEAK_MAX_RR
    t_end_max_rr: float = T_END_MAX_RR
    t_end_search_s: float = T_END_SEARCH_S
    t_smooth_s: float = T_SMOOTH_S
    t_edge: float = T_EDGE
    pr_max_s: float = PR_MAX_S
    p_gap_s: float = P_GAP_S
    p_smooth_s: float = P_SMOOTH_S
    p_width_s: float = P_WIDTH_S
    p_core: float = P_CORE
    p_edge: float = P_EDGE
    p_floor_s: float = P_FLOOR_S
    p_min_consistency: float = P_MIN_CONSISTENCY
    p_consistency_irregular: float = P_CONSISTENCY_IRREGULAR
    rr_irregular: float = RR_IRREGULAR
    p_min_uv: float = P_MIN_UV
    t_min_uv: float = T_MIN_UV
    p_beat_noise_uv: float = P_BEAT_NOISE_UV
    p_onset_ms: float = CALIBRATION_MS["p_onset"]
    p_offset_ms: float = CALIBRATION_MS["p_offset"]
    qrs_onset_ms: float = CALIBRATION_MS["qrs_onset"]
    qrs_offset_ms: float = CALIBRATION_MS["qrs_offset"]
    t_offset_ms: float = CALIBRATION_MS["t_offset"]

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if not isinstance(value, int | float) or isinstance(value, bool) \
                    or not np.isfinite(value):
                raise ValueError(f"Conf.{name} must be a finite number, not {value!r}")
        fractions = ("dominant_correlation", "qrs_core", "qrs_edge", "t_peak_max_rr",
                     "t_end_max_rr", "t_edge", "p_core", "p_edge", "p_min_consistency",
                     "p_consistency_irregular", "rr_irregular")
        for name in fractions:
            if not 0.0 < getattr(self, name) < 1.0:
                raise ValueError(f"Conf.{name} is a fraction: between 0 and 1, not "
                                 f"{getattr(self, name)!r}")
        for name in ("guide_s", "t_start_s", "t_peak_max_s", "t_end_search_s", "t_smooth_s",
                     "pr_max_s", "p_gap_s", "p_smooth_s", "p_width_s", "p_floor_s"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ValueError(f"Conf.{name} is seconds: over 0 and at most 1, not "
                                 f"{getattr(self, name)!r}")
        for name in ("p_min_uv", "t_min_uv", "p_beat_noise_uv"):
            if getattr(self, name) < 0.0:
                raise ValueError(f"Conf.{name} is microvolts: 0 or more, not "
                                 f"{getattr(self, name)!r}")
        for name in ("p_onset_ms", "p_offset_ms", "qrs_onset_ms", "qrs_offset_ms",
                     "t_offset_ms"):
            if abs(getattr(self, name)) > 50.0:
                raise ValueError(f"Conf.{name} is a calibration shift: within +-50 ms, not "
                                 f"{getattr(self, name)!r}")
        if not 5.0 <= self.low_pass_hz <= 150.0:
            raise ValueError(f"Conf.low_pass_hz must be 5-150 Hz, not {self.low_pass_hz!r}")
        if self.qrs_edge >= self.qrs_core or self.p_edge >= self.p_core:
            raise ValueError("Conf: an edge fraction must be under its core fraction "
                             f"(qrs {self.qrs_edge} / {self.qrs_core}, p {self.p_edge} / "
                             f"{self.p_core})")
        if self.p_width_s >= self.pr_max_s - self.p_gap_s:
            raise ValueError(f"Conf.p_width_s ({self.p_width_s}) must fit the P search, "
                             f"pr_max_s - p_gap_s ({self.pr_max_s - self.p_gap_s:g})")
        if self.t_start_s >= self.t_peak_max_s:
            raise ValueError(f"Conf.t_start_s ({self.t_start_s}) must be before "
                             f"t_peak_max_s ({self.t_peak_max_s})")

    def calibration(self, name: str) -> float:
        """The calibration shift (ms) of one boundary (Waves field name)."""
        shift: float = getattr(self, f"{name}_ms", 0.0)
        return shift

    def replace(self, **changes: float) -> Conf:
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)


DEFAULT_CONF = Conf()


@dataclass(frozen=True)
class Waves:
    """Global boundaries of one beat (sample indices); None where the wave was not found."""

    p_onset: int | None = None
    p_offset: int | None = None
    qrs_onset: int | None = None
    qrs_offset: int | None = None
    t_peak: int | None = None
    t_offset: int | None = None

    def shifted(self, by: int) -> Waves:
        """The same boundaries `by` samples later (template -> record positions)."""
        return Waves(*(None if v is None else v + by for v in self._values()))

    def _values(self) -> tuple[int | None, ...]:
        return (self.p_onset, self.p_offset, self.qrs_onset, self.qrs_offset, self.t_peak,
                self.t_offset)


@dataclass(frozen=True)
class Beat:
    """One dominant beat: its aligned QRS fiducial and its waves (record sample indices)."""

    fiducial: int
    waves: Waves


@dataclass(frozen=True)
class Delineation:
    """The beats' global boundaries, the median beat, and what the quality checks need."""

    sampling_rate: float
    beats: tuple[Beat, ...]
    template: np.ndarray  # (12, m) median dominant beat, uV, filtered; NaN where no beat had data
    fiducial: int  # the template's QRS fiducial (index)
    template_waves: Waves
    detections: int  # QRS detections given
    rr_irregularity: float | None  # median |successive RR difference| / median RR
    noise_uv: float | None  # broadband noise, uV RMS (noise_uv)
    paced_beats: int  # QRS detections with a pacemaker-like spike before them
    reason: str | None = None  # why there are no beats, when there are none
    p_absent: str | None = None  # why no beat has a P wave, when none has
    t_absent: str | None = None  # why no beat has a T end, when none has


def notched(leads_uv: np.ndarray, fs: float, mains_hz: float = 50.0) -> np.ndarray:
    """Lost samples bridged and mains hum notched out (leads x samples, uV)."""
    filled, _ = qrs.fill_lost(leads_uv)
    n = filled.shape[1]
    ramp = filled[:, :1] + (filled[:, -1:] - filled[:, :1]) * np.linspace(0.0, 1.0, n)
    out: np.ndarray = qrs.notch(filled - ramp, fs, mains_hz) + ramp
    return out


def noise_uv(notched_uv: np.ndarray) -> float:
    """Broadband noise (uV RMS) of notched leads: the median over leads of a robust sigma.

    White noise of sigma s has second differences of sigma s * sqrt(6); an ECG's own second
    differences are near zero except in the QRS complexes, which the median ignores.
    """
    d2 = notched_uv[:, 2:] - 2.0 * notched_uv[:, 1:-1] + notched_uv[:, :-2]
    sigma = np.median(np.abs(d2), axis=1) / 0.6745 / np.sqrt(6.0)
    return float(np.median(sigma))


def _band(x: np.ndarray, fs: float, low_pass_hz: float = LOW_PASS_HZ) -> np.ndarray:
    n = x.shape[1]
    pad = min(n - 1, int(fs))
    padded = np.pad(x - x.mean(axis=1, keepdims=True), ((0, 0), (pad, pad)), mode="reflect")
    freqs = np.fft.rfftfreq(padded.shape[1], 1.0 / fs)
    with np.errstate(divide="ignore"):
        gain = 1.0 / np.sqrt(1.0 + (HIGH_PASS_HZ / freqs) ** 4)
    gain *= np.exp(-np.log(2.0) * (freqs / low_pass_hz) ** 2)  # half amplitude at low_pass_hz
    out = np.fft.irfft(np.fft.rfft(padded, axis=1) * gain, padded.shape[1], axis=1)
    return out[:, pad : pad + n]


def delineate(
    leads_uv: np.ndarray, fs: float, detections: np.ndarray, *, mains_hz: float = 50.0,
    live: np.ndarray | None = None, conf: Conf = DEFAULT_CONF,
) -> Delineation:
    """Delineate every dominant beat of a 12-lead record (LEAD_ORDER rows, uV, NaN = lost).

    `live` marks the leads worth using (False for a flat or disconnected lead); by default
    every lead with a signal. `conf` holds the thresholds (Conf).
    """
    x = np.asarray(leads_uv, dtype=np.float64)
    if x.shape[0] != len(LEAD_ORDER):
        raise ValueError(f"delineate needs the 12 leads in LEAD_ORDER, got {x.shape[0]} rows")
    nan = np.isnan(x)
    lost = nan.sum(axis=0) > 0
    usable = (nan.sum(axis=1) < x.shape[1]) if live is None else np.asarray(live, dtype=bool)
    spatial = [i for i, name in enumerate(LEAD_ORDER) if name in SPATIAL_LEADS and usable[i]]
    det = np.unique(np.asarray(detections, dtype=np.int64))
    empty = Delineation(fs, (), np.zeros((len(LEAD_ORDER), 0)), 0, Waves(), det.size,
                        _irregularity(det), None, 0)
    if not spatial:
        return _with_reason(empty, "no usable lead")
    if det.size < 2:
        return _with_reason(empty, f"too few beats ({det.size})")
    clean = notched(x, fs, mains_hz)
    noise = noise_uv(clean[spatial])
    xf = _band(clean, fs, conf.low_pass_hz)
    p_guide = conf.guide_s if noise <= conf.p_beat_noise_uv else 0.0
    pre, post = _samples(PRE_S, fs), _samples(POST_S, fs)
    det = _align(xf, det, fs, pre, post)
    segs = _segments(xf, det, fs, pre, post)
    q0, q1 = pre + _samples(QRS_REGION_S[0], fs), pre + _samples(QRS_REGION_S[1], fs)
    template = _nanmedian(segs)
    corr = _correlations(segs[:, :, q0:q1], template[:, q0:q1])
    lost_in = np.array([bool(lost[max(0, d - pre) : d + post].any()) for d in det])
    keep = (corr >= conf.dominant_correlation) & ~lost_in
    if keep.sum() < 1:
        return _with_reason(empty, "no two beats alike without lost samples")
    segs, det = segs[keep], det[keep]
    template = _nanmedian(segs)
    rr_all = np.diff(np.asarray(detections, dtype=np.int64))
    rr = float(np.median(rr_all)) if rr_all.size else float(post)
    twaves = _boundaries(template, pre, fs, rr, spatial, rr, None, conf.guide_s, conf)
    all_det = np.asarray(detections, dtype=np.int64)
    p_match = _p_consistency(segs, template, twaves, spatial, fs)
    irregularity = _irregularity(all_det)
    p_absent = _p_absent(template, twaves, p_match, irregularity, spatial, fs, conf)
    t_absent = _t_absent(template, twaves, spatial, fs, conf)
    twaves = _without(twaves, p_absent, t_absent)
    beats = []
    for j, (seg, d) in enumerate(zip(segs, det, strict=True)):
        prev_rr = float(d - det[j - 1]) if j else rr
        if prev_rr > 1.5 * rr:  # the previous beat was left out: assume an ordinary interval
            prev_rr = rr
        w = _without(_boundaries(seg, pre, fs, rr, spatial, prev_rr, twaves, p_guide, conf),
                     p_absent, t_absent)
        beats.append(Beat(int(d), _calibrated(w, fs, conf).shifted(int(d) - pre)))
    return Delineation(
        sampling_rate=fs, beats=tuple(beats), template=template, fiducial=pre,
        template_waves=_calibrated(twaves, fs, conf), detections=int(all_det.size),
        rr_irregularity=irregularity, noise_uv=noise,
        paced_beats=_paced_beats(clean[spatial], all_det, fs, noise),
        p_absent=p_absent, t_absent=t_absent,
    )


def _without(w: Waves, p_absent: str | None, t_absent: str | None) -> Waves:
    """The waves with the P wave and/or the T end taken out."""
    if p_absent:
        w = replace(w, p_onset=None, p_offset=None)
    if t_absent:
        w = replace(w, t_peak=None, t_offset=None)
    return w


def pr_level(x: np.ndarray, qrs_onset: int, fs: float) -> np.ndarray:
    """Each row's mean over the PR-segment window before QRS onset (rows x 1)."""
    a = max(0, qrs_onset - _samples(PR_LEVEL_S[0], fs))
    b = max(a + 1, qrs_onset - _samples(PR_LEVEL_S[1], fs) + 1)
    level: np.ndarray = np.nanmean(x[:, a:b], axis=1, keepdims=True)
    return level


def _peak_rms(template: np.ndarray, spatial: list[int], start: int | None, end: int | None,
              qrs_onset: int | None, fs: float) -> float:
    """Peak RMS over the spatial leads, about the PR level, between start and end."""
    if start is None or end is None or qrs_onset is None or end <= start:
        return 0.0
    x = template[spatial] - pr_level(template[spatial], qrs_onset, fs)
    rms = np.sqrt(np.nanmean(x[:, start:end] ** 2, axis=0))
    return float(np.nanmax(rms)) if np.isfinite(rms).any() else 0.0


def _p_absent(template: np.ndarray, w: Waves, match: float | None, irregularity: float | None,
              spatial: list[int], fs: float, conf: Conf = DEFAULT_CONF) -> str | None:
    """Why the beats have no P wave to measure from, or None when they have one."""
    if match is None or w.p_onset is None:
        return "no P wave found before the QRS complexes"
    if irregularity is not None and irregularity > conf.rr_irregular \
            and match < conf.p_consistency_irregular:
        return (f"irregular RR intervals without a closely repeating P wave (atrial "
                f"fibrillation?): P-wave match {match:.2f} "
                f"(under {conf.p_consistency_irregular:.2f}), "
                f"RR irregularity {irregularity:.2f} (over {conf.rr_irregular:.2f})")
    if match < conf.p_min_consistency:
        return (f"no repeating P wave before the QRS complexes (P-wave match {match:.2f}, "
                f"under {conf.p_min_consistency:.2f})")
    amp = _peak_rms(template, spatial, w.p_onset, w.p_offset, w.qrs_onset, fs)
    if amp < conf.p_min_uv:
        return f"P wave too small to measure ({amp:.0f} uV, under {conf.p_min_uv:g})"
    return None


def _t_absent(template: np.ndarray, w: Waves, spatial: list[int], fs: float,
              conf: Conf = DEFAULT_CONF) -> str | None:
    """Why the beats have no clear T end, or None when they have one."""
    if w.t_offset is None or w.qrs_offset is None:
        return "no T wave found after the QRS complexes"
    amp = _peak_rms(template, spatial, w.qrs_offset + _samples(conf.t_start_s, fs), w.t_offset,
                    w.qrs_onset, fs)
    if amp < conf.t_min_uv:
        return f"T wave too flat for a clear end ({amp:.0f} uV, under {conf.t_min_uv:g})"
    return None


def _with_reason(d: Delineation, reason: str) -> Delineation:
    log.debug("no delineation: %s", reason)
    return Delineation(d.sampling_rate, (), d.template, 0, Waves(), d.detections,
                       d.rr_irregularity, None, 0, reason)


def _samples(seconds: float, fs: float) -> int:
    return round(seconds * fs)


def _nanmedian(segs: np.ndarray) -> np.ndarray:
    """Median over beats, NaN only where no beat has data (without numpy's warning)."""
    filled = np.isnan(segs).all(axis=0)
    out = np.full(segs.shape[1:], np.nan)
    if (~filled).any():
        sub = segs[:, ~filled]
        out[~filled] = np.nanmedian(sub, axis=0)
    return out


def _segments(xf: np.ndarray, det: np.ndarray, fs: float, pre: int, post: int) -> np.ndarray:
    """Each beat's window (beats x leads x samples), NaN beyond its neighbours or the record."""
    n = xf.shape[1]
    gap = _samples(NEIGHBOUR_GAP_S, fs)
    segs = np.full((det.size, xf.shape[0], pre + post), np.nan)
    for j, d in enumerate(det):
        lo = max(d - pre, det[j - 1] + gap if j else 0, 0)
        hi = min(d + post, det[j + 1] - gap if j + 1 < det.size else n, n)
        if hi > lo:
            segs[j, :, lo - (d - pre) : hi - (d - pre)] = xf[:, lo:hi]
    return segs


def _align(xf: np.ndarray, det: np.ndarray, fs: float, pre: int, post: int) -> np.ndarray:
    """Move each detection (+-ALIGN_S) to where its QRS best matches the median beat's."""
    segs = _segments(xf, det, fs, pre, post)
    template = _nanmedian(segs)
    q0, q1 = pre + _samples(QRS_REGION_S[0], fs), pre + _samples(QRS_REGION_S[1], fs)
    ref = template[:, q0:q1]
    if np.isnan(ref).any():
        return det
    shift = _samples(ALIGN_S, fs)
    offsets = np.arange(-shift, shift + 1)
    out = det.copy()
    n = xf.shape[1]
    for j, d in enumerate(det):
        starts = d - pre + q0 + offsets
        ok = (starts >= 0) & (starts + (q1 - q0) <= n)
        if not ok.any():
            continue
        idx = starts[ok][:, None] + np.arange(q1 - q0)
        cost = ((xf[:, idx] - ref[:, None, :]) ** 2).sum(axis=(0, 2))
        out[j] = d + offsets[ok][int(np.argmin(cost))]
    return np.unique(out)


def _correlations(segs: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Correlation of each beat's (leads x samples) block with the reference block."""
    b = segs.reshape(segs.shape[0], -1)
    r = ref.ravel()
    ok = ~np.isnan(r)
    out = np.zeros(segs.shape[0])
    for j, row in enumerate(b):
        m = ok & ~np.isnan(row)
        if m.sum() > 2:
            u, v = row[m] - row[m].mean(), r[m] - r[m].mean()
            den = float(np.sqrt((u * u).sum() * (v * v).sum()))
            out[j] = float((u * v).sum()) / den if den > 0 else 0.0
    return out


def _smooth(x: np.ndarray, sigma_s: float, fs: float) -> np.ndarray:
    """Gaussian smoothing of each row (NaN-free input)."""
    sigma = sigma_s * fs
    half = max(1, int(3 * sigma))
    kernel = np.exp(-0.5 * (np.arange(-half, half + 1) / sigma) ** 2)
    kernel /= kernel.sum()
    padded = np.pad(x, ((0, 0), (half, half)), mode="edge")
    windows = np.lib.stride_tricks.sliding_window_view(padded, kernel.size, axis=1)
    return windows @ kernel


def _speed(x: np.ndarray, fs: float) -> np.ndarray:
    """Spatial velocity: root-sum-square over rows of the slope (uV/s)."""
    speed: np.ndarray = np.sqrt((np.gradient(x, axis=1) ** 2).sum(axis=0)) * fs
    return speed


def _boundaries(
    seg: np.ndarray, c: int, fs: float, rr: float, spatial: list[int], prev_rr: float,
    guide: Waves | None, p_guide_s: float, conf: Conf = DEFAULT_CONF,
) -> Waves:
    """Delineate one beat window (leads x samples, fiducial at c); guided by the template."""
    valid = ~np.isnan(seg[spatial]).any(axis=0)
    if not valid[c]:
        return Waves()
    first, last = _valid_run(valid, c)
    x = np.where(np.isnan(seg), 0.0, seg)[spatial]
    s = lambda seconds: _samples(seconds, fs)  # noqa: E731
    speed = _speed(x, fs)
    lo, hi = max(first, c - s(QRS_PEAK_S)), min(last, c + s(QRS_PEAK_S))
    if hi <= lo:
        return Waves()
    peak = lo + int(np.argmax(speed[lo:hi]))
    top = speed[peak]
    a = max(first, c - s(QRS_SEARCH_S[0]))
    core = np.flatnonzero(speed[a : peak + 1] > conf.qrs_core * top)
    i0 = a + int(core[0])
    e = min(last + 1, c + s(QRS_SEARCH_S[1]))
    core = np.flatnonzero(speed[peak:e] > conf.qrs_core * top)
    i1 = peak + int(core[-1])
    floor = _median(speed[max(first, i0 - s(0.10)) : max(first, i0 - s(0.03))], speed[i0])
    below = np.flatnonzero(speed[first:i0] < floor + conf.qrs_edge * (top - floor))
    qon = first + int(below[-1]) if below.size else None
    floor = _median(speed[i1 + s(0.04) : min(last, i1 + s(0.12))], speed[i1])
    above = np.flatnonzero(speed[i1 : last + 1] < floor + conf.qrs_edge * (top - floor))
    qoff = i1 + int(above[0]) if above.size else None
    qon = _within(_guided(qon, _at(guide, "qrs_onset"), fs, conf.guide_s), first, last)
    qoff = _within(_guided(qoff, _at(guide, "qrs_offset"), fs, conf.guide_s), first, last)
    if qon is None or qoff is None or qon - s(PR_LEVEL_S[0]) < first:
        return Waves(qrs_onset=qon, qrs_offset=qoff)
    level = x[:, qon - s(PR_LEVEL_S[0]) : qon - s(PR_LEVEL_S[1]) + 1].mean(axis=1, keepdims=True)
    tpk, tend = _t_wave(x - level, c, qon, qoff, last, rr, fs, guide, conf)
    prev_t_end = (tend - prev_rr) if tend is not None else c - prev_rr + s(0.3)
    pon, poff = _p_wave(x - level, qon, max(first, int(prev_t_end) + s(P_AFTER_T_S)), fs, guide,
                        p_guide_s, conf)
    return Waves(_within(pon, first, last), _within(poff, first, last), qon, qoff,
                 _within(tpk, first, last), _within(tend, first, last))


def _valid_run(valid: np.ndarray, c: int) -> tuple[int, int]:
    """First and last index of the run of valid samples holding c."""
    bad = np.flatnonzero(~valid)
    before, after = bad[bad < c], bad[bad > c]
    return (int(before[-1]) + 1 if before.size else 0,
            int(after[0]) - 1 if after.size else valid.size - 1)


def _median(values: np.ndarray, default: float) -> float:
    return float(np.median(values)) if values.size else float(default)


def _within(value: int | None, first: int, last: int) -> int | None:
    """The boundary if it lies on the beat's own data (a template's fallback may not)."""
    return value if value is not None and first <= value <= last else None


def _at(waves: Waves | None, name: str) -> int | None:
    """One boundary of an optional Waves."""
    if waves is None:
        return None
    value: int | None = getattr(waves, name)
    return value


def _guided(value: int | None, guide: int | None, fs: float,
            tolerance_s: float = GUIDE_S) -> int | None:
    """Keep a beat's boundary within tolerance_s of the template's (when there is one)."""
    if value is None or guide is None:
        return value if guide is None else guide
    g = _samples(tolerance_s, fs)
    return int(min(max(value, guide - g), guide + g))


def _t_wave(
    x: np.ndarray, c: int, qon: int, qoff: int, last: int, rr: float, fs: float,
    guide: Waves | None, conf: Conf = DEFAULT_CONF,
) -> tuple[int | None, int | None]:
    """T peak (of the RMS curve) and T end (where the smoothed spatial slope levels off)."""
    s = lambda seconds: _samples(seconds, fs)  # noqa: E731
    lo = qoff + s(conf.t_start_s)
    hi = min(qon + s(conf.t_peak_max_s), last, c + int(rr * conf.t_peak_max_rr))
    if hi <= lo:
        return None, None
    rms = np.sqrt((x[:, lo:hi] ** 2).mean(axis=0))
    tpk = lo + int(np.argmax(rms))
    end = min(tpk + s(conf.t_end_search_s), last, c + int(rr * conf.t_end_max_rr))
    if end <= tpk + 2:
        return tpk, None
    pad = s(3 * conf.t_smooth_s)
    span = slice(max(0, tpk - pad), min(x.shape[1], end + pad))
    slope = _speed(_smooth(x[:, span], conf.t_smooth_s, fs), fs)
    off = span.start
    steep = tpk + int(np.argmax(slope[tpk - off : min(tpk + s(0.15), end) - off]))
    tail = slope[steep - off : end - off]
    floor = float(tail.min())
    flat = np.flatnonzero(tail <= floor + conf.t_edge * (slope[steep - off] - floor))
    tend = steep + int(flat[0])
    return tpk, _guided(tend, _at(guide, "t_offset"), fs, conf.guide_s)


def _p_wave(
    x: np.ndarray, qon: int, start: int, fs: float, guide: Waves | None, tolerance_s: float,
    conf: Conf = DEFAULT_CONF,
) -> tuple[int | None, int | None]:
    """P onset and offset between `start` and QRS onset - P_GAP_S, from the spatial slope."""
    s = lambda seconds: _samples(seconds, fs)  # noqa: E731
    plo = max(start, qon - s(conf.pr_max_s))
    phi = qon - s(conf.p_gap_s)
    width = s(conf.p_width_s)
    if phi - plo <= width:
        return None, None
    span = slice(max(0, plo - s(3 * conf.p_smooth_s)), min(x.shape[1], qon))
    off = span.start
    slope = _speed(_smooth(x[:, span], conf.p_smooth_s, fs), fs)
    window = slope[plo - off : phi - off]
    csum = np.concatenate(([0.0], np.cumsum(window)))
    centre = plo + int(np.argmax(csum[width:] - csum[:-width])) + width // 2
    a, b = max(plo, centre - s(0.07)), min(phi, centre + s(0.07))
    top = float(slope[a - off : b - off].max())
    lo = max(plo, centre - s(0.10))
    rising = np.flatnonzero(slope[lo - off : centre - off + 1] >= conf.p_core * top)
    up = lo + int(rising[0]) if rising.size else centre
    flo = max(plo, up - s(conf.p_floor_s))
    floor = float(slope[flo - off : up - off + 1].min())
    quiet = np.flatnonzero(slope[flo - off : up - off + 1] <= floor + conf.p_edge * (top - floor))
    pon = flo + int(quiet[-1]) if quiet.size else None
    hi = min(phi, centre + s(0.10))
    falling = np.flatnonzero(slope[centre - off : hi - off] >= conf.p_core * top)
    down = centre + int(falling[-1]) if falling.size else centre
    fhi = min(qon, down + s(conf.p_floor_s))
    floor = float(slope[down - off : fhi - off].min()) if fhi > down else 0.0
    quiet = np.flatnonzero(slope[down - off : fhi - off] <= floor + conf.p_edge * (top - floor))
    poff = down + int(quiet[0]) if quiet.size else None
    return (_guided(pon, _at(guide, "p_onset"), fs, tolerance_s),
            _guided(poff, _at(guide, "p_offset"), fs, tolerance_s))


def _calibrated(w: Waves, fs: float, conf: Conf = DEFAULT_CONF) -> Waves:
    """Shift each boundary by its calibration (Conf.calibration)."""
    def at(name: str, v: int | None) -> int | None:
        return None if v is None else v + round(conf.calibration(name) * fs / 1000.0)
    return Waves(at("p_onset", w.p_onset), at("p_offset", w.p_offset),
                 at("qrs_onset", w.qrs_onset), at("qrs_offset", w.qrs_offset), w.t_peak,
                 at("t_offset", w.t_offset))


def _irregularity(det: np.ndarray) -> float | None:
    """Median absolute successive RR difference over the median RR (None under 4 intervals)."""
    rr = np.diff(np.unique(det)).astype(np.float64)
    if rr.size < 4:
        return None
    return float(np.median(np.abs(np.diff(rr))) / np.median(rr))


def _p_consistency(segs: np.ndarray, template: np.ndarray, twaves: Waves, spatial: list[int],
                   fs: float) -> float | None:
    """Median correlation of the beats' P windows with the template's (about PR level)."""
    if twaves.p_onset is None or twaves.qrs_onset is None:
        return None
    a, b = twaves.p_onset, twaves.qrs_onset - _samples(PR_LEVEL_S[1], fs)
    lvl = slice(twaves.qrs_onset - _samples(PR_LEVEL_S[0], fs),
                twaves.qrs_onset - _samples(PR_LEVEL_S[1], fs) + 1)
    if b - a < 3:
        return None
    ref = template[spatial, a:b] - template[spatial, lvl].mean(axis=1, keepdims=True)
    beats = segs[:, spatial, a:b] - segs[:, spatial, lvl].mean(axis=2, keepdims=True)
    corr = _correlations(beats, ref)
    return float(np.median(corr))


def _paced_beats(raw: np.ndarray, detections: np.ndarray, fs: float, noise: float) -> int:
    """QRS detections with a pacemaker-like spike in the SPIKE_SEARCH_S before them.

    A spike is a one-sample jump (root-sum-square over the given leads, notched but not
    smoothed) SPIKE_RATIO times steeper than the steepest slope of the smoothed leads from
    there to SPIKE_COMPARE_S past the detection (the QRS included), and SPIKE_NOISE_RATIO
    times the broadband noise: no P, QRS or T wave, nor white noise, is that abrupt.
    """
    jump = np.sqrt((np.diff(raw, axis=1) ** 2).sum(axis=0))
    width = max(3, _samples(SPIKE_SMOOTH_S, fs))
    kernel = np.ones(width) / width
    smooth = np.array([np.convolve(row, kernel, mode="same") for row in raw])
    smooth_jump = np.sqrt((np.diff(smooth, axis=1) ** 2).sum(axis=0))
    least = max(SPIKE_MIN_UV, SPIKE_NOISE_RATIO * noise)
    count = 0
    for d in detections:
        a = max(0, d - _samples(SPIKE_SEARCH_S[0], fs))
        b = min(jump.size, d - _samples(SPIKE_SEARCH_S[1], fs))
        c = min(jump.size, d + _samples(SPIKE_COMPARE_S, fs))
        if b <= a:
            continue
        k = a + int(np.argmax(jump[a:b]))
        if jump[k] >= least and jump[k] >= SPIKE_RATIO * max(smooth_jump[a:c].max(), 1e-9):
            count += 1
    return count
