"""The one-page 12-lead PDF report, true to scale (25 mm/s, 10 mm/mV), and `cmd_report`.

Traces and grid are written as PDF path operators formatted by numpy in one pass (no
per-point Python call) and injected with `Canvas.addLiteral`; the page is zlib-compressed.
Layout and conventions: README.md, "The record format".
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import logging
import os
import threading
import zlib
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from device_agent import __version__, qrs
from device_agent.errors import AgentError
from device_agent.record import Record

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
MAINS_WARN_UV = 20.0
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


def _lead_uv(record: Record, name: str) -> np.ndarray | None:
    """A lead in uV with NaN where lost; None if not recorded."""
    return record.lead(name) if name in record.lead_names else None


def _trace_ops(record: Record, geo: dict[str, Any], page_h_mm: float) -> tuple[str, list]:
    """All 13 traces as one path (a sub-path per trace), and the lead labels to print."""
    fs = record.sampling_rate
    mm_per_sample = SPEED_MM_S / fs
    per_window = round(WINDOW_S * fs)
    xs, ys, starts, labels = [], [], [], []
    cache: dict[str, np.ndarray | None] = {}

    def add(name: str, first: int, count: int, x_mm: float, base_mm: float) -> None:
        if name not in cache:
            cache[name] = _lead_uv(record, name)
        values = cache[name]
        labels.append((name, x_mm, base_mm, values is None))
        if values is None:
            return
        seg = values[first : first + count]
        if not seg.size:
            return
        if not np.all(np.isnan(seg)):  # an offset, not a filter: centre the trace on its row
            seg = seg - np.nanmedian(seg)
        xs.append(x_mm + np.arange(seg.size) * mm_per_sample)
        ys.append(base_mm + seg * (GAIN_MM_MV / 1000.0))
        s = np.zeros(seg.size, bool)
        s[0] = True
        starts.append(s)

    x_start = geo["trace_x0_mm"]
    for k, column in enumerate(COLUMNS):
        for r, name in enumerate(column):
            add(name, k * per_window, per_window,
                x_start + k * WINDOW_S * SPEED_MM_S, geo["baselines_mm"][r])
    add(RHYTHM_LEAD, 0, 4 * per_window, x_start, geo["baselines_mm"][3])
    if not xs:
        return "", labels
    x = np.concatenate(xs) * PT_PER_MM
    y = np.clip(np.concatenate(ys), 0.0, page_h_mm) * PT_PER_MM
    return path_ops(x, y, np.concatenate(starts)), labels


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


def _patient_line(patient: Mapping[str, Any] | None) -> str:
    p = {k: v for k, v in (patient or {}).items() if v not in (None, "")}
    name = " ".join(str(p[k]).strip() for k in ("first_name", "last_name") if k in p)
    name = name or str(p.get("patient_name") or p.get("patient_id") or p.get("id") or "-")
    parts = [name, f"Age {p.get('age', '-')}", f"Sex {p.get('gender', p.get('sex', '-'))}"]
    if "doctor" in p:
        parts.append(f"Doctor {p['doctor']}")
    if "Org." in p:
        parts.append(str(p["Org."]))
    return "    ".join(parts)


def _acquired_text(when: datetime) -> str:
    text = when.strftime("%Y-%m-%d %H:%M:%S")
    offset = when.utcoffset()
    if offset is None:
        return text + " (time zone not recorded)"
    zone = when.strftime("%z")
    name = when.tzname() or ""
    label = f"UTC{zone[:3]}:{zone[3:]}"
    return f"{text} {label}" + (f" ({name})" if name and not name.startswith("UTC") else "")


def quality_lines(record: Record, result: qrs.QrsResult) -> list[str]:
    """The quality verdict and every warning the page must show, as short sentences."""
    q = record.quality
    fs = record.sampling_rate
    warnings = []
    if q.electrodes_off:
        names = sorted({e.electrode for e in q.electrodes_off})
        warnings.append("electrode off: " + ", ".join(names))
    lost = int(record.missing.any(axis=0).sum()) if record.missing.size else 0
    if q.frames_lost or lost:
        n = max(q.frames_lost, lost)
        share = n / max(q.frames_expected or record.n_samples, 1)
        gaps = f" in {len(q.gaps)} gap(s)" if q.gaps else ""
        warnings.append(f"lost samples: {n} ({share:.1%}, {n / fs * 1000:.0f} ms){gaps}")
    if q.flat_leads:
        warnings.append("flat: " + ", ".join(q.flat_leads))
    if q.saturated_leads:
        warnings.append("saturated: " + ", ".join(q.saturated_leads))
    if q.mains_noise_uv is not None and q.mains_noise_uv >= MAINS_WARN_UV:
        warnings.append(f"mains noise {q.mains_noise_uv:.0f} uV")
    if q.bad_frames:
        warnings.append(f"{q.bad_frames} damaged frame(s) dropped")
    lines = [f"Quality: {q.verdict}" + (" - " + "; ".join(warnings) if warnings else "")]
    if not result.confident:
        lines.append(f"Heart rate not measured: {result.reason}")
    return lines


def _qrs_result(record: Record, mains_hz: float) -> qrs.QrsResult:
    if qrs.LEAD not in record.lead_names:
        return qrs.QrsResult(np.zeros(0, np.int64), record.sampling_rate, None, None, False,
                             f"lead {qrs.LEAD} not recorded", qrs.method_text(mains_hz))
    return qrs.detect_record(record, mains_hz=mains_hz)


def render_pdf(
    record: Record,
    patient: Mapping[str, Any] | None,
    *,
    paper: str = "a4",
    grid: str = "red",
    mains_hz: float = 50.0,
) -> bytes:
    """One true-scale landscape page: grid, 3x4 leads, lead II rhythm strip, header, footer."""
    from reportlab.lib.utils import simpleSplit
    from reportlab.pdfgen.canvas import Canvas

    if grid not in GRID_COLOURS:
        raise ValueError(f"grid {grid!r} unknown: use one of {', '.join(GRID_COLOURS)}")
    geo = layout(paper)
    width_mm, height_mm = geo["page_mm"]
    mm = PT_PER_MM
    result = _qrs_result(record, mains_hz)

    buffer = io.BytesIO()
    canvas = Canvas(buffer, pagesize=(width_mm * mm, height_mm * mm), pageCompression=1,
                    invariant=1)
    canvas.setTitle(f"12-lead ECG {record.record_id or record.stamp}")
    canvas.setAuthor(f"device_agent {__version__}")
    canvas.setCreator(f"device_agent {__version__}")

    canvas.addLiteral(_grid_ops(geo, grid))
    trace_ops, labels = _trace_ops(record, geo, height_mm)
    canvas.addLiteral(_stroke(trace_ops, (0.0, 0.0, 0.0), TRACE_W_MM, cap=1))
    canvas.addLiteral(_stroke(_furniture_ops(geo), (0.0, 0.0, 0.0), TRACE_W_MM))

    canvas.setFillColorRGB(0, 0, 0)
    canvas.setFont("Helvetica-Bold", 9)
    for name, x_mm, base_mm, absent in labels:
        text = f"{name} (not recorded)" if absent else name
        canvas.drawString((x_mm + 1.5) * mm, (base_mm + ROW_MM / 2.0 - 5.0) * mm, text)

    x0 = geo["grid_mm"][0]
    right = x0 + GRID_W_MM
    top = height_mm - 9.0
    canvas.setFont("Helvetica-Bold", 12)
    canvas.drawString(x0 * mm, top * mm, _patient_line(patient))
    canvas.setFont("Helvetica", 9)
    canvas.drawRightString(right * mm, top * mm, "12-lead ECG")
    device = record.device
    canvas.drawString(x0 * mm, (top - 5.5) * mm,
                      f"Acquired {_acquired_text(record.acquired_at)}    "
                      f"Device {device.serial} ({device.model})")
    canvas.setFont("Helvetica-Bold", 11)
    if result.confident:
        rate = f"HR {result.heart_rate_bpm:.0f} bpm    RR {result.rr_mean_ms:.0f} ms"
    else:
        rate = "HR -    RR -"
    canvas.drawString(x0 * mm, (top - 11.5) * mm, rate)
    canvas.setFont("Helvetica", 7)
    canvas.drawString((x0 + 65.0) * mm, (top - 11.5) * mm,
                      f"{result.method}; {result.beats.size} beats")
    canvas.setFont("Helvetica", 9)
    y = top - 17.0
    for line in quality_lines(record, result):
        for part in simpleSplit(line, "Helvetica", 9, GRID_W_MM * mm)[:2]:
            canvas.drawString(x0 * mm, y * mm, part)
            y -= 4.0

    canvas.setFont("Helvetica", 8)
    footer = (f"{SPEED_MM_S:g} mm/s    {GAIN_MM_MV:g} mm/mV    Grid 1 mm / 5 mm    "
              f"Drawing filters: none (each trace centred on its median)    "
              f"Sampling {record.sampling_rate} Hz    device_agent {__version__}    "
              f"Record {record.record_id or record.stamp}")
    canvas.drawString(x0 * mm, (GRID_Y0_MM - 5.0) * mm, footer)
    canvas.drawString(x0 * mm, (GRID_Y0_MM - 9.0) * mm,
                      "Print at actual size (100 %, no fit to page) for true scale.")
    canvas.showPage()
    with _binary_streams():
        canvas.save()
    return buffer.getvalue()


_RL_LOCK = threading.Lock()


@contextlib.contextmanager
def _binary_streams():
    """Page streams flate-compressed at FLATE_LEVEL and not ASCII85-wrapped.

    reportlab offers neither as an option: ASCII85 (pure Python without its C accelerator)
    costs most of the render time and adds a quarter to the size, and its zlib level 6
    spends 4x longer than level 4 to save a tenth on this data. Both are module settings,
    so they are swapped under a lock and restored; only this module uses reportlab.
    """
    from reportlab import rl_config
    from reportlab.pdfbase import pdfdoc

    class _Flate(pdfdoc.PDFStreamFilterZCompress):
        def encode(self, text):  # as reportlab's own, at another level
            data = text.encode("utf8") if isinstance(text, str) else text
            return zlib.compress(data, FLATE_LEVEL)

    with _RL_LOCK:
        saved = rl_config.useA85, pdfdoc.PDFZCompress
        rl_config.useA85, pdfdoc.PDFZCompress = 0, _Flate()
        try:
            yield
        finally:
            rl_config.useA85, pdfdoc.PDFZCompress = saved


def write_atomic(path: Path, data: bytes) -> None:
    """Write a file via a temp file in the same folder, fsync, rename (never a torn PDF)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _read_json_file(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_bytes())
    except OSError as exc:
        raise AgentError(f"cannot read {what} {path}: {exc.strerror}; check the path") from exc
    except ValueError as exc:
        raise AgentError(f"{what} {path} is not valid JSON ({exc}); the file is damaged") from exc


def cmd_report(settings, args) -> int:
    """Re-render a PDF report from a stored ecg_data JSON (and patient details)."""
    from device_agent.ecgdata import loads

    try:
        data = Path(args.input).read_bytes()
    except OSError as exc:
        raise AgentError(
            f"cannot read ecg data {args.input}: {exc.strerror}; check the path") from exc
    try:
        record = loads(data, source=str(args.input))
    except ValueError as exc:
        raise AgentError(f"{exc}") from exc
    patient = None
    if args.patient is not None:
        patient = _read_json_file(Path(args.patient), "patient details")
        if not isinstance(patient, dict):
            raise AgentError(f"patient details {args.patient} is not a JSON object")
    pdf = render_pdf(record, patient, paper=settings.report_paper, grid=settings.report_grid,
                     mains_hz=float(settings.mains_hz))
    out = Path(args.out)
    try:
        write_atomic(out, pdf)
    except OSError as exc:
        raise AgentError(f"cannot write report {out}: {exc.strerror}; check the folder") from exc
    log.info("report for record %s written to %s", record.record_id, out)
    from device_agent.cli import echo

    echo(f"wrote {out} ({len(pdf)} bytes)")
    return 0
