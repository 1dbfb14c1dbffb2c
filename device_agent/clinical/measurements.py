"""The measurements a 12-lead cart prints, each with its own quality check (numpy only).

`measure_record` gives heart rate, RR, PR, QRS, QT, QTc (Bazett and Fridericia) and the
frontal P, QRS and T axes. A value that fails its check is None with a one-line reason,
never a default: no P wave (atrial fibrillation), too few clean beats, a paced rhythm,
noise, lost samples, a flat lead.

Method:
- Beats: qrs.detect_record (Pan-Tompkins over the eight measured leads). Heart rate and
  RR are its mean-RR rate; when the detector is not confident, nothing is measured.
- Intervals: device_agent.clinical.delineate finds each dominant beat's global onsets and offsets
  from the spatial curves of all leads (see its docstring); PR = QRS onset - P onset,
  QRS = QRS offset - QRS onset, QT = T end - QRS onset, each the median over the beats
  (at least MIN_CLEAN_BEATS of them).
- QTc: Bazett QT / sqrt(RR), Fridericia QT / RR^(1/3), RR in seconds (the mean RR).
- Axes (degrees, -90 to 270, frontal plane): from leads I and III, Ey = (I + 2 III) / sqrt 3
  on the hexaxial system (the same as I and aVF: 2 aVF / sqrt 3), all three on the median
  beat and levelled at its PR segment. The QRS axis uses each lead's R + Q + S
  (qrs_net_deflection: Dieuaide's algebraic sum, how the Russian school that labelled LUDB
  reads the axis); P and T axes use the net area over the median beat's P wave and ST-T
  segment (one smooth wave each). Against LUDB's axis labels R + Q + S did as well as any
  alternative tried and better than most: QRS net area and a least-squares fit to the six
  limb leads agreed with 9 and 12 fewer of the 96 labels (leave-one-out, cut-offs fitted);
  the largest instantaneous vector, per-beat medians and other levels were within three
  records either way (the labels overlap in angle: see ludb.AXIS_CATEGORIES).
- No PR or P axis when delineate finds no P wave (Delineation.p_absent: the beats' P
  windows do not repeat, as in atrial fibrillation, or the P wave is tiny); no QT, QTc or T
  axis when the T wave is too flat for a clear end (t_absent).
- A paced rhythm (pacemaker spikes before PACED_FRACTION of the beats) gets a rate only.
- Broadband noise (delineate.noise_uv) over MAX_NOISE_UV: no intervals or axes; over
  P_MAX_NOISE_UV: no PR or P axis. Mains hum is notched out at the configured frequency
  and its harmonics (any amount); over MAX_RESIDUAL_HUM_UV of hum left after the notch, or
  MAX_LOST_FRACTION of the samples lost, or every lead flat: nothing is measured.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from device_agent.clinical import delineate, qrs
from device_agent.core.record import FLAT_UV, LEAD_ORDER, Record

log = logging.getLogger(__name__)

MEASUREMENT_NAMES = (
    "heart_rate_bpm", "rr_ms", "pr_ms", "qrs_ms", "qt_ms", "qtc_bazett_ms",
    "qtc_fridericia_ms", "p_axis_deg", "qrs_axis_deg", "t_axis_deg",
)
AXES = ("p_axis_deg", "qrs_axis_deg", "t_axis_deg")
METHOD = ("12-lead spatial delineation, each beat guided by the median beat (numpy); "
          "QTc Bazett, Fridericia; axes from I, III")

MIN_CLEAN_BEATS = 3
MAX_LOST_FRACTION = qrs.MAX_LOST_FRACTION  # share of samples lost in any lead
# Hum is notched (qrs.notch: the mains frequency and its harmonics) before anything is
# measured; 200-1500 uV of 50 or 60 Hz hum on LUDB moved no value by more than 2 ms. What
# the notch leaves (qrs.residual_hum_uv: hum off the configured frequency, or a wrong
# ECG_MAINS_HZ) above this is refused; an ECG's own content there is 3-14 uV on LUDB.
MAX_RESIDUAL_HUM_UV = 25.0
OTHER_MAINS_HZ = {50.0: 60.0, 60.0: 50.0}  # hum at the other one: the setting is wrong
# Broadband noise (delineate.noise_uv, uV RMS) above which intervals are not trusted: white
# noise added to LUDB moved QRS by -6 / -10 ms and QT SD to 26 / 30 ms at 30 / 50 uV, and
# PR by +5 +/- 18 ms at 30 uV (+/- 12 at 20).
MAX_NOISE_UV = 40.0
P_MAX_NOISE_UV = 25.0
PACED_FRACTION = 0.3  # of the QRS detections with a pacemaker spike before them
MIN_PACED_BEATS = 2
RANGES_MS = {"pr_ms": (60.0, 400.0), "qrs_ms": (40.0, 250.0), "qt_ms": (200.0, 700.0)}


@dataclass(frozen=True)
class Measurements:
    """One record's measurements (ms, bpm, degrees); None where not measured, with reasons."""

    heart_rate_bpm: float | None = None
    rr_ms: float | None = None
    pr_ms: float | None = None
    qrs_ms: float | None = None
    qt_ms: float | None = None
    qtc_bazett_ms: float | None = None
    qtc_fridericia_ms: float | None = None
    p_axis_deg: float | None = None
    qrs_axis_deg: float | None = None
    t_axis_deg: float | None = None
    reasons: dict[str, str] = field(default_factory=dict)  # name -> why it is None
    beats: int = 0  # beats the intervals were measured on
    method: str = METHOD

    def value(self, name: str) -> float | None:
        """One measurement by its name in MEASUREMENT_NAMES."""
        if name not in MEASUREMENT_NAMES:
            raise KeyError(f"{name} is not a measurement; use one of {MEASUREMENT_NAMES}")
        value: float | None = getattr(self, name)
        return value

    def reason(self, name: str) -> str | None:
        """Why a measurement is None (None when it was measured)."""
        return self.reasons.get(name)


def measure_record(record: Record, *, mains_hz: float = 50.0,
                   conf: delineate.Conf = delineate.DEFAULT_CONF) -> Measurements:
    """Measure one 12-lead record; every value None that fails its own quality check.

    `conf` holds the delineator's thresholds (delineate.Conf; the fold runs vary them).
    """
    values: dict[str, float | None] = dict.fromkeys(MEASUREMENT_NAMES)
    reasons: dict[str, str] = {}

    def refuse(names: tuple[str, ...], reason: str) -> None:
        for name in names:
            if values[name] is None and name not in reasons:
                reasons[name] = reason

    leads, live, problem, mains_hz = _leads(record, mains_hz)
    if problem:
        refuse(MEASUREMENT_NAMES, problem)
        return _result(values, reasons, 0)
    fs = float(record.sampling_rate)
    beats = qrs.detect_record(record, mains_hz=mains_hz)
    if not beats.confident:
        refuse(MEASUREMENT_NAMES, f"no reliable heart beats: {beats.reason}")
        return _result(values, reasons, 0)
    values["heart_rate_bpm"] = round(float(beats.heart_rate_bpm or 0.0), 1)
    values["rr_ms"] = round(float(beats.rr_mean_ms or 0.0))
    d = delineate.delineate(leads, fs, beats.beats, mains_hz=mains_hz, live=live, conf=conf)
    n = len(d.beats)
    rest = MEASUREMENT_NAMES[2:]
    if d.paced_beats >= max(MIN_PACED_BEATS, PACED_FRACTION * d.detections):
        refuse(rest, f"paced rhythm (pacemaker spikes before {d.paced_beats} of "
                     f"{d.detections} beats): intervals and axes not measured")
        return _result(values, reasons, n)
    if n < MIN_CLEAN_BEATS:
        why = d.reason or f"{n} alike beats without lost samples"
        refuse(rest, f"too few clean beats ({why}; {MIN_CLEAN_BEATS} needed)")
        return _result(values, reasons, n)
    noise = d.noise_uv or 0.0
    if noise > MAX_NOISE_UV:
        refuse(rest, f"too noisy: {noise:.0f} uV RMS of broadband noise (over {MAX_NOISE_UV:g})")
        return _result(values, reasons, n)
    p_missing = d.p_absent
    if not p_missing and noise > P_MAX_NOISE_UV:
        p_missing = f"too noisy for P waves: {noise:.0f} uV RMS (over {P_MAX_NOISE_UV:g})"
    if p_missing:
        refuse(("pr_ms", "p_axis_deg"), p_missing)
    if d.t_absent:
        refuse(("qt_ms", "t_axis_deg"), d.t_absent)
    skip = ("pr_ms",) * bool(p_missing) + ("qt_ms",) * bool(d.t_absent)
    _intervals(d, values, reasons, fs, skip=skip)
    qt, rr = values["qt_ms"], values["rr_ms"]
    if qt is not None and rr:
        values["qtc_bazett_ms"] = round(qtc_bazett(qt, rr))
        values["qtc_fridericia_ms"] = round(qtc_fridericia(qt, rr))
    refuse(("qtc_bazett_ms", "qtc_fridericia_ms"), f"no QT: {reasons.get('qt_ms', '')}")
    _axes(d, values, reasons, live, skip_p=bool(p_missing))
    return _result(values, reasons, n)


def qtc_bazett(qt_ms: float, rr_ms: float) -> float:
    """Bazett's corrected QT (ms): QT / sqrt(RR in seconds)."""
    return qt_ms / math.sqrt(rr_ms / 1000.0)


def qtc_fridericia(qt_ms: float, rr_ms: float) -> float:
    """Fridericia's corrected QT (ms): QT / cube root of (RR in seconds)."""
    return float(qt_ms / (rr_ms / 1000.0) ** (1.0 / 3.0))


def measurements_block(m: Measurements) -> dict[str, Any]:
    """The record's JSON `measurements` object: the ten values, reasons for nulls, beats, method."""
    block: dict[str, Any] = {name: m.value(name) for name in MEASUREMENT_NAMES}
    block["reasons"] = {name: m.reasons.get(name, "not measured")
                        for name in MEASUREMENT_NAMES if block[name] is None}
    block["beats"] = int(m.beats)
    block["method"] = m.method
    return block


def _result(values: dict[str, float | None], reasons: dict[str, str], beats: int) -> Measurements:
    for name, value in values.items():
        if value is None and name not in reasons:
            reasons[name] = "not measured"
            log.warning("measurement %s is None without a reason", name)
    v = values
    return Measurements(
        heart_rate_bpm=v["heart_rate_bpm"], rr_ms=v["rr_ms"], pr_ms=v["pr_ms"],
        qrs_ms=v["qrs_ms"], qt_ms=v["qt_ms"], qtc_bazett_ms=v["qtc_bazett_ms"],
        qtc_fridericia_ms=v["qtc_fridericia_ms"], p_axis_deg=v["p_axis_deg"],
        qrs_axis_deg=v["qrs_axis_deg"], t_axis_deg=v["t_axis_deg"],
        reasons={k: reasons[k] for k in MEASUREMENT_NAMES if v[k] is None}, beats=beats,
    )


def _leads(record: Record, mains_hz: float
           ) -> tuple[np.ndarray, np.ndarray, str | None, float]:
    """The 12 leads (NaN where lost or absent), which are live, a record-wide problem, and
    the frequency to notch (qrs.hum_frequency: the hum's own, near mains_hz)."""
    n = record.n_samples
    rows = np.full((len(LEAD_ORDER), n), np.nan)
    for i, name in enumerate(LEAD_ORDER):
        if name in record.lead_names:
            rows[i] = record.lead(name)
    lost = np.isnan(rows[[i for i, name in enumerate(LEAD_ORDER) if name in record.lead_names]])
    lost_any = lost.any(axis=0) if lost.size else np.ones(n, bool)
    share = float(lost_any.mean()) if n else 1.0
    if share > MAX_LOST_FRACTION:
        return rows, np.zeros(len(LEAD_ORDER), bool), (
            f"too much signal lost ({share:.0%} of samples, over {MAX_LOST_FRACTION:.0%})"
        ), mains_hz
    received = ~lost_any
    live = np.zeros(len(LEAD_ORDER), bool)
    for i, row in enumerate(rows):
        got = row[received]
        live[i] = got.size > 0 and not np.isnan(got).any() and float(np.ptp(got)) >= FLAT_UV
    spatial = [LEAD_ORDER.index(name) for name in delineate.SPATIAL_LEADS]
    if not live[spatial].any():
        return rows, live, "every lead is flat (no signal)", mains_hz
    on = [i for i in spatial if live[i]]
    filled, _ = qrs.fill_lost(rows[on])
    fs = record.sampling_rate
    other = OTHER_MAINS_HZ.get(float(mains_hz))
    if other is not None:
        hum = qrs.residual_hum_uv(filled, fs, other, notched=False)
        if hum > MAX_RESIDUAL_HUM_UV:
            return rows, live, (
                f"mains hum {hum:.0f} uV at {other:g} Hz but ECG_MAINS_HZ is {mains_hz:g} "
                f"(over {MAX_RESIDUAL_HUM_UV:g} uV un-notched): set ECG_MAINS_HZ={other:g}"
            ), mains_hz
    at = qrs.hum_frequency(filled, fs, mains_hz)
    left = qrs.residual_hum_uv(filled, fs, at)
    if left > MAX_RESIDUAL_HUM_UV:
        hum = qrs.residual_hum_uv(filled, fs, at, notched=False)
        return rows, live, (
            f"mains hum {left:.0f} uV left after the {at:g} Hz notch (over "
            f"{MAX_RESIDUAL_HUM_UV:g} uV; {hum:.0f} uV before it): check the electrodes"
        ), at
    return rows, live, None, at


def _intervals(d: delineate.Delineation, values: dict[str, float | None],
               reasons: dict[str, str], fs: float, *, skip: tuple[str, ...]) -> None:
    """PR, QRS and QT: medians over the beats that have both ends, within RANGES_MS."""
    spans = {
        "pr_ms": ("p_onset", "qrs_onset"),
        "qrs_ms": ("qrs_onset", "qrs_offset"),
        "qt_ms": ("qrs_onset", "t_offset"),
    }
    for name, (start, end) in spans.items():
        if name in skip:
            continue
        ms = [(getattr(b.waves, end) - getattr(b.waves, start)) * 1000.0 / fs
              for b in d.beats
              if getattr(b.waves, start) is not None and getattr(b.waves, end) is not None]
        wave = {"pr_ms": "a P onset", "qrs_ms": "both QRS ends", "qt_ms": "a T end"}[name]
        if len(ms) < MIN_CLEAN_BEATS:
            reasons[name] = f"{wave} found in only {len(ms)} beats ({MIN_CLEAN_BEATS} needed)"
            continue
        value = float(np.median(ms))
        lo, hi = RANGES_MS[name]
        if not lo <= value <= hi:
            reasons[name] = f"{value:.0f} ms is outside {lo:g}-{hi:g} ms: not trusted"
            continue
        values[name] = round(value)


def frontal_axis(lead_i: float, lead_iii: float) -> float | None:
    """Frontal-plane angle (degrees, -90 to 270) of a vector seen as lead I and lead III."""
    x, y = lead_i, (lead_i + 2.0 * lead_iii) / math.sqrt(3.0)
    if x == 0.0 and y == 0.0:
        return None
    angle = math.degrees(math.atan2(y, x))
    return round(angle + 360.0 if angle <= -90.0 else angle)


def qrs_net_deflection(qrs_uv: np.ndarray) -> np.ndarray:
    """Each row's R + Q + S (Dieuaide's algebraic sum, the Russian school's way to the axis).

    Rows are leads over the QRS, levelled at zero (NaN counts as the level). R is the
    tallest positive peak, Q the deepest dip before it and S the deepest after it (0 when
    none dips below the level); a QS complex, with no positive peak, gives its deepest dip.
    """
    q = np.nan_to_num(np.asarray(qrs_uv, dtype=np.float64))
    r = np.argmax(q, axis=1)
    tallest = q[np.arange(q.shape[0]), r]
    at = np.arange(q.shape[1])[None, :]
    dip_q = np.minimum(np.where(at <= r[:, None], q, 0.0).min(axis=1), 0.0)
    dip_s = np.minimum(np.where(at >= r[:, None], q, 0.0).min(axis=1), 0.0)
    net: np.ndarray = np.where(tallest > 0.0, tallest + dip_q + dip_s, q.min(axis=1))
    return net


def _axes(d: delineate.Delineation, values: dict[str, float | None], reasons: dict[str, str],
          live: np.ndarray, *, skip_p: bool) -> None:
    """P, QRS and T frontal axes from the median beat's leads I and III."""
    i, iii = LEAD_ORDER.index("I"), LEAD_ORDER.index("III")
    if not (live[i] and live[LEAD_ORDER.index("II")]):
        for name in AXES:
            reasons.setdefault(name, "lead I or II is flat or missing: no frontal axis")
        return
    tw, t, fs = d.template_waves, d.template, d.sampling_rate
    if tw.qrs_onset is None or tw.qrs_offset is None:
        for name in AXES:
            reasons.setdefault(name, "QRS complex not delineated on the median beat")
        return
    x = t - delineate.pr_level(t, tw.qrs_onset, fs)
    net = qrs_net_deflection(x[[i, iii], tw.qrs_onset : tw.qrs_offset + 1])
    _set_axis(values, reasons, "qrs_axis_deg", net[0], net[1], "QRS")
    if tw.t_offset is not None and tw.t_offset > tw.qrs_offset:
        area = np.nansum(x[:, tw.qrs_offset : tw.t_offset + 1], axis=1)
        _set_axis(values, reasons, "t_axis_deg", area[i], area[iii], "T wave")
    else:
        reasons.setdefault("t_axis_deg", "no T end on the median beat")
    if not skip_p and tw.p_onset is not None and tw.p_offset is not None \
            and tw.p_offset > tw.p_onset:
        area = np.nansum(x[:, tw.p_onset : tw.p_offset + 1], axis=1)
        _set_axis(values, reasons, "p_axis_deg", area[i], area[iii], "P wave")
    else:
        reasons.setdefault("p_axis_deg", "no P wave on the median beat")


def _set_axis(values: dict[str, float | None], reasons: dict[str, str], name: str,
              lead_i: float, lead_iii: float, wave: str) -> None:
    angle = frontal_axis(float(lead_i), float(lead_iii))
    if angle is None:
        reasons.setdefault(name, f"{wave} has no net deflection in leads I and III")
    else:
        values[name] = float(angle)
