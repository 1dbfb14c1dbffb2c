"""The one-page 12-lead PDF report, true to scale (25 mm/s, 10 mm/mV): it renders, it does
not measure.

Everything the page says about the record comes from the record itself: its measurements
(computed once at capture, the same numbers as the JSON and the DICOM copy), its quality
verdict and reasons, its lost samples and electrode-off spans. The header reads like a
cart's: ventricular rate, RR, PR, QRS, QT/QTc (Bazett and Fridericia) and the P, QRS and T
axes, "-" for anything not measured. A rejected capture carries a banner across the page,
and lost and electrode-off spans are marked on the traces they affect.

The traces go through a display filter (default 0.05-150 Hz, options 0.5 Hz baseline and
40 Hz low-pass, and the mains notch), applied to the drawing only and named in the footer;
the JSON stays raw. Filters run in the frequency domain, zero phase, on all leads at once.

Traces and grid are written as PDF path operators formatted by numpy in one pass (no
per-point Python call) and injected with `Canvas.addLiteral`; the page is flate-compressed.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import threading
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
from reportlab import rl_config
from reportlab.lib.utils import simpleSplit
from reportlab.pdfbase import pdfdoc
from reportlab.pdfgen.canvas import Canvas

from device_agent import __version__
from device_agent.core.config import Settings
from device_agent.core.record import ELECTRODES, VERDICT_REJECTED, Record

log = logging.getLogger(__name__)

PT_PER_MM = 72.0 / 25.4
SPEED_MM_S = 25.0
GAIN_MM_MV = 10.0
PAPER_MM = {"a4": (297.0, 210.0), "letter": (279.4, 215.9)}  # landscape
COLUMNS = (("I", "II", "III"), ("aVR", "aVL", "aVF"), ("V1", "V2", "V3"), ("V4", "V5", "V6"))
RHYTHM_LEAD = "II"
WINDOW_S = 2.5
CAL_MM = 10.0  # the calibration zone at the start of every row
GRID_W_MM = CAL_MM + 4 * WINDOW_S * SPEED_MM_S  # 260 mm
ROW_MM = 40.0
GRID_H_MM = 4 * ROW_MM
GRID_Y0_MM = 14.0
# (minor, major) stroke colours; major darker, as on ECG paper
GRID_COLOURS = {
    "red": ((1.0, 0.72, 0.72), (0.88, 0.30, 0.30)),
    "grey": ((0.78, 0.78, 0.78), (0.50, 0.50, 0.50)),
}
MINOR_W_MM, MAJOR_W_MM, TRACE_W_MM = 0.08, 0.18, 0.22
UNIT = 0.1  # path coordinates are integers in 0.1 pt (0.035 mm), scaled by one `cm`
_DIGITS = 4  # 0..9999 units of 0.1 pt: the whole page
FLATE_LEVEL = 4  # 70 KB in 5 ms; reportlab's fixed level 6 gives 63 KB in 20 ms


def layout(paper: str = "a4") -> dict[str, Any]:
    """Page geometry in mm from the bottom-left corner (tests measure against it)."""
    if paper not in PAPER_MM:
        raise ValueError(f"paper {paper!r} unknown: use one of {', '.join(PAPER_MM)}")
    width, height = PAPER_MM[paper]
    x0 = round((width - GRID_W_MM) / 2.0, 1)
    top = GRID_Y0_MM + GRID_H_MM
    return {
        "page_mm": (width, height),
        "grid_mm": (x0, GRID_Y0_MM, GRID_W_MM, GRID_H_MM),
        "trace_x0_mm": x0 + CAL_MM,
        # baselines of the three block rows (top first) and the rhythm strip, on major lines
        "baselines_mm": tuple(top - ROW_MM * r - ROW_MM / 2.0 for r in range(4)),
        "cal_x0_mm": x0 + 2.0,
    }


def path_ops(x_pt: np.ndarray, y_pt: np.ndarray, starts: np.ndarray | None = None) -> str:
    """PDF `m`/`l` operators for a polyline in 0.1 pt units; NaN points break the line.

    `starts` marks points that begin a new sub-path (e.g. each trace). Coordinates are
    clipped to 0..999.9 pt (a page is at most 842 pt) and written as fixed-width digits
    looked up from a table: one numpy gather, no per-point Python.
    """
    x = np.asarray(x_pt, dtype=np.float64)
    y = np.asarray(y_pt, dtype=np.float64)
    valid = np.isfinite(x) & np.isfinite(y)
    move = np.ones(x.size, dtype=bool)
    move[1:] = ~valid[:-1]
    if starts is not None:
        move |= starts
    move, x, y = move[valid], x[valid], y[valid]
    if not x.size:
        return ""
    table = _digit_table()
    top = table.shape[0] - 1
    chars = np.empty((x.size, 2 * _DIGITS + 4), np.uint8)
    chars[:, :_DIGITS] = table[np.clip(np.rint(x / UNIT), 0, top).astype(np.intp)]
    chars[:, _DIGITS] = ord(" ")
    chars[:, _DIGITS + 1 : 2 * _DIGITS + 1] = table[
        np.clip(np.rint(y / UNIT), 0, top).astype(np.intp)]
    chars[:, -3] = ord(" ")
    chars[:, -2] = np.where(move, ord("m"), ord("l"))
    chars[:, -1] = ord("\n")
    return chars.tobytes().decode("ascii")


@functools.cache
def _digit_table() -> np.ndarray:
    """Right-aligned ASCII of 0..10**_DIGITS-1, space padded (PDF allows any whitespace)."""
    values = np.arange(10**_DIGITS)
    powers = 10 ** np.arange(_DIGITS - 1, -1, -1)
    table = (values[:, None] // powers % 10 + ord("0")).astype(np.uint8)
    table[(values[:, None] < powers) & (powers > 1)] = ord(" ")
    return table


def _stroke(ops: str, rgb: tuple[float, float, float], width_mm: float, *, cap: int = 0) -> str:
    """One stroked path in its own graphics state, coordinates scaled from 0.1 pt units."""
    if not ops:
        return ""
    r, g, b = rgb
    width = width_mm * PT_PER_MM / UNIT
    return (f"q {UNIT:g} 0 0 {UNIT:g} 0 0 cm {r:.3f} {g:.3f} {b:.3f} RG {width:.2f} w "
            f"{cap} J 1 j\n{ops}S Q\n")


def _grid_ops(geo: dict[str, Any], grid: str) -> str:
    x0, y0, w, h = geo["grid_mm"]
    minor_rgb, major_rgb = GRID_COLOURS[grid]
    out = []
    for major, rgb, width in ((False, minor_rgb, MINOR_W_MM), (True, major_rgb, MAJOR_W_MM)):
        xs = np.arange(0, int(w) + 1)
        ys = np.arange(0, int(h) + 1)
        xs = xs[(xs % 5 == 0) == major]
        ys = ys[(ys % 5 == 0) == major]
        # each line is two points: (x, y0) -> (x, y0 + h), and likewise horizontally
        lx = np.concatenate([np.repeat(x0 + xs, 2), np.tile([x0, x0 + w], ys.size)])
        ly = np.concatenate([np.tile([y0, y0 + h], xs.size), np.repeat(y0 + ys, 2)])
        starts = np.zeros(lx.size, bool)
        starts[::2] = True
        out.append(_stroke(path_ops(lx * PT_PER_MM, ly * PT_PER_MM, starts), rgb, width))
    return "".join(out)



@dataclass(frozen=True)
class ReportStyle:
    """How a page is drawn: paper, grid colours and the display filter (drawing only)."""

    paper: str = "a4"
    grid: str = "red"
    highpass_hz: float = 0.05
    lowpass_hz: float = 150.0
    notch_hz: float | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> ReportStyle:
        low, high = (float(v) for v in settings.report_filter.split("-"))
        return cls(paper=settings.report_paper, grid=settings.report_grid, highpass_hz=low,
                   lowpass_hz=high,
                   notch_hz=float(settings.mains_hz) if settings.report_notch else None)

    def filter_text(self) -> str:
        notch = f", {self.notch_hz:g} Hz notch" if self.notch_hz else ""
        return f"{self.highpass_hz:g}-{self.lowpass_hz:g} Hz{notch}"


def display_filter(leads_uv: np.ndarray, fs: float, style: ReportStyle) -> np.ndarray:
    """The leads as drawn: band-limited (and notched), zero phase, lost samples kept NaN.

    Lost samples are bridged by linear interpolation before filtering (so a gap does not ring)
    and put back as NaN after. Each lead is padded with 5 s of its point reflection (value and
    slope continue, as scipy's filtfilt pads), so a slow baseline leaves no edge transient.
    """
    x = np.array(leads_uv, dtype=np.float64, copy=True)
    lost = np.isnan(x)
    n = x.shape[1]
    if n < 8:
        return x
    idx = np.arange(n)
    for row in np.flatnonzero(lost.any(axis=1)):
        good = ~lost[row]
        x[row] = np.interp(idx, idx[good], x[row, good]) if good.any() else 0.0
    pad = min(n - 1, int(5 * fs))
    padded = np.pad(x, ((0, 0), (pad, pad)), mode="reflect", reflect_type="odd")
    freqs = np.fft.rfftfreq(padded.shape[1], 1.0 / fs)
    with np.errstate(divide="ignore"):
        gain = 1.0 / np.sqrt(1.0 + (style.highpass_hz / freqs) ** 8)  # 4th-order magnitude
    gain[0] = 0.0
    gain *= 1.0 / np.sqrt(1.0 + (freqs / style.lowpass_hz) ** 8)
    if style.notch_hz:
        for k in range(1, int(fs / 2 // style.notch_hz) + 1):
            gain *= 1.0 - np.exp(-(((freqs - k * style.notch_hz) / 1.0) ** 2))
    out = np.fft.irfft(np.fft.rfft(padded, axis=1) * gain, padded.shape[1], axis=1)
    out = out[:, pad : pad + n]
    out[lost] = np.nan
    return out


# Which leads an electrode reaches (limb electrodes feed every limb lead that uses them).
_ELECTRODE_LEADS = {
    "LA": ("I", "III", "aVR", "aVL", "aVF"),
    "RA": ("I", "II", "aVR", "aVL", "aVF"),
    "LL": ("II", "III", "aVR", "aVL", "aVF"),
    **{f"V{k}": (f"V{k}",) for k in range(1, 7)},
}
assert set(_ELECTRODE_LEADS) == set(ELECTRODES)


@dataclass(frozen=True)
class _Window:
    lead: str
    first: int
    count: int
    x_mm: float
    base_mm: float


def _windows(record: Record, geo: dict[str, Any]) -> list[_Window]:
    """Where each lead's samples go: the 3x4 block, then the lead II rhythm strip."""
    per_window = round(WINDOW_S * record.sampling_rate)
    x0 = geo["trace_x0_mm"]
    out = [_Window(name, k * per_window, per_window, x0 + k * WINDOW_S * SPEED_MM_S,
                   geo["baselines_mm"][r])
           for k, column in enumerate(COLUMNS) for r, name in enumerate(column)]
    out.append(_Window(RHYTHM_LEAD, 0, 4 * per_window, x0, geo["baselines_mm"][3]))
    return out


def _trace_ops(record: Record, geo: dict[str, Any], page_h_mm: float,
               drawn: np.ndarray | None = None) -> tuple[str, list[tuple[str, float, float, bool]]]:
    """All 13 traces as one path (a sub-path per trace), and the lead labels to print."""
    fs = record.sampling_rate
    mm_per_sample = SPEED_MM_S / fs
    if drawn is None:
        drawn = np.where(record.missing, np.nan, record.samples.astype(np.float64))
    xs, ys, starts, labels = [], [], [], []
    for w in _windows(record, geo):
        absent = w.lead not in record.lead_names
        labels.append((w.lead, w.x_mm, w.base_mm, absent))
        if absent:
            continue
        seg = drawn[record.lead_names.index(w.lead), w.first : w.first + w.count]
        if not seg.size:
            continue
        if not np.all(np.isnan(seg)):  # an offset, not a filter: centre the trace on its row
            seg = seg - np.nanmedian(seg)
        xs.append(w.x_mm + np.arange(seg.size) * mm_per_sample)
        ys.append(w.base_mm + seg * (GAIN_MM_MV / 1000.0))
        s = np.zeros(seg.size, bool)
        s[0] = True
        starts.append(s)
    if not xs:
        return "", labels
    x = np.concatenate(xs) * PT_PER_MM
    y = np.clip(np.concatenate(ys), 0.0, page_h_mm) * PT_PER_MM
    return path_ops(x, y, np.concatenate(starts)), labels


def _spans(mask: np.ndarray) -> list[tuple[int, int]]:
    edges = np.diff(np.concatenate(([0], mask.astype(np.int8), [0])))
    return list(zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist(),
                    strict=True))


def marked_spans(record: Record, geo: dict[str, Any]) -> list[tuple[str, float, float, float]]:
    """(kind, x0_mm, x1_mm, baseline_mm) of every lost or electrode-off span a window shows."""
    off = np.zeros((len(record.lead_names), record.n_samples), bool)
    for e in record.quality.electrodes_off:
        for lead in _ELECTRODE_LEADS.get(e.electrode, ()):
            if lead in record.lead_names:
                off[record.lead_names.index(lead), e.start : e.start + e.length] = True
    mm_per_sample = SPEED_MM_S / record.sampling_rate
    marks = []
    for w in _windows(record, geo):
        if w.lead not in record.lead_names:
            continue
        row = record.lead_names.index(w.lead)
        sl = slice(w.first, w.first + w.count)
        for kind, mask in (("lost", record.missing[row, sl]), ("off", off[row, sl])):
            for a, b in _spans(mask):
                marks.append((kind, w.x_mm + a * mm_per_sample, w.x_mm + b * mm_per_sample,
                              w.base_mm))
    return marks

def _furniture_ops(geo: dict[str, Any]) -> str:
    """Calibration pulses (1 mV x 200 ms) on every row and ticks where the lead changes."""
    cx = geo["cal_x0_mm"]
    pulse_w = 0.2 * SPEED_MM_S  # 5 mm
    xs, ys, starts = [], [], []
    for base in geo["baselines_mm"]:
        top = base + GAIN_MM_MV
        xs.append([cx - 1.0, cx + 1.0, cx + 1.0, cx + 1.0 + pulse_w, cx + 1.0 + pulse_w,
                   cx + 3.0 + pulse_w])
        ys.append([base, base, top, top, base, base])
        starts.append([True] + [False] * 5)
    for base in geo["baselines_mm"][:3]:
        for k in range(1, 4):
            x = geo["trace_x0_mm"] + k * WINDOW_S * SPEED_MM_S
            xs.append([x, x])
            ys.append([base - 2.0, base + 2.0])
            starts.append([True, False])
    x = np.concatenate(xs) * PT_PER_MM
    y = np.concatenate(ys) * PT_PER_MM
    return path_ops(x, y, np.concatenate(starts).astype(bool))



def _patient_lines(patient: Mapping[str, Any] | None) -> tuple[str, str]:
    """The patient's name (or id) line and the id/birth/age/sex line; "-" where absent.

    The name is first_name + last_name, else patient_name, else name (the legacy report
    index's key); the keys are listed in patient.KNOWN_KEYS.
    """
    p = _given(patient)
    name = " ".join(str(p[k]).strip() for k in ("first_name", "last_name") if k in p)
    name = name or str(p.get("patient_name") or p.get("name") or "-")
    pid = p.get("patient_id") or p.get("id")
    dob = p.get("dob") or p.get("date_of_birth")
    parts = [f"ID {pid}" if pid else "ID -", f"DOB {dob}" if dob else "DOB -",
             f"Age {p.get('age', '-')}", f"Sex {p.get('gender', p.get('sex', '-'))}"]
    return name, "    ".join(parts)


def _referral_line(patient: Mapping[str, Any] | None) -> str | None:
    """Who asked for the ECG and where: doctor (and their phone), organisation, and when the
    legacy front end took the details (its `date_time`); None when the block has none."""
    p = _given(patient)
    parts = []
    if "doctor" in p or "doctor_mobile" in p:
        doctor = f"Ref. {p.get('doctor', '-')}"
        parts.append(doctor + (f" (tel {p['doctor_mobile']})" if "doctor_mobile" in p else ""))
    if "Org." in p:
        parts.append(f"Org. {p['Org.']}")
    if "date_time" in p:
        parts.append(f"Details taken {p['date_time']}")
    return "    ".join(parts) if parts else None


def _given(patient: Mapping[str, Any] | None) -> dict[str, Any]:
    return {k: v for k, v in (patient or {}).items() if v not in (None, "")}


def _value(m: Mapping[str, Any], name: str, unit: str = "") -> str:
    value = m.get(name)
    if not isinstance(value, int | float) or isinstance(value, bool) or value != value:
        return "-"
    return f"{value:.0f}{unit}"


def measurement_rows(measurements: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(label, value) pairs of the header, in the order carts print them."""
    m = measurements
    return [
        ("Vent. rate", _value(m, "heart_rate_bpm", " bpm")),
        ("RR interval", _value(m, "rr_ms", " ms")),
        ("PR interval", _value(m, "pr_ms", " ms")),
        ("QRS duration", _value(m, "qrs_ms", " ms")),
        ("QT/QTcB", f"{_value(m, 'qt_ms')}/{_value(m, 'qtc_bazett_ms')} ms"),
        ("QTcF", _value(m, "qtc_fridericia_ms", " ms")),
        ("P-R-T axes", "/".join(_value(m, k) for k in ("p_axis_deg", "qrs_axis_deg",
                                                          "t_axis_deg")) + " deg"),
    ]


def quality_line(record: Record) -> str:
    """The quality verdict and the record's own reasons (decided once, in record.py)."""
    q = record.quality
    return f"Quality: {q.verdict}" + (" - " + "; ".join(q.reasons) if q.reasons else "")


_SHORT = {"heart_rate_bpm": "rate", "rr_ms": "RR", "pr_ms": "PR", "qrs_ms": "QRS",
          "qt_ms": "QT", "qtc_bazett_ms": "QTcB", "qtc_fridericia_ms": "QTcF",
          "p_axis_deg": "P axis", "qrs_axis_deg": "QRS axis", "t_axis_deg": "T axis"}


def not_measured_line(measurements: Mapping[str, Any]) -> str | None:
    """Why each "-" is a "-": the measurement's own reason, grouped by reason."""
    reasons = dict(measurements.get("reasons") or {})
    if measurements.get("not_measured_reason"):  # records measured by agent 0.1
        reasons.setdefault("heart_rate_bpm", measurements["not_measured_reason"])
    by_reason: dict[str, list[str]] = {}
    for name, why in reasons.items():
        by_reason.setdefault(str(why), []).append(_SHORT.get(str(name), str(name)))
    if not by_reason:
        return None
    return "Not measured: " + "; ".join(f"{', '.join(names)} ({why})"
                                        for why, names in by_reason.items())

def _acquired_text(when: datetime) -> str:
    text = when.strftime("%Y-%m-%d %H:%M:%S")
    offset = when.utcoffset()
    if offset is None:
        return text + " (time zone not recorded)"
    zone = when.strftime("%z")
    name = when.tzname() or ""
    label = f"UTC{zone[:3]}:{zone[3:]}"
    return f"{text} {label}" + (f" ({name})" if name and not name.startswith("UTC") else "")



def render_pdf(record: Record, patient: Mapping[str, Any] | None, *,
               style: ReportStyle | None = None) -> bytes:
    """One true-scale landscape page: grid, 3x4 leads, lead II rhythm strip, header, footer."""
    style = style or ReportStyle()
    if style.grid not in GRID_COLOURS:
        raise ValueError(f"grid {style.grid!r} unknown: use one of {', '.join(GRID_COLOURS)}")
    geo = layout(style.paper)
    width_mm, height_mm = geo["page_mm"]
    mm = PT_PER_MM
    rejected = record.quality.verdict == VERDICT_REJECTED
    drawn = display_filter(np.where(record.missing, np.nan, record.samples.astype(np.float64)),
                           record.sampling_rate, style)

    buffer = io.BytesIO()
    canvas = Canvas(buffer, pagesize=(width_mm * mm, height_mm * mm), pageCompression=1,
                    invariant=1)
    canvas.setTitle(f"12-lead ECG {record.record_id or record.stamp}")
    canvas.setAuthor(f"device_agent {__version__}")
    canvas.setCreator(f"device_agent {__version__}")

    canvas.addLiteral(_grid_ops(geo, style.grid))
    _draw_marks(canvas, marked_spans(record, geo))
    trace_ops, labels = _trace_ops(record, geo, height_mm, drawn)
    canvas.addLiteral(_stroke(trace_ops, (0.0, 0.0, 0.0), TRACE_W_MM, cap=1))
    canvas.addLiteral(_stroke(_furniture_ops(geo), (0.0, 0.0, 0.0), TRACE_W_MM))

    canvas.setFillColorRGB(0, 0, 0)
    canvas.setFont("Helvetica-Bold", 9)
    for name, x_mm, base_mm, absent in labels:
        text = f"{name} (not recorded)" if absent else name
        canvas.drawString((x_mm + 1.5) * mm, (base_mm + ROW_MM / 2.0 - 5.0) * mm, text)

    x0 = geo["grid_mm"][0]
    top = height_mm - 9.0
    name, details = _patient_lines(patient)
    left_w = 145.0 * mm  # the patient block, left of the measurements
    canvas.setFont("Helvetica-Bold", 12)
    canvas.drawString(x0 * mm, top * mm, simpleSplit(name, "Helvetica-Bold", 12, left_w)[0])
    canvas.setFont("Helvetica", 9)
    device = record.device
    canvas.drawString(x0 * mm, (top - 4.5) * mm, simpleSplit(details, "Helvetica", 9, left_w)[0])
    referral = _referral_line(patient)
    shift = 0.0
    if referral:  # one more line; the reasons below still stop at the grid
        canvas.drawString(x0 * mm, (top - 9.0) * mm,
                          simpleSplit(referral, "Helvetica", 9, left_w)[0])
        shift = 4.0
    canvas.drawString(x0 * mm, (top - 9.0 - shift) * mm,
                      f"Acquired {_acquired_text(record.acquired_at)}    "
                      f"Device {device.serial} ({device.model})")
    rows = measurement_rows(record.measurements)
    for i, (label, value) in enumerate(rows):
        col, line = divmod(i, 3)
        x = x0 + 148.0 + col * 38.0
        y = top - line * 4.5
        canvas.setFont("Helvetica", 8)
        canvas.drawString(x * mm, y * mm, label)
        canvas.setFont("Helvetica-Bold", 8)
        canvas.drawRightString((x + 35.0) * mm, y * mm, value)
    canvas.setFont("Helvetica-Bold" if rejected else "Helvetica", 9)
    if rejected:
        canvas.setFillColorRGB(0.8, 0.0, 0.0)
    y = top - 14.5 - shift
    for part in simpleSplit(quality_line(record), "Helvetica", 9, GRID_W_MM * mm)[:2]:
        canvas.drawString(x0 * mm, y * mm, part)
        y -= 4.0
    canvas.setFillColorRGB(0, 0, 0)
    reasons = not_measured_line(record.measurements)
    if reasons:
        canvas.setFont("Helvetica", 8)
        for part in simpleSplit(reasons, "Helvetica", 8, GRID_W_MM * mm):
            if y < GRID_Y0_MM + GRID_H_MM + 1.0:
                break  # the header is full; the JSON holds every reason
            canvas.drawString(x0 * mm, y * mm, part)
            y -= 3.6
    if rejected:
        _banner(canvas, geo)

    canvas.setFont("Helvetica", 7.5)
    footer = (f"{SPEED_MM_S:g} mm/s    {GAIN_MM_MV:g} mm/mV    Grid 1 mm / 5 mm    "
              f"Display filter {style.filter_text()} (drawing only; data unfiltered)    "
              f"Sampling {record.sampling_rate} Hz    device_agent {__version__}    "
              f"Record {record.record_id or record.stamp}")
    canvas.drawString(x0 * mm, (GRID_Y0_MM - 4.5) * mm, footer)
    method = str(record.measurements.get("method") or "not measured")
    canvas.drawString(x0 * mm, (GRID_Y0_MM - 8.0) * mm,
                      f"Measurements: {method}.    Print at actual size (100 %, no fit to "
                      "page) for true scale.")
    canvas.showPage()
    with _binary_streams():
        canvas.save()
    return buffer.getvalue()


MARK_COLOURS = {"lost": (0.55, 0.55, 0.55), "off": (1.0, 0.55, 0.0)}


def _draw_marks(canvas: Canvas, marks: list[tuple[str, float, float, float]]) -> None:
    """Shade lost spans grey and electrode-off spans orange in the rows they affect."""
    mm = PT_PER_MM
    for kind, a, b, base in marks:
        canvas.saveState()
        canvas.setFillColorRGB(*MARK_COLOURS[kind])
        canvas.setFillAlpha(0.35)
        band = ROW_MM * 0.8 if kind == "lost" else 2.5
        y = base - ROW_MM * 0.4 if kind == "lost" else base - ROW_MM / 2.0 + 1.0
        canvas.rect(a * mm, y * mm, max(b - a, 0.3) * mm, band * mm, stroke=0, fill=1)
        canvas.restoreState()


def _banner(canvas: Canvas, geo: dict[str, Any]) -> None:
    """Across the page: this capture was rejected and is not for diagnosis."""
    x0, y0, w, h = geo["grid_mm"]
    mm = PT_PER_MM
    canvas.saveState()
    canvas.setFillColorRGB(0.85, 0.0, 0.0)
    canvas.setFillAlpha(0.30)
    canvas.setFont("Helvetica-Bold", 40)
    canvas.drawCentredString((x0 + w / 2) * mm, (y0 + h / 2 + 5.0) * mm,
                             "REJECTED CAPTURE - NOT FOR DIAGNOSIS")
    canvas.restoreState()


_RL_LOCK = threading.Lock()


@contextlib.contextmanager
def _binary_streams() -> Iterator[None]:
    """Page streams flate-compressed at FLATE_LEVEL and not ASCII85-wrapped.

    reportlab offers neither as an option: ASCII85 (pure Python without its C accelerator)
    costs most of the render time and adds a quarter to the size, and its zlib level 6
    spends 4x longer than level 4 to save a tenth on this data. Both are module settings,
    so they are swapped under a lock and restored; only this module uses reportlab.
    """

    class _Flate(pdfdoc.PDFStreamFilterZCompress):
        def encode(self, text: str | bytes) -> bytes:  # as reportlab's own, at another level
            data = text.encode("utf8") if isinstance(text, str) else text
            return zlib.compress(data, FLATE_LEVEL)

    with _RL_LOCK:
        saved = rl_config.useA85, pdfdoc.PDFZCompress
        rl_config.useA85, pdfdoc.PDFZCompress = 0, _Flate()
        try:
            yield
        finally:
            rl_config.useA85, pdfdoc.PDFZCompress = saved
